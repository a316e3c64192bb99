"""Visual Token Alignment checks: is a proposals shard intact, is a teacher set aligned with it.

``teacher-features`` pools the teacher's features over the proposals' boxes, so its output is
only meaningful if (a) the proposals shard it read is exactly what ``proposals`` wrote and (b)
teacher shard ``i`` holds the same images, in the same order, with bit-identical boxes, as
proposals shard ``i``. This module holds both checks:

- :func:`verify_proposals_shard` (used before a teacher shard is computed): the shard is
  finalised, holds as many images as its range of the sorted image list minus its failures,
  its ids are in sorted order, its boxes match their digests and its content matches the
  digest recorded in the manifest. Each problem has its own message (an edited box, reordered
  or dropped images, a replaced file) and says what to do.
- :func:`teacher_alignment_findings` (used by ``vlkd-extract validate --against``): the checks
  ``vlkd.common.validate`` does not do because they need to know what a teacher set is: the
  teacher set was made from *this* proposals set (:func:`proposals_identity`), each teacher
  shard from the proposals shard's current content, the same images skipped, the same image
  sizes. ``vlkd.common.validate`` itself compares shard counts, ids and box digests.

A proposals set's ``manifest.json`` grows while its array jobs finish (shard entries,
failures), so its manifest digest changes until the set is complete. A teacher set therefore
records the proposals' *identity* (the digest of the manifest without those growing keys:
detector, options, image list, shard count, creation time) to recognise its proposals set,
and each teacher shard records the content digest of the proposals shard it was made from.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlkd.common.manifest import ManifestError, read_manifest
from vlkd.common.regionset import (ARRAY_NAMES, RegionSetError, ShardDigest, ShardReader,
                                   box_digest, bytes_digest, encode_ids)
# The per-process map cache of shard files: dropped before re-reading a shard that may have
# been rewritten since this process last mapped it (a re-run in the same process, tests).
from vlkd.common.regionset import release_maps
from vlkd.common.sharding import shard_ranges
from vlkd.common.validate import Finding

PROPOSALS_ROLE = "proposals"
TEACHER_ROLE = "teacher-features"
#: Manifest keys that change while a set's shards are being finished.
GROWING_KEYS = ("shards", "failures")
#: Shard attribute (in ``extra``) of a teacher shard: the proposals shard it was made from.
SOURCE_SHARD_ATTR = "aligned_to_shard"
_FEATURE_BLOCK_BYTES = 32 << 20


class AlignmentError(RuntimeError):
    """Teacher features cannot be (or were not) aligned with a proposals set; the message says
    what differs and what to do."""


def proposals_identity(manifest: dict) -> str:
    """Hex digest that identifies a proposals set independently of how many shards are done.

    Args:
        manifest: the proposals set's manifest.

    Returns:
        blake2b-128 hex of the canonical JSON of the manifest without ``shards`` and
        ``failures``. Another detector, option, image list, shard count or a re-created set
        (its ``created`` time) changes it; finishing more shards does not.
    """
    stable = {k: v for k, v in manifest.items() if k not in GROWING_KEYS}
    text = json.dumps(stable, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return bytes_digest(text.encode("utf-8")).hex()


def _short(hexdigest: str | None) -> str:
    return "none" if not hexdigest else hexdigest[:10] + "…"


def shard_content_digest(reader: ShardReader) -> str:
    """Recompute a shard's content digest (docs/FORMAT.md), streaming its features.

    Args:
        reader: an opened or unopened shard reader.

    Returns:
        The hex digest to compare with the manifest entry's ``digest``.
    """
    d = ShardDigest()
    d.add("image_ids", encode_ids(reader.image_ids))
    small = {"image_hw": reader.image_hw, "offsets": reader.offsets, "boxes": reader.boxes,
             "scores": reader.scores, "classes": reader.classes,
             "box_digest": reader.box_digests, "image_digest": reader.image_digests}
    for name in ARRAY_NAMES[1:-1]:
        d.add(name, np.ascontiguousarray(small[name]))
    d.begin("features")
    rows = reader.num_regions
    step = max(1, _FEATURE_BLOCK_BYTES // max(1, reader.feature_dim
                                              * reader.feature_dtype.itemsize))
    for r0 in range(0, rows, step):
        d.feed(reader.features_rows(r0, min(rows, r0 + step)))
    return d.hexdigest()


# ------------------------------------------------------------------------ proposals side

@dataclass
class ProposalsShard:
    """A verified proposals shard, as the teacher job uses it.

    Attributes:
        index: shard index.
        entry: its manifest entry (``name``, ``digest``, ``failures``, ...).
        reader: the open reader (small arrays in memory).
    """

    index: int
    entry: dict
    reader: ShardReader


def read_proposals_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a proposals set, refusing anything else.

    Raises:
        AlignmentError: no manifest, or the set is not a proposals set.
    """
    try:
        m = read_manifest(path)
    except ManifestError as e:
        raise AlignmentError(f"--proposals {path}: {e}") from None
    role = m.get("role")
    if role != PROPOSALS_ROLE:
        raise AlignmentError(
            f"--proposals {path} is a {role!r} set, expected a 'proposals' set (made by "
            "`vlkd-extract proposals` with the student detector); teacher features are pooled "
            "over the student's boxes")
    for key in ("num_shards", "backend"):
        if key not in m:
            raise AlignmentError(f"--proposals {path}: manifest.json has no {key!r}; it was "
                                 "not written by vlkd-extract proposals")
    return m


def complete_shards(manifest: dict) -> dict[int, dict]:
    """Finalised shard entries of a set, by index."""
    return {int(e["index"]): e for e in manifest.get("shards", [])}


def require_complete(path: str | os.PathLike, manifest: dict, indices: list[int]) -> None:
    """Refuse when a selected proposals shard is not finalised.

    Raises:
        AlignmentError: names the missing shards and the complete ones to select instead.
    """
    done = complete_shards(manifest)
    missing = [i for i in indices if i not in done]
    if not missing:
        return
    k = int(manifest["num_shards"])
    ready = sorted(done)
    raise AlignmentError(
        f"the proposals set {path} is incomplete: shard(s) {_fmt_list(missing)} of {k} are not "
        f"finished ({len(ready)} of {k} are). Finish proposals first (re-run the missing array "
        "jobs: `vlkd-extract status` lists them), or pass --shard-index with a complete shard "
        f"({_fmt_list(ready) if ready else 'none yet'})")


def _fmt_list(xs: list[int], limit: int = 12) -> str:
    s = ", ".join(str(x) for x in xs[:limit])
    return s + (f", … ({len(xs)} in all)" if len(xs) > limit else "")


def verify_proposals_shard(path: str | os.PathLike, manifest: dict, index: int, *,
                           check_content: bool = True) -> ProposalsShard:
    """Check one finalised proposals shard before teacher features are pooled over its boxes.

    Args:
        path: the proposals set directory.
        manifest: its manifest (:func:`read_proposals_manifest`).
        index: the shard.
        check_content: also recompute the content digest (reads every feature row once).

    Returns:
        The verified shard.

    Raises:
        AlignmentError: the first problem found, with what differs and what to do.
    """
    path = Path(path)
    entry = complete_shards(manifest).get(index)
    if entry is None:
        require_complete(path, manifest, [index])
    spath = path / entry["name"]
    fix = (f"re-run `vlkd-extract proposals` for shard {index} (delete {spath.name} and its "
           "entry first) or point --proposals at an intact copy")
    if not spath.exists():
        raise AlignmentError(f"proposals shard {spath} is listed in the manifest but missing on "
                             f"disk; {fix}")
    release_maps(spath)
    reader = ShardReader(spath, index=index)
    where = f"proposals shard {index} ({spath.name})"
    try:
        ids = reader.image_ids
        hw, digests = reader.image_hw, reader.box_digests
    except (RegionSetError, OSError, KeyError) as e:
        raise AlignmentError(f"{where} cannot be read ({e}); {fix}") from None
    n = len(ids)
    failed = [f["image_id"] for f in entry.get("failures", [])]
    if entry.get("num_images") != n:
        raise AlignmentError(
            f"{where} holds {n} images but the manifest recorded {entry.get('num_images')}: "
            f"images were dropped or added after proposals wrote it; {fix}")
    total = (manifest.get("image_source") or {}).get("num_images")
    if isinstance(total, int):
        a, b = shard_ranges(total, int(manifest["num_shards"]))[index]
        if n + len(failed) != b - a:
            raise AlignmentError(
                f"{where} holds {n} images and {len(failed)} failure(s), but its range of the "
                f"sorted image list has {b - a} images (positions {a}..{b - 1} of {total}): "
                f"{'an image was dropped' if n + len(failed) < b - a else 'images were added'}"
                f"; {fix}")
    for i in range(n - 1):
        if not ids[i] < ids[i + 1]:
            raise AlignmentError(
                f"{where}: image ids are not in the sorted order proposals writes (image {i} "
                f"{ids[i]!r} comes before image {i + 1} {ids[i + 1]!r}): images were reordered "
                f"or duplicated; {fix}")
    both = sorted(set(failed) & set(ids))
    if both:
        raise AlignmentError(f"{where}: image(s) {both[:3]} are both stored and listed as "
                             f"failed; {fix}")
    o, boxes = reader.offsets, reader.boxes
    for i in range(n):
        got = box_digest(boxes[o[i]:o[i + 1]])
        want = digests[i].tobytes()
        if got != want:
            raise AlignmentError(
                f"{where}: the boxes of image {i} {ids[i]!r} do not match their digest "
                f"(recomputed {got.hex()[:10]}…, stored {want.hex()[:10]}…): boxes were edited "
                f"after proposals wrote them; {fix}")
    if (hw <= 0).any():
        i = int(np.nonzero((hw <= 0).any(axis=1))[0][0])
        raise AlignmentError(f"{where}: image {i} {ids[i]!r} has image_hw {tuple(hw[i])}; {fix}")
    if check_content:
        try:
            got = shard_content_digest(reader)
        except (RegionSetError, OSError) as e:
            raise AlignmentError(f"{where}: features cannot be read ({e}); {fix}") from None
        if got != entry.get("digest"):
            raise AlignmentError(
                f"{where}: content digest {_short(got)} differs from the manifest's "
                f"{_short(entry.get('digest'))}: the shard changed after proposals wrote it "
                f"(edited or replaced); {fix}")
    return ProposalsShard(index, entry, reader)


# -------------------------------------------------------------------------- teacher side

def teacher_alignment_findings(teacher: str | os.PathLike,
                               proposals: str | os.PathLike) -> list[Finding]:
    """Alignment checks of a teacher-features set against a proposals set, beyond the shard
    count, id and box-digest comparison of ``vlkd.common.validate``.

    Args:
        teacher: the teacher-features set.
        proposals: the proposals set it should be aligned with.

    Returns:
        Findings (errors); empty when aligned.
    """
    out: list[Finding] = []
    try:
        tm = read_manifest(teacher)
        pm = read_manifest(proposals)
    except ManifestError as e:
        return [Finding("error", "alignment", str(e))]
    if tm.get("role") != TEACHER_ROLE:
        out.append(Finding("error", "alignment", f"{teacher} is a {tm.get('role')!r} set; "
                           "--against checks a 'teacher-features' set against its proposals"))
        return out
    if pm.get("role") != PROPOSALS_ROLE:
        out.append(Finding("error", "alignment", f"{proposals} is a {pm.get('role')!r} set, "
                           "expected the 'proposals' set the teacher features were made from"))
        return out
    aligned = tm.get("aligned_to") or {}
    ident = proposals_identity(pm)
    if aligned.get("identity") != ident:
        out.append(Finding(
            "error", "alignment",
            f"the teacher set was made from other proposals (identity "
            f"{_short(aligned.get('identity'))} from {aligned.get('path')}, {proposals} has "
            f"{_short(ident)}); check against the set in aligned_to.path, or re-run "
            "teacher-features on these proposals into a new --out"))
        return out
    pentries = complete_shards(pm)
    for te in sorted(tm.get("shards", []), key=lambda e: e["index"]):
        idx = int(te["index"])
        pe = pentries.get(idx)
        name = te.get("name", f"shard {idx}")
        if pe is None:
            continue  # reported by vlkd.common.validate
        tpath = Path(teacher) / name
        try:
            treader = ShardReader(tpath, index=idx)
            attrs = treader.attrs
            thw = treader.image_hw
            tids = treader.image_ids
            preader = ShardReader(Path(proposals) / pe["name"], index=idx)
            phw, pids = preader.image_hw, preader.image_ids
        except Exception as e:  # noqa: BLE001 - unreadable shards are reported by validate
            out.append(Finding("error", name, f"cannot compare with {pe['name']}: {e}"))
            continue
        src = (attrs.get("extra") or {}).get(SOURCE_SHARD_ATTR) or {}
        if src.get("digest") != pe.get("digest"):
            out.append(Finding(
                "error", name,
                f"made from proposals shard content {_short(src.get('digest'))}, but "
                f"{pe['name']} of {proposals} now has {_short(pe.get('digest'))}: the proposals "
                f"shard was re-extracted after; re-run teacher-features for shard {idx} (delete "
                f"{name} and its manifest entry first)"))
        tfail = sorted(f["image_id"] for f in te.get("failures", []))
        pfail = sorted(f["image_id"] for f in pe.get("failures", []))
        if tfail != pfail:
            out.append(Finding(
                "error", name,
                f"skipped images {tfail[:3]}{'…' if len(tfail) > 3 else ''} ({len(tfail)}) "
                f"differ from the images that failed in proposals {pfail[:3]}"
                f"{'…' if len(pfail) > 3 else ''} ({len(pfail)})"))
        if list(tids) == list(pids) and thw.shape == phw.shape and (thw != phw).any():
            i = int(np.nonzero((thw != phw).any(axis=1))[0][0])
            out.append(Finding(
                "error", f"{name}[image {i} {tids[i]!r}]",
                f"image_hw {tuple(thw[i])} differs from the proposals' {tuple(phw[i])}: the "
                "teacher read another image under this id"))
    return out


__all__ = ["AlignmentError", "ProposalsShard", "proposals_identity", "shard_content_digest",
           "read_proposals_manifest", "complete_shards", "require_complete",
           "verify_proposals_shard", "teacher_alignment_findings", "PROPOSALS_ROLE",
           "TEACHER_ROLE", "SOURCE_SHARD_ATTR"]
