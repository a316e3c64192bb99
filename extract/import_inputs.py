"""What ``vlkd-extract import-tsv`` reads, before any region set is written: the class and
attribute vocabularies (``--labelmap`` or the label rows), the input files (readers,
fingerprints, the feature width), the sorted image list, and the conversion of one decoded
row into the format's arrays (:class:`Converter`: classes by name with the fill class,
attributes, geometry checks). :mod:`vlkd.extract.import_tsv` is the job that uses them; its
docstring says what an imported set is.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlkd.common.digest import bytes_digest
from vlkd.common.regionset import ImageRegions
from vlkd.data.tsv import ButdTsv, OscarTsv, SgbPredictionsTsv, TsvFormatError, check_geometry

from .job import Failure, image_regions
from .options import ImportTsvConfig

#: The class name of regions without a class, and their score.
FILL_CLASS_NAME = ""
FILL_SCORE = 0.0
_NO_DIGEST = b"\0" * 16
_FINGERPRINT_BYTES = 1 << 20


class ImportTsvError(RuntimeError):
    """The input cannot be imported, or ``--out`` holds a set made otherwise (the message says
    what differs and what to do)."""


# ------------------------------------------------------------------------------ vocabularies

def _indexed(data: dict, by_index: str, by_name: str, path) -> list[str] | None:
    """Names in id order from a VinVL-style labelmap's ``idx_to_*`` or ``*_to_idx`` map; ids
    must run contiguously from their smallest (1 in VinVL's, 0 being the background)."""
    if by_index in data:
        pairs = [(int(k), str(v)) for k, v in data[by_index].items()]
    elif by_name in data:
        pairs = [(int(v), str(k)) for k, v in data[by_name].items()]
    else:
        return None
    pairs.sort()
    ids = [i for i, _ in pairs]
    if ids and ids != list(range(ids[0], ids[0] + len(ids))):
        raise ImportTsvError(f"{path}: the ids of {by_index}/{by_name} are not contiguous "
                             f"({ids[0]}..{ids[-1]} with {len(ids)} names)")
    return [n for _, n in pairs]


def read_vocabulary(path: str | os.PathLike) -> tuple[list[str], list[str] | None]:
    """``(class names, attribute names or None)`` of a ``--labelmap`` file, in id order.

    Accepts VinVL's labelmap JSON (``idx_to_label`` or ``label_to_idx``; ``idx_to_attribute``
    or ``attribute_to_idx``), a JSON list of names (vlkd's ``class_names.json``), or a text
    file with one name per line (BUTD's ``objects_vocab.txt``: the first of its
    comma-separated synonyms, lower-cased, as bottom-up-attention's demo notebook reads it).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ImportTsvError(f"--labelmap {path}: {e}") from None
    if p.suffix == ".json" or text.lstrip()[:1] in ("[", "{"):
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ImportTsvError(f"--labelmap {path} is not valid JSON ({e})") from None
        if isinstance(data, list):
            return [str(x) for x in data], None
        if isinstance(data, dict):
            classes = _indexed(data, "idx_to_label", "label_to_idx", path)
            if classes is None:
                raise ImportTsvError(f"--labelmap {path} has neither idx_to_label nor "
                                     "label_to_idx (VinVL's VG-SGG-dicts-vgoi6-clipped.json "
                                     "has both)")
            return classes, _indexed(data, "idx_to_attribute", "attribute_to_idx", path)
        raise ImportTsvError(f"--labelmap {path}: expected a JSON object or list")
    return [line.split(",")[0].lower().strip() for line in text.splitlines() if line.strip()], None


_CLASS = re.compile(rb'"class"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ATTRS = re.compile(rb'"(?:attributes|attr)"\s*:\s*(\[[^\]]*\]|"(?:[^"\\]|\\.)*")')


def scan_names(rows, attributes: bool) -> tuple[set[str], set[str]]:
    """The class (and attribute) names of every row of a label or predictions file, found
    without decoding the rows (base64 holds no quotes, so the patterns cannot match inside
    a feature)."""
    classes: set[str] = set()
    attrs: set[str] = set()
    for _, _, line in rows.iter_lines():
        classes.update(json.loads(b'"' + m + b'"') if b"\\" in m else m.decode("utf-8")
                       for m in _CLASS.findall(line))
        if attributes:
            for m in _ATTRS.findall(line):
                v = json.loads(m)
                attrs.update([v] if isinstance(v, str) else (str(x) for x in v))
    return classes, attrs


@dataclass
class Vocabulary:
    """Class and attribute names of the set, and how names map to ids.

    Attributes:
        class_names: the manifest's ``class_names`` (the fill name included).
        fill: the class of regions without one (index of ``""``).
        given: the classes came from a file (so LXMERT's class ids may index them).
        attribute_names: the manifest's ``attribute_names`` ([] without attributes).
        attributes_given: the attributes came from a file.
    """

    class_names: list[str]
    fill: int
    given: bool
    attribute_names: list[str]
    attributes_given: bool

    def __post_init__(self):
        self.class_index = {}
        for i, n in enumerate(self.class_names):
            self.class_index.setdefault(n, i)
        self.attribute_index = {}
        for i, n in enumerate(self.attribute_names):
            self.attribute_index.setdefault(n, i)

    @classmethod
    def build(cls, names: list[str], given: bool, attributes: list[str], attributes_given: bool
              ) -> "Vocabulary":
        names = list(names)
        if FILL_CLASS_NAME not in names:
            names.append(FILL_CLASS_NAME)
        return cls(names, names.index(FILL_CLASS_NAME), given, list(attributes),
                   attributes_given)


# ------------------------------------------------------------------------------ the files

def fingerprint(path: str | os.PathLike) -> dict:
    """``{name, bytes, fingerprint}`` of an input file: blake2b-128 of its size and its first
    and last MiB, cheap on a 100 GB file and the same on any copy of it (the path is recorded,
    not compared)."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.blake2b(digest_size=16)
    h.update(str(size).encode())
    with open(p, "rb") as f:
        h.update(f.read(_FINGERPRINT_BYTES))
        if size > _FINGERPRINT_BYTES:
            f.seek(max(_FINGERPRINT_BYTES, size - _FINGERPRINT_BYTES))
            h.update(f.read())
    return {"path": str(p.resolve()), "bytes": size, "fingerprint": h.hexdigest()}


def open_reader(cfg: ImportTsvConfig):
    """The ``vlkd.data.tsv`` reader of ``cfg``'s files (:class:`ImportTsvError` when the
    files are not of the layout the format names)."""
    dim = cfg.feature_dim
    try:
        if cfg.format == "vinvl":
            geometry = cfg.geometry if cfg.geometry == "auto" else int(cfg.geometry)
            return OscarTsv(cfg.features, cfg.labels, cfg.hw, feature_dim=dim,
                            dtype=cfg.tsv_dtype, geometry=geometry)
        if cfg.format == "butd":
            if cfg.tsv_dtype not in ("auto", "float32"):
                raise ImportTsvError("--tsv-dtype: BUTD and LXMERT files are float32 "
                                     "(tools/generate_tsv.py, load_obj_tsv)")
            return ButdTsv(cfg.features, feature_dim=dim)
        dtype = "float32" if cfg.tsv_dtype == "auto" else cfg.tsv_dtype
        return SgbPredictionsTsv(cfg.features, cfg.hw, dtype=dtype, feature_dim=dim)
    except (TsvFormatError, FileNotFoundError) as e:
        hint = (" (import-tsv: --feature-dim, --tsv-dtype, --geometry)"
                if "feature_dim=" in str(e) else "")
        raise ImportTsvError(f"import-tsv --format {cfg.format}: {e}{hint}") from None


def feature_rows(reader):
    """The reader's feature-file rows (``TsvRows``)."""
    return reader.features if isinstance(reader, OscarTsv) else reader.rows


def probe_feature_dim(reader) -> int | None:
    """Region feature values per box (geometry columns excluded)."""
    if isinstance(reader, SgbPredictionsTsv) and reader.feature_dim is None:
        rows = feature_rows(reader)
        for i in range(min(len(rows), 256)):
            reader.read(i)   # the first row with a box sets it
            if reader.feature_dim is not None:
                break
    return reader.feature_dim


@dataclass
class ImageList:
    """The sorted image list of a feature file.

    Attributes:
        ids: sorted image ids (a row's key, or ``"<row N>"`` for a row whose key cannot be
            stored).
        rows: image id -> row of the feature file.
        problems: image id -> why the row's key cannot be stored (those images are failures).
    """

    ids: list[str]
    rows: dict[str, int]
    problems: dict[str, str]

    @classmethod
    def of(cls, rows) -> "ImageList":
        name = rows.path.name
        first: dict[str, int] = {}
        standins: dict[str, int] = {}
        problems: dict[str, str] = {}
        for i, key in enumerate(rows.keys()):
            if key is None:
                if not rows.line(i).strip():
                    continue            # a blank row is not an image
                standins[f"<row {i}>"] = i   # the reader gives the reason
            elif key in first:
                sid = f"<row {i}>"
                standins[sid] = i
                problems[sid] = (f"duplicate: {name} row {i} repeats the image id {key!r} of "
                                 f"row {first[key]}; only the first row is imported")
            elif "\0" in key:
                sid = f"<row {i}>"
                standins[sid] = i
                problems[sid] = (f"bad-id: {name} row {i}: the image id {key!r} contains a NUL "
                                 "character, which a region set cannot store")
            else:
                first[key] = i
        clash = sorted(set(first) & set(standins))
        if clash:
            raise ImportTsvError(f"{name}: the key {clash[0]!r} is also the stand-in id of an "
                                 f"unusable row; rename that image")
        return cls(sorted([*first, *standins]), {**first, **standins}, problems)

    def ids_digest(self) -> str:
        return bytes_digest("\n".join(self.ids).encode("utf-8")).hex()


# ------------------------------------------------------------------------- rows -> regions

class Converter:
    """One decoded row (``TsvImage`` / ``TsvFailure``) -> what the shard stores.

    Args:
        vocab: the set's vocabulary.
        attributes: attribute slots per box (0: none).
        atol: the geometry tolerance (of the file's dtype).
    """

    def __init__(self, vocab: Vocabulary, attributes: int, atol: float):
        self.vocab, self.k, self.atol = vocab, attributes, atol

    def __call__(self, rec) -> tuple[ImageRegions | Failure, list[str]]:
        if not rec.ok:
            return Failure(rec.image_id or f"<row {rec.row}>", f"bad-row: {rec}"), []
        where = f"row {rec.row}"
        notes = list(rec.notes)
        n, hw = rec.num_regions, rec.image_hw
        if hw is None or min(hw) <= 0:
            return Failure(rec.image_id, f"no-image-size: {where}: no image size for its {n} "
                           "regions (pass --hw hw.tsv, or use label rows with image_h/image_w)"
                           ), notes
        boxes = np.asarray(rec.boxes, np.float32).reshape(n, 4)
        if not np.isfinite(boxes).all():
            return Failure(rec.image_id, f"bad-boxes: {where}: boxes hold NaN or Inf"), notes
        if rec.boxes_from == "geometry" and rec.geometry.shape[1] == 6:
            # boxes came from columns 0-3; columns 4-5 must agree with them
            check = check_geometry(rec.geometry, boxes, hw, atol=self.atol)
            if not check.ok:
                return Failure(rec.image_id, f"bad-geometry: {where}: the geometry columns "
                               f"disagree among themselves ({check}): they are not box "
                               "geometry"), notes
        h, w = hw
        tol_w, tol_h = max(1.0, self.atol * w), max(1.0, self.atol * h)
        out = ((boxes[:, 0] < -tol_w) | (boxes[:, 2] > w + tol_w) | (boxes[:, 1] < -tol_h)
               | (boxes[:, 3] > h + tol_h) | (boxes[:, 2] < boxes[:, 0])
               | (boxes[:, 3] < boxes[:, 1]))
        if out.any():
            i = int(np.argmax(out))
            notes.append(f"{int(out.sum())} box(es) are not inside the {h} x {w} image "
                         f"(box {i}: {boxes[i].tolist()})")
        classes = self._classes(rec, n, notes)
        scores = (np.zeros(n, np.float32) + FILL_SCORE if rec.scores is None
                  else np.asarray(rec.scores, np.float32))
        extras = self._attributes(rec, n, notes) if self.k else None
        return image_regions(rec.image_id, hw, boxes, scores, classes, rec.features,
                             _NO_DIGEST, extras), notes

    def _classes(self, rec, n: int, notes: list[str]) -> np.ndarray:
        v = self.vocab
        if rec.class_names is not None:
            ids = np.fromiter((v.class_index.get(c, -1) for c in rec.class_names), np.int32, n)
            unknown = ids < 0
            if unknown.any():
                names = sorted({c for c, u in zip(rec.class_names, unknown) if u})
                notes.append(f"{int(unknown.sum())} class name(s) not in the vocabulary "
                             f"({', '.join(map(repr, names[:3]))}): class {FILL_CLASS_NAME!r}")
                ids[unknown] = v.fill
            return ids
        if rec.class_ids is not None and v.given:
            ids = np.asarray(rec.class_ids, np.int64)
            bad = (ids < 0) | (ids >= len(v.class_names)) | (ids == v.fill)
            if bad.any():
                notes.append(f"{int(bad.sum())} class id(s) outside the vocabulary: class "
                             f"{FILL_CLASS_NAME!r}")
            return np.where(bad, v.fill, ids).astype(np.int32)
        return np.full(n, v.fill, np.int32)

    def _attributes(self, rec, n: int, notes: list[str]) -> dict[str, np.ndarray]:
        k, index = self.k, self.vocab.attribute_index
        ids = np.full((n, k), -1, np.int32)
        scores = np.zeros((n, k), np.float32)
        unknown: set[str] = set()
        if rec.attr_names is not None:
            for i, names in enumerate(rec.attr_names):
                given = (rec.attr_scores[i, :len(names)] if rec.attr_scores is not None
                         else np.zeros(len(names), np.float32))
                pairs = []
                for name, s in zip(names, given):
                    if name in index:
                        pairs.append((index[name], 0.0 if np.isnan(s) else float(s)))
                    else:
                        unknown.add(name)
                pairs.sort(key=lambda p: -p[1])   # best first (stable for equal scores)
                for j, (a, s) in enumerate(pairs[:k]):
                    ids[i, j], scores[i, j] = a, s
        elif rec.attr_ids is not None and self.vocab.attributes_given:
            a = np.asarray(rec.attr_ids, np.int64)[:, :k]
            ok = (a >= 0) & (a < len(self.vocab.attribute_names))
            ids[:, :a.shape[1]] = np.where(ok, a, -1)
            scores[:, :a.shape[1]] = np.where(ok, rec.attr_scores[:, :k], 0)
        if unknown:
            notes.append(f"attribute name(s) not in the vocabulary, left out: "
                         f"{', '.join(map(repr, sorted(unknown)[:3]))}")
        return {"attr_ids": ids, "attr_scores": scores}
