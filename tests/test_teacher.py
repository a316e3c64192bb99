"""`vlkd-extract teacher-features` (Visual Token Alignment) on tiny C4 and FPN teachers.

The teachers' test sizes (and, for C4, the input channel order) differ from the students', so
a feature pooled in the student's frame, or through the teacher's own detections, would not
match the independent computation below.
"""
import json
import os
import shutil
import signal
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from extract_fixtures import (DETECTOR_CONFIGS, assert_same_shards, make_images, read_shards,
                              reference_features, save_tiny_weights,
                              sigkill_after_first_commit, tiny_model)
from extract_fixtures import invoke_extract as invoke
from vlkd.common.manifest import manifest_digest, read_manifest, write_manifest
from vlkd.common.regionset import RegionSet, ShardReader, ShardWriter, file_digest
from vlkd.common.validate import validate_region_set
from vlkd.extract.detector import load_detector_config

torch.set_num_threads(1)

# Teachers: another architecture than their student, another test size, another seed.
TEACHERS = {
    # C4 teacher for an FPN student (192/288, BGR): 224/320, RGB input.
    "c4": {"student": "fpn", "yaml": "INPUT:\n  MIN_SIZE_TEST: 224\n  MAX_SIZE_TEST: 320\n"
                                     "  FORMAT: RGB\n"},
    # FPN teacher for a C4 student (160/256): 256/400.
    "fpn": {"student": "c4", "yaml": "INPUT:\n  MIN_SIZE_TEST: 256\n  MAX_SIZE_TEST: 400\n"},
}
TEACHER_SEED = 3


def proposals(kind, weights, images, out, *args):
    return invoke(["proposals", "--images", images, "--config", DETECTOR_CONFIGS[kind],
                   "--weights", weights, "--out", out, "--no-progress", "--num-workers", 0,
                   "--shard-index", "all", "--min-boxes", 4, "--max-boxes", 12,
                   "--feature-dtype", "float32", *args])


def teacher(world, props, out, *args, kind="c4", weights=None, images=None, expect=0,
            shard_index="all"):
    argv = ["teacher-features", "--proposals", props, "--images", images or world["images"],
            "--config", world["teacher_yaml"][kind], "--weights",
            weights or world["teacher_w"][kind], "--out", out, "--no-progress",
            "--num-workers", 0, *args]
    if shard_index is not None:
        argv += ["--shard-index", shard_index]
    return invoke(argv, expect=expect)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Images, student and teacher weights, teacher configs, and one proposals set per
    student (2 shards)."""
    d = tmp_path_factory.mktemp("teacher")
    paths = make_images(d / "imgs", 8)
    w = {"images": d / "imgs", "paths": paths, "dir": d, "student_w": {}, "teacher_w": {},
         "teacher_yaml": {}, "props": {}}
    for kind in ("c4", "fpn"):
        w["student_w"][kind] = save_tiny_weights(kind, d / f"student-{kind}.pth")
        w["teacher_w"][kind] = save_tiny_weights(kind, d / f"teacher-{kind}.pth",
                                                 seed=TEACHER_SEED)
        y = d / f"teacher-{kind}.yaml"
        y.write_text(f'_BASE_: "{DETECTOR_CONFIGS[kind]}"\n' + TEACHERS[kind]["yaml"])
        w["teacher_yaml"][kind] = y
    for kind in ("c4", "fpn"):
        out = d / f"props-{kind}"
        proposals(kind, w["student_w"][kind], d / "imgs", out, "--num-shards", 2)
        w["props"][kind] = out
    return w


def teacher_set(world, tmp_path, kind):
    """A fresh teacher set over the proposals of ``kind``'s student."""
    out = tmp_path / f"teacher-{kind}"
    teacher(world, world["props"][TEACHERS[kind]["student"]], out, "--feature-dtype",
            "float32", kind=kind)
    return out


def errors(set_dir, against=None):
    return [f for f in validate_region_set(set_dir, against=against) if f.level == "error"]


# --------------------------------------------------------------------------- correctness

@pytest.mark.parametrize("kind", ["c4", "fpn"])
def test_features_are_the_teachers_over_the_students_boxes(kind, world, tmp_path):
    student = TEACHERS[kind]["student"]
    props = world["props"][student]
    out = teacher_set(world, tmp_path, kind)
    assert errors(out, against=props) == []

    tcfg = load_detector_config(world["teacher_yaml"][kind], ["MODEL.DEVICE", "cpu"])
    scfg = load_detector_config(DETECTOR_CONFIGS[student], ["MODEL.DEVICE", "cpu"])
    assert (tcfg.INPUT.MIN_SIZE_TEST, tcfg.INPUT.MAX_SIZE_TEST) != \
        (scfg.INPUT.MIN_SIZE_TEST, scfg.INPUT.MAX_SIZE_TEST)
    student_frame = tcfg.clone()
    student_frame.defrost()
    student_frame.INPUT.MIN_SIZE_TEST = scfg.INPUT.MIN_SIZE_TEST
    student_frame.INPUT.MAX_SIZE_TEST = scfg.INPUT.MAX_SIZE_TEST
    _, model = tiny_model(kind, seed=TEACHER_SEED)  # the teacher, rebuilt without vlkd
    wc = model.roi_heads.box_predictor.cls_score.weight.detach().numpy().astype(np.float64)
    bc = model.roi_heads.box_predictor.cls_score.bias.detach().numpy().astype(np.float64)

    # Shard by shard, array by array (plain h5py): same ids in the same order, boxes
    # bit-identical, same box digests and image sizes.
    ps, ts = read_shards(props), read_shards(out)
    assert sorted(ps) == sorted(ts) == ["shard-00000-of-00002.h5", "shard-00001-of-00002.h5"]
    for name in ps:
        for key in ("image_ids", "offsets", "box_digest", "image_hw", "image_digest"):
            np.testing.assert_array_equal(ts[name][key], ps[name][key], err_msg=key)
        assert ts[name]["boxes"].dtype == ps[name]["boxes"].dtype == np.float32
        assert ts[name]["boxes"].tobytes() == ps[name]["boxes"].tobytes()

    rs, rp = RegionSet(out), RegionSet(props)
    assert len(rs) == 8 and rs.feature_dim == (256 if kind == "c4" else 64)
    in_student_frame = []
    for iid, path in world["paths"].items():
        t, p = rs.get(iid), rp.get(iid)
        want = reference_features(tcfg, model, path, p.boxes)        # (n, D) float32
        scale = np.abs(want).max()
        np.testing.assert_allclose(t.features, want, rtol=1e-4, atol=1e-4 * scale,
                                   err_msg=iid)
        # The teacher's tags: its box predictor over those features, softmax, best
        # foreground class.
        logits = want.astype(np.float64) @ wc.T + bc
        prob = np.exp(logits - logits.max(1, keepdims=True))
        prob /= prob.sum(1, keepdims=True)
        fg = prob[:, :-1]
        top2 = np.sort(fg, 1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 1e-3  # ties could flip on rounding
        np.testing.assert_array_equal(t.classes[clear], fg.argmax(1)[clear])
        np.testing.assert_allclose(t.scores, fg.max(1), atol=1e-4)
        # The teacher run at the student's test size (its frame) gives other features: the
        # comparison above tells the two apart.
        wrong = reference_features(student_frame, model, path, p.boxes)
        in_student_frame.append(np.abs(wrong - want).max(1) > 1e-2 * scale)
    assert np.concatenate(in_student_frame).mean() > 0.9

    m = read_manifest(out)
    assert m["role"] == "teacher-features"
    assert m["aligned_to"]["path"] == str(Path(props).resolve())
    assert m["aligned_to"]["manifest_digest"] == manifest_digest(props)
    assert m["aligned_to"]["role"] == "proposals"
    assert m["detector"]["weights_digest"] == file_digest(world["teacher_w"][kind]).hex()
    assert m["preprocessing"]["min_size"] == tcfg.INPUT.MIN_SIZE_TEST
    assert m["preprocessing"]["input_format"] == tcfg.INPUT.FORMAT


def test_batching_does_not_change_results(world, tmp_path):
    props = world["props"]["fpn"]
    a, b = tmp_path / "a", tmp_path / "b"
    teacher(world, props, a, "--batch-size", 1, "--feature-dtype", "float32")
    teacher(world, props, b, "--batch-size", 4, "--num-workers", 2, "--feature-dtype",
            "float32")
    sa, sb = read_shards(a), read_shards(b)
    for name in sa:
        for key in ("image_ids", "boxes", "classes", "box_digest"):
            np.testing.assert_array_equal(sa[name][key], sb[name][key])
        np.testing.assert_allclose(sa[name]["features"], sb[name]["features"], rtol=1e-4,
                                   atol=1e-4 * np.abs(sa[name]["features"]).max())


# ------------------------------------------------------- failed images, another image root

def test_failed_images_skipped_other_root_and_verify_images(world, tmp_path):
    d = tmp_path / "imgs"
    shutil.copytree(world["images"], d)
    (d / "img003.png").write_bytes(b"not a png")  # fails in proposals
    props = tmp_path / "props"
    proposals("fpn", world["student_w"]["fpn"], d, props, "--num-shards", 2,
              "--max-failures", "50%")
    assert [f["image_id"] for f in read_manifest(props)["failures"]] == ["img003"]

    # The images copied to another root (identity is the id); the broken file is not copied.
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(d, moved, ignore=shutil.ignore_patterns("img003.png"))
    out = tmp_path / "teacher"
    teacher(world, props, out, "--verify-images", images=moved)
    assert errors(out, against=props) == []
    m = read_manifest(out)
    assert [(f["image_id"], f["shard"]) for f in m["failures"]] == [("img003", 0)]
    assert m["failures"][0]["reason"].startswith("skipped: failed in proposals (")
    rs = RegionSet(out)
    assert "img003" not in rs and len(rs) == 7
    assert RegionSet(out).get("img005").image_digest == file_digest(moved / "img005.png")

    # Same pixels, other bytes: refused with --verify-images only.
    px = np.asarray(Image.open(moved / "img005.png"))
    Image.fromarray(px).save(moved / "img005.png", compress_level=0)
    res = teacher(world, props, tmp_path / "t2", "--verify-images", images=moved, expect=1)
    assert "'img005' has other bytes than proposals read" in res.output
    teacher(world, props, tmp_path / "t3", images=moved)
    # Another size: the boxes would point elsewhere; refused even without --verify-images.
    Image.fromarray(px).resize((px.shape[1] // 2, px.shape[0] // 2)).save(moved / "img005.png")
    res = teacher(world, props, tmp_path / "t4", images=moved, expect=1)
    assert "'img005' is 60x80 (h x w) here but was 120x160 when proposals read it" in res.output
    # An image missing from the new root.
    os.unlink(moved / "img005.png")
    res = teacher(world, props, tmp_path / "t5", images=moved, expect=1)
    assert "are not in this source (e.g. ['img005'])" in res.output


# ------------------------------------------------------------------------------ tampering

def _rewrite_shard(set_dir: Path, index: int, transform) -> None:
    """Rewrite proposals shard ``index`` consistently (arrays, digests, manifest entry) with
    ``transform(list of ImageRegions) -> list``: what a careless script editing a set does."""
    m = read_manifest(set_dir)
    entry = next(e for e in m["shards"] if e["index"] == index)
    shard = ShardReader(set_dir / entry["name"])
    regions = transform([shard.read(i) for i in range(len(shard))])
    tmp = set_dir.parent / f"rewrite-{set_dir.name}-{index}"
    with ShardWriter(tmp, index, m["num_shards"], backend=m["backend"],
                     feature_dim=m["feature_dim"], feature_dtype=m["feature_dtype"]) as w:
        for r in regions:
            w.append(r.image_id, r.image_hw, r.boxes, r.scores, r.classes, r.features,
                     image_digest=r.image_digest)
        for f in entry["failures"]:
            w.add_failure(f["image_id"], f["reason"])
        info = w.finalize()
    os.replace(tmp / entry["name"], set_dir / entry["name"])
    m["shards"] = [dict(info) if e["index"] == index else e for e in m["shards"]]
    write_manifest(set_dir, m)


def _edit_box(set_dir: Path, index: int, recompute_digest: bool) -> None:
    name = read_manifest(set_dir)["shards"][index]["name"]
    with h5py.File(set_dir / name, "r+") as f:
        b = f["boxes"][()]
        b[1, 2] += 1.0  # image 0's second box, x2
        f["boxes"][...] = b
        if recompute_digest:
            import hashlib
            o = f["offsets"][()]
            d = f["box_digest"][()]
            d[0] = np.frombuffer(hashlib.blake2b(np.ascontiguousarray(
                b[o[0]:o[1]], "<f4").tobytes(), digest_size=16).digest(), np.uint8)
            f["box_digest"][...] = d


def _swap_first_two(regions):
    return [regions[1], regions[0], *regions[2:]]


def _drop_second(regions):
    return [regions[0], *regions[2:]]


TAMPERING = {
    "edited box": (lambda p: _edit_box(p, 1, False),
                   "proposals shard 1 (shard-00001-of-00002.h5): the boxes of image 0 'img004' "
                   "do not match their digest"),
    "edited box, digest recomputed": (
        lambda p: _edit_box(p, 1, True),
        "content digest", "differs from the manifest's", "the shard changed after proposals "
        "wrote it"),
    "reordered images": (lambda p: _rewrite_shard(p, 0, _swap_first_two),
                         "image ids are not in the sorted order proposals writes (image 0 "
                         "'img001' comes before image 1 'img000')", "images were reordered"),
    "dropped image": (lambda p: _rewrite_shard(p, 0, _drop_second),
                      "proposals shard 0 (shard-00000-of-00002.h5) holds 3 images and 0 "
                      "failure(s), but its range of the sorted image list has 4 images",
                      "an image was dropped"),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_tampered_proposals_are_refused(case, world, tmp_path):
    props = tmp_path / "props"
    shutil.copytree(world["props"]["fpn"], props)
    tamper, *messages = TAMPERING[case]
    tamper(props)
    out = tmp_path / "teacher"
    res = teacher(world, props, out, expect=1)
    for msg in messages:
        assert msg in res.output, (case, res.output)
    assert "re-run `vlkd-extract proposals` for shard" in res.output
    assert not list(out.glob("shard-*")) if out.exists() else True


def test_shard_count_and_incomplete_proposals(world, tmp_path):
    props = tmp_path / "props"
    shutil.copytree(world["props"]["fpn"], props)
    res = teacher(world, props, tmp_path / "t", "--num-shards", 3, expect=1)
    assert "--num-shards 3 differs from the proposals set's 2 shards" in res.output

    # Shard 1 of the proposals not finished yet (its array job still running).
    m = read_manifest(props)
    m["shards"] = [e for e in m["shards"] if e["index"] == 0]
    m["failures"] = [f for f in m["failures"] if f["shard"] == 0]
    write_manifest(props, m)
    os.unlink(props / "shard-00001-of-00002.h5")
    res = teacher(world, props, tmp_path / "t", expect=1)
    assert "the proposals set" in res.output and "is incomplete: shard(s) 1 of 2" in res.output
    assert "pass --shard-index with a complete shard (0)" in res.output
    res = teacher(world, props, tmp_path / "t", shard_index=1, expect=1)
    assert "is incomplete" in res.output
    # Selecting only complete shards works; shard 1 can follow when proposals finish it.
    teacher(world, props, tmp_path / "t", shard_index=0)
    assert [e["index"] for e in read_manifest(tmp_path / "t")["shards"]] == [0]
    shutil.copy(world["props"]["fpn"] / "shard-00001-of-00002.h5", props)
    write_manifest(props, read_manifest(world["props"]["fpn"]))
    teacher(world, props, tmp_path / "t", shard_index=1)
    assert errors(tmp_path / "t", against=props) == []


def test_existing_output_from_other_proposals_or_teacher_is_refused(world, tmp_path):
    out = tmp_path / "teacher"
    props = world["props"]["fpn"]
    teacher(world, props, out)
    before = read_shards(out)
    # Other proposals: the other student's set; a set made with other options; a re-created
    # set (same options, another creation).
    other = tmp_path / "other-props"
    proposals("fpn", world["student_w"]["fpn"], world["images"], other, "--num-shards", 2,
              "--max-boxes", 6)
    for p in (world["props"]["c4"], other):
        res = teacher(world, p, out, expect=1)
        assert "holds a region set made from other proposals" in res.output, res.output
        assert "point --proposals at the set it was made from" in res.output
    # Another teacher: other weights, another config.
    other_w = save_tiny_weights("c4", tmp_path / "w.pth", seed=11)
    res = teacher(world, props, out, weights=other_w, expect=1)
    assert "with other teacher weights (weights digest)" in res.output
    res = teacher(world, props, out, "--precision", "bf16", expect=1)
    assert "with another --precision" in res.output
    y = tmp_path / "t.yaml"
    y.write_text(f'_BASE_: "{world["teacher_yaml"]["c4"]}"\nINPUT:\n  MIN_SIZE_TEST: 200\n')
    res = invoke(["teacher-features", "--proposals", props, "--images", world["images"],
                  "--config", y, "--weights", world["teacher_w"]["c4"], "--out", out,
                  "--shard-index", "all", "--no-progress"], expect=1)
    assert "with another teacher config (config digest)" in res.output
    # Not a proposals set at all.
    res = teacher(world, out, tmp_path / "x", expect=1)
    assert "is a 'teacher-features' set, expected a 'proposals' set" in res.output
    # The same settings: nothing to do, nothing changes.
    teacher(world, props, out)
    after = read_shards(out)
    for name in before:
        for key, value in before[name].items():
            np.testing.assert_array_equal(value, after[name][key])


# ---------------------------------------------------------------------------------- resume

def test_sigkill_then_rerun_gives_the_same_set(world, tmp_path):
    make_images(tmp_path / "imgs", 24, seed=5)
    props = tmp_path / "props"
    proposals("fpn", world["student_w"]["fpn"], tmp_path / "imgs", props)
    common = ["--commit-every", "2", "--batch-size", "2"]
    ref = tmp_path / "ref"
    teacher(world, props, ref, *common, images=tmp_path / "imgs")

    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "vlkd.extract.cli", "teacher-features", "--proposals",
            str(props), "--images", str(tmp_path / "imgs"), "--config",
            str(world["teacher_yaml"]["c4"]), "--weights", str(world["teacher_w"]["c4"]),
            "--out", str(out), "--shard-index", "all", "--num-workers", "0", "--no-progress",
            *common]
    commit = out / "shard-00000-of-00001.h5.partial" / "commit.json"
    returncode, stderr, seed = sigkill_after_first_commit(argv, commit, 0.3)
    assert returncode == -signal.SIGKILL, (seed, stderr)
    assert not (out / "shard-00000-of-00001.h5").exists()

    res = teacher(world, props, out, *common, "--log-format", "json", images=tmp_path / "imgs")
    events = [json.loads(line) for line in res.stderr.splitlines() if line.startswith("{")]
    resumed = [e for e in events if e["event"] == "resume"]
    assert resumed and 0 < resumed[0]["committed"] < 24, (seed, events)
    assert errors(out, against=props) == []
    assert_same_shards(ref, out, f"seed={seed}")


def test_zarr_output_and_json_log(world, tmp_path):
    out = tmp_path / "teacher"
    res = teacher(world, world["props"]["c4"], out, "--backend", "zarr", "--log-format",
                  "json", kind="fpn")
    events = [json.loads(line) for line in res.stderr.splitlines() if line.strip()]
    assert [e["event"] for e in events] == ["start", "shard_done", "shard_done", "summary"]
    assert events[-1]["images"] == 8 and events[-1]["skipped"] == 0
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000-of-00002.zarr",
                                                           "shard-00001-of-00002.zarr"]
    assert errors(out, against=world["props"]["c4"]) == []


def test_images_without_boxes(world, tmp_path):
    props = tmp_path / "props"
    proposals("c4", world["student_w"]["c4"], world["images"], props, "--score-thresh", 1.0,
              "--min-boxes", 0)
    out = tmp_path / "teacher"
    teacher(world, props, out, kind="fpn")
    assert errors(out, against=props) == []
    rs = RegionSet(out)
    assert len(rs) == 8
    for r in rs:
        assert r.boxes.shape == (0, 4) and r.features.shape == (0, 64) and r.classes.size == 0
