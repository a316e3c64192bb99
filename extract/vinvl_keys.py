"""The key table of ``convert-detector --from vinvl``: each scene_graph_benchmark (SGB) checkpoint
key to its detectron2 key (:data:`KEY_TABLE`, :func:`match_key`), the block counts read from
the checkpoint, and :func:`translate` (background class first -> last, FrozenBatchNorm folded
with SGB's epsilon, :func:`fold_frozen_bn`). Which SGB file each rule follows is said in
:mod:`vlkd.extract.convert_vinvl`, which uses these and re-exports them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

__all__ = ["ConversionError", "KeyRule", "KEY_TABLE", "match_key", "block_counts", "translate",
           "fold_frozen_bn"]


class ConversionError(ValueError):
    """The inputs cannot be converted exactly (the message names the key, file or value)."""


_BN = r"(?P<p>weight|bias|running_mean|running_var)"


@dataclass(frozen=True)
class KeyRule:
    """One row of the key table: SGB keys matching ``pattern`` become ``target`` by ``kind``.

    ``kind``: ``copy``; ``frozen_bn`` (the four tensors of one FrozenBatchNorm folded, see the
    module docstring); ``bg_first_rows`` (row 0, the background, moved last); ``drop_bg_box``
    (the background's 4 regression rows dropped); ``anchors`` (SGB's anchor buffer, compared with
    the anchors ``VinVLAnchorGenerator`` makes; not stored); ``alias`` (the attribute head's
    shared feature extractor: must equal the box head's key ``target``; not stored); ``refuse``.
    """

    pattern: str
    target: str
    kind: str
    note: str = ""


def _block_rules(src: str, dst: str) -> list[KeyRule]:
    """A ResNet bottleneck block: SGB's Bottleneck vs detectron2's BottleneckBlock."""
    return [
        KeyRule(src + r"conv(?P<k>[123])\.weight", dst + "conv{k}.weight", "copy"),
        KeyRule(src + r"bn(?P<k>[123])\." + _BN, dst + "conv{k}.norm.{p}", "frozen_bn"),
        KeyRule(src + r"downsample\.0\.weight", dst + "shortcut.weight", "copy"),
        KeyRule(src + r"downsample\.1\." + _BN, dst + "shortcut.norm.{p}", "frozen_bn"),
    ]


#: The key table, SGB (``module.`` removed) -> detectron2, first matching rule wins.
KEY_TABLE: tuple[KeyRule, ...] = (
    KeyRule(r"backbone\.body\.stem\.conv1\.weight", "backbone.stem.conv1.weight", "copy"),
    KeyRule(r"backbone\.body\.stem\.bn1\." + _BN, "backbone.stem.conv1.norm.{p}", "frozen_bn"),
    *_block_rules(r"backbone\.body\.layer(?P<s>[123])\.(?P<b>\d+)\.",
                  "backbone.res{s1}.{b}."),
    *_block_rules(r"roi_heads\.box\.feature_extractor\.head\.layer4\.(?P<b>\d+)\.",
                  "roi_heads.res5.{b}."),
    KeyRule(r"roi_heads\.box\.feature_extractor\.trans_conv\..*", "", "refuse",
            "SGB's transition conv (BACKBONE_OUT_CHANNELS != 1024) has no detectron2 "
            "counterpart"),
    KeyRule(r"roi_heads\.box\.predictor\.cls_score\.(?P<p>weight|bias)",
            "roi_heads.box_predictor.cls_score.{p}", "bg_first_rows"),
    KeyRule(r"roi_heads\.box\.predictor\.bbox_pred\.(?P<p>weight|bias)",
            "roi_heads.box_predictor.bbox_pred.{p}", "drop_bg_box"),
    KeyRule(r"rpn\.head\.conv\.(?P<p>weight|bias)", "proposal_generator.rpn_head.conv.{p}",
            "copy"),
    KeyRule(r"rpn\.head\.cls_logits\.(?P<p>weight|bias)",
            "proposal_generator.rpn_head.objectness_logits.{p}", "copy"),
    KeyRule(r"rpn\.head\.bbox_pred\.(?P<p>weight|bias)",
            "proposal_generator.rpn_head.anchor_deltas.{p}", "copy"),
    KeyRule(r"rpn\.anchor_generator\.cell_anchors\.0", "", "anchors"),
    KeyRule(r"attribute\.feature_extractor\.(?P<rest>.+)", "roi_heads.box.feature_extractor.{rest}",
            "alias"),
    KeyRule(r"attribute\.predictor\.cls_embedding\.weight",
            "roi_heads.attribute.cls_embedding.weight", "bg_first_rows"),
    KeyRule(r"attribute\.predictor\.fc_attr\.(?P<p>weight|bias)",
            "roi_heads.attribute.fc_attr.{p}", "copy"),
    KeyRule(r"attribute\.predictor\.attr_score\.(?P<p>weight|bias)",
            "roi_heads.attribute.attr_score.{p}", "bg_first_rows"),
)


def match_key(key: str) -> tuple[KeyRule, str] | None:
    """The rule translating ``key`` and its target name (None: no rule takes the key)."""
    for rule in KEY_TABLE:
        m = re.fullmatch(rule.pattern, key)
        if m:
            g = {k: v for k, v in m.groupdict().items() if v is not None}
            if "s" in g:
                g["s1"] = str(int(g["s"]) + 1)
            return rule, rule.target.format(**g)
    return None


def block_counts(state: dict[str, torch.Tensor]) -> tuple[int, int, int, int]:
    """Blocks of res2, res3, res4 (SGB ``layer1..3``) and of the res5 head (``layer4``).

    Raises:
        ConversionError: a stage has no blocks or its block indices have a gap.
    """
    found: dict[int, set[int]] = {1: set(), 2: set(), 3: set(), 4: set()}
    for k in state:
        m = re.match(r"backbone\.body\.layer([123])\.(\d+)\.", k) or \
            re.match(r"roi_heads\.box\.feature_extractor\.head\.layer(4)\.(\d+)\.", k)
        if m:
            found[int(m.group(1))].add(int(m.group(2)))
    counts = []
    for s, idx in found.items():
        where = f"backbone.body.layer{s}" if s < 4 else \
            "roi_heads.box.feature_extractor.head.layer4"
        if not idx or idx != set(range(max(idx) + 1)):
            raise ConversionError(f"the checkpoint's {where} blocks are {sorted(idx) or 'none'};"
                                  " expected blocks 0..n-1 of an SGB ResNet C4 model")
        counts.append(max(idx) + 1)
    return tuple(counts)  # type: ignore[return-value]


def _rows_bg_last(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t[1:], t[:1]], dim=0)


def translate(state: dict[str, torch.Tensor], cfg: dict, eps: dict[str, float]
              ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The detectron2 state dict of an SGB state dict, by :data:`KEY_TABLE`.

    Args:
        state: SGB's state dict (``module.`` removed).
        cfg: :func:`read_sgb_config`'s values (anchors, attribute switch).
        eps: ``{target norm module: eps}`` of the detectron2 model's FrozenBatchNorm2d layers.

    Returns:
        The state dict and how many source keys each rule kind took.

    Raises:
        ConversionError: keys no rule takes, refused keys, incomplete FrozenBN groups, a shared
            extractor key that differs from the box head's, anchors that differ from SGB's.
    """
    from .vinvl import legacy_cell_anchors

    out: dict[str, torch.Tensor] = {}
    bn: dict[str, dict[str, torch.Tensor]] = {}
    left, refused, counts = [], [], {}
    attr_on = bool(cfg["MODEL.ATTRIBUTE_ON"])
    for key, t in state.items():
        hit = match_key(key)
        if hit is None:
            left.append(key)
            continue
        rule, target = hit
        if rule.kind == "refuse":
            refused.append(f"{key} ({rule.note})")
            continue
        if key.startswith("attribute.") and not attr_on:
            raise ConversionError(
                f"the checkpoint has an attribute head ({key}) but the config's "
                "MODEL.ATTRIBUTE_ON is False; pass the config the checkpoint was trained with "
                "(VinVL's sets MODEL.ATTRIBUTE_ON True)")
        counts[rule.kind] = counts.get(rule.kind, 0) + 1
        if rule.kind == "copy":
            out[target] = t
        elif rule.kind == "frozen_bn":
            module, _, p = target.rpartition(".")
            bn.setdefault(module, {})[p] = t
        elif rule.kind == "bg_first_rows":
            out[target] = _rows_bg_last(t)
        elif rule.kind == "drop_bg_box":
            out[target] = t[4:]
        elif rule.kind == "anchors":
            want = legacy_cell_anchors(16, cfg["MODEL.RPN.ANCHOR_SIZES"],
                                       cfg["MODEL.RPN.ASPECT_RATIOS"])
            if t.shape != want.shape or not torch.allclose(t.float(), want):
                raise ConversionError(
                    f"{key}: the checkpoint's anchors differ from maskrcnn-benchmark's "
                    f"generate_anchors(16, {cfg['MODEL.RPN.ANCHOR_SIZES']}, "
                    f"{cfg['MODEL.RPN.ASPECT_RATIOS']}) of the config's RPN.ANCHOR_SIZES / "
                    "ASPECT_RATIOS; pass the config the checkpoint was trained with")
        elif rule.kind == "alias":
            other = state.get(target)
            if other is None or other.shape != t.shape or not torch.equal(other, t):
                raise ConversionError(
                    f"{key} differs from {target} (or that key is missing): with "
                    "MODEL.ROI_ATTRIBUTE_HEAD.SHARE_BOX_FEATURE_EXTRACTOR the attribute head "
                    "shares the box head's feature extractor, so SGB's state dict holds the same"
                    " tensor under both names")
    if refused:
        raise ConversionError("the checkpoint cannot be converted exactly: "
                              + "; ".join(refused[:3]))
    if left:
        raise ConversionError(
            f"{len(left)} checkpoint key(s) match no row of the key table "
            f"(vlkd.extract.convert_vinvl.KEY_TABLE): {', '.join(left[:8])}"
            + (" ..." if len(left) > 8 else "")
            + "; they belong to a part vlkd does not convert (mask, relation, FPN heads?)")
    for module, group in bn.items():
        missing = {"weight", "bias", "running_mean", "running_var"} - set(group)
        if missing:
            raise ConversionError(f"FrozenBatchNorm {module}: the checkpoint lacks its "
                                  f"{', '.join(sorted(missing))} (SGB stores all four)")
        if module not in eps:
            raise ConversionError(f"the checkpoint has a FrozenBatchNorm for {module}, which the "
                                  "detectron2 model does not have")
        out.update(fold_frozen_bn(module, group, eps[module]))
    return out, counts


def fold_frozen_bn(module: str, g: dict[str, torch.Tensor], eps: float
                   ) -> dict[str, torch.Tensor]:
    """SGB's FrozenBatchNorm2d (no epsilon) as detectron2's (``var + eps``), exactly.

    SGB: ``scale = w * rsqrt(var)``, ``bias = b - mean * scale``. detectron2:
    ``w' * rsqrt(var' + eps)`` and ``b' - mean' * scale'``. With ``w' = scale``, ``b' = bias``,
    ``mean' = 0`` and ``var' = 1 - eps`` (detectron2's identity, ``(1 - eps) + eps == 1`` in
    float32) both compute the same affine map.
    """
    var = g["running_var"].double()
    if not bool((var > 0).all()):
        raise ConversionError(f"FrozenBatchNorm {module}: running_var has values <= 0; SGB's "
                              "w * rsqrt(var) is not finite there")
    scale = g["weight"].double() / var.sqrt()
    bias = g["bias"].double() - g["running_mean"].double() * scale
    dt = g["weight"].dtype
    return {f"{module}.weight": scale.to(dt), f"{module}.bias": bias.to(dt),
            f"{module}.running_mean": torch.zeros_like(g["running_mean"]),
            f"{module}.running_var": torch.full_like(g["running_var"], 1.0 - eps)}
