"""Oscar/VinVL and BUTD TSV files (vlkd.data.tsv).

Fixtures are fabricated in the anchors' exact layouts (tiny widths, random values); the files
vlkd writes are read back through re-implementations of the anchors' own read paths:
microsoft/Oscar ``oscar/utils/tsv_file.py`` (TSVFile, generate_lineidx_file),
``oscar/run_captioning.py`` (get_image_features, get_od_labels), ``oscar/run_vqa.py``
(get_img_feature), ``oscar/run_retrieval.py`` (get_image); peteanderson80/bottom-up-attention
``tools/read_tsv.py``; airsplay/lxmert ``src/utils.py`` (load_obj_tsv).
"""
import base64
import csv
import json
import os
import sys

import numpy as np
import pytest

from vlkd.data.tsv import (BUTD_FIELDS, LXMERT_FIELDS, ButdTsv, ButdTsvWriter,
                           FeatureTsvWriter, HwTsvWriter, LabelTsvWriter, OscarTsv,
                           OscarTsvWriter, SgbPredictionsTsv, TsvFormatError, TsvRows,
                           TsvWriter,
                           boxes_from_geometry, check_geometry, detect_geometry,
                           estimate_image_hw, lineidx_path, make_geometry, oscar_vqa_paths,
                           scan_line_starts, split_geometry, verify_line_starts)

D = 8          # tiny region-feature width (VinVL: 2048)


# ------------------------------------------------------------- the anchors' read paths

class OscarTSVFile:
    """Oscar's TSVFile read path: the .lineidx read as one int per line, the TSV opened in
    text mode, ``seek(i)`` = seek to the offset, readline, split on tabs, strip each field."""

    def __init__(self, path):
        with open(os.path.splitext(path)[0] + ".lineidx") as f:
            self.offsets = [int(v.strip()) for v in f.readlines()]
        self.fp = open(path, "r")

    def num_rows(self):
        return len(self.offsets)

    def seek(self, i):
        self.fp.seek(self.offsets[i])
        return [s.strip() for s in self.fp.readline().split("\t")]


def oscar_generate_lineidx(path) -> str:
    """Oscar's generate_lineidx_file: text-mode ``tell()`` after each ``readline()``."""
    out = []
    with open(path, "r") as f:
        size, pos = os.fstat(f.fileno()).st_size, 0
        while pos != size:
            out.append(f"{pos}\n")
            f.readline()
            pos = f.tell()
    return "".join(out)


def oscar_caption_features(feat_tsv, i):
    """run_captioning.py CaptionTSVDataset.get_image_features (float32, (num_boxes, -1))."""
    info = json.loads(feat_tsv.seek(i)[1])
    return np.frombuffer(base64.b64decode(info["features"]), np.float32).reshape(
        (info["num_boxes"], -1))


def oscar_od_labels(label_tsv, i):
    """run_captioning.py CaptionTSVDataset.get_od_labels."""
    return " ".join(obj["class"] for obj in json.loads(label_tsv.seek(i)[1]))


def oscar_vqa_feature(img_feat_dir, name, image_id, img_feature_dim):
    """run_vqa.py VQADataset.get_img_feature: offset map, seek, split, arr[1], arr[2]."""
    fp = open(os.path.join(img_feat_dir, f"{name}_img_frcnn_feats.tsv"), "r")
    offsets = json.load(open(os.path.join(img_feat_dir,
                                          f"{name}_img_frcnn_feats_offset_map.json")))
    fp.seek(offsets[image_id], 0)
    arr = [s.strip() for s in fp.readline().split("\t")]
    int(arr[1])
    return np.frombuffer(base64.b64decode(arr[2]), dtype=np.float32).reshape(
        (-1, img_feature_dim))


def oscar_retrieval_feature(feat_path, image_id):
    """run_retrieval.py RetrievalDataset.get_image: imageid2idx.json, TSVFile.seek, row[1],
    row[-1]."""
    idx = json.load(open(os.path.join(os.path.dirname(feat_path), "imageid2idx.json")))
    row = OscarTSVFile(feat_path).seek(idx[str(image_id)])
    n = int(row[1])
    return np.frombuffer(base64.b64decode(row[-1]), dtype=np.float32).reshape((n, -1))


def butd_read_tsv(path, fieldnames=BUTD_FIELDS):
    """bottom-up-attention tools/read_tsv.py (and lxmert load_obj_tsv for its fields)."""
    csv.field_size_limit(sys.maxsize)
    out = []
    with open(path, newline="") as f:
        for item in csv.DictReader(f, delimiter="\t", fieldnames=list(fieldnames)):
            n = int(item["num_boxes"])
            spec = [("boxes", (n, 4), np.float32), ("features", (n, -1), np.float32)]
            if "objects_id" in item:
                spec += [("objects_id", (n,), np.int64), ("objects_conf", (n,), np.float32),
                         ("attrs_id", (n,), np.int64), ("attrs_conf", (n,), np.float32)]
            for key, shape, dtype in spec:
                item[key] = np.frombuffer(base64.b64decode(item[key]), dtype).reshape(shape)
            out.append(item)
    return out


# ------------------------------------------------------------------- fabricated data

def _image(rng, n, hw=None):
    h, w = hw or (int(rng.integers(40, 400)), int(rng.integers(40, 400)))
    x1, y1 = rng.uniform(0, w / 2, n), rng.uniform(0, h / 2, n)
    boxes = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, n), y1 + rng.uniform(1, h / 2, n)],
                     1).astype(np.float32)
    return dict(hw=(h, w), boxes=boxes, features=rng.random((n, D), dtype=np.float32),
                names=[f"obj{int(c)}" for c in rng.integers(0, 50, n)],
                scores=rng.random(n, dtype=np.float32))


def _images(seed=0, counts=(3, 0, 5, 1, 4)):
    rng = np.random.default_rng(seed)
    return {f"COCO_val2014_{i:012d}": _image(rng, n) for i, n in enumerate(counts)}


def _b64(arr) -> str:
    return base64.b64encode(np.ascontiguousarray(arr)).decode("ascii")


def _vinvl_feature_line(key, matrix, *, order=("num_boxes", "features"), **dumps):
    info = {"num_boxes": len(matrix), "features": _b64(matrix)}
    return f"{key}\t{json.dumps({k: info[k] for k in order}, **dumps)}"


def _label_line(key, img):
    objs = [{"rect": b.tolist(), "bbox_id": i, "class": c, "conf": float(s)}
            for i, (b, c, s) in enumerate(zip(img["boxes"], img["names"], img["scores"]))]
    return f"{key}\t{json.dumps(objs)}"


def _hw_line(key, img):
    h, w = img["hw"]
    return f"{key}\t{json.dumps([{'height': h, 'width': w}])}"


def _write_lines(path, lines, *, newline="\n", trailing=True, lineidx=True):
    text = newline.join(lines) + (newline if trailing and lines else "")
    path.write_bytes(text.encode("utf-8"))
    if lineidx:
        lineidx_path(path).write_text(oscar_generate_lineidx(path))
    return path


def _vinvl_files(tmp_path, images, dtype=np.float32, geometry=6, **kw):
    feats, labels, hws = [], [], []
    for key, img in images.items():
        full = img["features"]
        if geometry:
            full = np.concatenate([full, make_geometry(img["boxes"], img["hw"], geometry)], 1)
        feats.append(_vinvl_feature_line(key, full.astype(dtype)))
        labels.append(_label_line(key, img))
        hws.append(_hw_line(key, img))
    return (_write_lines(tmp_path / "test.feature.tsv", feats, **kw),
            _write_lines(tmp_path / "test.label.tsv", labels, **kw),
            _write_lines(tmp_path / "test.hw.tsv", hws, **kw))


def _assert_same(rec, img, *, dtype=np.float32):
    assert rec.ok, rec
    assert rec.image_hw == img["hw"]
    assert rec.features.dtype == dtype
    assert np.array_equal(rec.features, img["features"].astype(dtype))
    assert rec.boxes.dtype == np.float32 and np.array_equal(rec.boxes, img["boxes"])
    assert rec.class_names == img["names"] and rec.tags == img["names"]
    assert np.array_equal(rec.scores, img["scores"])


# ------------------------------------------------------------------------- geometry

def test_make_geometry_is_the_writers_float32_formula():
    boxes = np.array([[10, 20, 110, 70], [0, 0, 640, 480]], np.float32)
    g = make_geometry(boxes, (480, 640))
    assert g.dtype == np.float32 and g.shape == (2, 6)
    sx, sy = np.float32(10) / np.float32(640), np.float32(20) / np.float32(480)
    sw, sh = np.float32(100) / np.float32(640), np.float32(50) / np.float32(480)
    assert g[0].tolist() == [sx, sy, sx + sw, sy + sh, sw, sh]
    assert g[1].tolist() == [0, 0, 1, 1, 1, 1]
    assert make_geometry(boxes, (480, 640), columns=4).tolist() == g[:, :4].tolist()
    with pytest.raises(ValueError, match="4 or 6"):
        make_geometry(boxes, (480, 640), columns=5)


def test_check_recover_estimate_and_detect_geometry():
    rng = np.random.default_rng(1)
    img = _image(rng, 6, hw=(375, 500))
    g = make_geometry(img["boxes"], img["hw"])
    assert check_geometry(g, img["boxes"], img["hw"]).ok
    assert check_geometry(g[:, :4], img["boxes"], img["hw"]).ok
    np.testing.assert_allclose(boxes_from_geometry(g, img["hw"]), img["boxes"], atol=1e-3)
    assert estimate_image_hw(g, img["boxes"]) == (375, 500)
    # float16 columns: within the float16 tolerance, not the float32 one
    g16 = g.astype(np.float16)
    assert check_geometry(g16, img["boxes"], img["hw"]).ok
    assert not check_geometry(g16.astype(np.float32), img["boxes"], img["hw"]).ok
    # a shifted box is found, by box and column
    moved = img["boxes"].copy()
    moved[2, 3] += 5
    bad = check_geometry(g, moved, img["hw"])
    assert not bad.ok and bad.box == 2 and bad.column in ("y2/h", "box_h/h")
    assert "differs" in str(bad) and "box 2" in str(bad)
    # swapped height and width do not pass
    assert not check_geometry(g, img["boxes"], (500, 375)).ok
    # detection: the identities hold for geometry, not for random features
    feats = np.concatenate([img["features"], g], 1)
    assert detect_geometry(feats) == 6 and detect_geometry(img["features"]) == 0
    assert detect_geometry(feats.astype(np.float16)) == 6
    f, geo = split_geometry(feats, 6)
    assert np.shares_memory(f, feats) and np.array_equal(geo, g)
    assert split_geometry(feats, 0) == (feats, None)


# ------------------------------------------------------------------ Oscar/VinVL reading

def test_read_vinvl_files_streaming_and_by_key(tmp_path):
    images = _images()
    paths = _vinvl_files(tmp_path, images)
    tsv = OscarTsv(*paths)
    assert (tsv.layout.layout, tsv.layout.dim, tsv.geometry_columns) == ("json", D + 6, 6)
    assert tsv.feature_dim == D and tsv.feature_dtype == np.float32
    recs = list(tsv)
    assert [r.image_id for r in recs] == list(images)
    for rec, img in zip(recs, images.values()):
        _assert_same(rec, img)
        assert rec.boxes_from == "labels" and not rec.notes
        assert check_geometry(rec.geometry, rec.boxes, rec.image_hw).ok
        assert not rec.features.flags.writeable
    key = list(images)[2]
    again = tsv.get(key)
    _assert_same(again, images[key])
    assert again.row == 2 and tsv.features.index_status == "read test.feature.lineidx"
    assert tsv.keys() == list(images)
    with pytest.raises(KeyError, match="not a key"):
        tsv.get("nope")


def test_feature_json_key_order_and_spacing_do_not_matter(tmp_path):
    images = _images(counts=(2, 3))
    lines = []
    for i, (key, img) in enumerate(images.items()):
        full = np.concatenate([img["features"], make_geometry(img["boxes"], img["hw"])], 1)
        kw = ({"order": ("features", "num_boxes")} if i == 0 else
              {"separators": (",", ":")})
        lines.append(_vinvl_feature_line(key, full, **kw))
    feat = _write_lines(tmp_path / "feature.tsv", lines)
    labels = _write_lines(tmp_path / "label.tsv", [_label_line(k, v) for k, v in images.items()])
    hw = _write_lines(tmp_path / "hw.tsv", [_hw_line(k, v) for k, v in images.items()])
    for rec, img in zip(OscarTsv(feat, labels, hw), images.values()):
        _assert_same(rec, img)


def test_float16_told_from_the_byte_count(tmp_path):
    images = _images(counts=(2, 1))
    paths = _vinvl_files(tmp_path, images, dtype=np.float16)
    tsv = OscarTsv(*paths, feature_dim=D + 6)
    assert tsv.feature_dtype == np.float16 and tsv.geometry_columns == 6
    for rec, img in zip(tsv, images.values()):
        _assert_same(rec, img, dtype=np.float16)
        assert rec.geometry.dtype == np.float16 and rec.boxes_from == "labels"
    # no hint needed at VinVL's real width: 2054 float16 (= 1027 "float32", Oscar issue #94)
    rng = np.random.default_rng(3)
    img = _image(rng, 2)
    full = np.concatenate([rng.random((2, 2048), dtype=np.float32),
                           make_geometry(img["boxes"], img["hw"])], 1).astype(np.float16)
    real = _write_lines(tmp_path / "real.feature.tsv", [_vinvl_feature_line("a", full)])
    tsv = OscarTsv(real)
    assert (tsv.feature_dtype, tsv.layout.dim, tsv.feature_dim) == (np.float16, 2054, 2048)
    # at a tiny width, the geometry identities tell float16 from float32
    assert OscarTsv(paths[0]).layout == tsv.layout.__class__("json", np.dtype("<f2"), D + 6, 6)
    # an unknown width without geometry needs feature_dim
    plain = _write_lines(tmp_path / "plain.tsv", [_vinvl_feature_line(
        k, v["features"].astype(np.float16)) for k, v in images.items()])
    with pytest.raises(TsvFormatError, match="pass feature_dim"):
        OscarTsv(plain)
    assert OscarTsv(plain, feature_dim=D).layout.geometry == 0


def test_columns_layout_read(tmp_path):
    images = _images(counts=(2, 4))
    lines = []
    for key, img in images.items():
        full = np.concatenate([img["features"], make_geometry(img["boxes"], img["hw"])], 1)
        lines.append(f"{key}\t{len(full)}\t{_b64(full)}")
    feat = _write_lines(tmp_path / "features.tsv", lines)
    hw = _write_lines(tmp_path / "hw.tsv", [_hw_line(k, v) for k, v in images.items()])
    tsv = OscarTsv(feat, None, hw, feature_dim=D + 6)
    assert tsv.layout.layout == "columns"
    for rec, img in zip(tsv, images.values()):
        assert rec.boxes_from == "geometry" and not rec.notes
        np.testing.assert_allclose(rec.boxes, img["boxes"], atol=1e-3)
        assert np.array_equal(rec.features, img["features"]) and rec.class_names is None


def test_predictions_tsv_rows_with_attributes_and_sizes(tmp_path):
    """SGB predictions.tsv rows ({"objects", "relations"}, inference.py) and the dict form
    with image_h/image_w that Oscar's retrieval and pre-training readers accept."""
    images = _images(counts=(2, 3))
    keys = list(images)
    feat = _write_lines(tmp_path / "feature.tsv", [
        _vinvl_feature_line(k, np.concatenate([v["features"], make_geometry(
            v["boxes"], v["hw"])], 1)) for k, v in images.items()])
    rows = []
    for j, (key, img) in enumerate(images.items()):
        objs = [{"rect": b.tolist(), "bbox_id": i, "class": c, "conf": float(s),
                 "attributes": ["red", "big"][:i + 1], "attr_scores": [0.5, 0.25][:i + 1]}
                for i, (b, c, s) in enumerate(zip(img["boxes"], img["names"], img["scores"]))]
        value = ({"objects": objs, "relations": None} if j == 0 else
                 {"objects": objs, "image_h": img["hw"][0], "image_w": img["hw"][1]})
        rows.append(f"{key}\t{json.dumps(value)}")
    labels = _write_lines(tmp_path / "predictions.tsv", rows)
    hw = _write_lines(tmp_path / "hw.tsv", [_hw_line(keys[0], images[keys[0]])])
    a, b = OscarTsv(feat, labels, hw)
    _assert_same(a, images[keys[0]])
    assert a.attr_names == [["red"], ["red", "big"]]
    np.testing.assert_array_equal(a.attr_scores, [[0.5, np.nan], [0.5, 0.25]])
    _assert_same(b, images[keys[1]])   # size from the label row: hw.tsv has no row for it
    assert b.notes == ["hw.tsv: no row for this image"]


def _sgb_tsv_writer(path, rows):
    """scene_graph_benchmark tsv_file_ops.tsv_writer: text mode, '\t'.join, '\n', and a
    .lineidx of running ``len(v)`` (characters; bytes for ASCII rows)."""
    idx = 0
    with open(path, "w") as fp, open(lineidx_path(path), "w") as fpidx:
        for value in rows:
            v = "{0}\n".format("\t".join(map(str, value)))
            fp.write(v)
            fpidx.write(str(idx) + "\n")
            idx += len(v)
    return path


def test_sgb_predictions_with_box_features(tmp_path):
    """VinVL extraction output: test_sg_net.py with TEST.OUTPUT_FEATURE and TSV_SAVE_SUBSET
    ['rect', 'class', 'conf', 'feature'] (+ attr_labels, attr_scores), as
    convert_predictions_to_tsv writes it."""
    images = _images(seed=11, counts=(3, 2, 1))
    rows = []
    for j, (key, img) in enumerate(images.items()):
        objects = []
        for i in range(len(img["boxes"])):
            d = {"rect": img["boxes"][i].tolist(), "bbox_id": i, "class": img["names"][i],
                 "conf": float(img["scores"][i]),
                 "feature": base64.b64encode(img["features"][i]).decode("utf-8"),
                 "attributes": ["white"], "attr_scores": [0.75]}
            if j == 2:
                del d["feature"]
            objects.append(d)
        rows.append((key, json.dumps({"objects": objects, "relations": None})))
    pred = _sgb_tsv_writer(tmp_path / "predictions.tsv", rows)
    hw = _sgb_tsv_writer(tmp_path / "test.hw.tsv", [
        (k, json.dumps([{"height": v["hw"][0], "width": v["hw"][1]}])) for k, v in
        images.items()])
    tsv = SgbPredictionsTsv(pred, hw)
    a, b, c = tsv
    for rec, img in zip((a, b), images.values()):
        _assert_same(rec, img)
        assert rec.boxes_from == "labels" and rec.geometry is None
        assert rec.attr_names == [["white"]] * len(img["boxes"])
    assert tsv.feature_dim == D
    rows = TsvRows(pred)
    assert len(rows) == 3 and rows.index_status == "read predictions.lineidx"  # SGB's index
    assert not c.ok and "object 0 has no 'feature'" in c.reason
    key = list(images)[1]
    _assert_same(tsv.get(key), images[key])
    _assert_same(tsv.read(0), images[list(images)[0]])


def test_hw_row_variants(tmp_path):
    """SGB TSVDataset.get_img_info: a JSON list, a JSON object, or 'H W'."""
    images = _images(counts=(1, 1, 1))
    (k0, i0), (k1, i1), (k2, i2) = images.items()
    feat = _write_lines(tmp_path / "feature.tsv", [
        _vinvl_feature_line(k, np.concatenate([v["features"], make_geometry(
            v["boxes"], v["hw"])], 1)) for k, v in images.items()])
    hw = _write_lines(tmp_path / "hw.tsv", [
        _hw_line(k0, i0), f"{k1}\t{json.dumps({'height': i1['hw'][0], 'width': i1['hw'][1]})}",
        f"{k2}\t{i2['hw'][0]} {i2['hw'][1]}"])
    for rec, img in zip(OscarTsv(feat, None, hw), images.values()):
        assert rec.image_hw == img["hw"] and rec.boxes_from == "geometry"


# ------------------------------------------------------------------- per-row failures

def test_undecodable_rows_are_failures_not_crashes(tmp_path):
    images = _images(counts=(2, 2, 2, 2, 2, 2, 2, 2))
    keys = list(images)
    good = {k: np.concatenate([v["features"], make_geometry(v["boxes"], v["hw"])], 1)
            for k, v in images.items()}
    lines = [_vinvl_feature_line(k, m) for k, m in good.items()]
    lines[1] = lines[1][:-10] + lines[1][-9:]                          # base64 cut by one
    lines[2] = lines[2].replace('"num_boxes": 2', '"num_boxes": 3')   # num_boxes disagrees
    lines[3] = lines[3][:-1]                                           # JSON error
    lines[4] = f"{keys[4]}\t" + json.dumps(
        {"num_boxes": 2, "features": _b64(good[keys[4]][:, :-1])})    # wrong width
    lines[5] = lines[5].replace('"num_boxes": 2, ', "")               # no num_boxes
    lines[6] = "\t" + lines[6].split("\t", 1)[1]                      # empty key
    feat = _write_lines(tmp_path / "feature.tsv", lines)
    labels = _write_lines(tmp_path / "label.tsv", [_label_line(k, v) for k, v in images.items()])
    hw = _write_lines(tmp_path / "hw.tsv", [_hw_line(k, v) for k, v in images.items()])
    recs = list(OscarTsv(feat, labels, hw, feature_dim=D + 6))
    assert [r.ok for r in recs] == [True, False, False, False, False, False, False, True]
    f = recs[1:7]
    assert [r.row for r in f] == [1, 2, 3, 4, 5, 6]
    assert [r.image_id for r in f] == keys[1:6] + [None]
    assert "bad base64" in f[0].reason or "bytes" in f[0].reason
    assert "num_boxes 3 x 14 float32 needs 168" in f[1].reason
    assert "not valid JSON" in f[2].reason
    assert "(52 bytes per region)" in f[3].reason
    assert "no 'num_boxes'" in f[4].reason
    assert "key (first field) is empty" in f[5].reason
    assert str(f[1]).startswith(f"feature.tsv row 2 ({keys[2]!r}): ")
    _assert_same(recs[-1], images[keys[-1]])


def test_bad_base64_padding_is_a_failure(tmp_path):
    img = _images(counts=(2,))
    (key, v), = img.items()
    full = np.concatenate([v["features"], make_geometry(v["boxes"], v["hw"])], 1)
    feat = _write_lines(tmp_path / "f.tsv", [
        _vinvl_feature_line(key, full).replace("=", ""), _vinvl_feature_line("b", full)])
    bad, ok = OscarTsv(feat, feature_dim=D + 6)
    assert not bad.ok and "bad base64" in bad.reason and ok.ok is False  # no boxes: no hw
    assert "no image size (pass hw.tsv)" in ok.reason


def test_duplicate_and_non_utf8_keys(tmp_path):
    images = _images(counts=(1, 1))
    (k0, v0), (k1, v1) = images.items()
    m0 = np.concatenate([v0["features"], make_geometry(v0["boxes"], v0["hw"])], 1)
    path = tmp_path / "feature.tsv"
    raw = (_vinvl_feature_line(k0, m0) + "\n" + _vinvl_feature_line(k0, m0) + "\n").encode()
    raw += b"\xff\xfe" + _vinvl_feature_line("", m0).encode() + b"\n"
    path.write_bytes(raw)
    hw = _write_lines(tmp_path / "hw.tsv", [_hw_line(k0, v0)])
    first, dup, undecodable = OscarTsv(path, None, hw, feature_dim=D + 6)
    assert first.ok and not dup.ok and "also on row 0" in dup.reason
    assert undecodable.image_id is None and "not UTF-8" in undecodable.reason
    tsv = OscarTsv(path, None, hw, feature_dim=D + 6)
    assert tsv.duplicate_keys == {k0: [0, 1]} and tsv.keys() == [k0, k0, None]


def test_label_row_with_another_box_count_is_never_misaligned(tmp_path):
    images = _images(counts=(4, 3))
    (k0, v0), (k1, v1) = images.items()
    feat, labels, hw = _vinvl_files(tmp_path, images)
    short = dict(v0, boxes=v0["boxes"][:2], names=v0["names"][:2], scores=v0["scores"][:2])
    _write_lines(labels, [_label_line(k0, short), _label_line(k1, v1)])
    a, b = OscarTsv(feat, labels, hw)
    assert a.ok and a.boxes_from == "geometry" and a.class_names is None and a.scores is None
    assert a.tags == short["names"]                       # image-level tags are kept
    assert a.notes == ["test.label.tsv row 0 has 2 objects but test.feature.tsv row 0 has 4 "
                       "regions: the label row is not used for the regions"]
    np.testing.assert_allclose(a.boxes, v0["boxes"], atol=1e-3)
    _assert_same(b, v1)
    # without an image size the boxes cannot be recovered: a failure that says so
    a, b = OscarTsv(feat, labels)
    assert not a.ok and "has 2 objects" in a.reason and "no image size" in a.reason
    _assert_same(b, v1)      # its size: the geometry columns and the label boxes agree on it
    assert b.notes[0].startswith("no image size given; the geometry columns and the label "
                                 "boxes agree on")


def test_label_boxes_that_disagree_and_a_wrong_image_size(tmp_path):
    images = _images(counts=(3, 3, 2))
    (k0, v0), (k1, v1), (k2, v2) = images.items()
    feat, labels, hw = _vinvl_files(tmp_path, images)
    moved = dict(v0, boxes=v0["boxes"] + np.float32(7))
    _write_lines(labels, [_label_line(k0, moved), _label_line(k1, v1), f"{k2}\t[{{oops"])
    swapped = dict(v1, hw=v1["hw"][::-1])
    _write_lines(hw, [_hw_line(k0, v0), _hw_line(k1, swapped), _hw_line(k2, v2)])
    a, b, c = OscarTsv(feat, labels, hw)
    assert a.boxes_from == "geometry" and a.class_names is None
    assert "boxes disagree with the geometry columns" in a.notes[0]
    _assert_same(b, v1)                  # the label boxes and geometry agree on the real size
    assert "disagrees with the geometry columns" in b.notes[0]
    assert c.boxes_from == "geometry" and "test.label.tsv row 2: the label field is not " \
        "valid JSON" in c.notes[0] and c.tags == []


def test_label_and_hw_rows_found_by_key_when_out_of_order(tmp_path):
    images = _images(counts=(2, 1, 3, 2))
    feat, labels, hw = _vinvl_files(tmp_path, images)
    order = list(images)[::-1]
    _write_lines(labels, [_label_line(k, images[k]) for k in order[:-1]])   # one missing
    _write_lines(hw, [_hw_line(k, images[k]) for k in order], lineidx=False)
    recs = list(OscarTsv(feat, labels, hw))
    for rec, (key, img) in zip(recs[1:], list(images.items())[1:]):
        _assert_same(rec, img)
    assert recs[0].boxes_from == "geometry" and recs[0].notes == [
        "test.label.tsv: no row for this image"]


# ------------------------------------------------------------------------- line index

def test_missing_lineidx_is_built_by_scanning_and_saved_in_oscars_format(tmp_path):
    images = _images()
    feat, labels, hw = _vinvl_files(tmp_path, images, lineidx=False)
    rows = TsvRows(feat)
    assert len(rows) == len(images) and rows.index_status.startswith("no test.feature.lineidx")
    assert not lineidx_path(feat).exists()
    tsv = OscarTsv(feat, labels, hw, save_lineidx=True)
    key = list(images)[3]
    _assert_same(tsv.get(key), images[key])
    assert lineidx_path(feat).read_text() == oscar_generate_lineidx(feat)
    assert OscarTSVFile(feat).num_rows() == len(images)


def test_stale_lineidx_is_detected_and_rebuilt(tmp_path):
    images = _images(counts=(2, 3, 1, 2))
    feat, labels, hw = _vinvl_files(tmp_path, images)
    keys = list(images)
    good = lineidx_path(feat).read_text()
    # rows appended after the index was made
    extra = _image(np.random.default_rng(9), 2)
    full = np.concatenate([extra["features"], make_geometry(extra["boxes"], extra["hw"])], 1)
    with open(feat, "a") as f:
        f.write(_vinvl_feature_line("late", full) + "\n")
    rows = TsvRows(feat)
    assert len(rows) == 5 and "stale test.feature.lineidx" in rows.index_status
    assert "lines after its last indexed row 3" in rows.index_status
    assert rows.keys()[-1] == "late"
    # an index that skips a row but whose offsets all start lines: caught when read
    feat, labels, hw = _vinvl_files(_mk(tmp_path / "skip"), images)
    offs = good.split()
    lineidx_path(feat).write_text("\n".join(offs[:1] + offs[2:]) + "\n")
    rows = TsvRows(feat, full_check_bytes=0)      # as for a large file: no line count
    assert len(rows) == 3 and rows.index_status == "read test.feature.lineidx"
    assert rows.line(0).startswith(keys[0].encode()) and len(rows) == 4
    assert "is not one line" in rows.index_status
    rows = TsvRows(feat, full_check_bytes=0)
    assert rows.keys() == [keys[0]] + keys[2:]         # the left-out row's key is hidden ...
    assert rows.line_of(keys[0])[0] == 0 and rows.line_of(keys[0])[1].startswith(
        keys[0].encode() + b"\t")                     # ... until a row read spans two lines
    assert rows.find(keys[1]) == 1 and rows.keys() == keys
    rows = TsvRows(feat)                           # small file: its lines are counted
    assert len(rows) == 4 and "lists 3 rows but the file has 4 lines" in rows.index_status
    tsv = OscarTsv(feat, labels, hw)
    assert tsv.get(keys[1]).row == 1 and tsv.get(keys[2]).row == 2
    # an index file that is not one
    lineidx_path(feat).write_text("0\nabc\n")
    rows = TsvRows(feat)
    assert len(rows) == 4 and "not a .lineidx file" in rows.index_status


def test_large_file_checks_sample_offsets(tmp_path):
    lines = [f"k{i}\t{i}" for i in range(10_000)]
    path = _write_lines(tmp_path / "big.tsv", lines)
    offsets = scan_line_starts(path)
    assert verify_line_starts(path, offsets, sample=16) is None
    moved = offsets.copy()
    moved[5000] += 1                                  # one bad offset, sampled or not
    assert verify_line_starts(path, moved) == \
        f"row 5000 (byte {int(moved[5000]):,}) does not start a line"
    assert verify_line_starts(path, moved, sample=16) is None   # not sampled: caught on read
    rows = TsvRows(path, full_check_bytes=0)
    lineidx_path(path).write_text("".join(f"{o}\n" for o in moved))
    assert len(rows) == 10_000 and rows.index_status == "read big.lineidx"
    assert rows.line(4999) == b"k4999\t4999\n" and "is not one line" in rows.index_status
    assert rows.line(5000) == b"k5000\t5000\n"


def test_index_and_readers_survive_pickling(tmp_path):
    import pickle
    images = _images(counts=(2, 3))
    tsv = OscarTsv(*_vinvl_files(tmp_path, images))
    key = list(images)[1]
    tsv.get(key)                                       # opens the files
    clone = pickle.loads(pickle.dumps(tsv))            # as DataLoader workers get it
    _assert_same(clone.get(key), images[key])


def test_non_ascii_ids_get_byte_offsets(tmp_path):
    """SGB's tsv_writer counts characters; Oscar's TSVFile seeks bytes: vlkd writes bytes."""
    images = {f"café_{i}": v for i, v in enumerate(_images(counts=(2, 1)).values())}
    with OscarTsvWriter(tmp_path) as w:
        for key, img in images.items():
            w.write(key, img["hw"], img["boxes"], img["features"], img["names"])
    label = OscarTSVFile(tmp_path / "label.tsv")
    assert [label.seek(i)[0] for i in range(2)] == list(images)
    recs = list(OscarTsv(*(tmp_path / f"{n}.tsv" for n in ("feature", "label", "hw"))))
    assert [r.image_id for r in recs] == list(images) and all(r.ok for r in recs)


def test_scan_matches_oscars_generate_lineidx_on_edge_files(tmp_path):
    cases = {"empty": b"", "no_final_newline": b"a\t1\nb\t2", "crlf": b"a\t1\r\nb\t2\r\n",
             "blank_last": b"a\t1\n\n", "one": b"a\t1\n"}
    for name, data in cases.items():
        p = tmp_path / f"{name}.tsv"
        p.write_bytes(data)
        ours = "".join(f"{o}\n" for o in scan_line_starts(p))
        assert ours == oscar_generate_lineidx(p), name


def test_crlf_no_final_newline_and_blank_rows_read_the_same(tmp_path):
    images = _images(counts=(2, 1, 3))
    base = list(OscarTsv(*_vinvl_files(_mk(tmp_path / "lf"), images)))
    assert all(r.ok for r in base)
    for i, variant in enumerate(({"newline": "\r\n"}, {"trailing": False})):
        paths = _vinvl_files(_mk(tmp_path / f"variant{i}"), images, **variant)
        # Oscar's own reader tolerates both (text mode + strip)
        assert oscar_od_labels(OscarTSVFile(paths[1]), 2) == " ".join(
            list(images.values())[2]["names"])
        for ours, ref in zip(OscarTsv(*paths), base):
            _assert_same(ours, images[ref.image_id])
    # a blank line at the end is a row in the index but not an image
    p = _mk(tmp_path / "blank")
    paths = _vinvl_files(p, images)
    with open(paths[0], "a") as f:
        f.write("\n")
    lineidx_path(paths[0]).write_text(oscar_generate_lineidx(paths[0]))
    tsv = OscarTsv(*paths)
    assert len(tsv) == 4 and len(list(tsv)) == 3 and tsv.read(3) is None


def _mk(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------- Oscar writing

@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_export_reads_back_bit_for_bit(tmp_path, dtype):
    images = _images(seed=4)
    with OscarTsvWriter(tmp_path, prefix="train.", dtype=dtype, allow_empty=True) as w:
        for key, img in images.items():
            w.write(key, img["hw"], img["boxes"], img["features"].astype(dtype), img["names"],
                    scores=img["scores"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "train.feature.lineidx", "train.feature.tsv", "train.hw.lineidx", "train.hw.tsv",
        "train.label.lineidx", "train.label.tsv"]
    tsv = OscarTsv(*(tmp_path / f"train.{n}.tsv" for n in ("feature", "label", "hw")))
    assert tsv.feature_dtype == np.dtype(dtype) and tsv.geometry_columns == 6
    for rec, img in zip(tsv, images.values()):
        _assert_same(rec, img, dtype=np.dtype(dtype))
        assert rec.boxes_from == "labels" and not rec.notes
        want = make_geometry(img["boxes"], img["hw"]).astype(dtype)
        assert np.array_equal(rec.geometry, want)
        assert check_geometry(rec.geometry, rec.boxes, rec.image_hw).ok


def test_export_is_read_by_oscars_own_read_paths(tmp_path):
    images = _images(seed=5, counts=(3, 1, 5, 2))
    with OscarTsvWriter(tmp_path, prefix="test.") as w:
        for key, img in images.items():
            w.write(key, img["hw"], img["boxes"], img["features"], img["names"],
                    scores=img["scores"])
    feat, label = tmp_path / "test.feature.tsv", tmp_path / "test.label.tsv"
    for p in (feat, label, tmp_path / "test.hw.tsv"):
        assert lineidx_path(p).read_text() == oscar_generate_lineidx(p)
    feat_tsv, label_tsv = OscarTSVFile(feat), OscarTSVFile(label)
    # run_captioning takes the keys from label.tsv and reads feature row i for label row i
    keys = [label_tsv.seek(i)[0] for i in range(label_tsv.num_rows())]
    assert keys == list(images) == [feat_tsv.seek(i)[0] for i in range(feat_tsv.num_rows())]
    for i, img in enumerate(images.values()):
        full = oscar_caption_features(feat_tsv, i)
        assert full.shape == (len(img["boxes"]), D + 6)
        assert np.array_equal(full[:, :D], img["features"])
        assert np.array_equal(full[:, D:], make_geometry(img["boxes"], img["hw"]))
        assert oscar_od_labels(label_tsv, i) == " ".join(img["names"])
    hw_row = OscarTSVFile(tmp_path / "test.hw.tsv").seek(1)
    assert json.loads(hw_row[1])[0] == dict(zip(("height", "width"), images[keys[1]]["hw"]))


def test_columns_export_for_run_vqa_and_run_retrieval(tmp_path):
    images = {str(458752 + i): v for i, v in
              enumerate(_images(seed=6, counts=(3, 1, 5)).values())}
    tsv_path, offset_map = oscar_vqa_paths(tmp_path / "vqa", "val")
    with FeatureTsvWriter(tsv_path, layout="columns", offset_map=offset_map) as w:
        for key, img in images.items():
            w.write(key, img["features"], boxes=img["boxes"], image_hw=img["hw"])
    ret = tmp_path / "coco_ir" / "features.tsv"
    with FeatureTsvWriter(ret, layout="columns", row_map=ret.parent / "imageid2idx.json") as w:
        for key, img in images.items():
            w.write(key, img["features"], boxes=img["boxes"], image_hw=img["hw"])
    for key, img in images.items():
        want = np.concatenate([img["features"], make_geometry(img["boxes"], img["hw"])], 1)
        assert np.array_equal(oscar_vqa_feature(tmp_path / "vqa", "val", key, D + 6), want)
        assert np.array_equal(oscar_retrieval_feature(ret, int(key)), want)
    back = OscarTsv(tsv_path, feature_dim=D + 6)
    assert back.layout.layout == "columns" and back.geometry_columns == 6


def test_writers_refuse_ids_that_would_not_read_back(tmp_path):
    f = np.zeros((1, D), np.float32)
    box = np.array([[0, 0, 1, 1]], np.float32)
    cases = [("a\tb", "contains a tab"), ("a\nb", "contains a newline"),
             ("a\rb", "carriage return"), (" a", "surrounding whitespace"), ("", "non-empty")]
    with FeatureTsvWriter(tmp_path / "feature.tsv") as w:
        for image_id, msg in cases:
            with pytest.raises(ValueError, match=msg):
                w.write(image_id, f, boxes=box, image_hw=(2, 2))
        w.write("ok", f, boxes=box, image_hw=(2, 2))
        with pytest.raises(ValueError, match="written twice"):
            w.write("ok", f, boxes=box, image_hw=(2, 2))
        with pytest.raises(ValueError, match="rows have 8"):
            w.write("wide", np.zeros((1, D + 1)), boxes=box, image_hw=(2, 2))
    with pytest.raises(ValueError, match="double quote"):
        ButdTsvWriter(tmp_path / "b.tsv").write('a"b', (2, 2), box, f)
    # a refused image leaves a bundle's files aligned
    with OscarTsvWriter(tmp_path / "bundle") as w:
        w.write("x", (2, 2), box, f, ["c"])
        with pytest.raises(ValueError, match="1 feature rows, 1 boxes, 2 class names"):
            w.write("y", (2, 2), box, f, ["c", "d"])
    assert [len(TsvRows(tmp_path / "bundle" / f"{n}.tsv")) for n in
            ("feature", "label", "hw")] == [1, 1, 1]


def test_writing_is_atomic(tmp_path):
    path = tmp_path / "hw.tsv"
    with HwTsvWriter(path) as w:
        w.write("a", (3, 4))
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with HwTsvWriter(path) as w:
            w.write("b", (5, 6))
            assert path.read_bytes() == before        # nothing visible while writing
            raise RuntimeError("killed")
    assert path.read_bytes() == before == b'a\t[{"height": 3, "width": 4}]\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hw.lineidx", "hw.tsv"]
    w = TsvWriter(tmp_path / "x.tsv")
    w.write_row("k", [b"v"])
    w.abort()
    assert not (tmp_path / "x.tsv").exists() and len(list(tmp_path.iterdir())) == 2


def test_label_writer_layout_matches_sgb(tmp_path):
    with LabelTsvWriter(tmp_path / "label.tsv") as w:
        w.write("k", np.array([[1, 2, 3, 4.5]], np.float32), ["dog"],
                scores=np.array([0.5], np.float32), attr_names=[["brown"]],
                attr_scores=np.array([[0.25, np.nan]], np.float32))
    line = (tmp_path / "label.tsv").read_text()
    assert line == ('k\t[{"rect": [1.0, 2.0, 3.0, 4.5], "bbox_id": 0, "class": "dog", '
                    '"conf": 0.5, "attributes": ["brown"], "attr_scores": [0.25]}]\n')


# ------------------------------------------------------------------------------- BUTD

def _butd_items(images, *, lxmert=False):
    rows = []
    for key, img in images.items():
        n = len(img["boxes"])
        if lxmert:
            rows.append({"img_id": key, "img_h": img["hw"][0], "img_w": img["hw"][1],
                         "objects_id": _b64(np.arange(n, dtype=np.int64)),
                         "objects_conf": _b64(img["scores"]),
                         "attrs_id": _b64(np.arange(n, dtype=np.int64) + 7),
                         "attrs_conf": _b64(img["scores"][::-1]), "num_boxes": n,
                         "boxes": _b64(img["boxes"]), "features": _b64(img["features"])})
        else:
            rows.append({"image_id": key, "image_w": img["hw"][1], "image_h": img["hw"][0],
                         "num_boxes": n, "boxes": _b64(img["boxes"]),
                         "features": _b64(img["features"])})
    return rows


def _csv_dictwriter_file(path, rows, fieldnames):
    """The reference writers: csv.DictWriter(tsvfile, delimiter='\\t', fieldnames=...)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, delimiter="\t", fieldnames=list(fieldnames))
        for row in rows:
            writer.writerow(row)
    return path


@pytest.mark.parametrize("fields", ["butd", "lxmert"])
def test_butd_and_lxmert_read_and_write(tmp_path, fields):
    images = {str(100 + i): v for i, v in
              enumerate(_images(seed=7, counts=(3, 1, 5, 2)).values())}
    names = BUTD_FIELDS if fields == "butd" else LXMERT_FIELDS
    ref = _csv_dictwriter_file(tmp_path / "ref.tsv", _butd_items(images,
                                                                 lxmert=fields == "lxmert"),
                               names)
    assert b"\r\n" in ref.read_bytes()          # csv's default line end
    tsv = ButdTsv(ref)
    assert tsv.fields == fields and tsv.feature_dim == D
    recs = list(tsv)
    for rec, img in zip(recs, images.values()):
        assert rec.ok and rec.boxes_from == "tsv" and rec.image_hw == img["hw"]
        assert np.array_equal(rec.boxes, img["boxes"])
        assert np.array_equal(rec.features, img["features"])
        if fields == "lxmert":
            n = len(img["boxes"])
            assert np.array_equal(rec.class_ids, np.arange(n))
            assert np.array_equal(rec.scores, img["scores"])
            assert np.array_equal(rec.attr_ids[:, 0], np.arange(n) + 7)
            assert np.array_equal(rec.attr_scores[:, 0], img["scores"][::-1])
    assert tsv.get("103").row == 3 and tsv.get("103").image_hw == images["103"]["hw"]
    # our writer writes the reference writer's bytes, and the reference reader reads them
    out = tmp_path / "ours.tsv"
    with ButdTsvWriter(out, fields=fields) as w:
        for rec in recs:
            w.write(rec.image_id, rec.image_hw, rec.boxes, rec.features,
                    class_ids=rec.class_ids, scores=rec.scores, attr_ids=rec.attr_ids,
                    attr_scores=rec.attr_scores)
    assert out.read_bytes() == ref.read_bytes()
    back = butd_read_tsv(out, names)
    assert [b[names[0]] for b in back] == list(images)
    assert all(np.array_equal(b["features"], img["features"])
               for b, img in zip(back, images.values()))


def test_butd_failures(tmp_path):
    images = {str(i): v for i, v in enumerate(_images(seed=8, counts=(2, 2, 2, 2)).values())}
    rows = _butd_items(images)
    rows[1]["num_boxes"] = "two"
    rows[2]["boxes"] = rows[2]["boxes"][:-4]
    path = _csv_dictwriter_file(tmp_path / "b.tsv", rows, BUTD_FIELDS)
    with open(path, "a", newline="") as f:
        f.write("9\t1\t2\r\n")
    recs = list(ButdTsv(path))
    assert [r.ok for r in recs] == [True, False, False, True, False]
    assert "num_boxes is b'two'" in recs[1].reason
    assert "'boxes' decodes to 30 bytes, not 2 x 4 float32 (32 bytes)" in recs[2].reason
    assert recs[4].image_id == "9" and "expected 6 tab-separated fields, found 3" in \
        recs[4].reason
    with pytest.raises(TsvFormatError, match="rows have 3 fields"):
        ButdTsv(_write_lines(tmp_path / "x.tsv", ["a\tb\tc"]))


def test_images_without_regions(tmp_path):
    """Oscar's and BUTD's readers reshape to (num_boxes, -1), which numpy refuses for 0 boxes:
    the writers refuse such images unless told otherwise; the readers read them."""
    with pytest.raises(ValueError, match="cannot reshape"):
        np.frombuffer(b"", np.float32).reshape((0, -1))
    box0, f0 = np.zeros((0, 4), np.float32), np.zeros((0, D), np.float32)
    with OscarTsvWriter(tmp_path / "a") as w:
        with pytest.raises(ValueError, match="has no regions"):
            w.write("e", (4, 4), box0, f0, [])
    with ButdTsvWriter(tmp_path / "b.tsv") as w:
        with pytest.raises(ValueError, match="has no regions"):
            w.write("e", (4, 4), box0, f0)
    with OscarTsvWriter(tmp_path / "c", allow_empty=True) as w:
        w.write("e", (4, 4), box0, f0, [])
        w.write("f", (4, 4), np.array([[0, 0, 2, 2]], np.float32), np.ones((1, D), np.float32),
                ["x"])
    e, f = OscarTsv(*(tmp_path / "c" / f"{n}.tsv" for n in ("feature", "label", "hw")))
    assert e.ok and e.features.shape == (0, D) and e.boxes.shape == (0, 4) and f.ok
    assert e.boxes_from == "labels" and e.class_names == [] and e.image_hw == (4, 4)
    e, f = OscarTsv(tmp_path / "c" / "feature.tsv", tmp_path / "c" / "label.tsv")
    assert e.ok and e.boxes.shape == (0, 4) and e.image_hw is None     # no size needed
    e, f = OscarTsv(tmp_path / "c" / "feature.tsv")
    assert e.ok and e.boxes_from == "empty" and not f.ok
    butd = _csv_dictwriter_file(tmp_path / "ref.tsv", _butd_items(
        {"7": dict(hw=(4, 4), boxes=box0, features=f0)}), BUTD_FIELDS)
    rec, = ButdTsv(butd, feature_dim=D)
    assert rec.ok and rec.features.shape == (0, D)
