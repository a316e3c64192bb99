"""The writers of Oscar/VinVL's TSV files (``feature.tsv``, ``label.tsv``, ``hw.tsv`` with
their ``.lineidx``): :class:`FeatureTsvWriter`, :class:`LabelTsvWriter`, :class:`HwTsvWriter`
and :class:`OscarTsvWriter`, the three together. What each layout is, and the Oscar source
every fact comes from, is in :mod:`vlkd.data.tsv.oscar` (the readers) and docs/TSV.md; both
modules' names are importable from :mod:`vlkd.data.tsv.oscar`.
"""
from __future__ import annotations

import binascii
import json
import os
from pathlib import Path

import numpy as np

from .geometry import make_geometry
from .records import FEATURE_DTYPES, empty_image
from .rows import Closing, RowFileWriter, TsvWriter

__all__ = ["FeatureTsvWriter", "HwTsvWriter", "LabelTsvWriter", "OscarTsvWriter"]


class FeatureTsvWriter(RowFileWriter):
    """Writes ``feature.tsv`` rows in one of Oscar's layouts (and the ``.lineidx``).

    Args:
        path: destination file.
        layout: ``"json"`` (``run_captioning.py``) or ``"columns"`` (``run_vqa.py``,
            ``run_retrieval.py``, pre-training).
        dtype: ``"float32"`` (what every Oscar reader decodes) or ``"float16"`` (half the
            size; read back by :class:`OscarTsv`, but Oscar itself would read it as float32).
        geometry: geometry columns appended to each region's features (6, 4 or 0), computed
            from the boxes and image size (:func:`~vlkd.data.tsv.geometry.make_geometry`).
        lineidx, offset_map, row_map: see :class:`~vlkd.data.tsv.rows.TsvWriter`.
        allow_empty: write images without regions. Off by default: ``run_captioning.py``
            and ``run_retrieval.py`` reshape to ``(num_boxes, -1)``, which numpy refuses for
            0 regions, so such a row would stop Oscar.
    """

    def __init__(self, path: str | os.PathLike, *, layout: str = "json",
                 dtype: str = "float32", geometry: int = 6, lineidx: bool = True,
                 offset_map: str | os.PathLike | None = None,
                 row_map: str | os.PathLike | None = None, allow_empty: bool = False):
        if layout not in ("json", "columns"):
            raise ValueError(f"layout must be 'json' or 'columns', not {layout!r}")
        if dtype not in FEATURE_DTYPES:
            raise ValueError(f"dtype must be 'float32' or 'float16', not {dtype!r}")
        if geometry not in (0, 4, 6):
            raise ValueError(f"geometry must be 0, 4 or 6, not {geometry!r}")
        self.layout, self.dtype, self.geometry = layout, FEATURE_DTYPES[dtype], geometry
        self.allow_empty = allow_empty
        self.dim: int | None = None
        self._tsv = TsvWriter(path, lineidx=lineidx, offset_map=offset_map, row_map=row_map)

    def write(self, image_id: str, features: np.ndarray, *, boxes: np.ndarray | None = None,
              image_hw: tuple[int, int] | None = None,
              geometry: np.ndarray | None = None) -> int:
        """One image's row; returns its row number.

        Args:
            features: ``(n, D)`` region features (any float dtype; cast to the file's).
            boxes, image_hw: ``(n, 4)`` pixel boxes and ``(h, w)``, to compute the geometry
                columns (unless ``geometry`` gives them, ``(n, columns)``).
        """
        feats = np.asarray(features)
        if feats.ndim != 2:
            raise ValueError(f"{image_id!r}: features must be (n, D), not {feats.shape}")
        n, d = feats.shape
        if n == 0 and not self.allow_empty:
            raise empty_image(image_id)
        if self.dim is None:
            self.dim = d
        elif d != self.dim:
            raise ValueError(f"{image_id!r}: {d} feature values per region; this file's "
                             f"rows have {self.dim}")
        row = np.empty((n, d + self.geometry), self.dtype)     # (n, D + columns)
        row[:, :d] = feats
        if self.geometry:
            if geometry is None:
                if boxes is None or image_hw is None:
                    raise ValueError(f"{image_id!r}: geometry columns need boxes and image_hw")
                geometry = make_geometry(boxes, image_hw, self.geometry)
            if np.shape(geometry) != (n, self.geometry):
                raise ValueError(f"{image_id!r}: geometry must be ({n}, {self.geometry}), "
                                 f"not {np.shape(geometry)}")
            row[:, d:] = geometry
        b64 = binascii.b2a_base64(row, newline=False)
        if self.layout == "json":
            fields = [(b'{"num_boxes": %d, "features": "' % n, b64, b'"}')]
        else:
            fields = [b"%d" % n, b64]
        return self._tsv.write_row(image_id, fields)


class LabelTsvWriter(RowFileWriter):
    """Writes ``label.tsv`` rows: ``key<TAB>[{"rect", "bbox_id", "class", "conf"}, ...]``,
    keys in SGB's order (``convert_predictions_to_tsv``), plus ``attributes`` /
    ``attr_scores`` when given; values are exact (float32 written as its float64 value)."""

    def __init__(self, path: str | os.PathLike, *, lineidx: bool = True):
        self._tsv = TsvWriter(path, lineidx=lineidx)

    def write(self, image_id: str, boxes: np.ndarray, class_names: list[str], *,
              scores: np.ndarray | None = None, attr_names: list[list[str]] | None = None,
              attr_scores: np.ndarray | None = None) -> int:
        b = np.asarray(boxes, np.float32).reshape(-1, 4)
        if len(class_names) != len(b) or (scores is not None and len(scores) != len(b)):
            raise ValueError(f"{image_id!r}: {len(b)} boxes, {len(class_names)} class names"
                             + ("" if scores is None else f", {len(scores)} scores"))
        objects = []
        for i, rect in enumerate(b.tolist()):
            obj = {"rect": rect, "bbox_id": i, "class": str(class_names[i])}
            if scores is not None:
                obj["conf"] = float(np.float32(scores[i]))
            if attr_names is not None:
                obj["attributes"] = list(attr_names[i])
                if attr_scores is not None:
                    vals = np.asarray(attr_scores[i], np.float32)[:len(attr_names[i])]
                    obj["attr_scores"] = [float(v) for v in vals]
            objects.append(obj)
        return self._tsv.write_row(image_id, [json.dumps(objects).encode("utf-8")])


class HwTsvWriter(RowFileWriter):
    """Writes ``hw.tsv`` rows: ``key<TAB>[{"height": H, "width": W}]`` (SGB's layout)."""

    def __init__(self, path: str | os.PathLike, *, lineidx: bool = True):
        self._tsv = TsvWriter(path, lineidx=lineidx)

    def write(self, image_id: str, image_hw: tuple[int, int]) -> int:
        h, w = (int(v) for v in image_hw)
        return self._tsv.write_row(
            image_id, [json.dumps([{"height": h, "width": w}]).encode("ascii")])


class OscarTsvWriter(Closing):
    """``{prefix}feature.tsv``, ``{prefix}label.tsv`` and ``{prefix}hw.tsv`` (each with its
    ``.lineidx``) for one split, one row per image in the same order in every file, so that
    ``run_captioning.py`` (which pairs feature and label rows by row number) reads them.

    Args:
        out_dir: destination folder.
        prefix: file name prefix, e.g. ``"train."`` for VinVL's ``train.feature.tsv``.
        dtype, geometry, layout, allow_empty: of the feature file (:class:`FeatureTsvWriter`).
        labels, hw: also write label.tsv / hw.tsv.

    All files are renamed into place together on :meth:`close` (or dropped on an exception
    inside a ``with`` block).
    """

    def __init__(self, out_dir: str | os.PathLike, *, prefix: str = "", dtype: str = "float32",
                 geometry: int = 6, layout: str = "json", labels: bool = True,
                 hw: bool = True, allow_empty: bool = False):
        out = Path(out_dir)
        self.paths = {"feature": out / f"{prefix}feature.tsv"}
        self._features = FeatureTsvWriter(self.paths["feature"], layout=layout, dtype=dtype,
                                          geometry=geometry, allow_empty=allow_empty)
        self._labels = self._hw = None
        if labels:
            self.paths["label"] = out / f"{prefix}label.tsv"
            self._labels = LabelTsvWriter(self.paths["label"])
        if hw:
            self.paths["hw"] = out / f"{prefix}hw.tsv"
            self._hw = HwTsvWriter(self.paths["hw"])

    def _writers(self):
        return [w for w in (self._features, self._labels, self._hw) if w is not None]

    def write(self, image_id: str, image_hw: tuple[int, int], boxes: np.ndarray,
              features: np.ndarray, class_names: list[str], *,
              scores: np.ndarray | None = None, attr_names: list[list[str]] | None = None,
              attr_scores: np.ndarray | None = None) -> int:
        """One image in every file; returns its row number. Everything is checked before
        the first file is written, so a refused image leaves the files aligned."""
        n = len(features)
        if n == 0 and not self._features.allow_empty:
            raise empty_image(image_id)
        if len(boxes) != n or len(class_names) != n or (scores is not None and
                                                        len(scores) != n):
            raise ValueError(
                f"{image_id!r}: {n} feature rows, {len(boxes)} boxes, {len(class_names)} "
                "class names" + ("" if scores is None else f", {len(scores)} scores"))
        if len(image_hw) != 2 or min(int(v) for v in image_hw) <= 0:
            raise ValueError(f"{image_id!r}: image_hw must be (height, width) > 0, "
                             f"not {image_hw!r}")
        if self._features.dim is not None and np.shape(features)[1:] != (self._features.dim,):
            raise ValueError(f"{image_id!r}: features {np.shape(features)}; this file's rows "
                             f"have {self._features.dim} values per region")
        row = self._features.write(image_id, features, boxes=boxes, image_hw=image_hw)
        if self._labels is not None:
            self._labels.write(image_id, boxes, class_names, scores=scores,
                               attr_names=attr_names, attr_scores=attr_scores)
        if self._hw is not None:
            self._hw.write(image_id, image_hw)
        return row

    def close(self) -> None:
        for w in self._writers():
            w.close()

    def abort(self) -> None:
        for w in self._writers():
            w.abort()
