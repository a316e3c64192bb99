"""The box-geometry columns Oscar/VinVL append to region features (2048 + 6, or + 4).

Oscar's readers never look inside a feature vector: ``run_captioning.py``, ``run_vqa.py`` and
``run_retrieval.py`` decode it whole and feed ``--img_feature_dim 2054`` values per region to
the model (microsoft/Oscar). The meaning of the last columns therefore comes from the code that
*wrote* them, which neither Oscar nor scene_graph_benchmark contains (SGB writes 2048-d
``feature`` values per box into ``predictions.tsv``, ``maskrcnn_benchmark/engine/inference.py``).
The code that did is quoted in microsoft/Oscar issue #33 (a patch to BUTD's
``tools/generate_tsv.py`` given there to "create the exact format of feature.tsv"; the same
formula recurs in third-party feature writers). It computes, in float32, from ``x1 y1 x2 y2``
boxes in original-image pixels and the image width ``w`` and height ``h``::

    sx, sy = x1 / w, y1 / h
    sw, sh = (x2 - x1) / w, (y2 - y1) / h
    geometry = [sx, sy, sx + sw, sy + sh, sw, sh]        # 6 columns -> 2054

(note ``sx + sw`` rather than ``x2 / w``: equal up to float rounding). The 4-column variant
(2052, Oscar issue #23: "top left and bottom right corners") is the first four. There is no +1
in the widths (maskrcnn-benchmark's ``TO_REMOVE`` convention is not applied).

Functions: :func:`make_geometry` (boxes and image size -> columns, the writers' formula),
:func:`split_geometry`, :func:`check_geometry` (columns against boxes and image size, with a
tolerance for float rounding), :func:`boxes_from_geometry` (columns and image size -> boxes,
when a label row is missing or disagrees), :func:`estimate_image_hw` (the image size that
makes columns and boxes agree) and :func:`detect_geometry`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["GEOMETRY_NAMES", "GeometryCheck", "boxes_from_geometry", "check_geometry",
           "default_atol", "detect_geometry", "estimate_image_hw", "make_geometry",
           "split_geometry"]

GEOMETRY_NAMES = ("x1/w", "y1/h", "x2/w", "y2/h", "box_w/w", "box_h/h")


def default_atol(dtype) -> float:
    """Tolerance (normalised units) for comparing geometry stored as ``dtype``: float16 keeps
    ~3 decimal digits (spacing 2**-10 just below 1.0), float32 far more than any box needs."""
    return 2e-3 if np.dtype(dtype) == np.float16 else 1e-4


def _columns_ok(columns: int) -> None:
    if columns not in (4, 6):
        raise ValueError(f"geometry has 4 or 6 columns, not {columns}")


def make_geometry(boxes: np.ndarray, image_hw: tuple[int, int], columns: int = 6) -> np.ndarray:
    """The geometry columns of ``boxes`` ``(n, 4)`` in an image of ``(h, w)``: ``(n, columns)``
    float32, computed in float32 as the feature.tsv writers did (module docstring)."""
    _columns_ok(columns)
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    h, w = (np.float32(v) for v in image_hw)
    sx, sy = b[:, 0] / w, b[:, 1] / h
    sw, sh = (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h
    return np.stack([sx, sy, sx + sw, sy + sh, sw, sh][:columns], axis=1)


def split_geometry(matrix: np.ndarray, columns: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``(features, geometry)`` views of a ``(n, D)`` feature matrix whose last ``columns``
    values are geometry (``columns == 0``: no geometry, ``(matrix, None)``)."""
    if columns == 0:
        return matrix, None
    _columns_ok(columns)
    if matrix.shape[1] < columns:
        raise ValueError(f"a {matrix.shape[1]}-wide feature row has no {columns} geometry "
                         "columns")
    return matrix[:, :-columns], matrix[:, -columns:]


@dataclass(frozen=True)
class GeometryCheck:
    """How far stored geometry columns are from the ones boxes and an image size give.

    Attributes:
        ok: every value within ``atol``.
        max_error: the largest absolute difference (normalised units; 0 for no boxes).
        box: the region with the largest difference (None for no boxes).
        column: its column name (``GEOMETRY_NAMES``).
        atol: the tolerance used.
    """
    ok: bool
    max_error: float
    box: int | None
    column: str | None
    atol: float

    def __str__(self) -> str:
        if self.box is None:
            return "no boxes to compare"
        return (f"geometry {'agrees' if self.ok else 'differs'}: largest difference "
                f"{self.max_error:.3g} (tolerance {self.atol:.3g}) at box {self.box}, "
                f"column {self.column}")


def check_geometry(geometry: np.ndarray, boxes: np.ndarray, image_hw: tuple[int, int], *,
                   atol: float | None = None) -> GeometryCheck:
    """Compare stored geometry ``(n, 4|6)`` with boxes ``(n, 4)`` in an ``(h, w)`` image.

    The expected values are computed in float64 (``x2 / w`` and ``sx + sw`` differ only by
    rounding, well inside the tolerance). ``atol`` defaults to :func:`default_atol` of the
    stored dtype. Shapes must match (a count mismatch is the caller's to report).
    """
    columns = geometry.shape[1]
    _columns_ok(columns)
    if atol is None:
        atol = default_atol(geometry.dtype)
    if len(geometry) != len(boxes):
        raise ValueError(f"{len(geometry)} geometry rows for {len(boxes)} boxes")
    if len(boxes) == 0:
        return GeometryCheck(True, 0.0, None, None, atol)
    b = np.asarray(boxes, dtype=np.float64)
    h, w = float(image_hw[0]), float(image_hw[1])
    expected = np.stack([b[:, 0] / w, b[:, 1] / h, b[:, 2] / w, b[:, 3] / h,
                         (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h][:columns], axis=1)
    err = np.abs(geometry.astype(np.float64) - expected)
    err[~np.isfinite(err)] = np.inf
    flat = int(np.argmax(err))
    box, col = divmod(flat, columns)
    worst = float(err.flat[flat])
    return GeometryCheck(worst <= atol, worst, box, GEOMETRY_NAMES[col], atol)


def boxes_from_geometry(geometry: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """Boxes ``(n, 4)`` float32 ``x1 y1 x2 y2`` in pixels from geometry columns and the image
    ``(h, w)`` (from the first four columns; exact up to the columns' rounding)."""
    _columns_ok(geometry.shape[1])
    h, w = float(image_hw[0]), float(image_hw[1])
    g = geometry[:, :4].astype(np.float64)
    return (g * np.array([w, h, w, h])).astype(np.float32)


def estimate_image_hw(geometry: np.ndarray, boxes: np.ndarray, *,
                      atol: float | None = None) -> tuple[int, int] | None:
    """The integer ``(h, w)`` under which ``geometry`` and ``boxes`` agree, or None.

    Uses the box reaching furthest right (``w = x2 / (x2/w)``) and down (``h = y2 / (y2/h)``)
    for precision, rounds, and accepts the size only if :func:`check_geometry` then passes for
    every box.
    """
    if len(boxes) == 0 or len(geometry) != len(boxes):
        return None
    b = np.asarray(boxes, dtype=np.float64)
    g = geometry.astype(np.float64)
    i, j = int(np.argmax(b[:, 2])), int(np.argmax(b[:, 3]))
    if not (g[i, 2] > 0 and g[j, 3] > 0):
        return None
    with np.errstate(all="ignore"):
        w, h = b[i, 2] / g[i, 2], b[j, 3] / g[j, 3]
    if not (np.isfinite(w) and np.isfinite(h)) or w < 0.5 or h < 0.5:
        return None
    hw = (int(round(h)), int(round(w)))
    return hw if check_geometry(geometry, boxes, hw, atol=atol).ok else None


def detect_geometry(matrix: np.ndarray, *, atol: float | None = None) -> int:
    """6 when the last six columns of ``(n, D)`` behave as geometry for every row (all within
    [0, 1], ``x2/w - x1/w == box_w/w`` and ``y2/h - y1/h == box_h/h``), else 0.

    Region features do not satisfy these two identities by chance, so this is safe on real
    rows; the 4-column variant has no such identity and is never guessed from content.
    """
    n, d = matrix.shape
    if n == 0 or d < 7:
        return 0
    if atol is None:
        atol = default_atol(matrix.dtype)
    g = matrix[:, -6:].astype(np.float64)
    if not np.isfinite(g).all() or g.min() < -atol or g.max() > 1 + atol:
        return 0
    dw = np.abs(g[:, 2] - g[:, 0] - g[:, 4])
    dh = np.abs(g[:, 3] - g[:, 1] - g[:, 5])
    return 6 if max(dw.max(), dh.max()) <= atol else 0
