"""Caption annotations: Karpathy's ``dataset_coco.json`` and COCO ``captions_*.json``.

Image ids are strings, the same keys the region sets use (``str(cocoid)`` / ``str(image_id)``),
so captions join region sets by id.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Caption:
    image_id: str
    text: str
    caption_id: str = ""


class AnnotationError(ValueError):
    """An annotation file is not what the reader expected (message says what and what to do)."""


def _load_json(path: str | Path) -> object:
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"annotation file {path} does not exist; pass the path of a COCO "
                              "captions_*.json, Karpathy dataset_coco.json or VQA v2 JSON file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path} is not valid JSON ({e}); expected an annotation file") from e


def detect_caption_format(data: object) -> str:
    """Return ``"karpathy"`` or ``"coco"`` for a loaded caption JSON, or raise AnnotationError."""
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        imgs = data["images"]
        if imgs and isinstance(imgs[0], dict) and "sentences" in imgs[0]:
            return "karpathy"
        if "annotations" in data:
            return "coco"
    raise AnnotationError(
        "caption file format not recognised: expected Karpathy's dataset_coco.json "
        "({'images': [{'cocoid', 'split', 'sentences': [{'raw'}]}]}) or COCO captions "
        "({'images': [...], 'annotations': [{'image_id', 'caption'}]})")


def load_captions(path: str | Path, split: str | None = None) -> list[Caption]:
    """Read captions from a Karpathy split file or a COCO captions file.

    Args:
        path: ``dataset_coco.json`` (Karpathy) or ``captions_*.json`` (COCO).
        split: for Karpathy files, keep only this split (``train``, ``val``, ``test``;
            ``train`` includes ``restval`` as in Oscar/VinVL). Must be None for COCO files,
            whose split is the file itself.

    Returns:
        Captions sorted by (image id, caption id) so that runs are reproducible.
    """
    data = _load_json(path)
    fmt = detect_caption_format(data)
    out: list[Caption] = []
    if fmt == "karpathy":
        want = None if split is None else ({"train", "restval"} if split == "train" else {split})
        splits = sorted({im.get("split", "?") for im in data["images"]})
        for im in data["images"]:
            if want is not None and im.get("split") not in want:
                continue
            iid = str(im.get("cocoid", im.get("imgid")))
            for k, s in enumerate(im["sentences"]):
                text = s.get("raw") or " ".join(s.get("tokens", []))
                out.append(Caption(iid, text.strip(), str(s.get("sentid", k))))
        if want is not None and not out:
            raise AnnotationError(f"{path}: no images in split {split!r}; splits present: {splits}")
    else:
        if split is not None:
            raise AnnotationError(f"{path} is a COCO captions file (one file per split); "
                                  f"--split {split!r} applies to Karpathy files only")
        for a in data["annotations"]:
            out.append(Caption(str(a["image_id"]), str(a["caption"]).strip(), str(a.get("id", ""))))
    out.sort(key=lambda c: (c.image_id, c.caption_id))
    return out


def captions_by_image(captions: list[Caption]) -> dict[str, list[str]]:
    """Group caption texts by image id (the reference sets for evaluation)."""
    refs: dict[str, list[str]] = defaultdict(list)
    for c in captions:
        refs[c.image_id].append(c.text)
    return dict(refs)


def load_pairs(path: str | Path) -> list[Caption]:
    """(image id, caption) pairs for pre-training: a TSV ``image_id<TAB>caption`` file, a JSON
    list of ``{"image_id", "caption"}``, or any caption file :func:`load_captions` reads."""
    path = Path(path)
    if path.suffix in (".tsv", ".txt"):
        out = []
        for ln, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise AnnotationError(f"{path}:{ln}: expected 'image_id<TAB>caption', found "
                                      f"{len(parts)} tab-separated fields")
            out.append(Caption(parts[0].strip(), parts[1].strip(), str(ln)))
        return out
    data = _load_json(path)
    if isinstance(data, list):
        return [Caption(str(d["image_id"]), str(d["caption"]).strip(), str(k))
                for k, d in enumerate(data)]
    return load_captions(path)
