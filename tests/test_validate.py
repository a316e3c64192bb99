"""Validation: a valid set has no findings; each kind of damage is reported, never raised."""
from __future__ import annotations

import json
import os
import shutil

import h5py
import numpy as np
import pytest
import zarr

from vlkd.common.manifest import manifest_digest, read_manifest, write_manifest
from vlkd.common.regionset import ShardWriter, shard_name
from vlkd.common.validate import Finding, validate_region_set

from test_regionset import make_images, write_set

BACKENDS = ["hdf5", "zarr"]
DIM = 16


@pytest.fixture(scope="module")
def valid_sets(tmp_path_factory):
    """One pristine 2-shard set per backend; tests damage copies of it."""
    out = {}
    for backend in BACKENDS:
        d = tmp_path_factory.mktemp(f"valid-{backend}")
        write_set(d, make_images(11, [3, 0, 40, 2, 5, 1, 60, 4], DIM), backend=backend,
                  dim=DIM, num_shards=2)
        out[backend] = d
    return out


@pytest.fixture
def damaged(valid_sets, tmp_path):
    def copy(backend):
        dst = tmp_path / backend
        shutil.copytree(valid_sets[backend], dst)
        return dst
    return copy


def errors(findings):
    return [f for f in findings if f.level == "error"]


def feature_data_offset(path, row):
    """File and byte offset of feature row `row`, found with plain h5py / zarr metadata."""
    if str(path).endswith(".h5"):
        with h5py.File(path, "r") as f:
            ds = f["features"]
            return path, ds.id.get_offset() + row * ds.dtype.itemsize * ds.shape[1]
    # zarr: inner chunks are stored uncompressed, in order, from the start of the shard file
    meta = json.loads((path / "features" / "zarr.json").read_text())
    assert meta["codecs"][0]["configuration"]["index_location"] == "end"
    return path / "features" / "c" / "0" / "0", row * 2 * DIM


@pytest.mark.parametrize("backend", BACKENDS)
def test_valid_set_has_no_findings(valid_sets, backend):
    assert validate_region_set(valid_sets[backend]) == []
    assert validate_region_set(valid_sets[backend], check_features=False) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_file_is_reported(damaged, backend):
    d = damaged(backend)
    shard = d / shard_name(1, 2, backend)
    target = shard if backend == "hdf5" else shard / "features" / "c" / "0" / "0"
    os.truncate(target, target.stat().st_size // 2)
    found = errors(validate_region_set(d))
    assert found, "truncation not reported"
    assert all(f.where.startswith(shard.name) for f in found)
    text = " ".join(f.message for f in found)
    assert "bytes on disk, the manifest recorded" in text
    assert "truncated" in text


@pytest.mark.parametrize("backend", BACKENDS)
def test_flipped_byte_in_a_feature_chunk_is_reported(damaged, backend):
    d = damaged(backend)
    shard = d / shard_name(0, 2, backend)
    path, offset = feature_data_offset(shard, row=20)  # inside image 2's regions
    with open(path, "r+b") as f:
        f.seek(offset + 3)
        byte = f.read(1)
        f.seek(offset + 3)
        f.write(bytes([byte[0] ^ 0x01]))
    found = errors(validate_region_set(d))
    assert len(found) == 1 and found[0].where == shard.name
    assert "content digest" in found[0].message and "differs from the manifest" in found[0].message
    # without the feature pass the small arrays are still fine
    assert errors(validate_region_set(d, check_features=False)) == []


def _edit_offsets(shard, backend, fn):
    if backend == "hdf5":
        with h5py.File(shard, "r+") as f:
            o = f["offsets"][()]
            f["offsets"][...] = fn(o)
    else:
        a = zarr.open_group(str(shard), mode="r+")["offsets"]
        a[...] = fn(a[...])


@pytest.mark.parametrize("backend", BACKENDS)
def test_edited_offset_is_reported(damaged, backend):
    d = damaged(backend)
    shard = d / shard_name(0, 2, backend)
    def shift(o):
        o = o.copy()
        o[2] += 7  # image 1 gains 7 of image 2's regions: still monotone
        return o
    _edit_offsets(shard, backend, shift)
    found = errors(validate_region_set(d))
    where = {f.where for f in found}
    assert f"{shard.name}[image 1 'img-00001-é中']" in where
    assert f"{shard.name}[image 2 'img-00002-é中']" in where
    assert any("box_digest" in f.message for f in found)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_monotone_and_wrong_end_offsets_are_reported(damaged, backend):
    d = damaged(backend)
    shard = d / shard_name(0, 2, backend)
    def break_(o):
        o = o.copy()
        o[2], o[-1] = 0, o[-1] - 1
        return o
    _edit_offsets(shard, backend, break_)
    msgs = [f.message for f in errors(validate_region_set(d))]
    assert any("offsets decrease at image 1" in m for m in msgs)
    assert any("offsets[-1] is" in m and "expected R=" in m for m in msgs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_features_are_reported_per_image(tmp_path, backend):
    images = make_images(3, [2, 3, 1], DIM)
    images[1]["features"][2, 5] = np.nan
    images[2]["features"][0, 0] = np.inf
    write_set(tmp_path, images, backend=backend, dim=DIM)
    found = errors(validate_region_set(tmp_path))
    assert [(f.where, f.message) for f in found] == [
        (f"{shard_name(0, 1, backend)}[image 1 'img-00001-é中']",
         "1 feature row(s) contain NaN or Inf"),
        (f"{shard_name(0, 1, backend)}[image 2 'img-00002-é中']",
         "1 feature row(s) contain NaN or Inf")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_manifest_disagreements_are_reported(damaged, backend):
    d = damaged(backend)
    m = read_manifest(d)
    m["shards"][1]["num_regions"] += 1
    m["shards"][0]["digest"] = "0" * 32
    m["feature_dim"] = DIM + 1
    write_manifest(d, m)
    msgs = [str(f) for f in errors(validate_region_set(d))]
    assert any("manifest says num_regions=" in s for s in msgs)
    assert any("differs from the manifest's 000000" in s for s in msgs)
    assert any(f"feature_dim is {DIM + 1}" in s for s in msgs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_dtype_and_missing_array_are_reported(damaged, backend):
    d = damaged(backend)
    s0, s1 = d / shard_name(0, 2, backend), d / shard_name(1, 2, backend)
    if backend == "hdf5":
        with h5py.File(s0, "r+") as f:
            data = f["scores"][()]
            del f["scores"]
            f["scores"] = data.astype(np.float64)
        with h5py.File(s1, "r+") as f:
            del f["classes"]
    else:
        g = zarr.open_group(str(s0), mode="r+")
        data = g["scores"][...]
        del g["scores"]
        g.create_array("scores", shape=data.shape, dtype="f8")[...] = data
        del zarr.open_group(str(s1), mode="r+")["classes"]
    msgs = [str(f) for f in errors(validate_region_set(d))]
    assert any("scores dtype is float64, expected float32" in s for s in msgs)
    assert any("array 'classes' is missing" in s for s in msgs)


def test_missing_manifest_and_garbage_shard_do_not_raise(tmp_path, valid_sets):
    assert errors(validate_region_set(tmp_path)) == [Finding(
        "error", "manifest.json", errors(validate_region_set(tmp_path))[0].message)]
    assert "not found" in str(validate_region_set(tmp_path)[0])
    d = tmp_path / "set"
    shutil.copytree(valid_sets["hdf5"], d)
    (d / shard_name(1, 2, "hdf5")).write_bytes(b"not an hdf5 file at all")
    found = errors(validate_region_set(d))
    assert any("cannot be opened" in f.message for f in found)


def test_unfinished_shards_and_leftovers_are_warnings(tmp_path):
    images = make_images(0, [2, 1], 4)
    with ShardWriter(tmp_path, 0, 3, feature_dim=4) as w:
        w.append(**images[0])
        w.finalize()
    with ShardWriter(tmp_path, 1, 3, feature_dim=4) as w:  # killed-job leftovers
        w.append(**images[1])
    found = validate_region_set(tmp_path)
    assert errors(found) == []
    text = " | ".join(str(f) for f in found)
    assert "2 of 3 shard(s) are not finalised yet: [1, 2]" in text
    assert "shard-00001-of-00003.h5.partial: a partial shard" in text


@pytest.mark.parametrize("backend", BACKENDS)
def test_alignment_against_a_proposals_set(tmp_path, backend):
    images = make_images(4, [3, 2, 4], DIM)
    write_set(tmp_path / "props", images, backend=backend, dim=DIM)
    teacher = [dict(im, features=np.ones((len(im["boxes"]), DIM))) for im in images]
    write_set(tmp_path / "teacher", teacher, backend=backend, dim=DIM)
    m = read_manifest(tmp_path / "teacher")
    m["aligned_to"] = {"path": str(tmp_path / "props"), "role": "proposals",
                       "manifest_digest": manifest_digest(tmp_path / "props")}
    write_manifest(tmp_path / "teacher", m)
    assert validate_region_set(tmp_path / "teacher", against=str(tmp_path / "props")) == []

    moved = [dict(im) for im in teacher]
    moved[1]["boxes"] = moved[1]["boxes"] + 1.0
    write_set(tmp_path / "bad", moved, backend=backend, dim=DIM)
    found = errors(validate_region_set(tmp_path / "bad", against=str(tmp_path / "props")))
    assert [f.where for f in found] == [f"{shard_name(0, 1, backend)}[image 1 'img-00001-é中']"]
    assert "not pooled over the proposals' boxes" in found[0].message
