"""`vlkd-extract proposals`: a detector's final boxes and its own features over them.

For every image of a source (sorted by id, split into contiguous shards) the job runs one
backbone pass, detects (RPN, box head, score threshold, per-class NMS, at most ``max_boxes``,
topped up to ``min_boxes``), stores the boxes in original-image pixels, and pools the same
backbone features over exactly the stored boxes (mapped back into the resized frame), so every
feature row describes its box: never the pre-regression proposal it came from.

Batching never changes an image's result: images are batched only with images of the same
padded size (``jobs.same_size_batches``), within fixed windows of the shard's list; a window
is committed as a whole, so a resumed job re-forms exactly the batches an uninterrupted one
would have.
"""
from __future__ import annotations

import datetime as _dt
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from vlkd import __version__
from vlkd.common.manifest import update_manifest
from vlkd.common.regionset import ShardWriter
from vlkd.common.sharding import resolve_shard_indices, shard_ranges
from vlkd.data.images import ImageSource, open_image_source

from .detector import BoxSelection, Detector
from .jobs import (BackgroundWriter, JobOptions, DecodeDataset, DecodedItem, FailureLimit, Progress,
                   check_set_header, decode_batches, release_free_memory, same_size_batches,
                   short)
from .pooling import boxes_to_original, boxes_to_resized, pool_box_features

ROLE = "proposals"


class SetMismatchError(RuntimeError):
    """``--out`` holds a set made with other settings (message says which and what to do)."""


@dataclass(kw_only=True)
class ProposalsConfig(JobOptions):
    """Options of ``vlkd-extract proposals`` (the CLI fills this; defaults are the CLI's).
    Besides :class:`~vlkd.extract.jobs.JobOptions`:

    Attributes:
        num_shards: shards of the set.
        backend: ``hdf5`` or ``zarr``.
        score_thresh, nms_thresh, min_boxes, max_boxes: box selection.
        max_failures: count, fraction or percentage (see ``FailureLimit``).
    """

    num_shards: int = 1
    backend: str = "hdf5"
    score_thresh: float = 0.2
    nms_thresh: float = 0.5
    min_boxes: int = 10
    max_boxes: int = 100
    max_failures: str = "1%"


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


# --------------------------------------------------------------------------------- manifest

def _header(det: Detector, source: ImageSource, cfg: ProposalsConfig,
            sel: BoxSelection) -> dict:
    return {
        "schema_version": 1,
        "role": ROLE,
        "detector": det.manifest_info(),
        "preprocessing": det.preprocessing.manifest_info(),
        "feature_dim": det.feature_dim,
        "feature_dtype": cfg.feature_dtype,
        "backend": cfg.backend,
        "class_names": det.class_names,
        "num_shards": cfg.num_shards,
        "image_source": source.manifest_info(),
        "tool_version": __version__,
        "options": {**asdict(sel), "precision": cfg.precision, "max_pixels": cfg.max_pixels,
                    "features": f"pooled over the stored boxes ({det.kind}: "
                                + ("res5 + mean pool" if det.kind == "C4"
                                   else "box_pooler + box_head") + ")"},
    }


def _compare(existing: dict, header: dict, out: str) -> None:
    """Refuse to add to a set made with other settings."""
    def refuse(what: str, here, there, fix: str) -> None:
        raise SetMismatchError(
            f"--out {out} holds a region set made with {what} ({short(there)} in its "
            f"manifest.json, {short(here)} now); {fix}")

    fix_new = "write to a new --out directory, or "
    check_set_header(existing, header, out, error=SetMismatchError, role=ROLE,
                     detector="detector")
    ei, hi = existing.get("image_source", {}), header["image_source"]
    if ei.get("ids_digest") != hi["ids_digest"]:
        refuse("another image list (ids digest)", hi["ids_digest"], ei.get("ids_digest"),
               fix_new + "point --images at the list the set was made from")
    eo, ho = existing.get("options", {}), header["options"]
    for key, value in ho.items():
        if eo.get(key) != value:
            refuse(f"another --{key.replace('_', '-')}", value, eo.get(key),
                   fix_new + "re-run with the set's options")


def prepare_set(out: str, header: dict) -> dict:
    """Write the set's header into ``out/manifest.json``, or check it against an existing one.

    Concurrent array jobs serialise on the manifest lock; the first writes the header, the
    others find it and compare.
    """
    def fn(m: dict) -> dict:
        if m.get("role") is None and "detector" not in m:
            created = m.get("created") or _dt.datetime.now(_dt.timezone.utc).isoformat(
                timespec="seconds")
            return {**header, **{k: v for k, v in m.items() if k in ("shards", "failures")},
                    "created": created}
        _compare(m, header, out)
        return m
    return update_manifest(out, fn)


# ------------------------------------------------------------------------------------ batch

@dataclass
class ImageResult:
    """One image's stored regions."""

    item: DecodedItem
    boxes: np.ndarray       # (n, 4) float32, original pixels
    scores: np.ndarray      # (n,) float32
    classes: np.ndarray     # (n,) int32
    features: np.ndarray    # (n, D) stored dtype


@torch.inference_mode()
def run_batch(det: Detector, items: list[DecodedItem], sel: BoxSelection,
              feature_dtype: str) -> list[ImageResult]:
    """Detect on a batch (images of one padded size) and pool features over the final boxes.

    Returns:
        One result per item, in order.
    """
    image_list, features = det.backbone_features([it.image for it in items])
    dets = det.detect(image_list, features, sel)
    stored, pool_boxes = [], []
    for it, d, rhw in zip(items, dets, image_list.image_sizes):
        rhw = (int(rhw[0]), int(rhw[1]))
        b = boxes_to_original(d.boxes, it.orig_hw, rhw)       # what the set stores
        stored.append(b)
        pool_boxes.append(boxes_to_resized(b, it.orig_hw, rhw))  # exactly those boxes
    with det.autocast():
        pooled = pool_box_features(det.roi_heads, features, pool_boxes)
    tdtype = torch.float16 if feature_dtype == "float16" else torch.float32
    pooled = pooled.float().to(tdtype).cpu().numpy()  # cast on the device: half the copy
    out, r = [], 0
    for it, d, b in zip(items, dets, stored):
        n = b.shape[0]
        out.append(ImageResult(it, b, d.scores.float().cpu().numpy(),
                               d.classes.cpu().numpy().astype(np.int32), pooled[r:r + n]))
        r += n
    return out


def run_window(det: Detector, items: list[DecodedItem], sel: BoxSelection, batch_size: int,
               feature_dtype: str) -> list[ImageResult | DecodedItem]:
    """All images of one window: same-padded-size batches; results in item order (a failed
    item stands for itself)."""
    results: dict[int, ImageResult] = {}
    for batch in same_size_batches(items, det.padded_hw, batch_size):
        for res in run_batch(det, batch, sel, feature_dtype):
            results[res.item.position] = res
        # A forward pass frees hundreds of MB of host tensors on CPU; handing them back keeps
        # peak RSS flat over a long job (see release_free_memory).
        release_free_memory()
    return [results.get(it.position, it) for it in items]


# ------------------------------------------------------------------------------------ shard

def _write_window(writer: ShardWriter, results: list) -> None:
    for res in results:
        if isinstance(res, ImageResult):
            it = res.item
            writer.append(it.image_id, it.orig_hw, res.boxes, res.scores, res.classes,
                          res.features, image_digest=it.digest)
        else:
            writer.add_failure(res.image_id, res.error)
    writer.commit()  # windows are the unit of resume: commit exactly at their ends


def run_shard(det: Detector, source: ImageSource, cfg: ProposalsConfig, sel: BoxSelection,
              index: int, progress: Progress) -> tuple[dict, float]:
    """Write (or resume, or re-record) shard ``index``.

    Returns:
        The shard's manifest entry, and the seconds spent computing (``run_window``: the
        network and box selection), the rest of the wall time being the pipeline's.
    """
    a, b = shard_ranges(len(source), cfg.num_shards)[index]
    records = source.records[a:b]
    W = cfg.window_size()
    with ShardWriter(cfg.out, index, cfg.num_shards, backend=cfg.backend,
                     feature_dim=det.feature_dim, feature_dtype=cfg.feature_dtype,
                     commit_every=W + 1, attrs={"role": ROLE}) as writer:
        if writer.complete:
            info = writer.finalize()  # already built: make sure the manifest lists it
            progress.event("shard_done", f"shard {index}: already complete "
                           f"({info['num_images']} images)", shard=index, resumed=True,
                           **_info_fields(info))
            return info, 0.0
        done = set(writer.committed_ids) | set(writer.failed_ids)
        todo, groups = [], []
        for pos, r in enumerate(records):
            if r.image_id not in done:
                todo.append(r)
                groups.append(pos // W)
        if done:
            progress.event("resume", f"shard {index}: resuming, {len(done)} of {len(records)}"
                           " images already committed", shard=index, committed=len(done))
        progress.start(len(records), f"shard {index}/{cfg.num_shards}", initial=len(done),
                       shard=index)
        dataset = DecodeDataset(todo, groups, det.preprocessing, cfg.max_pixels)
        bg = BackgroundWriter(max_pending=2)
        compute = [0.0]
        try:
            window: list[DecodedItem] = []

            def flush() -> None:
                t0 = time.perf_counter()
                results = run_window(det, window, sel, cfg.batch_size, cfg.feature_dtype)
                compute[0] += time.perf_counter() - t0
                bg.submit(lambda: _write_window(writer, results))
                progress.update(len(window), failed=sum(isinstance(r, DecodedItem)
                                                        for r in results))
            for batch in decode_batches(dataset, batch_size=cfg.batch_size,
                                        num_workers=cfg.num_workers,
                                        pin_memory=det.device.type == "cuda",
                                        prefetch_items=2 * W):
                if window and batch[0].group != window[0].group:
                    flush()
                    window = []
                window.extend(batch)
            if window:
                flush()
            bg.close()
        except BaseException:
            bg.abandon()
            raise
        finally:
            stats = progress.finish()
        info = writer.finalize()
    progress.event("shard_done", f"shard {index}: {info['num_images']} images, "
                   f"{info['num_regions']} regions, {len(info['failures'])} failed "
                   f"({stats['images_per_s']:.2f} img/s)", shard=index, **_info_fields(info),
                   images_per_s=stats["images_per_s"], compute_s=round(compute[0], 3))
    return info, compute[0]


def _info_fields(info: dict) -> dict:
    return {"name": info["name"], "num_images": info["num_images"],
            "num_regions": info["num_regions"], "num_failed": len(info["failures"])}


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
    if cfg.backend not in ("hdf5", "zarr"):
        raise ValueError(f"--backend {cfg.backend!r}: expected hdf5 or zarr")
    if cfg.feature_dtype not in ("float16", "float32"):
        raise ValueError(f"--feature-dtype {cfg.feature_dtype!r}: expected float16 or float32")
    sel = BoxSelection(score_thresh=cfg.score_thresh, nms_thresh=cfg.nms_thresh,
                       min_boxes=cfg.min_boxes, max_boxes=cfg.max_boxes)
    source = open_image_source(cfg.images, cfg.image_root)
    indices = resolve_shard_indices(cfg.shard_index, cfg.num_shards)
    det = detector or Detector.load(cfg.config, cfg.weights, device=cfg.device,
                                    precision=cfg.precision, trust_pickle=cfg.trust_pickle,
                                    opts=cfg.opts)
    prepare_set(cfg.out, _header(det, source, cfg, sel))
    progress.event("start", f"proposals: {len(source)} images from {cfg.images} "
                   f"({source.kind}), {cfg.num_shards} shard(s), running {_fmt(indices)}; "
                   f"detector {det.name} ({det.kind}, D={det.feature_dim}) on {cfg.device}",
                   images=len(source), num_shards=cfg.num_shards, shards=indices,
                   detector=det.name, kind=det.kind, feature_dim=det.feature_dim,
                   device=cfg.device, out=str(Path(cfg.out)))
    infos, total, failed, compute = [], 0, 0, 0.0
    ranges = shard_ranges(len(source), cfg.num_shards)
    for i in indices:
        info, seconds = run_shard(det, source, cfg, sel, i, progress)
        compute += seconds
        infos.append(info)
        total += ranges[i][1] - ranges[i][0]
        failed += len(info["failures"])
    result = ProposalsResult(infos, total, failed, limit, compute)
    progress.event("summary", f"proposals: {total} images in {len(indices)} shard(s), "
                   f"{failed} failed (limit {limit.allowed(total):.4g})"
                   + (": TOO MANY FAILURES" if result.failures_exceeded else ""),
                   images=total, failed=failed, allowed=limit.allowed(total),
                   exceeded=result.failures_exceeded)
    return result


def _fmt(indices: list[int]) -> str:
    if len(indices) == 1:
        return f"shard {indices[0]}"
    return f"shards {indices[0]}..{indices[-1]}" if indices == list(
        range(indices[0], indices[-1] + 1)) else f"shards {indices}"


__all__ = ["ProposalsConfig", "ProposalsResult", "run_proposals", "run_batch", "run_window",
           "prepare_set", "SetMismatchError", "ROLE"]
