"""Bottom-up-attention (BUTD) TSV files and LXMERT's variant (read and write).

- BUTD (peteanderson80/bottom-up-attention ``tools/generate_tsv.py``, read back by
  ``tools/read_tsv.py``): ``FIELDNAMES = ['image_id', 'image_w', 'image_h', 'num_boxes',
  'boxes', 'features']`` written by ``csv.DictWriter(delimiter='\\t')`` (so rows end in CRLF,
  the csv module's default), ``boxes`` and ``features`` base64 of float32 ``(num_boxes, 4)``
  and ``(num_boxes, -1)``; read with ``csv.field_size_limit(sys.maxsize)`` and
  ``csv.DictReader(..., delimiter='\\t', fieldnames=FIELDNAMES)``. Note width before height.
- LXMERT (airsplay/lxmert ``src/utils.py`` ``load_obj_tsv``, written by
  ``data/mscoco_imgfeat/extract_coco_image.py``): ``["img_id", "img_h", "img_w",
  "objects_id", "objects_conf", "attrs_id", "attrs_conf", "num_boxes", "boxes",
  "features"]`` (height before width), ``objects_id``/``attrs_id`` int64 (argmax over the
  classes without background), ``objects_conf``/``attrs_conf``/``boxes``/``features``
  float32.

:class:`ButdTsv` reads either (told apart by the field count), without the csv module on the
common path (a row is split at its tabs and the base64 fields decoded in place; a row holding
a double quote, which only csv quoting would produce, goes through ``csv.reader``).
:class:`ButdTsvWriter` writes either, byte for byte as ``csv.DictWriter`` does.
"""
from __future__ import annotations

import binascii
import csv
import os
from typing import Iterator

import numpy as np

from .records import (RowError, TsvFailure, TsvFormatError, TsvImage, content_end,
                      decode_array, decode_b64, empty_image, open_row, parse_count)
from .rows import RowFileWriter, TsvRows, TsvWriter

__all__ = ["BUTD_FIELDS", "ButdTsv", "ButdTsvWriter", "LXMERT_FIELDS"]

BUTD_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
LXMERT_FIELDS = ("img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id",
                 "attrs_conf", "num_boxes", "boxes", "features")
_LAYOUTS = {"butd": BUTD_FIELDS, "lxmert": LXMERT_FIELDS}
_F4, _I8 = np.dtype("<f4"), np.dtype("<i8")
_PROBE_ROWS = 64


def _split_fields(line: bytes, count: int) -> list:
    """The ``count`` fields of a row (bytes or memoryview slices, no copies of the large
    ones), or RowError when it has another number of fields."""
    end = content_end(line)
    if line.find(b'"', 0, end) >= 0:     # csv quoting: let the csv module unquote it
        try:
            fields = next(csv.reader([line[:end].decode("utf-8")], delimiter="\t"))
        except (csv.Error, UnicodeDecodeError) as e:
            raise RowError(f"the row is not a valid tab-separated csv row ({e})") from None
        fields = [f.encode("utf-8") for f in fields]
    else:
        fields, start, view = [], 0, memoryview(line)
        while len(fields) < count:
            tab = line.find(b"\t", start, end)
            if tab < 0:
                fields.append(view[start:end])
                break
            fields.append(view[start:tab])
            start = tab + 1
        else:
            fields.append(view[start:end])   # more fields than expected: counted below
    if len(fields) != count:
        raise RowError(f"expected {count} tab-separated fields, found "
                       f"{'more' if len(fields) > count else len(fields)}")
    return fields


class ButdTsv:
    """A BUTD or LXMERT feature TSV file.

    Args:
        path: the TSV file.
        fields: ``"butd"``, ``"lxmert"`` or ``"auto"`` (by the first row's field count).
        feature_dim: values per region; default from the first decodable row.
        use_lineidx, save_lineidx: see :class:`~vlkd.data.tsv.rows.TsvRows` (BUTD files have
            no ``.lineidx`` of their own; random access builds the index by scanning).

    Iterating yields a :class:`TsvImage` (``boxes_from="tsv"``, ``image_hw`` from the row;
    LXMERT rows also carry ``class_ids``, ``scores``, ``attr_ids`` and ``attr_scores``) or a
    :class:`TsvFailure` per non-blank row; :meth:`read` and :meth:`get` read one.
    """

    def __init__(self, path: str | os.PathLike, *, fields: str = "auto",
                 feature_dim: int | None = None, use_lineidx: bool = True,
                 save_lineidx: bool = False):
        if fields not in ("auto", *_LAYOUTS):
            raise ValueError(f"fields must be 'auto', 'butd' or 'lxmert', not {fields!r}")
        self.rows = TsvRows(path, use_lineidx=use_lineidx, save_lineidx=save_lineidx)
        self.fields = self._probe_fields() if fields == "auto" else fields
        self.feature_dim = feature_dim or self._probe_dim()

    def _first_rows(self) -> Iterator[tuple[int, bytes]]:
        for row, _, line in self.rows.iter_lines():
            if row >= _PROBE_ROWS:
                return
            if content_end(line) and not line.isspace():
                yield row, line

    def _probe_fields(self) -> str:
        for _, line in self._first_rows():
            count = line.count(b"\t", 0, content_end(line)) + 1
            for name, names in _LAYOUTS.items():
                if count == len(names):
                    return name
            raise TsvFormatError(
                f"{self.rows.path.name}: rows have {count} fields; a BUTD file has 6 "
                f"({', '.join(BUTD_FIELDS)}) and an LXMERT file 10 ({', '.join(LXMERT_FIELDS)})")
        return "butd"

    def _probe_dim(self) -> int | None:
        names = _LAYOUTS[self.fields]
        for _, line in self._first_rows():
            try:
                f = _split_fields(line, len(names))
                n = parse_count(bytes(f[names.index("num_boxes")]).strip(), "num_boxes")
                raw = decode_b64(f[-1], "'features'")
            except RowError:
                continue
            if n and len(raw) % (4 * n) == 0:
                return len(raw) // (4 * n)
        return None

    @property
    def feature_dtype(self) -> np.dtype:
        return _F4

    def __len__(self) -> int:
        return len(self.rows)

    def keys(self) -> list[str | None]:
        return self.rows.keys()

    def __iter__(self) -> Iterator[TsvImage | TsvFailure]:
        seen: dict[str, int] = {}
        for row, _, line in self.rows.iter_lines():
            rec = self._decode(row, line, seen)
            if rec is not None:
                yield rec

    def read(self, row: int) -> TsvImage | TsvFailure | None:
        """Row ``row`` (None for a blank row)."""
        return self._decode(row, self.rows.line(row), None)

    def get(self, image_id: str) -> TsvImage | TsvFailure:
        hit = self.rows.line_of(image_id)
        if hit is None:
            raise KeyError(f"{image_id!r} is not a key of {self.rows.path.name}")
        return self._decode(hit[0], hit[1], None)

    def _decode(self, row: int, line: bytes, seen) -> TsvImage | TsvFailure | None:
        name = self.rows.path.name
        opened = open_row(line, row, name, seen)
        if not isinstance(opened, tuple):
            return opened
        key = opened[0]
        try:
            return self._image(key, row, line)
        except RowError as e:
            return TsvFailure(key, row, str(e), name)

    def _image(self, key: str, row: int, line: bytes) -> TsvImage:
        names = _LAYOUTS[self.fields]
        f = dict(zip(names, _split_fields(line, len(names))))
        w_name, h_name = names[1:3] if self.fields == "butd" else names[2:0:-1]
        w = parse_count(bytes(f[w_name]).strip(), w_name)
        h = parse_count(bytes(f[h_name]).strip(), h_name)
        n = parse_count(bytes(f["num_boxes"]).strip(), "num_boxes")
        boxes = decode_array(f["boxes"], "'boxes'", _F4, n, 4)
        raw = decode_b64(f["features"], "'features'")
        dim = self.feature_dim
        if dim is None:
            if n == 0 or len(raw) % (4 * n):
                raise RowError(f"'features' decodes to {len(raw):,} bytes, not num_boxes {n} "
                               "rows of float32")
            dim = self.feature_dim = len(raw) // (4 * n)
        if len(raw) != n * dim * 4:
            raise RowError(f"'features' decodes to {len(raw):,} bytes but num_boxes {n} x {dim}"
                           f" float32 needs {n * dim * 4:,}")
        image = TsvImage(key, row, (h, w), np.frombuffer(raw, _F4).reshape(n, dim),
                         boxes=boxes, boxes_from="tsv")
        if self.fields == "lxmert":
            image.class_ids = decode_array(f["objects_id"], "'objects_id'", _I8, n)
            image.scores = decode_array(f["objects_conf"], "'objects_conf'", _F4, n)
            image.attr_ids = decode_array(f["attrs_id"], "'attrs_id'", _I8, n).reshape(n, 1)
            image.attr_scores = decode_array(f["attrs_conf"], "'attrs_conf'", _F4,
                                             n).reshape(n, 1)
        return image


class ButdTsvWriter(RowFileWriter):
    """Writes BUTD (6 fields) or LXMERT (10 fields) TSV rows as ``csv.DictWriter`` does.

    Args:
        path: destination file (written atomically).
        fields: ``"butd"`` or ``"lxmert"``.
        line_ending: ``b"\\r\\n"``, the csv module's default that the reference writers use.
        lineidx: also write a ``.lineidx`` (not part of the BUTD format; harmless).
        allow_empty: write images without regions (``read_tsv.py`` and ``load_obj_tsv``
            reshape to ``(num_boxes, -1)``, which fails for 0 boxes).
    """

    def __init__(self, path: str | os.PathLike, *, fields: str = "butd",
                 line_ending: bytes = b"\r\n", lineidx: bool = False,
                 allow_empty: bool = False):
        if fields not in _LAYOUTS:
            raise ValueError(f"fields must be 'butd' or 'lxmert', not {fields!r}")
        self.fields = fields
        self.allow_empty = allow_empty
        self.dim: int | None = None
        self._tsv = TsvWriter(path, lineidx=lineidx, line_ending=line_ending)

    def write(self, image_id: str, image_hw: tuple[int, int], boxes: np.ndarray,
              features: np.ndarray, *, class_ids: np.ndarray | None = None,
              scores: np.ndarray | None = None, attr_ids: np.ndarray | None = None,
              attr_scores: np.ndarray | None = None) -> int:
        """One image's row (LXMERT needs ``class_ids``, ``scores``, ``attr_ids``,
        ``attr_scores``, one per box; a 2-d attribute array gives its first column)."""
        if '"' in image_id:
            raise ValueError(f"image id {image_id!r} contains a double quote, which csv "
                             "would quote; rename the image before exporting")
        feats = np.ascontiguousarray(features, _F4)
        b = np.ascontiguousarray(boxes, _F4).reshape(-1, 4)
        n = len(b)
        if feats.ndim != 2 or len(feats) != n:
            raise ValueError(f"{image_id!r}: {n} boxes but features {feats.shape}")
        if n == 0 and not self.allow_empty:
            raise empty_image(image_id)
        if self.dim is None:
            self.dim = feats.shape[1]
        elif feats.shape[1] != self.dim:
            raise ValueError(f"{image_id!r}: {feats.shape[1]} feature values per region; "
                             f"this file's rows have {self.dim}")
        h, w = (int(v) for v in image_hw)
        enc = lambda a: binascii.b2a_base64(a, newline=False)  # noqa: E731
        if self.fields == "butd":
            fields = [b"%d" % w, b"%d" % h, b"%d" % n, enc(b), enc(feats)]
        else:
            extra = {"class_ids": class_ids, "scores": scores, "attr_ids": attr_ids,
                     "attr_scores": attr_scores}
            missing = [k for k, v in extra.items() if v is None]
            if missing:
                raise ValueError(f"{image_id!r}: LXMERT rows need {', '.join(missing)}")
            cols = {}
            for k, v in extra.items():
                v = np.asarray(v)
                cols[k] = v[:, 0] if v.ndim == 2 else v.ravel()
                if len(cols[k]) != n:
                    raise ValueError(f"{image_id!r}: {len(cols[k])} {k} for {n} boxes")
            fields = [b"%d" % h, b"%d" % w,
                      enc(np.ascontiguousarray(cols["class_ids"], _I8)),
                      enc(np.ascontiguousarray(cols["scores"], _F4)),
                      enc(np.ascontiguousarray(cols["attr_ids"], _I8)),
                      enc(np.ascontiguousarray(cols["attr_scores"], _F4)),
                      b"%d" % n, enc(b), enc(feats)]
        return self._tsv.write_row(image_id, fields)
