"""Region features pooled over *given* boxes, and the box frames they are pooled in.

This is the one place that knows how a detectron2 ROI head turns boxes into feature vectors:

- C4 (``Res5ROIHeads``): ROIAlign on the single backbone level, the res5 stage
  (``roi_heads._shared_roi_transform``), then the spatial mean: ``(N, 2048)`` for an R50.
- FPN (``StandardROIHeads``): the multi-level ``box_pooler`` then ``box_head``: ``(N, FC_DIM)``.

These are exactly the vectors the model's own ``box_predictor`` classifies, so the stored
features are the detector's region representation. Nothing here thresholds, re-sorts,
regresses or drops a box: one output row per input box, in input order (unlike
``roi_heads(...)`` inference or ``PrecomputedProposals``). ``proposals`` uses it over the
detector's final boxes; ``teacher-features`` over another detector's boxes.

Boxes are stored in original-image pixels and pooled in the model's resized frame;
:func:`boxes_to_resized` and :func:`boxes_to_original` map between the two the way detectron2's
``ResizeTransform.apply_box`` and ``detector_postprocess`` do (per-axis scale, then clip).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from detectron2.modeling.roi_heads import Res5ROIHeads, StandardROIHeads
from detectron2.structures import Boxes
from torch import nn


class UnsupportedROIHeadsError(TypeError):
    """The model's ROI heads are neither C4 (Res5ROIHeads) nor single-stage FPN heads."""


def roi_heads_kind(roi_heads: nn.Module) -> str:
    """``"C4"`` for ``Res5ROIHeads``, ``"FPN"`` for ``StandardROIHeads`` with one box head.

    Raises:
        UnsupportedROIHeadsError: other heads (e.g. Cascade R-CNN, whose box heads are a list).
    """
    if isinstance(roi_heads, Res5ROIHeads):
        return "C4"
    if isinstance(roi_heads, StandardROIHeads) and not isinstance(
            getattr(roi_heads, "box_head", None), nn.ModuleList):
        return "FPN"
    raise UnsupportedROIHeadsError(
        f"ROI heads {type(roi_heads).__name__} are not supported: expected Res5ROIHeads (C4) or "
        "StandardROIHeads (FPN) with a single box head; use a config whose "
        "MODEL.ROI_HEADS.NAME is one of those")


def feature_dim(roi_heads: nn.Module) -> int:
    """Length D of one pooled region feature (the box predictor's input width)."""
    roi_heads_kind(roi_heads)
    return int(roi_heads.box_predictor.cls_score.in_features)


@torch.no_grad()
def pool_box_features(roi_heads: nn.Module, features: dict[str, torch.Tensor],
                      boxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pool one feature vector per given box from one backbone pass.

    Args:
        roi_heads: ``model.roi_heads`` of a C4 or FPN detectron2 model (eval mode).
        features: backbone output for a batch of B images, ``{name: (B, C, H', W')}``.
        boxes: B tensors ``(n_i, 4)``, x1 y1 x2 y2 in the *resized* (network input) frame of
            image i; ``n_i`` may be 0.

    Returns:
        ``(sum n_i, D)``: rows of image 0's boxes in order, then image 1's, and so on.
    """
    kind = roi_heads_kind(roi_heads)
    total = sum(int(b.shape[0]) for b in boxes)
    dim = feature_dim(roi_heads)
    ref = next(iter(features.values()))
    if total == 0:
        return ref.new_zeros((0, dim))
    box_lists = [Boxes(b.to(device=ref.device, dtype=torch.float32)) for b in boxes]
    if kind == "C4":
        x = roi_heads._shared_roi_transform([features[f] for f in roi_heads.in_features],
                                            box_lists)  # (N, C5, 7, 7)
        return x.mean(dim=[2, 3])  # (N, C5): what Res5ROIHeads feeds its box_predictor
    x = roi_heads.box_pooler([features[f] for f in roi_heads.box_in_features], box_lists)
    return roi_heads.box_head(x)  # (N, FC_DIM)


@torch.no_grad()
def classify_box_features(roi_heads: nn.Module,
                          pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own object tag for pooled region features.

    Args:
        roi_heads: as in :func:`pool_box_features`.
        pooled: ``(N, D)`` from :func:`pool_box_features`.

    Returns:
        ``scores (N,)`` float32, the probability of the best foreground class, and
        ``classes (N,)`` int64 in ``0..K-1`` (the background column is excluded).
    """
    if pooled.shape[0] == 0:
        return (pooled.new_zeros((0,), dtype=torch.float32),
                torch.zeros((0,), dtype=torch.int64, device=pooled.device))
    logits, _ = roi_heads.box_predictor(pooled)
    if getattr(roi_heads.box_predictor, "use_sigmoid_ce", False):
        probs = logits.float().sigmoid()
    else:
        probs = torch.softmax(logits.float(), dim=-1)
    scores, classes = probs[:, :-1].max(dim=1)
    return scores, classes


def _scale(orig_hw: tuple[int, int], resized_hw: tuple[int, int]) -> np.ndarray:
    (h, w), (rh, rw) = orig_hw, resized_hw
    return np.array([rw / w, rh / h, rw / w, rh / h], dtype=np.float64)


def boxes_to_resized(boxes: np.ndarray | torch.Tensor, orig_hw: tuple[int, int],
                     resized_hw: tuple[int, int]) -> torch.Tensor:
    """Map boxes from original-image pixels into a model's resized frame.

    Args:
        boxes: ``(n, 4)`` x1 y1 x2 y2 in original pixels.
        orig_hw: original (height, width).
        resized_hw: the model's input (height, width) after ResizeShortestEdge.

    Returns:
        ``(n, 4)`` float32 tensor: ``boxes * (rw/w, rh/h, rw/w, rh/h)`` (computed in float64,
        as ``ResizeTransform.apply_coords`` does, then rounded to float32).
    """
    b = boxes.detach().cpu().numpy() if isinstance(boxes, torch.Tensor) else np.asarray(boxes)
    out = b.astype(np.float64).reshape(-1, 4) * _scale(orig_hw, resized_hw)
    return torch.from_numpy(out.astype(np.float32))


def boxes_to_original(boxes: torch.Tensor, orig_hw: tuple[int, int],
                      resized_hw: tuple[int, int]) -> np.ndarray:
    """Map boxes from the resized frame to original pixels, clipped to the image (as
    ``detector_postprocess`` does).

    Returns:
        ``(n, 4)`` float32 array.
    """
    b = boxes.detach().float().cpu().numpy().astype(np.float64).reshape(-1, 4)
    out = b / _scale(orig_hw, resized_hw)
    h, w = orig_hw
    out[:, 0::2] = out[:, 0::2].clip(0, w)
    out[:, 1::2] = out[:, 1::2].clip(0, h)
    return out.astype(np.float32)
