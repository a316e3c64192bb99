"""Region features pooled over *given* boxes, the registry of ROI-head families that know how,
and the box frames they are pooled in.

This is the one place that knows how a detector's ROI head turns boxes into feature vectors.
Each *family* of ROI heads registers in :data:`POOLERS` how it pools over given boxes, how long
its feature is, and how its box predictor classifies a pooled feature:

- ``C4`` (``Res5ROIHeads``): ROIAlign on the single backbone level, the res5 stage
  (``roi_heads._shared_roi_transform``), then the spatial mean: ``(N, 2048)`` for an R50.
- ``FPN`` (``StandardROIHeads`` with one box head): the multi-level ``box_pooler`` then
  ``box_head``: ``(N, FC_DIM)``.

These are exactly the vectors the model's own ``box_predictor`` classifies, so the stored
features are the detector's region representation. Nothing here thresholds, re-sorts,
regresses or drops a box: one output row per input box, in input order (unlike
``roi_heads(...)`` inference or ``PrecomputedProposals``). ``proposals`` uses it over the
detector's final boxes; ``teacher-features`` over another detector's boxes.

Adding a family (a converted VinVL head, an EfficientNet/BiFPN head, your own) is one class:

    from vlkd.extract.pooling import POOLERS, PoolerFamily

    @POOLERS.register()
    class MyFamily(PoolerFamily):
        kind = "MINE"                        # the manifest's detector kind
        description = "my pooler + my head"  # the manifest's options.features
        heads = (MyROIHeads,)                # ROI-head classes it serves (subclasses too)

        def pool(self, features, boxes):     # -> (sum n_i, D), one row per box, in order
            x = self.roi_heads.my_pooler([features[f] for f in self.roi_heads.in_features], boxes)
            return self.roi_heads.my_head(x)

and, to use it from the command line, a module that ``vlkd-extract --plugin`` imports
(``vlkd.extract.plugins``). ``feature_dim`` and ``classify`` default to detectron2's
``FastRCNNOutputLayers`` (``box_predictor.cls_score``); override them when the head differs.

Boxes are stored in original-image pixels and pooled in the model's resized frame;
:func:`boxes_to_resized` and :func:`boxes_to_original` map between the two the way detectron2's
``ResizeTransform.apply_box`` and ``detector_postprocess`` do (per-axis scale, then clip).
"""
from __future__ import annotations

from typing import ClassVar, Sequence

import numpy as np
import torch
from detectron2.modeling.roi_heads import Res5ROIHeads, StandardROIHeads
from detectron2.structures import Boxes
from detectron2.utils.registry import Registry
from torch import nn


class UnsupportedROIHeadsError(TypeError):
    """No registered family pools over the model's ROI heads (or its family refuses them)."""


POOLERS = Registry("POOLERS")
POOLERS.__doc__ = """
Registry of ROI-head families: how region features are pooled over *given* boxes.

A family is a :class:`PoolerFamily` subclass, registered by class name, that serves the ROI-head
classes in its ``heads`` (and their subclasses; for a given head the family registered for the
nearest class in its MRO wins, so a family for a subclass of ``Res5ROIHeads`` takes precedence
over ``C4``). An instance is bound to one model's ``roi_heads`` and must honour:

- ``pool(features, boxes)``: ``features`` is the backbone output of B images
  ``{name: (B, C, H', W')}``, ``boxes`` B ``Boxes`` in each image's resized frame (float32, on
  the features' device, at least one box in all). Returns ``(sum n_i, D)``: image 0's boxes'
  rows in order, then image 1's... -- exactly one row per given box, never thresholded,
  re-sorted, regressed or dropped, and the vector the family's box predictor classifies.
- ``feature_dim``: D.
- ``classify(pooled)``: ``(scores (N,) float32, classes (N,) int64 in 0..K-1)``, the model's
  own best foreground class for each pooled feature and its probability.
- ``kind`` (the manifest's ``detector.kind``) and ``description`` (how ``options.features``
  describes the pooling). Changing either changes the manifests of new sets, so a family's
  strings are part of the format: do not reword them.
- optionally, an attribute head: ``num_attributes`` (A; 0, the default, when the head predicts
  none) and ``attribute_probs(pooled, classes)``: ``(N, A + 1)`` attribute probabilities of each
  pooled feature given its object class (0..K-1), the "no attribute" column last (detectron2's
  background convention). ``--attributes`` stores the best of them (``vlkd.extract.attributes``).
"""


class PoolerFamily:
    """A family of ROI heads and how it pools over given boxes (contract: :data:`POOLERS`).

    Args:
        roi_heads: ``model.roi_heads`` of a model whose heads the family serves (eval mode).

    Raises:
        UnsupportedROIHeadsError: the family refuses these heads (:meth:`check`).
    """

    kind: ClassVar[str]
    description: ClassVar[str]
    heads: ClassVar[tuple[type, ...]]

    def __init__(self, roi_heads: nn.Module):
        self.roi_heads = roi_heads
        self.check()

    def check(self) -> None:
        """Refuse heads of a served class that this family cannot pool for (default: none)."""

    def pool(self, features: dict[str, torch.Tensor], boxes: list[Boxes]) -> torch.Tensor:
        """``(sum n_i, D)``: one feature row per given box, in order."""
        raise NotImplementedError

    @property
    def feature_dim(self) -> int:
        """Length D of one pooled region feature (the box predictor's input width)."""
        return int(self.roi_heads.box_predictor.cls_score.in_features)

    def classify(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The box predictor's best foreground class and its probability per pooled feature
        (softmax, or sigmoid when the predictor uses sigmoid cross-entropy; the background
        column is excluded)."""
        logits, _ = self.roi_heads.box_predictor(pooled)
        if getattr(self.roi_heads.box_predictor, "use_sigmoid_ce", False):
            probs = logits.float().sigmoid()
        else:
            probs = torch.softmax(logits.float(), dim=-1)
        scores, classes = probs[:, :-1].max(dim=1)
        return scores, classes

    @property
    def num_attributes(self) -> int:
        """A, the attributes the head predicts per box (0: the head has no attribute head)."""
        return 0

    def attribute_probs(self, pooled: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """``(N, A + 1)`` attribute probabilities of pooled features given their classes
        (0..K-1), the "no attribute" column last.

        Raises:
            UnsupportedROIHeadsError: the family's heads predict no attributes.
        """
        raise UnsupportedROIHeadsError(
            f"the {self.kind} detector ({type(self.roi_heads).__name__}) has no attribute head;"
            " --attributes needs one (a VinVL detector converted with `vlkd-extract "
            "convert-detector --from vinvl` from a checkpoint with MODEL.ATTRIBUTE_ON)")


@POOLERS.register()
class C4Family(PoolerFamily):
    """``Res5ROIHeads``: ROIAlign on the single level, the res5 stage, the spatial mean."""

    kind = "C4"
    description = "res5 + mean pool"
    heads = (Res5ROIHeads,)

    def pool(self, features, boxes):
        rh = self.roi_heads
        x = rh._shared_roi_transform([features[f] for f in rh.in_features], boxes)  # (N, C5, 7, 7)
        return x.mean(dim=[2, 3])  # (N, C5): what Res5ROIHeads feeds its box_predictor


@POOLERS.register()
class FPNFamily(PoolerFamily):
    """``StandardROIHeads`` with one box head: the multi-level box pooler, then the box head."""

    kind = "FPN"
    description = "box_pooler + box_head"
    heads = (StandardROIHeads,)

    def check(self) -> None:
        if isinstance(getattr(self.roi_heads, "box_head", None), nn.ModuleList):
            raise _unsupported(self.roi_heads)  # Cascade R-CNN: one box head per stage

    def pool(self, features, boxes):
        rh = self.roi_heads
        x = rh.box_pooler([features[f] for f in rh.box_in_features], boxes)
        return rh.box_head(x)  # (N, FC_DIM)


def _unsupported(roi_heads: nn.Module) -> UnsupportedROIHeadsError:
    known = ", ".join(f"{fam.kind} ({'/'.join(h.__name__ for h in fam.heads)})"
                      for _, fam in POOLERS)
    return UnsupportedROIHeadsError(
        f"ROI heads {type(roi_heads).__name__} are not supported: expected Res5ROIHeads (C4) or "
        "StandardROIHeads (FPN) with a single box head; use a config whose "
        f"MODEL.ROI_HEADS.NAME is one of those (registered families: {known}), or register "
        "a family for these heads in vlkd.extract.pooling.POOLERS (load it with --plugin)")


def family_class(roi_heads: nn.Module) -> type[PoolerFamily]:
    """The registered family serving ``roi_heads``: the one registered for the nearest class
    in its MRO.

    Raises:
        UnsupportedROIHeadsError: no family serves these heads.
    """
    for cls in type(roi_heads).__mro__:
        for _, fam in POOLERS:
            if cls in fam.heads:
                return fam
    raise _unsupported(roi_heads)


def pooler_for(roi_heads: nn.Module) -> PoolerFamily:
    """The family serving ``roi_heads``, bound to them.

    Raises:
        UnsupportedROIHeadsError: no family serves these heads, or it refuses them.
    """
    return family_class(roi_heads)(roi_heads)


def roi_heads_kind(roi_heads: nn.Module) -> str:
    """The family's kind: ``"C4"`` for ``Res5ROIHeads``, ``"FPN"`` for ``StandardROIHeads``
    with one box head, or a registered family's.

    Raises:
        UnsupportedROIHeadsError: other heads (e.g. Cascade R-CNN, whose box heads are a list).
    """
    return pooler_for(roi_heads).kind


def feature_dim(roi_heads: nn.Module) -> int:
    """Length D of one pooled region feature (the box predictor's input width)."""
    return pooler_for(roi_heads).feature_dim


@torch.no_grad()
def pool_box_features(roi_heads: nn.Module, features: dict[str, torch.Tensor],
                      boxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pool one feature vector per given box from one backbone pass.

    Args:
        roi_heads: ``model.roi_heads`` of a model with a registered family (eval mode).
        features: backbone output for a batch of B images, ``{name: (B, C, H', W')}``.
        boxes: B tensors ``(n_i, 4)``, x1 y1 x2 y2 in the *resized* (network input) frame of
            image i; ``n_i`` may be 0.

    Returns:
        ``(sum n_i, D)``: rows of image 0's boxes in order, then image 1's, and so on.
    """
    fam = pooler_for(roi_heads)
    total = sum(int(b.shape[0]) for b in boxes)
    ref = next(iter(features.values()))
    if total == 0:
        return ref.new_zeros((0, fam.feature_dim))
    box_lists = [Boxes(b.to(device=ref.device, dtype=torch.float32)) for b in boxes]
    return fam.pool(features, box_lists)


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
    return pooler_for(roi_heads).classify(pooled)


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
