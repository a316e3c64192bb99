"""What the TSV readers return per row: an image (:class:`TsvImage`) or a failure
(:class:`TsvFailure`), and the decoding shared by every layout.

A row that cannot be decoded is a value, not an exception: the readers yield a
:class:`TsvFailure` (file, row, image id when readable, reason) and go on. Only a file that is
not of the expected kind at all (:class:`TsvFormatError`) raises.
"""
from __future__ import annotations

import binascii
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

__all__ = ["EmptyImageError", "FEATURE_DTYPES", "TsvFailure", "TsvFormatError", "TsvImage",
           "content_end", "decode_array", "decode_b64", "empty_image", "open_row",
           "parse_count", "split_key"]

# The dtypes a feature matrix may be stored in, as base64 of little-endian values.
FEATURE_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}


class TsvFormatError(ValueError):
    """The file is not of the expected layout (not a per-row problem); the message says what
    was expected and found, and what to pass instead."""


class EmptyImageError(ValueError):
    """A writer was given an image without regions, which the reference readers cannot read
    back (``reshape((num_boxes, -1))`` fails for 0 boxes)."""


def empty_image(image_id: str) -> EmptyImageError:
    return EmptyImageError(
        f"{image_id!r} has no regions: the reference readers reshape a feature row to "
        "(num_boxes, -1), which numpy refuses for 0 boxes; leave the image out (or pass "
        "allow_empty=True when only readers that cope will read the file)")


class RowError(Exception):
    """One row cannot be decoded; the readers turn it into a :class:`TsvFailure`."""


@dataclass(slots=True)
class TsvFailure:
    """A row that could not be read.

    Attributes:
        image_id: the row's key when it could be read, else None.
        row: row number in ``file`` (0-based, as in the ``.lineidx`` / ``TSVFile.seek``).
        reason: what was found.
        file: the TSV file's name.
    """
    image_id: str | None
    row: int
    reason: str
    file: str
    ok: ClassVar[bool] = False

    def __str__(self) -> str:
        who = f" ({self.image_id!r})" if self.image_id is not None else ""
        return f"{self.file} row {self.row}{who}: {self.reason}"


@dataclass(slots=True)
class TsvImage:
    """One image's regions as a TSV file holds them.

    Arrays are read-only views of the decoded bytes in the stored dtype (no copy; the
    ``features`` view has the full row's stride when geometry columns follow it, so use
    ``np.ascontiguousarray`` where a packed block is needed).

    Attributes:
        image_id: the row key.
        row: row number in the feature (or BUTD) file.
        image_hw: ``(height, width)`` of the original image when known.
        features: ``(n, D)`` region features (geometry columns split off).
        geometry: ``(n, 4 | 6)`` the geometry columns when the rows have them (see
            :mod:`vlkd.data.tsv.geometry`), same dtype as ``features``.
        boxes: ``(n, 4)`` float32 ``x1 y1 x2 y2`` in original-image pixels, or None when
            neither a label row nor geometry and an image size give them.
        boxes_from: ``"labels"`` (label.tsv ``rect``), ``"geometry"`` (geometry columns and
            image size), ``"tsv"`` (BUTD ``boxes`` field), ``"empty"`` (a row without regions
            and no label row to take names from) or None.
        scores: ``(n,)`` float32 detector confidence (label ``conf``, LXMERT ``objects_conf``).
        class_names: per-region class names (label ``class``), aligned with the regions.
        class_ids: ``(n,)`` int64 class indices (LXMERT ``objects_id``).
        attr_names: per-region attribute names (SGB ``attributes``), a list per region.
        attr_ids: ``(n, k)`` int64 attribute indices (LXMERT ``attrs_id``, k = 1).
        attr_scores: ``(n, k)`` float32 attribute scores, NaN-padded to the longest list.
        tags: the image's object tags, Oscar's ``od_labels``: every ``class`` of its label row
            in order, kept even when the label row is not aligned with the regions.
        notes: what was found and done about this image beyond the plain case (a label row
            that disagrees, an image size taken from elsewhere), each naming file and row.
    """
    image_id: str
    row: int
    image_hw: tuple[int, int] | None
    features: np.ndarray
    geometry: np.ndarray | None = None
    boxes: np.ndarray | None = None
    boxes_from: str | None = None
    scores: np.ndarray | None = None
    class_names: list[str] | None = None
    class_ids: np.ndarray | None = None
    attr_names: list[list[str]] | None = None
    attr_ids: np.ndarray | None = None
    attr_scores: np.ndarray | None = None
    tags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ok: ClassVar[bool] = True

    @property
    def num_regions(self) -> int:
        return len(self.features)


def decode_b64(data, what: str) -> bytes:
    """Base64 -> bytes as Oscar's ``base64.b64decode`` does (characters outside the alphabet,
    such as a trailing ``\\r``, are skipped), or :class:`RowError`."""
    try:
        return binascii.a2b_base64(data)
    except ValueError as e:   # binascii.Error, or a str with non-ASCII characters
        raise RowError(f"bad base64 in {what} ({e})") from None


def decode_array(data, what: str, dtype: np.dtype, n: int, width: int | None = None
                 ) -> np.ndarray:
    """Base64 ``data`` as ``(n,)`` (``width`` None) or ``(n, width)`` values of ``dtype``
    (read-only, no copy), or :class:`RowError` when the byte count does not fit."""
    raw = decode_b64(data, what)
    per_row = dtype.itemsize * (1 if width is None else width)
    if len(raw) != n * per_row:
        shape = f"{n}" if width is None else f"{n} x {width}"
        raise RowError(f"{what} decodes to {len(raw):,} bytes, not {shape} {dtype.name} "
                       f"({n * per_row:,} bytes)")
    arr = np.frombuffer(raw, dtype)
    return arr if width is None else arr.reshape(n, width)


def parse_count(text, what: str) -> int:
    """A non-negative decimal integer field (``num_boxes``, ``image_w``...), or RowError."""
    if isinstance(text, bool) or (isinstance(text, float) and not text.is_integer()):
        raise RowError(f"{what} is {text!r}, not an integer")
    try:
        value = int(text)
    except (TypeError, ValueError, OverflowError):
        raise RowError(f"{what} is {text!r}, not an integer") from None
    if value < 0:
        raise RowError(f"{what} is {value}, negative")
    return value


def content_end(line: bytes) -> int:
    """Length of ``line`` without its line end (LF or CRLF; an empty last field
    is kept, so trailing tabs are not stripped)."""
    end = len(line)
    while end and line[end - 1] in b"\r\n":
        end -= 1
    return end


def split_key(line: bytes) -> tuple[str | None, int, int]:
    """``(key, field_start, end)``: the row's stripped key (None for a blank row),
    where the second field starts (-1 when there is none) and where the content ends."""
    end = content_end(line)
    if end == 0 or line.isspace():
        return None, -1, 0
    tab = line.find(b"\t", 0, end)
    raw = line[:end] if tab < 0 else line[:tab]
    try:
        key = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise RowError("the image key is not UTF-8 text") from None
    if not key:
        raise RowError("the image key (first field) is empty")
    return key, (tab + 1 if tab >= 0 else -1), end


def open_row(line: bytes, row: int, file: str, seen: dict[str, int] | None):
    """The start of decoding one row: ``(key, field_start, end)``, or None for a blank row,
    or a :class:`TsvFailure` for an unreadable key or (when ``seen`` tracks the keys of a
    streaming pass) a key already seen on an earlier row."""
    try:
        key, start, end = split_key(line)
    except RowError as e:
        return TsvFailure(None, row, str(e), file)
    if key is None:
        return None
    if seen is not None:
        if key in seen:
            return TsvFailure(key, row, f"the image id is also on row {seen[key]}; only its "
                              "first row is read", file)
        seen[key] = row
    return key, start, end
