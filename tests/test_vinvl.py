"""`convert-detector --from vinvl`, the converted model's numerics, attributes and VinVL's box
selection, each against scene_graph_benchmark's computation written out from its code
(tests/sgb_reference.py) on a fabricated tiny checkpoint with SGB's exact key names."""
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import sgb_reference as sgb
from extract_fixtures import invoke_extract as invoke
from extract_fixtures import make_images, read_shards
from vlkd.common.manifest import read_manifest
from vlkd.common.validate import validate_region_set
from vlkd.extract.attributes import select_attributes
from vlkd.extract.convert_vinvl import ConversionError, convert, fold_frozen_bn, match_key
from vlkd.extract.detector import (BoxSelection, Detector, Preprocessing, select_boxes,
                                   select_boxes_vinvl)
from vlkd.extract.pooling import boxes_to_resized, pool_box_features

torch.set_num_threads(1)
SIZES = ((100, 210), (120, 160), (160, 120), (90, 150))  # (h, w): 100x210 resizes to 76x159


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """SGB's files (trainer dict with ``module.`` keys), the converted folder, images."""
    d = tmp_path_factory.mktemp("vinvl")
    sd = sgb.make_state_dict(0)
    w = {"sd": sd, "yaml": sgb.sgb_yaml(d / "vinvl_x152c4.yaml"),
         "ckpt": sgb.save_checkpoint(sd, d / "vinvl_vg_x152c4.pth"),
         "labelmap": sgb.sgb_labelmap(d / "VG-SGG-dicts-vgoi6-clipped.json"),
         "out": d / "vinvl", "images": d / "images"}
    res = invoke(["convert-detector", "--from", "vinvl", "--config", w["yaml"], "--weights",
                  w["ckpt"], "--labelmap", w["labelmap"], "--out", w["out"]])
    w["summary"] = res.output
    w["paths"] = make_images(w["images"], 4, seed=5, sizes=SIZES)
    return w


def _rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _detector(world) -> Detector:
    return Detector.load(world["out"] / "config.yaml", world["out"] / "model.safetensors")


# --------------------------------------------------------------------------------- converting

def test_convert_writes_a_detector_folder(world):
    out = world["out"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.yaml", "model.safetensors", "class_names.json", "attribute_names.json",
         "conversion.json"])
    assert json.loads((out / "class_names.json").read_text()) == \
        [f"object{i}" for i in range(1, 6)]  # SGB's label i + 1 is class i
    assert json.loads((out / "attribute_names.json").read_text()) == \
        [f"attr{i}" for i in range(1, 8)]
    rep = json.loads((out / "conversion.json").read_text())
    # every SGB key taken by a rule: 212 FrozenBN tensors (53 layers x 4), the shared extractor
    # (50 keys) checked against the box head's and dropped, SGB's anchor buffer checked
    assert rep["keys"] == {"alias": 50, "anchors": 1, "bg_first_rows": 5, "copy": 61,
                           "drop_bg_box": 2, "frozen_bn": 212}
    assert sum(rep["keys"].values()) == len(world["sd"])
    assert rep["checkpoint"]["kind"] == "trainer dict" and rep["checkpoint"]["module_prefix"]
    assert rep["blocks_per_stage"] == [3, 4, 6, 3]
    assert "--box-selection detectron2 --score-thresh 0.2 --min-boxes 10" in world["summary"]
    det = _detector(world)
    assert det.kind == "VinVL-C4" and det.feature_dim == 2048
    assert det.class_names[0] == "object1" and det.attribute_names[-1] == "attr7"
    assert det.preprocessing.resize_rule == "maskrcnn_benchmark"
    assert det.preprocessing.input_format == "BGR"
    assert det.preprocessing.pixel_mean == sgb.PIXEL_MEAN


def test_key_table_rows():
    assert match_key("backbone.body.layer3.5.bn2.running_var")[1] == \
        "backbone.res4.5.conv2.norm.running_var"
    assert match_key("backbone.body.layer1.0.downsample.1.weight")[1] == \
        "backbone.res2.0.shortcut.norm.weight"
    assert match_key("roi_heads.box.feature_extractor.head.layer4.2.conv3.weight")[1] == \
        "roi_heads.res5.2.conv3.weight"
    assert match_key("rpn.head.cls_logits.bias")[1] == \
        "proposal_generator.rpn_head.objectness_logits.bias"
    assert match_key("backbone.body.stem.bn1.running_mean")[1] == \
        "backbone.stem.conv1.norm.running_mean"
    assert match_key("roi_heads.box.feature_extractor.trans_conv.weight")[0].kind == "refuse"
    assert match_key("roi_heads.mask.predictor.mask_fcn_logits.weight") is None


def test_trainer_dict_and_flat_state_dict_give_the_same_weights(world, tmp_path):
    flat = sgb.save_checkpoint(world["sd"], tmp_path / "flat.pth", trainer=False,
                               module_prefix=False)
    convert(world["yaml"], flat, world["labelmap"], tmp_path / "out")
    a = load_file(str(world["out"] / "model.safetensors"))
    b = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the background moved last, its box rows dropped
    sd = world["sd"]
    assert torch.equal(a["roi_heads.box_predictor.cls_score.weight"][-1],
                       sd["roi_heads.box.predictor.cls_score.weight"][0])
    assert torch.equal(a["roi_heads.box_predictor.cls_score.weight"][:-1],
                       sd["roi_heads.box.predictor.cls_score.weight"][1:])
    assert torch.equal(a["roi_heads.box_predictor.bbox_pred.weight"],
                       sd["roi_heads.box.predictor.bbox_pred.weight"][4:])
    assert torch.equal(a["roi_heads.attribute.attr_score.bias"][:-1],
                       sd["attribute.predictor.attr_score.bias"][1:])


def test_frozen_bn_fold_is_sgbs_arithmetic():
    from detectron2.layers import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(0)
    n = 64
    src = {"weight": torch.rand(n, generator=g) + 0.5, "bias": torch.randn(n, generator=g),
           "running_mean": torch.randn(n, generator=g),
           "running_var": torch.cat([torch.full((8,), 2e-6), torch.rand(n - 8, generator=g)])}
    x = torch.randn(2, n, 5, 5, generator=g)
    sgb_out = sgb.frozen_bn(x, {f"m.{k}": v for k, v in src.items()}, "m")
    bn = FrozenBatchNorm2d(n)
    bn.load_state_dict({k.split(".")[-1]: v for k, v in
                        fold_frozen_bn("m", src, bn.eps).items()})
    # equal to float32 rounding of the output's scale (the small variances scale by ~700)
    torch.testing.assert_close(bn(x), sgb_out, rtol=1e-5, atol=1e-6 * float(sgb_out.abs().max()))
    naive = FrozenBatchNorm2d(n)  # copying SGB's tensors as they are: eps changes the result
    naive.load_state_dict(src)
    assert (naive(x) - sgb_out).abs().max() > 0.1


# ------------------------------------------------------------------------------ the numerics

def test_preprocessing_is_sgbs_resize_and_bgr(world):
    det = _detector(world)
    pre = det.preprocessing
    differs = 0
    for h, w in [(100, 210), (333, 500), (400, 1100), (480, 640), (96, 96), (50, 400), (211, 97)]:
        want = sgb.get_size(w, h, 96, 160)
        assert pre.resized_hw(h, w) == want
        d2 = Preprocessing(96, 160, "BGR").resized_hw(h, w)
        differs += d2 != want
    assert differs  # the rule matters: detectron2's rounding gives other sizes for some
    rgb = _rgb(world["paths"]["img000"])
    x = pre(rgb).float() - torch.tensor(sgb.PIXEL_MEAN).view(3, 1, 1)
    torch.testing.assert_close(x, sgb.preprocess(rgb), rtol=0, atol=1e-4)


def test_features_and_class_probabilities_over_given_boxes_are_sgbs(world):
    det, sd = _detector(world), world["sd"]
    for name, (h, w) in zip(sorted(world["paths"]), SIZES):
        rgb = _rgb(world["paths"][name])
        boxes = np.array([[2, 3, w * 0.5, h * 0.6], [w * 0.2, h * 0.1, w - 1, h - 2],
                          [0, 0, w, h], [w * 0.4, h * 0.4, w * 0.45, h * 0.47]], np.float32)
        il, feats = det.backbone_features([det.preprocessing(rgb)])
        f = pool_box_features(det.roi_heads, feats,
                              [boxes_to_resized(boxes, (h, w), tuple(il.image_sizes[0]))])
        ref, probs = sgb.reference_regions(sd, rgb, boxes)
        torch.testing.assert_close(f, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
        with torch.no_grad():
            logits, _ = det.roi_heads.box_predictor(f)
        # SGB's probabilities with the background moved from first to last
        torch.testing.assert_close(torch.softmax(logits, -1),
                                   torch.cat([probs[:, 1:], probs[:, :1]], 1),
                                   rtol=1e-4, atol=1e-6)


def test_anchors_and_rpn_are_maskrcnn_benchmarks(world):
    from vlkd.extract.vinvl import legacy_cell_anchors

    # The matrix in the comment of SGB's maskrcnn_benchmark/modeling/rpn/anchor_generator.py
    # (Shaoqing Ren's MATLAB anchors, 1-based pixels: the Python code's are 1 less).
    shaoqing = [[-83, -39, 100, 56], [-175, -87, 192, 104], [-359, -183, 376, 200],
                [-55, -55, 72, 72], [-119, -119, 136, 136], [-247, -247, 264, 264],
                [-35, -79, 52, 96], [-79, -167, 96, 184], [-167, -343, 184, 360]]
    assert (legacy_cell_anchors(16, (128, 256, 512), (0.5, 1, 2)) + 1).tolist() == shaoqing
    assert torch.equal(legacy_cell_anchors(16, sgb.TINY["sizes"], sgb.TINY["ratios"]),
                       sgb.generate_anchors(16, sgb.TINY["sizes"], sgb.TINY["ratios"]))
    det, sd = _detector(world), world["sd"]
    for name in sorted(world["paths"]):
        rgb = _rgb(world["paths"][name])
        il, feats = det.backbone_features([det.preprocessing(rgb)])
        with torch.no_grad():
            props, _ = det.model.proposal_generator(il, feats, None)
            ref = sgb.rpn_proposals(sgb.backbone(sgb.preprocess(rgb)[None], sd), sd,
                                    tuple(il.image_sizes[0]))
        got = props[0].proposal_boxes.tensor
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-3)  # same boxes, same order


def test_box_regression_is_maskrcnn_benchmarks_plus_one_coder(world):
    det, sd = _detector(world), world["sd"]
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(7, 2048, generator=g)
    from detectron2.structures import Boxes, Instances
    boxes = torch.tensor([[10., 12, 50, 60], [0, 0, 20, 30], [5, 5, 6, 7], [30, 40, 90, 70],
                          [1, 2, 3, 4], [15, 25, 35, 45], [60, 10, 150, 70]])
    inst = Instances((76, 159))
    inst.proposal_boxes = Boxes(boxes)
    with torch.no_grad():
        pred = det.roi_heads.box_predictor(feats)
        got = det.roi_heads.box_predictor.predict_boxes(pred, [inst])[0]
    rel = torch.nn.functional.linear(feats, sd["roi_heads.box.predictor.bbox_pred.weight"],
                                     sd["roi_heads.box.predictor.bbox_pred.bias"])
    want = sgb.decode(rel, boxes, (10.0, 10.0, 5.0, 5.0))[:, 4:]  # SGB's class c + 1 is c
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------- jobs and attributes

def _stored(set_dir):
    return next(iter(read_shards(set_dir).values()))


def test_teacher_features_and_attributes_equal_sgbs(world, tmp_path):
    props, teach = tmp_path / "props", tmp_path / "teacher"
    conf, wts = world["out"] / "config.yaml", world["out"] / "model.safetensors"
    common = ["--images", world["images"], "--config", conf, "--weights", wts,
              "--no-progress", "--num-workers", 0, "--shard-index", "all",
              "--feature-dtype", "float32"]
    invoke(["proposals", "--out", props, "--box-selection", "vinvl", "--min-boxes", 3,
            "--max-boxes", 8, *common])
    invoke(["teacher-features", "--proposals", props, "--out", teach, "--attributes",
            "--attr-top-k", 3, "--attr-thresh", 0.1, *common])
    m = read_manifest(teach)
    assert m["extras"] == {"attr_ids": ["int32", 3], "attr_scores": ["float32", 3]}
    assert m["attribute_names"] == [f"attr{i}" for i in range(1, 8)]
    assert m["options"]["attributes"] == {"top_k": 3, "score_thresh": 0.1, "max_per_image": 100}
    assert m["detector"]["kind"] == "VinVL-C4"
    assert m["preprocessing"]["resize_rule"] == "maskrcnn_benchmark"
    assert not [f for f in validate_region_set(teach) if f.level == "error"]
    assert "extras" not in read_manifest(props)  # a set without attributes is as before
    t, sd = _stored(teach), world["sd"]
    filled = 0
    for i, iid in enumerate(t["image_ids"].astype(str)):
        a, b = t["offsets"][i], t["offsets"][i + 1]
        ref, probs = sgb.reference_regions(sd, _rgb(world["paths"][iid]), t["boxes"][a:b])
        np.testing.assert_allclose(t["features"][a:b], ref.numpy(), rtol=1e-4,
                                   atol=1e-4 * float(ref.abs().max()))
        score, label = probs[:, 1:].max(dim=1)  # SGB's force_boxes: best foreground class
        np.testing.assert_array_equal(t["classes"][a:b], label.numpy())
        np.testing.assert_allclose(t["scores"][a:b], score.numpy(), rtol=1e-4)
        with torch.no_grad():
            ap = sgb.attribute_probs(ref, label + 1, sd)
        sc, lab = sgb.filter_attributes(ap, 0.1, 100, 3)
        want_ids = torch.where(sc > 0, lab - 1, -1).numpy()
        np.testing.assert_array_equal(t["attr_ids"][a:b], want_ids)
        np.testing.assert_allclose(t["attr_scores"][a:b], sc.numpy(), rtol=1e-4, atol=1e-6)
        filled += int((want_ids >= 0).sum())
    assert 0 < filled < t["attr_ids"].size  # some slots filled, some empty (-1, score 0)
    assert (t["attr_scores"][t["attr_ids"] < 0] == 0).all()
    # another attribute option on resume is refused, with what differs
    res = invoke(["teacher-features", "--proposals", props, "--out", teach, "--attributes",
                  "--attr-top-k", 2, *common], expect=1)
    assert "--attributes" in res.output


def test_proposals_with_vinvl_selection_one_region_per_proposal(world, tmp_path):
    props = tmp_path / "props"
    invoke(["proposals", "--images", world["images"], "--config",
            world["out"] / "config.yaml", "--weights", world["out"] / "model.safetensors",
            "--out", props, "--no-progress", "--num-workers", 0, "--shard-index", "all",
            "--box-selection", "vinvl", "--min-boxes", 3, "--max-boxes", 30, "--attributes",
            "--attr-top-k", 5, "--feature-dtype", "float32"])
    m = read_manifest(props)
    assert m["options"]["box_selection"] == "vinvl"
    p, det, sd = _stored(props), _detector(world), world["sd"]
    for i, iid in enumerate(p["image_ids"].astype(str)):
        a, b = p["offsets"][i], p["offsets"][i + 1]
        boxes = p["boxes"][a:b]
        assert len(np.unique(boxes, axis=0)) == len(boxes)  # no proposal twice
        rgb = _rgb(world["paths"][iid])
        ref, probs = sgb.reference_regions(sd, rgb, boxes)
        np.testing.assert_allclose(p["features"][a:b], ref.numpy(), rtol=1e-4,
                                   atol=1e-4 * float(ref.abs().max()))
        # unregressed: every stored box is one of the RPN's proposals (mapped to original pixels)
        il, feats = det.backbone_features([det.preprocessing(rgb)])
        with torch.no_grad():
            prop, _ = det.model.proposal_generator(il, feats, None)
        rh, rw = il.image_sizes[0]
        h, w = rgb.shape[:2]
        orig = prop[0].proposal_boxes.tensor.numpy() * np.array([w / rw, h / rh] * 2)
        dist = np.abs(boxes[:, None, :] - orig[None]).max(axis=2).min(axis=1)
        assert dist.max() < 1e-3
        # attributes for the detection's class
        with torch.no_grad():
            ap = sgb.attribute_probs(ref, torch.from_numpy(p["classes"][a:b]).long() + 1, sd)
        sc, lab = sgb.filter_attributes(ap, 0.05, 100, 5)
        np.testing.assert_array_equal(p["attr_ids"][a:b], torch.where(sc > 0, lab - 1, -1))


def test_select_attributes_is_sgbs_filter_results():
    g = torch.Generator().manual_seed(0)
    for n, a, k, thresh, cap in [(5, 7, 3, 0.1, 100), (6, 9, 4, 0.0, 20), (4, 7, 7, 0.02, 5),
                                 (0, 7, 3, 0.1, 100)]:
        logits = torch.randn(n, a + 1, generator=g) * 2
        p_sgb = torch.softmax(logits, -1)                    # SGB: "no attribute" first
        p_d2 = torch.cat([p_sgb[:, 1:], p_sgb[:, :1]], 1)   # vlkd: last
        ids, scores = select_attributes(p_d2, top_k=k, score_thresh=thresh, max_per_image=cap)
        sc, lab = sgb.filter_attributes(p_sgb, thresh, cap, k)
        np.testing.assert_array_equal(ids, torch.where(sc > 0, lab - 1, -1).numpy())
        np.testing.assert_allclose(scores, sc.numpy(), rtol=1e-6)
    # With threshold 0 every attribute passes and the cap bites, as SGB's code does it: its
    # order statistic counts the zeroed "no attribute" entries too, so 20 + 6 boxes stay.
    probs = torch.rand(6, 10, generator=g)
    ids, _ = select_attributes(probs / probs.sum(1, keepdim=True), top_k=9, score_thresh=0.0,
                               max_per_image=20)
    assert (ids >= 0).sum() == 26


def test_attributes_refused_without_an_attribute_head(tmp_path):
    from extract_fixtures import DETECTOR_CONFIGS, save_tiny_weights

    w = save_tiny_weights("c4", tmp_path / "c4.pth")
    make_images(tmp_path / "imgs", 1)
    res = invoke(["proposals", "--images", tmp_path / "imgs", "--config", DETECTOR_CONFIGS["c4"],
                  "--weights", w, "--out", tmp_path / "set", "--no-progress", "--num-workers",
                  0, "--shard-index", "all", "--attributes"], expect=1)
    assert "has no attribute head" in res.output


# --------------------------------------------------------------------- VinVL's box selection

def test_vinvl_selection_keeps_a_proposal_once_where_detectron2_keeps_it_twice():
    # Two proposals, three classes. Proposal 0 is the best box for classes 0 and 1; proposal 1
    # overlaps it (IoU 0.43: above SGB's 0.3, below detectron2's 0.5).
    props = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 4.0, 10.0, 14.0]])
    probs = torch.tensor([[0.45, 0.40, 0.05, 0.10],    # background last
                          [0.30, 0.05, 0.60, 0.05]])
    sel = BoxSelection(score_thresh=0.2, min_boxes=0, max_boxes=10)
    d2 = select_boxes(props.repeat(1, 3), probs, (20, 20), sel)
    # detectron2: (proposal 0, class 0), (1, 2), (0, 1), (1, 0): proposal 0 twice
    assert d2.classes.tolist() == [2, 0, 1, 0]
    assert sum(torch.equal(b, props[0]) for b in d2.boxes) == 2
    v = select_boxes_vinvl(props, probs, (20, 20), sel)
    # SGB: per class NMS at 0.3 -> class 0 keeps proposal 0 only (0.45 > 0.30), class 2 keeps
    # proposal 1 only, class 1 keeps proposal 0 only; each proposal takes its best class.
    assert v.boxes.tolist() == [props[1].tolist(), props[0].tolist()]
    assert v.classes.tolist() == [2, 0]
    torch.testing.assert_close(v.scores, torch.tensor([0.60, 0.45]))
    # min_boxes takes the best of all, even below the threshold; max_boxes cuts
    low = select_boxes_vinvl(props, probs, (20, 20), BoxSelection(0.5, 0.5, 2, 10))
    assert low.classes.tolist() == [2, 0]
    one = select_boxes_vinvl(props, probs, (20, 20), BoxSelection(0.1, 0.5, 0, 1))
    assert one.classes.tolist() == [2]
    # clipping to (w - 1, h - 1), SGB's TO_REMOVE = 1
    c = select_boxes_vinvl(torch.tensor([[-3.0, 2.0, 30.0, 12.0]]), probs[:1], (20, 25), sel)
    assert c.boxes.tolist() == [[0.0, 2.0, 24.0, 12.0]]


def test_vinvl_selection_rejects_nms_thresh(tmp_path):
    res = invoke(["proposals", "--images", tmp_path, "--config", __file__, "--weights", "w",
                  "--out", tmp_path / "o", "--box-selection", "vinvl", "--nms-thresh", 0.4],
                 expect=2)
    assert "does not apply to --box-selection vinvl" in res.output


# ------------------------------------------------------------------------------ refusals

def _convert(world, tmp_path, sd=None, yaml_extra=None, conv_body="R-50-C4", labelmap=None,
             name="out"):
    ck = sgb.save_checkpoint(world["sd"] if sd is None else sd, tmp_path / f"{name}.pth")
    y = sgb.sgb_yaml(tmp_path / f"{name}.yaml", conv_body=conv_body, extra=yaml_extra)
    return convert(y, ck, labelmap or world["labelmap"], tmp_path / name)


@pytest.mark.parametrize("edit,message", [
    (lambda sd: sd.update({"roi_heads.mask.predictor.weight": torch.zeros(1)}),
     r"1 checkpoint key\(s\) match no row of the key table .*roi_heads.mask.predictor.weight"),
    (lambda sd: sd.pop("backbone.body.layer2.1.conv2.weight"),
     "no checkpoint key gives the detectron2 model's backbone.res3.1.conv2.weight"),
    (lambda sd: sd.pop("backbone.body.layer1.0.bn1.running_var"),
     "FrozenBatchNorm backbone.res2.0.conv1.norm: the checkpoint lacks its running_var"),
    (lambda sd: sd.update({"roi_heads.box.feature_extractor.trans_conv.weight": torch.zeros(1)}),
     "transition conv"),
    (lambda sd: sd["attribute.feature_extractor.head.layer4.0.conv1.weight"].add_(1),
     "attribute.feature_extractor.head.layer4.0.conv1.weight differs from roi_heads.box"),
    (lambda sd: sd["rpn.anchor_generator.cell_anchors.0"].add_(1), "anchors differ"),
    (lambda sd: sd.update({"rpn.head.conv.weight": sd["rpn.head.conv.weight"][:, :512]}),
     "proposal_generator.rpn_head.conv.weight: converted .* vs model"),
])
def test_conversion_refuses_keys_it_cannot_place(world, tmp_path, edit, message):
    sd = {k: v.clone() for k, v in world["sd"].items()}
    edit(sd)
    with pytest.raises(ConversionError, match=message):
        _convert(world, tmp_path, sd)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_conversion_refuses_configs_it_cannot_reproduce(world, tmp_path):
    with pytest.raises(ConversionError, match="does not know SGB config key.*MODEL.RPN.NEW_KEY"):
        _convert(world, tmp_path, yaml_extra={"MODEL.RPN.NEW_KEY": 1})
    with pytest.raises(ConversionError, match=r"MODEL.RPN.USE_FPN = True"):
        _convert(world, tmp_path, yaml_extra={"MODEL.RPN.USE_FPN": True})
    with pytest.raises(ConversionError, match="MODEL.ATTRIBUTE_ON is False"):
        _convert(world, tmp_path, yaml_extra={"MODEL.ATTRIBUTE_ON": False})
    with pytest.raises(ConversionError, match="NUM_CLASSES is 7"):
        _convert(world, tmp_path, yaml_extra={"MODEL.ROI_BOX_HEAD.NUM_CLASSES": 7})
    with pytest.raises(ConversionError, match=r"R-101-C4 is SGB's \[3, 4, 23, 3\]"):
        _convert(world, tmp_path, conv_body="R-101-C4")
    lm = sgb.sgb_labelmap(tmp_path / "lm.json", num_classes=4)
    with pytest.raises(ConversionError, match="label_to_idx has 4 entries"):
        _convert(world, tmp_path, labelmap=lm)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ConversionError, match="not an empty folder"):
        _convert(world, tmp_path, name="full")
    # STRIDE_IN_1X1 is read from the config (True by default in SGB): the weights fit either
    # way, the features do not
    _convert(world, tmp_path, yaml_extra={"MODEL.RESNETS.STRIDE_IN_1X1": True}, name="s1x1")
    assert "STRIDE_IN_1X1: true" in (tmp_path / "s1x1" / "config.yaml").read_text()


def test_any_block_counts(world, tmp_path):
    """Block counts come from the checkpoint: a (1, 2, 1) body with a 2-block head converts when
    the config names no SGB stage spec, and computes SGB's features."""
    old = sgb.TINY["blocks"]
    sgb.TINY["blocks"] = (1, 2, 1, 2)
    try:
        sd = sgb.make_state_dict(3)
    finally:
        sgb.TINY["blocks"] = old
    with pytest.raises(ConversionError, match=r"\[1, 2, 1, 2\] blocks .* R-50-C4"):
        _convert(world, tmp_path, sd)
    rep = _convert(world, tmp_path, sd, conv_body="R-14-C4", name="r14")
    assert rep.blocks_per_stage == (1, 2, 1, 2)
    det = Detector.load(tmp_path / "r14" / "config.yaml", tmp_path / "r14" / "model.safetensors")
    rgb = _rgb(world["paths"]["img001"])
    boxes = np.array([[3, 4, 90, 100], [40, 10, 150, 110]], np.float32)
    il, feats = det.backbone_features([det.preprocessing(rgb)])
    f = pool_box_features(det.roi_heads, feats,
                          [boxes_to_resized(boxes, rgb.shape[:2], tuple(il.image_sizes[0]))])
    ref, _ = sgb.reference_regions(sd, rgb, boxes)
    torch.testing.assert_close(f, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_vinvls_own_config_reads_as_sgb_resolves_it():
    """sgg_configs/vgattr/vinvl_x152c4.yaml as published (tests/fixtures/sgb/), with the
    overrides of SGB's README extraction command."""
    from vlkd.extract.convert_vinvl import (detectron2_config, extraction_options,
                                            read_sgb_config)

    path = Path(__file__).parent / "fixtures" / "sgb" / "vinvl_x152c4.yaml"
    cfg = read_sgb_config(path, ["MODEL.ROI_HEADS.NMS_FILTER", "1", "MODEL.ROI_HEADS.SCORE_THRESH",
                                 "0.2", "TEST.IGNORE_BOX_REGRESSION", "True",
                                 "MODEL.ATTRIBUTE_ON", "True"])
    assert cfg["MODEL.BACKBONE.CONV_BODY"] == "R-152-C4"
    assert (cfg["MODEL.RESNETS.NUM_GROUPS"], cfg["MODEL.RESNETS.WIDTH_PER_GROUP"],
            cfg["MODEL.RESNETS.STRIDE_IN_1X1"]) == (32, 8, False)
    assert cfg["MODEL.ROI_BOX_HEAD.NUM_CLASSES"] == 1595
    assert cfg["MODEL.ROI_ATTRIBUTE_HEAD.NUM_ATTRIBUTES"] == 525
    assert cfg["INPUT.PIXEL_STD"] == (1.0, 1.0, 1.0)  # SGB's default, the file sets only the mean
    assert cfg["MODEL.RPN.ANCHOR_SIZES"] == (32, 64, 128, 256, 512)
    d2 = detectron2_config(cfg, (3, 8, 36, 3), 1594, 524)
    assert d2["MODEL"]["RESNETS"]["DEPTH"] == 152
    assert d2["MODEL"]["PIXEL_MEAN"] == [103.53, 116.28, 123.675]
    assert (d2["INPUT"]["MIN_SIZE_TEST"], d2["INPUT"]["MAX_SIZE_TEST"]) == (600, 1000)
    assert (d2["MODEL"]["RPN"]["PRE_NMS_TOPK_TEST"], d2["MODEL"]["RPN"]["POST_NMS_TOPK_TEST"]) \
        == (6000, 300)
    opts = extraction_options(cfg, True)
    assert opts["proposals"][:8] == ["--box-selection", "vinvl", "--score-thresh", "0.2",
                                     "--min-boxes", "10", "--max-boxes", "100"]
    assert opts["teacher_features"] == ["--attributes", "--attr-thresh", "0.05", "--attr-top-k",
                                        "16", "--attr-max-per-image", "100"]
    # tuples written as strings, as SGB's configs do, decode as yacs decodes them
    cfg = read_sgb_config(path, ["MODEL.RPN.ASPECT_RATIOS", "(0.5, 1.0)"])
    assert cfg["MODEL.RPN.ASPECT_RATIOS"] == (0.5, 1.0)
