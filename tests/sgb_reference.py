"""A tiny scene_graph_benchmark (SGB) VinVL checkpoint, and SGB's computation written out.

Nothing here imports vlkd. The checkpoint has SGB's exact key names (``AttrRCNN``: a
``R-50-C4`` ResNeXt body, ``SingleConvRPNHead``, ``ResNet50Conv5ROIFeatureExtractor`` +
``FastRCNNPredictor``, the attribute head sharing the box head's extractor, so its keys appear
twice) with tiny bottleneck widths and random values. The reference functions follow SGB's code
line by line with plain ``torch.nn.functional`` ops, each citing the file it is written from
(microsoft/scene_graph_benchmark):

- preprocessing: ``maskrcnn_benchmark/data/transforms/transforms.py`` (``Resize.get_size``,
  torchvision's ``F.resize`` of a PIL image, ``ToTensor``, ``Normalize(to_bgr255=True)``);
- FrozenBatchNorm: ``maskrcnn_benchmark/layers/batch_norm.py`` (``w * rsqrt(var)``, no eps);
- ResNet: ``maskrcnn_benchmark/modeling/backbone/resnet.py`` (``BaseStem``, ``Bottleneck``);
- pooling: ``maskrcnn_benchmark/layers/roi_align.py`` (``torchvision.ops.roi_align``,
  ``aligned=False``), ``modeling/poolers.py``;
- the box head: ``modeling/roi_heads/box_head/roi_box_feature_extractors.py``,
  ``roi_box_predictors.py`` (``avgpool``, ``cls_score``), ``inference.py`` (softmax);
- the RPN: ``modeling/rpn/rpn.py``, ``rpn/inference.py``, ``rpn/anchor_generator.py``,
  ``modeling/box_coder.py``, ``structures/bounding_box.py``, ``structures/boxlist_ops.py``;
- attributes: ``scene_graph_benchmark/attribute_head/roi_attribute_predictors.py``,
  ``attribute_head/inference.py``.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torchvision.ops import nms, roi_align

#: The tiny model: SGB-buildable (BACKBONE_OUT_CHANNELS 1024 = 4 x RES2_OUT_CHANNELS, so SGB's
#: extractor has no trans_conv), ResNeXt groups, STRIDE_IN_1X1 False as VinVL's X152-C4.
TINY = dict(groups=4, width=2, stem=16, res2=256, blocks=(3, 4, 6, 3), classes=6, attributes=8,
            cls_emb=8, attr_emb=16, sizes=(32, 64, 128), ratios=(0.5, 1.0, 2.0))
PIXEL_MEAN = (103.530, 116.280, 123.675)  # sgg_configs/vgattr/vinvl_x152c4.yaml


def sgb_yaml(path: Path, *, conv_body: str = "R-50-C4", extra: dict | None = None) -> Path:
    """An SGB config for :data:`TINY`, laid out as ``sgg_configs/vgattr/vinvl_x152c4.yaml``."""
    t = TINY
    cfg = {
        "MODEL": {
            "META_ARCHITECTURE": "AttrRCNN",
            "WEIGHT": "pretrained_model/vinvl_vg_x152c4.pth",
            "BACKBONE": {"CONV_BODY": conv_body},
            "RESNETS": {"BACKBONE_OUT_CHANNELS": 1024, "STRIDE_IN_1X1": False,
                        "NUM_GROUPS": t["groups"], "WIDTH_PER_GROUP": t["width"],
                        "STEM_OUT_CHANNELS": t["stem"]},
            "RPN": {"PRE_NMS_TOP_N_TEST": 600, "POST_NMS_TOP_N_TEST": 60,
                    "ANCHOR_SIZES": list(t["sizes"]), "ASPECT_RATIOS": list(t["ratios"])},
            "ROI_HEADS": {"BATCH_SIZE_PER_IMAGE": 384, "POSITIVE_FRACTION": 0.5,
                          "SCORE_THRESH": 0.2, "DETECTIONS_PER_IMG": 100,
                          "MIN_DETECTIONS_PER_IMG": 10},
            "ROI_BOX_HEAD": {"NUM_CLASSES": t["classes"]},
            "ROI_ATTRIBUTE_HEAD": {"NUM_ATTRIBUTES": t["attributes"],
                                   "CLS_EMD_DIM": t["cls_emb"], "ATTR_EMD_DIM": t["attr_emb"],
                                   "POSTPROCESS_ATTRIBUTES_THRESHOLD": 0.05},
            "ATTRIBUTE_ON": True,
        },
        "INPUT": {"MIN_SIZE_TEST": 96, "MAX_SIZE_TEST": 160, "PIXEL_MEAN": list(PIXEL_MEAN)},
        "DATASETS": {"LABELMAP_FILE": "visualgenome/VG-SGG-dicts-vgoi6-clipped.json",
                     "TRAIN": ["visualgenome/train_vgoi6_clipped.yaml"],
                     "FACTORY_TEST": ["VGTSVDataset"]},
        "DATALOADER": {"NUM_WORKERS": 0},
        "SOLVER": {"BASE_LR": 0.01, "MAX_ITER": 90000, "IMS_PER_BATCH": 1},
        "TEST": {"IMS_PER_BATCH": 1, "SKIP_PERFORMANCE_EVAL": True, "SAVE_PREDICTIONS": True,
                 "TSV_SAVE_SUBSET": ["rect", "class", "conf", "feature"], "GATHER_ON_CPU": True},
        "OUTPUT_DIR": "./output/X152C5_test",
        "DATA_DIR": "./datasets",
        "DISTRIBUTED_BACKEND": "gloo",
    }
    for k, v in (extra or {}).items():
        d = cfg
        *parents, last = k.split(".")
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = v
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def sgb_labelmap(path: Path, num_classes: int = TINY["classes"] - 1,
                 num_attributes: int = TINY["attributes"] - 1) -> Path:
    """A labelmap laid out as ``VG-SGG-dicts-vgoi6-clipped.json`` (1-based indices)."""
    import json

    labels = [f"object{i}" for i in range(1, num_classes + 1)]
    attrs = [f"attr{i}" for i in range(1, num_attributes + 1)]
    data = {"label_to_idx": {n: i + 1 for i, n in enumerate(labels)},
            "idx_to_label": {str(i + 1): n for i, n in enumerate(labels)},
            "attribute_to_idx": {n: i + 1 for i, n in enumerate(attrs)},
            "idx_to_attribute": {str(i + 1): n for i, n in enumerate(attrs)},
            "predicate_to_idx": {"on": 1}, "idx_to_predicate": {"1": "on"}}
    path.write_text(json.dumps(data))
    return path


# ------------------------------------------------------------------------ SGB's computation

def get_size(w: int, h: int, min_size: int, max_size: int) -> tuple[int, int]:
    """``Resize.get_size`` (transforms.py), verbatim: returns (oh, ow)."""
    size = min_size
    if max_size is not None:
        min_original_size = float(min((w, h)))
        max_original_size = float(max((w, h)))
        if max_original_size / min_original_size * size > max_size:
            size = int(round(max_size * min_original_size / max_original_size))
    if (w <= h and w == size) or (h <= w and h == size):
        return (h, w)
    if w < h:
        ow = size
        oh = int(size * h / w)
    else:
        oh = size
        ow = int(size * w / h)
    return (oh, ow)


def preprocess(rgb: np.ndarray, min_size: int = 96, max_size: int = 160) -> torch.Tensor:
    """SGB's test transforms of an RGB uint8 image: (3, oh, ow) float32, BGR 0..255 minus mean."""
    h, w = rgb.shape[:2]
    oh, ow = get_size(w, h, min_size, max_size)
    img = Image.fromarray(rgb)
    if (oh, ow) != (h, w):
        img = img.resize((ow, oh), Image.BILINEAR)  # torchvision F.resize on a PIL image
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255)  # to_tensor
    x = x[[2, 1, 0]] * 255
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    return (x - mean) / torch.ones(3, 1, 1)


def frozen_bn(x, sd, p):
    scale = sd[p + ".weight"] * sd[p + ".running_var"].rsqrt()
    bias = sd[p + ".bias"] - sd[p + ".running_mean"] * scale
    return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


def bottleneck(x, sd, p, stride, groups, stride_in_1x1=False, calibrate=None):
    s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
    bn = calibrate or frozen_bn
    out = F.relu(bn(F.conv2d(x, sd[p + "conv1.weight"], stride=s1), sd, p + "bn1"))
    out = F.relu(bn(F.conv2d(out, sd[p + "conv2.weight"], stride=s3, padding=1, groups=groups),
                    sd, p + "bn2"))
    out = bn(F.conv2d(out, sd[p + "conv3.weight"]), sd, p + "bn3")
    if p + "downsample.0.weight" in sd:
        identity = bn(F.conv2d(x, sd[p + "downsample.0.weight"], stride=stride), sd,
                      p + "downsample.1")
    else:
        identity = x
    return F.relu(out + identity)


def backbone(x, sd, calibrate=None):
    """ResNet.forward of a C4 body: the stem, then layer1..3 (first strides 1, 2, 2)."""
    bn = calibrate or frozen_bn
    x = F.relu(bn(F.conv2d(x, sd["backbone.body.stem.conv1.weight"], stride=2, padding=3), sd,
                  "backbone.body.stem.bn1"))
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    for s in (1, 2, 3):
        b = 0
        while f"backbone.body.layer{s}.{b}.conv1.weight" in sd:
            x = bottleneck(x, sd, f"backbone.body.layer{s}.{b}.", 2 if (b == 0 and s > 1) else 1,
                           TINY["groups"], calibrate=calibrate)
            b += 1
    return x


def box_head(feat, boxes, sd, calibrate=None):
    """``ResNet50Conv5ROIFeatureExtractor`` then ``FastRCNNPredictor.avgpool``: (N, 2048)."""
    x = roi_align(feat, [boxes], (14, 14), 1.0 / 16, 0)  # torchvision default aligned=False
    b = 0
    while f"roi_heads.box.feature_extractor.head.layer4.{b}.conv1.weight" in sd:
        x = bottleneck(x, sd, f"roi_heads.box.feature_extractor.head.layer4.{b}.",
                       2 if b == 0 else 1, TINY["groups"], calibrate=calibrate)
        b += 1
    return x.mean(dim=[2, 3])


def class_probs(pooled, sd):
    """``F.softmax(class_logits)`` of the box post-processor: (N, K+1), background first."""
    return F.softmax(F.linear(pooled, sd["roi_heads.box.predictor.cls_score.weight"],
                              sd["roi_heads.box.predictor.cls_score.bias"]), -1)


def attribute_probs(pooled, labels, sd):
    """``AttributeRCNNPredictor`` + the post-processor's softmax; ``labels`` are SGB's (1-based)."""
    emb = F.embedding(labels, sd["attribute.predictor.cls_embedding.weight"])
    fc = F.relu(F.linear(torch.cat([pooled, emb], 1), sd["attribute.predictor.fc_attr.weight"],
                         sd["attribute.predictor.fc_attr.bias"]))
    return F.softmax(F.linear(fc, sd["attribute.predictor.attr_score.weight"],
                              sd["attribute.predictor.attr_score.bias"]), -1)


def filter_attributes(prob, attr_thresh, max_num_attr, max_num_attr_per_obj):
    """``AttributePostProcessor.filter_results`` (attribute_head/inference.py), verbatim."""
    scores = prob.clone()
    scores[:, 0] = 0.0
    inds_all = scores > attr_thresh
    number_of_detections = inds_all.sum().item()
    scores[~inds_all] = 0.0
    if number_of_detections > max_num_attr > 0:
        attr_thresh, _ = torch.kthvalue(scores.flatten().cpu(),
                                        number_of_detections - max_num_attr + 1)
        scores[scores < attr_thresh.item()] = 0.0
    return torch.topk(scores, max_num_attr_per_obj, dim=1)  # attr_scores, attr_labels


def generate_anchors(stride, sizes, aspect_ratios):
    """``generate_anchors`` (rpn/anchor_generator.py), verbatim but for ``np.float``."""
    def _whctrs(anchor):
        w = anchor[2] - anchor[0] + 1
        h = anchor[3] - anchor[1] + 1
        return w, h, anchor[0] + 0.5 * (w - 1), anchor[1] + 0.5 * (h - 1)

    def _mkanchors(ws, hs, x_ctr, y_ctr):
        ws, hs = ws[:, np.newaxis], hs[:, np.newaxis]
        return np.hstack((x_ctr - 0.5 * (ws - 1), y_ctr - 0.5 * (hs - 1),
                          x_ctr + 0.5 * (ws - 1), y_ctr + 0.5 * (hs - 1)))

    def _ratio_enum(anchor, ratios):
        w, h, x_ctr, y_ctr = _whctrs(anchor)
        size_ratios = w * h / ratios
        ws = np.round(np.sqrt(size_ratios))
        hs = np.round(ws * ratios)
        return _mkanchors(ws, hs, x_ctr, y_ctr)

    def _scale_enum(anchor, scales):
        w, h, x_ctr, y_ctr = _whctrs(anchor)
        return _mkanchors(w * scales, h * scales, x_ctr, y_ctr)

    scales = np.array(sizes, dtype=np.float64) / stride
    anchor = np.array([1, 1, stride, stride], dtype=np.float64) - 1
    anchors = _ratio_enum(anchor, np.array(aspect_ratios, dtype=np.float64))
    anchors = np.vstack([_scale_enum(anchors[i, :], scales) for i in range(anchors.shape[0])])
    return torch.from_numpy(anchors).float()


def decode(rel_codes, boxes, weights):
    """``BoxCoder.decode`` (box_coder.py), verbatim."""
    boxes = boxes.to(rel_codes.dtype)
    TO_REMOVE = 1
    widths = boxes[:, 2] - boxes[:, 0] + TO_REMOVE
    heights = boxes[:, 3] - boxes[:, 1] + TO_REMOVE
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx = rel_codes[:, 0::4] / wx
    dy = rel_codes[:, 1::4] / wy
    dw = torch.clamp(rel_codes[:, 2::4] / ww, max=math.log(1000. / 16))
    dh = torch.clamp(rel_codes[:, 3::4] / wh, max=math.log(1000. / 16))
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w = torch.exp(dw) * widths[:, None]
    pred_h = torch.exp(dh) * heights[:, None]
    pred_boxes = torch.zeros_like(rel_codes)
    pred_boxes[:, 0::4] = pred_ctr_x - 0.5 * pred_w
    pred_boxes[:, 1::4] = pred_ctr_y - 0.5 * pred_h
    pred_boxes[:, 2::4] = pred_ctr_x + 0.5 * pred_w - 1
    pred_boxes[:, 3::4] = pred_ctr_y + 0.5 * pred_h - 1
    return pred_boxes


def rpn_proposals(feat, sd, image_hw, pre_nms_top_n=600, post_nms_top_n=60, nms_thresh=0.7,
                  min_size=0):
    """``RPNHead`` + ``AnchorGenerator`` + ``RPNPostProcessor.forward_for_single_feature_map``
    for one image: (n, 4) proposals, best objectness first."""
    t = F.relu(F.conv2d(feat, sd["rpn.head.conv.weight"], sd["rpn.head.conv.bias"], padding=1))
    objectness = F.conv2d(t, sd["rpn.head.cls_logits.weight"], sd["rpn.head.cls_logits.bias"])
    box_regression = F.conv2d(t, sd["rpn.head.bbox_pred.weight"], sd["rpn.head.bbox_pred.bias"])
    N, A, H, W = objectness.shape
    base = generate_anchors(16, TINY["sizes"], TINY["ratios"])
    shifts_x = torch.arange(0, W * 16, step=16, dtype=torch.float32)
    shifts_y = torch.arange(0, H * 16, step=16, dtype=torch.float32)
    shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
    shifts = torch.stack((shift_x.reshape(-1), shift_y.reshape(-1),
                          shift_x.reshape(-1), shift_y.reshape(-1)), dim=1)
    anchors = (shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4)

    def permute_and_flatten(layer, C):
        return layer.view(N, -1, C, H, W).permute(0, 3, 4, 1, 2).reshape(N, -1, C)

    objectness = permute_and_flatten(objectness, 1).view(N, -1).sigmoid()
    box_regression = permute_and_flatten(box_regression, 4)
    k = min(pre_nms_top_n, A * H * W)
    objectness, topk_idx = objectness.topk(k, dim=1, sorted=True)
    box_regression = box_regression[0, topk_idx[0]]
    proposals = decode(box_regression.view(-1, 4), anchors[topk_idx[0]], (1.0, 1.0, 1.0, 1.0))
    h, w = image_hw
    proposals[:, 0].clamp_(min=0, max=w - 1)  # clip_to_image(remove_empty=False)
    proposals[:, 1].clamp_(min=0, max=h - 1)
    proposals[:, 2].clamp_(min=0, max=w - 1)
    proposals[:, 3].clamp_(min=0, max=h - 1)
    ws = proposals[:, 2] - proposals[:, 0] + 1  # remove_small_boxes: convert("xywh")
    hs = proposals[:, 3] - proposals[:, 1] + 1
    keep = ((ws >= min_size) & (hs >= min_size)).nonzero(as_tuple=False).squeeze(1)
    proposals, score = proposals[keep], objectness[0][keep]
    keep = nms(proposals, score, nms_thresh)[:post_nms_top_n]  # boxlist_nms
    return proposals[keep]


# ------------------------------------------------------------------------- the checkpoint

def _conv(g, out, inp, k, groups=1):
    return torch.randn((out, inp // groups, k, k), generator=g) * math.sqrt(2.0 / (inp // groups * k * k))


def make_state_dict(seed: int = 0, calib_image: np.ndarray | None = None
                    ) -> dict[str, torch.Tensor]:
    """A random SGB ``AttrRCNN`` state dict for :data:`TINY` with SGB's key names.

    FrozenBN statistics are calibrated on ``calib_image`` (the BN inputs' per-channel mean and a
    randomly scaled variance), so activations stay O(1); a few channels of every conv are scaled
    down 100x, so their variances are ~1e-4 and detectron2's eps = 1e-5 would change them by a
    few per cent if the conversion ignored it.
    """
    t, g = TINY, torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name, out, inp, k, groups=1):
        w = _conv(g, out, inp, k, groups)
        w[: max(1, out // 16)] *= 0.01  # small-variance channels: eps matters there
        sd[name] = w

    def bn_placeholder(p, n):
        sd[p + ".weight"] = 0.5 + torch.rand(n, generator=g)
        sd[p + ".bias"] = 0.1 * torch.randn(n, generator=g)
        sd[p + ".running_mean"] = torch.zeros(n)
        sd[p + ".running_var"] = torch.ones(n)

    def block(p, inp, bott, out):
        conv(p + "conv1.weight", bott, inp, 1)
        bn_placeholder(p + "bn1", bott)
        conv(p + "conv2.weight", bott, bott, 3, t["groups"])
        bn_placeholder(p + "bn2", bott)
        conv(p + "conv3.weight", out, bott, 1)
        bn_placeholder(p + "bn3", out)
        sd[p + "bn3.weight"] *= 0.3  # keep the residual sum's growth small
        if inp != out:
            conv(p + "downsample.0.weight", out, inp, 1)
            bn_placeholder(p + "downsample.1", out)

    conv("backbone.body.stem.conv1.weight", t["stem"], 3, 7)
    bn_placeholder("backbone.body.stem.bn1", t["stem"])
    inp, bott, out = t["stem"], t["groups"] * t["width"], t["res2"]
    for s in (1, 2, 3):
        for b in range(t["blocks"][s - 1]):
            block(f"backbone.body.layer{s}.{b}.", inp if b == 0 else out, bott, out)
        inp, bott, out = out, bott * 2, out * 2
    a = len(t["sizes"]) * len(t["ratios"])
    sd["rpn.anchor_generator.cell_anchors.0"] = generate_anchors(16, t["sizes"], t["ratios"])
    sd["rpn.head.conv.weight"] = torch.randn((1024, 1024, 3, 3), generator=g) * 0.01
    sd["rpn.head.conv.bias"] = torch.zeros(1024)
    sd["rpn.head.cls_logits.weight"] = torch.randn((a, 1024, 1, 1), generator=g) * 0.05
    sd["rpn.head.cls_logits.bias"] = torch.zeros(a)
    sd["rpn.head.bbox_pred.weight"] = torch.randn((4 * a, 1024, 1, 1), generator=g) * 0.005
    sd["rpn.head.bbox_pred.bias"] = torch.zeros(4 * a)
    for b in range(t["blocks"][3]):
        block(f"roi_heads.box.feature_extractor.head.layer4.{b}.", 1024 if b == 0 else 2048,
              bott, 2048)
    k1, a1 = t["classes"], t["attributes"]
    sd["roi_heads.box.predictor.cls_score.weight"] = torch.randn((k1, 2048), generator=g)
    sd["roi_heads.box.predictor.cls_score.bias"] = 0.1 * torch.randn(k1, generator=g)
    sd["roi_heads.box.predictor.bbox_pred.weight"] = torch.randn((4 * k1, 2048), generator=g) * 1e-3
    sd["roi_heads.box.predictor.bbox_pred.bias"] = 0.1 * torch.randn(4 * k1, generator=g)
    sd["attribute.predictor.cls_embedding.weight"] = torch.randn((k1, t["cls_emb"]), generator=g)
    sd["attribute.predictor.fc_attr.weight"] = torch.randn(
        (t["attr_emb"], 2048 + t["cls_emb"]), generator=g) * 0.05
    sd["attribute.predictor.fc_attr.bias"] = 0.1 * torch.randn(t["attr_emb"], generator=g)
    sd["attribute.predictor.attr_score.weight"] = torch.randn((a1, t["attr_emb"]), generator=g)
    sd["attribute.predictor.attr_score.bias"] = 0.5 * torch.randn(a1, generator=g)

    # Calibrate the FrozenBN statistics on an image: each BN's input mean, and its variance
    # times a random factor, so every layer's output is O(1).
    if calib_image is None:
        calib_image = np.random.RandomState(seed).randint(0, 256, (96, 128, 3)).astype(np.uint8)

    def calibrate(x, sd_, p):
        m = x.mean(dim=[0, 2, 3])
        v = x.var(dim=[0, 2, 3], unbiased=False).clamp(min=1e-8)
        sd_[p + ".running_mean"] = m
        sd_[p + ".running_var"] = v * (0.5 + torch.rand(v.shape, generator=g))
        return frozen_bn(x, sd_, p)

    with torch.no_grad():
        x = preprocess(calib_image)[None]
        feat = backbone(x, sd, calibrate=calibrate)
        h, w = x.shape[-2:]
        boxes = torch.tensor([[4.0, 4.0, w * 0.6, h * 0.7], [w * 0.3, h * 0.2, w - 3.0, h - 2.0]])
        pooled = box_head(feat, boxes, sd, calibrate=calibrate)
        # logits with a standard deviation of about 1.5
        scale = 1.5 / (pooled.norm(dim=1).mean() + 1e-6)
        sd["roi_heads.box.predictor.cls_score.weight"] *= scale
    # The attribute head shares the box head's extractor (SHARE_BOX_FEATURE_EXTRACTOR): SGB's
    # state dict holds the same tensors under the attribute head's name too.
    for k in list(sd):
        if k.startswith("roi_heads.box.feature_extractor."):
            sd["attribute." + k[len("roi_heads.box."):]] = sd[k]
    return sd


def save_checkpoint(sd: dict[str, torch.Tensor], path: Path, *, trainer: bool = True,
                    module_prefix: bool = True) -> Path:
    """Save as SGB's ``Checkpointer.save`` does (trainer dict of a DDP-wrapped model), or flat."""
    model = {("module." + k if module_prefix else k): v for k, v in sd.items()}
    if trainer:
        data = {"model": model,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.9,
                                                             "params": [0, 1]}]},
                "scheduler": {"milestones": [49000, 65000], "gamma": 0.1, "last_epoch": 90000},
                "iteration": 90000}
    else:
        data = model
    torch.save(data, path)
    return path


def reference_regions(sd, rgb: np.ndarray, boxes_orig: np.ndarray):
    """SGB's features, class probabilities (background first) for given boxes of an image."""
    h, w = rgb.shape[:2]
    x = preprocess(rgb)[None]
    rh, rw = x.shape[-2:]
    b = torch.from_numpy(boxes_orig.astype(np.float32))
    b = b * torch.tensor([rw / w, rh / h, rw / w, rh / h], dtype=torch.float32)  # BoxList.resize
    with torch.no_grad():
        feat = backbone(x, sd)
        pooled = box_head(feat, b, sd)
        return pooled, class_probs(pooled, sd)
