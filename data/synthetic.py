"""A synthetic vision-language world in which every stage of vlkd runs for real and can be judged.

Scenes are flat-coloured shapes (circle, square, triangle, star, diamond, cross) in six colours
and three sizes, 1-5 per image, on a noisy low-saturation background with clutter (thin lines,
dots, faint patches), with occlusion (every object keeps at least half of its pixels visible).
Image sides are drawn independently in ``[min_size, max_size]``.

For each split the generator writes, under ``out_dir``::

    images/{split}/{image_id}.png                          the images
    annotations/instances_{split}.json                     COCO instances (detector training)
    annotations/captions_{split}.json                      COCO captions, 5 per image
    annotations/dataset_coco.json                          Karpathy-style split file (all splits)
    annotations/v2_OpenEnded_synthetic_{split}_questions.json   VQA v2 questions
    annotations/v2_synthetic_{split}_annotations.json      VQA v2 annotations, 10 answers each
    annotations/scenes_{split}.json                        the scene metadata the rest derives from
    synthetic_info.json                                    parameters, counts, vocabulary

Image ids are integers in every JSON (``1_000_000 + i`` for train, ``2_000_000 + i`` for val,
``3_000_000 + i`` for test) and the file of image ``k`` is ``{k}.png``, so every image source
(COCO JSON, Karpathy JSON, folder) and every annotation reader agree on the key ``str(k)``.

Everything is a function of ``(seed, split, index)``: image ``i`` of a split is drawn from its own
``numpy.random.Generator``, so the same seed gives the same bytes, and the val/test images do not
change when ``num_train`` does. The grammar of captions and questions is in docs/SYNTHETIC.md.

Run ``python -m vlkd.data.synthetic --out DIR --num-train 800 --num-val 200 --num-test 200``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "diamond": "diamonds", "cross": "crosses"}
COLORS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 215),
          "yellow": (235, 210, 40), "purple": (140, 55, 190), "orange": (245, 135, 25)}
SIZES = ("small", "medium", "large")
# Radius of an object's bounding circle as a fraction of the image's shorter side.
SIZE_RADIUS = {"small": (0.09, 0.12), "medium": (0.12, 0.16), "large": (0.16, 0.22)}
SPLITS = ("train", "val", "test")
SPLIT_ID_BASE = {"train": 1_000_000, "val": 2_000_000, "test": 3_000_000}
_SPLIT_CODE = {"train": 1, "val": 2, "test": 3}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
MIN_VISIBLE = 0.5          # an object keeps at least this fraction of its pixels visible
CAPTIONS_PER_IMAGE = 5
QUESTIONS_PER_IMAGE = 5
ANSWERS_PER_QUESTION = 10
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------- scene model

@dataclass
class SceneObject:
    """One drawn object. ``bbox``/``area`` describe its *visible* pixels (as COCO boxes do).

    Attributes:
        shape, color, size: its words (``size`` in ``small``/``medium``/``large``).
        rgb: the exact fill colour (the palette colour with a small per-object jitter).
        center: (x, y) of the drawn shape, pixels.
        radius: radius of its bounding circle, pixels.
        angle: rotation, degrees.
        bbox: [x, y, w, h] of the visible pixels (COCO convention: pixel i covers [i, i+1)).
        area: number of visible pixels.
        full_area: number of pixels of the whole shape.
        z: drawing order (higher is in front).
        occluded_by: indices of the objects that cover part of it.
    """

    shape: str
    color: str
    size: str
    rgb: list[int]
    center: list[float]
    radius: float
    angle: float
    bbox: list[int] = field(default_factory=list)
    area: int = 0
    full_area: int = 0
    z: int = 0
    occluded_by: list[int] = field(default_factory=list)


@dataclass
class Scene:
    """Metadata of one image: what the annotations are derived from."""

    image_id: int
    split: str
    width: int
    height: int
    background: str                 # "dark", "grey" or "light"
    objects: list[SceneObject]
    captions: list[str] = field(default_factory=list)
    questions: list[dict] = field(default_factory=list)

    @property
    def file_name(self) -> str:
        return f"{self.image_id}.png"


def shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float
                  ) -> list[tuple[float, float]] | None:
    """Vertices of a shape inscribed in the circle (cx, cy, r), rotated by ``angle`` degrees.
    Returns None for the circle (drawn as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        s = r * 0.72                       # half side; area close to the circle's
        pts = [(x * s, y * s) for x, y in pts]
    elif shape == "diamond":               # a rhombus, taller than wide
        pts = [(0, -r), (0.62 * r, 0), (0, r), (-0.62 * r, 0)]
    elif shape == "triangle":              # equilateral, pointing up
        pts = [(r * np.cos(np.radians(a)), r * np.sin(np.radians(a))) for a in (-90, 30, 150)]
    elif shape == "star":
        pts = []
        for k in range(10):
            rr = r if k % 2 == 0 else 0.45 * r
            a = np.radians(-90 + 36 * k)
            pts.append((rr * np.cos(a), rr * np.sin(a)))
    elif shape == "cross":
        a, b = 0.33 * r, 0.95 * r          # half arm width, arm reach
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b),
               (-a, a), (-b, a), (-b, -a), (-a, -a)]
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    c, s_ = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    return [(cx + x * c - y * s_, cy + x * s_ + y * c) for x, y in pts]


def shape_mask(shape: str, cx: float, cy: float, r: float, angle: float,
               width: int, height: int) -> np.ndarray:
    """(height, width) bool mask of one shape, drawn without anti-aliasing."""
    im = Image.new("L", (width, height), 0)
    d = ImageDraw.Draw(im)
    poly = shape_polygon(shape, cx, cy, r, angle)
    if poly is None:
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        d.polygon(poly, fill=255)
    return np.asarray(im) > 0


def _background(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, str]:
    """Low-saturation noisy gradient with clutter; objects are saturated, the clutter is not."""
    level = rng.uniform(60, 200)
    tint = rng.uniform(-12, 12, size=3)
    base = level + tint
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    direction = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(direction) * gx / w + np.sin(direction) * gy / h) * rng.uniform(-30, 30)
    img = base[None, None, :] + ramp[:, :, None] + rng.normal(0, 6, size=(h, w, 3))
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(canvas)

    def grey() -> tuple[int, int, int]:
        g = float(np.clip(level + rng.uniform(-70, 70), 0, 255))
        return tuple(int(np.clip(g + rng.uniform(-10, 10), 0, 255)) for _ in range(3))

    for _ in range(int(rng.integers(0, 3))):           # faint patches
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        pw, ph = rng.uniform(0.1, 0.4) * w, rng.uniform(0.1, 0.4) * h
        g = float(np.clip(level + rng.uniform(-18, 18), 0, 255))
        d.rectangle([x0, y0, x0 + pw, y0 + ph], fill=(int(g), int(g), int(g)))
    for _ in range(int(rng.integers(2, 10))):          # thin lines
        p = rng.uniform(0, 1, size=4) * [w, h, w, h]
        d.line(list(map(float, p)), fill=grey(), width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(0, 16))):          # dots
        x, y, rr = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.8, 2.5)
        d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=grey())
    word = "dark" if level < 100 else "light" if level > 160 else "grey"
    return np.asarray(canvas).copy(), word


def _bbox_of(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0]


def render_scene(rng: np.random.Generator, image_id: int, split: str, min_size: int,
                 max_size: int) -> tuple[np.ndarray, Scene]:
    """Draw one image and return (H, W, 3) uint8 RGB pixels and its scene metadata."""
    w, h = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    img, bg_word = _background(rng, w, h)
    short = min(w, h)
    wanted = int(rng.integers(1, 6))
    objs: list[SceneObject] = []
    full: list[np.ndarray] = []
    visible: list[np.ndarray] = []
    for _ in range(wanted):
        for _attempt in range(40):
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            color = list(COLORS)[int(rng.integers(len(COLORS)))]
            size = SIZES[int(rng.integers(len(SIZES)))]
            r = float(rng.uniform(*SIZE_RADIUS[size]) * short)
            r = max(r, 5.0)                       # keep shapes recognisable in 64 px images
            cx = float(rng.uniform(r + 1, w - r - 1))
            cy = float(rng.uniform(r + 1, h - r - 1))
            angle = float(rng.uniform(-15, 15)) if shape != "circle" else 0.0
            m = shape_mask(shape, cx, cy, r, angle, w, h)
            if m.sum() < 16:
                continue
            # The new object goes on top: every earlier one must stay at least half visible.
            if any((v & ~m).sum() < MIN_VISIBLE * f.sum() for v, f in zip(visible, full)):
                continue
            jitter = rng.integers(-12, 13, size=3)
            rgb = [int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[color], jitter)]
            for i, v in enumerate(visible):
                if (v & m).any():
                    objs[i].occluded_by.append(len(objs))
                visible[i] = v & ~m
            objs.append(SceneObject(shape, color, size, rgb, [round(cx, 2), round(cy, 2)],
                                    round(r, 2), round(angle, 2), z=len(objs)))
            full.append(m)
            visible.append(m.copy())
            break
    for o, m, v in zip(objs, full, visible):
        img[m] = o.rgb        # z order: later objects overwrite earlier ones
        o.bbox, o.area, o.full_area = _bbox_of(v), int(v.sum()), int(m.sum())
    return img, Scene(image_id, split, w, h, bg_word, objs)


# ----------------------------------------------------------------------------- the grammar

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _np(o: SceneObject, *, size: bool = False, color: bool = True, article: bool = True,
        size_word: str | None = None) -> str:
    """Noun phrase of one object: ``a small red circle``."""
    words = []
    if size and o.size != "medium":
        words.append(size_word or o.size)
    if color:
        words.append(o.color)
    words.append(o.shape)
    phrase = " ".join(words)
    return f"{_article(phrase)} {phrase}" if article else phrase


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _count_np(n: int, noun_singular: str, noun_plural: str, adj: str = "") -> str:
    pre = f"{adj} " if adj else ""
    if n == 1:
        phrase = f"{pre}{noun_singular}"
        return f"{_article(phrase)} {phrase}"
    return f"{NUMBER_WORDS[n]} {pre}{noun_plural}"


def relation(a: SceneObject, b: SceneObject, short_side: int) -> str | None:
    """Where ``a`` is relative to ``b``: ``to the left of``, ``to the right of``, ``above``,
    ``below``, or None when the centres are too close or too diagonal to say."""
    dx = a.center[0] - b.center[0]
    dy = a.center[1] - b.center[1]
    big, small = max(abs(dx), abs(dy)), min(abs(dx), abs(dy))
    if big < 0.12 * short_side or big < 1.5 * small:
        return None
    if abs(dx) > abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of",
            "above": "below", "below": "above"}


def _location(o: SceneObject, w: int, h: int) -> str:
    col = 0 if o.center[0] < w / 3 else 2 if o.center[0] > 2 * w / 3 else 1
    row = 0 if o.center[1] < h / 3 else 2 if o.center[1] > 2 * h / 3 else 1
    return {(0, 0): "in the top left corner", (0, 1): "at the top", (0, 2): "in the top right "
            "corner", (1, 0): "on the left", (1, 1): "in the middle", (1, 2): "on the right",
            (2, 0): "in the bottom left corner", (2, 1): "at the bottom",
            (2, 2): "in the bottom right corner"}[(row, col)]


def _unique(scene: Scene, o: SceneObject) -> bool:
    """True when ``o`` is the only object of its colour and shape (``the red circle``)."""
    return sum(1 for p in scene.objects if (p.color, p.shape) == (o.color, o.shape)) == 1


def _grouped(objs: list[SceneObject], by_color: bool = True) -> list[str]:
    """Group identical descriptions: ``two red circles``, ``a blue square``."""
    counts: dict[tuple[str, str], int] = {}
    for o in objs:
        key = (o.color if by_color else "", o.shape)
        counts[key] = counts.get(key, 0) + 1
    return [_count_np(n, s, PLURALS[s], c) for (c, s), n in counts.items()]


def make_captions(scene: Scene, rng: np.random.Generator, k: int = CAPTIONS_PER_IMAGE
                  ) -> list[str]:
    """``k`` distinct captions, each true of the scene (see docs/SYNTHETIC.md for the grammar)."""
    objs = scene.objects
    n = len(objs)
    short = min(scene.width, scene.height)
    by_size = sorted(objs, key=lambda o: -o.full_area)
    pairs = [(a, b, relation(a, b, short)) for a in objs for b in objs if a is not b]
    pairs = [(a, b, r) for a, b, r in pairs if r is not None and _unique(scene, a)
             and _unique(scene, b)]
    occl = [(a, objs[j]) for a in objs for j in a.occluded_by]
    thing = ["shape", "object"][int(rng.integers(2))]

    def t_list():
        items = [_np(o, size=bool(rng.integers(2))) for o in objs]
        tail = ["", f" on a {scene.background} background"][int(rng.integers(2))]
        return _join(items) + tail

    def t_count():
        if n == 1:
            return [f"a single {_np(objs[0], article=False)}",
                    f"one {objs[0].color} {thing} in the picture"][int(rng.integers(2))]
        opts = [f"{NUMBER_WORDS[n]} {thing}s: {_join(_grouped(objs))}",
                f"there are {NUMBER_WORDS[n]} {thing}s in the image",
                f"{NUMBER_WORDS[n]} colorful {thing}s on a {scene.background} background"]
        return opts[int(rng.integers(len(opts)))]

    def t_shapes():
        return _join(_grouped(objs, by_color=False)) + ["", " of different colors"][
            int(n > 1 and len({o.color for o in objs}) == n)]

    def t_relation():
        if not pairs:
            return None
        a, b, r = pairs[int(rng.integers(len(pairs)))]
        return f"{_np(a, size=bool(rng.integers(2)))} {r} {_np(b)}"

    def t_occlusion():
        if not occl:
            return None
        back, front = occl[int(rng.integers(len(occl)))]
        # Name the two apart: with the size word when colour and shape are not enough.
        same = (back.color, back.shape) == (front.color, front.shape)
        if same and back.size == front.size:
            return None
        b, f = _np(back, size=same), _np(front, size=same)
        if bool(rng.integers(2)):
            return f"{b} partly hidden behind {f}"
        return f"{f} in front of {b}"

    def t_largest():
        big = by_size[0]
        word = ["large", "big"][int(rng.integers(2))]
        if n == 1:
            return f"a picture of {_np(big, size=True, size_word=word)}"
        if n > 1 and big.full_area < 1.3 * by_size[1].full_area:
            return None                     # no clear largest object
        others = n - 1
        rest = "another shape" if others == 1 else f"{NUMBER_WORDS[others]} other shapes"
        phrase = f"{word} {big.color} {big.shape}"
        return f"{_article(phrase)} {phrase} with {rest}"

    def t_location():
        o = objs[int(rng.integers(n))]
        if n > 1 and not _unique(scene, o):
            return None
        return f"{_np(o)} {_location(o, scene.width, scene.height)}"

    templates = [t_list, t_count, t_shapes, t_relation, t_occlusion, t_largest, t_location]
    out: list[str] = []
    for _ in range(60):
        t = templates[int(rng.integers(len(templates)))]
        c = t()
        if c is not None and c not in out:
            out.append(c)
            if len(out) == k:
                break
    listed = _join([_np(o) for o in objs])
    frames = [f"an image of {listed}", f"a picture showing {listed}", f"{listed} in a picture",
              f"a simple drawing of {listed}", f"{listed} drawn on a {scene.background} canvas"]
    for c in frames:                         # tiny scenes: vary the wording of the list
        if len(out) == k:
            break
        if c not in out:
            out.append(c)
    return out


def _variant(answer: str, kind: str, rng: np.random.Generator) -> str:
    """A correct answer as a person might type it (the official normaliser maps it back)."""
    u = rng.random()
    if kind == "number" and u < 0.25:
        return NUMBER_WORDS[int(answer)]
    if u < 0.1:
        return answer.capitalize()
    if kind == "shape" and u < 0.2:
        return f"{_article(answer)} {answer}"
    return answer


def _wrong(answer: str, kind: str, rng: np.random.Generator) -> str:
    if kind == "number":
        v = int(answer) + (1 if answer == "0" or rng.random() < 0.5 else -1)
        return str(v)
    if kind == "yes/no":
        return "no" if answer == "yes" else "yes"
    pool = [c for c in (COLORS if kind == "color" else SHAPES) if c != answer]
    return pool[int(rng.integers(len(pool)))]


def human_answers(answer: str, kind: str, rng: np.random.Generator,
                  k: int = ANSWERS_PER_QUESTION) -> list[str]:
    """``k`` answers to a question whose true answer is ``answer``: mostly right (sometimes
    typed differently), up to 4 wrong, so the true answer always has the most votes."""
    n_wrong = int(rng.choice(5, p=[0.35, 0.3, 0.2, 0.1, 0.05]))
    wrong_at = set(rng.choice(k, size=n_wrong, replace=False).tolist())
    return [_wrong(answer, kind, rng) if i in wrong_at else _variant(answer, kind, rng)
            for i in range(k)]


def make_questions(scene: Scene, rng: np.random.Generator, k: int = QUESTIONS_PER_IMAGE
                   ) -> list[dict]:
    """Up to ``k`` distinct questions with their true answer.

    Returns:
        Dicts with ``question``, ``answer``, ``kind`` (number, color, shape, yes/no),
        ``answer_type`` (VQA's number / other / yes/no) and ``question_type``.
    """
    objs = scene.objects
    short = min(scene.width, scene.height)
    colors_present = sorted({o.color for o in objs})
    shapes_present = sorted({o.shape for o in objs})
    thing = ["shapes", "objects"][int(rng.integers(2))]

    def q(question, answer, kind, qtype):
        atype = {"number": "number", "yes/no": "yes/no"}.get(kind, "other")
        return {"question": question, "answer": answer, "kind": kind, "answer_type": atype,
                "question_type": qtype}

    def q_count_all():
        return q(f"how many {thing} are there?", str(len(objs)), "number", "how many")

    def q_count_color():
        c = (colors_present[int(rng.integers(len(colors_present)))] if rng.random() < 0.75
             else list(COLORS)[int(rng.integers(len(COLORS)))])
        return q(f"how many {c} {thing} are there?", str(sum(o.color == c for o in objs)),
                 "number", "how many")

    def q_count_shape():
        s = (shapes_present[int(rng.integers(len(shapes_present)))] if rng.random() < 0.75
             else SHAPES[int(rng.integers(len(SHAPES)))])
        return q(f"how many {PLURALS[s]} are in the picture?",
                 str(sum(o.shape == s for o in objs)), "number", "how many")

    def q_color():
        uniq = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
        if not uniq:
            return None
        o = uniq[int(rng.integers(len(uniq)))]
        return q(f"what color is the {o.shape}?", o.color, "color", "what color is the")

    def q_shape():
        uniq = [o for o in objs if sum(p.color == o.color for p in objs) == 1]
        if not uniq:
            return None
        o = uniq[int(rng.integers(len(uniq)))]
        return q(f"what shape is the {o.color} object?", o.shape, "shape", "what shape is the")

    def q_exists():
        if rng.random() < 0.5:
            o = objs[int(rng.integers(len(objs)))]
            c, s = o.color, o.shape
        else:
            c = list(COLORS)[int(rng.integers(len(COLORS)))]
            s = SHAPES[int(rng.integers(len(SHAPES)))]
        present = any((o.color, o.shape) == (c, s) for o in objs)
        return q(f"is there {_article(c)} {c} {s}?", "yes" if present else "no", "yes/no",
                 "is there a")

    def _pairs():
        return [(a, b, r) for a in objs for b in objs if a is not b
                and (r := relation(a, b, short)) is not None
                and _unique(scene, a) and _unique(scene, b)]

    def q_relation_yn():
        pairs = _pairs()
        if not pairs:
            return None
        a, b, r = pairs[int(rng.integers(len(pairs)))]
        truth = rng.random() < 0.5
        asked = r if truth else OPPOSITE[r]
        return q(f"is the {a.color} {a.shape} {asked} the {b.color} {b.shape}?",
                 "yes" if truth else "no", "yes/no", "is the")

    def q_relation_what():
        cands = []
        for b in objs:
            if not _unique(scene, b):
                continue
            for r in OPPOSITE:
                rel = [a for a in objs if a is not b and relation(a, b, short) == r]
                unclear = [a for a in objs if a is not b and relation(a, b, short) is None]
                if len(rel) == 1 and not unclear:
                    cands.append((rel[0], b, r))
        if not cands:
            return None
        a, b, r = cands[int(rng.integers(len(cands)))]
        return q(f"what shape is {r} the {b.color} {b.shape}?", a.shape, "shape",
                 "what shape is")

    makers = [q_count_all, q_count_color, q_count_shape, q_color, q_shape, q_exists,
              q_relation_yn, q_relation_what]
    out: list[dict] = []
    for _ in range(40):
        item = makers[int(rng.integers(len(makers)))]()
        if item is not None and item["question"] not in {x["question"] for x in out}:
            out.append(item)
            if len(out) == k:
                break
    return out


# ---------------------------------------------------------------------------------- writing

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlkd.data.synthetic",
                                 description="Generate the synthetic VL world (images, COCO "
                                             "instances and captions, Karpathy split, VQA v2).")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--num-train", type=int, default=800)
    ap.add_argument("--num-val", type=int, default=200)
    ap.add_argument("--num-test", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-size", type=int, default=64)
    ap.add_argument("--max-size", type=int, default=256)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    try:
        paths = generate(args.out, num_train=args.num_train, num_val=args.num_val,
                         num_test=args.num_test, seed=args.seed, min_size=args.min_size,
                         max_size=args.max_size)
    except ValueError as e:
        print(f"synthetic: {e}", file=sys.stderr)
        return 2
    print(json.dumps(paths, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
