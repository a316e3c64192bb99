"""The detectron2 wrapper (config, weights safety, preprocessing, detection) and pooling over
given boxes, each checked against an independent computation."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from extract_fixtures import (DETECTOR_CONFIGS, _pooled_reference, resized_hw_reference,
                              tiny_model, tiny_weights)  # noqa: F401 (fixture)
from vlkd.extract.detector import (BoxSelection, Detector, DetectorError, Preprocessing,
                                   WeightsError, config_digest, load_detector_config,
                                   load_weights, select_boxes)
from vlkd.extract.pooling import (boxes_to_original, boxes_to_resized, classify_box_features,
                                  pool_box_features)

torch.set_num_threads(1)


# -------------------------------------------------------------------------------- config

def test_config_model_zoo_base_and_chains(tmp_path):
    cfg = load_detector_config(DETECTOR_CONFIGS["c4"])
    assert cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeads"       # Base-RCNN-C4.yaml
    assert cfg.SOLVER.MAX_ITER == 270000                    # faster_rcnn_R_50_C4_3x.yaml
    assert cfg.MODEL.RPN.POST_NMS_TOPK_TEST == 200          # tiny-c4.yaml
    # A user config on top of ours, by relative path, plus command-line style overrides.
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "child.yaml"
    (tmp_path / "tiny.yaml").write_text(DETECTOR_CONFIGS["c4"].read_text())
    child.write_text('_BASE_: "../tiny.yaml"\nINPUT:\n  MIN_SIZE_TEST: 96\n')
    c2 = load_detector_config(child, ["MODEL.ROI_HEADS.NUM_CLASSES", "3"])
    assert (c2.INPUT.MIN_SIZE_TEST, c2.INPUT.MAX_SIZE_TEST) == (96, 256)
    assert c2.MODEL.ROI_HEADS.NUM_CLASSES == 3 and c2.MODEL.ROI_HEADS.NAME == "Res5ROIHeads"
    bad = tmp_path / "bad.yaml"
    bad.write_text('_BASE_: "model_zoo:COCO-Detection/no_such_model.yaml"\n')
    with pytest.raises(DetectorError, match="not a detectron2 model-zoo config"):
        load_detector_config(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text('MODEL:\n  ROI_HEADZ:\n    NAME: x\n')
    with pytest.raises(DetectorError, match="not a detectron2 config key"):
        load_detector_config(typo)


def test_config_digest_ignores_device_and_weights_only():
    base = load_detector_config(DETECTOR_CONFIGS["fpn"])
    same = load_detector_config(DETECTOR_CONFIGS["fpn"], ["MODEL.DEVICE", "cuda:3",
                                                          "MODEL.WEIGHTS", "/x/y.pth"])
    other = load_detector_config(DETECTOR_CONFIGS["fpn"], ["INPUT.MIN_SIZE_TEST", "200"])
    assert config_digest(base) == config_digest(same) != config_digest(other)


# ------------------------------------------------------------------------------- weights

class _RunsCode:
    """Unpickling this object calls open(marker, "w"): the file appears iff code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pth_is_loaded_without_running_code(tmp_path, monkeypatch):
    from detectron2.checkpoint import DetectionCheckpointer

    cfg, model = tiny_model("fpn")
    sd = model.state_dict()
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pth"
    torch.save({"model": sd, "extra": _RunsCode(marker)}, evil)
    # Make torch.load unpickle freely unless the caller passes weights_only=True explicitly
    # (an older torch, or a user environment): only an explicit flag protects us then.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(WeightsError, match=r"weights_only=True"):
        load_weights(tiny_model("fpn", seed=1)[1], evil)
    assert not marker.exists()
    # Control: detectron2's own checkpointer runs the file's code in that environment.
    with pytest.warns(UserWarning, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        DetectionCheckpointer(tiny_model("fpn", seed=1)[1]).load(str(evil))
    assert marker.exists()
    good = tmp_path / "good.pth"
    torch.save({"model": sd}, good)
    other = tiny_model("fpn", seed=1)[1]
    load_weights(other, good)
    for k, v in other.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_pickle_needs_trust(tmp_path, tiny_weights):
    cfg, model = tiny_model("c4")
    pkl = tmp_path / "model_final.pkl"
    with open(pkl, "wb") as f:  # detectron2 model-zoo pickle layout
        pickle.dump({"model": {k: v.numpy() for k, v in model.state_dict().items()},
                     "__author__": "test"}, f)
    with pytest.raises(WeightsError, match=r"(?s)pickles.*runs whatever code.*--trust-pickle"):
        load_weights(tiny_model("c4", seed=3)[1], pkl)
    other = tiny_model("c4", seed=3)[1]
    load_weights(other, pkl, trust_pickle=True)
    for k, v in other.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_incomplete_or_mismatched_weights_refused(tmp_path):
    _, model = tiny_model("c4")
    sd = model.state_dict()
    key = "roi_heads.box_predictor.cls_score.weight"
    torch.save({k: v for k, v in sd.items() if k != key}, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match=r"1 parameter\(s\) missing \(" + key):
        load_weights(tiny_model("c4", seed=1)[1], tmp_path / "partial.pth")
    torch.save(sd, tmp_path / "full.pth")
    with pytest.raises(WeightsError, match=r"shape mismatches: roi_heads.box_predictor"):
        Detector.load(DETECTOR_CONFIGS["c4"], tmp_path / "full.pth",
                      opts=["MODEL.ROI_HEADS.NUM_CLASSES", "3"])
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(model, tmp_path / "nope.pth")


# ------------------------------------------------------------------------- preprocessing

@pytest.mark.parametrize("hw", [(97, 301), (200, 150), (64, 64)])
def test_preprocessing_is_default_predictors(hw):
    rs = np.random.RandomState(0)
    rgb = rs.randint(0, 256, hw + (3,)).astype(np.uint8)
    pre = Preprocessing(160, 256, "BGR")
    got = pre(rgb)
    nh, nw = resized_hw_reference(*hw, 160, 256)
    want = np.asarray(Image.fromarray(np.ascontiguousarray(rgb[:, :, ::-1])).resize(
        (nw, nh), Image.BILINEAR)).transpose(2, 0, 1)
    assert got.dtype == torch.uint8 and tuple(got.shape) == (3, nh, nw)
    np.testing.assert_array_equal(got.numpy(), want)
    assert pre.resized_hw(*hw) == (nh, nw)
    np.testing.assert_array_equal(Preprocessing(160, 256, "RGB")(rgb).numpy(), want[::-1])


@pytest.mark.parametrize("kind", ["c4", "fpn", "tee"])
def test_detections_equal_default_predictor(kind, tiny_weights):
    """Our detect + frame mapping reproduces detectron2's DefaultPredictor when the selection
    is detectron2's (no top-up)."""
    from detectron2.engine import DefaultPredictor

    det = Detector.load(DETECTOR_CONFIGS[kind], tiny_weights[kind])
    cfg = det.cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = str(tiny_weights[kind])
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.3
    cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST = 0.4
    cfg.TEST.DETECTIONS_PER_IMAGE = 30
    predictor = DefaultPredictor(cfg)
    rs = np.random.RandomState(5)
    small = rs.randint(0, 256, (15, 23, 3)).astype(np.uint8)
    rgb = np.kron(small, np.ones((8, 8, 1), np.uint8))[:117, :181]
    want = predictor(np.ascontiguousarray(rgb[:, :, ::-1]))["instances"]

    image = det.preprocessing(rgb)
    image_list, feats = det.backbone_features([image])
    d = det.detect(image_list, feats, BoxSelection(0.3, 0.4, min_boxes=0, max_boxes=30))[0]
    boxes = boxes_to_original(d.boxes, rgb.shape[:2], tuple(image_list.image_sizes[0]))
    assert len(want) > 5 and len(d.boxes) == len(want)
    np.testing.assert_allclose(boxes, want.pred_boxes.tensor.numpy(), rtol=0, atol=1e-3)
    np.testing.assert_allclose(d.scores.numpy(), want.scores.numpy(), rtol=1e-5)
    np.testing.assert_array_equal(d.classes.numpy(), want.pred_classes.numpy())


# ------------------------------------------------------------------------- box selection

def _pairs(boxes_per_class, probs):
    """(R, K*4) boxes from a per-proposal list of K boxes; (R, K+1) probs."""
    return (torch.tensor(boxes_per_class, dtype=torch.float32).reshape(len(probs), -1),
            torch.tensor(probs, dtype=torch.float32))


def test_select_boxes_threshold_nms_max_and_topup():
    A = [0, 0, 10, 10]
    A2 = [0, 0, 10, 9]        # IoU 0.9 with A
    B = [20, 20, 30, 30]
    C = [40, 0, 50, 10]
    boxes, probs = _pairs([[A, A], [A2, A2], [B, B], [C, C]],
                          [[0.90, 0.05, 0.05], [0.80, 0.15, 0.05],
                           [0.10, 0.85, 0.05], [0.30, 0.25, 0.45]])
    sel = BoxSelection(score_thresh=0.5, nms_thresh=0.5, min_boxes=0, max_boxes=10)
    d = select_boxes(boxes, probs, (60, 60), sel)
    # A (0.9, class 0) suppresses A2 (0.8, class 0); B (0.85, class 1) survives.
    assert d.scores.tolist() == pytest.approx([0.90, 0.85])
    assert d.classes.tolist() == [0, 1]
    assert d.boxes.tolist() == [A, B]
    d = select_boxes(boxes, probs, (60, 60), BoxSelection(0.5, 0.5, 0, 1))
    assert d.boxes.tolist() == [A]
    # Top-up: nothing above 0.95. Per-class NMS over all pairs keeps, class 0: A .90, C .30,
    # B .10 (A2 .80 suppressed by A); class 1: B .85, C .25, A2 .15 (A .05 suppressed by A2).
    # The 4 best of those: A/0, B/1, C/0, C/1.
    d = select_boxes(boxes, probs, (60, 60), BoxSelection(0.95, 0.5, min_boxes=4,
                                                          max_boxes=10))
    assert d.scores.tolist() == pytest.approx([0.90, 0.85, 0.30, 0.25])
    assert d.classes.tolist() == [0, 1, 0, 1]
    assert d.boxes.tolist() == [A, B, C, C]
    # Top-up keeps the above-threshold ones first and stops at min_boxes.
    d = select_boxes(boxes, probs, (60, 60), BoxSelection(0.5, 0.5, min_boxes=3,
                                                          max_boxes=10))
    assert d.scores.tolist() == pytest.approx([0.90, 0.85, 0.30])
    # No candidate above threshold and no minimum: zero detections, well-formed.
    d = select_boxes(boxes, probs, (60, 60), BoxSelection(0.99, 0.5, 0, 10))
    assert tuple(d.boxes.shape) == (0, 4) and d.scores.numel() == 0


def test_select_boxes_clips_drops_empty_and_class_agnostic():
    # Box regression out of the image is clipped; a box that is empty after clipping never
    # becomes a region, even to reach min_boxes.
    boxes = torch.tensor([[-5, -5, 20, 20], [70, 10, 90, 20], [5, 5, 15, 25]], dtype=torch.float32)
    probs = torch.tensor([[0.7, 0.3], [0.9, 0.1], [0.6, 0.4]])  # K = 1, class-agnostic boxes
    d = select_boxes(boxes, probs, (30, 60), BoxSelection(0.0, 0.9, min_boxes=3, max_boxes=5))
    assert d.boxes.tolist() == [[0, 0, 20, 20], [5, 5, 15, 25]]
    assert d.scores.tolist() == pytest.approx([0.7, 0.6])


def test_selection_options_validated():
    with pytest.raises(ValueError, match="min-boxes <= --max-boxes"):
        BoxSelection(min_boxes=20, max_boxes=10)


# ------------------------------------------------------------------------------- pooling

@pytest.mark.parametrize("kind", ["c4", "fpn", "tee"])
def test_pool_over_given_boxes_matches_reference(kind, tiny_weights):
    det = Detector.load(DETECTOR_CONFIGS[kind], tiny_weights[kind])
    cfg, model = det.cfg, det.model
    rs = np.random.RandomState(3)
    images = [rs.randint(0, 256, (130, 170, 3)).astype(np.uint8) for _ in range(3)]
    # Boxes of many sizes (several FPN levels), one image without boxes, in a batch.
    boxes = [np.array([[0, 0, 169, 129], [10, 20, 40, 35], [60.5, 7.25, 150, 120],
                       [100, 100, 101, 101]], np.float32),
             np.zeros((0, 4), np.float32),
             np.array([[5, 5, 50, 90], [0, 60, 170, 130]], np.float32)]
    tensors = [det.preprocessing(im) for im in images]
    image_list, feats = det.backbone_features(tensors)
    rhw = [tuple(s) for s in image_list.image_sizes]
    got = pool_box_features(det.roi_heads, feats,
                            [boxes_to_resized(b, im.shape[:2], r)
                             for b, im, r in zip(boxes, images, rhw)])
    want = np.concatenate([_pooled_reference(cfg, model, im, b) if len(b) else
                           np.zeros((0, det.feature_dim), np.float32)
                           for im, b in zip(images, boxes)])
    assert got.shape == (6, det.feature_dim)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # The model's own classifier over those features.
    scores, classes = classify_box_features(det.roi_heads, got)
    cs = model.roi_heads.box_predictor.cls_score
    logits = got.double() @ cs.weight.detach().double().T + cs.bias.detach().double()
    p = torch.softmax(logits, dim=1)[:, :-1]
    np.testing.assert_allclose(scores.numpy(), p.max(1).values.numpy(), rtol=1e-5)
    np.testing.assert_array_equal(classes.numpy(), p.argmax(1).numpy())


def test_box_frames():
    b = np.array([[10, 20, 110, 70], [0, 0, 200, 100]], np.float32)
    r = boxes_to_resized(b, (100, 200), (160, 320))
    np.testing.assert_allclose(r.numpy(), b * 1.6)
    np.testing.assert_allclose(boxes_to_original(r, (100, 200), (160, 320)), b, rtol=1e-6)
    # Back to the original frame clips to the image.
    out = boxes_to_original(torch.tensor([[-16.0, 8, 400, 200]]), (100, 200), (160, 320))
    np.testing.assert_allclose(out, [[0, 5, 200, 100]])


def test_pooler_registry_picks_the_nearest_family_and_refuses_unknown_heads():
    from detectron2.modeling.roi_heads import CascadeROIHeads, ROIHeads, Res5ROIHeads
    from torch import nn

    from vlkd.extract.pooling import (POOLERS, C4Family, FPNFamily, UnsupportedROIHeadsError,
                                      family_class, pooler_for)

    def heads(cls, **attrs):
        rh = cls.__new__(cls)  # an unbuilt instance: only its class and attributes matter
        nn.Module.__init__(rh)
        for k, v in attrs.items():
            setattr(rh, k, v)
        return rh

    assert {"C4Family", "FPNFamily"} <= {name for name, _ in POOLERS}
    assert (C4Family.kind, C4Family.description) == ("C4", "res5 + mean pool")
    assert (FPNFamily.kind, FPNFamily.description) == ("FPN", "box_pooler + box_head")

    class VinVLLikeHeads(Res5ROIHeads):
        pass

    class Deeper(VinVLLikeHeads):
        pass

    assert family_class(heads(VinVLLikeHeads)) is C4Family  # a subclass is served by C4 ...

    @POOLERS.register()
    class VinVLLikeFamily(C4Family):
        kind, description, heads = "VINVL-LIKE", "res5 + mean pool (test)", (VinVLLikeHeads,)

    try:  # ... until a family registers for it: the nearest class in the MRO wins
        assert family_class(heads(VinVLLikeHeads)) is VinVLLikeFamily
        assert family_class(heads(Deeper)) is VinVLLikeFamily
        assert family_class(heads(Res5ROIHeads)) is C4Family
    finally:
        POOLERS._obj_map.pop("VinVLLikeFamily")  # registries are per process

    class Other(ROIHeads):
        pass

    with pytest.raises(UnsupportedROIHeadsError, match="ROI heads Other are not supported"):
        pooler_for(heads(Other))
    cascade = heads(CascadeROIHeads, box_head=nn.ModuleList())  # one box head per stage
    with pytest.raises(UnsupportedROIHeadsError, match="single box head"):
        pooler_for(cascade)
