"""Tiny region sets and annotations for the phase-two tests, written with the real common/ writer.

A scene has 1-3 objects; an object is a (colour, shape) pair. The student set stores one box per
object with the shape's class index and a feature that encodes colour and shape plus noise; the
teacher set has the same boxes (pooled "teacher" features of another width) and records
``aligned_to`` the student set, as ``vlkd-extract teacher-features`` does. Captions and VQA
answers are functions of the scene, so a model can learn them and its loss falls.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlkd.common.manifest import manifest_digest, update_manifest
from vlkd.common.regionset import ShardWriter

SHAPES = ["circle", "square", "triangle", "star"]
COLOURS = ["red", "green", "blue", "yellow"]


def scenes(num_images: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(num_images):
        n = int(rng.integers(1, 4))
        objs = [(int(rng.integers(len(COLOURS))), int(rng.integers(len(SHAPES)))) for _ in range(n)]
        h, w = int(rng.integers(200, 500)), int(rng.integers(200, 500))
        xy = rng.uniform(0, 150, size=(n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(20, 50, size=(n, 2))], 1).astype(np.float32)
        out.append({"image_id": str(1000 + i), "hw": (h, w), "objects": objs, "boxes": boxes})
    return out


def _features(objs, dim: int, rng, scale: float) -> np.ndarray:
    f = rng.normal(0, 0.1, size=(len(objs), dim))
    for k, (c, s) in enumerate(objs):
        f[k, c] += scale
        f[k, len(COLOURS) + s] += scale
    return f.astype(np.float32)


def write_sets(root: Path, sc: list[dict], *, student_dim: int = 16, teacher_dim: int = 24,
               num_shards: int = 2, teacher: bool = True, backend: str = "hdf5",
               shift_teacher_box: str | None = None,
               poison_image: str | None = None) -> tuple[Path, Path | None]:
    """Writes ``root/student`` (and ``root/teacher``), contiguous shards of the scenes.

    Args:
        shift_teacher_box: image id whose teacher boxes are moved by one pixel (misalignment).
        poison_image: image id whose student features are +inf (a non-finite loss).
    """
    root = Path(root)
    student = root / "student"
    bounds = np.linspace(0, len(sc), num_shards + 1).astype(int)
    rng = np.random.default_rng(123)
    for s in range(num_shards):
        with ShardWriter(student, s, num_shards, backend=backend, feature_dim=student_dim,
                         commit_every=8) as w:
            for im in sc[bounds[s]:bounds[s + 1]]:
                feats = _features(im["objects"], student_dim, rng, 1.0)
                if im["image_id"] == poison_image:
                    feats[:] = np.inf
                w.append(im["image_id"], im["hw"], im["boxes"],
                         np.linspace(0.9, 0.5, len(im["objects"])),
                         [o[1] for o in im["objects"]], feats)
            w.finalize()

    def student_meta(m):
        m.update(role="proposals", class_names=list(SHAPES),
                 detector={"name": "test-student"})
    update_manifest(student, student_meta)
    if not teacher:
        return student, None
    tdir = root / "teacher"
    for s in range(num_shards):
        with ShardWriter(tdir, s, num_shards, backend=backend, feature_dim=teacher_dim,
                         commit_every=8) as w:
            for im in sc[bounds[s]:bounds[s + 1]]:
                boxes = im["boxes"].copy()
                if im["image_id"] == shift_teacher_box:
                    boxes[0, 0] += 1.0
                w.append(im["image_id"], im["hw"], boxes, np.ones(len(boxes)),
                         [o[1] for o in im["objects"]],
                         _features(im["objects"], teacher_dim, rng, 2.0))
            w.finalize()
    digest = manifest_digest(student)

    def teacher_meta(m):
        m.update(role="teacher-features", class_names=["t-" + s for s in SHAPES],
                 aligned_to={"path": str(student), "manifest_digest": digest,
                             "role": "proposals"})
    update_manifest(tdir, teacher_meta)
    return student, tdir


def caption_of(im: dict) -> str:
    parts = [f"a {COLOURS[c]} {SHAPES[s]}" for c, s in im["objects"]]
    return " and ".join(parts)


def write_captions(path: Path, sc: list[dict], splits: dict[str, str] | None = None,
                   per_image: int = 2) -> Path:
    """Karpathy-style ``dataset_coco.json``; ``splits`` maps image id → split (default train)."""
    images = []
    for k, im in enumerate(sc):
        cap = caption_of(im)
        sents = [{"raw": cap if j == 0 else cap.replace(" and ", " with "), "sentid": k * 10 + j}
                 for j in range(per_image)]
        images.append({"cocoid": int(im["image_id"]), "split": (splits or {}).get(im["image_id"],
                                                                                   "train"),
                       "sentences": sents, "filename": f"{im['image_id']}.png"})
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def write_vqa(qpath: Path, apath: Path, sc: list[dict]) -> tuple[Path, Path]:
    """Two questions per image: the count of objects and the colour of the first one."""
    qs, anns = [], []
    for k, im in enumerate(sc):
        iid = int(im["image_id"])
        n = len(im["objects"])
        first = COLOURS[im["objects"][0][0]]
        for j, (q, a) in enumerate([("how many objects are there?", str(n)),
                                    (f"what colour is the {SHAPES[im['objects'][0][1]]}?", first)]):
            qid = iid * 10 + j
            qs.append({"question_id": qid, "image_id": iid, "question": q})
            answers = [a] * 8 + ["other"] * 2
            anns.append({"question_id": qid, "image_id": iid, "answer_type": "other",
                         "question_type": "what", "multiple_choice_answer": a,
                         "answers": [{"answer": x, "answer_id": m + 1} for m, x in enumerate(answers)]})
    qpath.write_text(json.dumps({"questions": qs}))
    apath.write_text(json.dumps({"annotations": anns}))
    return qpath, apath


# --------------------------------------------------------------------------- a whole tiny world
def make_world(root: Path, num_images: int = 40, num_val: int = 8, seed: int = 0) -> dict:
    """Sets, Karpathy captions (train/val), VQA train/val files and a tokenizer under ``root``."""
    from vlkd.train.tokenizer import build_vocab

    root = Path(root)
    sc = scenes(num_images, seed)
    val_ids = {im["image_id"] for im in sc[-num_val:]}
    student, teacher = write_sets(root, sc)
    caps = write_captions(root / "dataset_coco.json", sc,
                          {i: "val" for i in val_ids})
    train_sc = [im for im in sc if im["image_id"] not in val_ids]
    val_sc = [im for im in sc if im["image_id"] in val_ids]
    vq, va = write_vqa(root / "vqa_train_q.json", root / "vqa_train_a.json", train_sc)
    eq, ea = write_vqa(root / "vqa_val_q.json", root / "vqa_val_a.json", val_sc)
    build_vocab([caps, vq, va], root / "tok", vocab_size=200, min_frequency=1,
                extra_words=SHAPES)
    return {"root": root, "scenes": sc, "student": student, "teacher": teacher,
            "captions": caps, "vqa": (vq, va), "vqa_val": (eq, ea), "tok": root / "tok",
            "val_ids": sorted(val_ids)}


def cli_args(world: dict, out: Path, *extra: str, steps: int = 12, workers: int = 0) -> list[str]:
    """Options shared by the tests' training commands."""
    return ["--captions", str(world["captions"]), "--tokenizer", str(world["tok"]),
            "-o", str(out), "--max-steps", str(steps), "--batch-size", "8", "--lr", "2e-3",
            "--set", "train.progress=false", "--set", f"data.num_workers={workers}",
            "--set", "train.log_every=1", "--set", "train.checkpoint_every=0",
            "--set", "train.tensorboard=false", "--set", "optim.warmup_ratio=0", *extra]


def invoke(args: list[str]):
    """Runs ``vlkd-train`` in-process; fails with its output if it did not exit 0."""
    from click.testing import CliRunner

    from vlkd.train.cli import main

    res = CliRunner().invoke(main, [str(a) for a in args])
    if res.exit_code != 0:
        import traceback
        tb = "".join(traceback.format_exception(*res.exc_info)) if res.exc_info else ""
        raise AssertionError(f"vlkd-train {args[0]} exited {res.exit_code}:\n{res.output}\n{tb}")
    return res


def sigkill_when(args: list[str], path: Path, timeout: float = 180) -> str:
    """Runs ``python -m vlkd.train.cli ARGS`` (one thread) and kills it with SIGKILL (no
    cleanup) as soon as ``path`` exists; fails unless it does. Returns the run's stderr."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "vlkd.train.cli", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while not Path(path).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    err = proc.stderr.read().decode()
    assert Path(path).exists(), err[-2000:]
    return err


def caption_model(world: dict, out: Path, steps: int, *extra: str) -> Path:
    """A tiny captioning model trained ``steps`` steps on the student set: its ``final/``."""
    invoke(["finetune", "--task", "caption", "--regions", world["student"], "--model", "tiny",
            *cli_args(world, out, *extra, steps=steps)])
    return Path(out) / "final"


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}


def train_teacher(world: dict, out: Path, steps: int = 10) -> Path:
    """Visual Token Alignment: adapt a tiny teacher on teacher features over the student boxes."""
    invoke(["finetune", "--task", "caption", "--regions", world["teacher"], "--model",
            "tiny-teacher", *cli_args(world, out, steps=steps)])
    return out / "final"
