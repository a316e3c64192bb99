"""Train a detectron2 detector on COCO-format data with detectron2's own training loop.

Used by the demo to make its two detectors (``configs/demo/teacher_detector.yaml`` and
``student_detector.yaml``) on the synthetic world, and usable on any COCO instances JSON:

    vlkd-extract train-detector --config configs/demo/student_detector.yaml \\
        --train-json W/annotations/instances_train.json --image-root W/images/train \\
        --val-json W/annotations/instances_val.json --val-image-root W/images/val \\
        --out runs/student-det --max-iter 300

The datasets are registered with detectron2's ``register_coco_instances``; the loop is
detectron2's ``SimpleTrainer`` with its hooks (iteration timer, LR scheduler, periodic writers:
the console printer to stderr and a JSON-lines log); box AP comes from detectron2's
``COCOEvaluator`` with the official pycocotools implementation (the fast C++ one needs
detectron2's compiled ``_C``, which vlkd does not load).

Outputs in ``--out``:

- ``model_final.pth``: ``{"model": state_dict}`` with tensors only, loadable with
  ``torch.load(weights_only=True)`` and by :func:`vlkd.extract.detector.load_weights`;
- ``config.yaml``: the resolved config (``_BASE_`` chain flattened, NUM_CLASSES set from the
  data, ``MODEL.WEIGHTS`` pointing at ``model_final.pth``);
- ``class_names.json``: the K class names in the model's class-index order;
- ``metrics.json``: box AP/AP50/AP75/APs/APm/APl and per-class AP on the validation set (null
  when not measurable), training time, loss at the start and the end, parameter count;
- ``train_log.jsonl``: detectron2's JSON writer output (losses, learning rate, timings).

Training starts from random weights (``MODEL.WEIGHTS`` must be empty): there are no
pretrained checkpoints without network, and the demo's detectors learn the synthetic world
from scratch. Configs must therefore normalise the input (``PIXEL_STD``), use trainable
normalisation (``RESNETS.NORM: BN``) and freeze nothing (``BACKBONE.FREEZE_AT: 0``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from detectron2.config import CfgNode
from detectron2.data import (DatasetCatalog, MetadataCatalog, build_detection_test_loader,
                             build_detection_train_loader)
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import SimpleTrainer, hooks
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler, build_optimizer
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import CommonMetricPrinter, JSONWriter

from .detector import DetectorError, load_detector_config

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model_final.pth"
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_class_names(json_file: str | os.PathLike) -> list[str]:
    """Category names of a COCO instances JSON in category-id order, which is the order
    detectron2's ``load_coco_json`` maps to contiguous class indices 0..K-1."""
    with open(json_file, encoding="utf-8") as f:
        data = json.load(f)
    cats = data.get("categories") if isinstance(data, dict) else None
    if not cats:
        raise DetectorError(f"{json_file}: no 'categories' list; expected a COCO instances "
                            "JSON (images, annotations, categories)")
    return [c["name"] for c in sorted(cats, key=lambda c: c["id"])]


def register_coco_dataset(json_file: str | os.PathLike, image_root: str | os.PathLike,
                          role: str) -> str:
    """Register a COCO instances JSON with detectron2 and return the dataset name.

    The name is derived from the file's content and the image root, so registering the same
    data twice in one process reuses the name and different data never collides.
    """
    json_file, image_root = Path(json_file).resolve(), Path(image_root).resolve()
    if not json_file.is_file():
        raise DetectorError(f"{role} annotations {json_file} do not exist; pass a COCO "
                            "instances JSON (e.g. annotations/instances_train.json)")
    if not image_root.is_dir():
        raise DetectorError(f"{role} image root {image_root} is not a folder; pass the folder "
                            "that the JSON's file_name entries are relative to")
    h = hashlib.sha1(json_file.read_bytes())
    h.update(str(image_root).encode())
    name = f"vlkd_{role}_{h.hexdigest()[:12]}"
    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, str(json_file), str(image_root))
        MetadataCatalog.get(name).thing_classes = coco_class_names(json_file)
    return name


def _finite_or_none(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _mean(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def training_config(config: str | os.PathLike, train_name: str, val_name: str | None,
                    num_classes: int, out_dir: Path, *, max_iter: int | None, device: str,
                    opts: Sequence[str] = ()) -> CfgNode:
    """The resolved config of one training run (datasets, classes, device and length set)."""
    cfg = load_detector_config(config, opts).clone()
    cfg.defrost()
    if cfg.MODEL.WEIGHTS:
        raise DetectorError(f"{config}: MODEL.WEIGHTS is {cfg.MODEL.WEIGHTS!r}; train-detector "
                            "trains from random weights, so set MODEL.WEIGHTS to \"\"")
    if cfg.MODEL.META_ARCHITECTURE != "GeneralizedRCNN" or cfg.MODEL.MASK_ON:
        raise DetectorError(f"{config}: expected a box-only GeneralizedRCNN (Faster R-CNN), "
                            f"found {cfg.MODEL.META_ARCHITECTURE} with MASK_ON="
                            f"{cfg.MODEL.MASK_ON}; the COCO data carries boxes only")
    if cfg.MODEL.ROI_HEADS.NUM_CLASSES != num_classes:
        logger.info("NUM_CLASSES %d in %s -> %d from the training data's categories",
                    cfg.MODEL.ROI_HEADS.NUM_CLASSES, config, num_classes)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.DATASETS.TRAIN = (train_name,)
    cfg.DATASETS.TEST = (val_name,) if val_name else ()
    cfg.MODEL.DEVICE = device
    cfg.OUTPUT_DIR = str(out_dir)
    if max_iter is not None:
        if max_iter < 1:
            raise DetectorError(f"--max-iter must be >= 1, got {max_iter}")
        cfg.SOLVER.MAX_ITER = int(max_iter)
    # Warm-up and step milestones are absolute iterations: keep them inside a short run.
    cfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.MAX_ITER // 5)
    cfg.SOLVER.STEPS = tuple(s for s in cfg.SOLVER.STEPS if s < cfg.SOLVER.MAX_ITER)
    cfg.TEST.EVAL_PERIOD = 0
    return cfg


def evaluate_box_ap(cfg: CfgNode, model: torch.nn.Module, dataset_name: str) -> dict:
    """Box AP of ``model`` on a registered dataset with detectron2's COCOEvaluator.

    Returns:
        ``{"AP", "AP50", ..., "per_class": {name: AP}, "seconds_per_image"}``, percentages
        (COCO convention), None where pycocotools cannot measure (e.g. no small objects).
    """
    loader = build_detection_test_loader(cfg, dataset_name)
    # use_fast_impl=False: the official pycocotools COCOeval (the fast one needs detectron2._C).
    evaluator = COCOEvaluator(dataset_name, tasks=("bbox",), distributed=False,
                              output_dir=None, use_fast_impl=False)
    t0 = time.perf_counter()
    # pycocotools prints its summary table; keep stdout for the command's own result.
    with contextlib.redirect_stdout(sys.stderr):
        results = inference_on_dataset(model, loader, evaluator)
    seconds = time.perf_counter() - t0
    bbox = results.get("bbox", {})
    out: dict = {k: _finite_or_none(bbox[k]) if k in bbox else None for k in AP_KEYS}
    out["per_class"] = {k[3:]: _finite_or_none(v) for k, v in bbox.items()
                        if k.startswith("AP-")}
    out["seconds_per_image"] = seconds / max(len(loader.dataset), 1)
    return out


def train_detector(config: str | os.PathLike, train_json: str | os.PathLike,
                   image_root: str | os.PathLike, out_dir: str | os.PathLike, *,
                   val_json: str | os.PathLike | None = None,
                   val_image_root: str | os.PathLike | None = None,
                   max_iter: int | None = None, device: str = "cpu",
                   opts: Sequence[str] = (), log_period: int = 20) -> dict:
    """Train a detector from scratch, evaluate it, and write its weights, config and metrics.

    Args:
        config: detectron2 YAML (``_BASE_: "model_zoo:..."`` chains allowed).
        train_json, image_root: COCO instances JSON and the folder its file names are in.
        out_dir: output folder (created).
        val_json, val_image_root: validation data for box AP (``val_image_root`` defaults to
            ``image_root``); without ``val_json`` no AP is measured.
        max_iter: overrides ``SOLVER.MAX_ITER``.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        opts: further config overrides, ``KEY VALUE`` pairs.
        log_period: iterations between progress lines (stderr) and log records.

    Returns:
        The content of ``metrics.json``.
    """
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise DetectorError(f"--device {device}: CUDA is not available on this machine; use "
                            "--device cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    class_names = coco_class_names(train_json)
    train_name = register_coco_dataset(train_json, image_root, "train")
    val_name = None
    if val_json is not None:
        val_name = register_coco_dataset(val_json, val_image_root or image_root, "val")
        val_names = coco_class_names(val_json)
        if val_names != class_names:
            raise DetectorError(f"{val_json} has categories {val_names}, {train_json} has "
                                f"{class_names}; train and val must share one category list")
    cfg = training_config(config, train_name, val_name, len(class_names), out,
                          max_iter=max_iter, device=str(device), opts=opts)
    if cfg.SEED >= 0:
        seed_all_rng(cfg.SEED)  # also seeds the training sampler's shuffling
    model = build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("training %s: %s/%s, %d classes, %.2fM parameters, %d iterations x %d images",
                Path(config).name, cfg.MODEL.ROI_HEADS.NAME, cfg.MODEL.BACKBONE.NAME,
                len(class_names), n_params / 1e6, cfg.SOLVER.MAX_ITER, cfg.SOLVER.IMS_PER_BATCH)
    optimizer = build_optimizer(cfg, model)
    trainer = SimpleTrainer(model, build_detection_train_loader(cfg), optimizer)
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(optimizer, build_lr_scheduler(cfg, optimizer)),
        hooks.PeriodicWriter([CommonMetricPrinter(cfg.SOLVER.MAX_ITER),
                              JSONWriter(str(out / "train_log.jsonl"))], period=log_period),
    ])
    t0 = time.perf_counter()
    trainer.train(0, cfg.SOLVER.MAX_ITER)
    train_seconds = time.perf_counter() - t0
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    window = max(1, min(10, len(losses) // 4))

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = out / WEIGHTS_NAME
    tmp = weights.with_name(weights.name + ".tmp")
    torch.save({"model": state}, tmp)
    os.replace(tmp, weights)
    cfg.MODEL.WEIGHTS = str(weights.resolve())
    (out / "config.yaml").write_text(cfg.dump(), encoding="utf-8")
    (out / "class_names.json").write_text(json.dumps(class_names), encoding="utf-8")

    metrics: dict = {
        "config": str(config), "class_names": class_names, "num_parameters": n_params,
        "max_iter": cfg.SOLVER.MAX_ITER, "images_per_batch": cfg.SOLVER.IMS_PER_BATCH,
        "device": str(device), "train_seconds": train_seconds,
        "loss_first": _mean(losses[:window]), "loss_last": _mean(losses[-window:]),
    }
    if val_name is not None:
        logger.info("evaluating box AP on %s", val_json)
        metrics["val_json"] = str(val_json)
        metrics["bbox"] = evaluate_box_ap(cfg, model, val_name)
        metrics["AP"], metrics["AP50"] = metrics["bbox"]["AP"], metrics["bbox"]["AP50"]
        nan = float("nan")
        logger.info("box AP %.1f, AP50 %.1f (train %.0f s)",
                    nan if metrics["AP"] is None else metrics["AP"],
                    nan if metrics["AP50"] is None else metrics["AP50"], train_seconds)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    return metrics
