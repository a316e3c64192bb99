"""`vlkd-extract convert-detector --from vinvl`: VinVL's detector as a detectron2 model.

Input: scene_graph_benchmark's (SGB) config (``sgg_configs/vgattr/vinvl_x152c4.yaml``), its
checkpoint (``vinvl_vg_x152c4.pth``: the trainer dict ``{model, optimizer, scheduler,
iteration}`` of ``maskrcnn_benchmark/utils/checkpoint.py``, or a flat state dict; with or without
the ``module.`` prefix of a DDP-wrapped model) and its labelmap
(``VG-SGG-dicts-vgoi6-clipped.json``: ``label_to_idx`` / ``attribute_to_idx``, 1-based). Output,
in a new folder: ``config.yaml`` (detectron2), ``model.safetensors``, ``class_names.json`` and
``attribute_names.json`` (detectron2 order) and ``conversion.json`` (what was converted, from
what, and the extraction options that reproduce SGB's post-processing).

Nothing is guessed. Every SGB config key is read (:data:`SGB_DEFAULTS`), checked to hold a value
vlkd reproduces (:data:`SUPPORTED`), recorded as post-processing (:data:`POSTPROCESS`), or known
not to affect a test-time forward pass (:data:`IGNORED`); any other key is an error naming it.
Every checkpoint key is translated by one rule of :data:`KEY_TABLE`; a key no rule takes, a
parameter of the detectron2 model no key gives, or a shape that does not fit, is an error naming
it. Block counts come from the checkpoint (any counts; checked against ``CONV_BODY`` when it
names one of SGB's stage specs); widths and groups from the config, checked by the shapes.

The numerics that differ between the libraries (the facts and their source files are listed in
docs/EXTRACT.md, "Using VinVL's detector"):

- FrozenBatchNorm: SGB computes ``x * w / sqrt(var) + (b - mean * w / sqrt(var))`` with no
  epsilon (``maskrcnn_benchmark/layers/batch_norm.py``); detectron2's ``FrozenBatchNorm2d`` adds
  ``eps = 1e-5`` to the variance. The converter folds SGB's four tensors into ``weight = w /
  sqrt(var)``, ``bias = b - mean * weight`` (in float64), ``running_mean = 0`` and
  ``running_var = 1 - eps``, detectron2's own identity (its ``FrozenBatchNorm2d.__init__``).
- Background: SGB's class 0 is the background (``cls_score`` row 0, ``bbox_pred`` rows 0..3,
  ``cls_embedding`` row 0, attribute 0 "no attribute"); detectron2's is last and its
  ``bbox_pred`` has no background rows. Rows are moved, or dropped for ``bbox_pred``.
- ROIAlign: SGB pools with ``torchvision.ops.roi_align`` (``aligned=False``, the legacy
  kernel), ``POOLER_SAMPLING_RATIO`` 0, 14x14 at 1/16: ``POOLER_TYPE: ROIAlign``.
- The +1 box convention, anchors and RPN post-processing: ``vlkd.extract.vinvl``.
- Input: BGR in 0..255 (``INPUT.TO_BGR255``), SGB's pixel mean and std, its test size, and its
  resize rule (``INPUT.RESIZE_RULE: maskrcnn_benchmark``).
"""
from __future__ import annotations

import ast
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import yaml

from vlkd import __version__
from vlkd.common.digest import file_digest

from .vinvl_keys import (KEY_TABLE, ConversionError, KeyRule, block_counts, fold_frozen_bn,
                         match_key, translate)

FROM_CHOICES = ("vinvl",)
OUT_FILES = ("config.yaml", "model.safetensors", "class_names.json", "attribute_names.json",
             "conversion.json")

_DEFAULTS_PY = "maskrcnn_benchmark/config/defaults.py"
_SG_DEFAULTS_PY = "scene_graph_benchmark/config/sg_defaults.py"

#: SGB's default of every config key the converter reads or checks, with the file it is in.
SGB_DEFAULTS: dict[str, tuple[Any, str]] = {
    "MODEL.META_ARCHITECTURE": ("GeneralizedRCNN", _DEFAULTS_PY),
    "MODEL.RPN_ONLY": (False, _DEFAULTS_PY),
    "MODEL.MASK_ON": (False, _DEFAULTS_PY),
    "MODEL.RETINANET_ON": (False, _DEFAULTS_PY),
    "MODEL.KEYPOINT_ON": (False, _DEFAULTS_PY),
    "MODEL.CLS_AGNOSTIC_BBOX_REG": (False, _DEFAULTS_PY),
    "MODEL.BACKBONE.CONV_BODY": ("R-50-C4", _DEFAULTS_PY),
    "MODEL.RESNETS.NUM_GROUPS": (1, _DEFAULTS_PY),
    "MODEL.RESNETS.WIDTH_PER_GROUP": (64, _DEFAULTS_PY),
    "MODEL.RESNETS.STRIDE_IN_1X1": (True, _DEFAULTS_PY),
    "MODEL.RESNETS.TRANS_FUNC": ("BottleneckWithFixedBatchNorm", _DEFAULTS_PY),
    "MODEL.RESNETS.STEM_FUNC": ("StemWithFixedBatchNorm", _DEFAULTS_PY),
    "MODEL.RESNETS.RES5_DILATION": (1, _DEFAULTS_PY),
    "MODEL.RESNETS.BACKBONE_OUT_CHANNELS": (1024, _DEFAULTS_PY),
    "MODEL.RESNETS.RES2_OUT_CHANNELS": (256, _DEFAULTS_PY),
    "MODEL.RESNETS.STEM_OUT_CHANNELS": (64, _DEFAULTS_PY),
    "MODEL.RESNETS.STAGE_WITH_DCN": ((False, False, False, False), _DEFAULTS_PY),
    "MODEL.RPN.USE_FPN": (False, _DEFAULTS_PY),
    "MODEL.RPN.ANCHOR_SIZES": ((32, 64, 128, 256, 512), _DEFAULTS_PY),
    "MODEL.RPN.ANCHOR_STRIDE": ((16,), _DEFAULTS_PY),
    "MODEL.RPN.ASPECT_RATIOS": ((0.5, 1.0, 2.0), _DEFAULTS_PY),
    "MODEL.RPN.PRE_NMS_TOP_N_TEST": (6000, _DEFAULTS_PY),
    "MODEL.RPN.POST_NMS_TOP_N_TEST": (1000, _DEFAULTS_PY),
    "MODEL.RPN.NMS_THRESH": (0.7, _DEFAULTS_PY),
    "MODEL.RPN.MIN_SIZE": (0, _DEFAULTS_PY),
    "MODEL.RPN.RPN_HEAD": ("SingleConvRPNHead", _DEFAULTS_PY),
    "MODEL.RPN.FORCE_BOXES": (False, _DEFAULTS_PY),
    "MODEL.ROI_HEADS.USE_FPN": (False, _DEFAULTS_PY),
    "MODEL.ROI_HEADS.BBOX_REG_WEIGHTS": ((10.0, 10.0, 5.0, 5.0), _DEFAULTS_PY),
    "MODEL.ROI_HEADS.SCORE_THRESH": (0.05, _DEFAULTS_PY),
    "MODEL.ROI_HEADS.NMS": (0.5, _DEFAULTS_PY),
    "MODEL.ROI_HEADS.DETECTIONS_PER_IMG": (100, _DEFAULTS_PY),
    "MODEL.ROI_HEADS.MIN_DETECTIONS_PER_IMG": (0, _DEFAULTS_PY),
    "MODEL.ROI_HEADS.NMS_FILTER": (0, _DEFAULTS_PY),
    "MODEL.ROI_BOX_HEAD.FEATURE_EXTRACTOR": ("ResNet50Conv5ROIFeatureExtractor", _DEFAULTS_PY),
    "MODEL.ROI_BOX_HEAD.PREDICTOR": ("FastRCNNPredictor", _DEFAULTS_PY),
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": (14, _DEFAULTS_PY),
    "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": (0, _DEFAULTS_PY),
    "MODEL.ROI_BOX_HEAD.POOLER_SCALES": ((1.0 / 16,), _DEFAULTS_PY),
    "MODEL.ROI_BOX_HEAD.NUM_CLASSES": (81, _DEFAULTS_PY),
    "MODEL.ROI_BOX_HEAD.FORCE_BOXES": (False, _DEFAULTS_PY),
    "MODEL.ATTRIBUTE_ON": (False, _SG_DEFAULTS_PY),
    "MODEL.RELATION_ON": (False, _SG_DEFAULTS_PY),
    "MODEL.ROI_ATTRIBUTE_HEAD.SHARE_BOX_FEATURE_EXTRACTOR": (True, _SG_DEFAULTS_PY),
    "MODEL.ROI_ATTRIBUTE_HEAD.FEATURE_EXTRACTOR": ("ResNet50Conv5ROIFeatureExtractor",
                                                   _SG_DEFAULTS_PY),
    "MODEL.ROI_ATTRIBUTE_HEAD.PREDICTOR": ("AttributeRCNNPredictor", _SG_DEFAULTS_PY),
    "MODEL.ROI_ATTRIBUTE_HEAD.NUM_ATTRIBUTES": (401, _SG_DEFAULTS_PY),
    "MODEL.ROI_ATTRIBUTE_HEAD.CLS_EMD_DIM": (256, _SG_DEFAULTS_PY),
    "MODEL.ROI_ATTRIBUTE_HEAD.ATTR_EMD_DIM": (512, _SG_DEFAULTS_PY),
    "MODEL.ROI_ATTRIBUTE_HEAD.MAX_NUM_ATTR_PER_IMG": (100, _SG_DEFAULTS_PY),
    "MODEL.ROI_ATTRIBUTE_HEAD.MAX_NUM_ATTR_PER_OBJ": (16, _SG_DEFAULTS_PY),
    "MODEL.ROI_ATTRIBUTE_HEAD.POSTPROCESS_ATTRIBUTES_THRESHOLD": (0.0, _SG_DEFAULTS_PY),
    "INPUT.MIN_SIZE_TEST": (800, _DEFAULTS_PY),
    "INPUT.MAX_SIZE_TEST": (1333, _DEFAULTS_PY),
    "INPUT.PIXEL_MEAN": ((102.9801, 115.9465, 122.7717), _DEFAULTS_PY),
    "INPUT.PIXEL_STD": ((1.0, 1.0, 1.0), _DEFAULTS_PY),
    "INPUT.TO_BGR255": (True, _DEFAULTS_PY),
    "DATALOADER.SIZE_DIVISIBILITY": (0, _DEFAULTS_PY),
    "TEST.IGNORE_BOX_REGRESSION": (False, _DEFAULTS_PY),
    "TEST.BBOX_AUG.ENABLED": (False, _DEFAULTS_PY),
    "DTYPE": ("float32", _DEFAULTS_PY),
}


def _is(*values) -> Callable[[Any, dict], str | None]:
    def check(v, c):
        return None if v in values else f"expected {' or '.join(repr(x) for x in values)}"
    return check


#: The config values vlkd reproduces; any other value is refused with the reason.
SUPPORTED: dict[str, Callable[[Any, dict], str | None]] = {
    "MODEL.META_ARCHITECTURE": _is("AttrRCNN", "GeneralizedRCNN"),
    "MODEL.RPN_ONLY": _is(False),
    "MODEL.MASK_ON": _is(False),
    "MODEL.RETINANET_ON": _is(False),
    "MODEL.KEYPOINT_ON": _is(False),
    "MODEL.RELATION_ON": _is(False),
    "MODEL.BACKBONE.CONV_BODY": lambda v, c: None if re.fullmatch(r"R-\d+-C4", str(v)) else
    "expected a C4 ResNet body (R-50-C4, R-101-C4, R-152-C4): FPN and C5 bodies are not "
    "supported",
    "MODEL.RESNETS.TRANS_FUNC": _is("BottleneckWithFixedBatchNorm"),
    "MODEL.RESNETS.STEM_FUNC": _is("StemWithFixedBatchNorm"),
    "MODEL.RESNETS.RES5_DILATION": _is(1),
    "MODEL.RESNETS.STAGE_WITH_DCN": lambda v, c: None if not any(v) else
    "deformable convolutions are not supported",
    "MODEL.RESNETS.BACKBONE_OUT_CHANNELS": lambda v, c: None
    if v == 4 * c["MODEL.RESNETS.RES2_OUT_CHANNELS"] == 1024 else
    "expected 1024 = 4 x RES2_OUT_CHANNELS: otherwise SGB's ResNet50Conv5ROIFeatureExtractor "
    "adds a transition conv (trans_conv) that detectron2's Res5ROIHeads has no place for",
    "MODEL.RPN.USE_FPN": _is(False),
    "MODEL.RPN.RPN_HEAD": _is("SingleConvRPNHead"),
    "MODEL.RPN.ANCHOR_STRIDE": lambda v, c: None if list(v) == [16] else
    "expected (16,): one anchor stride, the res4 stride",
    "MODEL.ROI_HEADS.USE_FPN": _is(False),
    "MODEL.ROI_BOX_HEAD.FEATURE_EXTRACTOR": _is("ResNet50Conv5ROIFeatureExtractor"),
    "MODEL.ROI_BOX_HEAD.PREDICTOR": _is("FastRCNNPredictor"),
    "MODEL.ROI_BOX_HEAD.POOLER_SCALES": lambda v, c: None
    if len(v) == 1 and math.isclose(float(v[0]), 1 / 16) else
    "expected (0.0625,): one level at the res4 stride 16",
    "MODEL.ROI_ATTRIBUTE_HEAD.SHARE_BOX_FEATURE_EXTRACTOR": lambda v, c: None
    if v or not c["MODEL.ATTRIBUTE_ON"] else
    "expected True: an attribute head with its own res5 feature extractor is not supported",
    "MODEL.ROI_ATTRIBUTE_HEAD.FEATURE_EXTRACTOR": _is("ResNet50Conv5ROIFeatureExtractor"),
    "MODEL.ROI_ATTRIBUTE_HEAD.PREDICTOR": _is("AttributeRCNNPredictor"),
    "INPUT.TO_BGR255": _is(True),
    "DATALOADER.SIZE_DIVISIBILITY": _is(0),
    "TEST.BBOX_AUG.ENABLED": _is(False),
    "DTYPE": _is("float32"),
}

#: SGB's test-time post-processing keys: not part of the model, reported with the vlkd options
#: that reproduce them (``conversion.json`` and the command's summary).
POSTPROCESS = ("MODEL.ROI_HEADS.SCORE_THRESH", "MODEL.ROI_HEADS.NMS",
               "MODEL.ROI_HEADS.DETECTIONS_PER_IMG", "MODEL.ROI_HEADS.MIN_DETECTIONS_PER_IMG",
               "MODEL.ROI_HEADS.NMS_FILTER", "TEST.IGNORE_BOX_REGRESSION",
               "MODEL.ROI_ATTRIBUTE_HEAD.POSTPROCESS_ATTRIBUTES_THRESHOLD",
               "MODEL.ROI_ATTRIBUTE_HEAD.MAX_NUM_ATTR_PER_OBJ",
               "MODEL.ROI_ATTRIBUTE_HEAD.MAX_NUM_ATTR_PER_IMG",
               "MODEL.RPN.FORCE_BOXES", "MODEL.ROI_BOX_HEAD.FORCE_BOXES")

#: Keys (or ``PREFIX.`` groups) that do not change a test-time forward pass: training, data,
#: output, and heads that are off (their ``*_ON`` switch is checked above).
IGNORED = (
    "SOLVER.", "DATASETS.", "DATALOADER.NUM_WORKERS", "DATALOADER.ASPECT_RATIO_GROUPING",
    "OUTPUT_DIR", "DATA_DIR", "DISTRIBUTED_BACKEND", "LOG_LOSS_PERIOD", "PATHS_CATALOG",
    "MODEL.WEIGHT", "MODEL.DEVICE", "MODEL.BACKBONE.FREEZE_CONV_BODY_AT",
    "INPUT.MIN_SIZE_TRAIN", "INPUT.MAX_SIZE_TRAIN", "INPUT.BRIGHTNESS", "INPUT.CONTRAST",
    "INPUT.SATURATION", "INPUT.HUE", "INPUT.HORIZONTAL_FLIP_PROB_TRAIN",
    "INPUT.VERTICAL_FLIP_PROB_TRAIN",
    "MODEL.RPN.PRE_NMS_TOP_N_TRAIN", "MODEL.RPN.POST_NMS_TOP_N_TRAIN",
    "MODEL.RPN.FPN_POST_NMS_TOP_N_TRAIN", "MODEL.RPN.FPN_POST_NMS_TOP_N_TEST",
    "MODEL.RPN.FPN_POST_NMS_PER_BATCH", "MODEL.RPN.STRADDLE_THRESH",
    "MODEL.RPN.FG_IOU_THRESHOLD", "MODEL.RPN.BG_IOU_THRESHOLD",
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "MODEL.RPN.POSITIVE_FRACTION",
    "MODEL.ROI_HEADS.FG_IOU_THRESHOLD", "MODEL.ROI_HEADS.BG_IOU_THRESHOLD",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "MODEL.ROI_HEADS.POSITIVE_FRACTION",
    # read only by the MLP/conv box heads, not ResNet50Conv5ROIFeatureExtractor
    "MODEL.ROI_BOX_HEAD.MLP_HEAD_DIM", "MODEL.ROI_BOX_HEAD.USE_GN",
    "MODEL.ROI_BOX_HEAD.DILATION", "MODEL.ROI_BOX_HEAD.CONV_HEAD_DIM",
    "MODEL.ROI_BOX_HEAD.NUM_STACKED_CONVS",
    # the shared extractor is the box head's; the loss weight is training only
    "MODEL.ROI_ATTRIBUTE_HEAD.POOLER_", "MODEL.ROI_ATTRIBUTE_HEAD.MLP_HEAD_DIM",
    "MODEL.ROI_ATTRIBUTE_HEAD.LOSS_WEIGHT", "TEST.OUTPUT_ATTRIBUTE_FEATURE",
    "MODEL.RESNETS.WITH_MODULATED_DCN", "MODEL.RESNETS.DEFORMABLE_GROUPS",
    "MODEL.GROUP_NORM.", "MODEL.FPN.", "MODEL.ROI_MASK_HEAD.", "MODEL.ROI_KEYPOINT_HEAD.",
    "MODEL.RETINANET.", "MODEL.FBNET.", "MODEL.TRANSFORMER.", "MODEL.ROI_RELATION_HEAD.",
    "MODEL.USE_FREQ_PRIOR", "MODEL.FREQ_PRIOR",
    "TEST.IMS_PER_BATCH", "TEST.SAVE_PREDICTIONS", "TEST.SAVE_RESULTS_TO_TSV",
    "TEST.TSV_SAVE_SUBSET", "TEST.SKIP_PERFORMANCE_EVAL", "TEST.GATHER_ON_CPU",
    "TEST.OUTPUT_FEATURE", "TEST.OUTPUT_RELATION_FEATURE", "TEST.EXPECTED_RESULTS",
    "TEST.EXPECTED_RESULTS_SIGMA_TOL", "TEST.DETECTIONS_PER_IMG", "TEST.BBOX_AUG.",
)

#: SGB's ResNet stage specs (``_STAGE_SPECS`` of maskrcnn_benchmark/modeling/backbone/resnet.py)
#: for the C4 bodies, res2..res4; the res5 head has 3 blocks (``ResNet50Conv5ROIFeatureExtractor``).
SGB_C4_STAGE_SPECS = {"R-50-C4": (3, 4, 6), "R-101-C4": (3, 4, 23), "R-152-C4": (3, 8, 36)}


# ---------------------------------------------------------------------------------- config

def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _decode(value):
    """A config value as yacs decodes it (``CfgNode._decode_cfg_value``): strings that are Python
    literals (``"(32, 64)"``, ``"True"``, ``"0.2"``) become them, other strings stay."""
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def _ignored(key: str) -> bool:
    return any(key == p or (p.endswith((".", "_")) and key.startswith(p)) for p in IGNORED)


def read_sgb_config(path: str | os.PathLike, opts: Sequence[str] = ()) -> dict[str, Any]:
    """SGB's config as SGB resolves it: :data:`SGB_DEFAULTS`, the YAML file, then ``opts``
    (``KEY VALUE`` pairs, as on SGB's command line, e.g. ``MODEL.ROI_HEADS.NMS_FILTER 1``).

    Returns:
        ``{dotted key: value}`` for every key of :data:`SGB_DEFAULTS`.

    Raises:
        ConversionError: the file is missing or not a mapping; a key is unknown to the converter
            (named, with what to do); a value is not one vlkd reproduces (:data:`SUPPORTED`).
    """
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConversionError(f"--config {p} does not exist; pass SGB's config, e.g. "
                              "sgg_configs/vgattr/vinvl_x152c4.yaml") from None
    except yaml.YAMLError as e:
        raise ConversionError(f"--config {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"--config {p}: expected a YAML mapping, found "
                              f"{type(data).__name__}")
    given = {k: _decode(v) for k, v in _flatten(data).items()}
    if len(opts) % 2:
        raise ConversionError(f"SGB config overrides come in KEY VALUE pairs; got {len(opts)} "
                              f"words: {' '.join(opts)}")
    for k, v in zip(opts[::2], opts[1::2]):  # yacs merge_from_list: literal_eval each value
        given[k] = _decode(v)
    unknown = [k for k in given if k not in SGB_DEFAULTS and not _ignored(k)]
    if unknown:
        raise ConversionError(
            f"--config {p}: the converter does not know SGB config key(s) {', '.join(unknown)}; "
            "each key is either converted, checked, or known not to change a test-time forward "
            "pass (vlkd.extract.convert_vinvl.IGNORED). If the key does not change the detector, "
            "remove it from a copy of the config; otherwise this model cannot be converted "
            "exactly")
    cfg = {k: v for k, (v, _) in SGB_DEFAULTS.items()}
    cfg.update({k: v for k, v in given.items() if k in SGB_DEFAULTS})
    bad = []
    for key, check in SUPPORTED.items():
        why = check(cfg[key], cfg)
        if why:
            bad.append(f"{key} = {cfg[key]!r} ({why})")
    if bad:
        raise ConversionError(f"--config {p}: not convertible exactly: " + "; ".join(bad))
    return cfg


# ------------------------------------------------------------------------------ checkpoint

def load_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False
                    ) -> tuple[dict[str, torch.Tensor], dict]:
    """The model state dict of an SGB checkpoint, and how it was stored.

    Accepts the trainer dict ``maskrcnn_benchmark/utils/checkpoint.py`` saves (``model`` plus
    ``optimizer``, ``scheduler``, ``iteration``, ...) or a flat state dict. The ``module.``
    prefix is removed when every key has it, as SGB's ``strip_prefix_if_present`` does.

    Raises:
        ConversionError: missing file, non-tensor model entries, or a pickle ``torch.load(
            weights_only=True)`` refuses (pass ``trust_pickle`` only for a trusted file).
    """
    p = Path(path)
    if not p.is_file():
        raise ConversionError(f"--weights {p} does not exist")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:  # noqa: BLE001 - torch explains what it refused
        raise ConversionError(
            f"--weights {p} cannot be loaded with torch.load(weights_only=True): {e}\nIt holds "
            "Python objects beyond tensors; pass --trust-pickle only if you trust its origin "
            "(unpickling runs whatever code the file contains)") from None
    if not isinstance(ckpt, dict):
        raise ConversionError(f"--weights {p}: expected a dict (SGB's trainer dict or a state "
                              f"dict), found {type(ckpt).__name__}")
    layout: dict[str, Any]
    if "model" in ckpt and isinstance(ckpt["model"], dict):
        state = ckpt["model"]
        layout = {"kind": "trainer dict", "keys": sorted(map(str, ckpt))}
        if "iteration" in ckpt and isinstance(ckpt["iteration"], int):
            layout["iteration"] = ckpt["iteration"]
    else:
        state, layout = ckpt, {"kind": "state dict"}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"--weights {p}: the model entries {bad[:5]} are not tensors; "
                              "expected a state dict of tensors")
    keys = list(state)
    layout["module_prefix"] = bool(keys) and all(k.startswith("module.") for k in keys)
    if layout["module_prefix"]:
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state), layout


# ------------------------------------------------------------------------- detectron2 config

def detectron2_config(cfg: dict, blocks: Sequence[int], num_classes: int,
                      num_attributes: int) -> dict:
    """The detectron2 config (a plain dict, saved as ``config.yaml``) of the converted model."""
    depth = 3 * sum(blocks) + 2  # a bottleneck ResNet's conventional depth (50, 101, 152)
    return {
        "VERSION": 2,
        "MODEL": {
            "META_ARCHITECTURE": "GeneralizedRCNN",
            "WEIGHTS": "",
            "PIXEL_MEAN": [float(x) for x in cfg["INPUT.PIXEL_MEAN"]],
            "PIXEL_STD": [float(x) for x in cfg["INPUT.PIXEL_STD"]],
            "BACKBONE": {"NAME": "build_vinvl_resnet_backbone", "FREEZE_AT": 0},
            "RESNETS": {
                "DEPTH": depth, "OUT_FEATURES": ["res4"], "NORM": "FrozenBN",
                "NUM_GROUPS": int(cfg["MODEL.RESNETS.NUM_GROUPS"]),
                "WIDTH_PER_GROUP": int(cfg["MODEL.RESNETS.WIDTH_PER_GROUP"]),
                "STRIDE_IN_1X1": bool(cfg["MODEL.RESNETS.STRIDE_IN_1X1"]),
                "RES2_OUT_CHANNELS": int(cfg["MODEL.RESNETS.RES2_OUT_CHANNELS"]),
                "STEM_OUT_CHANNELS": int(cfg["MODEL.RESNETS.STEM_OUT_CHANNELS"]),
                "RES5_DILATION": 1,
            },
            "ANCHOR_GENERATOR": {
                "NAME": "VinVLAnchorGenerator",
                "SIZES": [[float(s) for s in cfg["MODEL.RPN.ANCHOR_SIZES"]]],
                "ASPECT_RATIOS": [[float(a) for a in cfg["MODEL.RPN.ASPECT_RATIOS"]]],
                "OFFSET": 0.0,
            },
            "PROPOSAL_GENERATOR": {"NAME": "VinVLRPN",
                                   "MIN_SIZE": int(cfg["MODEL.RPN.MIN_SIZE"])},
            "RPN": {
                "HEAD_NAME": "StandardRPNHead", "IN_FEATURES": ["res4"],
                "PRE_NMS_TOPK_TEST": int(cfg["MODEL.RPN.PRE_NMS_TOP_N_TEST"]),
                "POST_NMS_TOPK_TEST": int(cfg["MODEL.RPN.POST_NMS_TOP_N_TEST"]),
                "NMS_THRESH": float(cfg["MODEL.RPN.NMS_THRESH"]),
                "BBOX_REG_WEIGHTS": [1.0, 1.0, 1.0, 1.0],  # SGB's RPNModule: BoxCoder((1,1,1,1))
            },
            "ROI_HEADS": {"NAME": "VinVLRes5ROIHeads", "IN_FEATURES": ["res4"],
                          "NUM_CLASSES": int(num_classes),
                          "SCORE_THRESH_TEST": float(cfg["MODEL.ROI_HEADS.SCORE_THRESH"]),
                          "NMS_THRESH_TEST": float(cfg["MODEL.ROI_HEADS.NMS"])},
            "ROI_BOX_HEAD": {
                "POOLER_TYPE": "ROIAlign",
                "POOLER_RESOLUTION": int(cfg["MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION"]),
                "POOLER_SAMPLING_RATIO": int(cfg["MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO"]),
                "BBOX_REG_WEIGHTS": [float(w) for w in cfg["MODEL.ROI_HEADS.BBOX_REG_WEIGHTS"]],
                "CLS_AGNOSTIC_BBOX_REG": bool(cfg["MODEL.CLS_AGNOSTIC_BBOX_REG"]),
            },
            "VINVL": {
                "BLOCKS_PER_STAGE": [int(b) for b in blocks],
                "NUM_ATTRIBUTES": int(num_attributes),
                "CLS_EMBED_DIM": int(cfg["MODEL.ROI_ATTRIBUTE_HEAD.CLS_EMD_DIM"]),
                "ATTR_EMBED_DIM": int(cfg["MODEL.ROI_ATTRIBUTE_HEAD.ATTR_EMD_DIM"]),
            },
        },
        "INPUT": {"FORMAT": "BGR", "MIN_SIZE_TEST": int(cfg["INPUT.MIN_SIZE_TEST"]),
                  "MAX_SIZE_TEST": int(cfg["INPUT.MAX_SIZE_TEST"]),
                  "RESIZE_RULE": "maskrcnn_benchmark"},
        "TEST": {"DETECTIONS_PER_IMAGE": int(cfg["MODEL.ROI_HEADS.DETECTIONS_PER_IMG"])},
    }


def extraction_options(cfg: dict, has_attributes: bool) -> dict:
    """The ``proposals`` / ``teacher-features`` options that reproduce SGB's post-processing, and
    the reason when none does exactly."""
    nms_filter = int(cfg["MODEL.ROI_HEADS.NMS_FILTER"])
    ignore = bool(cfg["TEST.IGNORE_BOX_REGRESSION"])
    thresh = float(cfg["MODEL.ROI_HEADS.SCORE_THRESH"])
    lo, hi = (int(cfg["MODEL.ROI_HEADS.MIN_DETECTIONS_PER_IMG"]),
              int(cfg["MODEL.ROI_HEADS.DETECTIONS_PER_IMG"]))
    sel = ["--score-thresh", str(thresh), "--min-boxes", str(lo), "--max-boxes", str(hi)]
    if nms_filter == 1 and ignore:
        flags, note = ["--box-selection", "vinvl", *sel], "exact: filter_results_peter"
    elif nms_filter == 0:
        flags = ["--box-selection", "detectron2", *sel, "--nms-thresh",
                 str(float(cfg["MODEL.ROI_HEADS.NMS"]))]
        note = ("close, not exact: SGB's filter_results halves its threshold up to 10 times to "
                "reach MIN_DETECTIONS_PER_IMG, vlkd tops up with the best lower-scoring boxes")
    else:
        flags = ["--box-selection", "vinvl", *sel]
        note = (f"not exact: no vlkd rule reproduces NMS_FILTER {nms_filter} with "
                f"TEST.IGNORE_BOX_REGRESSION {ignore}; VinVL's released features use "
                "NMS_FILTER 1 with IGNORE_BOX_REGRESSION True (this rule)")
    attr = []
    if has_attributes:
        attr = ["--attributes", "--attr-thresh",
                str(float(cfg["MODEL.ROI_ATTRIBUTE_HEAD.POSTPROCESS_ATTRIBUTES_THRESHOLD"])),
                "--attr-top-k", str(int(cfg["MODEL.ROI_ATTRIBUTE_HEAD.MAX_NUM_ATTR_PER_OBJ"])),
                "--attr-max-per-image",
                str(int(cfg["MODEL.ROI_ATTRIBUTE_HEAD.MAX_NUM_ATTR_PER_IMG"]))]
    return {"proposals": flags + attr, "teacher_features": attr, "box_selection_note": note}


# -------------------------------------------------------------------------------- labelmap

def read_labelmap(path: str | os.PathLike, num_classes: int, num_attributes: int
                  ) -> tuple[list[str], list[str]]:
    """Class and attribute names in detectron2 order from SGB's labelmap JSON.

    ``label_to_idx`` (and ``attribute_to_idx``) map names to SGB's 1-based indices (0 is
    ``__background__`` / ``__no_attribute__``, added by SGB's datasets); ``idx_to_label`` /
    ``idx_to_attribute``, when present, must agree. Name ``i`` here is SGB's index ``i + 1``.

    Raises:
        ConversionError: the indices are not exactly 1..K (1..A), or disagree.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"--labelmap {p} does not exist; pass SGB's labelmap, e.g. "
                              "VG-SGG-dicts-vgoi6-clipped.json") from None
    except ValueError as e:
        raise ConversionError(f"--labelmap {p} is not valid JSON: {e}") from None

    def names(to_idx: str, from_idx: str, n: int, what: str) -> list[str]:
        m = data.get(to_idx)
        if not isinstance(m, dict):
            raise ConversionError(f"--labelmap {p} has no '{to_idx}' mapping (SGB's labelmaps "
                                  f"map {what} names to 1-based indices there)")
        by_idx: dict[int, str] = {}
        for name, i in m.items():
            if not isinstance(i, int) or i in by_idx:
                raise ConversionError(f"--labelmap {p}: {to_idx}[{name!r}] = {i!r} is not a "
                                      "distinct integer index")
            by_idx[i] = name
        if sorted(by_idx) != list(range(1, n + 1)):
            raise ConversionError(
                f"--labelmap {p}: {to_idx} has {len(by_idx)} entries with indices "
                f"{min(by_idx, default=None)}..{max(by_idx, default=None)}, but the checkpoint "
                f"predicts {n} (1..{n}; 0 is the background): labelmap and checkpoint do not "
                "belong together")
        inv = data.get(from_idx)
        if isinstance(inv, dict):
            for i, name in by_idx.items():
                if inv.get(str(i)) != name:
                    raise ConversionError(f"--labelmap {p}: {from_idx}[{str(i)!r}] is "
                                          f"{inv.get(str(i))!r} but {to_idx} gives {name!r}")
        return [by_idx[i] for i in range(1, n + 1)]

    classes = names("label_to_idx", "idx_to_label", num_classes, "class")
    attributes = names("attribute_to_idx", "idx_to_attribute", num_attributes, "attribute") \
        if num_attributes else []
    return classes, attributes


# ------------------------------------------------------------------------------- converting

@dataclass
class ConversionReport:
    """What :func:`convert` wrote (``conversion.json``)."""

    out: str
    num_classes: int
    num_attributes: int
    blocks_per_stage: tuple[int, ...]
    keys: dict[str, int]
    checkpoint: dict
    options: dict
    sources: dict = field(default_factory=dict)
    postprocess: dict = field(default_factory=dict)

    def summary(self) -> str:
        p, t = self.options["proposals"], self.options["teacher_features"]
        return (f"convert-detector: {self.out}: {self.num_classes} classes, "
                f"{self.num_attributes} attributes, blocks per stage "
                f"{list(self.blocks_per_stage)}, {sum(self.keys.values())} checkpoint keys "
                f"({', '.join(f'{n} {k}' for k, n in sorted(self.keys.items()))}).\n"
                f"SGB's post-processing as vlkd options ({self.options['box_selection_note']}):\n"
                f"  proposals:        {' '.join(p)}\n"
                f"  teacher-features: {' '.join(t) or '(none)'}")


def convert(config: str | os.PathLike, weights: str | os.PathLike,
            labelmap: str | os.PathLike, out: str | os.PathLike, *,
            opts: Sequence[str] = (), trust_pickle: bool = False) -> ConversionReport:
    """Convert an SGB VinVL detector into ``out`` (module docstring).

    Args:
        config: SGB's YAML config.
        weights: SGB's checkpoint (``.pth``).
        labelmap: SGB's labelmap JSON.
        out: the output folder; must not exist, or be empty.
        opts: SGB config overrides, ``KEY VALUE`` pairs (as on SGB's command line).
        trust_pickle: allow a checkpoint ``torch.load(weights_only=True)`` refuses.

    Raises:
        ConversionError: anything that would make the conversion inexact (the message says).
    """
    from safetensors.torch import save_file

    from .detector import DetectorError, WeightsError, load_weights

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"--out {out} exists and is not an empty folder; pass a new one")
    cfg = read_sgb_config(config, opts)
    state, layout = load_checkpoint(weights, trust_pickle=trust_pickle)
    blocks = block_counts(state)
    body = str(cfg["MODEL.BACKBONE.CONV_BODY"])
    spec = SGB_C4_STAGE_SPECS.get(body)
    if spec is not None and (tuple(blocks[:3]) != spec or blocks[3] != 3):
        raise ConversionError(
            f"the checkpoint has {list(blocks)} blocks in res2..res5 but the config's "
            f"MODEL.BACKBONE.CONV_BODY {body} is SGB's {list(spec) + [3]}: config and checkpoint "
            "do not belong together")
    k1 = int(cfg["MODEL.ROI_BOX_HEAD.NUM_CLASSES"])
    cls = state.get("roi_heads.box.predictor.cls_score.weight")
    if cls is None:
        raise ConversionError("the checkpoint has no roi_heads.box.predictor.cls_score.weight")
    if cls.shape[0] != k1:
        raise ConversionError(f"roi_heads.box.predictor.cls_score has {cls.shape[0]} rows but "
                              f"the config's MODEL.ROI_BOX_HEAD.NUM_CLASSES is {k1}")
    a1 = 0
    if cfg["MODEL.ATTRIBUTE_ON"]:
        a1 = int(cfg["MODEL.ROI_ATTRIBUTE_HEAD.NUM_ATTRIBUTES"])
        att = state.get("attribute.predictor.attr_score.weight")
        if att is not None and att.shape[0] != a1:
            raise ConversionError(f"attribute.predictor.attr_score has {att.shape[0]} rows but "
                                  f"MODEL.ROI_ATTRIBUTE_HEAD.NUM_ATTRIBUTES is {a1}")
    num_classes, num_attributes = k1 - 1, max(a1 - 1, 0)
    class_names, attribute_names = read_labelmap(labelmap, num_classes, num_attributes)

    d2 = detectron2_config(cfg, blocks, num_classes, num_attributes)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "config.yaml").write_text(yaml.safe_dump(d2, sort_keys=False))
        model = _build(tmp / "config.yaml")
        eps = {name: float(m.eps) for name, m in model.named_modules()
               if type(m).__name__ == "FrozenBatchNorm2d"}
        converted, counts = translate(state, cfg, eps)
        _check_against_model(model, converted)
        save_file({k: v.contiguous() for k, v in converted.items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        try:  # the whole loading path vlkd's jobs use, on the written file
            load_weights(model, tmp / "model.safetensors")
        except (DetectorError, WeightsError) as e:
            raise ConversionError(f"the converted weights do not load: {e}") from None
        (tmp / "class_names.json").write_text(json.dumps(class_names, ensure_ascii=False,
                                                         indent=0))
        if num_attributes:
            (tmp / "attribute_names.json").write_text(
                json.dumps(attribute_names, ensure_ascii=False, indent=0))
        report = ConversionReport(
            out=str(out), num_classes=num_classes, num_attributes=num_attributes,
            blocks_per_stage=tuple(blocks), keys=counts, checkpoint=layout,
            options=extraction_options(cfg, bool(num_attributes)),
            sources={"config": str(config), "config_digest": file_digest(config).hex(),
                     "weights": str(weights), "weights_digest": file_digest(weights).hex(),
                     "labelmap": str(labelmap), "labelmap_digest": file_digest(labelmap).hex(),
                     "opts": list(opts), "from": "vinvl", "tool_version": __version__},
            postprocess={k: cfg[k] for k in POSTPROCESS})
        (tmp / "conversion.json").write_text(json.dumps(
            {k: v for k, v in report.__dict__.items() if k != "out"}, indent=1, default=list))
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return report


def _build(config_path: Path) -> torch.nn.Module:
    from detectron2.modeling import build_model

    from .detector import load_detector_config

    cfg = load_detector_config(config_path, ["MODEL.DEVICE", "cpu"])
    return build_model(cfg).eval()


def _check_against_model(model: torch.nn.Module, converted: dict[str, torch.Tensor]) -> None:
    """Every parameter and buffer of the detectron2 model gets a tensor of its shape, and no
    converted tensor is left without a place."""
    want = model.state_dict()
    missing = [k for k in want if k not in converted]
    extra = [k for k in converted if k not in want]
    shapes = [f"{k}: converted {tuple(converted[k].shape)} vs model {tuple(v.shape)}"
              for k, v in want.items() if k in converted and converted[k].shape != v.shape]
    if missing:
        raise ConversionError(f"no checkpoint key gives the detectron2 model's "
                              f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''} "
                              f"({len(missing)} missing): the checkpoint lacks part of the model")
    if extra:
        raise ConversionError(f"converted tensors without a place in the detectron2 model: "
                              f"{', '.join(extra[:8])}: config and checkpoint do not belong "
                              "together")
    if shapes:
        raise ConversionError("shapes that do not fit the model built from the config "
                              "(widths, groups, NUM_CLASSES): " + "; ".join(shapes[:4]))


__all__ = ["FROM_CHOICES", "OUT_FILES", "SGB_DEFAULTS", "SUPPORTED", "POSTPROCESS", "IGNORED",
           "SGB_C4_STAGE_SPECS", "ConversionError", "read_sgb_config", "load_checkpoint",
           "KeyRule", "KEY_TABLE", "match_key", "block_counts", "translate", "fold_frozen_bn",
           "detectron2_config", "extraction_options", "read_labelmap", "ConversionReport",
           "convert"]
