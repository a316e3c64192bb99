"""The teacher job's input check: a proposals shard is intact before features are pooled over it.

``teacher-features`` pools the teacher's features over the proposals' boxes, so its output is
only meaningful if the proposals shard it reads is exactly what ``proposals`` wrote.
:func:`verify_proposals_shard` checks that: the shard is finalised, holds as many images as
its range of the sorted image list minus its failures, its ids are in sorted order, its boxes
match their digests and its content matches the digest recorded in the manifest. Each problem
has its own message (an edited box, reordered or dropped images, a replaced file) and says
what to do.

Whether a *finished* teacher set is aligned with its proposals is the phase contract, checked
in one place for every caller: :mod:`vlkd.common.alignment`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlkd.common.alignment import PROPOSALS_ROLE, AlignmentError, short
from vlkd.common.digest import box_digest, reader_content_digest
from vlkd.common.manifest import ManifestError, read_manifest
from vlkd.common.regionset import RegionSetError, ShardReader
# The per-process map cache of shard files: dropped before re-reading a shard that may have
# been rewritten since this process last mapped it (a re-run in the same process, tests).
from vlkd.common.regionset import release_maps
from vlkd.common.sharding import shard_ranges


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
            got = reader_content_digest(reader)
        except (RegionSetError, OSError) as e:
            raise AlignmentError(f"{where}: features cannot be read ({e}); {fix}") from None
        if got != entry.get("digest"):
            raise AlignmentError(
                f"{where}: content digest {short(got)} differs from the manifest's "
                f"{short(entry.get('digest'))}: the shard changed after proposals wrote it "
                f"(edited or replaced); {fix}")
    return ProposalsShard(index, entry, reader)


__all__ = ["ProposalsShard", "read_proposals_manifest", "complete_shards", "require_complete",
           "verify_proposals_shard"]
