"""The TEE-like student detector (vlkd.extract.tee): EfficientNet + BiFPN backbone, its pooler
family over given boxes against an independent pooling on several BiFPN levels, proposals and
teacher-features end to end, and a short train-detector run whose loss falls.

C4/FPN-shared checks run for it too: tests/test_detector.py (detections equal DefaultPredictor's,
pooling equals the reference) and tests/test_proposals.py (stored features are the model's own
over the stored boxes) are parametrized over ``tee``.
"""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from extract_fixtures import (DETECTOR_CONFIGS, ROOT, _pooled_reference, invoke_extract, make_images,
                              read_shards, reference_features, save_tiny_weights, tiny_model,
                              tiny_weights)  # noqa: F401 (fixture)
from vlkd.common.manifest import read_manifest
from vlkd.common.regionset import RegionSet
from vlkd.common.validate import validate_region_set
from vlkd.extract.detector import Detector, load_detector_config
from vlkd.extract.pooling import boxes_to_resized, classify_box_features, pool_box_features
from vlkd.extract.tee import BiFPN, EfficientNetBiFPN, TEEFamily, _FusionNode

torch.set_num_threads(1)

TEE = DETECTOR_CONFIGS["tee"]


# ------------------------------------------------------------------------ backbone + BiFPN

def test_bifpn_node_layout_is_efficientdets():
    """One layer over P3..P7: top-down nodes P6..P3, then bottom-up P4..P7, wired as
    effdet's bifpn_config (inputs 0..4 are P3..P7, node k's output is feature 5 + k)."""
    bifpn = BiFPN([40, 112, 320], min_level=3, max_level=7, channels=64, num_layers=2)
    layer = bifpn.layers[0]
    assert [n.level for n in layer.nodes] == [6, 5, 4, 3, 4, 5, 6, 7]
    assert [n.sources for n in layer.nodes] == [[3, 4], [2, 5], [1, 6], [0, 7],
                                               [1, 7, 8], [2, 6, 9], [3, 5, 10], [4, 11]]
    # First layer: a 1x1 conv where a backbone level enters (40/112/320 -> 64 channels), each
    # use its own (P4's input feeds td4 and out4 through two convs); later layers need none.
    convs = [[hasattr(r, "conv") for r in n.resample] for n in layer.nodes]
    assert convs == [[False, False], [True, False], [True, False], [True, False],
                     [True, False, False], [True, False, False], [False, False, False],
                     [False, False]]
    assert not any(hasattr(r, "conv") for n in bifpn.layers[1].nodes for r in n.resample)
    # P6 = max-pool(conv1x1(C5)), P7 = max-pool(P6)
    assert [hasattr(r, "conv") for r in bifpn.extra] == [True, False]


def test_fusion_node_is_fast_normalised_fusion_then_separable_conv():
    torch.manual_seed(0)
    node = _FusionNode([(0, 8, 3), (1, 8, 4), (2, 8, 2)], level=3, channels=8, norm="BN").eval()
    with torch.no_grad():
        node.weights.copy_(torch.tensor([2.0, -1.0, 0.5]))   # the negative one counts as 0
        node.norm.running_mean.uniform_(-1, 1)
        node.norm.running_var.uniform_(0.5, 2)
    same, coarse = torch.randn(2, 8, 8, 12), torch.randn(2, 8, 4, 6)
    fine = torch.randn(2, 8, 16, 24)
    with torch.no_grad():
        got = node([same, coarse, fine])
        up = coarse.repeat_interleave(2, 2).repeat_interleave(2, 3)       # nearest 2x
        down = F.max_pool2d(fine, 3, stride=2, padding=1)
        x = (2.0 * same + 0.0 * up + 0.5 * down) / (2.5 + 1e-4)
        x = x * torch.sigmoid(x)                                          # Swish
        x = F.conv2d(x, node.dw.weight, padding=1, groups=8)
        x = F.conv2d(x, node.pw.weight)
        bn = node.norm
        want = (x - bn.running_mean[:, None, None]) / torch.sqrt(
            bn.running_var[:, None, None] + bn.eps) * bn.weight[:, None, None] \
            + bn.bias[:, None, None]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_backbone_levels_strides_and_padding():
    bb = EfficientNetBiFPN(width_mult=0.25, depth_mult=0.34, channels=16, num_layers=1).eval()
    assert bb.size_divisibility == 128
    shapes = bb.output_shape()
    assert list(shapes) == ["p3", "p4", "p5", "p6", "p7"]
    assert [s.stride for s in shapes.values()] == [8, 16, 32, 64, 128]
    assert {s.channels for s in shapes.values()} == {16}
    with torch.no_grad():
        out = bb(torch.randn(1, 3, 256, 384))
    assert [tuple(v.shape[2:]) for v in out.values()] == [(32, 48), (16, 24), (8, 12), (4, 6),
                                                          (2, 3)]
    assert all(torch.isfinite(v).all() for v in out.values())
    # B0 proper: EfficientNet-B0 without its 1280-channel head and classifier (3.6 M) + BiFPN
    b0 = EfficientNetBiFPN()
    assert sum(p.numel() for p in b0.bottom_up.parameters()) == pytest.approx(3.6e6, rel=0.02)
    assert b0.bottom_up.channels == {3: 40, 4: 112, 5: 320}


def test_configs_build_the_tee_family():
    """tee-b0 (600/1000, VinVL's 1594 classes) and the tiny config build TEE detectors; other
    configs do not get the TEE keys (their resolved configs and digests stay as they were)."""
    from detectron2.modeling import build_model

    assert "BIFPN" in load_detector_config(TEE).MODEL
    for kind in ("c4", "fpn"):
        other = load_detector_config(DETECTOR_CONFIGS[kind]).MODEL
        assert "BIFPN" not in other and "EFFICIENTNET" not in other

    cfg = load_detector_config(TEE.with_name("tee-b0.yaml"), ["MODEL.DEVICE", "cpu"])
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (600, 1000)
    assert cfg.MODEL.ROI_HEADS.NAME == "TEEROIHeads" and cfg.MODEL.ROI_HEADS.NUM_CLASSES == 1594
    model = build_model(cfg)
    fam = TEEFamily(model.roi_heads)
    assert (fam.kind, fam.description, fam.feature_dim) == ("TEE", "bifpn box_pooler + box_head",
                                                            512)
    n = sum(p.numel() for p in model.parameters())
    assert 8e6 < n < 15e6, n   # backbone + BiFPN ~3.8 M, RPN, box head, 1594-class predictor
    # the demo candidate: the demo student's recipe and feature dim, TEE levels P2..P6
    demo = load_detector_config(TEE.with_name("tee-demo.yaml"))
    student = load_detector_config(ROOT / "configs" / "demo" / "student_detector.yaml")
    assert demo.MODEL.ROI_BOX_HEAD.FC_DIM == student.MODEL.ROI_BOX_HEAD.FC_DIM
    assert demo.SOLVER == student.SOLVER and demo.SEED == student.SEED
    assert {k: v for k, v in demo.INPUT.items() if k != "FORMAT"} == \
        {k: v for k, v in student.INPUT.items() if k != "FORMAT"}   # RGB: torchvision's stats
    assert TEEFamily(build_model(demo).roi_heads).feature_dim == 256
    # the latency benchmark's teacher: VinVL's X152-C4 shape (config only: 146 M parameters)
    x152 = load_detector_config(TEE.with_name("x152-c4-vinvl-shape.yaml"))
    r = x152.MODEL.RESNETS
    assert (r.DEPTH, r.NUM_GROUPS, r.WIDTH_PER_GROUP, x152.MODEL.ROI_HEADS.NAME,
            x152.MODEL.ROI_HEADS.NUM_CLASSES) == (152, 32, 8, "Res5ROIHeads", 1594)


# ------------------------------------------------------------------- pooling over given boxes

def test_pool_over_given_boxes_on_several_bifpn_levels(tiny_weights):
    """Larger inputs than the tiny config's, so that detectron2's level rule
    (floor(4 + log2(sqrt(area) / 224)), clamped to p3..p6) sends boxes to p3, p4 and p5: every
    row equals torchvision ROIAlign on its own level + the box head (_pooled_reference)."""
    det = Detector.load(TEE, tiny_weights["tee"], opts=["INPUT.MIN_SIZE_TEST", "512",
                                                        "INPUT.MAX_SIZE_TEST", "800"])
    assert det.kind == "TEE" and det.feature_dim == 64
    assert det.manifest_info()["kind"] == "TEE"
    rs = np.random.RandomState(4)
    images = [np.kron(rs.randint(0, 256, (20, 27, 3)), np.ones((8, 8, 1))).astype(np.uint8)
              [:150, :210] for _ in range(2)]
    boxes = [np.array([[0, 0, 209, 149], [5, 5, 25, 30], [30, 10, 200, 140], [60, 30, 160, 120],
                       [100, 100, 101, 101]], np.float32),
             np.array([[10, 10, 60, 50], [0, 20, 210, 150]], np.float32)]
    tensors = [det.preprocessing(im) for im in images]
    image_list, feats = det.backbone_features(tensors)
    rhw = [tuple(s) for s in image_list.image_sizes]
    resized = [boxes_to_resized(b, im.shape[:2], r) for b, im, r in zip(boxes, images, rhw)]
    levels = set()
    for b in resized:
        size = torch.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
        levels |= set(torch.floor(4 + torch.log2(size / 224 + 1e-8)).clamp(3, 6).int().tolist())
    assert levels == {3, 4, 5}
    got = pool_box_features(det.roi_heads, feats, resized)
    want = np.concatenate([_pooled_reference(det.cfg, det.model, im, b)
                           for im, b in zip(images, boxes)])
    assert got.shape == (7, 64)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    scores, classes = classify_box_features(det.roi_heads, got)
    cs = det.roi_heads.box_predictor.cls_score
    p = torch.softmax(got.double() @ cs.weight.detach().double().T + cs.bias.detach().double(),
                      1)[:, :-1]
    np.testing.assert_allclose(scores.numpy(), p.max(1).values.numpy(), rtol=1e-5)
    np.testing.assert_array_equal(classes.numpy(), p.argmax(1).numpy())


# ------------------------------------------------------------------------------ end to end

def test_proposals_and_teacher_features_end_to_end(tmp_path):
    """A TEE student's proposals (2 shards), then a TEE teacher (other weights, other test
    size) pooled over those boxes: both sets validate, and every feature row is the model's
    own over the stored boxes."""
    images = make_images(tmp_path / "imgs", 6)
    sw = save_tiny_weights("tee", tmp_path / "student.pth")
    tw = save_tiny_weights("tee", tmp_path / "teacher.pth", seed=3)
    tyaml = tmp_path / "teacher-tee.yaml"
    tyaml.write_text(f'_BASE_: "{TEE}"\nINPUT:\n  MIN_SIZE_TEST: 224\n  MAX_SIZE_TEST: 320\n')
    props, teach = tmp_path / "props", tmp_path / "teacher"
    common = ["--images", tmp_path / "imgs", "--no-progress", "--num-workers", 0,
              "--shard-index", "all", "--feature-dtype", "float32"]
    invoke_extract(["proposals", "--config", TEE, "--weights", sw, "--out", props,
                    "--num-shards", 2, "--min-boxes", 4, "--max-boxes", 12, *common])
    invoke_extract(["teacher-features", "--proposals", props, "--config", tyaml, "--weights",
                    tw, "--out", teach, *common])
    assert [f for f in validate_region_set(props) if f.level == "error"] == []
    assert [f for f in validate_region_set(teach, against=props) if f.level == "error"] == []
    for s in (props, teach):
        m = read_manifest(s)
        assert m["detector"]["kind"] == "TEE" and m["detector"]["roi_heads"] == "TEEROIHeads"
        assert "(TEE: bifpn box_pooler + box_head)" in m["options"]["features"]
    ps, ts = read_shards(props), read_shards(teach)
    assert sorted(ps) == sorted(ts) and len(ps) == 2
    for name in ps:
        assert ts[name]["boxes"].tobytes() == ps[name]["boxes"].tobytes()
    scfg, smodel = tiny_model("tee")
    tcfg = load_detector_config(tyaml, ["MODEL.DEVICE", "cpu"])
    _, tmodel = tiny_model("tee", seed=3)
    rp, rt = RegionSet(props), RegionSet(teach)
    assert len(rp) == len(rt) == 6 and rp.feature_dim == rt.feature_dim == 64
    for iid, path in images.items():
        p, t = rp.get(iid), rt.get(iid)
        assert 4 <= len(p.boxes) <= 12
        for got, cfg, model in ((p.features, scfg, smodel), (t.features, tcfg, tmodel)):
            want = reference_features(cfg, model, path, p.boxes)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(),
                                       err_msg=iid)


def test_train_detector_loss_falls(tmp_path):
    """40 iterations of the tiny TEE detector on a tiny synthetic world through the CLI."""
    from vlkd.data.synthetic import generate

    world = generate(tmp_path / "w", num_train=24, num_val=6, num_test=0, seed=3, min_size=64,
                     max_size=96)
    out = tmp_path / "det"
    res = invoke_extract([
        "train-detector", "--config", TEE, "--train-json", world["instances_train"],
        "--image-root", world["images_train"], "--val-json", world["instances_val"],
        "--val-image-root", world["images_val"], "--out", out, "--max-iter", 40,
        "--num-threads", 1, "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128"])
    metrics = json.loads(res.stdout)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["total_loss"] for r in log if "total_loss" in r]
    assert len(losses) >= 2 and metrics["max_iter"] == 40
    assert metrics["loss_last"] < 0.7 * metrics["loss_first"], metrics
    # 40 steps from scratch leave the classifier at "background" (no detections): AP is None
    # then, else a percentage; the demo-sized run is in docs/EXTRACT.md.
    assert metrics["AP"] is None or 0 <= metrics["AP"] <= 100
    det = Detector.load(out / "config.yaml", out / "model_final.pth")
    assert det.kind == "TEE" and len(det.class_names) == 6
