"""Fixtures for the extraction tests: tiny detectron2 models with readable outputs, generated
images, and an independent recomputation of region features.

Random-init detectron2 models are degenerate (activations ~1e3, the RPN collapses to one box,
every score is 1.0). :func:`tiny_model` makes them readable without training:

- the RPN's ``anchor_deltas`` conv is zeroed, so proposals are the anchors (hundreds of them);
- ``bbox_pred`` predicts a constant, class-dependent shift and scale, so every final box
  differs from the proposal it came from (a test can tell which boxes features were pooled
  over);
- ``cls_score`` is rescaled so that class probabilities spread over 0..1 (thresholds and the
  top-up to ``min_boxes`` matter).

Use from a test module with ``from extract_fixtures import *`` (pytest puts ``tests/`` on
``sys.path``).
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision.ops import roi_align

ROOT = Path(__file__).resolve().parents[1]
DETECTOR_CONFIGS = {"c4": ROOT / "configs" / "detectors" / "tiny-c4.yaml",
                    "fpn": ROOT / "configs" / "detectors" / "tiny-fpn.yaml",
                    "tee": ROOT / "configs" / "detectors" / "tiny-tee.yaml"}
# Deltas (dx, dy, dw, dh) before Box2BoxTransform's weights (10, 10, 5, 5): a 10 % shift and
# a ~10 % resize, growing with the class index so class-specific boxes differ.
BOX_DELTA = (1.0, 0.5, 0.5, -0.25)

__all__ = ["DETECTOR_CONFIGS", "committed_images", "tiny_model", "save_tiny_weights", "tiny_weights",
           "make_images", "reference_features", "read_shards", "resized_hw_reference",
           "sigkill_after_first_commit", "invoke_extract", "assert_same_shards"]


def tiny_model(kind: str, seed: int = 0):
    """Build the tiny ``kind`` ("c4" | "fpn" | "tee") model on CPU with the readable-output edits.

    Returns:
        (cfg, model) in eval mode.
    """
    from detectron2.modeling import build_model

    from vlkd.extract.detector import load_detector_config

    cfg = load_detector_config(DETECTOR_CONFIGS[kind], ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    k = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    with torch.no_grad():
        deltas = model.proposal_generator.rpn_head.anchor_deltas
        deltas.weight.zero_()
        deltas.bias.zero_()
        bp = model.roi_heads.box_predictor.bbox_pred
        bp.weight.zero_()
        grow = 1 + 0.1 * torch.arange(k, dtype=torch.float32).repeat_interleave(4)
        bp.bias.copy_(torch.tensor(BOX_DELTA).repeat(k) * grow)
        # Scale the classifier to the pooled features' size (measured on a noise image) so
        # logits have a standard deviation of about 1.5.
        rgb = np.random.RandomState(seed).randint(0, 255, (150, 200, 3)).astype(np.uint8)
        feats = _pooled_reference(cfg, model, rgb, np.array([[10, 10, 80, 90], [50, 20, 150,
                                                                                  140]], "f4"))
        rms = float(np.sqrt((feats.astype(np.float64) ** 2).mean()))
        cs = model.roi_heads.box_predictor.cls_score
        g = torch.Generator().manual_seed(seed + 1)
        cs.weight.copy_(torch.randn(cs.weight.shape, generator=g) * 1.5
                        / (rms * math.sqrt(cs.in_features)))
        cs.bias.zero_()
    return cfg, model


def save_tiny_weights(kind: str, path: Path, seed: int = 0) -> Path:
    """Save :func:`tiny_model`'s state dict as a ``.pth`` file."""
    _, model = tiny_model(kind, seed)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """``{"c4": Path, "fpn": Path, "tee": Path}`` of tiny-model ``.pth`` files (seed 0)."""
    d = tmp_path_factory.mktemp("tiny-weights")
    return {k: save_tiny_weights(k, d / f"tiny-{k}.pth") for k in DETECTOR_CONFIGS}


def make_images(folder: Path, n: int, seed: int = 0,
                sizes=((120, 160), (120, 160), (160, 120), (100, 210))) -> dict[str, Path]:
    """Write ``n`` PNG images of blocky noise (cycling through ``sizes`` (h, w)); returns
    ``{id: path}`` with folder-source ids (``img000``...)."""
    folder.mkdir(parents=True, exist_ok=True)
    rs = np.random.RandomState(seed)
    out = {}
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        # Blocks, not pixel noise: features then vary smoothly with box position, as for
        # photos, and differ clearly between a box and a shifted box.
        small = rs.randint(0, 256, (h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
        img = np.kron(small, np.ones((8, 8, 1), np.uint8))[:h, :w]
        p = folder / f"img{i:03d}.png"
        Image.fromarray(img).save(p)
        out[p.stem] = p
    return out


def resized_hw_reference(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """ResizeShortestEdge's output size, written out from its definition."""
    scale = short / min(h, w)
    nh, nw = h * scale, w * scale
    if max(nh, nw) > max_size:
        s = max_size / max(nh, nw)
        nh, nw = nh * s, nw * s
    return int(nh + 0.5), int(nw + 0.5)


def _pooled_reference(cfg, model, rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Features of ``boxes`` (original pixels) in ``rgb``, computed without vlkd: PIL resize,
    manual normalisation and padding, the model's backbone, torchvision ROIAlign with
    detectron2's level rule, then res5 + mean (C4) or the box head (FPN, and TEE over its
    BiFPN levels)."""
    h, w = rgb.shape[:2]
    img = rgb[:, :, ::-1] if cfg.INPUT.FORMAT == "BGR" else rgb
    nh, nw = resized_hw_reference(h, w, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    img = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((nw, nh),
                                                                      Image.BILINEAR))
    x = torch.tensor(img.transpose(2, 0, 1).astype(np.float32))
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD).view(3, 1, 1)
    x = (x - mean) / std
    div = model.backbone.size_divisibility
    if div > 1:
        x = F.pad(x, (0, -(-nw // div) * div - nw, 0, -(-nh // div) * div - nh))
    b = boxes.astype(np.float64) * np.array([nw / w, nh / h, nw / w, nh / h])
    b = torch.tensor(b.astype(np.float32))
    with torch.no_grad():
        feats = model.backbone(x[None])
        rh = model.roi_heads
        if cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeads":
            f = feats[cfg.MODEL.ROI_HEADS.IN_FEATURES[0]]
            stride = model.backbone.output_shape()[cfg.MODEL.ROI_HEADS.IN_FEATURES[0]].stride
            r = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
            p = roi_align(f, [b], output_size=(r, r), spatial_scale=1.0 / stride,
                          sampling_ratio=0, aligned=True)
            out = rh.res5(p).mean(dim=[2, 3])
        else:
            names = cfg.MODEL.ROI_HEADS.IN_FEATURES  # p2..p5
            levels = [int(math.log2(model.backbone.output_shape()[n].stride)) for n in names]
            size = torch.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
            lvl = torch.floor(4 + torch.log2(size / 224 + 1e-8)).clamp(min(levels), max(levels))
            r = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
            p = torch.zeros((len(b), feats[names[0]].shape[1], r, r))
            for n, L in zip(names, levels):
                sel = torch.nonzero(lvl == L).squeeze(1)
                if len(sel):
                    p[sel] = roi_align(feats[n], [b[sel]], output_size=(r, r),
                                       spatial_scale=1.0 / 2 ** L, sampling_ratio=0,
                                       aligned=True)
            out = rh.box_head(p)
    return out.numpy()


def reference_features(cfg, model, image_path: Path, boxes: np.ndarray) -> np.ndarray:
    """Independent features for ``boxes`` (original pixels) of the image file: PIL decode with
    EXIF orientation, RGB, then :func:`_pooled_reference`.

    Returns:
        (n, D) float32.
    """
    with Image.open(image_path) as im:
        rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    return _pooled_reference(cfg, model, rgb, boxes)


def read_shards(set_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every array of every HDF5 shard, read with plain h5py: ``{shard name: {array: data}}``."""
    out = {}
    for p in sorted(Path(set_dir).glob("shard-*.h5")):
        with h5py.File(p, "r") as f:
            out[p.name] = {k: f[k][()] for k in f.keys()}
    return out


def committed_images(commit_json: Path) -> int:
    """Images durably committed in a partial shard (0 while it has none or is being
    replaced): a kill test waits for this before killing, so the re-run has work to resume."""
    try:
        return json.loads(Path(commit_json).read_text())["num_images"]
    except (OSError, ValueError, KeyError):
        return 0


def sigkill_after_first_commit(argv: list[str], commit_json: Path, max_delay: float
                               ) -> tuple[int, str, int]:
    """Run ``argv`` (a ``vlkd-extract`` job, one thread) and SIGKILL it at a random point after
    its partial shard first committed images.

    ``commit.json`` exists (with 0 images) as soon as the shard is staged: the kill waits for a
    commit that holds images, so it lands mid-shard and the re-run has something to resume.

    Returns:
        (the process's return code, the tail of its stderr, the seed of the delay).
    """
    env = dict(os.environ, OMP_NUM_THREADS="1")
    seed = random.randrange(1 << 30)
    delay = random.Random(seed).uniform(0.0, max_delay)
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        t0 = time.monotonic()
        while not committed_images(commit_json) and proc.poll() is None \
                and time.monotonic() - t0 < 120:
            time.sleep(0.01)
        time.sleep(delay)  # a random point after the first commit of images
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, proc.stderr.read().decode()[-2000:], seed


def invoke_extract(argv, expect: int = 0, env: dict | None = None):
    """Run ``vlkd-extract ARGV`` in-process (click's runner); assert its exit code.

    Returns:
        The click result (``output``, ``stderr``).
    """
    from click.testing import CliRunner

    from vlkd.extract.cli import main

    res = CliRunner().invoke(main, [str(a) for a in argv], env=env)
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert res.exit_code == expect, res.output
    return res


def assert_same_shards(ref: Path, out: Path, msg: str = "") -> None:
    """Every array of every HDF5 shard of ``out`` equals ``ref``'s, and their manifests list
    the same shard entries (content digests included)."""
    from vlkd.common.manifest import read_manifest

    sa, sb = read_shards(ref), read_shards(out)
    for name in sa:
        for key, value in sa[name].items():
            np.testing.assert_array_equal(value, sb[name][key], err_msg=f"{key} {msg}")
    assert read_manifest(ref)["shards"] == read_manifest(out)["shards"]
