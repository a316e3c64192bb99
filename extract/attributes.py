"""Per-box attributes (``--attributes``): the detector's attribute head over the stored boxes.

A detector family with an attribute head (``PoolerFamily.num_attributes > 0``: a VinVL detector
converted by ``vlkd-extract convert-detector --from vinvl``) predicts, for each pooled region
feature and its object class, a distribution over A attributes plus "no attribute". Which of
them a box keeps is scene_graph_benchmark's rule, ``AttributePostProcessor.filter_results``
(``scene_graph_benchmark/attribute_head/inference.py``), written out in
:func:`select_attributes`:

1. the "no attribute" probability is set to 0, then every probability not above
   ``score_thresh`` (SGB's ``POSTPROCESS_ATTRIBUTES_THRESHOLD``) too;
2. if more than ``max_per_image`` (``MAX_NUM_ATTR_PER_IMG``) probabilities of the image are left,
   those below the ``(n - max_per_image + 1)``-th smallest value of the image's whole score
   matrix are zeroed -- SGB takes that order statistic over every entry, the zeroed ones
   included, so the cap keeps ``max_per_image`` plus the number of zeroed entries, often all;
3. the ``top_k`` (``MAX_NUM_ATTR_PER_OBJ``) best per box, best first.

The object class is the box's: the detection's class in ``proposals``, the teacher's class in
``teacher-features`` (as SGB predicts attributes for its detections' labels). A set stores them
as the optional arrays ``attr_ids`` (int32, ``(R, top_k)``, -1 in an empty slot) and
``attr_scores`` (float32, 0 in an empty slot), with the names in the manifest's
``attribute_names`` (docs/FORMAT.md, "Optional arrays").
"""
from __future__ import annotations

import numpy as np
import torch

from .options import AttributeOptions
from .pooling import PoolerFamily

ATTR_IDS, ATTR_SCORES = "attr_ids", "attr_scores"
#: The manifest key listing the names of the ids in ``attr_ids``.
ATTRIBUTE_NAMES_KEY = "attribute_names"


class AttributesError(ValueError):
    """``--attributes`` cannot be used with this detector (the message says why)."""


def attribute_extras(opts: AttributeOptions) -> dict | None:
    """The optional arrays a set made with ``opts`` declares (None without ``--attributes``)."""
    if not opts.enabled:
        return None
    return {ATTR_IDS: ("int32", opts.top_k), ATTR_SCORES: ("float32", opts.top_k)}


def check_attributes(family: PoolerFamily, opts: AttributeOptions) -> None:
    """Refuse ``--attributes`` for a detector without an attribute head, or a ``top_k`` larger
    than its attribute count."""
    if not opts.enabled:
        return
    a = family.num_attributes
    if a == 0:
        raise AttributesError(
            f"--attributes: the detector ({family.kind}, {type(family.roi_heads).__name__}) has "
            "no attribute head; use a detector that predicts attributes (a VinVL detector "
            "converted with `vlkd-extract convert-detector --from vinvl`) or leave --attributes "
            "out")
    if opts.top_k > a:
        raise AttributesError(f"--attr-top-k {opts.top_k} is more than the detector's {a} "
                              "attributes; pass at most that many")


def header_options(opts: AttributeOptions) -> dict:
    """The manifest ``options`` entry of ``--attributes`` (nothing without it, so sets made
    without attributes keep the options they always had)."""
    if not opts.enabled:
        return {}
    return {"attributes": {"top_k": opts.top_k, "score_thresh": opts.score_thresh,
                           "max_per_image": opts.max_per_image}}


def compare_options(existing: dict, header: dict) -> tuple[object, object] | None:
    """``(this run's, the set's)`` attribute options when they differ, else None."""
    here = header.get("options", {}).get("attributes")
    there = existing.get("options", {}).get("attributes")
    return None if here == there else (here, there)


@torch.no_grad()
def select_attributes(probs: torch.Tensor, *, top_k: int, score_thresh: float,
                      max_per_image: int) -> tuple[np.ndarray, np.ndarray]:
    """One image's attributes by SGB's ``AttributePostProcessor.filter_results``.

    Args:
        probs: ``(n, A + 1)`` attribute probabilities of the image's boxes, "no attribute" last.
        top_k, score_thresh, max_per_image: the rule's parameters (module docstring).

    Returns:
        ``ids (n, top_k)`` int32 in 0..A-1 (-1: empty slot) and ``scores (n, top_k)`` float32
        (0 in an empty slot), best first.
    """
    n, a = probs.shape[0], probs.shape[1] - 1
    if n == 0:
        return np.zeros((0, top_k), np.int32), np.zeros((0, top_k), np.float32)
    # SGB's layout: column 0 is "no attribute" (zeroed), column j attribute j - 1 here.
    scores = torch.cat([torch.zeros_like(probs[:, :1]), probs[:, :a]], dim=1).float()
    above = scores > score_thresh
    n_det = int(above.sum())
    scores[~above] = 0.0
    if n_det > max_per_image > 0:
        kth, _ = torch.kthvalue(scores.flatten().cpu(), n_det - max_per_image + 1)
        scores[scores < kth.item()] = 0.0
    vals, labels = torch.topk(scores, top_k, dim=1)
    ids = labels - 1
    empty = vals <= 0
    ids[empty] = -1
    vals = vals.masked_fill(empty, 0.0)
    return ids.cpu().numpy().astype(np.int32), vals.cpu().numpy().astype(np.float32)


@torch.no_grad()
def attribute_rows(family: PoolerFamily, pooled: torch.Tensor, classes: torch.Tensor,
                   counts: list[int], opts: AttributeOptions) -> list[dict[str, np.ndarray]]:
    """The optional arrays of a batch of images (``{}`` per image without ``--attributes``).

    Args:
        family: the detector's pooler family (with an attribute head).
        pooled: ``(sum n_i, D)`` pooled features, image after image.
        classes: ``(sum n_i,)`` the boxes' object classes.
        counts: ``n_i`` per image.
        opts: the attribute options.
    """
    if not opts.enabled:
        return [{} for _ in counts]
    probs = family.attribute_probs(pooled, classes) if pooled.shape[0] else \
        pooled.new_zeros((0, family.num_attributes + 1), dtype=torch.float32)
    out, r = [], 0
    for n in counts:
        ids, scores = select_attributes(probs[r:r + n], top_k=opts.top_k,
                                        score_thresh=opts.score_thresh,
                                        max_per_image=opts.max_per_image)
        out.append({ATTR_IDS: ids, ATTR_SCORES: scores})
        r += n
    return out


__all__ = ["ATTR_IDS", "ATTR_SCORES", "ATTRIBUTE_NAMES_KEY", "AttributesError",
           "attribute_extras", "check_attributes", "header_options", "compare_options",
           "select_attributes", "attribute_rows"]
