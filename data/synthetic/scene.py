"""The scene model and renderer: what an image of the synthetic world contains and how its
pixels are drawn.

Scenes are flat-coloured shapes (circle, square, triangle, star, diamond, cross) in six colours
and three sizes, 1-5 per image, on a noisy low-saturation background with clutter (thin lines,
dots, faint patches), with occlusion (every object keeps at least half of its pixels visible).
Image sides are drawn independently in ``[min_size, max_size]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLORS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 215),
          "yellow": (235, 210, 40), "purple": (140, 55, 190), "orange": (245, 135, 25)}
SIZES = ("small", "medium", "large")
# Radius of an object's bounding circle as a fraction of the image's shorter side.
SIZE_RADIUS = {"small": (0.09, 0.12), "medium": (0.12, 0.16), "large": (0.16, 0.22)}
MIN_VISIBLE = 0.5          # an object keeps at least this fraction of its pixels visible


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
