"""Image sources for extraction and safe decoding of untrusted image files.

A *source* turns what the user points ``--images`` at into a sorted list of
:class:`ImageRecord` (a stable string id and a path):

- a folder, searched recursively for the usual image extensions; the id is the path relative
  to the folder without its extension (``val2014/COCO_val2014_000000000042``);
- a list file, one ``path`` or ``path<TAB>image_id`` per line (relative paths are relative to
  ``image_root`` when given, else to the list file's folder; the default id is the path as
  written, without its extension);
- a COCO-style JSON (``images[].file_name`` and ``images[].id``; id ``str(id)``), paths
  relative to ``image_root``;
- Karpathy's ``dataset_coco.json`` (``images[].filepath``/``filename``/``cocoid``; id
  ``str(cocoid)``, the key the caption readers use), paths relative to ``image_root``.

Ids are unique; records are sorted by id, the order sharding splits.

:func:`read_image` decodes one file into an RGB ``uint8`` array or raises
:class:`ImageDecodeError` whose ``kind`` says why the image cannot be used (missing,
unreadable, empty, not-an-image, corrupt, truncated, too-large). Gray, CMYK, RGBA, palette
and 16-bit images are converted to 8-bit RGB, and the EXIF orientation is applied, so the
"original image" frame that boxes are stored in is the upright image a viewer shows.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from vlkd.common.regionset import bytes_digest

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                    ".ppm", ".pgm", ".pbm", ".jfif")
# Pillow's own default guard (about 0.25 GiB of 8-bit RGB); --max-pixels changes it.
DEFAULT_MAX_PIXELS = 89_478_485

SOURCE_KINDS = ("folder", "list", "coco", "karpathy")


class ImageSourceError(ValueError):
    """The image source cannot be read as a list of images (message says what to do)."""


class ImageDecodeError(Exception):
    """An image file that cannot be used.

    Attributes:
        kind: one of ``missing``, ``unreadable``, ``empty``, ``not-an-image``, ``corrupt``,
            ``truncated``, ``too-large``.
        detail: what was found.
    """

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class ImageRecord:
    """One image of a source: its stable id and where its file is."""

    image_id: str
    path: str


@dataclass(frozen=True)
class ImageSource:
    """A sorted, duplicate-free list of images.

    Attributes:
        kind: ``folder``, ``list``, ``coco`` or ``karpathy``.
        path: the folder or file the source was read from.
        records: the images, sorted by id.
    """

    kind: str
    path: str
    records: tuple[ImageRecord, ...]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[ImageRecord]:
        return iter(self.records)

    def ids_digest(self) -> str:
        """Hex digest of the sorted id list: two sources with the same ids in the same order
        (whatever their root) have the same digest, so a set can refuse another image list."""
        return bytes_digest("\n".join(r.image_id for r in self.records).encode("utf-8")).hex()

    def manifest_info(self) -> dict:
        """The ``image_source`` entry of a region-set manifest."""
        return {"kind": self.kind, "path": self.path, "num_images": len(self.records),
                "ids_digest": self.ids_digest()}


def _strip_ext(p: str) -> str:
    root, ext = os.path.splitext(p)
    return root if ext else p


def _finish(kind: str, path: Path, records: list[ImageRecord]) -> ImageSource:
    if not records:
        raise ImageSourceError(f"{kind} source {path} lists no images; expected at least one "
                               f"file with one of the extensions {', '.join(IMAGE_EXTENSIONS)}"
                               if kind == "folder" else
                               f"{kind} source {path} lists no images; check the file")
    records.sort(key=lambda r: r.image_id)
    dups = sorted({a.image_id for a, b in zip(records, records[1:]) if a.image_id == b.image_id})
    if dups:
        shown = ", ".join(repr(d) for d in dups[:5])
        raise ImageSourceError(
            f"{kind} source {path}: {len(dups)} image id(s) occur more than once ({shown}); "
            "ids must be unique: rename the files or give explicit ids (path<TAB>id list file)")
    return ImageSource(kind, str(path), tuple(records))


def folder_source(root: str | Path) -> ImageSource:
    """All image files under ``root`` (recursive, symlinks followed); id = relative path
    without extension, with ``/`` separators."""
    root = Path(root)
    records = []
    for dirpath, _dirs, files in os.walk(root, followlinks=True):
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                full = Path(dirpath) / name
                rel = full.relative_to(root).as_posix()
                records.append(ImageRecord(_strip_ext(rel), str(full)))
    return _finish("folder", root, records)


def list_source(list_file: str | Path, image_root: str | Path | None = None) -> ImageSource:
    """A text file of ``path`` or ``path<TAB>image_id`` lines (blank lines and ``#`` comments
    ignored)."""
    list_file = Path(list_file)
    base = Path(image_root) if image_root is not None else list_file.parent
    records = []
    for ln, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), 1):
        line = line.rstrip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) > 2 or not parts[0].strip():
            raise ImageSourceError(f"{list_file}:{ln}: expected 'path' or 'path<TAB>image_id', "
                                   f"found {line!r}")
        rel = parts[0].strip()
        iid = parts[1].strip() if len(parts) == 2 else _strip_ext(rel)
        if not iid:
            raise ImageSourceError(f"{list_file}:{ln}: empty image id after the tab")
        records.append(ImageRecord(iid, str(base / rel)))
    return _finish("list", list_file, records)


def _need_root(kind: str, path: Path, image_root) -> Path:
    if image_root is None:
        raise ImageSourceError(f"{path} is a {kind} JSON file: its file names are relative, "
                               "so pass --image-root (the folder holding the images)")
    return Path(image_root)


def coco_source(json_file: str | Path, image_root: str | Path | None) -> ImageSource:
    """COCO-style ``{"images": [{"id", "file_name"}]}``; id ``str(id)``."""
    json_file = Path(json_file)
    data = _load_json(json_file)
    root = _need_root("COCO", json_file, image_root)
    records = [ImageRecord(str(im["id"]), str(root / im["file_name"])) for im in data["images"]]
    return _finish("coco", json_file, records)


def karpathy_source(json_file: str | Path, image_root: str | Path | None) -> ImageSource:
    """Karpathy's ``dataset_coco.json``: path ``image_root/filepath/filename``, id
    ``str(cocoid)`` (``imgid`` when there is no ``cocoid``)."""
    json_file = Path(json_file)
    data = _load_json(json_file)
    root = _need_root("Karpathy", json_file, image_root)
    records = []
    for im in data["images"]:
        iid = str(im.get("cocoid", im.get("imgid")))
        records.append(ImageRecord(iid, str(root / im.get("filepath", "") / im["filename"])))
    return _finish("karpathy", json_file, records)


def _load_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ImageSourceError(f"{path} is not valid JSON ({e}); expected a COCO or Karpathy "
                               "image list") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ImageSourceError(f"{path}: expected a JSON object with an 'images' list (COCO "
                               "'images[].file_name/id' or Karpathy 'images[].filename/cocoid')")
    return data


def open_image_source(spec: str | Path, image_root: str | Path | None = None) -> ImageSource:
    """Recognise what ``spec`` is and read it.

    Args:
        spec: a folder, a list file (any non-JSON file), or a COCO / Karpathy JSON file.
        image_root: folder that relative paths in JSON files (and list files, when given)
            are relative to.

    Returns:
        The source, records sorted by id.
    """
    p = Path(spec)
    if p.is_dir():
        return folder_source(p)
    if not p.is_file():
        raise ImageSourceError(f"--images {spec}: no such folder or file; expected a folder of "
                               "images, a list file, a COCO JSON or Karpathy's dataset_coco.json")
    if p.suffix.lower() == ".json":
        data = _load_json(p)
        first = data["images"][0] if data["images"] else {}
        if "filename" in first and ("cocoid" in first or "imgid" in first):
            return karpathy_source(p, image_root)
        if "file_name" in first and "id" in first:
            return coco_source(p, image_root)
        raise ImageSourceError(f"{p}: 'images' entries have keys {sorted(first)}; expected COCO "
                               "('id', 'file_name') or Karpathy ('cocoid', 'filepath', "
                               "'filename')")
    return list_source(p, image_root)


@dataclass
class DecodedImage:
    """An image ready for a detector.

    Attributes:
        rgb: (H, W, 3) uint8, RGB, EXIF orientation applied.
        digest: 16-byte digest of the file's bytes (``bytes_digest``; equals ``file_digest``).
    """

    rgb: np.ndarray
    digest: bytes

    @property
    def hw(self) -> tuple[int, int]:
        return int(self.rgb.shape[0]), int(self.rgb.shape[1])


@contextlib.contextmanager
def _strict_pillow():
    # Our own pixel limit (checked from the header, before decoding) replaces Pillow's global
    # one, so that --max-pixels above Pillow's default works; and a truncated file must be an
    # error, not grey pixels. Both settings are Pillow module globals: restore them afterwards
    # so the rest of the process keeps its own.
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def to_rgb_array(im: Image.Image) -> np.ndarray:
    """Convert a loaded PIL image of any mode to (H, W, 3) uint8 RGB.

    16-bit integer samples (modes ``I;16*`` and ``I``) keep their high byte (``v >> 8``), not
    Pillow's ``convert``, which clips everything above 255 to white. Alpha is dropped as
    detectron2's ``read_image`` does (``convert("RGB")``), so a model sees what it was trained
    on.
    """
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im).astype(np.int64)
        a = (np.clip(a, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if mode == "F":
        a = np.clip(np.asarray(im), 0, 255).astype(np.uint8)
        return np.repeat(a[:, :, None], 3, axis=2)
    if mode != "RGB":
        im = im.convert("RGB")
    return np.array(im, dtype=np.uint8)  # copy: independent of the PIL buffer


def decode_image_bytes(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an encoded image into RGB, refusing what cannot be used.

    Args:
        data: the file's bytes.
        max_pixels: largest width * height accepted (checked from the header before any pixel
            is decoded: a decompression bomb is refused without allocating it).

    Returns:
        (H, W, 3) uint8 RGB array, EXIF orientation applied.

    Raises:
        ImageDecodeError: ``empty``, ``not-an-image``, ``too-large``, ``truncated`` or
            ``corrupt``.
    """
    if not data:
        raise ImageDecodeError("empty", "the file has 0 bytes")
    with _strict_pillow():
        try:
            im = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            head = data[:16]
            raise ImageDecodeError("not-an-image", f"no image format recognises the file "
                                   f"({len(data)} bytes, starting {head!r})") from None
        except Exception as e:  # noqa: BLE001 - any decoder failure means "cannot use"
            raise ImageDecodeError("corrupt", f"{type(e).__name__}: {e}") from None
        w, h = im.size
        if w * h > max_pixels:
            raise ImageDecodeError(
                "too-large", f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
                "(decompression-bomb guard); raise --max-pixels if the image is genuine")
        if w <= 0 or h <= 0:
            raise ImageDecodeError("corrupt", f"image header says size {w}x{h}")
        try:
            im.load()
            im = ImageOps.exif_transpose(im)
            rgb = to_rgb_array(im)
        except Exception as e:  # noqa: BLE001
            msg = f"{type(e).__name__}: {e}"
            kind = "truncated" if "truncat" in msg.lower() else "corrupt"
            raise ImageDecodeError(kind, msg) from None
    return rgb


def read_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Read and decode one image file.

    Args:
        path: the file.
        max_pixels: see :func:`decode_image_bytes`.

    Returns:
        The decoded image and the digest of the file's bytes (the same bytes that were decoded).

    Raises:
        ImageDecodeError: with ``kind`` ``missing`` or ``unreadable`` for files that cannot be
            read, or any kind of :func:`decode_image_bytes`.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageDecodeError("missing", f"{path} does not exist") from None
    except IsADirectoryError:
        raise ImageDecodeError("unreadable", f"{path} is a directory, not a file") from None
    except PermissionError:
        raise ImageDecodeError("unreadable", f"{path}: permission denied") from None
    except OSError as e:
        raise ImageDecodeError("unreadable", f"{path}: {e.strerror or e}") from None
    return DecodedImage(decode_image_bytes(data, max_pixels=max_pixels), bytes_digest(data))
