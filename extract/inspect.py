"""`vlkd-extract inspect` and the report of `vlkd-extract validate`: what a region set holds.

- :func:`summarize_set`: role, detector, shards, images, regions per image (min/mean/max),
  feature dim and dtype, the most frequent object tags, failures, size on disk. Reads only the
  small per-image arrays, never the features.
- :func:`draw_image`: one image with its best boxes by score as a PNG, each box numbered in
  its colour and the numbers' object tags (class name and score) in a legend under the
  image. Given a teacher set and its proposals (they share the boxes), the student's tags and
  the teacher's are drawn side by side, box ``j`` in the same colour in both panels; given
  the teacher's own proposals too, a third panel shows the boxes the teacher reads without
  Visual Token Alignment over the student's in grey: the mismatch VTA removes.
- :func:`validate_report`: the findings of ``vlkd.common.validate`` (the alignment of a
  teacher set included: ``vlkd.common.alignment``) as a table, and the exit status.
"""
from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlkd.common.alignment import TEACHER_ROLE
from vlkd.common.manifest import ManifestError, read_manifest
from vlkd.common.regionset import RegionSet, RegionSetError
from vlkd.common.validate import Finding, validate_region_set
from vlkd.data.images import ImageDecodeError, ImageSourceError, open_image_source, read_image


#: Distinct colours for boxes (box j gets colour j mod len): Tableau 10.
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


class InspectError(RuntimeError):
    """The set, the image or its file cannot be shown (message says what to do)."""


# ---------------------------------------------------------------------------------- summary

def _size_on_disk(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def summarize_set(path: str | os.PathLike, top_classes: int = 5) -> dict:
    """Summarise a region set from its manifest and small arrays.

    Args:
        path: the set directory.
        top_classes: how many of the most frequent classes to list.

    Returns:
        A JSON-serialisable dict (see :func:`format_summary` for the fields).
    """
    path = Path(path)
    try:
        rs = RegionSet(path)
    except RegionSetError as e:
        raise InspectError(str(e)) from None
    m = rs.manifest
    counts = []
    class_counts = np.zeros(max(1, len(rs.class_names)), np.int64)
    for shard in rs.shards:
        counts.append(np.diff(shard.offsets))
        c = shard.classes
        if c.size:
            c = c[(c >= 0)]
            if c.size and c.max() >= class_counts.size:
                class_counts = np.pad(class_counts, (0, int(c.max()) + 1 - class_counts.size))
            class_counts += np.bincount(c, minlength=class_counts.size)
    per_image = np.concatenate(counts) if counts else np.zeros(0, np.int64)
    names = rs.class_names
    order = np.argsort(-class_counts, kind="stable")[:top_classes]
    total_regions = int(per_image.sum())
    top = [{"class": int(i), "name": names[i] if i < len(names) else f"class_{i}",
            "regions": int(class_counts[i]),
            "fraction": float(class_counts[i] / total_regions) if total_regions else 0.0}
           for i in order if class_counts[i] > 0]
    det = m.get("detector") or {}
    pre = m.get("preprocessing") or {}
    failures = m.get("failures", [])
    out = {
        "path": str(path),
        "role": m.get("role"),
        "detector": {k: det.get(k) for k in ("name", "kind", "roi_heads", "config_digest",
                                             "weights_digest") if k in det},
        "input_size": f"{pre.get('min_size')}/{pre.get('max_size')} {pre.get('input_format')}"
        if pre else None,
        "backend": m.get("backend"),
        "num_shards": rs.num_shards,
        "complete_shards": len(rs.shards),
        "missing_shards": rs.missing_shards,
        "images": int(per_image.size),
        "regions": total_regions,
        "regions_per_image": {
            "min": int(per_image.min()) if per_image.size else 0,
            "mean": float(per_image.mean()) if per_image.size else 0.0,
            "max": int(per_image.max()) if per_image.size else 0,
            "images_without_regions": int((per_image == 0).sum())},
        "feature_dim": rs.feature_dim,
        "feature_dtype": rs.feature_dtype.name,
        "num_classes": len(names),
        "top_classes": top,
        "failures": len(failures),
        "failure_examples": [{"image_id": f.get("image_id"), "reason": f.get("reason")}
                             for f in failures[:5]],
        "bytes_on_disk": _size_on_disk(path),
    }
    if m.get("aligned_to"):
        a = m["aligned_to"]
        out["aligned_to"] = {"path": a.get("path"), "manifest_digest": a.get("manifest_digest")}
    return out


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def format_summary(s: dict) -> str:
    """The summary as an aligned two-column table."""
    rpi = s["regions_per_image"]
    det = s["detector"]
    rows = [
        ("set", s["path"]),
        ("role", str(s["role"])),
        ("detector", f"{det.get('name')} ({det.get('kind') or det.get('roi_heads')}), input "
                     f"{s['input_size']}"),
    ]
    if "aligned_to" in s:
        rows.append(("aligned to", f"{s['aligned_to']['path']} (manifest "
                                   f"{str(s['aligned_to']['manifest_digest'])[:12]}…)"))
    shards = f"{s['complete_shards']} of {s['num_shards']} complete ({s['backend']})"
    if s["missing_shards"]:
        miss = s["missing_shards"]
        shards += f"; missing {miss[:10]}{' …' if len(miss) > 10 else ''}"
    rows += [
        ("shards", shards),
        ("images", str(s["images"])),
        ("regions", str(s["regions"])),
        ("regions / image", f"min {rpi['min']}, mean {rpi['mean']:.1f}, max {rpi['max']}"
                            f" ({rpi['images_without_regions']} image(s) with none)"),
        ("features", f"{s['feature_dim']} x {s['feature_dtype']}"),
        ("classes", f"{s['num_classes']}; most frequent: " + (", ".join(
            f"{t['name']} {100 * t['fraction']:.0f}%" for t in s["top_classes"]) or "none")),
        ("failures", str(s["failures"])),
    ]
    for f in s["failure_examples"]:
        rows.append(("", f"{f['image_id']}: {f['reason']}"))
    rows.append(("size on disk", _human_bytes(s["bytes_on_disk"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# ---------------------------------------------------------------------------------- drawing

def _find_image(image_id: str, manifest: dict, images: str | None,
                image_root: str | None) -> str:
    if images is None:
        src = manifest.get("image_source") or {}
        images = src.get("path")
        if images is None or not os.path.exists(images):
            raise InspectError(
                f"the set's image source {images!r} is not here; pass --images (and "
                "--image-root) pointing at the images")
        if src.get("kind") in ("coco", "karpathy") and image_root is None:
            raise InspectError(f"the set's image source {images} is a {src['kind']} JSON file; "
                               "pass --image-root (the folder holding the images)")
    try:
        source = open_image_source(images, image_root)
    except ImageSourceError as e:
        raise InspectError(str(e)) from None
    for r in source.records:
        if r.image_id == image_id:
            return r.path
    raise InspectError(f"image {image_id!r} is not in the image source {images}; pass --images "
                       "pointing at a source that holds it")


def _label_font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


@dataclass
class Panel:
    """One panel of :func:`render_panels`: boxes over the image, each with a number tag, and
    a legend of the numbers under the image.

    Attributes:
        title: the line above the panel.
        boxes: (n, 4) x1 y1 x2 y2 in the image's pixels.
        labels: n legend texts (``circle 0.98``); the legend prefixes each with its number.
        colors: n RGB colours (default: :data:`PALETTE` by position).
        under: (m, 4) boxes drawn thin and grey beneath, for comparison (another panel's).
    """

    title: str
    boxes: np.ndarray
    labels: list[str]
    colors: list[tuple[int, int, int]] | None = None
    under: np.ndarray | None = None


TITLE_H = 20          # px of the title strip above each panel
LEGEND_ROW_H = 16     # px of one legend line under each panel


def _overlaps(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_tags(boxes: np.ndarray, sizes: list[tuple[float, float]], width: float,
               height: float) -> list[tuple[float, float, float, float]]:
    """Where each box's number tag goes: the first of a few spots around its corners (above
    the top-left corner first) that lies in the image and covers no tag placed before it;
    when every spot is taken, the first spot pushed down past the tags it would cover.

    Args:
        boxes: (n, 4) boxes in the drawing's pixels, best first (earlier boxes choose first).
        sizes: (w, h) of each tag.
        width, height: the drawing's size.

    Returns:
        n rectangles (x1, y1, x2, y2), pairwise disjoint whenever the image has room.
    """
    placed: list[tuple[float, float, float, float]] = []
    for (x1, y1, x2, y2), (w, h) in zip(np.asarray(boxes, float).tolist(), sizes):
        spots = [(x1, y1 - h), (x1, y1), (x1, y2), (x2 - w, y2 - h), (x2 - w, y1 - h),
                 (x2, y1), (x1 - w, y1)]
        rects = [(min(max(0.0, x), width - w), min(max(0.0, y), height - h)) for x, y in spots]
        rects = [(x, y, x + w, y + h) for x, y in rects]
        free = [r for r in rects if not any(_overlaps(r, q) for q in placed)]
        if free:
            placed.append(free[0])
            continue
        x, y, _, _ = rects[0]
        while any(_overlaps((x, y, x + w, y + h), q) for q in placed) and y + h < height:
            y = max(q[3] for q in placed if _overlaps((x, y, x + w, y + h), q))
        placed.append((x, y, x + w, y + h))
    return placed


def render_panels(rgb: np.ndarray, panels: list[Panel]) -> Image.Image:
    """Draw the image once per panel with that panel's boxes, side by side.

    Each box gets a number tag in its colour, placed where it covers no other tag
    (:func:`place_tags`), and the legend under the image says what each number is, so labels
    stay readable however the boxes overlap. Boxes and their colours follow the panel's
    order: two panels over the same boxes show box ``j`` in the same colour.

    Args:
        rgb: (H, W, 3) uint8 image.
        panels: the panels, left to right.

    Returns:
        The figure: ``len(panels)`` columns of the (upscaled) image width, a title strip of
        :data:`TITLE_H` px on top and :data:`LEGEND_ROW_H` px per legend line at the bottom.
    """
    h, w = rgb.shape[:2]
    # Labels stay readable on small images: draw on an upscaled copy.
    scale = max(1.0, 480.0 / max(h, w))
    sw, sh = int(round(w * scale)), int(round(h * scale))
    base = Image.fromarray(rgb).resize((sw, sh), Image.BILINEAR) if scale > 1 else \
        Image.fromarray(rgb)
    font = _label_font(12)
    rows = max([len(p.labels) for p in panels] + [0])
    fig = Image.new("RGB", (sw * len(panels), TITLE_H + sh + LEGEND_ROW_H * rows + 4),
                    (255, 255, 255))
    fd = ImageDraw.Draw(fig)
    for k, p in enumerate(panels):
        colors = p.colors or [PALETTE[j % len(PALETTE)] for j in range(len(p.labels))]
        panel = base.copy()
        d = ImageDraw.Draw(panel)
        for b in (p.under if p.under is not None else np.zeros((0, 4))):
            d.rectangle([float(v) * scale for v in b], outline=(200, 200, 200), width=1)
        boxes = np.asarray(p.boxes, float).reshape(-1, 4) * scale
        tags = [str(j + 1) for j in range(len(boxes))]
        sizes = []
        for t in tags:
            l, t_, r, b = d.textbbox((0, 0), t, font=font)
            sizes.append((r - l + 6, b - t_ + 4))
        for b, color in zip(boxes.tolist(), colors):
            d.rectangle(b, outline=color, width=2)
        for t, (x1, y1, x2, y2), color in zip(tags, place_tags(boxes, sizes, sw, sh), colors):
            d.rectangle([x1, y1, x2 - 1, y2 - 1], fill=color)
            d.text((x1 + 3, y1 + 1), t, fill=(255, 255, 255), font=font)
        fig.paste(panel, (k * sw, TITLE_H))
        fd.text((k * sw + 4, 3), p.title, fill=(0, 0, 0), font=font)
        for j, (label, color) in enumerate(zip(p.labels, colors)):
            y = TITLE_H + sh + 2 + j * LEGEND_ROW_H
            fd.rectangle([k * sw + 4, y + 2, k * sw + 14, y + 12], fill=color)
            fd.text((k * sw + 20, y), f"{j + 1}: {label}", fill=(0, 0, 0), font=font)
    return fig


def _labels(classes: np.ndarray, scores: np.ndarray, names: list[str]) -> list[str]:
    return [f"{names[c] if 0 <= c < len(names) else f'class_{c}'} {s:.2f}"
            for c, s in zip(classes.tolist(), scores.tolist())]


def _regions_of(rs: RegionSet, image_id: str):
    try:
        return rs.get(image_id)
    except KeyError:
        failed = [f for f in rs.manifest.get("failures", []) if f.get("image_id") == image_id]
        why = f" (it failed: {failed[0].get('reason')})" if failed else ""
        raise InspectError(f"image {image_id!r} is not in {rs.path}{why}") from None


def _top(scores: np.ndarray, k: int | None) -> np.ndarray:
    """Indices of the ``k`` best scores, best first (ties: stored order)."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    return order if k is None else order[:k]


def _who(rs: RegionSet) -> str:
    role = rs.manifest.get("role", "?")
    return {"proposals": "student", TEACHER_ROLE: "teacher"}.get(role, role)


def draw_image(set_dir: str | os.PathLike, image_id: str, out_png: str | os.PathLike, *,
               other: str | os.PathLike | None = None, images: str | None = None,
               image_root: str | None = None, max_boxes: int | None = None,
               unaligned: str | os.PathLike | None = None) -> str:
    """Draw one image's best boxes with the object tags of one set, or of two sets side by
    side, and optionally a set with its own boxes for the same image.

    Args:
        set_dir: a region set.
        image_id: the image.
        out_png: where to write the PNG.
        other: a second set with the same boxes for this image (default for a teacher set:
            its proposals at ``aligned_to.path``, when that exists); drawn beside the first,
            box ``j`` in the same colour in both.
        images, image_root: where the image file is (default: the set's image source).
        max_boxes: draw only the best boxes by score (the proposals' scores for two sets).
        unaligned: a set with its own boxes for this image (the teacher's own proposals),
            drawn as a last panel over the first set's boxes in grey: the tokens a teacher
            reads without Visual Token Alignment, against those it reads with it.

    Returns:
        A one-line note of what was drawn.

    Raises:
        InspectError: the image is not in the set(s), cannot be found or read, has another
            size than stored, or the two sets' boxes differ for it.
    """
    sets = [RegionSet(set_dir)]
    m = sets[0].manifest
    if other is None and m.get("role") == TEACHER_ROLE:
        p = (m.get("aligned_to") or {}).get("path")
        if p and os.path.exists(os.path.join(p, "manifest.json")):
            other = p
    if other is not None:
        sets.append(RegionSet(other))
        # Student (proposals) on the left, teacher on the right.
        if sets[0].manifest.get("role") == TEACHER_ROLE:
            sets.reverse()
    regions = [_regions_of(rs, image_id) for rs in sets]
    if len(regions) == 2 and regions[0].box_digest != regions[1].box_digest:
        raise InspectError(f"the two sets have different boxes for {image_id!r} (box digests "
                           f"{regions[0].box_digest.hex()[:10]}… vs "
                           f"{regions[1].box_digest.hex()[:10]}…): they are not aligned, so "
                           "their tags cannot be compared box by box")
    own = None
    if unaligned is not None:
        own_set = RegionSet(unaligned)
        own = (own_set, _regions_of(own_set, image_id))
        if tuple(own[1].image_hw) != tuple(regions[0].image_hw):
            raise InspectError(f"{own_set.path} stored image {image_id!r} as "
                               f"{own[1].image_hw[0]}x{own[1].image_hw[1]}, {sets[0].path} as "
                               f"{regions[0].image_hw[0]}x{regions[0].image_hw[1]}: not the "
                               "same image")
    path = _find_image(image_id, m, images, image_root)
    try:
        dec = read_image(path)
    except ImageDecodeError as e:
        raise InspectError(f"{path}: {e}") from None
    if tuple(dec.hw) != tuple(regions[0].image_hw):
        raise InspectError(f"{path} is {dec.hw[0]}x{dec.hw[1]} but the set stored image "
                           f"{image_id!r} as {regions[0].image_hw[0]}x{regions[0].image_hw[1]}; "
                           "pass --images pointing at the images the set was made from")
    keep = _top(regions[0].scores, max_boxes)
    boxes = regions[0].boxes[keep]
    panels = []
    for rs, r in zip(sets, regions):
        det = (rs.manifest.get("detector") or {}).get("name", "?")
        shared = " (same boxes)" if len(sets) == 2 and rs is sets[1] else ""
        panels.append(Panel(f"{_who(rs)} tags{shared} ({det})", boxes,
                            _labels(r.classes[keep], r.scores[keep], rs.class_names)))
    if own is not None:
        rs, r = own
        top = _top(r.scores, max_boxes)
        det = (rs.manifest.get("detector") or {}).get("name", "?")
        panels.append(Panel(f"own boxes of {det} (no VTA); grey: the boxes at left",
                            r.boxes[top], _labels(r.classes[top], r.scores[top],
                                                  rs.class_names),
                            colors=[PALETTE[(len(PALETTE) - 1 - j) % len(PALETTE)]
                                    for j in range(len(top))], under=boxes))
    fig = render_panels(dec.rgb, panels)
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.save(out_png, format="PNG")
    return (f"drew the best {len(keep)} of {regions[0].num_regions} box(es) of {image_id!r} "
            f"with {' and '.join(p.title for p in panels)} to {out_png}")


# ------------------------------------------------------------------------------- validation

def validate_report(set_dir: str | os.PathLike, *, against: str | None = None,
                    check_features: bool = True) -> tuple[str, int]:
    """Validate a set (and its alignment) and render the findings as a table.

    Args:
        set_dir: the set.
        against: the proposals set a teacher set must be aligned with (default: the teacher
            set's ``aligned_to.path`` when it exists).
        check_features: stream every feature row (NaN/Inf, content digests).

    Returns:
        ``(text, exit status)``: 0 clean, 1 errors, 2 warnings only.
    """
    notes = []
    try:
        m = read_manifest(set_dir)
    except ManifestError:
        m = {}
    if against is None and m.get("role") == TEACHER_ROLE:
        p = (m.get("aligned_to") or {}).get("path")
        if p and os.path.exists(os.path.join(p, "manifest.json")):
            against = p
            notes.append(f"alignment checked against {p} (aligned_to.path)")
        else:
            notes.append(f"alignment not checked: its proposals set {p!r} is not here (pass "
                         "--against)")
    teacher = m.get("role") == TEACHER_ROLE
    findings = validate_region_set(set_dir, against=against if teacher else None,
                                   check_features=check_features)
    if against is not None and m and not teacher:
        findings.append(Finding("error", "alignment", f"{set_dir} is a {m.get('role')!r} set; "
                                "--against checks a teacher-features set against its "
                                "proposals"))
    errors = sum(f.level == "error" for f in findings)
    warnings = len(findings) - errors
    lines = [format_findings(findings)] if findings else []
    lines += notes
    if not findings:
        what = "features streamed" if check_features else "small arrays only"
        lines.append(f"{set_dir}: clean ({what})")
    else:
        lines.append(f"{set_dir}: {errors} error(s), {warnings} warning(s)")
    return "\n".join(lines), (1 if errors else 2 if warnings else 0)


def format_findings(findings: list[Finding], width: int = 100) -> str:
    """Findings as a table: level, where, message (wrapped)."""
    if not findings:
        return ""
    wl = max(5, max(len(f.level) for f in findings))
    ww = min(44, max(5, max(len(f.where) for f in findings)))
    mw = max(30, width - wl - ww - 4)
    out = [f"{'level':<{wl}}  {'where':<{ww}}  message", f"{'-' * wl}  {'-' * ww}  {'-' * mw}"]
    for f in sorted(findings, key=lambda f: f.level != "error"):
        where = f.where if len(f.where) <= ww else "…" + f.where[-(ww - 1):]
        # Paths and option names stay whole (copy-pasteable).
        msg = textwrap.wrap(f.message, mw, break_on_hyphens=False,
                            break_long_words=False) or [""]
        out.append(f"{f.level:<{wl}}  {where:<{ww}}  {msg[0]}")
        out += [f"{'':<{wl}}  {'':<{ww}}  {m}" for m in msg[1:]]
    return "\n".join(out)


__all__ = ["InspectError", "summarize_set", "format_summary", "Panel", "place_tags",
           "draw_image", "render_panels", "validate_report", "format_findings"]
