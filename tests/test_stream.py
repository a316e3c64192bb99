"""The streaming dataset: exact coverage per epoch across ranks and workers, reproducible order,
mid-epoch resumption, stored-dtype features, alignment checks."""
from __future__ import annotations

from collections import Counter

import h5py
import numpy as np
import pytest
import torch

from train_data import scenes, write_sets
from vlkd.common.manifest import update_manifest
from vlkd.train.stream import (AlignmentError, Record, RegionStream, check_alignment,
                               make_loader, split_range, worker_skips)
from vlkd.common.regionset import RegionSet


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    sc = scenes(29, seed=3)
    student, teacher = write_sets(root, sc, num_shards=3)
    # 0-3 records per image (some images have none: they must not be read or counted)
    rng = np.random.default_rng(0)
    records = [Record(f"{im['image_id']}:{j}", im["image_id"], f"text {j}")
               for im in sc for j in range(int(rng.integers(0, 4)))]
    records.append(Record("ghost:0", "not-in-the-set"))  # dropped with a warning
    return {"root": root, "scenes": sc, "student": student, "teacher": teacher,
            "records": records}


def _transform(sample):
    return {"features": sample.regions.features, "teacher": sample.teacher.features
            if sample.teacher is not None else None, "tags": sample.tag_classes,
            "draw": float(sample.rng.random())}


def _collate(items):
    return {"features": [it["features"] for it in items], "teacher": [it["teacher"] for it in items],
            "tags": [it["tags"] for it in items], "draw": [it["draw"] for it in items]}


def _stream(w, **kw):
    args = dict(transform=_transform, collate=_collate, batch_size=3, chunk_size=4,
                shuffle_buffer=5, seed=11, rank=0, world_size=1)
    args.update(kw)
    return RegionStream(w["student"], w["records"], **args)


def _keys(stream):
    out = []
    for b in make_loader(stream):
        out.extend(b["keys"])
    return out


@pytest.mark.parametrize("world_size, workers", [(1, 0), (2, 0), (3, 2)])
def test_epoch_covers_every_sample_exactly_once(world, world_size, workers):
    want = sorted(r.key for r in world["records"] if r.image_id != "not-in-the-set")
    seen = []
    for rank in range(world_size):
        s = _stream(world, rank=rank, world_size=world_size, num_workers=workers)
        assert s.num_samples == len(want)
        for w in range(max(workers, 1)):
            seen.extend(k for _, k in s.iter_refs(epoch=1, rank=rank, worker=w))
    assert sorted(seen) == want
    # balanced: rank sizes differ by at most one sample
    sizes = [sum(_stream(world, rank=r, world_size=world_size).slot_samples()) for r in
             range(world_size)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(want)


def test_real_loader_with_workers_matches_plan(world):
    s = _stream(world, num_workers=2)
    s.set_epoch(2)
    keys = _keys(s)
    assert sorted(keys) == sorted(r.key for r in world["records"] if r.image_id != "not-in-the-set")
    assert len(keys) == len(set(keys))
    # the DataLoader takes worker 0's batch, then worker 1's, ...
    per_worker = [[k for _, k in s.iter_refs(2, 0, w)] for w in range(2)]
    bs = s.batch_size
    batches = [[pw[i:i + bs] for i in range(0, len(pw), bs)] for pw in per_worker]
    expected = []
    for j in range(max(len(b) for b in batches)):
        for b in batches:
            if j < len(b):
                expected.extend(b[j])
    assert keys == expected


def test_order_is_reproducible_and_changes_per_epoch(world):
    a = [k for _, k in _stream(world).iter_refs(0, 0, 0)]
    b = [k for _, k in _stream(world).iter_refs(0, 0, 0)]
    c = [k for _, k in _stream(world).iter_refs(1, 0, 0)]
    d = [k for _, k in _stream(world, seed=12).iter_refs(0, 0, 0)]
    assert a == b and a != c and a != d and sorted(a) == sorted(c)
    plain = [k for _, k in _stream(world, shuffle=False).iter_refs(0, 0, 0)]
    # no shuffle: shard order, image order, record order
    assert plain == sorted(plain, key=lambda k: (int(k.split(":")[0]), int(k.split(":")[1])))


def _round_robin_reference(counts, consumed):
    """Independent simulation of the DataLoader's delivery order."""
    order = []
    j = 0
    while len(order) < sum(counts):
        for w, c in enumerate(counts):
            if j < c:
                order.append(w)
        j += 1
    taken = Counter(order[:consumed])
    nxt = order[consumed] if consumed < len(order) else None
    return [taken[w] for w in range(len(counts))], nxt


@pytest.mark.parametrize("counts", [[3, 3], [2, 4, 1], [5], [0, 2, 2]])
def test_worker_skips_inverts_round_robin(counts):
    for consumed in range(sum(counts) + 1):
        skips, first = worker_skips(counts, consumed)
        ref_skips, ref_next = _round_robin_reference(counts, consumed)
        assert skips == ref_skips
        if ref_next is not None:
            assert first == ref_next


@pytest.mark.parametrize("workers, world_size, rank", [(0, 1, 0), (2, 1, 0), (2, 2, 1)])
def test_resume_mid_epoch_continues_the_same_batches(world, workers, world_size, rank):
    full = _stream(world, num_workers=workers, world_size=world_size, rank=rank)
    full.set_epoch(1)
    ref = list(make_loader(full))
    n = len(ref)
    assert n == full.batches_per_rank()[rank]
    for k in sorted({1, 2, n // 2, n - 1}):
        s = _stream(world, num_workers=workers, world_size=world_size, rank=rank)
        s.set_epoch(1, skip_batches=k)
        got = list(make_loader(s))
        assert [b["keys"] for b in got] == [b["keys"] for b in ref[k:]]
        for b, r in zip(got, ref[k:]):
            assert b["draw"] == r["draw"]  # per-sample generators do not depend on position
            for x, y in zip(b["features"], r["features"]):
                assert torch.equal(torch.as_tensor(x), torch.as_tensor(y))


def test_features_keep_stored_dtype_and_values(world):
    s = _stream(world, teacher_regions=world["teacher"], num_workers=2)
    by_id = {}
    for name in ("student", "teacher"):
        for p in sorted(world[name].glob("shard-*.h5")):
            with h5py.File(p, "r") as f:  # read with plain h5py, not vlkd's reader
                ids = [x.decode() if isinstance(x, bytes) else x for x in f["image_ids"][:]]
                off, feats, cls = f["offsets"][:], f["features"][:], f["classes"][:]
            for i, iid in enumerate(ids):
                by_id.setdefault(iid, {})[name] = (feats[off[i]:off[i + 1]], cls[off[i]:off[i + 1]])
    count = 0
    for b in make_loader(s):
        for iid, f, t, tags in zip(b["image_ids"], b["features"], b["teacher"], b["tags"]):
            assert f.dtype == np.float16 and t.dtype == np.float16  # as stored, not cast
            np.testing.assert_array_equal(f, by_id[iid]["student"][0])
            np.testing.assert_array_equal(t, by_id[iid]["teacher"][0])
            np.testing.assert_array_equal(np.asarray(tags), by_id[iid]["student"][1])
            count += 1
    assert count == s.num_samples


def test_tags_of_a_teacher_set_come_from_its_proposals(world):
    s = RegionStream(world["teacher"], world["records"], transform=_transform, collate=_collate,
                     batch_size=4, rank=0, world_size=1)
    assert s.tags.path == RegionSet(world["student"]).path
    assert s.class_names == RegionSet(world["student"]).class_names  # not the "t-..." names


def test_split_range_is_a_partition():
    for total in (0, 1, 7, 100):
        for parts in (1, 2, 3, 8):
            ranges = [split_range(total, parts, i) for i in range(parts)]
            assert ranges[0][0] == 0 and ranges[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


# ----------------------------------------------------------------------------- alignment
def test_misaligned_boxes_are_refused(tmp_path):
    sc = scenes(10, seed=5)
    student, teacher = write_sets(tmp_path, sc, num_shards=2,
                                  shift_teacher_box=sc[7]["image_id"])
    with pytest.raises(AlignmentError, match=rf"shard 1: boxes of 1 images differ.*'{sc[7]['image_id']}'"
                       r".*re-run `vlkd-extract teacher-features"):
        RegionStream(student, [Record("a", sc[0]["image_id"])], transform=_transform,
                     collate=_collate, batch_size=2, teacher_regions=teacher, rank=0, world_size=1)


def test_teacher_made_from_another_proposals_set_is_refused(tmp_path):
    sc = scenes(8, seed=6)
    student, teacher = write_sets(tmp_path / "a", sc, num_shards=2)
    other, _ = write_sets(tmp_path / "b", scenes(8, seed=7), num_shards=2, teacher=False)
    with pytest.raises(AlignmentError, match="was pooled over the proposals set .* digest"):
        check_alignment(RegionSet(other), RegionSet(teacher))
    with pytest.raises(AlignmentError, match="is a proposals set"):
        check_alignment(RegionSet(student), RegionSet(other))
    update_manifest(teacher, lambda m: {k: v for k, v in m.items() if k != "aligned_to"})
    with pytest.raises(AlignmentError, match="records no 'aligned_to'"):
        check_alignment(RegionSet(student), RegionSet(teacher))


def test_teacher_with_other_images_is_refused(tmp_path):
    sc = scenes(8, seed=8)
    student, teacher = write_sets(tmp_path, sc, num_shards=2)
    # forge the digest so only the per-shard check can catch it: a teacher shard with other ids
    from vlkd.common.regionset import ShardWriter
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(teacher, bad)
    (bad / "shard-00001-of-00002.h5").unlink()
    update_manifest(bad, lambda m: m.update(shards=[s for s in m["shards"] if s["index"] != 1]))
    with ShardWriter(bad, 1, 2, feature_dim=24) as w:
        for im in sc[4:]:
            w.append("x" + im["image_id"], im["hw"], im["boxes"], np.ones(len(im["boxes"])),
                     np.zeros(len(im["boxes"]), np.int32),
                     np.zeros((len(im["boxes"]), 24), np.float32))
        w.finalize()
    with pytest.raises(AlignmentError, match=r"shard 1: .* list different images \(image 0 is "):
        check_alignment(RegionSet(student), RegionSet(bad))
