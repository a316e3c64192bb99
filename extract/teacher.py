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
With ``--attributes`` the teacher's attribute head also gives each box its attributes for that
class (``vlkd.extract.attributes``).

Output shard ``i`` is aligned with proposals shard ``i``: the same image ids in the same order,
the boxes copied bit for bit (their digests compared on the way in and on the finished shard).
Images that failed in proposals are skipped and listed as failures of the teacher shard.
Images are found by id in ``--images``, which may be another copy of the images under another
root; each must have the size proposals saw (boxes are in its pixels), and with
``--verify-images`` the bytes proposals hashed.

The job runs on the shard-job scaffold (``vlkd.extract.job``), as ``proposals`` does: images of
one padded size share a batch within fixed windows, a window is committed as a whole, so a
killed job resumes into the same content.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlkd.common.alignment import (SOURCE_SHARD_ATTR, TEACHER_ROLE, AlignmentError,
                                   aligned_to_record, compare_shards)
from vlkd.common.digest import box_digest
from vlkd.common.manifest import update_manifest
from vlkd.common.regionset import ImageRegions, ShardReader, ShardWriter
from vlkd.common.sharding import resolve_shard_indices
from vlkd.data.images import ImageRecord, open_image_source

from .alignment import (ProposalsShard, read_proposals_manifest, require_complete,
                        verify_proposals_shard)
from . import attributes as attrs
from .batching import WindowBatcher
from .decoding import DecodedItem
from .detector import Detector
from .job import (NEW_OUT, ImageJob, ImageShard, check_options, check_set_header,
                  image_regions, refuse, run_job, short)
from .options import BACKENDS, FEATURE_DTYPES, AttributeOptions, TeacherConfig
from .pooling import boxes_to_resized, classify_box_features, pool_box_features
from .progress import Progress, format_shards

ROLE = TEACHER_ROLE
_ZERO_DIGEST = b"\0" * 16


class TeacherSetMismatchError(AlignmentError):
    """``--out`` holds a teacher set made from other proposals or with another teacher."""


class TeacherImageError(RuntimeError):
    """An image proposals used cannot be used by the teacher (missing, unreadable, another
    size, other bytes with ``--verify-images``); the shard stops at a window boundary and a
    re-run resumes it."""


@dataclass
class TeacherResult:
    """What a run did: the finished shard entries, images written, images skipped because
    they failed in proposals."""

    shards: list[dict]
    num_images: int
    num_skipped: int
    compute_s: float = 0.0  # of the wall time, seconds in the network


# ------------------------------------------------------------------------------------ batch

@torch.inference_mode()
def teacher_batch(det: Detector, items: list[DecodedItem], boxes: list[np.ndarray],
                  feature_dtype: str, attributes: AttributeOptions | None = None
                  ) -> list[ImageRegions]:
    """Pool the teacher's features over given boxes for a batch of one padded size.

    Args:
        det: the teacher.
        items: decoded images (the teacher's preprocessing).
        boxes: per item ``(n_i, 4)`` float32 boxes in original-image pixels.
        feature_dtype: stored dtype of the features.
        attributes: ``--attributes`` (None: none).

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
        extras = attrs.attribute_rows(det.pooler, pooled, classes, [b.shape[0] for b in boxes],
                                      attributes or AttributeOptions())
    tdtype = torch.float16 if feature_dtype == "float16" else torch.float32
    pooled = pooled.float().to(tdtype).cpu().numpy()
    scores = scores.float().cpu().numpy()
    classes = classes.cpu().numpy().astype(np.int32)
    out, r = [], 0
    for it, b, ex in zip(items, boxes, extras):
        n = b.shape[0]
        out.append(image_regions(it.image_id, it.orig_hw, b, scores[r:r + n],
                                 classes[r:r + n], pooled[r:r + n], it.digest, ex))
        r += n
    return out


def teacher_window(det: Detector, items: list[DecodedItem], boxes: list[np.ndarray],
                   batch_size: int, feature_dtype: str,
                   attributes: AttributeOptions | None = None) -> list[ImageRegions]:
    """All images of one window (the job's computation, for pre-decoded images); results in
    item order."""
    batcher = WindowBatcher(lambda its, bs: teacher_batch(det, its, bs, feature_dtype,
                                                          attributes),
                            det.padded_hw, batch_size)
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


class _Shard(ImageShard):
    """Teacher shard ``i``: the images of proposals shard ``i`` in order, with their boxes."""

    job: "TeacherJob"

    def __init__(self, job: "TeacherJob", source: ProposalsShard,
                 records: dict[str, ImageRecord]):
        self.source = source
        self.source_attr = {"name": source.entry["name"], "digest": source.entry["digest"]}
        ids = source.reader.image_ids
        super().__init__(job, source.index, [records[i] for i in ids],
                         attrs={"role": ROLE, SOURCE_SHARD_ATTR: self.source_attr})
        self._bad: list[tuple[str, str]] = []

    def check_complete(self, writer: ShardWriter) -> None:
        out, index = self.job.out, self.index
        made_from = (ShardReader(out / writer.name).attrs.get("extra") or {}).get(
            SOURCE_SHARD_ATTR, {})
        if made_from.get("digest") != self.source_attr["digest"]:
            raise TeacherSetMismatchError(
                f"--out {out}: teacher shard {writer.name} was made from proposals shard "
                f"content {short(made_from.get('digest'))}, but {self.source_attr['name']} now "
                f"has {short(self.source_attr['digest'])} (it was re-extracted); delete "
                f"{writer.name} and its manifest entry and re-run shard {index}")

    def begin(self, writer: ShardWriter) -> None:
        _check_resumable(self.job.out, self.index, writer.committed_ids, self.image_ids,
                         self.source_attr)
        failed_before = set(writer.failed_ids)
        for f in self.source.entry.get("failures", []):
            if f["image_id"] not in failed_before:
                writer.add_failure(f["image_id"], f"skipped: failed in proposals "
                                   f"({f.get('reason', 'no reason recorded')})")

    def add(self, item: DecodedItem) -> None:
        p, pr = self.position(item), self.source.reader
        msg = _image_problem(item, p, self.source, self.job.options.verify_images)
        if msg:
            self._bad.append((pr.image_ids[p], msg))
        if self._bad:
            return  # this window will not be written; list all its problems
        b = np.asarray(pr.boxes[pr.offsets[p]:pr.offsets[p + 1]])
        if box_digest(b) != pr.box_digests[p].tobytes():  # a copy, bit for bit
            raise AlignmentError(f"proposals shard {self.source.entry['name']}: the boxes of "
                                 f"{pr.image_ids[p]!r} changed while being read")
        self.batcher.add(item, b)

    def end_window(self) -> list[ImageRegions]:
        bad = self._bad
        if bad:
            shown = "; ".join(f"{iid!r} {msg}" for iid, msg in bad[:5])
            raise TeacherImageError(
                f"teacher shard {self.index}: {len(bad)} image(s) of proposals shard "
                f"{self.source.entry['name']} cannot be used: {shown}"
                f"{' …' if len(bad) > 5 else ''}. Point --images (and --image-root) "
                "at the images proposals read; re-running resumes the shard")
        return self.batcher.finish()

    def check_finished(self, info: dict) -> None:
        """The written shard holds the proposals' images in order with the proposals' box
        digests (the alignment contract, verified on what is on disk)."""
        shard = self.source
        t = ShardReader(self.job.out / info["name"], index=shard.index)
        for f in compare_shards(t, shard.reader, index=shard.index, where=info["name"],
                                proposals_dir=str(shard.reader.path.parent)):
            raise AlignmentError(
                f"teacher shard {info['name']} is not aligned with proposals shard "
                f"{shard.entry['name']} although it was written from it ({f.message}): another "
                "process wrote into --out at the same time? Delete the shard and re-run this "
                "shard")


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


# -------------------------------------------------------------------------------------- job

class TeacherJob(ImageJob):
    """``teacher-features`` on the scaffold: the header aligned to a proposals set, one teacher
    shard per verified proposals shard, pooling over their boxes per batch."""

    name = role = ROLE
    mismatch_error = TeacherSetMismatchError
    shard_label = "teacher shard"
    failure_word, failure_field = "skipped (failed in proposals)", "num_skipped"

    def __init__(self, det: Detector, cfg: TeacherConfig, pdir: Path, pm: dict,
                 shards: list[ProposalsShard], records: dict[str, ImageRecord],
                 source_info: dict, backend: str):
        super().__init__(det, cfg)
        self.pdir, self.pm = pdir, pm
        self.shards = {s.index: s for s in shards}
        self.records, self.source_info = records, source_info
        self.num_shards, self.backend = int(pm["num_shards"]), backend
        self.extras = attrs.attribute_extras(cfg.attributes)

    def header(self) -> dict:
        det = self.det
        return {**self.header_base(self.source_info),
                **({attrs.ATTRIBUTE_NAMES_KEY: det.attribute_names} if self.extras else {}),
                "aligned_to": aligned_to_record(self.pdir, self.pm),
                "options": {"precision": self.options.precision,
                            "features": f"teacher ({det.kind}: {det.pooler.description}) "
                                        "pooled over the proposals' boxes; classes/scores: the "
                                        "teacher's box predictor over those features",
                            **attrs.header_options(self.options.attributes)}}

    def compare(self, existing: dict, header: dict) -> None:
        """Refuse to add to a set made from other proposals, with another teacher or options."""
        out = str(self.out)
        if existing.get("role") == ROLE:
            ea, ha = existing.get("aligned_to") or {}, header["aligned_to"]
            if ea.get("identity") != ha["identity"]:
                raise refuse(TeacherSetMismatchError, out,
                             f"from other proposals (those at {ea.get('path')}, identity)",
                             ha["identity"], ea.get("identity"),
                             NEW_OUT + "point --proposals at the set it was made from")
        check_set_header(existing, header, out, error=TeacherSetMismatchError, role=ROLE,
                         detector="teacher")
        check_options(existing, header, out, error=TeacherSetMismatchError,
                      keys=("precision",))
        diff = attrs.compare_options(existing, header)
        if diff:
            raise refuse(TeacherSetMismatchError, out, "with other --attributes options", *diff,
                         NEW_OUT + "re-run with the set's options")

    def refresh(self, manifest: dict, header: dict) -> dict:
        """The proposals set may have finished more shards since the teacher set was started:
        its identity is unchanged, and ``aligned_to`` is updated to its current manifest
        digest."""
        started = (manifest.get("aligned_to") or {}).get("started_from")
        manifest["aligned_to"] = dict(header["aligned_to"], **({"started_from": started}
                                                               if started else {}))
        return manifest

    def set_config(self) -> dict | None:
        config = super().set_config()
        config.update(num_shards=self.num_shards, backend=self.backend)  # as resolved
        return config

    def start_event(self, indices: list[int]) -> tuple[str, dict]:
        det, cfg, k = self.det, self.options, self.num_shards
        return (f"teacher-features: aligning with {self.pdir} ({k} shard(s), running "
                f"{format_shards(indices)}); teacher {det.name} ({det.kind}, "
                f"D={det.feature_dim}, input {det.preprocessing.min_size}/"
                f"{det.preprocessing.max_size}) on {cfg.device}",
                dict(proposals=str(self.pdir), **self.start_fields(indices)))

    def shard(self, index: int) -> _Shard:
        return _Shard(self, self.shards[index], self.records)

    def run_batch(self, items: list[DecodedItem], boxes: list) -> list[ImageRegions]:
        return teacher_batch(self.det, items, boxes, self.feature_dtype,
                             self.options.attributes)


# -------------------------------------------------------------------------------------- run

def run_teacher_features(cfg: TeacherConfig, progress: Progress | None = None,
                         detector: Detector | None = None) -> TeacherResult:
    """Run ``teacher-features`` for the selected shards.

    The arguments are those of :func:`vlkd.extract.proposals.run_proposals`; ``detector`` is
    the teacher.

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
    if cfg.feature_dtype not in FEATURE_DTYPES:
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
    if backend not in BACKENDS:
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
    attrs.check_attributes(det.pooler, cfg.attributes)
    job = TeacherJob(det, cfg, pdir, pm, shards, by_id, source.manifest_info(), backend)
    runs = run_job(job, indices, progress)
    infos = [r.info for r in runs]
    total = sum(info["num_images"] for info in infos)
    skipped = sum(len(info["failures"]) for info in infos)
    progress.event("summary", f"teacher-features: {total} images in {len(indices)} shard(s), "
                   f"{skipped} skipped (failed in proposals)", images=total, skipped=skipped)
    return TeacherResult(infos, total, skipped, sum(r.compute_s for r in runs))


__all__ = ["TeacherConfig", "TeacherResult", "TeacherJob", "run_teacher_features",
           "teacher_batch", "teacher_window", "TeacherSetMismatchError", "TeacherImageError",
           "ROLE"]
