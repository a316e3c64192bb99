"""`vlkd-extract proposals`: a detector's final boxes and its own features over them.

For every image of a source (sorted by id, split into contiguous shards) the job runs one
backbone pass, detects (RPN, box head, score threshold, per-class NMS, at most ``max_boxes``,
topped up to ``min_boxes``), stores the boxes in original-image pixels, and pools the same
backbone features over exactly the stored boxes (mapped back into the resized frame), so every
feature row describes its box: never the pre-regression proposal it came from.

The job runs on the shard-job scaffold (``vlkd.extract.job``): images are batched only with
images of the same padded size (``vlkd.extract.batching``), within fixed windows of the shard's
list; a window is committed as a whole, so a resumed job re-forms exactly the batches an
uninterrupted one would have. Images that cannot be decoded are listed as failures.

``--box-selection vinvl`` applies VinVL's rule instead (``detector.select_boxes_vinvl``: one
region per proposal, unregressed); ``--attributes`` also stores each box's attributes from the
detector's attribute head for the box's class (``vlkd.extract.attributes``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from vlkd.common.alignment import PROPOSALS_ROLE
from vlkd.common.regionset import ImageRegions
from vlkd.common.sharding import resolve_shard_indices, shard_ranges
from vlkd.data.images import ImageSource, open_image_source

from . import attributes as attrs
from .batching import WindowBatcher
from .decoding import DecodedItem
from .detector import BoxSelection, Detector
from .job import (NEW_OUT, FailureLimit, ImageJob, ImageShard, check_options, check_set_header,
                  image_regions, refuse, run_job, with_failures)
from .options import BACKENDS, FEATURE_DTYPES, AttributeOptions, ProposalsConfig
from .pooling import boxes_to_original, boxes_to_resized, pool_box_features
from .progress import Progress, format_shards

ROLE = PROPOSALS_ROLE


class SetMismatchError(RuntimeError):
    """``--out`` holds a set made with other settings (message says which and what to do)."""


@dataclass
class ProposalsResult:
    """What a run did: the shard entries it finished and the failure count against the limit."""

    shards: list[dict]
    num_images: int
    num_failures: int
    limit: FailureLimit
    compute_s: float = 0.0  # of the wall time, seconds in the network and box selection

    @property
    def failures_exceeded(self) -> bool:
        return self.limit.exceeded(self.num_failures, self.num_images)


# ------------------------------------------------------------------------------------ batch

@torch.inference_mode()
def run_batch(det: Detector, items: list[DecodedItem], sel: BoxSelection,
              feature_dtype: str, rule: str = "detectron2",
              attributes: AttributeOptions | None = None) -> list[ImageRegions]:
    """Detect on a batch (images of one padded size) and pool features over the final boxes.

    Args:
        rule: the box selection rule (``--box-selection``).
        attributes: ``--attributes`` (None: none).

    Returns:
        One result per item, in order.
    """
    attributes = attributes or AttributeOptions()
    image_list, features = det.backbone_features([it.image for it in items])
    dets = det.detect(image_list, features, sel, rule)
    stored, pool_boxes = [], []
    for it, d, rhw in zip(items, dets, image_list.image_sizes):
        rhw = (int(rhw[0]), int(rhw[1]))
        b = boxes_to_original(d.boxes, it.orig_hw, rhw)       # what the set stores
        stored.append(b)
        pool_boxes.append(boxes_to_resized(b, it.orig_hw, rhw))  # exactly those boxes
    with det.autocast():
        pooled = pool_box_features(det.roi_heads, features, pool_boxes)
        extras = attrs.attribute_rows(det.pooler, pooled,
                                      torch.cat([d.classes for d in dets]).to(pooled.device),
                                      [b.shape[0] for b in stored], attributes)
    tdtype = torch.float16 if feature_dtype == "float16" else torch.float32
    pooled = pooled.float().to(tdtype).cpu().numpy()  # cast on the device: half the copy
    out, r = [], 0
    for it, d, b, ex in zip(items, dets, stored, extras):
        n = b.shape[0]
        out.append(image_regions(it.image_id, it.orig_hw, b, d.scores.float().cpu().numpy(),
                                 d.classes.cpu().numpy().astype(np.int32), pooled[r:r + n],
                                 it.digest, ex))
        r += n
    return out


def run_window(det: Detector, items: list[DecodedItem], sel: BoxSelection, batch_size: int,
               feature_dtype: str, rule: str = "detectron2",
               attributes: AttributeOptions | None = None) -> list:
    """All images of one window (the job's computation, for pre-decoded images): results in
    item order, a :class:`~vlkd.extract.job.Failure` for each item that failed to decode."""
    batcher = WindowBatcher(lambda its, _: run_batch(det, its, sel, feature_dtype, rule,
                                                     attributes),
                            det.padded_hw, batch_size)
    for it in items:
        if it.error is None:
            batcher.add(it)
    return with_failures(items, batcher.finish())


# -------------------------------------------------------------------------------------- job

class _Shard(ImageShard):
    """A contiguous range of the sorted image list; undecodable images become failures."""

    def __init__(self, job: "ProposalsJob", index: int, records):
        super().__init__(job, index, records)
        self._window: list[DecodedItem] = []

    def add(self, item: DecodedItem) -> None:
        self._window.append(item)
        if item.error is None:
            self.batcher.add(item)

    def end_window(self) -> list:
        out = with_failures(self._window, self.batcher.finish())
        self._window = []
        return out


class ProposalsJob(ImageJob):
    """``proposals`` on the scaffold: the header, the shards' images, detection per batch."""

    name = role = ROLE
    mismatch_error = SetMismatchError

    def __init__(self, det: Detector, source: ImageSource, cfg: ProposalsConfig):
        super().__init__(det, cfg)
        self.source = source
        self.num_shards, self.backend = cfg.num_shards, cfg.backend
        self.ranges = shard_ranges(len(source), cfg.num_shards)
        self.extras = attrs.attribute_extras(cfg.attributes)

    def header(self) -> dict:
        det, cfg = self.det, self.options
        # box_selection and attributes appear only when used, so sets made without them keep
        # the options they always had
        rule = {} if cfg.box_selection == "detectron2" else {"box_selection": cfg.box_selection}
        return {**self.header_base(self.source.manifest_info()),
                **({attrs.ATTRIBUTE_NAMES_KEY: det.attribute_names} if self.extras else {}),
                "options": {**asdict(cfg.selection), **rule, "precision": cfg.precision,
                            "max_pixels": cfg.max_pixels,
                            "features": f"pooled over the stored boxes ({det.kind}: "
                                        f"{det.pooler.description})",
                            **attrs.header_options(cfg.attributes)}}

    def compare(self, existing: dict, header: dict) -> None:
        """Refuse to add to a set made with other settings."""
        out = str(self.out)
        check_set_header(existing, header, out, error=SetMismatchError, role=ROLE,
                         detector="detector")
        ei, hi = existing.get("image_source", {}), header["image_source"]
        if ei.get("ids_digest") != hi["ids_digest"]:
            raise refuse(SetMismatchError, out, "with another image list (ids digest)",
                         hi["ids_digest"], ei.get("ids_digest"),
                         NEW_OUT + "point --images at the list the set was made from")
        check_options(existing, header, out, error=SetMismatchError)
        eo = existing.get("options", {})
        if eo.get("box_selection", "detectron2") != self.options.box_selection:
            raise refuse(SetMismatchError, out, "with another --box-selection",
                         self.options.box_selection, eo.get("box_selection", "detectron2"),
                         NEW_OUT + "re-run with the set's options")
        diff = attrs.compare_options(existing, header)
        if diff:
            raise refuse(SetMismatchError, out, "with other --attributes options", *diff,
                         NEW_OUT + "re-run with the set's options")

    def start_event(self, indices: list[int]) -> tuple[str, dict]:
        det, cfg, src = self.det, self.options, self.source
        return (f"proposals: {len(src)} images from {cfg.images} ({src.kind}), "
                f"{cfg.num_shards} shard(s), running {format_shards(indices)}; detector "
                f"{det.name} ({det.kind}, D={det.feature_dim}) on {cfg.device}",
                dict(images=len(src), **self.start_fields(indices)))

    def shard(self, index: int) -> _Shard:
        a, b = self.ranges[index]
        return _Shard(self, index, self.source.records[a:b])

    def run_batch(self, items: list[DecodedItem], payloads: list) -> list[ImageRegions]:
        o = self.options
        return run_batch(self.det, items, o.selection, self.feature_dtype, o.box_selection,
                         o.attributes)


def run_proposals(cfg: ProposalsConfig, progress: Progress | None = None,
                  detector: Detector | None = None) -> ProposalsResult:
    """Run ``proposals`` for the selected shards.

    Args:
        cfg: the options.
        progress: where progress goes (default from ``cfg.log_format``/``cfg.progress``).
        detector: an already loaded detector for ``cfg.config``/``cfg.weights`` (benchmarks
            reuse one); loaded from ``cfg`` when None.

    Returns:
        The finished shards and the failure count; the caller decides the exit code from
        ``failures_exceeded``.
    """
    progress = progress or Progress(cfg.log_format, enabled=cfg.progress)
    limit = FailureLimit.parse(cfg.max_failures)
    if cfg.batch_size < 1 or cfg.num_workers < 0 or cfg.num_shards < 1:
        raise ValueError("need --batch-size >= 1, --num-workers >= 0, --num-shards >= 1")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"--backend {cfg.backend!r}: expected hdf5 or zarr")
    if cfg.feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"--feature-dtype {cfg.feature_dtype!r}: expected float16 or float32")
    source = open_image_source(cfg.images, cfg.image_root)
    indices = resolve_shard_indices(cfg.shard_index, cfg.num_shards)
    det = detector or Detector.load(cfg.config, cfg.weights, device=cfg.device,
                                    precision=cfg.precision, trust_pickle=cfg.trust_pickle,
                                    opts=cfg.opts)
    attrs.check_attributes(det.pooler, cfg.attributes)
    job = ProposalsJob(det, source, cfg)
    runs = run_job(job, indices, progress)
    infos = [r.info for r in runs]
    total = sum(job.ranges[i][1] - job.ranges[i][0] for i in indices)
    failed = sum(len(info["failures"]) for info in infos)
    result = ProposalsResult(infos, total, failed, limit, sum(r.compute_s for r in runs))
    progress.event("summary", f"proposals: {total} images in {len(indices)} shard(s), "
                   f"{failed} failed (limit {limit.allowed(total):.4g})"
                   + (": TOO MANY FAILURES" if result.failures_exceeded else ""),
                   images=total, failed=failed, allowed=limit.allowed(total),
                   exceeded=result.failures_exceeded)
    return result


__all__ = ["ProposalsConfig", "ProposalsResult", "ProposalsJob", "run_proposals", "run_batch",
           "run_window", "SetMismatchError", "ROLE"]
