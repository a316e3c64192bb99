"""Streaming dataset over one or two position-aligned region sets joined with annotations.

How an epoch is read (everything derives from ``seed`` and the epoch number):

1. **Plan** (once, in the launching process): annotation records are grouped by image id and
   looked up in every shard's ``image_ids``; a shard contributes the images that have records.
2. **Chunks**: each shard's annotated images are cut into chunks of ``chunk_size`` consecutive
   images, the unit of shuffling and of locality (a chunk's images are read one after the
   other, in row order). Per epoch the shard order and the chunk order inside each shard are
   permuted.
3. **Split**: the epoch's samples, in chunk order, form one global sequence of T samples. Rank r
   takes the contiguous range ``[r·T/R, (r+1)·T/R)``, and DataLoader worker w of that rank the
   w-th of W equal parts of it. Every sample is seen exactly once per epoch, counts differ by
   at most one between slots, and a slot's sample count does not depend on the epoch.
4. **Shuffle buffer**: a worker pushes its samples through a buffer of ``shuffle_buffer``
   entries (each incoming sample replaces a uniformly chosen one, which is emitted).
5. **Batches** are formed in the worker (so the data position is known exactly) and the
   DataLoader interleaves workers round-robin, skipping exhausted ones; that order is what
   :func:`worker_skips` inverts when a run resumes mid-epoch: each worker replays
   its ordering on sample references alone, without reading features, up to its position.

Memory: a worker holds the shard it is reading (its small arrays and memory map, released when
it moves on), the images that still have samples in the buffer (each with its own feature
array, so a sample pins one image, not a chunk) and the buffer: at most about
``shuffle_buffer`` images' features, flat in the dataset size. Features stay in their stored
dtype (fp16) through workers and collation; the model casts them on the device.

Alignment (teacher/student distillation and teacher adaptation): both models must see the same
sequence -- same tokens, same tags, same boxes in the same order. :func:`check_alignment`
refuses a teacher-features set that was not pooled over this proposals set's boxes.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlkd.common.alignment import TEACHER_ROLE, AlignmentError, require_aligned, short
from vlkd.common.regionset import ImageRegions, RegionSet, ShardReader

log = logging.getLogger(__name__)

__all__ = ["Record", "Sample", "AlignmentError", "check_alignment", "resolve_tag_set",
           "TAG_SOURCES", "tag_attribute_names", "EpochGeometry",
           "RegionStream", "make_loader", "pad_regions", "worker_skips", "split_range"]


@dataclass(frozen=True)
class Record:
    """One annotation sample, joined to its image by ``image_id``.

    Attributes:
        key: Unique id of the sample (caption id, question id, pair line).
        image_id: The region-set key of its image.
        text: Caption, question or pair text ("" for an image-only eval sample).
        answers: VQA soft targets, ``((answer index, score), ...)``.
        text_b: pretrain: the second text in place of the object tags (an Oscar+ QA row's
            answer); "" for the tags.
    """

    key: str
    image_id: str
    text: str = ""
    answers: tuple = ()
    text_b: str = ""


class Sample:
    """What a task transform receives for one record.

    Attributes:
        record: The annotation.
        regions: The image's regions in the trained model's set (features in stored dtype).
        teacher: The same image's regions in the aligned teacher set, or None.
        tag_classes: int32 class indices of the image's tags: with ``tag_source="boxes"``
            one per box of ``regions`` (the tag set's class of that box: the student detector's
            classes), same order; with ``tag_source="image"`` the classes of the tag set's own
            boxes of this image (another detector over the same images), best first.
        tag_attrs: int32 attribute id of each tag (-1: none), or None when attribute tags are
            off.
        rng: A generator seeded from (seed, epoch, shard, image, record): masking and other
            per-sample randomness do not depend on workers, ranks or resumption. Made on first
            use (a generator costs ~30 µs; evaluation never needs one).
    """

    __slots__ = ("record", "regions", "teacher", "tag_classes", "tag_attrs", "tag_source",
                 "_rng", "_seed")

    def __init__(self, record: Record, regions: ImageRegions, teacher: ImageRegions | None,
                 tag_classes: np.ndarray, rng: np.random.Generator | Sequence[int],
                 tag_attrs: np.ndarray | None = None, tag_source: str = "boxes"):
        self.record, self.regions, self.teacher = record, regions, teacher
        self.tag_classes, self.tag_attrs, self.tag_source = tag_classes, tag_attrs, tag_source
        if isinstance(rng, np.random.Generator):
            self._rng, self._seed = rng, None
        else:
            self._rng, self._seed = None, list(rng)

    @property
    def rng(self) -> np.random.Generator:
        if self._rng is None:
            self._rng = np.random.default_rng(self._seed)
        return self._rng

    def tags(self, num_regions: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(classes, attribute ids or None) of the tags that go with the first
        ``num_regions`` regions: box tags follow the kept boxes, image tags are all of the
        image's (the tag sentence is cut to its token budget by the encoder)."""
        if self.tag_source == "image":
            return self.tag_classes, self.tag_attrs
        attrs = None if self.tag_attrs is None else self.tag_attrs[:num_regions]
        return self.tag_classes[:num_regions], attrs


# --------------------------------------------------------------------------------------------
# Alignment
# --------------------------------------------------------------------------------------------

#: Where the object tags come from (see :class:`RegionStream`).
TAG_SOURCES = ("boxes", "image")


def tag_attribute_names(tags: RegionSet) -> list[str]:
    """The attribute names of a tag set that stores attributes (``attr_ids``), for
    "attribute + object" tags; refuses a set without them."""
    names = tags.manifest.get("attribute_names") or []
    if "attr_ids" not in tags.extras or not names:
        raise AlignmentError(
            f"attribute tags need a tag set with stored attributes (its optional attr_ids "
            f"array and attribute_names), but {tags.path} has "
            f"{'no attr_ids' if 'attr_ids' not in tags.extras else 'no attribute_names'}; "
            "extract it with --attributes (a detector with an attribute head, e.g. VinVL's) or "
            "turn data.tag_attributes off")
    return [str(n) for n in names]


def check_alignment(base: RegionSet, other: RegionSet, *, base_name: str = "student regions",
                    other_name: str = "teacher regions") -> None:
    """Refuses ``other`` unless it holds exactly ``base``'s images and boxes, in order.

    ``other`` must be a teacher-features set that records ``base`` in ``aligned_to``; both
    must be complete, and every shard must list the same image ids and box digests
    (:func:`vlkd.common.alignment.require_aligned`, the one implementation of the rule).

    Raises:
        AlignmentError: saying what differs and what to do.
    """
    require_aligned(other.path, base.path, names=(other_name, base_name))


def resolve_tag_set(regions: RegionSet, tag_regions: str | os.PathLike | None = None) -> RegionSet:
    """The set whose box classes give the object tags (the student detector's).

    Args:
        regions: The trained model's set.
        tag_regions: An explicit tag set (must be the proposals set ``regions`` is aligned to,
            or ``regions`` itself).

    Returns:
        ``regions`` itself for a proposals set; else the proposals set it is aligned to.
    """
    if tag_regions:
        tags = RegionSet(tag_regions)
        if Path(tags.path).resolve() == Path(regions.path).resolve():
            return regions
        check_alignment(tags, regions, base_name="tag regions", other_name="regions")
        return tags
    if regions.manifest.get("role") != TEACHER_ROLE:
        return regions
    at = regions.manifest.get("aligned_to") or {}
    path = at.get("path")
    if not path or not (Path(path) / "manifest.json").is_file():
        raise AlignmentError(
            f"regions {regions.path} are teacher features; their object tags must be the student "
            f"detector's classes, read from the proposals set they were pooled over "
            f"({path!r}, not found). Pass data.tag_regions=PROPOSALS_SET (--tag-regions)")
    tags = RegionSet(path)
    check_alignment(tags, regions, base_name="tag regions", other_name="regions")
    return tags


# --------------------------------------------------------------------------------------------
# Splitting and resumption arithmetic
# --------------------------------------------------------------------------------------------

def split_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """The ``index``-th of ``parts`` contiguous, balanced ranges of ``range(total)``."""
    return total * index // parts, total * (index + 1) // parts


def worker_skips(batches_per_worker: Sequence[int], consumed: int) -> tuple[list[int], int]:
    """Where each worker stands after the first ``consumed`` batches of a rank's stream.

    The DataLoader takes batches from workers round-robin (0, 1, ..., W-1, 0, ...) and skips a
    worker once it is exhausted. A resumed DataLoader starts its round-robin at worker 0 again,
    so the stream rotates its workers: DataLoader worker p plays worker ``(p + first) % W``,
    where ``first`` is the worker whose batch came next. Rotating keeps the remaining order
    identical, exhausted workers included.

    Returns:
        (batches already taken from each worker, the worker whose batch is next).
    """
    counts = list(batches_per_worker)
    if not 0 <= consumed <= sum(counts):
        raise ValueError(f"data position {consumed} batches is outside the epoch's 0..{sum(counts)}")
    skips, left, j = [0] * len(counts), consumed, 0
    while left:
        active = [w for w in range(len(counts)) if counts[w] > j]
        if left >= len(active):  # the whole round was delivered
            for w in active:
                skips[w] += 1
            left -= len(active)
            j += 1
            continue
        for w in active[:left]:
            skips[w] += 1
        return skips, active[left]
    active = [w for w in range(len(counts)) if counts[w] > j]
    return skips, (active[0] if active else 0)


# --------------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------------

@dataclass
class _ShardPlan:
    pos: int                    # position in RegionSet.shards
    index: int                  # shard index
    paths: tuple                # (regions, teacher or None, tags or None) shard paths
    counts: np.ndarray          # (N,) int32 records per image
    annotated: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.annotated = np.nonzero(self.counts)[0].astype(np.int64)


def _copy_small(r: ImageRegions) -> ImageRegions:
    # Boxes/classes are views into the shard's arrays; copies let those arrays go with the shard.
    return ImageRegions(image_id=r.image_id, image_hw=r.image_hw, boxes=r.boxes.copy(),
                        scores=r.scores.copy(), classes=r.classes.copy(), features=r.features,
                        box_digest=r.box_digest, image_digest=r.image_digest)


class EpochGeometry:
    """What a stream's epoch looks like from its per-worker sample counts: batches per worker
    and rank, the epoch to read and the batches to skip (a resumed run's data position).
    Shared by :class:`RegionStream` and :class:`~vlkd.train.mixture.MixedStream`, which define
    ``slot_samples(rank)`` and have ``batch_size``, ``num_workers``, ``rank``, ``world_size``."""

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Selects the epoch (its order) and how many of this rank's batches to skip."""
        per_rank = self.batches_per_rank()[self.rank]
        if not 0 <= skip_batches <= per_rank:
            raise ValueError(f"skip_batches {skip_batches} outside 0..{per_rank}")
        self.epoch, self._skip_batches = int(epoch), int(skip_batches)

    @property
    def workers(self) -> int:
        return max(1, self.num_workers)

    def batches_per_worker(self, rank: int | None = None) -> list[int]:
        return [math.ceil(n / self.batch_size) for n in self.slot_samples(rank)]

    def batches_per_rank(self) -> list[int]:
        """Batches every rank yields per epoch (they differ by at most a few)."""
        return [sum(self.batches_per_worker(r)) for r in range(self.world_size)]

    def __len__(self) -> int:
        return self.batches_per_rank()[self.rank]

    def _worker_slot(self) -> tuple[int, int]:
        """(the worker slot this DataLoader worker plays, its batches already consumed): the
        resumed loader's round-robin restarts at worker 0, so the slots rotate (see
        :func:`worker_skips`)."""
        info = get_worker_info()
        worker, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        if nworkers != self.workers:
            raise RuntimeError(f"{type(self).__name__} was built for {self.num_workers} "
                               f"DataLoader workers but runs under {nworkers}; pass the same "
                               "num_workers to both (make_loader does)")
        skips, first = worker_skips(self.batches_per_worker(), self._skip_batches)
        worker = (worker + first) % self.workers
        return worker, skips[worker]


class RegionStream(EpochGeometry, IterableDataset):
    """Batches of task inputs streamed from region sets; see the module docstring.

    Args:
        regions: The trained model's region set (path or :class:`RegionSet`).
        records: Annotation records; those whose image is not in the set are dropped (logged).
        transform: ``Sample -> dict`` (a task's per-sample input builder).
        collate: ``list[dict] -> dict`` batch builder.
        batch_size: Samples per batch.
        teacher_regions: A teacher-features set aligned to ``regions`` (checked), or None.
        tag_regions: Explicit tag set (see :func:`resolve_tag_set`).
        tag_source: ``boxes`` (default): a tag per box of ``regions``, the tag set's class of
            that box (the tag set must be aligned with ``regions``); ``image``: the classes of
            ``tag_regions``' own boxes of each image, matched by image id (any set over the
            same images, e.g. a COCO-trained detector's proposals, as Oscar's VQA recipe uses).
        tag_attributes: "attribute + object" tags (``red car``) from the tag set's stored
            attributes (its optional ``attr_ids`` array and ``attribute_names``).
        shuffle: Permute shards and chunks per epoch and use the shuffle buffer.
        seed: Seeds every permutation, the buffer and the per-sample generators.
        chunk_size: Consecutive images read at once.
        shuffle_buffer: Buffer entries (0 disables the buffer).
        num_workers: The DataLoader's worker count (part of the split, so it must match).
        rank, world_size: DDP rank and size (default: from torch.distributed / env).
    """

    def __init__(self, regions, records: Sequence[Record], *, transform: Callable[[Sample], dict],
                 collate: Callable[[list[dict]], dict], batch_size: int,
                 teacher_regions=None, tag_regions=None, tag_source: str = "boxes",
                 tag_attributes: bool = False, shuffle: bool = True, seed: int = 0,
                 chunk_size: int = 64, shuffle_buffer: int = 1024, num_workers: int = 0,
                 rank: int | None = None, world_size: int | None = None):
        super().__init__()
        if batch_size < 1 or chunk_size < 1 or shuffle_buffer < 0 or num_workers < 0:
            raise ValueError(f"RegionStream: batch_size and chunk_size must be >= 1, "
                             f"shuffle_buffer and num_workers >= 0; got {batch_size}, "
                             f"{chunk_size}, {shuffle_buffer}, {num_workers}")
        self.regions = regions if isinstance(regions, RegionSet) else RegionSet(regions)
        self.teacher = None
        if teacher_regions is not None:
            self.teacher = (teacher_regions if isinstance(teacher_regions, RegionSet)
                            else RegionSet(teacher_regions))
            check_alignment(self.regions, self.teacher)
        if tag_source not in TAG_SOURCES:
            raise ValueError(f"tag_source must be one of {TAG_SOURCES}, got {tag_source!r}")
        self.tag_source, self.tag_attributes = tag_source, bool(tag_attributes)
        if tag_source == "image":
            if not tag_regions:
                raise ValueError("tag_source 'image' takes the tags from another set by image "
                                 "id: pass data.tag_regions=SET (--tag-regions)")
            self.tags = RegionSet(tag_regions)
        else:
            self.tags = resolve_tag_set(self.regions, tag_regions)
        if not self.tags.class_names:
            raise AlignmentError(f"tag set {self.tags.path} has no class_names in its manifest; "
                                 "object tags are the detector's class names")
        self.class_names = list(self.tags.class_names)
        self.attribute_names = tag_attribute_names(self.tags) if self.tag_attributes else []
        if self.regions.missing_shards:
            log.warning("region set %s lacks shards %s of %d: their images are not read",
                        self.regions.path, self.regions.missing_shards, self.regions.num_shards)
        self.transform, self.collate = transform, collate
        self.batch_size, self.shuffle, self.seed = int(batch_size), bool(shuffle), int(seed)
        self.chunk_size, self.shuffle_buffer = int(chunk_size), int(shuffle_buffer)
        self.num_workers = int(num_workers)
        if rank is None or world_size is None:
            rank, world_size = _dist_rank_world()
        if not 0 <= rank < world_size:
            raise ValueError(f"RegionStream: rank {rank} outside world size {world_size}")
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0
        self._skip_batches = 0
        self._by_image: dict[str, list[Record]] = {}
        for r in records:
            self._by_image.setdefault(r.image_id, []).append(r)
        self._plan = self._build_plan()
        self._image_tags = self._read_image_tags() if tag_source == "image" else {}
        self.num_samples = int(sum(int(p.counts.sum()) for p in self._plan))
        if self.num_samples == 0:
            example = next(iter(self._by_image), None)
            raise ValueError(
                f"none of the {len(records)} annotation records has its image in {self.regions.path}"
                f" (e.g. image id {example!r}); are the annotations of this image set, and do "
                f"the ids match the set's keys (str(cocoid) for COCO)?")

    # ---- plan
    def _build_plan(self) -> list[_ShardPlan]:
        plan, found = [], 0
        by_pos = {}
        tshards = self.teacher.shards if self.teacher is not None else [None] * len(self.regions.shards)
        gshards = (self.tags.shards if self.tags is not self.regions and self.tag_source == "boxes"
                   else [None] * len(self.regions.shards))
        for pos, shard in enumerate(self.regions.shards):
            ids = ShardReader(shard.path, shard.index).image_ids
            counts = np.fromiter((len(self._by_image.get(i, ())) for i in ids), dtype=np.int32,
                                 count=len(ids))
            found += int((counts > 0).sum())
            t, g = tshards[pos], gshards[pos]
            by_pos[pos] = _ShardPlan(pos, shard.index,
                                     (shard.path, t.path if t else None, g.path if g else None),
                                     counts)
            plan.append(by_pos[pos])
        missing = len(self._by_image) - found
        if missing > 0:
            log.warning("%d of %d annotated images are not in region set %s (extraction failures "
                        "or another image list?); their %s are skipped", missing,
                        len(self._by_image), self.regions.path, "samples")
        self.missing_images = missing
        return plan

    def _read_image_tags(self) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        """``tag_source="image"``: the tag set's classes (and attributes) of every annotated
        image, read once in the launching process (a few ints per image; workers inherit)."""
        out: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        for shard in self.tags.shards:
            rd = ShardReader(shard.path, shard.index)
            o, classes = rd.offsets, rd.classes
            attrs = rd.extras.get("attr_ids") if self.tag_attributes else None
            for i, image_id in enumerate(rd.image_ids):
                if image_id in self._by_image:
                    a, b = int(o[i]), int(o[i + 1])
                    out[image_id] = (np.array(classes[a:b], dtype=np.int32),
                                     None if attrs is None else np.array(attrs[a:b, 0], np.int32))
            rd.release_maps()
        missing = len(self._by_image) - len(out)
        if missing:
            log.warning("%d of %d annotated images are not in the tag set %s: they get no tags",
                        missing, len(self._by_image), self.tags.path)
        return out

    # ---- epoch geometry (the rest: EpochGeometry)
    def slot_samples(self, rank: int | None = None) -> list[int]:
        """Samples of each worker of ``rank`` per epoch."""
        rank = self.rank if rank is None else rank
        lo, hi = split_range(self.num_samples, self.world_size, rank)
        return [b - a for a, b in (split_range(hi - lo, self.workers, w) for w in range(self.workers))]

    def _epoch_chunks(self, epoch: int) -> list[tuple[_ShardPlan, np.ndarray]]:
        rng = np.random.default_rng([self.seed, epoch, 0xC4])
        shards = [p for p in self._plan if p.annotated.size]
        order = rng.permutation(len(shards)) if self.shuffle else range(len(shards))
        chunks = []
        for s in order:
            p = shards[s]
            pieces = [p.annotated[a:a + self.chunk_size]
                      for a in range(0, p.annotated.size, self.chunk_size)]
            corder = rng.permutation(len(pieces)) if self.shuffle else range(len(pieces))
            chunks.extend((p, pieces[c]) for c in corder)
        return chunks

    # ---- iteration
    def __iter__(self) -> Iterator[dict]:
        worker, done = self._worker_slot()
        lo, hi = split_range(self.num_samples, self.world_size, self.rank)
        a, b = split_range(hi - lo, self.workers, worker)
        skip = done * self.batch_size
        batch: list[dict] = []
        for sample in self._samples(self.epoch, lo + a, lo + b, skip, worker):
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self._finish(batch)
                batch = []
        if batch:
            yield self._finish(batch)

    def _finish(self, items: list[dict]) -> dict:
        out = self.collate(items)
        out["keys"] = [it["key"] for it in items]
        out["image_ids"] = [it["image_id"] for it in items]
        return out

    def iter_refs(self, epoch: int, rank: int, worker: int) -> Iterator[tuple[str, str]]:
        """(image id, record key) of every sample a worker emits in an epoch, in order, without
        reading features (for tests and diagnostics)."""
        lo, hi = split_range(self.num_samples, self.world_size, rank)
        a, b = split_range(hi - lo, self.workers, worker)
        return self.refs_between(epoch, lo + a, lo + b, rank, worker)

    def samples_between(self, epoch: int, lo: int, hi: int, *, skip: int = 0,
                        worker: int = 0) -> Iterator[dict]:
        """Transformed samples of the epoch's global positions ``lo:hi`` in emission order
        (through a shuffle buffer seeded by the epoch, this stream's rank and ``worker``), the
        first ``skip`` left out without reading their features: what one worker's slot reads.
        :class:`~vlkd.train.mixture.MixedStream` reads its corpora through this."""
        return self._samples(epoch, lo, hi, skip, worker)

    def refs_between(self, epoch: int, lo: int, hi: int, rank: int | None = None,
                     worker: int = 0) -> Iterator[tuple[str, str]]:
        """(image id, record key) of what :meth:`samples_between` emits, without reading
        features."""
        rank = self.rank if rank is None else rank
        chunks = self._epoch_chunks(epoch)
        ids = {}
        for ref in self._ordered_refs(chunks, lo, hi, epoch, rank, worker, {}):
            p, pos = chunks[ref[0]]
            if p.pos not in ids:
                ids[p.pos] = ShardReader(p.paths[0], p.index).image_ids
            iid = ids[p.pos][int(pos[ref[1]])]
            yield iid, self._by_image[iid][ref[2]].key

    def _refs(self, chunks, lo: int, hi: int, remaining: dict) -> Iterator[tuple[int, int, int]]:
        """(chunk, local image, record) references of global samples lo:hi, in sequence order."""
        g = 0
        for ci, (p, pos) in enumerate(chunks):
            counts = p.counts[pos]
            m = int(counts.sum())
            if g + m <= lo:
                g += m
                continue
            if g >= hi:
                return
            a, b = max(lo - g, 0), min(hi - g, m)
            starts = [0, *np.cumsum(counts).tolist()]  # plain ints: this loop runs per sample
            for img in range(len(counts)):  # this worker's samples of each image
                n = min(b, starts[img + 1]) - max(a, starts[img])
                if n > 0:
                    remaining[(ci, img)] = n
            i = int(np.searchsorted(starts, a, side="right")) - 1
            for k in range(a, b):
                while k >= starts[i + 1]:
                    i += 1
                yield ci, i, k - starts[i]
            g += m

    def _ordered_refs(self, chunks, lo, hi, epoch, rank, worker, remaining,
                      on_push: Callable[[tuple], None] | None = None):
        """References in emission order: ``_refs`` through the shuffle buffer."""
        refs = self._refs(chunks, lo, hi, remaining)
        if not self.shuffle or self.shuffle_buffer <= 1:
            for ref in refs:
                if on_push is not None:
                    on_push(ref)
                yield ref
            return
        rng = np.random.default_rng([self.seed, epoch, rank, worker, 0xB0F])
        buf: list = []
        size = self.shuffle_buffer
        draws: list[int] = []
        for ref in refs:
            if on_push is not None:
                on_push(ref)
            if len(buf) < size:
                buf.append(ref)
                continue
            if not draws:  # slot choices drawn in blocks: one generator call per 1024 samples
                draws = rng.integers(size, size=1024).tolist()[::-1]
            j = draws.pop()
            out, buf[j] = buf[j], ref
            yield out
        rng.shuffle(buf)
        yield from buf

    def _samples(self, epoch: int, lo: int, hi: int, skip: int, worker: int) -> Iterator[dict]:
        """Transformed samples of global positions lo:hi in emission order, the first ``skip``
        left out without reading their features."""
        chunks = self._epoch_chunks(epoch)
        remaining: dict[tuple[int, int], int] = {}  # (chunk, image) -> samples not yet out
        loaded: dict[int, dict] = {}  # chunk -> {image: (regions, teacher, tags)}
        readers: dict[int, tuple] = {}  # the shard being read (one at a time)
        emitted = 0

        def on_push(ref: tuple) -> None:
            # Read a chunk when it enters the buffer (shards are then visited in order and one
            # reader is open at a time), unless we are still skipping towards a resume point.
            ci = ref[0]
            if ci not in loaded and emitted >= skip:
                pos = chunks[ci][0].pos
                for k in [k for k in readers if k != pos]:
                    _release(readers.pop(k))
                loaded[ci] = self._load(chunks[ci], readers, ci, remaining)

        try:
            for ci, i, r in self._ordered_refs(chunks, lo, hi, epoch, self.rank, worker,
                                               remaining, on_push):
                if emitted >= skip:
                    if ci not in loaded:  # pushed while skipping: read it now, once
                        once: dict = {}
                        loaded[ci] = self._load(chunks[ci], once, ci, remaining)
                        for rd in once.values():
                            _release(rd)
                    p, pos = chunks[ci]
                    regions, teacher, tag_classes, tag_attrs = loaded[ci][i]
                    rec = self._by_image[regions.image_id][r]
                    item = self.transform(Sample(rec, regions, teacher, tag_classes,
                                                 (self.seed, epoch, p.index, int(pos[i]), r),
                                                 tag_attrs, self.tag_source))
                    item["key"], item["image_id"] = rec.key, rec.image_id
                    yield item
                emitted += 1
                remaining[(ci, i)] -= 1
                if remaining[(ci, i)] == 0:  # the image's last sample: let its arrays go
                    del remaining[(ci, i)]
                    if ci in loaded:
                        loaded[ci].pop(i, None)
                        if not loaded[ci]:
                            del loaded[ci]
        finally:
            for rd in readers.values():
                _release(rd)

    def _load(self, chunk: tuple[_ShardPlan, np.ndarray], readers: dict, ci: int,
              remaining: dict) -> dict:
        """Reads the images of a chunk that still have samples to emit."""
        p, pos = chunk
        if p.pos not in readers:
            readers[p.pos] = tuple(ShardReader(path, p.index) if path else None
                                   for path in p.paths)
        rs, rt, rg = readers[p.pos]
        images = {}
        # Image by image, in row order (sequential reads): each image gets its own feature
        # array, so a sample waiting in the shuffle buffer keeps only its image alive, not its
        # chunk (a chunk-wide array would stay until its last sample left the buffer).
        for local, i in enumerate(pos.tolist()):
            if (ci, local) not in remaining:
                continue
            reg = _copy_small(rs.read(i))
            tea = None
            if rt is not None:
                tea = rt.read(i)
                if tea.box_digest != reg.box_digest or tea.image_id != reg.image_id:
                    raise AlignmentError(
                        f"shard {p.index} image {reg.image_id!r}: teacher boxes differ from "
                        f"the student's (digest {short(tea.box_digest.hex())} ≠ "
                        f"{short(reg.box_digest.hex())}); the sets changed since the run started")
                tea = _copy_small(tea)
            attrs = None
            if self.tag_source == "image":
                empty = np.zeros(0, np.int32)
                tags, attrs = self._image_tags.get(reg.image_id,
                                                   (empty, empty if self.tag_attributes else None))
            elif rg is not None:
                a, b = int(rg.offsets[i]), int(rg.offsets[i + 1])
                tags = np.array(rg.classes[a:b], dtype=np.int32)
                if self.tag_attributes:
                    attrs = np.array(rg.extras["attr_ids"][a:b, 0], dtype=np.int32)
            else:
                tags = reg.classes
                if self.tag_attributes:
                    a, b = int(rs.offsets[i]), int(rs.offsets[i + 1])
                    attrs = np.array(rs.extras["attr_ids"][a:b, 0], dtype=np.int32)
            images[local] = (reg, tea, tags, attrs)
        return images


def _release(readers: tuple) -> None:
    """Drops this process's memory maps of a shard the stream has moved past, so that pages
    copied out of them stop counting in RSS: memory stays flat over an epoch of a large set."""
    for rd in readers:
        if rd is not None:
            rd.release_maps()


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _as_is(batch: dict) -> dict:
    # Batches are collated in the stream; the default would walk every key list again.
    return batch


def make_loader(stream: RegionStream, *, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over a stream's batches with the stream's worker count.

    Batches pass through as the stream collated them. The loader's own ``torch.Generator``
    keeps worker seeding from drawing on the global RNG, so dropout and a resumed run see the
    same random numbers whichever mid-epoch point the loader started from.
    """
    return DataLoader(stream, batch_size=None, num_workers=stream.num_workers,
                      collate_fn=_as_is, pin_memory=pin_memory, persistent_workers=False,
                      generator=torch.Generator().manual_seed(stream.seed),
                      prefetch_factor=4 if stream.num_workers else None)


def pad_regions(arrays: Sequence[np.ndarray], length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stacks per-sample (n_i, ...) arrays into (B, R, ...) with zero padding, keeping dtype.

    Returns:
        (padded (B, R, ...), mask (B, R) bool).
    """
    length = max((a.shape[0] for a in arrays), default=0) if length is None else length
    first = arrays[0]
    out = np.zeros((len(arrays), length, *first.shape[1:]), dtype=first.dtype)
    mask = np.zeros((len(arrays), length), dtype=bool)
    for k, a in enumerate(arrays):
        n = min(a.shape[0], length)
        out[k, :n] = a[:n]
        mask[k, :n] = True
    return out, mask
