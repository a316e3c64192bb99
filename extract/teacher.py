"""`vlkd-extract teacher-features`: the teacher's features over the student's boxes (VTA).

Visual Token Alignment (DistillVLM, Fang et al. 2021): teacher and student must see the same
visual tokens, so the teacher's region features are pooled over the *student detector's*
boxes, read from a proposals set. For every image of a proposals shard the job applies the
teacher's own preprocessing (its ``INPUT.FORMAT`` and ``MIN/MAX_SIZE_TEST``), maps the stored
boxes (original-image pixels) into the teacher's resized frame, runs the teacher's backbone
once, and pools over exactly those boxes (C4: res5 + mean pool; FPN: box pooler + box head;
``vlkd.extract.pooling``). It never calls ``roi_heads(...)`` inference or
``PrecomputedProposals``: those re-sort, re-regress, threshold and drop boxes, and the tokens
would no longer be the student's. The teacher's box predictor classifies each pooled feature:
the stored ``classes``/``scores`` are the teacher-side object tags of the student's boxes.

Output shard ``i`` is aligned with proposals shard ``i``: the same image ids in the same order,
the boxes copied bit for bit (their digests compared on the way in and on the finished shard).
Images that failed in proposals are skipped and listed as failures of the teacher shard.
Images are found by id in ``--images``, which may be another copy of the images under another
root; each must have the size proposals saw (boxes are in its pixels), and with
``--verify-images`` the bytes proposals hashed.

Batching and resume work as in ``proposals``: images of one padded size share a batch within
fixed windows, a window is committed as a whole, so a killed job resumes into the same content.
"""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlkd import __version__
from vlkd.common.alignment import (SOURCE_SHARD_ATTR, TEACHER_ROLE, AlignmentError,
                                   aligned_to_record, compare_shards)
from vlkd.common.digest import box_digest
from vlkd.common.manifest import update_manifest
from vlkd.common.regionset import ShardReader, ShardWriter
from vlkd.common.sharding import resolve_shard_indices
from vlkd.data.images import ImageRecord, open_image_source

from .alignment import (ProposalsShard, read_proposals_manifest, require_complete,
                        verify_proposals_shard)
from .detector import Detector
from .jobs import (BackgroundWriter, JobOptions, DecodeDataset, DecodedItem, Progress, check_set_header,
                   decode_batches, short)
from .pooling import boxes_to_resized, classify_box_features, pool_box_features

ROLE = TEACHER_ROLE
_ZERO_DIGEST = b"\0" * 16


class TeacherSetMismatchError(AlignmentError):
    """``--out`` holds a teacher set made from other proposals or with another teacher."""


class TeacherImageError(RuntimeError):
    """An image proposals used cannot be used by the teacher (missing, unreadable, another
    size, other bytes with ``--verify-images``); the shard stops at a window boundary and a
    re-run resumes it."""


@dataclass(kw_only=True)
class TeacherConfig(JobOptions):
    """Options of ``vlkd-extract teacher-features`` (the CLI fills this). Besides
    :class:`~vlkd.extract.jobs.JobOptions` (``images`` may be another root than proposals
    used: images are matched by id; ``config`` and ``weights`` are the teacher's):

    Attributes:
        proposals: the proposals set (student boxes) to align with.
        num_shards: must equal the proposals' (None: take it from them).
        backend: ``hdf5`` or ``zarr`` (None: the proposals' backend).
        verify_images: require each image's bytes to have the digest proposals recorded.
    """

    proposals: str
    num_shards: int | None = None
    backend: str | None = None
    verify_images: bool = False


@dataclass
class TeacherResult:
    """What a run did: the finished shard entries, images written, images skipped because
    they failed in proposals."""

    shards: list[dict]
    num_images: int
    num_skipped: int


# --------------------------------------------------------------------------------- manifest

def _header(det: Detector, cfg: TeacherConfig, pdir: Path, pm: dict, source_info: dict,
            backend: str) -> dict:
    return {
        "schema_version": 1,
        "role": ROLE,
        "detector": det.manifest_info(),
        "preprocessing": det.preprocessing.manifest_info(),
        "feature_dim": det.feature_dim,
        "feature_dtype": cfg.feature_dtype,
        "backend": backend,
        "class_names": det.class_names,
        "num_shards": int(pm["num_shards"]),
        "image_source": source_info,
        "tool_version": __version__,
        "aligned_to": aligned_to_record(pdir, pm),
        "options": {"precision": cfg.precision,
                    "features": f"teacher ({det.kind}: "
                                + ("res5 + mean pool" if det.kind == "C4"
                                   else "box_pooler + box_head")
                                + ") pooled over the proposals' boxes; classes/scores: the "
                                  "teacher's box predictor over those features"},
    }


def _compare(existing: dict, header: dict, out: str) -> None:
    """Refuse to add to a set made from other proposals, with another teacher or options."""
    def refuse(what: str, here, there, fix: str) -> None:
        raise TeacherSetMismatchError(
            f"--out {out} holds a region set made {what} ({short(there)} in its manifest.json, "
            f"{short(here)} now); {fix}")

    new_out = "write to a new --out directory, or "
    if existing.get("role") == ROLE:
        ea, ha = existing.get("aligned_to") or {}, header["aligned_to"]
        if ea.get("identity") != ha["identity"]:
            refuse(f"from other proposals (those at {ea.get('path')}, identity)",
                   ha["identity"], ea.get("identity"),
                   new_out + "point --proposals at the set it was made from")
    check_set_header(existing, header, out, error=TeacherSetMismatchError, role=ROLE,
                     detector="teacher")
    eo, ho = existing.get("options", {}), header["options"]
    if eo.get("precision") != ho["precision"]:
        refuse("with another --precision", ho["precision"], eo.get("precision"),
               new_out + "re-run with the set's options")


def prepare_teacher_set(out: str, header: dict) -> dict:
    """Write the header into ``out/manifest.json`` or check it against an existing set.

    The proposals set may have finished more shards since the teacher set was started: its
    identity is unchanged, and ``aligned_to`` is updated to its current manifest digest.
    """
    def fn(m: dict) -> dict:
        if m.get("role") is None and "detector" not in m:
            created = m.get("created") or _dt.datetime.now(_dt.timezone.utc).isoformat(
                timespec="seconds")
            return {**header, **{k: v for k, v in m.items() if k in ("shards", "failures")},
                    "created": created}
        _compare(m, header, out)
        started = (m.get("aligned_to") or {}).get("started_from")
        m["aligned_to"] = dict(header["aligned_to"], **({"started_from": started}
                                                       if started else {}))
        return m
    return update_manifest(out, fn)


# ------------------------------------------------------------------------------------ batch

@dataclass
class TeacherImage:
    """One image's teacher regions: the proposals' boxes and the teacher's tags/features."""

    item: DecodedItem
    boxes: np.ndarray       # (n, 4) float32, the proposals' boxes (original pixels)
    scores: np.ndarray      # (n,) float32, teacher's probability of its class
    classes: np.ndarray     # (n,) int32, teacher's class
    features: np.ndarray    # (n, D) stored dtype


@torch.inference_mode()
def teacher_batch(det: Detector, items: list[DecodedItem], boxes: list[np.ndarray],
                  feature_dtype: str) -> list[TeacherImage]:
    """Pool the teacher's features over given boxes for a batch of one padded size.

    Args:
        det: the teacher.
        items: decoded images (the teacher's preprocessing).
        boxes: per item ``(n_i, 4)`` float32 boxes in original-image pixels.
        feature_dtype: stored dtype of the features.

    Returns:
        One result per item, in order; row j of an item's features describes its box j.
    """
    image_list, features = det.backbone_features([it.image for it in items])
    resized = []
    for it, b, rhw in zip(items, boxes, image_list.image_sizes):
        # The teacher's resized frame, not the student's: same original box, other scale.
        resized.append(boxes_to_resized(b, it.orig_hw, (int(rhw[0]), int(rhw[1]))))
    with det.autocast():
        pooled = pool_box_features(det.roi_heads, features, resized)   # (sum n_i, D)
        scores, classes = classify_box_features(det.roi_heads, pooled)  # (sum n_i,)
    tdtype = torch.float16 if feature_dtype == "float16" else torch.float32
    pooled = pooled.float().to(tdtype).cpu().numpy()
    scores = scores.float().cpu().numpy()
    classes = classes.cpu().numpy().astype(np.int32)
    out, r = [], 0
    for it, b in zip(items, boxes):
        n = b.shape[0]
        out.append(TeacherImage(it, b, scores[r:r + n], classes[r:r + n], pooled[r:r + n]))
        r += n
    return out


class WindowBatcher:
    """Batches one window's images by padded size as they arrive and runs a batch as soon as
    it is full, so decoding overlaps compute from the first images of a shard on.

    ``ImageList`` pads a batch to its largest image and the padded border is not zero after
    the first FrozenBN, so only images of the same padded size share a batch (see
    ``extract.proposals``). The batches depend only on the window's images and their order
    (full batches as they fill, then the remainders by size in order of first appearance), so
    a resumed job forms the batches an uninterrupted one did.

    Args:
        det: the teacher.
        batch_size: images per forward pass.
        feature_dtype: stored dtype of the features.
    """

    def __init__(self, det: Detector, batch_size: int, feature_dtype: str):
        self.det, self.batch_size, self.feature_dtype = det, batch_size, feature_dtype
        self._reset()

    def _reset(self) -> None:
        self.items: list[DecodedItem] = []
        self.boxes: list[np.ndarray] = []
        self.pending: dict[tuple[int, int], list[int]] = {}
        self.results: dict[int, TeacherImage] = {}

    def _run(self, ks: list[int]) -> None:
        res = teacher_batch(self.det, [self.items[k] for k in ks], [self.boxes[k] for k in ks],
                            self.feature_dtype)
        self.results.update(zip(ks, res))

    def add(self, item: DecodedItem, boxes: np.ndarray) -> None:
        """Queue one image with its ``(n, 4)`` boxes (original pixels); may run a batch."""
        k = len(self.items)
        self.items.append(item)
        self.boxes.append(boxes)
        h, w = item.image.shape[-2:]
        group = self.pending.setdefault(self.det.padded_hw(int(h), int(w)), [])
        group.append(k)
        if len(group) == self.batch_size:
            self._run(list(group))
            group.clear()

    def finish(self) -> list[TeacherImage]:
        """Run the remaining partial batches; returns the window's results in item order and
        starts a new window."""
        for ks in self.pending.values():
            if ks:
                self._run(list(ks))
        out = [self.results[k] for k in range(len(self.items))]
        self._reset()
        return out


def teacher_window(det: Detector, items: list[DecodedItem], boxes: list[np.ndarray],
                   batch_size: int, feature_dtype: str) -> list[TeacherImage]:
    """All images of one window (the job's computation, for pre-decoded images); results in
    item order."""
    batcher = WindowBatcher(det, batch_size, feature_dtype)
    for it, b in zip(items, boxes):
        batcher.add(it, b)
    return batcher.finish()


# ------------------------------------------------------------------------------------ shard

def _image_problem(item: DecodedItem, pos: int, shard: ProposalsShard, verify: bool
                   ) -> str | None:
    """Why the teacher cannot use the image proposals stored at ``pos`` (None: it can)."""
    r = shard.reader
    if item.error is not None:
        return f"cannot be used here ({item.error})"
    want_hw = tuple(int(v) for v in r.image_hw[pos])
    if tuple(item.orig_hw) != want_hw:
        return (f"is {item.orig_hw[0]}x{item.orig_hw[1]} (h x w) here but was "
                f"{want_hw[0]}x{want_hw[1]} when proposals read it; the boxes are in those "
                "pixels")
    if verify:
        want = r.image_digests[pos].tobytes()
        if want == _ZERO_DIGEST:
            return ("has no content hash in the proposals set, so --verify-images cannot "
                    "check it (run without --verify-images)")
        if item.digest != want:
            return (f"has other bytes than proposals read (digest {item.digest.hex()[:10]}… "
                    f"vs {want.hex()[:10]}…)")
    return None


def _write_window(writer: ShardWriter, results: list[TeacherImage]) -> None:
    for res in results:
        it = res.item
        writer.append(it.image_id, it.orig_hw, res.boxes, res.scores, res.classes,
                      res.features, image_digest=it.digest)
    writer.commit()  # windows are the unit of resume, as in proposals


def _check_finished(out: Path, info: dict, shard: ProposalsShard) -> None:
    """The written shard holds the proposals' images in order with the proposals' box
    digests (the alignment contract, verified on what is on disk)."""
    t = ShardReader(out / info["name"], index=shard.index)
    for f in compare_shards(t, shard.reader, index=shard.index, where=info["name"],
                            proposals_dir=str(shard.reader.path.parent)):
        raise AlignmentError(
            f"teacher shard {info['name']} is not aligned with proposals shard "
            f"{shard.entry['name']} although it was written from it ({f.message}): another "
            "process wrote into --out at the same time? Delete the shard and re-run this shard")


def run_shard(det: Detector, shard: ProposalsShard, records: dict[str, ImageRecord],
              cfg: TeacherConfig, backend: str, num_shards: int, progress: Progress) -> dict:
    """Write (or resume, or re-record) teacher shard ``shard.index``; returns its entry."""
    index, k = shard.index, num_shards
    pr = shard.reader
    ids, offsets, boxes = pr.image_ids, pr.offsets, pr.boxes
    source_attr = {"name": shard.entry["name"], "digest": shard.entry["digest"]}
    W = cfg.window_size()
    out = Path(cfg.out)
    with ShardWriter(out, index, k, backend=backend, feature_dim=det.feature_dim,
                     feature_dtype=cfg.feature_dtype, commit_every=W + 1,
                     attrs={"role": ROLE, SOURCE_SHARD_ATTR: source_attr}) as writer:
        if writer.complete:
            made_from = (ShardReader(out / writer.name).attrs.get("extra") or {}).get(
                SOURCE_SHARD_ATTR, {})
            if made_from.get("digest") != source_attr["digest"]:
                raise TeacherSetMismatchError(
                    f"--out {out}: teacher shard {writer.name} was made from proposals shard "
                    f"content {short(made_from.get('digest'))}, but {shard.entry['name']} now has "
                    f"{short(source_attr['digest'])} (it was re-extracted); delete {writer.name} "
                    f"and its manifest entry and re-run shard {index}")
            info = writer.finalize()
            _check_finished(out, info, shard)
            progress.event("shard_done", f"shard {index}: already complete "
                           f"({info['num_images']} images)", shard=index, resumed=True,
                           name=info["name"], num_images=info["num_images"])
            return info
        _check_resumable(out, index, writer.committed_ids, ids, source_attr)
        done = set(writer.committed_ids)
        start = len(writer.committed_ids)
        failed_before = set(writer.failed_ids)
        for f in shard.entry.get("failures", []):
            if f["image_id"] not in failed_before:
                writer.add_failure(f["image_id"], f"skipped: failed in proposals "
                                   f"({f.get('reason', 'no reason recorded')})")
        if done:
            progress.event("resume", f"shard {index}: resuming, {len(done)} of {len(ids)} "
                           "images already committed", shard=index, committed=len(done))
        todo = list(range(start, len(ids)))
        progress.start(len(ids), f"teacher shard {index}/{k}", shard=index)
        progress.update(start)
        dataset = DecodeDataset([records[ids[i]] for i in todo], [i // W for i in todo],
                                det.preprocessing, cfg.max_pixels)
        bg = BackgroundWriter(max_pending=2)
        batcher = WindowBatcher(det, cfg.batch_size, cfg.feature_dtype)
        try:
            group, bad = None, []

            def end_window() -> None:
                if bad:
                    bg.close()  # earlier windows are committed: a re-run resumes here
                    shown = "; ".join(f"{iid!r} {msg}" for iid, msg in bad[:5])
                    raise TeacherImageError(
                        f"teacher shard {index}: {len(bad)} image(s) of proposals shard "
                        f"{shard.entry['name']} cannot be used: {shown}"
                        f"{' …' if len(bad) > 5 else ''}. Point --images (and --image-root) "
                        "at the images proposals read; re-running resumes the shard")
                results = batcher.finish()
                bg.submit(lambda: _write_window(writer, results))
                progress.update(len(results))
            for batch in decode_batches(dataset, batch_size=cfg.batch_size,
                                        num_workers=cfg.num_workers,
                                        pin_memory=det.device.type == "cuda",
                                        prefetch_items=2 * W):
                if group is not None and batch[0].group != group:
                    end_window()
                group = batch[0].group
                for it in batch:
                    p = todo[it.position]
                    msg = _image_problem(it, p, shard, cfg.verify_images)
                    if msg:
                        bad.append((ids[p], msg))
                    if bad:
                        continue  # this window will not be written; list all its problems
                    b = np.asarray(boxes[offsets[p]:offsets[p + 1]])
                    if box_digest(b) != pr.box_digests[p].tobytes():  # a copy, bit for bit
                        raise AlignmentError(f"proposals shard {shard.entry['name']}: the "
                                             f"boxes of {ids[p]!r} changed while being read")
                    batcher.add(it, b)
            if group is not None:
                end_window()
            bg.close()
        except BaseException:
            bg.abandon()
            raise
        finally:
            stats = progress.finish()
        info = writer.finalize()
    _check_finished(out, info, shard)
    progress.event("shard_done", f"shard {index}: {info['num_images']} images, "
                   f"{info['num_regions']} regions, {len(info['failures'])} skipped (failed in "
                   f"proposals) ({stats['images_per_s']:.2f} img/s)", shard=index,
                   name=info["name"], num_images=info["num_images"],
                   num_regions=info["num_regions"], num_skipped=len(info["failures"]),
                   images_per_s=stats["images_per_s"])
    return info


def _check_resumable(out: Path, index: int, committed: list[str], ids: list[str],
                     source_attr: dict) -> None:
    """A partial shard continues only what it started: a prefix of the proposals' ids, made
    from the same proposals shard content (recorded in the manifest when the shard started)."""
    if committed != list(ids[:len(committed)]):
        raise TeacherSetMismatchError(
            f"--out {out}: the partial teacher shard {index} holds images that are not the "
            "first images of the proposals shard in order; it was started from other "
            f"proposals. Delete {out}/shard-{index:05d}-*.partial and re-run")
    key = str(index)

    def fn(m: dict) -> dict:
        started = m.setdefault("aligned_to", {}).setdefault("started_from", {})
        if committed and started.get(key) not in (None, source_attr["digest"]):
            raise TeacherSetMismatchError(
                f"--out {out}: the partial teacher shard {index} was started from proposals "
                f"shard content {short(started.get(key))}, but {source_attr['name']} now has "
                f"{short(source_attr['digest'])} (it was re-extracted); delete "
                f"{out}/shard-{index:05d}-*.partial and re-run")
        started[key] = source_attr["digest"]
        return m
    update_manifest(out, fn)


# -------------------------------------------------------------------------------------- run

def run_teacher_features(cfg: TeacherConfig, progress: Progress | None = None,
                         detector: Detector | None = None) -> TeacherResult:
    """Run ``teacher-features`` for the selected shards.

    Args:
        cfg: the options.
        progress: where progress goes (default from ``cfg.log_format``/``cfg.progress``).
        detector: an already loaded teacher for ``cfg.config``/``cfg.weights`` (benchmarks
            reuse one); loaded from ``cfg`` when None.

    Returns:
        The finished shards and counts.

    Raises:
        AlignmentError: the proposals set is incomplete, tampered with, or has another shard
            count; ``--out`` holds a set made from other proposals or another teacher
            (:class:`TeacherSetMismatchError`).
        TeacherImageError: an image cannot be found or used under ``--images``.
    """
    progress = progress or Progress(cfg.log_format, enabled=cfg.progress)
    if cfg.batch_size < 1 or cfg.num_workers < 0:
        raise ValueError("need --batch-size >= 1 and --num-workers >= 0")
    if cfg.feature_dtype not in ("float16", "float32"):
        raise ValueError(f"--feature-dtype {cfg.feature_dtype!r}: expected float16 or float32")
    pdir = Path(cfg.proposals)
    pm = read_proposals_manifest(pdir)
    k = int(pm["num_shards"])
    if cfg.num_shards is not None and int(cfg.num_shards) != k:
        raise AlignmentError(
            f"--num-shards {cfg.num_shards} differs from the proposals set's {k} shards: "
            f"teacher shard i is aligned with proposals shard i, so the counts must be equal; "
            f"drop --num-shards (it defaults to the proposals') or pass --num-shards {k}")
    backend = cfg.backend or pm["backend"]
    if backend not in ("hdf5", "zarr"):
        raise ValueError(f"--backend {backend!r}: expected hdf5 or zarr")
    indices = resolve_shard_indices(cfg.shard_index, k)
    require_complete(pdir, pm, indices)
    shards = [verify_proposals_shard(pdir, pm, i) for i in indices]

    source = open_image_source(cfg.images, cfg.image_root)
    by_id = {r.image_id: r for r in source.records}
    absent = [iid for s in shards for iid in s.reader.image_ids if iid not in by_id]
    if absent:
        raise TeacherImageError(
            f"--images {cfg.images}: {len(absent)} image id(s) of the proposals shards are not "
            f"in this source (e.g. {absent[:3]}); images are matched by id, so point --images "
            "(and --image-root) at a copy of the images proposals read")
    missing = [by_id[iid].path for s in shards for iid in s.reader.image_ids
               if not os.path.exists(by_id[iid].path)]
    if missing:
        raise TeacherImageError(
            f"--images {cfg.images}: {len(missing)} image file(s) proposals used do not exist "
            f"here (e.g. {missing[:3]}); point --images (and --image-root) at the folder "
            "holding them")

    det = detector or Detector.load(cfg.config, cfg.weights, device=cfg.device,
                                    precision=cfg.precision, trust_pickle=cfg.trust_pickle,
                                    opts=cfg.opts, require_proposal_generator=False)
    header = _header(det, cfg, pdir, pm, source.manifest_info(), backend)
    prepare_teacher_set(cfg.out, header)
    progress.event("start", f"teacher-features: aligning with {pdir} ({k} shard(s), running "
                   f"{_fmt(indices)}); teacher {det.name} ({det.kind}, D={det.feature_dim}, "
                   f"input {det.preprocessing.min_size}/{det.preprocessing.max_size}) on "
                   f"{cfg.device}", proposals=str(pdir), num_shards=k, shards=indices,
                   detector=det.name, kind=det.kind, feature_dim=det.feature_dim,
                   device=cfg.device, out=str(Path(cfg.out)))
    infos, total, skipped = [], 0, 0
    for s in shards:
        info = run_shard(det, s, by_id, cfg, backend, k, progress)
        infos.append(info)
        total += info["num_images"]
        skipped += len(info["failures"])
    progress.event("summary", f"teacher-features: {total} images in {len(indices)} shard(s), "
                   f"{skipped} skipped (failed in proposals)", images=total, skipped=skipped)
    return TeacherResult(infos, total, skipped)


def _fmt(indices: list[int]) -> str:
    if len(indices) == 1:
        return f"shard {indices[0]}"
    return f"shards {indices[0]}..{indices[-1]}" if indices == list(
        range(indices[0], indices[-1] + 1)) else f"shards {indices}"


__all__ = ["TeacherConfig", "TeacherResult", "run_teacher_features", "teacher_batch",
           "teacher_window", "WindowBatcher", "TeacherSetMismatchError", "TeacherImageError", "ROLE"]
