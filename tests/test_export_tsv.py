"""`vlkd-extract export-tsv`: region sets as the TSV files Oscar's own scripts read, and back.

The export is read with tests/test_tsv.py's re-implementations of Oscar's read paths
(``TSVFile``, ``generate_lineidx_file``, ``run_captioning.py``'s ``CaptionTSVDataset``:
yaml, ``find_file_path_in_yaml``, keys from label.tsv, feature row i for label row i,
``get_od_labels``, the captions and their COCO-format twin; ``run_vqa.py``'s
``get_img_feature``), imported back with ``import-tsv`` (the same arrays and box digests),
trained on with ``vlkd-train``, and used as the proposals of ``teacher-features``.
"""
from __future__ import annotations

import json
import os

import numpy as np
import yaml

from extract_fixtures import tiny_weights  # noqa: F401 (a fixture)
from extract_fixtures import DETECTOR_CONFIGS, invoke_extract, make_images
from test_tsv import (OscarTSVFile, oscar_caption_features, oscar_generate_lineidx,
                      oscar_od_labels, oscar_vqa_feature)
from vlkd.common.manifest import read_manifest, update_manifest
from vlkd.common.regionset import RegionSet, ShardWriter
from vlkd.common.validate import validate_region_set
from vlkd.data.tsv import lineidx_path, make_geometry

D = 12
NAMES = ["dog", "cat", "red car", "tree"]
ATTRS = ["brown", "small", "old", "wet", "green"]


def errors(set_dir, **kw):
    return [f for f in validate_region_set(set_dir, **kw) if f.level == "error"]


def make_set(root, *, dtype="float16", k=3, num_shards=2, seed=0):
    """A region set as extraction writes it, with attributes, an image without regions and a
    failed image; returns ``{image_id: (hw, boxes, scores, classes, features, attr_ids,
    attr_scores)}``."""
    rng = np.random.default_rng(seed)
    ids = [str(391895 + 7 * i) for i in range(7)]
    counts = [3, 0, 5, 1, 2, 4, 2]
    stored = {}
    per = -(-len(ids) // num_shards)
    for s in range(num_shards):
        with ShardWriter(root, s, num_shards, feature_dim=D, feature_dtype=dtype,
                         extras={"attr_ids": ("int32", k), "attr_scores": ("float32", k)}) as w:
            for iid, n in list(zip(ids, counts))[s * per:(s + 1) * per]:
                if iid == ids[3]:
                    w.add_failure(iid, "corrupt: cannot decode the image")
                    continue
                h, wd = int(rng.integers(100, 600)), int(rng.integers(100, 600))
                xy = rng.uniform(0, 0.5, (n, 2)) * (wd, h)
                boxes = np.concatenate([xy, xy + 2 + rng.uniform(0, 0.4, (n, 2)) * (wd, h)],
                                       1).astype(np.float32)
                a = np.full((n, k), -1, np.int32)
                sc = np.zeros((n, k), np.float32)
                for j in range(n):
                    m = int(rng.integers(0, k + 1))
                    a[j, :m] = rng.choice(len(ATTRS), m, replace=False)
                    sc[j, :m] = np.sort(rng.random(m).astype(np.float32))[::-1]
                rec = ((h, wd), boxes, rng.random(n).astype(np.float32),
                       rng.integers(0, len(NAMES), n).astype(np.int32),
                       rng.standard_normal((n, D)).astype(dtype), a, sc)
                w.append(iid, rec[0], *rec[1:5], extras={"attr_ids": a, "attr_scores": sc})
                stored[iid] = rec
            w.finalize()
    update_manifest(root, lambda m: {**m, "role": "proposals", "class_names": NAMES,
                                     "attribute_names": ATTRS, "detector": {"name": "toy"}})
    return stored, ids


def export(set_dir, out, *args, expect=0):
    return invoke_extract(["export-tsv", str(set_dir), "--out", str(out),
                           *[str(a) for a in args]], expect=expect)


def imp(*args, expect=0):
    return invoke_extract(["import-tsv", "--no-progress", "--num-workers", "0",
                           "--shard-index", "all", *[str(a) for a in args]], expect=expect)


# ---------------------------------------------- Oscar's run_captioning.py and run_vqa.py

def caption_dataset(yaml_file):
    """run_captioning.py CaptionTSVDataset.__init__ (load_from_yaml_file,
    find_file_path_in_yaml, TSVFile, prepare_image_keys/_key_to_index/_key_to_captions)."""
    def find(fname, root):
        if fname is not None:
            if os.path.isfile(fname):
                return fname
            if os.path.isfile(os.path.join(root, fname)):
                return os.path.join(root, fname)
            raise FileNotFoundError(os.path.join(root, fname))
    with open(yaml_file) as fp:
        cfg = yaml.load(fp, Loader=yaml.FullLoader)
    root = os.path.dirname(yaml_file)
    label_file, feat_file = find(cfg["label"], root), find(cfg["feature"], root)
    caption_file = find(cfg.get("caption"), root)
    label_tsv, feat_tsv = OscarTSVFile(label_file), OscarTSVFile(feat_file)
    keys = [label_tsv.seek(i)[0] for i in range(label_tsv.num_rows())]
    key2captions = {key: [] for key in keys}
    captions = json.load(open(caption_file)) if caption_file else []
    for cap in captions:
        key2captions[cap["image_id"]].append(cap["caption"])   # KeyError if not exported
    return {"keys": keys, "feat_tsv": feat_tsv, "label_tsv": label_tsv,
            "key2captions": key2captions, "caption_file": caption_file}


def test_export_feeds_oscars_run_captioning_and_run_vqa(tmp_path):
    from pycocotools.coco import COCO

    from train_data import write_captions

    stored, ids = make_set(tmp_path / "set")
    scenes = [{"image_id": i, "objects": [(0, 0)]} for i in ids]
    caps = write_captions(tmp_path / "dataset_coco.json", scenes, {ids[0]: "val", ids[2]: "val"})
    out = tmp_path / "oscar"
    res = export(tmp_path / "set", out, "--split", "val", "--layout", "both", "--captions",
                 caps, "--caption-split", "val")
    assert "5 images from" in res.output
    ds = caption_dataset(out / "val.yaml")
    exported = [i for i in ids if i in stored and len(stored[i][1])]
    assert ds["keys"] == exported           # sorted set order; no empty, no failed image
    for i, key in enumerate(ds["keys"]):
        hw, boxes, scores, classes, feats, a, sc = stored[key]
        full = oscar_caption_features(ds["feat_tsv"], i)
        assert full.dtype == np.float32 and full.shape == (len(boxes), D + 6)
        assert np.array_equal(full[:, :D], feats.astype(np.float32))
        assert np.array_equal(full[:, D:], make_geometry(boxes, hw))
        assert oscar_od_labels(ds["label_tsv"], i) == " ".join(NAMES[c] for c in classes)
        objs = json.loads(ds["label_tsv"].seek(i)[1])
        assert [o["attributes"] for o in objs] == [[ATTRS[x] for x in row if x >= 0]
                                                  for row in a]
        assert [o["conf"] for o in objs] == scores.tolist()
    for p in ("val.feature.tsv", "val.label.tsv", "val.hw.tsv", "val_img_frcnn_feats.tsv"):
        assert lineidx_path(out / p).read_text() == oscar_generate_lineidx(out / p)
    # captions of the exported val images only, and the COCO file evaluation scores against
    assert {k: v for k, v in ds["key2captions"].items() if v} == {
        ids[0]: ["a red circle"] * 2, ids[2]: ["a red circle"] * 2}
    coco_file = os.path.splitext(ds["caption_file"])[0] + "_coco_format.json"
    coco = COCO(coco_file)
    results = coco.loadRes([{"image_id": ids[0], "caption": "a dog"}])
    assert results.getImgIds() == [ids[0]]
    # run_vqa.py: every image of the set, the one without regions included
    for key, (hw, boxes, *_rest) in stored.items():
        feats = stored[key][4]
        got = oscar_vqa_feature(out, "val", key, D + 6)
        assert got.shape == (len(boxes), D + 6)
        assert np.array_equal(got[:, :D], feats.astype(np.float32))
    report = json.loads((out / "export.json").read_text())
    left = {x["image_id"]: x["reason"] for x in report["left_out"]}
    assert left[ids[1]].startswith("no-regions: run_captioning.py reshapes")
    assert left[ids[3]] == "failed in the set: corrupt: cannot decode the image"
    assert report["images"] == 5 and report["vqa_images"] == 6


def test_import_of_an_export_gives_the_same_arrays(tmp_path):
    stored, ids = make_set(tmp_path / "set")
    export(tmp_path / "set", tmp_path / "x")
    x = tmp_path / "x"
    files = ["--features", x / "feature.tsv", "--labels", x / "label.tsv", "--hw",
             x / "hw.tsv", "--labelmap", x / "labelmap.json", "--attributes", 3]
    imp(*files, "--out", tmp_path / "back", "--num-shards", 2)
    assert errors(tmp_path / "back") == []
    back, orig = RegionSet(tmp_path / "back"), RegionSet(tmp_path / "set")
    m = read_manifest(tmp_path / "back")
    assert m["class_names"] == NAMES + [""] and m["attribute_names"] == ATTRS
    exported = [i for i in ids if i in stored and len(stored[i][1])]
    assert sorted(r.image_id for r in back) == exported
    for key in exported:
        a, b = orig.get(key), back.get(key)
        for field in ("image_hw", "box_digest"):
            assert getattr(a, field) == getattr(b, field), (key, field)
        for field in ("boxes", "scores", "classes", "features"):
            x_, y_ = getattr(a, field), getattr(b, field)
            assert x_.dtype == y_.dtype and np.array_equal(x_, y_), (key, field)
        for name in ("attr_ids", "attr_scores"):
            assert np.array_equal(a.extras[name], b.extras[name]), (key, name)
    # once imported, the round trip is exact to the class names too
    export(tmp_path / "back", tmp_path / "y")
    y = tmp_path / "y"
    imp("--features", y / "feature.tsv", "--labels", y / "label.tsv", "--hw", y / "hw.tsv",
        "--labelmap", y / "labelmap.json", "--attributes", 3, "--out", tmp_path / "again",
        "--num-shards", 2)
    again = RegionSet(tmp_path / "again")
    assert read_manifest(tmp_path / "again")["class_names"] == m["class_names"]
    for s_back, s_again in zip(back.shards, again.shards):
        assert list(s_back.image_ids) == list(s_again.image_ids)
        assert np.array_equal(s_back.box_digests, s_again.box_digests)
    assert [e["digest"] for e in m["shards"]] == [
        e["digest"] for e in read_manifest(tmp_path / "again")["shards"]]


def test_float32_round_trip_and_float16_files(tmp_path):
    stored, ids = make_set(tmp_path / "set", dtype="float32", k=1, num_shards=1)
    export(tmp_path / "set", tmp_path / "x", "--feature-dtype", "float16", "--geometry", 4)
    x = tmp_path / "x"
    assert "num_boxes" in (x / "feature.tsv").read_text().split("\n")[0]
    imp("--features", x / "feature.tsv", "--labels", x / "label.tsv", "--hw", x / "hw.tsv",
        "--labelmap", x / "labelmap.json", "--feature-dtype", "float32", "--geometry", 4,
        "--out", tmp_path / "half", expect=1)
    imp("--features", x / "feature.tsv", "--labels", x / "label.tsv", "--hw", x / "hw.tsv",
        "--labelmap", x / "labelmap.json", "--feature-dtype", "float32", "--geometry", 4,
        "--tsv-dtype", "float16", "--out", tmp_path / "half")
    m = read_manifest(tmp_path / "half")
    assert m["options"]["tsv_dtype"] == "float16" and m["options"]["geometry"] == 4
    half = RegionSet(tmp_path / "half")
    for r in half:
        assert np.array_equal(r.features, stored[r.image_id][4].astype(np.float16)
                              .astype(np.float32))
        assert np.array_equal(r.boxes, stored[r.image_id][1])
    export(tmp_path / "set", tmp_path / "y")
    y = tmp_path / "y"
    imp("--features", y / "feature.tsv", "--labels", y / "label.tsv", "--hw", y / "hw.tsv",
        "--labelmap", y / "labelmap.json", "--feature-dtype", "float32", "--out",
        tmp_path / "full")
    full = RegionSet(tmp_path / "full")
    for r in full:
        assert np.array_equal(r.features, stored[r.image_id][4])


def test_options_are_generated_from_the_schema():
    from test_import_tsv import options_of
    from vlkd.extract.options import ExportTsvConfig

    assert options_of("export-tsv", ExportTsvConfig) == {
        "out", "split", "layout", "feature_dtype", "geometry", "captions", "caption_split"}


def test_refusals(tmp_path):
    make_set(tmp_path / "set")
    r = export(tmp_path / "set", tmp_path / "x", "--layout", "vqa", expect=2)
    assert "--layout vqa needs --split" in r.output
    # an incomplete set
    partial = tmp_path / "partial"
    with ShardWriter(partial, 0, 2, feature_dim=D) as w:
        w.append("a", (4, 4), np.zeros((1, 4), np.float32), [1.0], [0], np.zeros((1, D)))
        w.finalize()
    r = export(partial, tmp_path / "y", expect=1)
    assert "is incomplete: shard(s) [1] of 2 are not finished" in r.output


# ----------------------------------------------------------- the rest of the pipeline

def test_an_imported_set_trains_with_no_extra_step(tmp_path):
    from train_data import cli_args, invoke, make_world

    world = make_world(tmp_path / "w", num_images=16, num_val=4)
    export(world["student"], tmp_path / "x")
    x = tmp_path / "x"
    imp("--features", x / "feature.tsv", "--labels", x / "label.tsv", "--hw", x / "hw.tsv",
        "--labelmap", x / "labelmap.json", "--out", tmp_path / "imported", "--num-shards", 2)
    run = tmp_path / "run"
    invoke(["finetune", "--task", "caption", "--regions", tmp_path / "imported", "--model",
            "tiny", *cli_args(world, run, steps=2)])
    meta = json.loads((run / "final" / "vlkd_train.json").read_text())
    assert meta["class_names"] == ["circle", "square", "triangle", "star", ""]
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_teacher_features_pool_over_an_imported_set(tmp_path, tiny_weights):  # noqa: F811
    imgs = tmp_path / "imgs"
    make_images(imgs, 6)
    invoke_extract(["proposals", "--images", imgs, "--config", DETECTOR_CONFIGS["fpn"],
                    "--weights", tiny_weights["fpn"], "--out", tmp_path / "props",
                    "--shard-index", "all", "--num-workers", 0, "--no-progress"])
    export(tmp_path / "props", tmp_path / "x")
    x = tmp_path / "x"
    imp("--features", x / "feature.tsv", "--labels", x / "label.tsv", "--hw", x / "hw.tsv",
        "--labelmap", x / "labelmap.json", "--out", tmp_path / "imported", "--num-shards", 2)
    invoke_extract(["teacher-features", "--proposals", tmp_path / "imported", "--images", imgs,
                    "--config", DETECTOR_CONFIGS["c4"], "--weights", tiny_weights["c4"],
                    "--out", tmp_path / "teacher", "--shard-index", "all", "--num-workers", 0,
                    "--no-progress"])
    assert errors(tmp_path / "teacher", against=str(tmp_path / "imported")) == []
    t, p = RegionSet(tmp_path / "teacher"), RegionSet(tmp_path / "imported")
    for r in p:
        assert np.array_equal(t.get(r.image_id).boxes, r.boxes)
