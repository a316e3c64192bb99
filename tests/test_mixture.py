"""MixedStream: several corpora in one stream, each with a sampling weight: exact quotas per
epoch, every batch in the weights' proportion, corpora cycled without repeats, one corpus equal
to the plain stream, and exact resumption mid-epoch (with and without DataLoader workers)."""
from __future__ import annotations

from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from train_data import scenes, write_sets
from vlkd.train.mixture import MixedStream, apportion, corpus_seed
from vlkd.train.stream import Record, RegionStream, make_loader

SIZES = {"big": 23, "mid": 9, "small": 4}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    out = {}
    for k, (name, n) in enumerate(SIZES.items()):
        student, _ = write_sets(root / name, scenes(n, seed=k), teacher=False, num_shards=2)
        out[name] = student
    return out


def _item(sample):
    return {"image": sample.record.image_id, "mask": int(sample.rng.integers(1 << 30))}


def _collate(items):
    return {"images": [it["image"] for it in items], "masks": [it["mask"] for it in items]}


def _streams(sets, names, *, batch=4, workers=0, rank=0, world=1, seed=7):
    out = []
    for i, name in enumerate(names):
        records = [Record(f"{name}-{im}-{j}", im) for im in
                   [str(1000 + x) for x in range(SIZES[name])] for j in range(2 if name == "mid"
                                                                              else 1)]
        out.append(RegionStream(sets[name], records, transform=_item, collate=_collate,
                                batch_size=batch, seed=corpus_seed(seed, i), chunk_size=3,
                                shuffle_buffer=5, num_workers=workers, rank=rank,
                                world_size=world))
    return out


def _mixed(sets, weights, **kw):
    names = list(weights)
    return MixedStream(_streams(sets, names, **kw), list(weights.values()), names,
                       collate=_collate, seed=kw.get("seed", 7))


def test_apportion_is_exact_largest_remainder():
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]                 # a tie goes to the first
    assert apportion(45, [3, 1, 1]) == [27, 9, 9]
    assert apportion(7, [0.5, 0.25, 0.25]) == [3, 2, 2]           # 3.5, 1.75, 1.75
    q = apportion(1000, [0.1, 0.2, 0.7])                         # no float drift: 100/200/700
    assert q == [100, 200, 700]
    for total, w in [(13, [2, 5, 1.5]), (1, [1, 1]), (0, [3])]:
        q = apportion(total, w)
        assert sum(q) == total
        assert all(abs(qi - Fraction(total) * Fraction(wi) / sum(map(Fraction, w))) < 1
                   for qi, wi in zip(q, w))
    for bad in ([], [1, 0], [1, -2], [float("nan")]):
        with pytest.raises(ValueError, match="weights must be finite and > 0"):
            apportion(5, bad)


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 2)])
def test_each_epoch_holds_every_corpus_share_and_corpora_cycle(sets, world, workers):
    weights = {"big": 1.0, "mid": 2.0, "small": 1.0}
    rank_streams = [_mixed(sets, weights, workers=workers, rank=r, world=world)
                    for r in range(world)]
    mix = rank_streams[0]
    total = sum(s.num_samples for s in mix.streams)        # 23 + 18 + 4
    assert mix.num_samples == total and mix.quotas == apportion(total, [1, 2, 1]) == [11, 23, 11]
    seen: dict[str, list[str]] = {n: [] for n in weights}
    for epoch in range(4):
        counts = Counter()
        for r, s in enumerate(rank_streams):
            for w in range(s.workers):
                refs = list(s.iter_refs(epoch, r, w))
                assert len(refs) == sum(s.slot_counts(r, w)) == s.slot_samples(r)[w]
                order = s.schedule(epoch, r, w)
                # every prefix (every batch boundary) holds each corpus in proportion, +-1
                c = np.array(s.slot_counts(r, w), float)
                for m in range(1, len(order) + 1):
                    have = np.bincount(order[:m], minlength=3)
                    assert np.all(np.abs(have - m * c / c.sum()) < 1 + 1e-9)
                for name, image, key in refs:
                    counts[name] += 1
                    seen[name].append(key)
        assert [counts[n] for n in weights] == mix.quotas   # exactly the quotas, every epoch
    # each corpus is read through (every record once) before any record comes back
    for i, name in enumerate(weights):
        keys = seen[name]
        n = mix.sizes[i]
        for start in range(0, len(keys) - n + 1, n):
            assert len(set(keys[start:start + n])) == n, name
    # small (4 samples, quota 11) was read almost 3 times an epoch, each time in a new order
    small = seen["small"]
    assert small[:4] != small[4:8] or small[4:8] != small[8:12]


def test_one_corpus_is_the_plain_stream(sets):
    for world, workers in [(1, 1), (2, 2)]:
        for r in range(world):
            plain = _streams(sets, ["mid"], workers=workers, rank=r, world=world)[0]
            mix = _mixed(sets, {"mid": 5.0}, workers=workers, rank=r, world=world)
            for epoch in range(2):
                for w in range(max(1, workers)):
                    want = list(plain.iter_refs(epoch, r, w))
                    got = [(i, k) for _, i, k in mix.iter_refs(epoch, r, w)]
                    assert got == want
    # and the batches themselves (features read, per-sample generators drawn)
    plain = _streams(sets, ["mid"], workers=0)[0]
    mix = _mixed(sets, {"mid": 1.0}, workers=0)
    plain.set_epoch(1)
    mix.set_epoch(1)
    a, b = list(make_loader(plain)), list(make_loader(mix))
    assert [x["masks"] for x in a] == [x["masks"] for x in b]
    assert [x["keys"] for x in a] == [[k.split("/", 1)[1] for k in x["keys"]] for x in b]
    assert all(set(x["corpora"]) == {"mid"} for x in b)


def _epoch_batches(mix, epoch, skip=0):
    mix.set_epoch(epoch, skip)
    return [(x["keys"], x["masks"]) for x in make_loader(mix)]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_epoch_continues_sample_for_sample(sets, workers):
    mix = _mixed(sets, {"big": 1.0, "mid": 1.0, "small": 3.0}, workers=workers, batch=3)
    full = _epoch_batches(mix, 2)
    assert len(full) == len(mix) and sum(len(k) for k, _ in full) == mix.num_samples
    for skip in (1, len(full) // 2, len(full) - 1):
        assert _epoch_batches(mix, 2, skip) == full[skip:]
    again = _mixed(sets, {"big": 1.0, "mid": 1.0, "small": 3.0}, workers=workers, batch=3)
    assert _epoch_batches(again, 2) == full                 # deterministic
    other = _mixed(sets, {"big": 1.0, "mid": 1.0, "small": 3.0}, workers=workers, batch=3,
                   seed=8)
    assert _epoch_batches(other, 2) != full


def test_corpora_must_agree_on_the_loader_layout(sets):
    a = _streams(sets, ["big"], batch=4)[0]
    b = _streams(sets, ["mid"], batch=5)[0]
    with pytest.raises(ValueError, match="batch_size"):
        MixedStream([a, b], [1, 1], ["big", "mid"], collate=_collate, seed=0)
    with pytest.raises(ValueError, match="names must differ"):
        MixedStream([a, a], [1, 1], ["x", "x"], collate=_collate, seed=0)
    mix = MixedStream([a], [1], ["big"], collate=_collate, seed=0, epoch_samples=10)
    assert mix.num_samples == 10 and mix.layout() == {"corpora": [["big", 23, 10]]}
