"""What ``vlkd-infer`` reads besides images: questions, and the images of the Python API.

Questions come as VQA v2's questions JSON (``{"questions": [{"question_id", "image_id",
"question"}]}``, ``v2_OpenEnded_mscoco_test-dev2015_questions.json``) or as JSON lines, one
``{"question_id", "image_id", "question"}`` object a line. ``question_id`` is an integer (the
official results format has integer ids); ``image_id`` is matched *as a string* against the
image ids of the image source (``str(id)`` for COCO JSON, the file name without extension for
a folder), so ``1`` and ``"1"`` name the same image.

The Python API also takes images as a list: file paths (id: the path as written without its
extension, a list file's rule) or decoded images (PIL images or ``(H, W, 3)`` uint8 RGB
arrays, ids ``"0"``, ``"1"``, ... by position).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from vlkd.data.images import ImageRecord, ImageSource, open_image_source, to_rgb_array

__all__ = ["Question", "InputError", "load_questions", "parse_question", "match_questions",
           "image_records", "InMemoryImage"]


class InputError(ValueError):
    """Images or questions that cannot be used as given (the message says what to do)."""


@dataclass(frozen=True)
class Question:
    """One question about one image."""

    question_id: int
    image_id: str
    question: str


@dataclass(frozen=True)
class InMemoryImage:
    """A decoded image given to the Python API: its id and (H, W, 3) uint8 RGB pixels."""

    image_id: str
    rgb: np.ndarray


def parse_question(obj: Any, where: str) -> Question:
    """One question from its JSON object (``where`` names it in errors)."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected an object with question_id, image_id and question, "
                         f"found {type(obj).__name__}")
    missing = [k for k in ("question_id", "image_id", "question") if k not in obj]
    if missing:
        raise InputError(f"{where}: missing {', '.join(missing)} (each question needs "
                         "question_id, image_id and question)")
    qid = obj["question_id"]
    if isinstance(qid, str) and qid.strip().isdigit():
        qid = int(qid)
    if not isinstance(qid, int) or isinstance(qid, bool):
        raise InputError(f"{where}: question_id {qid!r} is not an integer; the official VQA "
                         "results format has integer question ids")
    if not isinstance(obj["question"], str) or not obj["question"].strip():
        raise InputError(f"{where}: question {obj['question']!r} is not a non-empty string")
    return Question(int(qid), str(obj["image_id"]), obj["question"])


def load_questions(path: str | os.PathLike) -> list[Question]:
    """Questions from a VQA v2 questions JSON or a JSON-lines file, sorted by question id.

    Raises:
        InputError: a missing or unreadable file, a question without its fields, a
            non-integer or repeated question id.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--questions {path}: no such file; expected a VQA v2 questions JSON "
                         "or JSON lines of {question_id, image_id, question}")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict) and "questions" not in data and "question_id" in data:
        data = None  # JSON lines of a single question
    if isinstance(data, dict):
        if not isinstance(data.get("questions"), list):
            raise InputError(f"{p}: a JSON object without a 'questions' list; expected VQA v2's "
                             "questions file or JSON lines of {question_id, image_id, question}")
        qs = [parse_question(q, f"{p}: questions[{k}]") for k, q in enumerate(data["questions"])]
    elif isinstance(data, list):
        raise InputError(f"{p}: a JSON list; expected VQA v2's questions file "
                         "({\"questions\": [...]}) or JSON lines, one question object a line")
    else:
        qs = []
        for ln, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{p}:{ln}: not a JSON object ({e.msg}); expected one "
                                 "{question_id, image_id, question} object a line") from None
            qs.append(parse_question(obj, f"{p}:{ln}"))
    if not qs:
        raise InputError(f"{p} holds no questions")
    qs.sort(key=lambda q: q.question_id)
    dups = sorted({a.question_id for a, b in zip(qs, qs[1:]) if a.question_id == b.question_id})
    if dups:
        raise InputError(f"{p}: question id(s) {dups[:5]} occur more than once; ids must be "
                         "unique")
    return qs


def match_questions(questions: Sequence[Question], image_ids: Sequence[str],
                    where: str = "--images") -> None:
    """Refuse questions about images the source does not list (before any work).

    Raises:
        InputError: naming the first missing images and what the source's ids look like.
    """
    known = set(image_ids)
    missing = sorted({q.image_id for q in questions if q.image_id not in known})
    if missing:
        n = sum(q.image_id not in known for q in questions)
        example = sorted(known)[:3]
        raise InputError(
            f"{n} question(s) are about {len(missing)} image(s) that {where} does not list "
            f"(image_id {', '.join(repr(m) for m in missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}); its ids look like {example}. Image ids "
            "follow the image source's rules: a COCO JSON gives str(id), a folder the file names "
            "without extension; pass the image list the questions were written for")


def image_records(images: Any, image_root: str | os.PathLike | None = None
                  ) -> tuple[list[ImageRecord | InMemoryImage], ImageSource | None]:
    """The Python API's images as records, in the order results come back.

    Args:
        images: a folder, list file or COCO/Karpathy JSON (records sorted by id); a list of file
            paths (id: the path as written without its extension); or a list of PIL images /
            (H, W, 3) uint8 arrays (ids by position).
        image_root: as for ``vlkd-extract --image-root``.

    Returns:
        The records, and the image source when ``images`` named one.
    """
    if isinstance(images, (str, os.PathLike)):
        source = open_image_source(images, image_root)
        return list(source.records), source
    if not isinstance(images, (list, tuple)):
        images = [images]
    out: list[ImageRecord | InMemoryImage] = []
    for k, im in enumerate(images):
        if isinstance(im, (str, os.PathLike)):
            rel = str(im)
            root, ext = os.path.splitext(rel)
            path = Path(image_root) / rel if image_root is not None else Path(rel)
            out.append(ImageRecord(root if ext else rel, str(path)))
        else:
            out.append(InMemoryImage(str(k), _rgb(im, k)))
    ids = [r.image_id for r in out]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise InputError(f"image id(s) {dup[:5]} occur more than once in the list; ids must be "
                         "unique")
    return out, None


def _rgb(im: Any, k: int) -> np.ndarray:
    if isinstance(im, Image.Image):
        return to_rgb_array(im)
    a = np.asarray(im)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise InputError(f"image {k}: expected a PIL image or an (H, W, 3) uint8 RGB array, found "
                         f"{type(im).__name__} {getattr(a, 'shape', '')} {a.dtype}")
    return np.ascontiguousarray(a)
