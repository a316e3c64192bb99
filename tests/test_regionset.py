"""Region-set writer/reader: round trips on both backends, checked with plain h5py / zarr and
with digests recomputed here from the FORMAT.md definitions (not with vlkd's own helpers)."""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings, strategies as st

from vlkd.common.manifest import read_manifest, update_manifest, manifest_digest
from vlkd.common.regionset import (RegionSet, RegionSetError, ShardLockedError, ShardReader,
                                   ShardWriter, box_digest, bytes_digest, file_digest,
                                   shard_name)

BACKENDS = ["hdf5", "zarr"]


def make_images(seed, counts, dim, dtype="float16", prefix="img"):
    """Synthetic images: list of dicts with the arrays a writer receives."""
    rng = np.random.default_rng(seed)
    images = []
    for i, n in enumerate(counts):
        xy = rng.uniform(0, 500, size=(n, 2)).astype(np.float32)
        wh = rng.uniform(1, 100, size=(n, 2)).astype(np.float32)
        images.append({
            "image_id": f"{prefix}-{i:05d}-é中",
            "image_hw": (int(rng.integers(10, 1000)), int(rng.integers(10, 1000))),
            "boxes": np.concatenate([xy, xy + wh], axis=1),
            "scores": rng.uniform(0, 1, size=n).astype(np.float32),
            "classes": rng.integers(0, 1600, size=n).astype(np.int32),
            "features": rng.standard_normal((n, dim)).astype(np.float32).astype(dtype),
            "image_digest": hashlib.blake2b(f"file{i}".encode(), digest_size=16).digest(),
        })
    return images


def write_set(set_dir, images, *, backend, dim, dtype="float16", num_shards=1, commit_every=3):
    """Split images into contiguous shards and write them; returns the per-shard image lists."""
    bounds = np.linspace(0, len(images), num_shards + 1).astype(int)
    parts = []
    for s in range(num_shards):
        part = images[bounds[s]:bounds[s + 1]]
        with ShardWriter(set_dir, s, num_shards, backend=backend, feature_dim=dim,
                         feature_dtype=dtype, commit_every=commit_every) as w:
            for im in part:
                w.append(**im)
            w.finalize()
        parts.append(part)
    return parts


def plain_read(path):
    """Every array of a shard, read with plain h5py / zarr-python (no vlkd code)."""
    if str(path).endswith(".h5"):
        with h5py.File(path, "r") as f:
            out = {k: f[k][()] for k in f if k != "image_ids"}
            out["image_ids"] = [s.decode("utf-8") for s in f["image_ids"][()]]
            out["attrs"] = dict(f.attrs)
    else:
        g = zarr.open_group(str(path), mode="r")
        out = {k: g[k][...] for k in g.array_keys() if k != "image_ids"}
        out["image_ids"] = [str(s) for s in g["image_ids"][...]] if g["image_ids"].shape[0] else []
        out["attrs"] = dict(g.attrs)
    return out


def reference_digest(images, dtype, extras=None):
    """Shard content digest computed from the FORMAT.md definition, independently of vlkd
    (``extras``: {name: dtype} of optional arrays, fed after the features by sorted name)."""
    h = hashlib.blake2b(digest_size=16)
    counts = [len(im["boxes"]) for im in images]
    def put(name, data):
        h.update(name.encode() + b"\n")
        h.update(data)
    put("image_ids", b"".join(len(im["image_id"].encode()).to_bytes(4, "little") +
                              im["image_id"].encode() for im in images))
    put("image_hw", np.array([im["image_hw"] for im in images], "<i4").reshape(-1, 2).tobytes())
    put("offsets", np.concatenate([[0], np.cumsum(counts)]).astype("<i8").tobytes())
    cat = lambda k, dt, shape: (np.concatenate([im[k] for im in images]).astype(dt)
                                if images else np.zeros(shape, dt))
    put("boxes", cat("boxes", "<f4", (0, 4)).tobytes())
    put("scores", cat("scores", "<f4", (0,)).tobytes())
    put("classes", cat("classes", "<i4", (0,)).tobytes())
    put("box_digest", b"".join(hashlib.blake2b(im["boxes"].astype("<f4").tobytes(),
                                               digest_size=16).digest() for im in images))
    put("image_digest", b"".join(im["image_digest"] for im in images))
    put("features", cat("features", np.dtype(dtype).newbyteorder("<"), (0, 1)).tobytes())
    for name in sorted(extras or {}):
        put(name, np.concatenate([im["extras"][name] for im in images]).astype(
            np.dtype(extras[name]).newbyteorder("<")).tobytes())
    return h.hexdigest()


def assert_image_equal(got, im, dtype):
    assert got.image_id == im["image_id"]
    assert got.image_hw == im["image_hw"]
    np.testing.assert_array_equal(got.boxes, im["boxes"])
    np.testing.assert_array_equal(got.scores, im["scores"])
    np.testing.assert_array_equal(got.classes, im["classes"])
    assert got.features.dtype == np.dtype(dtype)
    assert got.features.shape == im["features"].shape
    np.testing.assert_array_equal(got.features, im["features"])
    assert got.image_digest == im["image_digest"]
    assert got.box_digest == hashlib.blake2b(im["boxes"].astype("<f4").tobytes(),
                                             digest_size=16).digest()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_0_1_1000_regions(tmp_path, backend, dtype):
    dim = 24
    images = make_images(0, [0, 1, 1000, 0, 7, 1], dim, dtype)
    write_set(tmp_path, images, backend=backend, dim=dim, dtype=dtype, num_shards=2)
    rs = RegionSet(tmp_path)
    assert len(rs) == 6 and rs.feature_dim == dim and rs.feature_dtype == np.dtype(dtype)
    assert rs.num_shards == 2 and rs.missing_shards == []
    # iterated, by id, by range: all equal to the input
    iterated = list(rs)
    assert [r.image_id for r in iterated] == [im["image_id"] for im in images]
    for got, im in zip(iterated, images):
        assert_image_equal(got, im, dtype)
        assert_image_equal(rs.get(im["image_id"]), im, dtype)
    shard = rs.shards[0]
    for got, im in zip(shard.read_range(0, len(shard)), images):
        assert_image_equal(got, im, dtype)
    # the same files read with plain h5py / zarr
    bounds = [0, 3, 6]
    for s in range(2):
        part = images[bounds[s]:bounds[s + 1]]
        raw = plain_read(tmp_path / shard_name(s, 2, backend))
        counts = [len(im["boxes"]) for im in part]
        assert raw["image_ids"] == [im["image_id"] for im in part]
        np.testing.assert_array_equal(raw["offsets"], np.concatenate([[0], np.cumsum(counts)]))
        assert raw["features"].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(raw["features"],
                                      np.concatenate([im["features"] for im in part]))
        np.testing.assert_array_equal(raw["boxes"], np.concatenate([im["boxes"] for im in part]))
        assert raw["box_digest"].shape == (3, 16) and raw["box_digest"].dtype == np.uint8
        assert raw["attrs"]["num_images"] == 3 and raw["attrs"]["num_regions"] == sum(counts)
        assert raw["attrs"]["feature_dtype"] == dtype
    m = read_manifest(tmp_path)
    assert [e["digest"] for e in m["shards"]] == [
        reference_digest(images[:3], dtype), reference_digest(images[3:], dtype)]


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(counts=st.lists(st.integers(0, 12), min_size=0, max_size=9),
       dim=st.integers(1, 9),
       dtype=st.sampled_from(["float16", "float32"]),
       ids=st.lists(st.text(st.characters(blacklist_characters="\0"), min_size=1, max_size=8),
                    min_size=9, max_size=9, unique=True),
       commit_every=st.integers(1, 4))
def test_round_trip_property_both_backends(tmp_path_factory, counts, dim, dtype, ids,
                                           commit_every):
    images = make_images(len(counts) + dim, counts, dim, dtype)
    for im, image_id in zip(images, ids):
        im["image_id"] = image_id  # arbitrary unicode (astral planes, combining marks, ...)
    digests = []
    for backend in BACKENDS:
        d = tmp_path_factory.mktemp(backend)
        write_set(d, images, backend=backend, dim=dim, dtype=dtype, commit_every=commit_every)
        rs = RegionSet(d)
        got = list(rs)
        assert len(got) == len(images)
        for g, im in zip(got, images):
            assert_image_equal(g, im, dtype)
            assert_image_equal(rs.get(im["image_id"]), im, dtype)
        digests.append(rs.manifest["shards"][0]["digest"])
    # one content digest for both containers, equal to the independent computation
    assert digests[0] == digests[1] == reference_digest(images, dtype)


def test_digest_helpers_match_hashlib(tmp_path):
    boxes = np.array([[1, 2, 3, 4], [5.5, 6, 7, 8]], dtype=np.float64)
    assert box_digest(boxes) == hashlib.blake2b(
        np.array(boxes, "<f4").tobytes(), digest_size=16).digest()
    assert box_digest(np.zeros((0, 4))) == hashlib.blake2b(b"", digest_size=16).digest()
    assert bytes_digest(b"abc") == hashlib.blake2b(b"abc", digest_size=16).digest()
    p = tmp_path / "f.bin"
    data = os.urandom(3_000_001)
    p.write_bytes(data)
    assert file_digest(p) == hashlib.blake2b(data, digest_size=16).digest()


def test_shard_name():
    assert shard_name(3, 16, "hdf5") == "shard-00003-of-00016.h5"
    assert shard_name(0, 1, "zarr") == "shard-00000-of-00001.zarr"
    with pytest.raises(ValueError):
        shard_name(16, 16, "hdf5")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_path_equals_library_reads(tmp_path, backend):
    """The pread fast path returns exactly what h5py / zarr-python return, for any row range,
    across zarr inner-chunk and shard-file boundaries."""
    import vlkd.common.staging as rsmod  # where the zarr layout is chosen
    dim = 8
    images = make_images(1, [5] * 300, dim)  # 1500 rows
    old = (rsmod.ZARR_INNER_CHUNK_BYTES, rsmod.ZARR_INNER_CHUNKS_PER_SHARD)
    # 7-row inner chunks, 4 per shard file: many boundaries in a small array
    rsmod.ZARR_INNER_CHUNK_BYTES, rsmod.ZARR_INNER_CHUNKS_PER_SHARD = 7 * dim * 2, 4
    try:
        write_set(tmp_path, images, backend=backend, dim=dim)
    finally:
        rsmod.ZARR_INNER_CHUNK_BYTES, rsmod.ZARR_INNER_CHUNKS_PER_SHARD = old
    reader = ShardReader(tmp_path / shard_name(0, 1, backend))
    assert type(reader.data.rows).__name__ in ("ContiguousRows", "ZarrShardedRows")
    if backend == "zarr":
        assert len(list((tmp_path / shard_name(0, 1, backend) / "features" / "c").iterdir())) == 54
    full = plain_read(reader.path)["features"]
    rng = np.random.default_rng(0)
    for _ in range(200):
        a, b = sorted(rng.integers(0, 1501, size=2))
        np.testing.assert_array_equal(reader.features_rows(int(a), int(b)), full[a:b])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rechunked_compressed_copy_is_read_through_the_library(tmp_path, backend):
    """A third party's re-chunked, compressed copy stays readable (fallback path)."""
    dim = 6
    images = make_images(2, [3, 0, 4, 2], dim)
    write_set(tmp_path / "a", images, backend=backend, dim=dim)
    src = tmp_path / "a" / shard_name(0, 1, backend)
    dst_dir = tmp_path / "b"
    dst_dir.mkdir()
    dst = dst_dir / src.name
    raw = plain_read(src)
    if backend == "hdf5":
        with h5py.File(dst, "w") as f:
            for k, v in raw.items():
                if k == "attrs":
                    f.attrs.update(v)
                elif k == "image_ids":
                    f.create_dataset(k, data=v, dtype=h5py.string_dtype())
                else:
                    f.create_dataset(k, data=v, chunks=True, compression="gzip")
    else:
        g = zarr.open_group(str(dst), mode="w")
        g.attrs.update(raw["attrs"])
        for k, v in raw.items():
            if k == "attrs":
                continue
            if k == "image_ids":
                g.create_array(k, shape=(len(v),), dtype=str)[...] = np.array(v, dtype=object)
            else:
                g.create_array(k, shape=v.shape, dtype=v.dtype, chunks=(2,) + v.shape[1:])[...] = v
    reader = ShardReader(dst)
    assert type(reader.data.rows).__name__ == "LibraryRows"
    for got, im in zip(reader, images):
        assert_image_equal(got, im, "float16")


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_after_exception_drops_pending_and_equals_uninterrupted(tmp_path, backend):
    dim = 5
    images = make_images(3, [2, 0, 3, 1, 4, 2, 2, 5], dim)
    write_set(tmp_path / "ref", images, backend=backend, dim=dim)

    d = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        with ShardWriter(d, 0, 1, backend=backend, feature_dim=dim, commit_every=3) as w:
            for im in images[:5]:  # 3 committed automatically, 2 pending
                w.append(**im)
            raise KeyboardInterrupt
    with ShardWriter(d, 0, 1, backend=backend, feature_dim=dim, commit_every=3) as w:
        assert w.committed_ids == [im["image_id"] for im in images[:3]]
        assert w.num_committed == 3
        for im in images:
            if im["image_id"] not in w.committed_ids:
                w.append(**im)
        w.finalize()
    ref, got = plain_read(tmp_path / "ref" / shard_name(0, 1, backend)), plain_read(
        d / shard_name(0, 1, backend))
    for k in ref:
        if k != "attrs":
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(ref[k]), err_msg=k)
    digest = lambda p: read_manifest(p)["shards"][0]["digest"]
    assert digest(d) == digest(tmp_path / "ref")
    assert not (d / (shard_name(0, 1, backend) + ".partial")).exists()
    assert not (d / (shard_name(0, 1, backend) + ".lock")).exists()


def test_resume_with_other_options_is_refused(tmp_path):
    with ShardWriter(tmp_path, 0, 1, feature_dim=4) as w:
        w.append(**make_images(0, [2], 4)[0])
    with pytest.raises(RegionSetError, match="feature_dim=4.*feature_dim=8"):
        ShardWriter(tmp_path, 0, 1, feature_dim=8)


def test_complete_shard_reopens_finished_and_rerecords_manifest(tmp_path):
    images = make_images(0, [1, 2], 3)
    with ShardWriter(tmp_path, 0, 1, feature_dim=3) as w:
        for im in images:
            w.append(**im)
        w.add_failure("broken.jpg", "cannot decode")
        info = w.finalize()
    (tmp_path / "manifest.json").unlink()  # as if killed between rename and manifest update
    with ShardWriter(tmp_path, 0, 1, feature_dim=3) as w:
        assert w.complete and w.committed_ids == [im["image_id"] for im in images]
        assert w.failed_ids == ["broken.jpg"]
        with pytest.raises(RegionSetError, match="already complete"):
            w.append(**images[0])
        again = w.finalize()
    assert again == info
    m = read_manifest(tmp_path)
    assert m["shards"] == [info]
    assert m["failures"] == [{"image_id": "broken.jpg", "reason": "cannot decode", "shard": 0}]


def test_append_rejects_bad_input(tmp_path):
    im = make_images(0, [3], 4)[0]
    with ShardWriter(tmp_path, 0, 1, feature_dim=4) as w:
        w.append(**im)
        with pytest.raises(RegionSetError, match="already in shard"):
            w.append(**im)
        bad = dict(im, image_id="x", features=np.zeros((3, 5)))
        with pytest.raises(ValueError, match=r"features must have shape \(n, 4\)"):
            w.append(**bad)
        with pytest.raises(ValueError, match="3 boxes but 2 scores"):
            w.append(**dict(im, image_id="y", scores=np.zeros(2)))
        with pytest.raises(ValueError, match="without NUL"):
            w.append(**dict(im, image_id="a\0b"))
        with pytest.raises(ValueError, match="image_digest must be 16 bytes"):
            w.append(**dict(im, image_id="z", image_digest=b"abc"))


_HOLDER = textwrap.dedent("""
    import sys
    from vlkd.common.regionset import ShardWriter
    w = ShardWriter(sys.argv[1], 2, 4, backend=sys.argv[2], feature_dim=4)
    print("locked", flush=True)
    sys.stdin.read()
""")


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_live_writer_refused_then_dead_writers_lock_taken_over(tmp_path, backend):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path), backend],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(ShardLockedError) as err:
            ShardWriter(tmp_path, 2, 4, backend=backend, feature_dim=4)
        assert err.value.holder["pid"] == proc.pid
        assert f"pid {proc.pid}" in str(err.value)
        assert f"host {socket.gethostname()}" in str(err.value)
        assert "(alive)" in str(err.value)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lock = tmp_path / (shard_name(2, 4, backend) + ".lock")
    assert json.loads(lock.read_text())["pid"] == proc.pid  # stale lock left by the dead writer
    with ShardWriter(tmp_path, 2, 4, backend=backend, feature_dim=4) as w:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        w.finalize()
    assert not lock.exists()


def _finalize_worker(set_dir, index, barrier):
    images = make_images(index, [2, 1], 4, prefix=f"s{index}")
    w = ShardWriter(set_dir, index, 4, backend="zarr", feature_dim=4)
    for im in images:
        w.append(**im)
    barrier.wait()
    w.finalize()
    for _ in range(40):  # hammer the manifest lock: lost updates would show in the counter
        update_manifest(set_dir, lambda m: m.update(counter=m.get("counter", 0) + 1))


def test_concurrent_finalisations_keep_every_manifest_entry(tmp_path):
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_finalize_worker, args=(str(tmp_path), i, barrier))
             for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    m = read_manifest(tmp_path)
    assert [e["index"] for e in m["shards"]] == [0, 1, 2, 3]
    assert m["counter"] == 160
    assert len(RegionSet(tmp_path)) == 8
    # the digest is of the canonical JSON, independent of formatting
    canonical = json.dumps(m, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert manifest_digest(tmp_path) == hashlib.blake2b(canonical.encode(),
                                                        digest_size=16).hexdigest()


class _ShardedIterable:
    """Minimal IterableDataset over a RegionSet, images split round-robin by worker."""

    def __new__(cls, path):
        import torch.utils.data as tud

        class DS(tud.IterableDataset):
            def __init__(self):
                self.rs = RegionSet(path)

            def __iter__(self):
                info = tud.get_worker_info()
                k, n = (info.id, info.num_workers) if info else (0, 1)
                pos = 0
                for shard in self.rs.shards:
                    for i in range(len(shard)):
                        if pos % n == k:
                            r = shard.read(i)
                            checksum = float(r.features.astype(np.float64).sum())
                            yield r.image_id, checksum, os.getpid()
                        pos += 1
        return DS()


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
@pytest.mark.parametrize("backend", BACKENDS)
def test_four_dataloader_workers_yield_every_image_once(tmp_path, backend):
    import torch
    torch.set_num_threads(1)
    dim = 8
    images = make_images(5, [i % 6 for i in range(60)], dim)
    write_set(tmp_path, images, backend=backend, dim=dim, num_shards=3)
    ds = _ShardedIterable(tmp_path)
    ds.rs.get(images[0]["image_id"])  # parent has the shard open before the fork
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=4,
                                         multiprocessing_context="fork")
    got = list(loader)
    ids = [g[0] for g in got]
    assert sorted(ids) == sorted(im["image_id"] for im in images)
    assert len(set(ids)) == len(ids)
    assert len({g[2] for g in got}) == 4 and os.getpid() not in {g[2] for g in got}
    sums = {im["image_id"]: float(im["features"].astype(np.float64).sum()) for im in images}
    for image_id, s, _ in got:
        assert s == sums[image_id]


@pytest.mark.parametrize("backend", BACKENDS)
def test_format_doc_snippets_read_a_real_set(tmp_path, backend):
    """The plain-h5py / plain-zarr snippets in docs/FORMAT.md run against a written set."""
    import re
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md").read_text()
    title = "## Reading with plain h5py" if backend == "hdf5" else "## Reading with plain zarr"
    section = doc[doc.index(title):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'set_dir = "path/to/set"' in code
    images = make_images(9, [4, 0, 3], 8)
    write_set(tmp_path, images, backend=backend, dim=8)
    scope = {}
    exec(code.replace('"path/to/set"', repr(str(tmp_path))), scope)
    np.testing.assert_array_equal(scope["features"], images[-1]["features"])
    np.testing.assert_array_equal(scope["boxes"], images[-1]["boxes"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_get_many_equals_get_in_the_order_asked(tmp_path, backend):
    """A batch read by id returns, in the order asked, what one read per id returns, across
    shards, with repeats and empty images; its features share one array."""
    import vlkd.common.staging as rsmod  # small zarr chunks: reads straddle chunk files
    images = make_images(3, [4, 0, 7, 1, 30, 2, 5, 9, 0, 3] * 3, 8)
    old = (rsmod.ZARR_INNER_CHUNK_BYTES, rsmod.ZARR_INNER_CHUNKS_PER_SHARD)
    rsmod.ZARR_INNER_CHUNK_BYTES, rsmod.ZARR_INNER_CHUNKS_PER_SHARD = 5 * 8 * 2, 3
    try:
        write_set(tmp_path, images, backend=backend, dim=8, num_shards=3)
    finally:
        rsmod.ZARR_INNER_CHUNK_BYTES, rsmod.ZARR_INNER_CHUNKS_PER_SHARD = old
    rs = RegionSet(tmp_path)
    rng = np.random.default_rng(0)
    ids = [images[i]["image_id"] for i in rng.integers(0, len(images), 40)] + \
        [images[1]["image_id"], images[4]["image_id"], images[4]["image_id"]]
    got = rs.get_many(ids)
    assert [g.image_id for g in got] == ids
    by_id = {im["image_id"]: im for im in images}
    for g in got:
        one = rs.get(g.image_id)
        want = by_id[g.image_id]
        np.testing.assert_array_equal(g.features, want["features"])
        np.testing.assert_array_equal(g.features, one.features)
        for name in ("boxes", "scores", "classes"):
            np.testing.assert_array_equal(getattr(g, name), getattr(one, name))
        assert (g.box_digest, g.image_digest, g.image_hw) == \
            (one.box_digest, one.image_digest, one.image_hw)
    bases = {id(g.features.base) for g in got if g.num_regions}
    assert len(bases) == 1  # one feature array for the whole batch
    with pytest.raises(KeyError, match="'nope' is not in region set"):
        rs.get_many([ids[0], "nope"])
    assert rs.get_many([]) == []


def test_released_maps_drop_their_views_and_a_fork_reads_its_own(tmp_path):
    """release_maps forgets the cached views (so pages can be unmapped); a forked child, which
    inherits the parent's caches, maps the files itself and reads the same rows."""
    from vlkd.common import fast_rows

    images = make_images(4, [6, 3, 8], 8)
    write_set(tmp_path, images, backend="hdf5", dim=8)
    rs = RegionSet(tmp_path)
    first = rs.get(images[2]["image_id"]).features
    path = str(rs.shards[0].path)
    assert any(k[0] == path for k in fast_rows._VIEWS)
    rs.shards[0].release_maps()
    assert not any(k[0] == path for k in fast_rows._VIEWS)
    np.testing.assert_array_equal(rs.get(images[2]["image_id"]).features, first)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: its caches start empty, then it reads
        ok = not fast_rows._VIEWS and np.array_equal(rs.get(images[2]["image_id"]).features,
                                                      images[2]["features"])
        os.write(w, b"1" if ok else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(r, 1) == b"1"


@pytest.mark.parametrize("backend", BACKENDS)
def test_optional_arrays_round_trip_and_enter_the_digest(tmp_path, backend):
    """Optional per-region arrays (attributes) are stored as declared, read back per image,
    covered by the content digest (fed after the features, sorted by name: computed here from
    the FORMAT.md definition), and checked by validate; a set without them keeps its digest."""
    from vlkd.common.validate import validate_region_set

    spec = {"attr_scores": ("float32", 3), "attr_ids": ("int32", 3)}
    images = make_images(5, [3, 0, 5], 8)
    rng = np.random.default_rng(9)
    for im in images:
        n = len(im["boxes"])
        im["extras"] = {"attr_ids": rng.integers(-1, 524, (n, 3)).astype(np.int32),
                        "attr_scores": rng.uniform(0, 1, (n, 3)).astype(np.float32)}
    with ShardWriter(tmp_path / "a", 0, 1, backend=backend, feature_dim=8, extras=spec) as w:
        for im in images:
            w.append(**im)
        w.finalize()
    rs = RegionSet(tmp_path / "a")
    assert rs.extras == {"attr_ids": ["int32", 3], "attr_scores": ["float32", 3]}
    for im in images:
        got = rs.get(im["image_id"])
        for name in spec:
            np.testing.assert_array_equal(got.extras[name], im["extras"][name])
            assert got.extras[name].dtype == np.dtype(spec[name][0])
    # the digest by the spec: required arrays, features, then attr_ids, attr_scores
    base = [dict((k, v) for k, v in im.items() if k != "extras") for im in images]
    ref = reference_digest(base, "float16")
    entry = read_manifest(tmp_path / "a")["shards"][0]
    assert entry["digest"] != ref  # the optional arrays enter it
    assert entry["digest"] == reference_digest(images, "float16",
                                               {k: dt for k, (dt, _) in spec.items()})
    assert validate_region_set(tmp_path / "a") == []
    # a set without optional arrays: the schema-1 digest, and records have none
    with ShardWriter(tmp_path / "b", 0, 1, backend=backend, feature_dim=8) as w:
        for im in base:
            w.append(**im)
        w.finalize()
    assert read_manifest(tmp_path / "b")["shards"][0]["digest"] == ref
    assert dict(RegionSet(tmp_path / "b").get(images[0]["image_id"]).extras) == {}
    assert "extras" not in read_manifest(tmp_path / "b")


def test_optional_arrays_are_refused_when_wrong(tmp_path):
    spec = {"attr_ids": ("int32", 2)}
    images = make_images(6, [2, 3], 4)
    with ShardWriter(tmp_path, 0, 2, feature_dim=4, extras=spec) as w:
        with pytest.raises(ValueError, match=r"optional arrays are \['attr_ids'\], got none"):
            w.append(**images[0])
        with pytest.raises(ValueError, match=r"attr_ids must have shape \(2, 2\)"):
            w.append(**images[0], extras={"attr_ids": np.zeros((2, 3), np.int32)})
        with pytest.raises(ValueError, match="must hold integers"):
            w.append(**images[0], extras={"attr_ids": np.zeros((2, 2), np.float32)})
        w.append(**images[0], extras={"attr_ids": np.zeros((2, 2), np.int32)})
        w.finalize()
    with pytest.raises(ValueError, match="lower-case identifier"):
        ShardWriter(tmp_path / "x", 0, 1, feature_dim=4, extras={"boxes": ("int32", 1)})
    with pytest.raises(ValueError, match="dtype float64 is not one of"):
        ShardWriter(tmp_path / "x", 0, 1, feature_dim=4, extras={"a": ("float64", 1)})
    # shard 1 of the same set without them: the manifest refuses the mix
    with ShardWriter(tmp_path, 1, 2, feature_dim=4) as w:
        w.append(**images[1])
        with pytest.raises(RegionSetError, match="declares optional arrays"):
            w.finalize()


def test_validate_reports_damaged_optional_arrays(tmp_path):
    from vlkd.common.validate import validate_region_set

    images = make_images(7, [3, 2], 4)
    with ShardWriter(tmp_path, 0, 1, feature_dim=4, extras={"attr_scores": ("float32", 2)}) as w:
        for im in images:
            w.append(**im, extras={"attr_scores": np.ones((len(im["boxes"]), 2), np.float32)})
        w.finalize()
    path = tmp_path / shard_name(0, 1, "hdf5")
    with h5py.File(path, "r+") as f:
        a = f["attr_scores"][()]
        a[4, 1] = np.nan
        f["attr_scores"][...] = a
    found = [str(x) for x in validate_region_set(tmp_path)]
    assert any("optional array attr_scores row 4 is not finite" in x and "[image 1 " in x
               for x in found), found
    assert any("content digest" in x for x in found), found
    with h5py.File(path, "r+") as f:
        del f["attr_scores"]
    found = [str(x) for x in validate_region_set(tmp_path)]
    assert any("optional array 'attr_scores' is declared in the manifest's extras but missing"
               in x for x in found), found
