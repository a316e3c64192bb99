"""VinVL's detector in detectron2: the maskrcnn-benchmark behaviours a config alone cannot express.

``vlkd-extract convert-detector --from vinvl`` (``vlkd.extract.convert_vinvl``) turns
scene_graph_benchmark's (SGB, microsoft/scene_graph_benchmark, a maskrcnn-benchmark fork)
X152-C4 checkpoint into a detectron2 config and state dict. Most of the model is plain
detectron2 (ResNeXt stages, FrozenBN, a standard RPN head, ``Res5ROIHeads`` with the non-aligned
``ROIAlign`` pooler); what differs is registered here, under names the converted config uses,
so the model builds like any other (this module is a built-in plugin, ``vlkd.extract.plugins``):

- ``build_vinvl_resnet_backbone`` (backbone): detectron2's ``ResNet``/``BottleneckBlock`` with
  the block counts of the checkpoint (``MODEL.VINVL.BLOCKS_PER_STAGE``), not only 50/101/152.
- ``VinVLAnchorGenerator``: maskrcnn-benchmark's cell anchors (``generate_anchors``: rounded
  widths, centred on ``(stride - 1) / 2``, ordered aspect ratio first), not detectron2's.
- ``VinVLRPN``: maskrcnn-benchmark's RPN post-processing (``RPNPostProcessor``): sigmoid top-k,
  the +1 box coder, clipping to ``width - 1``, ``remove_small_boxes`` with +1 sizes, NMS.
- ``VinVLRes5ROIHeads``: ``Res5ROIHeads`` with the head's block count, the +1 box coder in
  ``box_predictor`` and SGB's attribute head (``attribute``), if the source has one.
- the pooler family ``VinVL-C4`` (``vlkd.extract.pooling.POOLERS``): C4 pooling plus the
  attribute head's probabilities for a pooled feature and its object class.

The +1 convention ("TO_REMOVE = 1") is maskrcnn-benchmark's: a box ``x1..x2`` is ``x2 - x1 + 1``
pixels wide, decoded boxes end at ``ctr + w / 2 - 1``, and clipping keeps ``x <= width - 1``
(``maskrcnn_benchmark/modeling/box_coder.py``, ``structures/bounding_box.py``). ROIAlign does not
use it (the legacy kernel reads the box as given, ``aligned=False``).

Classes and attributes are in detectron2's order: class ``c`` (0..K-1) is SGB's label ``c + 1``
(SGB's label 0 is the background; detectron2 puts it last), attribute ``a`` (0..A-1) is SGB's
attribute ``a + 1`` (SGB's 0 is "no attribute", here last too). The converter moves the rows.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import (ANCHOR_GENERATOR_REGISTRY, BACKBONE_REGISTRY,
                                 PROPOSAL_GENERATOR_REGISTRY, ROI_HEADS_REGISTRY)
from detectron2.modeling.anchor_generator import BufferList, DefaultAnchorGenerator
from detectron2.modeling.backbone.resnet import BasicStem, BottleneckBlock, ResNet
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.modeling.roi_heads import Res5ROIHeads
from detectron2.structures import Boxes, Instances
from torch import nn
from torchvision.ops import nms

from .pooling import POOLERS, C4Family

#: maskrcnn-benchmark's bbox_xform_clip (box_coder.py), detectron2's _DEFAULT_SCALE_CLAMP.
SCALE_CLAMP = math.log(1000.0 / 16)


def add_config(cfg: CfgNode) -> None:
    """Declare the keys of converted VinVL configs (defaults: a ResNet-50's blocks, no attributes).

    ``MODEL.VINVL``: ``BLOCKS_PER_STAGE`` (res2..res5 block counts, res5 being the ROI head),
    ``NUM_ATTRIBUTES`` (foreground attributes of the attribute head, 0: none), ``CLS_EMBED_DIM``,
    ``ATTR_EMBED_DIM`` (SGB's ``CLS_EMD_DIM``, ``ATTR_EMD_DIM``). ``INPUT.RESIZE_RULE``:
    ``detectron2`` (``ResizeShortestEdge``) or ``maskrcnn_benchmark`` (``Resize.get_size``), read
    by ``vlkd.extract.detector.Preprocessing``.
    """
    cfg.MODEL.VINVL = CfgNode({"BLOCKS_PER_STAGE": [3, 4, 6, 3], "NUM_ATTRIBUTES": 0,
                               "CLS_EMBED_DIM": 256, "ATTR_EMBED_DIM": 512})
    cfg.INPUT.RESIZE_RULE = "detectron2"


# ------------------------------------------------------------------------ the +1 box coder

class LegacyBox2BoxTransform:
    """maskrcnn-benchmark's ``BoxCoder`` with detectron2's ``Box2BoxTransform`` interface.

    Written from ``maskrcnn_benchmark/modeling/box_coder.py``: widths and heights carry
    ``TO_REMOVE = 1``, the centre is ``x1 + 0.5 * w``, and a decoded box ends at
    ``ctr + 0.5 * w - 1``. ``dw``/``dh`` are clamped at ``log(1000 / 16)``.

    Args:
        weights: (wx, wy, ww, wh), as ``BBOX_REG_WEIGHTS``.
        scale_clamp: the clamp of ``dw``/``dh``.
    """

    def __init__(self, weights, scale_clamp: float = SCALE_CLAMP):
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def get_deltas(self, src_boxes: torch.Tensor, target_boxes: torch.Tensor) -> torch.Tensor:
        """``BoxCoder.encode(reference_boxes=target_boxes, proposals=src_boxes)``."""
        ex_w = src_boxes[:, 2] - src_boxes[:, 0] + 1
        ex_h = src_boxes[:, 3] - src_boxes[:, 1] + 1
        ex_x = src_boxes[:, 0] + 0.5 * ex_w
        ex_y = src_boxes[:, 1] + 0.5 * ex_h
        gt_w = target_boxes[:, 2] - target_boxes[:, 0] + 1
        gt_h = target_boxes[:, 3] - target_boxes[:, 1] + 1
        gt_x = target_boxes[:, 0] + 0.5 * gt_w
        gt_y = target_boxes[:, 1] + 0.5 * gt_h
        wx, wy, ww, wh = self.weights
        return torch.stack((wx * (gt_x - ex_x) / ex_w, wy * (gt_y - ex_y) / ex_h,
                            ww * torch.log(gt_w / ex_w), wh * torch.log(gt_h / ex_h)), dim=1)

    def apply_deltas(self, deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """``BoxCoder.decode``: ``deltas`` (N, k*4) applied to ``boxes`` (N, 4) -> (N, k*4)."""
        deltas = deltas.float()
        boxes = boxes.to(deltas.dtype)
        widths = boxes[:, 2] - boxes[:, 0] + 1
        heights = boxes[:, 3] - boxes[:, 1] + 1
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = torch.clamp(deltas[:, 2::4] / ww, max=self.scale_clamp)
        dh = torch.clamp(deltas[:, 3::4] / wh, max=self.scale_clamp)
        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        pred_w = torch.exp(dw) * widths[:, None]
        pred_h = torch.exp(dh) * heights[:, None]
        out = torch.zeros_like(deltas)
        out[:, 0::4] = pred_ctr_x - 0.5 * pred_w
        out[:, 1::4] = pred_ctr_y - 0.5 * pred_h
        out[:, 2::4] = pred_ctr_x + 0.5 * pred_w - 1
        out[:, 3::4] = pred_ctr_y + 0.5 * pred_h - 1
        return out


def clip_legacy(boxes: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
    """``BoxList.clip_to_image(remove_empty=False)``: x in [0, w - 1], y in [0, h - 1]."""
    h, w = image_hw
    boxes = boxes.clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=w - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=h - 1)
    return boxes


# ---------------------------------------------------------------------------------- anchors

def legacy_cell_anchors(stride: int, sizes, aspect_ratios) -> torch.Tensor:
    """maskrcnn-benchmark's ``generate_anchors(stride, sizes, aspect_ratios)``.

    Written from ``maskrcnn_benchmark/modeling/rpn/anchor_generator.py`` (Detectron's
    ``_ratio_enum`` / ``_scale_enum``): a ``(0, 0, stride - 1, stride - 1)`` window, rounded widths
    per aspect ratio, then each scaled by ``size / stride``; the order is aspect ratio major.

    Returns:
        ``(len(aspect_ratios) * len(sizes), 4)`` float32, x1 y1 x2 y2.
    """
    def whctrs(a):
        w, h = a[2] - a[0] + 1, a[3] - a[1] + 1
        return w, h, a[0] + 0.5 * (w - 1), a[1] + 0.5 * (h - 1)

    def mkanchors(ws, hs, x_ctr, y_ctr):
        ws, hs = ws[:, None], hs[:, None]
        return np.hstack((x_ctr - 0.5 * (ws - 1), y_ctr - 0.5 * (hs - 1),
                          x_ctr + 0.5 * (ws - 1), y_ctr + 0.5 * (hs - 1)))

    scales = np.array(sizes, dtype=np.float64) / stride
    ratios = np.array(aspect_ratios, dtype=np.float64)
    w, h, x_ctr, y_ctr = whctrs(np.array([1, 1, stride, stride], dtype=np.float64) - 1)
    ws = np.round(np.sqrt(w * h / ratios))
    hs = np.round(ws * ratios)
    per_ratio = mkanchors(ws, hs, x_ctr, y_ctr)
    out = []
    for a in per_ratio:
        w, h, x_ctr, y_ctr = whctrs(a)
        out.append(mkanchors(w * scales, h * scales, x_ctr, y_ctr))
    return torch.from_numpy(np.vstack(out)).float()


@ANCHOR_GENERATOR_REGISTRY.register()
class VinVLAnchorGenerator(DefaultAnchorGenerator):
    """maskrcnn-benchmark's anchors: :func:`legacy_cell_anchors` shifted by ``stride * (x, y)``.

    ``MODEL.ANCHOR_GENERATOR.OFFSET`` must be 0.0: maskrcnn-benchmark's grid starts at 0
    (``AnchorGenerator.grid_anchors``), and its cell anchors carry their own centre.
    """

    @configurable
    def __init__(self, *, sizes, aspect_ratios, strides, offset=0.0):
        if offset != 0.0:
            raise ValueError(f"VinVLAnchorGenerator: MODEL.ANCHOR_GENERATOR.OFFSET must be 0.0 "
                             f"(maskrcnn-benchmark's grid), got {offset}")
        super().__init__(sizes=sizes, aspect_ratios=aspect_ratios, strides=strides,
                         offset=offset)

    def _calculate_anchors(self, sizes, aspect_ratios):
        return BufferList([legacy_cell_anchors(stride, s, a)
                           for stride, s, a in zip(self.strides, sizes, aspect_ratios)])


# -------------------------------------------------------------------------------------- RPN

@PROPOSAL_GENERATOR_REGISTRY.register()
class VinVLRPN(RPN):
    """detectron2's RPN with maskrcnn-benchmark's box coder and post-processing.

    Written from ``maskrcnn_benchmark/modeling/rpn/inference.py``
    (``RPNPostProcessor.forward_for_single_feature_map``), one feature map: objectness
    ``sigmoid``, the ``PRE_NMS_TOPK`` best, decoded with the +1 coder (weights
    ``MODEL.RPN.BBOX_REG_WEIGHTS``, (1, 1, 1, 1) in maskrcnn-benchmark), clipped to
    ``(w - 1, h - 1)``, boxes narrower than ``MODEL.PROPOSAL_GENERATOR.MIN_SIZE`` in +1 widths
    removed, NMS (``torchvision.ops.nms``, which SGB's ``maskrcnn_benchmark/layers/nms.py`` uses
    whenever torchvision imports) at ``MODEL.RPN.NMS_THRESH``, the ``POST_NMS_TOPK`` best.
    """

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["box2box_transform"] = LegacyBox2BoxTransform(cfg.MODEL.RPN.BBOX_REG_WEIGHTS)
        return ret

    def predict_proposals(self, anchors, pred_objectness_logits, pred_anchor_deltas,
                          image_sizes):
        if len(anchors) != 1:
            raise ValueError(f"VinVLRPN works on one feature map (C4), got {len(anchors)}")
        with torch.no_grad():
            logits, deltas = pred_objectness_logits[0], pred_anchor_deltas[0]  # (N, HWA), (N, HWA, 4)
            n = logits.shape[0]
            prob = logits.float().sigmoid()  # SGB's objectness, in float32 under autocast too
            k = min(int(self.pre_nms_topk[self.training]), prob.shape[1])
            prob, idx = prob.topk(k, dim=1, sorted=True)
            batch = torch.arange(n, device=logits.device)[:, None]
            boxes = self.box2box_transform.apply_deltas(
                deltas[batch, idx].reshape(-1, 4), anchors[0].tensor[idx].reshape(-1, 4))
            boxes = boxes.view(n, k, 4)
            logits = logits[batch, idx]
            results = []
            for i, (h, w) in enumerate(image_sizes):
                b = clip_legacy(boxes[i], (int(h), int(w)))
                ws, hs = b[:, 2] - b[:, 0] + 1, b[:, 3] - b[:, 1] + 1  # remove_small_boxes
                keep = torch.nonzero((ws >= self.min_box_size) & (hs >= self.min_box_size)
                                     ).squeeze(1)
                b, p, lg = b[keep], prob[i][keep], logits[i][keep]
                if self.nms_thresh > 0:  # boxlist_nms returns the boxlist when thresh <= 0
                    keep = nms(b, p, self.nms_thresh)[:int(self.post_nms_topk[self.training])]
                    b, lg = b[keep], lg[keep]
                res = Instances((int(h), int(w)))
                res.proposal_boxes = Boxes(b)
                res.objectness_logits = lg
                results.append(res)
            return results


# --------------------------------------------------------------------------------- backbone

@BACKBONE_REGISTRY.register()
def build_vinvl_resnet_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """detectron2's ResNe(X)t (``BasicStem``, ``BottleneckBlock``) with the block counts of
    ``MODEL.VINVL.BLOCKS_PER_STAGE`` (res2..res4 here; res5 is the ROI head), the rest as
    detectron2's ``build_resnet_backbone`` (groups, width per group, ``STRIDE_IN_1X1``, norm)."""
    r = cfg.MODEL.RESNETS
    if list(r.OUT_FEATURES) != ["res4"]:
        raise ValueError(f"build_vinvl_resnet_backbone is a C4 backbone: MODEL.RESNETS."
                         f"OUT_FEATURES must be ['res4'], got {list(r.OUT_FEATURES)}")
    stem = BasicStem(in_channels=input_shape.channels, out_channels=r.STEM_OUT_CHANNELS,
                     norm=r.NORM)
    in_ch, out_ch = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    bottleneck = r.NUM_GROUPS * r.WIDTH_PER_GROUP
    stages = []
    for idx, n in enumerate(cfg.MODEL.VINVL.BLOCKS_PER_STAGE[:3]):
        stages.append(ResNet.make_stage(
            BottleneckBlock, int(n), stride_per_block=[1 if idx == 0 else 2] + [1] * (n - 1),
            in_channels=in_ch, bottleneck_channels=bottleneck, out_channels=out_ch,
            num_groups=r.NUM_GROUPS, norm=r.NORM, stride_in_1x1=r.STRIDE_IN_1X1))
        in_ch, out_ch, bottleneck = out_ch, out_ch * 2, bottleneck * 2
    return ResNet(stem, stages, out_features=["res4"], freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


# ------------------------------------------------------------------------------ ROI heads

class AttributePredictor(nn.Module):
    """SGB's ``AttributeRCNNPredictor`` (``scene_graph_benchmark/attribute_head/
    roi_attribute_predictors.py``) on a mean-pooled res5 feature and the box's object class.

    ``attr_score(relu(fc_attr(cat(pooled, cls_embedding[class]))))``: SGB's ``avgpool`` of the
    res5 output is the mean pooling the C4 family already did. Rows are in detectron2's order:
    ``cls_embedding`` row ``c`` is class ``c`` (row K the background, never used at test time),
    ``attr_score`` output ``a`` is attribute ``a`` (output A "no attribute").

    Args:
        in_channels: the pooled feature's width (res5 out channels).
        num_classes: K foreground classes.
        cls_embed_dim, attr_embed_dim: SGB's ``CLS_EMD_DIM``, ``ATTR_EMD_DIM``.
        num_attributes: A foreground attributes.
    """

    def __init__(self, in_channels: int, num_classes: int, cls_embed_dim: int,
                 attr_embed_dim: int, num_attributes: int):
        super().__init__()
        self.num_attributes = num_attributes
        self.cls_embedding = nn.Embedding(num_classes + 1, cls_embed_dim)
        self.fc_attr = nn.Linear(in_channels + cls_embed_dim, attr_embed_dim)
        self.attr_score = nn.Linear(attr_embed_dim, num_attributes + 1)

    def forward(self, pooled: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(N, C) features and (N,) classes in 0..K-1 -> (N, A + 1) attribute logits."""
        x = torch.cat([pooled, self.cls_embedding(classes).to(pooled.dtype)], dim=1)
        return self.attr_score(F.relu(self.fc_attr(x)))


@ROI_HEADS_REGISTRY.register()
class VinVLRes5ROIHeads(Res5ROIHeads):
    """``Res5ROIHeads`` as SGB's ``ResNet50Conv5ROIFeatureExtractor`` + ``FastRCNNPredictor``
    (+ ``AttributeRCNNPredictor``): the head's block count from ``MODEL.VINVL.BLOCKS_PER_STAGE[3]``
    (SGB builds 3), the +1 box coder in ``box_predictor``, the attribute head as ``attribute``
    (None without attributes). The pooler must be ``ROIAlign`` (non-aligned, as SGB's
    ``maskrcnn_benchmark/layers/roi_align.py``)."""

    @configurable
    def __init__(self, *, attribute: nn.Module | None = None, **kwargs):
        super().__init__(**kwargs)
        self.attribute = attribute

    @classmethod
    def from_config(cls, cfg, input_shape):
        if cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE != "ROIAlign":
            raise ValueError(f"VinVLRes5ROIHeads: MODEL.ROI_BOX_HEAD.POOLER_TYPE must be "
                             f"'ROIAlign' (maskrcnn-benchmark's non-aligned ROIAlign), got "
                             f"{cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE!r}")
        ret = super().from_config(cfg, input_shape)
        ret["box_predictor"].box2box_transform = LegacyBox2BoxTransform(
            cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS)
        v = cfg.MODEL.VINVL
        if v.NUM_ATTRIBUTES:
            ret["attribute"] = AttributePredictor(
                cfg.MODEL.RESNETS.RES2_OUT_CHANNELS * 8, cfg.MODEL.ROI_HEADS.NUM_CLASSES,
                v.CLS_EMBED_DIM, v.ATTR_EMBED_DIM, v.NUM_ATTRIBUTES)
        return ret

    @classmethod
    def _build_res5_block(cls, cfg):
        r = cfg.MODEL.RESNETS
        n = int(cfg.MODEL.VINVL.BLOCKS_PER_STAGE[3])
        out_channels = r.RES2_OUT_CHANNELS * 8
        blocks = ResNet.make_stage(
            BottleneckBlock, n, stride_per_block=[2] + [1] * (n - 1),
            in_channels=out_channels // 2, bottleneck_channels=r.NUM_GROUPS * r.WIDTH_PER_GROUP * 8,
            out_channels=out_channels, num_groups=r.NUM_GROUPS, norm=r.NORM,
            stride_in_1x1=r.STRIDE_IN_1X1)
        return nn.Sequential(*blocks), out_channels


@POOLERS.register()
class VinVLC4Family(C4Family):
    """Converted VinVL heads: C4 pooling (ROIAlign, res5, spatial mean) and the attribute head."""

    kind = "VinVL-C4"
    description = "res5 + mean pool"
    heads = (VinVLRes5ROIHeads,)

    @property
    def num_attributes(self) -> int:
        att = self.roi_heads.attribute
        return 0 if att is None else int(att.num_attributes)

    def attribute_probs(self, pooled: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """SGB's ``AttributePostProcessor`` softmax over the attribute logits: (N, A + 1)."""
        if self.roi_heads.attribute is None:
            return super().attribute_probs(pooled, classes)
        return torch.softmax(self.roi_heads.attribute(pooled, classes.long()).float(), dim=-1)


__all__ = ["add_config", "LegacyBox2BoxTransform", "clip_legacy", "legacy_cell_anchors",
           "VinVLAnchorGenerator", "VinVLRPN", "build_vinvl_resnet_backbone",
           "AttributePredictor", "VinVLRes5ROIHeads", "VinVLC4Family", "SCALE_CLAMP"]
