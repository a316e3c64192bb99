"""The files of the synthetic world: COCO instances and captions, the Karpathy split file, VQA
v2 questions and annotations, the scene metadata, and :func:`generate`, which writes them all.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from .grammar import human_answers, make_captions, make_questions
from .scene import COLORS, SHAPES, SIZES, Scene, render_scene

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SPLIT_ID_BASE = {"train": 1_000_000, "val": 2_000_000, "test": 3_000_000}
_SPLIT_CODE = {"train": 1, "val": 2, "test": 3}
FORMAT_VERSION = 1


def image_id_for(split: str, index: int) -> int:
    """The integer id of image ``index`` of ``split``."""
    return SPLIT_ID_BASE[split] + index


def make_scene(seed: int, split: str, index: int, min_size: int = 64, max_size: int = 256
               ) -> tuple[np.ndarray, Scene]:
    """Image ``index`` of ``split``: pixels (H, W, 3) uint8 RGB and its complete scene
    (objects, captions, questions with answers), a pure function of its arguments."""
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], index])
    img, scene = render_scene(rng, image_id_for(split, index), split, min_size, max_size)
    scene.captions = make_captions(scene, rng)
    scene.questions = make_questions(scene, rng)
    for qd in scene.questions:
        qd["answers"] = human_answers(qd["answer"], qd["kind"], rng)
    return img, scene


def _write_json(path: Path, obj: object) -> None:
    """Deterministic bytes; written to a temporary name and renamed, so a file is complete."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, sort_keys=True, separators=(",", ":"))
    os.replace(tmp, path)


def _image_entry(s: Scene) -> dict:
    return {"id": s.image_id, "file_name": s.file_name, "height": s.height, "width": s.width}


def _instances(scenes: list[Scene], split: str) -> dict:
    anns = []
    for s in scenes:
        for o in s.objects:
            anns.append({"id": len(anns) + 1, "image_id": s.image_id,
                         "category_id": SHAPES.index(o.shape) + 1,
                         "bbox": [float(v) for v in o.bbox], "area": float(o.area),
                         "iscrowd": 0, "color": o.color})
    return {"info": {"description": f"vlkd synthetic world, {split} split",
                     "version": str(FORMAT_VERSION)},
            "licenses": [], "images": [_image_entry(s) for s in scenes], "annotations": anns,
            "categories": [{"id": i + 1, "name": n, "supercategory": "shape"}
                           for i, n in enumerate(SHAPES)]}


def _captions(scenes: list[Scene], split: str) -> dict:
    anns = [{"id": s.image_id * 10 + k, "image_id": s.image_id, "caption": c}
            for s in scenes for k, c in enumerate(s.captions)]
    return {"info": {"description": f"vlkd synthetic world captions, {split} split"},
            "licenses": [], "images": [_image_entry(s) for s in scenes], "annotations": anns}


def _karpathy(all_scenes: dict[str, list[Scene]]) -> dict:
    images = []
    for split, scenes in all_scenes.items():
        for s in scenes:
            sents = [{"raw": c, "tokens": c.replace(",", " ").replace(":", " ").split(),
                      "imgid": len(images), "sentid": s.image_id * 10 + k}
                     for k, c in enumerate(s.captions)]
            images.append({"filepath": f"images/{split}", "filename": s.file_name,
                           "imgid": len(images), "cocoid": s.image_id, "split": split,
                           "sentids": [x["sentid"] for x in sents], "sentences": sents})
    return {"dataset": "synthetic", "images": images}


def _vqa(scenes: list[Scene], split: str) -> tuple[dict, dict]:
    qs, anns = [], []
    for s in scenes:
        for k, qd in enumerate(s.questions):
            qid = s.image_id * 10 + k
            qs.append({"image_id": s.image_id, "question": qd["question"], "question_id": qid})
            anns.append({
                "question_id": qid, "image_id": s.image_id,
                "question_type": qd["question_type"], "answer_type": qd["answer_type"],
                "multiple_choice_answer": qd["answer"],
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                            for i, a in enumerate(qd["answers"])]})
    common = {"info": {"description": f"vlkd synthetic world VQA, {split} split"},
              "license": {}, "data_subtype": split, "data_type": "synthetic"}
    return ({**common, "task_type": "Open-Ended", "questions": qs},
            {**common, "annotations": anns})


def paths_for(out_dir: str | os.PathLike, splits: tuple[str, ...] = SPLITS) -> dict[str, str]:
    """The files :func:`generate` writes for ``splits`` (keys as in its return value)."""
    root = Path(out_dir)
    ann = root / "annotations"
    p = {"root": str(root), "karpathy": str(ann / "dataset_coco.json"),
         "info": str(root / "synthetic_info.json")}
    for sp in splits:
        p[f"images_{sp}"] = str(root / "images" / sp)
        p[f"instances_{sp}"] = str(ann / f"instances_{sp}.json")
        p[f"captions_{sp}"] = str(ann / f"captions_{sp}.json")
        p[f"vqa_questions_{sp}"] = str(ann / f"v2_OpenEnded_synthetic_{sp}_questions.json")
        p[f"vqa_annotations_{sp}"] = str(ann / f"v2_synthetic_{sp}_annotations.json")
        p[f"scenes_{sp}"] = str(ann / f"scenes_{sp}.json")
    return p


def generate(out_dir: str | os.PathLike, *, num_train: int, num_val: int, num_test: int,
             seed: int = 0, min_size: int = 64, max_size: int = 256) -> dict[str, str]:
    """Write the synthetic world (images and every annotation file) under ``out_dir``.

    Args:
        out_dir: output folder (created; files already there are overwritten).
        num_train, num_val, num_test: images per split (a split with 0 images is not written).
        seed: the world's seed; the same arguments give byte-identical files.
        min_size, max_size: range of image sides in pixels (each side drawn independently).

    Returns:
        Paths by name: ``root``, ``info``, ``karpathy`` and, per written split ``s``,
        ``images_s``, ``instances_s``, ``captions_s``, ``vqa_questions_s``,
        ``vqa_annotations_s``, ``scenes_s``.
    """
    counts = {"train": num_train, "val": num_val, "test": num_test}
    for sp, n in counts.items():
        if not 0 <= n < 1_000_000:
            raise ValueError(f"num_{sp}={n}: expected 0 <= n < 1000000 (ids are "
                             f"{SPLIT_ID_BASE[sp]} + index)")
    if not 16 <= min_size <= max_size:
        raise ValueError(f"image sizes: expected 16 <= min_size <= max_size, found "
                         f"min_size={min_size}, max_size={max_size}")
    splits = tuple(sp for sp in SPLITS if counts[sp] > 0)
    if not splits:
        raise ValueError("nothing to generate: every split has 0 images")
    paths = paths_for(out_dir, splits)
    Path(paths["root"], "annotations").mkdir(parents=True, exist_ok=True)
    all_scenes: dict[str, list[Scene]] = {}
    t0 = time.time()
    total, done = sum(counts.values()), 0
    for sp in splits:
        img_dir = Path(paths[f"images_{sp}"])
        img_dir.mkdir(parents=True, exist_ok=True)
        scenes = []
        for i in range(counts[sp]):
            img, scene = make_scene(seed, sp, i, min_size, max_size)
            tmp = img_dir / (scene.file_name + ".tmp")
            Image.fromarray(img).save(tmp, format="PNG")
            os.replace(tmp, img_dir / scene.file_name)
            scenes.append(scene)
            done += 1
            if done % 200 == 0 or done == total:
                logger.info("synthetic: %d/%d images (%.1f s)", done, total, time.time() - t0)
        all_scenes[sp] = scenes
        _write_json(Path(paths[f"instances_{sp}"]), _instances(scenes, sp))
        _write_json(Path(paths[f"captions_{sp}"]), _captions(scenes, sp))
        q, a = _vqa(scenes, sp)
        _write_json(Path(paths[f"vqa_questions_{sp}"]), q)
        _write_json(Path(paths[f"vqa_annotations_{sp}"]), a)
        _write_json(Path(paths[f"scenes_{sp}"]),
                    [{**asdict(s), "objects": [asdict(o) for o in s.objects]} for s in scenes])
    _write_json(Path(paths["karpathy"]), _karpathy(all_scenes))
    # Written last: its presence means the whole world is complete.
    _write_json(Path(paths["info"]), {
        "format_version": FORMAT_VERSION, "seed": seed, "min_size": min_size,
        "max_size": max_size, "counts": {sp: counts[sp] for sp in splits},
        "shapes": list(SHAPES), "colors": list(COLORS), "sizes": list(SIZES),
        "num_objects": {sp: sum(len(s.objects) for s in all_scenes[sp]) for sp in splits}})
    return paths
