"""Oscar / VinVL TSV files: ``feature.tsv``, ``label.tsv``, ``hw.tsv`` (read and write).

Layouts, as the reference code reads and writes them (microsoft/Oscar, microsoft/
scene_graph_benchmark; docs/TSV.md lists file by file):

- ``feature.tsv``, *json* layout (``oscar/run_captioning.py`` ``get_image_features``):
  ``key<TAB>{"num_boxes": N, "features": "<base64>"}``; the base64 holds ``N x D`` values,
  read by Oscar as float32 and reshaped to ``(num_boxes, -1)``. Nothing in the row or in
  Oscar's code says float16: a float16 file can only be told by its byte count (Oscar issue
  #94 reports 1027 "float32" values per box, i.e. 2054 float16).
- ``feature.tsv``, *columns* layout (``run_vqa.py`` ``get_img_feature``, ``run_retrieval.py``
  ``get_image``, ``datasets/oscar_tsv.py``): ``key<TAB>num_boxes<TAB><base64>``; ``run_vqa.py``
  finds rows through ``{name}_img_frcnn_feats_offset_map.json`` (key -> byte offset) and
  reshapes to ``(-1, img_feature_dim)``, the others through ``imageid2idx.json`` (key -> row).
- ``label.tsv``: ``key<TAB>[{"class": ..., "rect": [x1, y1, x2, y2], "conf": ...}, ...]``;
  Oscar uses only ``class`` (``get_od_labels``: the tags ``" ".join(classes)``). SGB's
  ``predictions.tsv`` rows are ``{"objects": [...], "relations": null}`` with ``rect``,
  ``bbox_id``, ``class``, ``conf`` and, when asked, ``attributes`` (names) and
  ``attr_scores`` (``maskrcnn_benchmark/engine/inference.py``); Oscar's retrieval and
  pre-training readers also accept ``{"objects": [...], "image_h": H, "image_w": W}``.
- ``hw.tsv``: ``key<TAB>[{"height": H, "width": W}]`` (SGB ``tsv_file_ops.generate_hw_file``);
  SGB's ``TSVDataset.get_img_info`` also accepts a bare object and ``"H W"``.

:class:`OscarTsv` reads them together (streaming in file order, or by row / image id), pairs
label and hw rows with feature rows by key (row for row while the keys match, through a key
index otherwise), splits and cross-checks the geometry columns (:mod:`.geometry`) and yields a
:class:`TsvImage` or a :class:`TsvFailure` per feature row. :class:`OscarTsvWriter` (and the
per-file :class:`FeatureTsvWriter`, :class:`LabelTsvWriter`, :class:`HwTsvWriter`, in
:mod:`.oscar_writers`) write them back, row-aligned as ``run_captioning.py`` needs (it pairs
feature and label rows by row number, with the keys of label.tsv).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .geometry import (boxes_from_geometry, check_geometry, default_atol, detect_geometry,
                       estimate_image_hw, split_geometry)
from .records import (FEATURE_DTYPES, RowError, TsvFailure, TsvFormatError, TsvImage,
                      decode_b64, open_row, parse_count, split_key)
from .rows import TsvRows

__all__ = ["FeatureLayout", "FeatureTsvWriter", "HwTsvWriter", "KNOWN_FEATURE_DIMS",
           "LabelTsvWriter", "OscarTsv", "OscarTsvWriter", "SgbPredictionsTsv",
           "oscar_vqa_paths"]

# Widths a feature row is recognised by when its dtype must be told from its byte count:
# 2048 region features + 6 or 4 geometry columns (Oscar's --img_feature_dim 2054), or none.
KNOWN_FEATURE_DIMS = (2054, 2052, 2048)
_PROBE_ROWS = 64
_FEATURES_VALUE = re.compile(rb'\s*:\s*"')


@dataclass(frozen=True)
class FeatureLayout:
    """How a feature.tsv file's rows are laid out (found from its first decodable row).

    Attributes:
        layout: ``"json"`` (``key, {"num_boxes", "features"}``) or ``"columns"``
            (``key, num_boxes, features``).
        dtype: the stored values' dtype (little-endian float32 or float16).
        dim: values per region in the file, geometry columns included (2054 for VinVL).
        geometry: how many of those are geometry columns (6, 4 or 0).
    """
    layout: str
    dtype: np.dtype
    dim: int
    geometry: int

    @property
    def region_dim(self) -> int:
        """Feature values per region without the geometry columns (2048 for VinVL)."""
        return self.dim - self.geometry


def oscar_vqa_paths(img_feat_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """The feature file and offset map ``run_vqa.py --img_feat_format tsv`` opens for split
    ``name`` (``train``, ``val``, ``test2015``...): ``{name}_img_frcnn_feats.tsv`` and
    ``{name}_img_frcnn_feats_offset_map.json`` in ``--img_feat_dir``."""
    folder = Path(img_feat_dir)
    return (folder / f"{name}_img_frcnn_feats.tsv",
            folder / f"{name}_img_frcnn_feats_offset_map.json")


# ---------------------------------------------------------------------------- row parsing

def _second_field(line: bytes, start: int, end: int, what: str) -> bytes:
    if start < 0:
        raise RowError(f"no tab after the image key: expected 'key<TAB>{what}'")
    nxt = line.find(b"\t", start, end)
    return line[start:end if nxt < 0 else nxt]


def _json(text, what: str):
    try:
        return json.loads(text)
    except ValueError as e:   # json.JSONDecodeError, or bytes that are not UTF-8
        raise RowError(f"{what} is not valid JSON ({e})") from None


def _feature_payload(line: bytes, start: int, end: int, layout: str):
    """``(num_boxes, base64)`` of a feature row's fields after the key."""
    if start < 0:
        raise RowError("no tab after the image key: a feature row is 'key<TAB>...'")
    if layout == "columns":
        t2 = line.find(b"\t", start, end)
        if t2 < 0:
            raise RowError("expected 3 fields (key, num_boxes, features), found 2")
        if line.find(b"\t", t2 + 1, end) >= 0:
            raise RowError("expected 3 fields (key, num_boxes, features), found more")
        return parse_count(line[start:t2].strip(), "num_boxes"), memoryview(line)[t2 + 1:end]
    nxt = line.find(b"\t", start, end)
    if nxt >= 0:   # Oscar reads field [1] only
        end = nxt
    # Fast path: cut the (large) base64 string out and parse only the small rest as JSON.
    j = line.find(b'"features"', start, end)
    m = _FEATURES_VALUE.match(line, j + 10, end) if j >= 0 else None
    if m is not None:
        s = m.end()
        e = line.find(b'"', s, end)
        if e >= 0 and line.find(b"\\", s, e) < 0:
            info = _json(line[start:s] + line[e:end], "the feature field")
            if isinstance(info, dict) and info.get("features") == "":
                return _num_boxes(info), memoryview(line)[s:e]
    info = _json(line[start:end], "the feature field")
    if not isinstance(info, dict):
        raise RowError(f"the feature field is JSON {type(info).__name__}, not an object with "
                       "'num_boxes' and 'features'")
    b64 = info.get("features")
    if not isinstance(b64, str):
        raise RowError("the feature JSON has no 'features' string")
    return _num_boxes(info), b64


def _num_boxes(info: dict) -> int:
    if "num_boxes" not in info:
        raise RowError("the feature JSON has no 'num_boxes'")
    return parse_count(info["num_boxes"], "num_boxes")


def _parse_hw(field: bytes) -> tuple[int, int]:
    text = field.strip()
    try:
        value = json.loads(text)
    except ValueError:
        parts = text.split()
        if len(parts) != 2:
            raise RowError(f"the size field {text[:40]!r} is neither JSON "
                           "[{\"height\", \"width\"}] nor 'H W'") from None
        value = {"height": parts[0], "width": parts[1]}
    if isinstance(value, list):
        value = value[0] if value else None
    if not isinstance(value, dict) or "height" not in value or "width" not in value:
        raise RowError("the size field has no 'height' and 'width'")
    h, w = parse_count(value["height"], "height"), parse_count(value["width"], "width")
    if h == 0 or w == 0:
        raise RowError(f"image size {h} x {w} is empty")
    return h, w


def _image_size(hw_rows: TsvRows | None, hit, notes: list[str]):
    """``((h, w), where)`` from an hw.tsv row ``hit`` (``(row, line)`` or None), or
    ``(None, None)`` with a note saying why."""
    if hw_rows is None:
        return None, None
    name = hw_rows.path.name
    if hit is None:
        notes.append(f"{name}: no row for this image")
        return None, None
    try:
        field = _second_field(hit[1], *split_key(hit[1])[1:], '[{"height": H, "width": W}]')
        return _parse_hw(field), f"{name} row {hit[0]}"
    except RowError as e:
        notes.append(f"{name} row {hit[0]}: {e}")
        return None, None


def _parse_labels(field: bytes):
    """``(objects, (h, w) or None)`` of a label row's JSON."""
    value = _json(field, "the label field")
    hw = None
    if isinstance(value, dict):
        if "image_h" in value and "image_w" in value:
            hw = (parse_count(value["image_h"], "image_h"), parse_count(value["image_w"],
                                                                         "image_w"))
        value = value.get("objects")
    if not isinstance(value, list):
        raise RowError("the label field is neither a list of objects nor {\"objects\": [...]}")
    return value, hw


@dataclass
class _Labels:
    """A label row's objects as arrays (problem: why its boxes cannot be used)."""
    tags: list[str]
    boxes: np.ndarray | None
    class_names: list[str] | None
    scores: np.ndarray | None
    attr_names: list[list[str]] | None
    attr_scores: np.ndarray | None
    problem: str | None


def _label_arrays(objects: list) -> _Labels:
    if not all(isinstance(o, dict) for o in objects):
        return _Labels([], None, None, None, None, None, "its objects are not all JSON objects")
    names = [o.get("class") for o in objects]
    tags = [c for c in names if isinstance(c, str)]
    problem = None
    try:
        boxes = np.array([o["rect"] for o in objects], dtype=np.float64).reshape(-1, 4)
        if len(boxes) != len(objects) or not np.isfinite(boxes).all():
            raise ValueError
        boxes = boxes.astype(np.float32)
    except (KeyError, TypeError, ValueError):
        boxes, problem = None, "not every object has a 'rect' of 4 finite numbers"
    confs = [o.get("conf") for o in objects]
    scores = (np.array(confs, dtype=np.float32) if all(
        isinstance(c, (int, float)) and not isinstance(c, bool) for c in confs) else None)
    attr_names = attr_scores = None
    key = "attributes" if any("attributes" in o for o in objects) else "attr"
    if any(key in o for o in objects):
        attr_names = [_str_list(o.get(key)) for o in objects]
        skey = "attr_scores" if any("attr_scores" in o for o in objects) else "attr_conf"
        if any(skey in o for o in objects):
            lists = [_float_list(o.get(skey)) for o in objects]
            width = max((len(v) for v in lists), default=0)
            attr_scores = np.full((len(objects), width), np.nan, np.float32)
            for i, v in enumerate(lists):
                attr_scores[i, :len(v)] = v
    return _Labels(tags, boxes, names if len(tags) == len(names) else None, scores,
                   attr_names, attr_scores, problem)


def _str_list(v) -> list[str]:
    if v is None:
        return []
    return [v] if isinstance(v, str) else [str(x) for x in v]


def _float_list(v) -> list[float]:
    if v is None:
        return []
    return [float(v)] if isinstance(v, (int, float)) else [float(x) for x in v]


class _Companion:
    """label.tsv or hw.tsv rows for feature rows' keys: read in step with the feature file
    while the keys match row for row (one streaming pass, no index), by key otherwise."""

    def __init__(self, rows: TsvRows):
        self.rows = rows
        self._stream: Iterator | None = None
        self._in_step = True

    def next_for(self, key: str):
        if self._in_step:
            if self._stream is None:
                self._stream = self.rows.iter_lines()
            for row, _, line in self._stream:
                try:
                    k = split_key(line)[0]
                except RowError:
                    k = False
                if k is None:
                    continue      # blank row
                if k == key:
                    return row, line
                break
            self._in_step = False
            self._stream.close()
        return self.get(key)

    def get(self, key: str):
        return self.rows.line_of(key)


# ---------------------------------------------------------------------------- reader

class OscarTsv:
    """Oscar / VinVL ``feature.tsv`` with its optional ``label.tsv`` and ``hw.tsv``.

    Args:
        features: the feature file (json or columns layout, found from its rows).
        labels: the label file (``label.tsv`` or SGB ``predictions.tsv``), or None.
        hw: the image-size file, or None (sizes may then come from the label rows'
            ``image_h``/``image_w``, or from the geometry columns and the label boxes).
        feature_dim: values per region in the file, geometry included (e.g. 2054). Default:
            told from the first decodable row's byte count (needs a width in
            :data:`KNOWN_FEATURE_DIMS`).
        dtype: ``"float32"``, ``"float16"`` or ``"auto"`` (the byte count says which, given
            ``feature_dim`` or a known width).
        geometry: number of trailing geometry columns (6, 4, 0) or ``"auto"``: 6 when the
            first row's last six columns satisfy the geometry identities
            (:func:`~vlkd.data.tsv.geometry.detect_geometry`), 4 for a 2052-wide file, else 0.
        atol: tolerance of the geometry cross-check (default: by dtype,
            :func:`~vlkd.data.tsv.geometry.default_atol`).
        use_lineidx, save_lineidx: see :class:`~vlkd.data.tsv.rows.TsvRows`.

    Iterating yields, for every non-blank feature row in file order, a :class:`TsvImage` or a
    :class:`TsvFailure`; :meth:`read` and :meth:`get` do the same for one row / image id.

    How an image's boxes are found (``TsvImage.boxes_from``, ``notes``): the label row's
    ``rect`` values when it has one object per region and they agree with the geometry columns
    under the image size (an hw size that disagrees while another integer size makes them
    agree is replaced by that size, with a note); otherwise, the geometry columns times the
    image size, and the label row is not used for the regions (its classes still give
    ``tags``). Without geometry columns, label boxes are used unchecked; with neither usable
    label boxes nor geometry and a size, the row is a failure. Label and size problems never
    shift a label row onto another image's regions.
    """

    def __init__(self, features: str | os.PathLike, labels: str | os.PathLike | None = None,
                 hw: str | os.PathLike | None = None, *, feature_dim: int | None = None,
                 dtype: str = "auto", geometry: int | str = "auto", atol: float | None = None,
                 use_lineidx: bool = True, save_lineidx: bool = False):
        if dtype not in ("auto", *FEATURE_DTYPES):
            raise ValueError(f"dtype must be 'auto', 'float32' or 'float16', not {dtype!r}")
        if geometry not in ("auto", 0, 4, 6):
            raise ValueError(f"geometry must be 'auto', 0, 4 or 6, not {geometry!r}")
        opts = dict(use_lineidx=use_lineidx, save_lineidx=save_lineidx)
        self.features = TsvRows(features, **opts)
        self.labels = TsvRows(labels, **opts) if labels is not None else None
        self.hw = TsvRows(hw, **opts) if hw is not None else None
        self.layout = self._probe(feature_dim, dtype, geometry)
        self.atol = default_atol(self.layout.dtype) if atol is None else atol

    # ------------------------------------------------------------------ layout
    def _probe(self, feature_dim, dtype, geometry) -> FeatureLayout:
        first_problem = None
        for row, _, line in self.features.iter_lines():
            if row >= _PROBE_ROWS:
                break
            try:
                key, start, end = split_key(line)
                if key is None:
                    continue
                layout = "json" if line[start:start + 1] == b"{" else "columns"
                n, b64 = _feature_payload(line, start, end, layout)
                raw = decode_b64(b64, "'features'")
            except RowError as e:
                first_problem = first_problem or f"row {row}: {e}"
                continue
            if n == 0 or len(raw) % n:
                if n:
                    first_problem = first_problem or (
                        f"row {row}: {len(raw):,} bytes do not split into num_boxes {n} rows")
                continue
            dt, dim = self._choose_dtype(raw, n, feature_dim, dtype, row)
            matrix = np.frombuffer(raw, dt).reshape(n, dim)
            if geometry == "auto":
                g = detect_geometry(matrix) or (4 if dim == 2052 else 0)
            else:
                g = int(geometry)
            if g >= dim:
                raise TsvFormatError(f"{self.features.path.name}: {dim} values per region "
                                     f"cannot hold {g} geometry columns and features")
            return FeatureLayout(layout, dt, dim, g)
        if feature_dim and dtype != "auto":
            g = 0 if geometry == "auto" else int(geometry)
            return FeatureLayout("json", FEATURE_DTYPES[dtype], feature_dim, g)
        raise TsvFormatError(
            f"{self.features.path.name}: no row in the first {_PROBE_ROWS} gives the feature "
            f"layout ({first_problem or 'no rows with regions'}); pass feature_dim= and dtype=")

    def _choose_dtype(self, raw: bytes, n: int, feature_dim, dtype, row
                      ) -> tuple[np.dtype, int]:
        """The dtype and width of a row with ``n`` regions in ``raw`` bytes.

        Oscar's rows carry no dtype (every Oscar reader decodes float32), so with
        ``dtype="auto"``: the dtype that gives ``feature_dim`` values per region; without
        ``feature_dim``, the one that gives a width of :data:`KNOWN_FEATURE_DIMS`, else the
        only one under which the last six columns are geometry. Anything else is refused.
        """
        per_box = len(raw) // n
        names = [dtype] if dtype != "auto" else ["float32", "float16"]
        name = self.features.path.name
        fits = [nm for nm in names if per_box % FEATURE_DTYPES[nm].itemsize == 0]
        width = {nm: per_box // FEATURE_DTYPES[nm].itemsize for nm in fits}
        if feature_dim:
            chosen = [nm for nm in fits if width[nm] == feature_dim]
            if not chosen:
                raise TsvFormatError(
                    f"{name} row {row}: {per_box:,} bytes per region is not {feature_dim} "
                    f"{' or '.join(names)} values; check feature_dim= and dtype=")
        elif dtype != "auto":
            chosen = fits
        else:
            chosen = [nm for nm in fits if width[nm] in KNOWN_FEATURE_DIMS] or [
                nm for nm in fits if detect_geometry(np.frombuffer(
                    raw, FEATURE_DTYPES[nm]).reshape(n, width[nm])) == 6]
        if len(chosen) != 1:
            raise TsvFormatError(
                f"{name} row {row}: {per_box:,} bytes per region is not a known width "
                f"{KNOWN_FEATURE_DIMS} of float32 or float16 and has no geometry columns to "
                "tell the dtype by (Oscar's rows carry none); pass feature_dim= (values per "
                "region, geometry included) and dtype=")
        return FEATURE_DTYPES[chosen[0]], width[chosen[0]]

    @property
    def feature_dim(self) -> int:
        """Region feature values per box without the geometry columns."""
        return self.layout.region_dim

    @property
    def feature_dtype(self) -> np.dtype:
        return self.layout.dtype

    @property
    def geometry_columns(self) -> int:
        return self.layout.geometry

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        """Rows of the feature file (blank rows included)."""
        return len(self.features)

    def keys(self) -> list[str | None]:
        """The feature file's keys in row order (None for blank or undecodable rows)."""
        return self.features.keys()

    @property
    def duplicate_keys(self) -> dict[str, list[int]]:
        """Keys on more than one feature row -> their rows (after :meth:`keys`/:meth:`get`)."""
        self.features.find("")
        return self.features.duplicate_keys

    def __iter__(self) -> Iterator[TsvImage | TsvFailure]:
        labels = _Companion(self.labels) if self.labels is not None else None
        hw = _Companion(self.hw) if self.hw is not None else None
        seen: dict[str, int] = {}
        for row, _, line in self.features.iter_lines():
            rec = self._decode(row, line, None if labels is None else labels.next_for,
                               None if hw is None else hw.next_for, seen)
            if rec is not None:
                yield rec

    def read(self, row: int) -> TsvImage | TsvFailure | None:
        """Feature row ``row`` (None for a blank row)."""
        return self._decode(row, self.features.line(row), *self._by_key())

    def get(self, image_id: str) -> TsvImage | TsvFailure:
        """The image ``image_id`` (its first row when repeated); KeyError when absent."""
        hit = self.features.line_of(image_id)
        if hit is None:
            raise KeyError(f"{image_id!r} is not a key of {self.features.path.name}")
        return self._decode(hit[0], hit[1], *self._by_key())

    def _by_key(self):
        """Label and hw look-ups by key (no streaming), and no duplicate tracking."""
        return (None if self.labels is None else _Companion(self.labels).get,
                None if self.hw is None else _Companion(self.hw).get, None)

    # ------------------------------------------------------------------ one row
    def _decode(self, row, line, label_of, hw_of, seen):
        name = self.features.path.name
        opened = open_row(line, row, name, seen)
        if not isinstance(opened, tuple):
            return opened
        key, start, end = opened
        fl = self.layout
        try:
            n, b64 = _feature_payload(line, start, end, fl.layout)
            raw = decode_b64(b64, "'features'")
            need = n * fl.dim * fl.dtype.itemsize
            if len(raw) != need:
                raise RowError(self._size_problem(len(raw), n))
            matrix = np.frombuffer(raw, fl.dtype).reshape(n, fl.dim)
        except RowError as e:
            return TsvFailure(key, row, str(e), name)
        return self._assemble(key, row, matrix, None if label_of is None else label_of(key),
                              None if hw_of is None else hw_of(key))

    def _size_problem(self, nbytes: int, n: int) -> str:
        fl = self.layout
        msg = (f"'features' decodes to {nbytes:,} bytes but num_boxes {n} x {fl.dim} "
               f"{fl.dtype.name} needs {n * fl.dim * fl.dtype.itemsize:,}")
        if n and nbytes % n == 0:
            msg += f" ({nbytes // n:,} bytes per region)"
        return msg

    def _assemble(self, key, row, matrix, label_hit, hw_hit) -> TsvImage | TsvFailure:
        fname = self.features.path.name
        features, geometry = split_geometry(matrix, self.layout.geometry)
        n = len(features)
        image = TsvImage(key, row, None, features, geometry)
        notes = image.notes
        hw, hw_from = _image_size(self.hw, hw_hit, notes)
        labels = where = None
        if self.labels is not None:
            lname = self.labels.path.name
            if label_hit is None:
                notes.append(f"{lname}: no row for this image")
            else:
                where = f"{lname} row {label_hit[0]}"
                try:
                    objects, label_hw = _parse_labels(_second_field(
                        label_hit[1], *split_key(label_hit[1])[1:], "[{\"class\": ...}]"))
                    labels = _label_arrays(objects)
                    image.tags = labels.tags
                    if hw is None and label_hw is not None:
                        hw, hw_from = label_hw, f"{where} image_h/image_w"
                except RowError as e:
                    notes.append(f"{where}: {e}")
        lboxes = None
        if labels is not None:
            if labels.boxes is not None and len(labels.boxes) != n:
                notes.append(f"{where} has {len(labels.boxes)} objects but {fname} row {row} "
                             f"has {n} regions: the label row is not used for the regions")
            elif labels.problem:
                notes.append(f"{where}: {labels.problem}: the label row is not used for the "
                             "regions")
            else:
                lboxes = labels.boxes
        if lboxes is not None and geometry is not None and n:
            check = check_geometry(geometry, lboxes, hw, atol=self.atol) if hw else None
            if check is None or not check.ok:
                est = estimate_image_hw(geometry, lboxes, atol=self.atol)
                if est is not None:
                    notes.append(
                        (f"image size {hw[0]} x {hw[1]} ({hw_from}) disagrees with the geometry "
                         f"columns ({check}); they and the label boxes agree on " if hw else
                         "no image size given; the geometry columns and the label boxes "
                         "agree on ") + f"{est[0]} x {est[1]}, used")
                    hw = est
                elif hw is not None:
                    notes.append(f"{where}: boxes disagree with the geometry columns ({check}): "
                                 "boxes from the geometry columns, the label row is not used "
                                 "for the regions")
                    lboxes = None
                else:
                    return TsvFailure(key, row, "; ".join(notes + [
                        f"{where}: boxes disagree with the geometry columns under any image "
                        "size, and no size is known (hw.tsv) to take boxes from the geometry "
                        "columns"]), fname)
        image.image_hw = hw
        if lboxes is not None:
            image.boxes, image.boxes_from = lboxes, "labels"
            image.class_names, image.scores = labels.class_names, labels.scores
            image.attr_names, image.attr_scores = labels.attr_names, labels.attr_scores
        elif geometry is not None and hw is not None:
            image.boxes, image.boxes_from = boxes_from_geometry(geometry, hw), "geometry"
        elif n == 0:
            image.boxes, image.boxes_from = np.zeros((0, 4), np.float32), "empty"
        else:
            why = ("no geometry columns in the features" if geometry is None else
                   "no image size (pass hw.tsv) to take boxes from the geometry columns")
            lack = "no label.tsv" if self.labels is None else "no usable label boxes"
            return TsvFailure(key, row, "; ".join(notes + [f"no boxes for its {n} regions: "
                                                           f"{lack}, and {why}"]), fname)
        return image


class SgbPredictionsTsv:
    """scene_graph_benchmark's ``predictions.tsv`` with per-box features, what VinVL's
    extraction writes (``tools/test_sg_net.py`` with ``TEST.OUTPUT_FEATURE True`` and
    ``feature`` in ``TEST.TSV_SAVE_SUBSET``, as ``sgg_configs/vgattr/vinvl_x152c4.yaml`` has it):
    ``key<TAB>{"objects": [{"rect", "bbox_id", "class", "conf", "feature", ...}],
    "relations": ...}``, each ``feature`` the base64 of one box's 2048 float32 values
    (``maskrcnn_benchmark/engine/inference.py`` ``convert_predictions_to_tsv``), ``rect`` in
    original-image pixels (the prediction is resized to the image size first). No geometry
    columns; the image size is not in the row: pass the ``hw.tsv`` of the input dataset.

    Args:
        predictions: the predictions file.
        hw: the image-size file, or None.
        dtype: of the ``feature`` values (``"float32"``; ``"float16"`` for a half-precision
            run).
        feature_dim: values per box (2048 for VinVL); default from the first box read (rows
            without boxes before it get ``(0, 0)`` features).
        use_lineidx, save_lineidx: see :class:`~vlkd.data.tsv.rows.TsvRows`.

    Yields, like :class:`OscarTsv`, a :class:`TsvImage` (``boxes_from="labels"``) or a
    :class:`TsvFailure` per row.
    """

    def __init__(self, predictions: str | os.PathLike, hw: str | os.PathLike | None = None, *,
                 dtype: str = "float32", feature_dim: int | None = None,
                 use_lineidx: bool = True, save_lineidx: bool = False):
        if dtype not in FEATURE_DTYPES:
            raise ValueError(f"dtype must be 'float32' or 'float16', not {dtype!r}")
        opts = dict(use_lineidx=use_lineidx, save_lineidx=save_lineidx)
        self.rows = TsvRows(predictions, **opts)
        self.hw = TsvRows(hw, **opts) if hw is not None else None
        self.feature_dtype = FEATURE_DTYPES[dtype]
        self.feature_dim = feature_dim

    def __len__(self) -> int:
        return len(self.rows)

    def keys(self) -> list[str | None]:
        return self.rows.keys()

    def __iter__(self) -> Iterator[TsvImage | TsvFailure]:
        hw = _Companion(self.hw) if self.hw is not None else None
        seen: dict[str, int] = {}
        for row, _, line in self.rows.iter_lines():
            rec = self._decode(row, line, None if hw is None else hw.next_for, seen)
            if rec is not None:
                yield rec

    def read(self, row: int) -> TsvImage | TsvFailure | None:
        """Row ``row`` (None for a blank row)."""
        return self._decode(row, self.rows.line(row), self._hw_by_key(), None)

    def get(self, image_id: str) -> TsvImage | TsvFailure:
        hit = self.rows.line_of(image_id)
        if hit is None:
            raise KeyError(f"{image_id!r} is not a key of {self.rows.path.name}")
        return self._decode(hit[0], hit[1], self._hw_by_key(), None)

    def _hw_by_key(self):
        return None if self.hw is None else _Companion(self.hw).get

    def _decode(self, row, line, hw_of, seen):
        name = self.rows.path.name
        opened = open_row(line, row, name, seen)
        if not isinstance(opened, tuple):
            return opened
        key, start, end = opened
        try:
            objects, hw = _parse_labels(_second_field(line, start, end, '{"objects": [...]}'))
            labels = _label_arrays(objects)
            if labels.problem:
                raise RowError(labels.problem)
            parts = []
            for i, obj in enumerate(objects):
                if not isinstance(obj.get("feature"), str):
                    raise RowError(f"object {i} has no 'feature' (run SGB with "
                                   "TEST.OUTPUT_FEATURE True and 'feature' in "
                                   "TEST.TSV_SAVE_SUBSET)")
                parts.append(decode_b64(obj["feature"], f"object {i} 'feature'"))
            size = self.feature_dtype.itemsize
            if self.feature_dim is None and parts and len(parts[0]) % size == 0:
                self.feature_dim = len(parts[0]) // size
            dim = self.feature_dim or 0
            bad = [i for i, p in enumerate(parts) if len(p) != dim * size]
            if bad:
                raise RowError(f"object {bad[0]} 'feature' has {len(parts[bad[0]]):,} bytes, "
                               f"not {dim} {self.feature_dtype.name}")
        except RowError as e:
            return TsvFailure(key, row, str(e), name)
        features = np.frombuffer(b"".join(parts), self.feature_dtype).reshape(len(parts), dim)
        image = TsvImage(key, row, hw, features, None, boxes=labels.boxes, boxes_from="labels",
                         scores=labels.scores, class_names=labels.class_names,
                         attr_names=labels.attr_names, attr_scores=labels.attr_scores,
                         tags=labels.tags)
        if hw_of is not None:
            image.image_hw = _image_size(self.hw, hw_of(key), image.notes)[0] or hw
        return image


# The writers live in oscar_writers.py; importable from here as well.
from .oscar_writers import (FeatureTsvWriter, HwTsvWriter, LabelTsvWriter,  # noqa: E402
                            OscarTsvWriter)
