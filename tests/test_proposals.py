"""`vlkd-extract proposals` end to end on tiny C4, FPN and TEE detectors and generated images."""
import io
import json
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from extract_fixtures import (DETECTOR_CONFIGS, assert_same_shards, invoke_extract, make_images,
                              read_shards, reference_features, save_tiny_weights,
                              sigkill_after_first_commit, tiny_model, tiny_weights)  # noqa: F401
from vlkd.common.manifest import read_manifest
from vlkd.common.regionset import RegionSet, file_digest
from vlkd.common.validate import validate_region_set
from vlkd.extract.cli import main
from vlkd.extract.job import FailureLimit

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def run(kind, weights, images, out, *args, expect=0, env=None):
    """Invoke ``vlkd-extract proposals`` in-process; returns the click result."""
    argv = ["proposals", "--images", str(images), "--config", str(DETECTOR_CONFIGS[kind]),
            "--weights", str(weights), "--out", str(out), "--no-progress",
            "--num-workers", "0", *[str(a) for a in args]]
    if "--shard-index" not in args and not (env and "SLURM_ARRAY_TASK_ID" in env):
        argv += ["--shard-index", "all"]
    return invoke_extract(argv, expect=expect, env=env)


def errors(set_dir):
    return [f for f in validate_region_set(set_dir) if f.level == "error"]


# ------------------------------------------------------------------------- correctness

@pytest.mark.parametrize("kind", ["c4", "fpn", "tee"])
def test_features_are_the_models_own_over_the_stored_boxes(kind, tiny_weights, tmp_path):
    images = make_images(tmp_path / "imgs", 10)
    out = tmp_path / "set"
    run(kind, tiny_weights[kind], tmp_path / "imgs", out, "--num-shards", 2, "--batch-size", 4,
        "--feature-dtype", "float32", "--score-thresh", 0.6, "--min-boxes", 5,
        "--max-boxes", 20)
    assert errors(out) == []
    cfg, model = tiny_model(kind)  # the same weights, rebuilt without vlkd's loader
    rs = RegionSet(out)
    assert len(rs) == 10 and rs.feature_dim == (256 if kind == "c4" else 64)
    shifted_differs = []
    for iid, path in images.items():
        r = rs.get(iid)
        h, w = np.asarray(Image.open(path)).shape[:2]
        assert tuple(r.image_hw) == (h, w) and r.image_digest == file_digest(path)
        n = len(r.boxes)
        assert 5 <= n <= 20 and r.features.shape == (n, rs.feature_dim)
        b = r.boxes
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 1] >= 0).all() \
            and (b[:, 3] <= h).all() and (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert (np.diff(r.scores) <= 0).all()  # best first
        want = reference_features(cfg, model, path, b)
        scale = np.abs(want).max()
        np.testing.assert_allclose(r.features, want, rtol=1e-4, atol=1e-4 * scale)
        # The features are specific to the exact boxes: shifting a box by 10 % of its size
        # (about what the box head's regression moves a proposal here) changes them far
        # beyond the tolerance, so proposal features paired with these boxes would fail above.
        dx = 0.1 * (b[:, 2:] - b[:, :2])
        moved = np.concatenate([b[:, :2] - dx, b[:, 2:] - dx], 1).clip(0, None)
        ref_moved = reference_features(cfg, model, path, moved.astype(np.float32))
        shifted_differs.append(np.abs(ref_moved - want).max(1) > 1e-2 * scale)
    assert np.concatenate(shifted_differs).mean() > 0.9


def test_batching_and_workers_do_not_change_results(tiny_weights, tmp_path):
    make_images(tmp_path / "imgs", 9)
    a, b = tmp_path / "a", tmp_path / "b"
    run("fpn", tiny_weights["fpn"], tmp_path / "imgs", a, "--batch-size", 1,
        "--feature-dtype", "float32")
    run("fpn", tiny_weights["fpn"], tmp_path / "imgs", b, "--batch-size", 4,
        "--num-workers", 2, "--feature-dtype", "float32")
    sa, sb = read_shards(a), read_shards(b)
    for name in sa:
        for key in ("image_ids", "offsets", "classes", "image_hw", "image_digest"):
            np.testing.assert_array_equal(sa[name][key], sb[name][key])
        np.testing.assert_allclose(sa[name]["boxes"], sb[name]["boxes"], atol=1e-4)
        np.testing.assert_allclose(sa[name]["features"], sb[name]["features"], rtol=1e-4,
                                   atol=1e-4 * np.abs(sa[name]["features"]).max())


def test_zero_detections_are_zero_regions(tiny_weights, tmp_path):
    make_images(tmp_path / "imgs", 3)
    out = tmp_path / "set"
    run("c4", tiny_weights["c4"], tmp_path / "imgs", out, "--score-thresh", 1.0,
        "--min-boxes", 0)
    assert errors(out) == []
    rs = RegionSet(out)
    assert len(rs) == 3
    for r in rs:
        assert r.boxes.shape == (0, 4) and r.features.shape == (0, 256)
    assert read_manifest(out)["shards"][0]["num_regions"] == 0


# ---------------------------------------------------------------------------- sharding

def test_union_of_shard_runs_equals_all(tiny_weights, tmp_path):
    make_images(tmp_path / "imgs", 11)
    a, b = tmp_path / "each", tmp_path / "all"
    w = tiny_weights["fpn"]
    # Any order, one job per shard; shard 1 takes its index from the array-job environment.
    run("fpn", w, tmp_path / "imgs", a, "--num-shards", 3, "--shard-index", 2)
    run("fpn", w, tmp_path / "imgs", a, "--num-shards", 3, env={"SLURM_ARRAY_TASK_ID": "1"})
    assert sorted(p.name for p in a.glob("shard-*")) == ["shard-00001-of-00003.h5",
                                                         "shard-00002-of-00003.h5"]
    run("fpn", w, tmp_path / "imgs", a, "--num-shards", 3, "--shard-index", 0)
    run("fpn", w, tmp_path / "imgs", b, "--num-shards", 3, "--shard-index", "all")
    assert errors(a) == [] and errors(b) == []
    sa, sb = read_shards(a), read_shards(b)
    assert sorted(sa) == sorted(sb) and len(sa) == 3
    for name in sa:
        for key, value in sa[name].items():
            np.testing.assert_array_equal(value, sb[name][key], err_msg=f"{name}/{key}")
    ma, mb = read_manifest(a), read_manifest(b)
    assert [s["digest"] for s in ma["shards"]] == [s["digest"] for s in mb["shards"]]
    ids = [i for s in sorted(sa) for i in sa[s]["image_ids"]]
    assert [i.decode() if isinstance(i, bytes) else i for i in ids] == \
        [f"img{i:03d}" for i in range(11)]  # contiguous ranges of the sorted list


def test_sigkill_then_rerun_gives_the_same_set(tiny_weights, tmp_path):
    make_images(tmp_path / "imgs", 24)
    w = tiny_weights["fpn"]
    common = ["--commit-every", "2", "--batch-size", "2"]
    ref = tmp_path / "ref"
    run("fpn", w, tmp_path / "imgs", ref, *common)

    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "vlkd.extract.cli", "proposals", "--images",
            str(tmp_path / "imgs"), "--config", str(DETECTOR_CONFIGS["fpn"]), "--weights",
            str(w), "--out", str(out), "--shard-index", "all", "--num-workers", "0",
            "--no-progress", *common]
    commit = out / "shard-00000-of-00001.h5.partial" / "commit.json"
    returncode, stderr, seed = sigkill_after_first_commit(argv, commit, 0.4)
    assert returncode == -signal.SIGKILL, (seed, stderr)
    assert not (out / "shard-00000-of-00001.h5").exists()

    res = run("fpn", w, tmp_path / "imgs", out, *common, "--log-format", "json")
    events = [json.loads(line) for line in res.stderr.splitlines() if line.startswith("{")]
    resumed = [e for e in events if e["event"] == "resume"]
    assert resumed and 0 < resumed[0]["committed"] < 24, (seed, events)
    assert errors(out) == []
    assert_same_shards(ref, out, f"seed={seed}")


# --------------------------------------------------------------------------- bad input

def _bomb_png(w, h):
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 256)) + chunk(b"IEND", b""))


def _blocks(rs, h, w, c=3):
    small = rs.randint(0, 256, (h // 8 + 1, w // 8 + 1, c)).astype(np.uint8)
    return np.kron(small, np.ones((8, 8, 1), np.uint8))[:h, :w]


def test_bad_and_unusual_images(tiny_weights, tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    rs = np.random.RandomState(7)
    good = {}
    for i in range(4):
        p = d / f"good{i}.png"
        Image.fromarray(_blocks(rs, 120, 160)).save(p)
        good[f"good{i}"] = p
    # Unusual but usable images, each with a plain-RGB twin computed here with numpy: the
    # two must give identical regions.
    conv = {}
    g = _blocks(rs, 120, 160)[:, :, 0]
    Image.fromarray(g).save(d / "gray.png")
    conv["gray"] = np.stack([g] * 3, -1)
    rgba = _blocks(rs, 120, 160, 4)
    Image.fromarray(rgba).save(d / "rgba.png")
    conv["rgba"] = rgba[:, :, :3]
    pal = rs.randint(0, 256, (16, 3)).astype(np.uint8)
    idx = (_blocks(rs, 120, 160)[:, :, 0] % 16).astype(np.uint8)
    im = Image.fromarray(idx, mode="P")
    im.putpalette(pal.reshape(-1).tolist())
    im.save(d / "palette.png")
    conv["palette"] = pal[idx]
    g16 = (_blocks(rs, 120, 160)[:, :, 0].astype(np.uint16) << 8) | 0x5A
    Image.fromarray(g16).save(d / "gray16.png")
    conv["gray16"] = np.stack([(g16 >> 8).astype(np.uint8)] * 3, -1)
    inks = np.array([(255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255),
                     (0, 0, 0, 0)], np.uint8)
    rgb_of_ink = np.array([(0, 255, 255), (255, 0, 255), (255, 255, 0), (0, 0, 0),
                           (255, 255, 255)], np.uint8)
    k = (_blocks(rs, 120, 160)[:, :, 0] % 5)
    Image.frombytes("CMYK", (160, 120), inks[k].tobytes()).save(d / "cmyk.tiff")
    conv["cmyk"] = rgb_of_ink[k]
    upright = _blocks(rs, 160, 120)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: a viewer turns it 90 degrees clockwise
    Image.fromarray(np.rot90(upright, k=1).copy()).save(d / "exif.png", exif=exif.tobytes())
    conv["exif"] = upright
    for name, arr in conv.items():
        Image.fromarray(np.ascontiguousarray(arr)).save(d / f"twin-{name}.png")

    png = (d / "good0.png").read_bytes()
    j = png.index(b"IDAT") + 30
    (d / "corrupt.png").write_bytes(png[:j] + bytes(x ^ 0xFF for x in png[j:j + 32])
                                    + png[j + 32:])
    buf = io.BytesIO()
    Image.fromarray(_blocks(rs, 120, 160)).save(buf, format="JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("a caption, not a picture")
    (d / "bomb.png").write_bytes(_bomb_png(3000, 3000))
    (d / "dir.jpg").mkdir()  # unreadable as a file (tests run as root: chmod 000 reads)
    bad = {"corrupt": "corrupt", "truncated": "truncated", "empty": "empty",
           "text": "not-an-image", "bomb": "too-large", "dir": "unreadable",
           "missing": "missing"}
    names = [p.name for p in sorted(d.iterdir())] + ["missing.jpg"]
    (tmp_path / "list.txt").write_text("".join(f"imgs/{n}\t{Path(n).stem}\n" for n in names))
    (tmp_path / "good.txt").write_text("".join(f"imgs/{p.name}\t{i}\n" for i, p in good.items()))

    w = tiny_weights["fpn"]
    opts = ["--max-pixels", 1_000_000, "--feature-dtype", "float32"]
    out = tmp_path / "set"
    run("fpn", w, tmp_path / "list.txt", out, *opts, "--max-failures", "50%")
    assert errors(out) == []
    m = read_manifest(out)
    got = {f["image_id"]: f["reason"] for f in m["failures"]}
    assert sorted(got) == sorted(bad)
    for iid, kind in bad.items():
        assert got[iid].startswith(kind + ": "), (iid, got[iid])
    rs_set = RegionSet(out)
    assert len(rs_set) == len(names) - len(bad)
    for name, arr in conv.items():
        a, b = rs_set.get(name), rs_set.get(f"twin-{name}")
        assert tuple(a.image_hw) == arr.shape[:2], name
        np.testing.assert_array_equal(a.boxes, b.boxes, err_msg=name)
        np.testing.assert_allclose(a.features, b.features, rtol=1e-5,
                                   atol=1e-5 * np.abs(b.features).max(), err_msg=name)
    # The good images get the same regions as in a run without any bad image.
    run("fpn", w, tmp_path / "good.txt", tmp_path / "only-good", *opts)
    ref = RegionSet(tmp_path / "only-good")
    for iid in good:
        a, b = rs_set.get(iid), ref.get(iid)
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_allclose(a.features, b.features, rtol=1e-5,
                                   atol=1e-5 * np.abs(b.features).max())
    # Exit status: 7 of 23 images failed.
    res = run("fpn", w, tmp_path / "list.txt", tmp_path / "strict", *opts,
              "--max-failures", 6, expect=3)
    assert "7 of 23 images failed" in res.output
    run("fpn", w, tmp_path / "list.txt", tmp_path / "strict", *opts, "--max-failures", 7)


def test_failure_limit_parsing():
    assert FailureLimit.parse("1%").exceeded(2, 100) and not FailureLimit.parse("1%").exceeded(
        1, 100)
    assert FailureLimit.parse("0.05").allowed(200) == pytest.approx(10)
    assert FailureLimit.parse("3").exceeded(4, 10**6) and not FailureLimit.parse(3).exceeded(3, 5)
    assert FailureLimit.parse("0").exceeded(1, 10)
    for bad in ("-1", "abc", "150%", "1.5"):
        with pytest.raises(ValueError, match="--max-failures"):
            FailureLimit.parse(bad)


# ------------------------------------------------------------------- safety and resume

def test_trust_pickle_is_enforced(tiny_weights, tmp_path):
    import pickle

    make_images(tmp_path / "imgs", 2)
    _, model = tiny_model("fpn")
    pkl = tmp_path / "w.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in model.state_dict().items()},
                     "__author__": "test"}, f)
    res = run("fpn", pkl, tmp_path / "imgs", tmp_path / "set", expect=1)
    assert "unpickling runs whatever code" in res.output and "--trust-pickle" in res.output
    assert not list((tmp_path / "set").glob("shard-*")) if (tmp_path / "set").exists() else True
    run("fpn", pkl, tmp_path / "imgs", tmp_path / "set", "--trust-pickle")
    assert errors(tmp_path / "set") == []


def test_rerun_refused_with_other_settings_and_resumed_with_same(tiny_weights, tmp_path):
    make_images(tmp_path / "imgs", 4)
    w = tiny_weights["fpn"]
    out = tmp_path / "set"
    run("fpn", w, tmp_path / "imgs", out)
    before = read_shards(out)
    other_w = save_tiny_weights("fpn", tmp_path / "other.pth", seed=5)
    res = run("fpn", other_w, tmp_path / "imgs", out, expect=1)
    assert "other detector weights (weights digest)" in res.output
    cfg2 = tmp_path / "tiny-fpn-224.yaml"
    cfg2.write_text(f'_BASE_: "{DETECTOR_CONFIGS["fpn"]}"\nINPUT:\n  MIN_SIZE_TEST: 224\n')
    argv = ["proposals", "--images", str(tmp_path / "imgs"), "--config", str(cfg2),
            "--weights", str(w), "--out", str(out), "--shard-index", "all", "--no-progress"]
    res = CliRunner().invoke(main, argv)
    assert res.exit_code == 1 and "another detector config (config digest)" in res.output
    res = run("fpn", w, tmp_path / "imgs", out, "--score-thresh", 0.3, expect=1)
    assert "another --score-thresh" in res.output
    res = run("fpn", w, tmp_path / "imgs", out, "--num-shards", 2, expect=1)
    assert "another --num-shards" in res.output
    make_images(tmp_path / "more", 5)
    res = run("fpn", w, tmp_path / "more", out, expect=1)
    assert "another image list" in res.output
    run("fpn", w, tmp_path / "imgs", out)  # same settings: nothing to do, nothing changes
    after = read_shards(out)
    for name in before:
        for key, value in before[name].items():
            np.testing.assert_array_equal(value, after[name][key])


def test_zarr_backend_and_json_log(tiny_weights, tmp_path):
    make_images(tmp_path / "imgs", 5)
    out = tmp_path / "set"
    res = run("c4", tiny_weights["c4"], tmp_path / "imgs", out, "--backend", "zarr",
              "--log-format", "json", "--num-shards", 2)
    lines = [json.loads(line) for line in res.stderr.splitlines() if line.strip()]
    assert [e["event"] for e in lines] == ["start", "shard_done", "shard_done", "summary"]
    assert lines[-1]["images"] == 5 and lines[-1]["failed"] == 0
    assert errors(out) == []
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000-of-00002.zarr",
                                                           "shard-00001-of-00002.zarr"]
    assert len(RegionSet(out)) == 5
