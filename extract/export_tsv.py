"""`vlkd-extract export-tsv`: a region set as the Oscar/VinVL TSV files Oscar's own scripts read.

Files (``--split train`` prefixes them as VinVL's releases are named; docs/TSV.md has the
layouts and the code that reads each):

- captioning layout (``oscar/run_captioning.py``): ``{split}.feature.tsv`` (json rows,
  ``key<TAB>{"num_boxes", "features"}``, the region features + the geometry columns, float32),
  ``{split}.label.tsv`` (``class``, ``rect``, ``conf`` per region, ``attributes`` /
  ``attr_scores`` when the set has them), ``{split}.hw.tsv``, their ``.lineidx``, and
  ``{split}.yaml`` naming them (``feature:``, ``label:``, ``hw:``, and ``caption:`` with
  ``--captions``: ``{split}_caption.json`` and the ``{split}_caption_coco_format.json`` that
  ``run_captioning.py --do_eval`` scores against). One row per image, the same order in every
  file: ``CaptionTSVDataset`` takes the keys from label.tsv and reads feature row *i* for label
  row *i*.
- vqa layout (``oscar/run_vqa.py --img_feat_format tsv``): ``{split}_img_frcnn_feats.tsv``
  (columns rows, ``key<TAB>N<TAB>base64``) and ``{split}_img_frcnn_feats_offset_map.json``
  (key -> byte offset) for ``--img_feat_dir``.

Geometry columns are recomputed from the stored boxes and ``image_hw``
(:func:`vlkd.data.tsv.make_geometry`). Images without regions are left out of the captioning
files (``run_captioning.py`` reshapes to ``(num_boxes, -1)``, which fails for 0 boxes) and kept
in the vqa file (``run_vqa.py`` reshapes to ``(-1, img_feature_dim)``, which reads 0 rows).
Every image left out, and every image the set lists as failed, is named in ``export.json``.
``labelmap.json`` (VinVL's layout: ``label_to_idx``, ``idx_to_label`` and the attribute maps,
ids from 1) lets ``import-tsv --labelmap`` read the files back with the same class ids.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vlkd import __version__
from vlkd.common.manifest import manifest_digest
from vlkd.common.regionset import RegionSet, RegionSetError
from vlkd.data.captions import load_captions
from vlkd.data.tsv import FeatureTsvWriter, OscarTsvWriter, check_image_id, oscar_vqa_paths

from .options import ExportTsvConfig

#: The report beside the exported files.
REPORT_FILE = "export.json"
LABELMAP_FILE = "labelmap.json"


class ExportTsvError(RuntimeError):
    """The set cannot be exported as asked (the message says why and what to do)."""


@dataclass
class ExportReport:
    """What an export wrote (``export.json``).

    Attributes:
        regions: the set, and its manifest digest.
        files: the files written, relative to the output folder.
        images: images in the captioning files (or the vqa file with ``--layout vqa``).
        left_out: ``{image_id, reason}`` of the set's images not in the captioning files,
            and of the images the set lists as failed.
        captions: captions written (with ``--captions``), and those of images not exported.
    """

    regions: str
    manifest_digest: str
    options: dict
    files: list[str] = field(default_factory=list)
    images: int = 0
    vqa_images: int = 0
    left_out: list[dict] = field(default_factory=list)
    captions: int = 0
    captions_without_image: int = 0
    tool_version: str = __version__

    def summary(self) -> str:
        lines = [f"export-tsv: {self.images} images from {self.regions} -> "
                 + ", ".join(self.files)]
        if self.left_out:
            lines.append(f"  {len(self.left_out)} image(s) left out (listed in {REPORT_FILE}), "
                         f"e.g. {self.left_out[0]['image_id']!r}: {self.left_out[0]['reason']}")
        if self.captions or self.captions_without_image:
            lines.append(f"  {self.captions} captions written; {self.captions_without_image} "
                         "of images not in the export left out")
        return "\n".join(lines)


def _write_json(path: Path, value, **kw) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, **kw)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def labelmap(class_names: list[str], attribute_names: list[str] | None) -> dict:
    """VinVL's labelmap layout (``VG-SGG-dicts-vgoi6-clipped.json``): ids from 1, class ``c`` of
    the set is label ``c + 1`` (0 is the background there), attribute ``a`` is ``a + 1``."""
    out = {"label_to_idx": {}, "idx_to_label": {}}
    for i, n in enumerate(class_names):
        out["label_to_idx"].setdefault(n, i + 1)
        out["idx_to_label"][str(i + 1)] = n
    if attribute_names:
        out["attribute_to_idx"], out["idx_to_attribute"] = {}, {}
        for i, n in enumerate(attribute_names):
            out["attribute_to_idx"].setdefault(n, i + 1)
            out["idx_to_attribute"][str(i + 1)] = n
    return out


def _attributes(record, attribute_names: list[str]):
    """Per region: attribute names (slots with id -1 dropped) and their scores."""
    ids = record.extras.get("attr_ids")
    if ids is None:
        return None, None
    scores = record.extras.get("attr_scores")
    names, vals = [], []
    for i in range(len(ids)):
        keep = ids[i] >= 0
        names.append([attribute_names[a] if a < len(attribute_names) else str(a)
                      for a in ids[i][keep]])
        vals.append(scores[i][keep] if scores is not None else np.zeros(int(keep.sum())))
    width = max((len(v) for v in vals), default=0)
    padded = np.zeros((len(vals), width), np.float32)
    for i, v in enumerate(vals):
        padded[i, :len(v)] = v
    return names, padded


def run_export_tsv(cfg: ExportTsvConfig) -> ExportReport:
    """Write ``cfg.regions`` as Oscar/VinVL TSV files into ``cfg.out`` (see the module).

    Raises:
        ExportTsvError: the set is incomplete or cannot be read.
    """
    try:
        rs = RegionSet(cfg.regions)
    except RegionSetError as e:
        raise ExportTsvError(str(e)) from None
    if rs.missing_shards:
        raise ExportTsvError(
            f"{cfg.regions} is incomplete: shard(s) {rs.missing_shards[:8]} of {rs.num_shards} "
            "are not finished; finish the set first (`vlkd-extract status` lists them)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    m = rs.manifest
    names = list(rs.class_names)
    attr_names = list(m.get("attribute_names") or [])
    split = cfg.split or ""
    report = ExportReport(str(cfg.regions), manifest_digest(m), asdict(cfg))
    captioning = cfg.layout in ("captioning", "both")
    vqa = cfg.layout in ("vqa", "both")
    prefix = f"{split}." if split else ""
    writers = []
    cap_w = vqa_w = None
    if captioning:
        cap_w = OscarTsvWriter(out, prefix=prefix, dtype=cfg.feature_dtype,
                               geometry=cfg.geometry)
        writers.append(cap_w)
    if vqa:
        tsv, offsets = oscar_vqa_paths(out, split)
        # run_vqa.py reads a row without regions as (0, img_feature_dim): keep such images
        vqa_w = FeatureTsvWriter(tsv, layout="columns", dtype=cfg.feature_dtype,
                                 geometry=cfg.geometry, offset_map=offsets, allow_empty=True)
        writers.append(vqa_w)
    exported: set[str] = set()
    try:
        for r in rs:
            iid = r.image_id
            try:
                check_image_id(iid)
            except ValueError as e:
                report.left_out.append({"image_id": iid, "reason": f"bad-id: {e}"})
                continue
            if vqa_w is not None:
                vqa_w.write(iid, r.features, boxes=r.boxes, image_hw=r.image_hw)
                report.vqa_images += 1
            if cap_w is None:
                continue
            if r.num_regions == 0:
                report.left_out.append({"image_id": iid, "reason": (
                    "no-regions: run_captioning.py reshapes a feature row to (num_boxes, -1), "
                    "which fails for 0 boxes, so the image is not in the captioning files")})
                continue
            classes = [names[c] if 0 <= c < len(names) else "" for c in r.classes.tolist()]
            an, asc = _attributes(r, attr_names)
            cap_w.write(iid, r.image_hw, r.boxes, r.features, classes, scores=r.scores,
                        attr_names=an, attr_scores=asc)
            exported.add(iid)
            report.images += 1
    except BaseException:
        for w in writers:
            w.abort()
        raise
    for w in writers:
        w.close()
    if not captioning:
        report.images = report.vqa_images
    for f in m.get("failures", []):
        report.left_out.append({"image_id": f.get("image_id"),
                                "reason": f"failed in the set: {f.get('reason')}"})
    if cap_w is not None:
        report.files += [p.name for p in cap_w.paths.values()]
        yaml_entry = {"feature": cap_w.paths["feature"].name, "label": cap_w.paths["label"].name,
                      "hw": cap_w.paths["hw"].name}
        if cfg.captions:
            yaml_entry["caption"] = _write_captions(cfg, out, split, exported, report)
        _write_yaml(out / f"{split or 'dataset'}.yaml", yaml_entry)
        report.files.append(f"{split or 'dataset'}.yaml")
    if vqa_w is not None:
        tsv, offsets = oscar_vqa_paths(out, split)
        report.files += [tsv.name, offsets.name]
    _write_json(out / LABELMAP_FILE, labelmap(names, attr_names), indent=1, ensure_ascii=False)
    report.files += [LABELMAP_FILE, REPORT_FILE]
    _write_json(out / REPORT_FILE, asdict(report), indent=1, ensure_ascii=False)
    return report


def _write_captions(cfg: ExportTsvConfig, out: Path, split: str, exported: set[str],
                    report: ExportReport) -> str:
    """``{split}_caption.json`` (Oscar's ``[{image_id, caption, id}]``) and its COCO-format
    twin ``{split}_caption_coco_format.json`` (``run_captioning.py``'s
    ``get_caption_file_in_coco_format``: ``splitext(caption)[0] + '_coco_format.json'``; the
    image ids are the TSV keys, as Oscar's ``convert_tsv_to_coco_format`` writes its results)."""
    caps = load_captions(cfg.captions, cfg.caption_split)
    kept = [c for c in caps if c.image_id in exported]
    report.captions_without_image = len(caps) - len(kept)
    report.captions = len(kept)
    name = f"{split}_caption.json" if split else "caption.json"
    rows = [{"image_id": c.image_id, "caption": c.text, "id": i} for i, c in enumerate(kept)]
    _write_json(out / name, rows, ensure_ascii=False)
    coco = {"annotations": rows, "images": [{"id": i} for i in sorted({c.image_id for c in kept})],
            "type": "captions", "info": "dummy", "licenses": "dummy"}
    coco_name = os.path.splitext(name)[0] + "_coco_format.json"
    _write_json(out / coco_name, coco, ensure_ascii=False)
    report.files += [name, coco_name]
    return name


def _write_yaml(path: Path, entry: dict) -> None:
    import yaml

    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("# run_captioning.py --train_yaml / --val_yaml / --test_yaml (paths relative "
                "to this file's folder)\n")
        yaml.safe_dump(entry, f, sort_keys=False, allow_unicode=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


__all__ = ["ExportTsvConfig", "ExportTsvError", "ExportReport", "run_export_tsv", "labelmap",
           "REPORT_FILE", "LABELMAP_FILE"]
