"""Several corpora in one training stream, each with a sampling weight (``data.corpora``).

A :class:`MixedStream` composes one :class:`~vlkd.train.stream.RegionStream` per corpus (its
region sets and text records) and reads them through the streams' own machinery (shard and
chunk permutations, shuffle buffer, per-sample generators), so everything
``docs/TRAIN.md`` says about one stream holds for each corpus. What it adds is which corpus
each sample comes from, derived from the seed and the epoch alone:

1. **Quotas.** An epoch has ``T`` samples (default: the corpora's sizes summed). Corpus i
   contributes exactly ``q_i`` of them, the largest-remainder apportionment of ``T`` by the
   weights (:func:`apportion`): ``q_i`` is ``T·w_i/Σw`` rounded so that the quotas sum to T.
2. **Cycling.** Each corpus is an endless sequence of its own epochs (its permutation of
   epoch k drawn from its seed and k). Mixed epoch e takes positions ``[e·q_i, (e+1)·q_i)``
   of corpus i's sequence: a corpus with a quota above its size is read more than once per
   mixed epoch (each pass in another order, with other masks), one below its size is read
   partly, and no sample is read twice before its corpus has been read through.
3. **Split.** Each corpus's share of the epoch is split between ranks and DataLoader workers as
   one stream splits its epoch (contiguous, balanced ranges: rank, then worker).
4. **Interleave.** A worker with ``c_i`` samples of corpus i (S in all) emits next a sample of
   the corpus furthest behind its share: after m samples, the one with the largest
   ``(m+1)·c_i/S - emitted_i`` (ties in an order drawn from (seed, epoch, rank, worker)).
   Every prefix of the worker's sequence, so every batch, then holds each corpus's share to
   within one sample (``tests/test_mixture.py`` checks every prefix).
5. **Resume.** A resumed run knows the batches a rank consumed (the trainer's data position);
   :func:`~vlkd.train.stream.worker_skips` gives each worker's share, the worker replays its
   interleave on sample counts alone to know how many samples of each corpus it had emitted,
   and each corpus stream skips that many without reading features. The continuation is the
   uninterrupted run's, sample for sample.

Corpus i's stream is seeded with :func:`corpus_seed` (``seed`` itself for the first), so a
mixture of one corpus is exactly the plain stream. Every corpus must give the model the same
inputs: one feature width, one teacher feature width, one tag class list. Memory: a worker
holds one stream's state per corpus (its open shard and shuffle buffer).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction

import numpy as np
from torch.utils.data import IterableDataset

from .stream import EpochGeometry, RegionStream, split_range

log = logging.getLogger(__name__)

__all__ = ["MixedStream", "apportion", "corpus_seed"]


def corpus_seed(seed: int, index: int) -> int:
    """The seed of corpus ``index``'s stream: ``seed`` for the first, distinct for the others
    (so two corpora never share shard orders or masking draws)."""
    return int(seed) + 1_000_003 * int(index)


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` split into integers proportional to ``weights`` (largest remainder).

    Each share is ``floor(total·w_i/Σw)``; the samples left over go one each to the largest
    remainders (ties: the earlier corpus). Exact rational arithmetic, so the result does not
    depend on float rounding.

    Raises:
        ValueError: a weight is not > 0, or there are none.
    """
    if not weights or any(not (float(w) > 0) or not math.isfinite(float(w)) for w in weights):
        raise ValueError(f"corpus weights must be finite and > 0, got {list(weights)}")
    fr = [Fraction(float(w)) for w in weights]
    exact = [Fraction(int(total)) * w / sum(fr) for w in fr]
    out = [math.floor(x) for x in exact]
    rest = int(total) - sum(out)
    order = sorted(range(len(fr)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[:rest]:
        out[i] += 1
    return out


class MixedStream(EpochGeometry, IterableDataset):
    """Batches drawn from several corpus streams by weight; see the module docstring.

    Args:
        streams: One :class:`~vlkd.train.stream.RegionStream` per corpus, built with the same
            batch size, worker count, rank and world size, each seeded with
            :func:`corpus_seed`; only their per-sample machinery is used.
        weights: Sampling weight per corpus (> 0).
        names: Name per corpus: sample keys become ``<name>/<key>``.
        collate: ``list[dict] -> dict`` batch builder (the task's).
        seed: The run's seed (the interleaving; the DataLoader's generator).
        epoch_samples: Samples per epoch (0: the corpora's sizes summed).
    """

    def __init__(self, streams: Sequence[RegionStream], weights: Sequence[float],
                 names: Sequence[str], *, collate: Callable[[list[dict]], dict], seed: int,
                 epoch_samples: int = 0):
        super().__init__()
        if not streams or len(streams) != len(weights) or len(streams) != len(names):
            raise ValueError(f"MixedStream: {len(streams)} streams, {len(weights)} weights and "
                             f"{len(names)} names; give one of each per corpus")
        if len(set(names)) != len(names):
            raise ValueError(f"MixedStream: corpus names must differ, got {list(names)}")
        first = streams[0]
        for name, s in zip(names, streams):
            same = {"batch_size": (s.batch_size, first.batch_size),
                    "num_workers": (s.num_workers, first.num_workers),
                    "rank": (s.rank, first.rank), "world_size": (s.world_size, first.world_size)}
            bad = {k: v for k, v in same.items() if v[0] != v[1]}
            if bad:
                raise ValueError(f"MixedStream: corpus {name!r} was built with other "
                                 f"{sorted(bad)} than {names[0]!r}: {bad}")
        self.streams, self.names = list(streams), [str(n) for n in names]
        self.weights = [float(w) for w in weights]
        self.collate, self.seed = collate, int(seed)
        self.batch_size, self.num_workers = first.batch_size, first.num_workers
        self.rank, self.world_size = first.rank, first.world_size
        self.chunk_size, self.shuffle_buffer = first.chunk_size, first.shuffle_buffer
        self.class_names = first.class_names
        self.sizes = [s.num_samples for s in self.streams]
        self.num_samples = int(epoch_samples) or sum(self.sizes)
        self.quotas = apportion(self.num_samples, self.weights)
        self.missing_images = sum(s.missing_images for s in self.streams)
        for name, q, w in zip(self.names, self.quotas, self.weights):
            if q == 0:
                log.warning("corpus %s (weight %g) gets no sample of the %d an epoch has; raise "
                            "its weight or the epoch size", name, w, self.num_samples)
        self.epoch = 0
        self._skip_batches = 0

    # ---- what a checkpoint must match (Trainer._data_layout)
    def layout(self) -> dict:
        """The mixture's part of the data layout: per corpus (name, size, quota)."""
        return {"corpora": [[n, s, q] for n, s, q in zip(self.names, self.sizes, self.quotas)]}

    # ---- epoch geometry (the rest: EpochGeometry)
    def _ranges(self, i: int, rank: int, worker: int) -> tuple[int, int]:
        """The slot's contiguous range of corpus i's share of an epoch (offsets in 0..q_i)."""
        lo, hi = split_range(self.quotas[i], self.world_size, rank)
        a, b = split_range(hi - lo, self.workers, worker)
        return lo + a, lo + b

    def slot_counts(self, rank: int | None = None, worker: int = 0) -> list[int]:
        """Samples of each corpus a worker of ``rank`` emits per epoch."""
        rank = self.rank if rank is None else rank
        return [b - a for a, b in (self._ranges(i, rank, worker)
                                   for i in range(len(self.streams)))]

    def slot_samples(self, rank: int | None = None) -> list[int]:
        """Samples of each worker of ``rank`` per epoch."""
        return [sum(self.slot_counts(rank, w)) for w in range(self.workers)]

    # ---- the order
    def schedule(self, epoch: int, rank: int, worker: int) -> np.ndarray:
        """(S,) corpus index of each sample a worker emits in an epoch, in order: the corpus
        furthest behind its share first (see the module docstring)."""
        counts = self.slot_counts(rank, worker)
        total = sum(counts)
        tie = np.random.default_rng([self.seed, epoch, rank, worker, 0x313]).permutation(
            len(counts)).tolist()
        order = sorted(range(len(counts)), key=lambda i: tie[i])  # tie-break order
        out = np.empty(total, dtype=np.int64)
        emitted = [0] * len(counts)
        for m in range(total):
            best, gap = -1, 0.0
            for i in order:
                if emitted[i] < counts[i]:
                    d = (m + 1) * counts[i] / total - emitted[i]
                    if best < 0 or d > gap:
                        best, gap = i, d
            out[m] = best
            emitted[best] += 1
        return out

    def pieces(self, i: int, epoch: int, rank: int, worker: int) -> list[tuple[int, int, int]]:
        """(corpus epoch, lo, hi) ranges of corpus i's own epochs that a worker reads in mixed
        epoch ``epoch``: its share of positions ``[epoch·q_i, (epoch+1)·q_i)`` of the corpus's
        endless sequence, cut at the corpus's epoch boundaries."""
        n = self.sizes[i]
        a, b = self._ranges(i, rank, worker)
        p0, p1 = epoch * self.quotas[i] + a, epoch * self.quotas[i] + b
        out = []
        while p0 < p1:
            k = p0 // n
            end = min(p1, (k + 1) * n)
            out.append((k, p0 - k * n, end - k * n))
            p0 = end
        return out

    def _corpus_items(self, i: int, epoch: int, rank: int, worker: int,
                      skip: int) -> Iterator[dict]:
        stream = self.streams[i]
        for k, lo, hi in self.pieces(i, epoch, rank, worker):
            take = min(skip, hi - lo)
            skip -= take
            if take < hi - lo:
                yield from stream.samples_between(k, lo, hi, skip=take, worker=worker)

    def iter_refs(self, epoch: int, rank: int, worker: int) -> Iterator[tuple[str, str, str]]:
        """(corpus name, image id, record key) of every sample a worker emits in an epoch, in
        order, without reading features (for tests and diagnostics)."""
        def refs(i):
            for k, lo, hi in self.pieces(i, epoch, rank, worker):
                yield from self.streams[i].refs_between(k, lo, hi, rank, worker)
        its = [refs(i) for i in range(len(self.streams))]
        for src in self.schedule(epoch, rank, worker).tolist():
            iid, key = next(its[src])
            yield self.names[src], iid, key

    # ---- iteration
    def __iter__(self) -> Iterator[dict]:
        worker, done = self._worker_slot()
        order = self.schedule(self.epoch, self.rank, worker)
        skip = min(done * self.batch_size, order.size)
        done = np.bincount(order[:skip], minlength=len(self.streams))
        its = [self._corpus_items(i, self.epoch, self.rank, worker, int(done[i]))
               for i in range(len(self.streams))]
        batch: list[dict] = []
        try:
            for src in order[skip:].tolist():
                item = next(its[src])
                item["key"] = f"{self.names[src]}/{item['key']}"
                item["corpus"] = self.names[src]
                batch.append(item)
                if len(batch) == self.batch_size:
                    yield self._finish(batch)
                    batch = []
            if batch:
                yield self._finish(batch)
        finally:
            for it in its:  # their shards' memory maps go with them
                it.close()

    def _finish(self, items: list[dict]) -> dict:
        out = self.collate(items)
        out["keys"] = [it["key"] for it in items]
        out["image_ids"] = [it["image_id"] for it in items]
        out["corpora"] = [it["corpus"] for it in items]
        return out
