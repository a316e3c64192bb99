"""Detector training with detectron2's loop on a tiny synthetic world: the loss falls, box AP
is measured by COCOEvaluator and can be reproduced from the saved files, and the saved
weights are plain tensors that the extraction loader accepts."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from detectron2.engine import DefaultPredictor
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vlkd.data.synthetic import SHAPES, generate
from vlkd.extract.cli import main as extract_main
from vlkd.extract.detector import Detector, load_detector_config
from vlkd.extract.detector_training import train_detector

TEACHER = "configs/demo/teacher_detector.yaml"
STUDENT = "configs/demo/student_detector.yaml"
# Small images and batches keep a training step in the tens of milliseconds.
TINY = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "128", "SOLVER.IMS_PER_BATCH", "4"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("detworld")
    return generate(out, num_train=24, num_val=6, num_test=0, seed=3, min_size=64, max_size=96)


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("det")
    metrics = train_detector(STUDENT, world["instances_train"], world["images_train"], out,
                             val_json=world["instances_val"], val_image_root=world["images_val"],
                             max_iter=40, opts=TINY + ["SOLVER.BASE_LR", "0.01"], log_period=5)
    return out, metrics


def test_loss_falls_and_ap_is_finite(trained):
    out, metrics = trained
    # detectron2's own JSON log, written by its JSONWriter every 5 iterations
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["total_loss"] for r in log if "total_loss" in r]
    assert [r["iteration"] for r in log] == list(range(4, 40, 5))
    assert np.mean(losses[-2:]) < 0.7 * losses[0], losses
    for k in ("AP", "AP50"):
        assert isinstance(metrics[k], float) and math.isfinite(metrics[k])
        assert 0.0 <= metrics[k] <= 100.0
    assert metrics["bbox"]["AP50"] >= metrics["bbox"]["AP"]
    assert set(metrics["bbox"]["per_class"]) == set(SHAPES)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert json.loads((out / "class_names.json").read_text()) == list(SHAPES)


def test_weights_are_plain_tensors_that_reproduce_the_reported_ap(trained, world):
    out, metrics = trained
    ckpt = torch.load(out / "model_final.pth", weights_only=True)
    assert set(ckpt) == {"model"}
    assert all(isinstance(v, torch.Tensor) for v in ckpt["model"].values())
    # The saved config + weights, run by detectron2's DefaultPredictor on each val image and
    # scored here with plain pycocotools, give the AP that training reported.
    cfg = load_detector_config(out / "config.yaml").clone()
    assert cfg.MODEL.WEIGHTS == str((out / "model_final.pth").resolve())
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == len(SHAPES)
    predictor = DefaultPredictor(cfg)
    gt = COCO(world["instances_val"])
    results = []
    for img in gt.dataset["images"]:
        rgb = np.asarray(Image.open(f"{world['images_val']}/{img['file_name']}").convert("RGB"))
        inst = predictor(rgb[:, :, ::-1].copy())["instances"].to("cpu")
        for (x1, y1, x2, y2), s, c in zip(inst.pred_boxes.tensor.tolist(),
                                          inst.scores.tolist(), inst.pred_classes.tolist()):
            results.append({"image_id": img["id"], "category_id": c + 1, "score": s,
                            "bbox": [x1, y1, x2 - x1, y2 - y1]})
    assert results, "the trained detector found nothing at all"
    ev = COCOeval(gt, gt.loadRes(results), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] * 100 == pytest.approx(metrics["AP"], abs=1e-6)
    assert ev.stats[1] * 100 == pytest.approx(metrics["AP50"], abs=1e-6)
    # The extraction loader (torch.load(weights_only=True), every parameter present) accepts them.
    det = Detector.load(out / "config.yaml", out / "model_final.pth")
    sd = det.model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in ckpt["model"].items())
    # ...with the dataset's class names (read from class_names.json in a fresh process, where
    # the training dataset is not registered), in category order: the object tags downstream
    cats = sorted(json.loads(Path(world["instances_val"]).read_text())["categories"],
                  key=lambda c: c["id"])
    code = ("from vlkd.extract.detector import Detector; import sys; "
            "print(','.join(Detector.load(sys.argv[1], sys.argv[2]).class_names))")
    r = subprocess.run([sys.executable, "-c", code, str(out / "config.yaml"),
                        str(out / "model_final.pth")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == ",".join(c["name"] for c in cats)


def test_demo_configs_teacher_is_bigger_than_student():
    from detectron2.modeling import build_model
    t, s = load_detector_config(TEACHER), load_detector_config(STUDENT)
    assert t.MODEL.ROI_HEADS.NUM_CLASSES == s.MODEL.ROI_HEADS.NUM_CLASSES == len(SHAPES)
    assert t.INPUT.MIN_SIZE_TEST > s.INPUT.MIN_SIZE_TEST
    assert t.MODEL.ROI_BOX_HEAD.FC_DIM > s.MODEL.ROI_BOX_HEAD.FC_DIM   # region feature dim
    n = {k: sum(p.numel() for p in build_model(c).parameters()) for k, c in (("t", t), ("s", s))}
    assert n["t"] > 1.5 * n["s"]
    assert t.MODEL.WEIGHTS == s.MODEL.WEIGHTS == ""


def test_cli_trains_writes_outputs_and_reports_errors(world, tmp_path):
    out = tmp_path / "cli"
    r = CliRunner().invoke(extract_main, [
        "train-detector", "--config", TEACHER, "--train-json", world["instances_train"],
        "--image-root", world["images_train"], "--val-json", world["instances_val"],
        "--val-image-root", world["images_val"], "--out", str(out), "--max-iter", "2", "--num-threads", "1", *TINY])
    assert r.exit_code == 0, r.output
    printed = json.loads(r.stdout)             # stdout holds the metrics JSON only
    assert printed["max_iter"] == 2 and math.isfinite(printed["AP"])
    for name in ("model_final.pth", "config.yaml", "metrics.json", "class_names.json"):
        assert (out / name).is_file()
    # A config that names weights: refused with what to do.
    bad = tmp_path / "bad.yaml"
    bad.write_text('_BASE_: "model_zoo:COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"\n'
                   'MODEL:\n  WEIGHTS: "w.pth"\n')
    r = CliRunner().invoke(extract_main, [
        "train-detector", "--config", str(bad), "--train-json", world["instances_train"],
        "--image-root", world["images_train"], "--out", str(tmp_path / "bad")])
    assert r.exit_code == 1 and "set MODEL.WEIGHTS to" in r.output
    r = CliRunner().invoke(extract_main, [
        "train-detector", "--config", STUDENT, "--train-json", world["instances_train"],
        "--image-root", world["images_train"], "--out", str(tmp_path / "odd"), "SOLVER.BASE_LR"])
    assert r.exit_code == 2 and "KEY VALUE pairs" in r.output
