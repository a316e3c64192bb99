"""A TEE-like student detector: EfficientNet backbone, BiFPN neck, light two-stage box head.

MiniVLM (Wang et al., arXiv 2012.06946) pairs its small transformer with TEE, a *two-stage*
efficient feature extractor: EfficientDet's EfficientNet-B0 + BiFPN (Tan et al., "EfficientDet",
CVPR 2020, arXiv 1911.09070) under a Faster R-CNN RPN and a small box head, so that it yields
region features over boxes as the VinVL teacher does. This module builds that shape in
detectron2 parts, so every vlkd command (``train-detector``, ``proposals``,
``teacher-features``) uses it from a YAML config:

- backbone ``build_efficientnet_bifpn_backbone`` (``MODEL.BACKBONE.NAME``): torchvision's
  EfficientNet (B0 stage table, ``MODEL.EFFICIENTNET.WIDTH_MULT`` / ``DEPTH_MULT`` scale it as
  torchvision's B0..B7 do; random init, no pretrained weights) and a BiFPN over its stride 8, 16,
  32 outputs plus extra levels made by max-pooling (``MODEL.BIFPN``: P3..P7, 64 channels, 3
  layers is EfficientDet-D0). Outputs ``p3..p7``, all ``BIFPN.OUT_CHANNELS`` wide; the input is
  padded to a multiple of ``2 ** MAX_LEVEL`` so every level is exactly half the one below.
- ROI heads ``TEEROIHeads`` (``MODEL.ROI_HEADS.NAME``): detectron2's ``StandardROIHeads`` --
  the multi-level ``ROIPooler`` (ROIAlignV2, detectron2's level rule) and a box head from
  ``MODEL.ROI_BOX_HEAD`` (e.g. ``FastRCNNConvFCHead`` with 2 small fc layers) -- as a class of
  its own, so that the pooler family below names it.
- pooler family ``TEE`` (:data:`vlkd.extract.pooling.POOLERS`): the box pooler over the BiFPN
  levels, then the box head; the feature is ``ROI_BOX_HEAD.FC_DIM`` long, and is what the box
  predictor classifies.

The BiFPN follows rwightman/efficientdet-pytorch (``effdet/efficientdet.py``: ``BiFpn``,
``BiFpnLayer``, ``FpnCombine``, ``ResampleFeatureMap``; node layout from ``bifpn_config`` in
``effdet/config/fpn_config.py``, itself from google/automl ``efficientdet``), with its
EfficientDet-D0 settings: fast normalised fusion (``relu(w_i) / (sum_j relu(w_j) + 1e-4)``),
resampling by a 1x1 conv + norm where channels differ (before the max-pool when downsampling),
max-pool 3x3 stride 2 down, nearest 2x up, and after each fusion Swish then a separable 3x3 conv
(depthwise, pointwise, norm). One layer is a top-down path P6..P3 (each node fuses its level's
input with the upsampled node above) then a bottom-up path P4..P7 (its level's input, its
top-down node, the downsampled node below); its outputs are the P3 top-down node and the
bottom-up nodes. Differences: PyTorch's symmetric padding instead of TensorFlow's "same"
padding in the 3x3 max-pool, and detectron2 norms (``BN``, ``SyncBN``, ``FrozenBN``, ``GN``)
in the backbone and the neck.

The config keys are declared by :func:`add_config`. vlkd imports this module and applies it to
detectron2's default config before merging a detector config that sets ``MODEL.EFFICIENTNET``
or ``MODEL.BIFPN`` (``vlkd.extract.detector.CONFIG_KEY_MODULES``; ``tee-b0.yaml`` and every
config based on it do), so other configs resolve, and digest, as if it did not exist.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, ROI_HEADS_REGISTRY, Backbone
from detectron2.modeling.roi_heads import StandardROIHeads
from torch import nn
from torchvision.models.efficientnet import EfficientNet, MBConvConfig

from .pooling import POOLERS, FPNFamily

__all__ = ["add_config", "EfficientNetFeatures", "BiFPN", "EfficientNetBiFPN",
           "build_efficientnet_bifpn_backbone", "TEEROIHeads", "TEEFamily"]

#: EfficientNet-B0's stages (the paper's Table 1; torchvision's ``_efficientnet_conf``):
#: expand ratio, kernel, stride, input channels, output channels, layers.
B0_STAGES = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2),
             (6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4),
             (6, 3, 1, 192, 320, 1))
#: Index in ``EfficientNet.features`` after which the output has stride ``2 ** level``
#: (features[0] is the stride-2 stem; features[8], the 1x1 head conv, is never built here).
LEVEL_END = {2: 2, 3: 3, 4: 5, 5: 7}
FUSION_EPS = 1e-4  # effdet's fast normalised fusion


def add_config(cfg: CfgNode) -> None:
    """Declare the TEE config keys on detectron2's default config (defaults: EfficientDet-D0).

    ``MODEL.EFFICIENTNET``: ``WIDTH_MULT``, ``DEPTH_MULT`` (1.0, 1.0: B0), ``NORM`` (``BN``),
    ``DROP_PATH`` (stochastic depth of the last block, torchvision's linear rule; 0: none).
    ``MODEL.BIFPN``: ``OUT_CHANNELS`` (64), ``NUM_LAYERS`` (3), ``MIN_LEVEL`` (3), ``MAX_LEVEL``
    (7), ``NORM`` (``BN``).
    """
    cfg.MODEL.EFFICIENTNET = CfgNode({"WIDTH_MULT": 1.0, "DEPTH_MULT": 1.0, "NORM": "BN",
                                      "DROP_PATH": 0.0})
    cfg.MODEL.BIFPN = CfgNode({"OUT_CHANNELS": 64, "NUM_LAYERS": 3, "MIN_LEVEL": 3,
                               "MAX_LEVEL": 7, "NORM": "BN"})


# ------------------------------------------------------------------------------- backbone

class EfficientNetFeatures(nn.Module):
    """torchvision's EfficientNet without its head, returning the stride ``2 ** level`` outputs.

    Args:
        levels: output levels, a subset of 2..5 (strides 4..32).
        width_mult, depth_mult: torchvision's channel and depth multipliers (B0: 1.0, 1.0).
        norm: a detectron2 norm name (``get_norm``).
        drop_path: stochastic depth probability of the last block.
    """

    def __init__(self, levels=(3, 4, 5), *, width_mult: float = 1.0, depth_mult: float = 1.0,
                 norm: str = "BN", drop_path: float = 0.0):
        super().__init__()
        if not set(levels) <= set(LEVEL_END):
            raise ValueError(f"EfficientNet levels {sorted(levels)}: expected a subset of "
                             f"{sorted(LEVEL_END)} (strides 4..32)")
        self.levels = tuple(sorted(levels))
        stages = [MBConvConfig(*s, width_mult=width_mult, depth_mult=depth_mult)
                  for s in B0_STAGES]
        net = EfficientNet(stages, dropout=0.0, stochastic_depth_prob=drop_path,
                           norm_layer=partial(get_norm, norm))
        # features[8] (1x1 conv to 1280 channels) and the classifier serve ImageNet only.
        self.stages = net.features[:LEVEL_END[self.levels[-1]] + 1]
        self.channels = {lvl: stages[LEVEL_END[lvl] - 1].out_channels for lvl in self.levels}

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        out, ends = {}, {LEVEL_END[lvl]: lvl for lvl in self.levels}
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in ends:
                out[ends[i]] = x
        return out


class _Resample(nn.Sequential):
    """effdet's ``ResampleFeatureMap`` for a factor of 2 or 1: a 1x1 conv + norm where the
    channels differ, then a 3x3 stride-2 max-pool (down) or nearest 2x upsampling (up)."""

    def __init__(self, in_channels: int, out_channels: int, in_level: int, out_level: int,
                 norm: str):
        super().__init__()
        if abs(in_level - out_level) > 1:
            raise ValueError("BiFPN nodes resample by a factor of 2 at most")
        if in_channels != out_channels:
            self.add_module("conv", nn.Conv2d(in_channels, out_channels, 1, bias=False))
            self.add_module("norm", get_norm(norm, out_channels))
        if out_level > in_level:
            self.add_module("down", nn.MaxPool2d(3, stride=2, padding=1))
        elif out_level < in_level:
            self.add_module("up", nn.Upsample(scale_factor=2, mode="nearest"))


class _FusionNode(nn.Module):
    """One BiFPN node: its inputs resampled to its level, fused with fast normalised weights,
    then Swish and a separable 3x3 conv + norm (effdet's ``FpnCombine`` + ``after_combine``).

    Args:
        inputs: ``(index into the layer's feature list, channels, level)`` of each input.
        level: the node's level.
        channels: the BiFPN width.
        norm: a detectron2 norm name.
    """

    def __init__(self, inputs: list[tuple[int, int, int]], level: int, channels: int, norm: str):
        super().__init__()
        self.level = level
        self.sources = [i for i, _, _ in inputs]
        self.resample = nn.ModuleList(_Resample(c, channels, lvl, level, norm)
                                      for _, c, lvl in inputs)
        self.weights = nn.Parameter(torch.ones(len(inputs)))
        self.dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.pw = nn.Conv2d(channels, channels, 1, bias=False)
        self.norm = get_norm(norm, channels)

    def fusion_weights(self) -> torch.Tensor:
        """The normalised input weights ``relu(w) / (sum relu(w) + eps)``."""
        w = F.relu(self.weights)
        return w / (w.sum() + FUSION_EPS)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        w = self.fusion_weights().to(feats[0].dtype)
        x = sum(w[k] * r(feats[i]) for k, (i, r) in enumerate(zip(self.sources, self.resample)))
        return self.norm(self.pw(self.dw(F.silu(x))))


class BiFPNLayer(nn.Module):
    """One BiFPN layer over levels ``min_level..max_level`` (effdet's ``bifpn_config`` layout).

    Args:
        in_channels: channels of each input level, lowest level first.
        min_level: the lowest level.
        channels: the BiFPN width (the output of every node).
        norm: a detectron2 norm name.
    """

    def __init__(self, in_channels: list[int], min_level: int, channels: int, norm: str):
        super().__init__()
        n = len(in_channels)
        levels = list(range(min_level, min_level + n))
        # feature list: the n inputs, then each node's output as it is computed
        chans = list(in_channels)
        level_of = list(levels)
        ids = {lvl: [k] for k, lvl in enumerate(levels)}
        nodes = []

        def add(level: int, sources: list[int]) -> None:
            nodes.append(_FusionNode([(i, chans[i], level_of[i]) for i in sources], level,
                                     channels, norm))
            ids[level].append(len(chans))
            chans.append(channels)
            level_of.append(level)

        for lvl in reversed(levels[:-1]):   # top-down: its input + the node above
            add(lvl, [ids[lvl][-1], ids[lvl + 1][-1]])
        for lvl in levels[1:]:              # bottom-up: its input (+ top-down node) + below
            add(lvl, ids[lvl] + [ids[lvl - 1][-1]])
        self.nodes = nn.ModuleList(nodes)
        self.num_levels = n

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        feats = list(feats)
        for node in self.nodes:
            feats.append(node(feats))
        return feats[-self.num_levels:]


class BiFPN(nn.Module):
    """EfficientDet's BiFPN: the backbone's levels, extra levels up to ``max_level`` made by
    resampling the top one (1x1 conv + norm to ``channels`` first, then max-pool), then
    ``num_layers`` :class:`BiFPNLayer`.

    Args:
        in_channels: channels of the backbone levels ``min_level..``, lowest first.
        min_level, max_level: the output levels (P3..P7 in EfficientDet).
        channels: the width of every output.
        num_layers: BiFPN layers (D0: 3).
        norm: a detectron2 norm name.
    """

    def __init__(self, in_channels: list[int], min_level: int = 3, max_level: int = 7,
                 channels: int = 64, num_layers: int = 3, norm: str = "BN"):
        super().__init__()
        top = min_level + len(in_channels) - 1
        if max_level < top:
            raise ValueError(f"BiFPN MAX_LEVEL {max_level} is below the backbone's top level "
                             f"{top}")
        extra, c = [], in_channels[-1]
        for lvl in range(top + 1, max_level + 1):
            extra.append(_Resample(c, channels, lvl - 1, lvl, norm))
            c = channels
        self.extra = nn.ModuleList(extra)
        chans = list(in_channels) + [channels] * len(extra)
        layers = []
        for _ in range(num_layers):
            layers.append(BiFPNLayer(chans, min_level, channels, norm))
            chans = [channels] * len(chans)
        self.layers = nn.ModuleList(layers)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        feats = list(feats)
        for resample in self.extra:
            feats.append(resample(feats[-1]))
        for layer in self.layers:
            feats = layer(feats)
        return feats


def _init_conv(conv: nn.Conv2d) -> None:
    """He init with the fan-out of one group (timm's ``_init_weight_goog``, after the TensorFlow
    EfficientNet): torchvision counts a depthwise kernel's fan-out over all channels, which
    shrinks activations ~3x per block until BN's batch statistics take over in training, and
    leaves a randomly initialised model's eval-mode features near 0."""
    fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
    nn.init.normal_(conv.weight, 0.0, (2.0 / fan_out) ** 0.5)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class EfficientNetBiFPN(Backbone):
    """detectron2 backbone: :class:`EfficientNetFeatures` + :class:`BiFPN`, outputs ``p<level>``
    for ``min_level..max_level`` (stride ``2 ** level``, ``channels`` each)."""

    def __init__(self, *, min_level: int = 3, max_level: int = 7, channels: int = 64,
                 num_layers: int = 3, width_mult: float = 1.0, depth_mult: float = 1.0,
                 norm: str = "BN", bifpn_norm: str = "BN", drop_path: float = 0.0):
        super().__init__()
        levels = tuple(lvl for lvl in range(min_level, 6))
        if not levels or not min_level >= 2:
            raise ValueError(f"BIFPN.MIN_LEVEL {min_level}: expected 2..5 (EfficientNet's "
                             "stride 4..32 outputs)")
        self.bottom_up = EfficientNetFeatures(levels, width_mult=width_mult,
                                              depth_mult=depth_mult, norm=norm,
                                              drop_path=drop_path)
        self.bifpn = BiFPN([self.bottom_up.channels[lvl] for lvl in levels], min_level,
                           max_level, channels, num_layers, bifpn_norm)
        self.min_level, self.max_level = min_level, max_level
        self._out_features = [f"p{lvl}" for lvl in range(min_level, max_level + 1)]
        self._out_feature_channels = {f: channels for f in self._out_features}
        self._out_feature_strides = {f"p{lvl}": 2 ** lvl
                                     for lvl in range(min_level, max_level + 1)}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                _init_conv(m)

    @property
    def size_divisibility(self) -> int:
        # every level exactly half the one below, so that up- and down-sampled maps align
        return 2 ** self.max_level

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.bottom_up(x)
        outs = self.bifpn([c[lvl] for lvl in sorted(c)])
        return dict(zip(self._out_features, outs))


@BACKBONE_REGISTRY.register()
def build_efficientnet_bifpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """``MODEL.BACKBONE.NAME: build_efficientnet_bifpn_backbone`` (keys: :func:`add_config`)."""
    if input_shape.channels != 3:
        raise ValueError(f"EfficientNet expects 3 input channels, got {input_shape.channels}")
    e, b = cfg.MODEL.EFFICIENTNET, cfg.MODEL.BIFPN
    return EfficientNetBiFPN(min_level=b.MIN_LEVEL, max_level=b.MAX_LEVEL,
                             channels=b.OUT_CHANNELS, num_layers=b.NUM_LAYERS,
                             width_mult=e.WIDTH_MULT, depth_mult=e.DEPTH_MULT, norm=e.NORM,
                             bifpn_norm=b.NORM, drop_path=e.DROP_PATH)


# ------------------------------------------------------------------------------ ROI heads

@ROI_HEADS_REGISTRY.register()
class TEEROIHeads(StandardROIHeads):
    """``StandardROIHeads`` over BiFPN levels (the multi-level box pooler, then the
    ``MODEL.ROI_BOX_HEAD`` box head): a class of its own so that the ``TEE`` pooler family, and
    the manifest's ``detector.kind``, name this detector."""


@POOLERS.register()
class TEEFamily(FPNFamily):
    """``TEEROIHeads``: the multi-level box pooler over the BiFPN levels, then the box head
    (``(N, ROI_BOX_HEAD.FC_DIM)``, what the box predictor classifies)."""

    kind = "TEE"
    description = "bifpn box_pooler + box_head"
    heads = (TEEROIHeads,)
