"""`vlkd-extract validate`: format checks plus alignment, as a table and an exit status."""
import os
import shutil

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from extract_fixtures import DETECTOR_CONFIGS, make_images, save_tiny_weights
from vlkd.common.manifest import read_manifest, write_manifest
from vlkd.common.regionset import ShardReader, ShardWriter
from vlkd.extract.cli import main

torch.set_num_threads(1)


def invoke(*argv, expect=0):
    res = CliRunner().invoke(main, [str(a) for a in argv])
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert res.exit_code == expect, res.output
    return res


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """A proposals set (tiny FPN student, 2 shards), a second proposals set made with other
    options, and a teacher set (tiny C4 teacher at another test size) aligned with the first."""
    d = tmp_path_factory.mktemp("validate")
    make_images(d / "imgs", 6)
    ws = save_tiny_weights("fpn", d / "s.pth")
    wt = save_tiny_weights("c4", d / "t.pth", seed=2)
    ty = d / "teacher.yaml"
    ty.write_text(f'_BASE_: "{DETECTOR_CONFIGS["c4"]}"\nINPUT:\n  MIN_SIZE_TEST: 224\n')
    common = ["--images", d / "imgs", "--no-progress", "--num-workers", 0, "--shard-index",
              "all"]
    for name, extra in (("props", []), ("other", ["--max-boxes", 5])):
        invoke("proposals", *common, "--config", DETECTOR_CONFIGS["fpn"], "--weights", ws,
               "--out", d / name, "--num-shards", 2, "--min-boxes", 3, "--max-boxes", 8, *extra)
    invoke("teacher-features", *common, "--proposals", d / "props", "--config", ty,
           "--weights", wt, "--out", d / "teacher")
    return d


def copy(sets, name, tmp_path):
    shutil.copytree(sets / name, tmp_path / name)
    return tmp_path / name


def test_clean_sets_exit_0(sets):
    res = invoke("validate", sets / "props")
    assert res.output.strip().endswith("clean (features streamed)")
    res = invoke("validate", sets / "teacher")
    assert f"alignment checked against {sets / 'props'}" in res.output
    res = invoke("validate", sets / "teacher", "--against", sets / "props", "--no-features")
    assert "clean (small arrays only)" in res.output


def test_nan_and_inf_written_into_features_are_caught(sets, tmp_path):
    t = copy(sets, "teacher", tmp_path)
    hits = {}
    for name, row, value in (("shard-00000-of-00002.h5", -1, np.nan),
                             ("shard-00001-of-00002.h5", 0, np.inf)):
        with h5py.File(t / name, "r+") as f:
            offsets = f["offsets"][()]
            row = row % int(offsets[-1])  # -1: the last row, in the last image
            f["features"][row, 5] = value
            image = int(np.searchsorted(offsets, row, side="right") - 1)
            hits[name] = (image, f["image_ids"].asstr()[image])
    res = invoke("validate", t, "--against", sets / "props", expect=1)
    assert res.output.splitlines()[0].split() == ["level", "where", "message"]
    out = " ".join(res.output.split())  # the table wraps long messages
    for name, (image, iid) in hits.items():
        assert f"{name}[image {image} '{iid}']" in out
    assert out.count("1 feature row(s) contain NaN or Inf") == 2
    assert out.count("the shard's arrays changed after it was written") == 2
    assert "4 error(s), 0 warning(s)" in out


def test_alignment_errors(sets, tmp_path):
    # Checked against other proposals: another set with other options.
    res = invoke("validate", sets / "teacher", "--against", sets / "other", expect=1)
    assert "the teacher set was made from other proposals" in res.output

    # The proposals' shard 1 re-extracted (other content) after the teacher used it.
    p = copy(sets, "props", tmp_path)
    m = read_manifest(p)
    entry = m["shards"][1]
    src = ShardReader(p / entry["name"])
    regions = [src.read(i) for i in range(len(src))]
    tmp = tmp_path / "rewrite"
    with ShardWriter(tmp, 1, 2, feature_dim=m["feature_dim"]) as w:
        for r in regions:
            w.append(r.image_id, r.image_hw, r.boxes, r.scores, r.classes,
                     r.features.astype(np.float32) * 2, image_digest=r.image_digest)
        info = w.finalize()
    os.replace(tmp / entry["name"], p / entry["name"])
    m["shards"][1] = info
    write_manifest(p, m)
    invoke("validate", p)  # the proposals set itself is valid
    res = invoke("validate", sets / "teacher", "--against", p, expect=1)
    assert "shard-00001-of-00002.h5" in res.output
    assert "the proposals shard was re-extracted after; re-run teacher-features for shard 1" \
        in " ".join(res.output.split())

    # A teacher box edited (its digest recomputed, so only alignment can tell).
    t = copy(sets, "teacher", tmp_path)
    with h5py.File(t / "shard-00000-of-00002.h5", "r+") as f:
        import hashlib
        b = f["boxes"][()]
        b[0, 0] += 2
        f["boxes"][...] = b
        o = f["offsets"][()]
        d = f["box_digest"][()]
        d[0] = np.frombuffer(hashlib.blake2b(np.ascontiguousarray(b[o[0]:o[1]], "<f4")
                                             .tobytes(), digest_size=16).digest(), np.uint8)
        f["box_digest"][...] = d
    res = invoke("validate", t, "--against", sets / "props", "--no-features", expect=1)
    assert "differs from the proposals'" in res.output
    assert "shard-00000-of-00002.h5[image 0 'img000']" in res.output

    # --against on something that is not a teacher set.
    res = invoke("validate", sets / "props", "--against", sets / "other", expect=1)
    assert "--against checks a teacher-features set" in " ".join(res.output.split())


def test_warnings_only_exit_2_and_moved_sets(sets, tmp_path):
    # An unfinished shard: a warning, not an error.
    t = copy(sets, "teacher", tmp_path)
    m = read_manifest(t)
    m["shards"] = [e for e in m["shards"] if e["index"] == 0]
    m["failures"] = []
    write_manifest(t, m)
    os.unlink(t / "shard-00001-of-00002.h5")
    res = invoke("validate", t, expect=2)
    assert "1 of 2 shard(s) are not finalised yet" in " ".join(res.output.split())
    assert "0 error(s), 1 warning(s)" in res.output

    # A teacher set copied without its proposals: the set is checked, alignment is not.
    t2 = copy(sets, "teacher", tmp_path / "moved")
    m = read_manifest(t2)
    m["aligned_to"]["path"] = str(tmp_path / "nowhere")
    write_manifest(t2, m)
    res = invoke("validate", t2)
    assert "alignment not checked" in res.output and "pass --against" in res.output


def test_unreadable_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    res = invoke("validate", tmp_path, expect=1)
    assert "is not valid JSON" in " ".join(res.output.split())
