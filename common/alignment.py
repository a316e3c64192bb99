"""The phase contract: a teacher-features set is aligned with the proposals set it was made from.

Visual Token Alignment needs the teacher and the student to see the same visual tokens, so
``vlkd-extract teacher-features`` pools the teacher over the boxes of a *proposals* set (the
student detector's). A teacher set is aligned with a proposals set when

1. it records that set (``aligned_to`` in its manifest: the proposals' *identity*, see
   :func:`proposals_identity`, or at least their manifest digest),
2. it has the same shard count, and shard ``i`` holds the same images in the same order with
   bit-identical boxes (equal box digests) as proposals shard ``i``, and
3. for a set made by ``teacher-features`` (it records the identity): each teacher shard was
   made from the proposals shard's current content (its content digest), skipped exactly the
   images that failed in proposals, and saw images of the sizes proposals saw.

:func:`check_aligned` is the one implementation of these rules; it returns findings and never
raises. ``vlkd-extract validate --against`` reports them, ``teacher-features`` checks what it
wrote, and ``vlkd-train`` refuses to train on a misaligned pair (:func:`require_aligned`).

A proposals set's manifest grows while its array jobs finish (shard entries, failures), so its
manifest digest changes until the set is complete; its *identity* (the digest of the manifest
without those growing keys: detector, options, image list, shard count, creation time) does
not, which is why a teacher set recognises its proposals by identity.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

from .digest import manifest_digest, stable_manifest_digest
from .findings import MAX_PER_KIND, Finding
from .manifest import ManifestError, read_manifest

__all__ = ["PROPOSALS_ROLE", "TEACHER_ROLE", "ROLES", "GROWING_KEYS", "SOURCE_SHARD_ATTR",
           "AlignmentError", "proposals_identity", "aligned_to_record", "check_aligned",
           "compare_shards", "require_aligned", "short"]

PROPOSALS_ROLE = "proposals"
TEACHER_ROLE = "teacher-features"
#: The roles a region set can have (the manifest's ``role``).
ROLES = (PROPOSALS_ROLE, TEACHER_ROLE)
#: Manifest keys that change while a set's shards are being finished.
GROWING_KEYS = ("shards", "failures")
#: Shard attribute (in ``extra``) of a teacher shard: the proposals shard it was made from.
SOURCE_SHARD_ATTR = "aligned_to_shard"


class AlignmentError(ValueError):
    """Two region sets that must be aligned are not (or cannot be); the message says what
    differs and what to do."""


def short(value) -> str:
    """A digest shortened for a message (``none`` when absent)."""
    return "none" if not value else str(value)[:10] + "…"


def proposals_identity(manifest: dict) -> str:
    """Hex digest that identifies a proposals set independently of how many shards are done.

    Args:
        manifest: the proposals set's manifest.

    Returns:
        blake2b-128 hex of the canonical JSON of the manifest without ``shards`` and
        ``failures``. Another detector, option, image list, shard count or a re-created set
        (its ``created`` time) changes it; finishing more shards does not.
    """
    return stable_manifest_digest(manifest, GROWING_KEYS)


def aligned_to_record(proposals_dir: str | os.PathLike, manifest: dict) -> dict:
    """The ``aligned_to`` entry a teacher set records for the proposals set it is made from."""
    return {"path": str(Path(proposals_dir).resolve()), "manifest_digest": manifest_digest(manifest),
            "role": manifest.get("role"), "identity": proposals_identity(manifest),
            "detector": (manifest.get("detector") or {}).get("name")}


# ------------------------------------------------------------------------------ one shard pair

def compare_shards(features, proposals, *, index: int, where: str, proposals_dir: str,
                   names: tuple[str, str] = ("teacher features", "proposals")) -> list[Finding]:
    """Images and boxes of one shard pair: the same ids in the same order, equal box digests.

    Args:
        features, proposals: ``ShardReader`` s of teacher shard ``index`` and proposals shard
            ``index``.
        where: the features shard's name (findings are placed there).
        proposals_dir: the proposals set (named in the fix).
        names: how the two sets are called in messages.

    Returns:
        At most one finding: the ids differ, or the boxes of some images differ.
    """
    fname, pname = names
    fix = f"re-run `vlkd-extract teacher-features --proposals {proposals_dir}`"
    ids_f, ids_p = list(features.image_ids), list(proposals.image_ids)
    if ids_f != ids_p:
        n = min(len(ids_f), len(ids_p))
        k = next((i for i in range(n) if ids_f[i] != ids_p[i]), n)
        what = (f"image {k} is {ids_p[k]!r} vs {ids_f[k]!r}" if k < n else
                f"{len(ids_p)} vs {len(ids_f)} images")
        missing = sorted(set(ids_p) - set(ids_f))
        extra = sorted(set(ids_f) - set(ids_p))
        return [Finding("error", where,
                        f"shard {index}: {pname} and {fname} list different images ({what}; "
                        f"{len(missing)} missing, e.g. {missing[:3]}, {len(extra)} extra, e.g. "
                        f"{extra[:3]}{'' if missing or extra else ', or in another order'}); "
                        f"the sets are not aligned -- {fix}")]
    df = np.asarray(features.box_digests).reshape(len(ids_f), -1)
    dp = np.asarray(proposals.box_digests).reshape(len(ids_p), -1)
    bad = np.nonzero((df != dp).any(axis=1))[0]
    if not bad.size:
        return []
    k = int(bad[0])
    more = "".join(f", {int(i)} {ids_f[int(i)]!r}" for i in bad[1:MAX_PER_KIND])
    more += f", … ({bad.size} in all)" if bad.size > MAX_PER_KIND else ""
    return [Finding("error", f"{where}[image {k} {ids_f[k]!r}]",
                    f"shard {index}: boxes of {bad.size} images differ between {pname} and "
                    f"{fname} (image {k} {ids_f[k]!r}: box digest {short(df[k].tobytes().hex())} "
                    f"differs from the proposals' {short(dp[k].tobytes().hex())}{more}): the "
                    "features were "
                    f"not pooled over the proposals' boxes -- {fix}")]


def _provenance(features_dir: Path, pdir: Path, te: dict, pe: dict, freader, preader
                ) -> list[Finding]:
    """What a set made by teacher-features records about each shard's source."""
    out: list[Finding] = []
    idx, name = int(te["index"]), te.get("name", f"shard {te['index']}")
    src = (freader.attrs.get("extra") or {}).get(SOURCE_SHARD_ATTR) or {}
    if src.get("digest") != pe.get("digest"):
        out.append(Finding(
            "error", name,
            f"made from proposals shard content {short(src.get('digest'))}, but {pe['name']} of "
            f"{pdir} now has {short(pe.get('digest'))}: the proposals shard was re-extracted "
            f"after; re-run teacher-features for shard {idx} (delete {name} and its manifest "
            "entry first)"))
    tfail = sorted(f["image_id"] for f in te.get("failures", []))
    pfail = sorted(f["image_id"] for f in pe.get("failures", []))
    if tfail != pfail:
        out.append(Finding(
            "error", name,
            f"skipped images {tfail[:3]}{'…' if len(tfail) > 3 else ''} ({len(tfail)}) differ "
            f"from the images that failed in proposals {pfail[:3]}"
            f"{'…' if len(pfail) > 3 else ''} ({len(pfail)})"))
    thw, phw = freader.image_hw, preader.image_hw
    tids = freader.image_ids
    if list(tids) == list(preader.image_ids) and thw.shape == phw.shape and (thw != phw).any():
        i = int(np.nonzero((thw != phw).any(axis=1))[0][0])
        out.append(Finding(
            "error", f"{name}[image {i} {tids[i]!r}]",
            f"image_hw {tuple(thw[i])} differs from the proposals' {tuple(phw[i])}: the teacher "
            "read another image under this id"))
    return out


# ------------------------------------------------------------------------------ a set pair

def check_aligned(features_dir: str | os.PathLike, proposals_dir: str | os.PathLike, *,
                  require_record: bool = False, require_complete: bool = False,
                  only_shards: Iterable[int] | None = None,
                  names: tuple[str, str] = ("teacher features", "proposals")) -> list[Finding]:
    """Check that a teacher-features set is aligned with a proposals set (module docstring).

    Args:
        features_dir: the teacher-features set.
        proposals_dir: the proposals set it should be aligned with.
        require_record: the features set must record this proposals set (``aligned_to``); an
            unrecorded or other manifest digest is then an error (else: a set without a record
            is compared by content alone, and a changed manifest digest is a warning).
        require_complete: both sets must have every shard (training needs all of them).
        only_shards: compare only these shard indices (``validate`` passes the shards it could
            read; default: every shard finalised in both).
        names: how the two sets are called in messages.

    Returns:
        Findings (errors first within each place); empty when aligned.
    """
    from .regionset import ShardReader, release_maps

    fdir, pdir = Path(features_dir), Path(proposals_dir)
    fname, pname = names
    fix = f"re-run `vlkd-extract teacher-features --proposals {pdir}`"
    try:
        fm = read_manifest(fdir)
    except ManifestError as e:
        return [Finding("error", "alignment", f"cannot read {fname} {fdir}: {e}")]
    try:
        pm = read_manifest(pdir)
    except ManifestError as e:
        return [Finding("error", "alignment", f"cannot read the reference set {pdir}: {e}")]
    out: list[Finding] = []

    def err(msg: str, where: str = "alignment") -> list[Finding]:
        return out + [Finding("error", where, msg)]

    frole, prole = fm.get("role"), pm.get("role")
    if frole == PROPOSALS_ROLE:
        return err(f"{fname} {fdir} is a proposals set (role 'proposals'), not teacher features "
                   f"pooled over {pname} {pdir}; make them with `vlkd-extract teacher-features "
                   f"--proposals {pdir}` and pass that set")
    if frole is not None and frole != TEACHER_ROLE:
        return err(f"{fdir} is a {frole!r} set; alignment is checked for a 'teacher-features' "
                   "set against its proposals")
    if prole is not None and prole != PROPOSALS_ROLE:
        return err(f"{pdir} is a {prole!r} set, expected the 'proposals' set the teacher "
                   "features were made from")

    at = fm.get("aligned_to") or {}
    recorded = at.get("identity") or at.get("manifest_digest")
    if not recorded and require_record:
        return err(f"{fname} {fdir} records no 'aligned_to' proposals set in its manifest, so its "
                   f"boxes cannot be trusted to be {pname}'s; {fix}")
    if at.get("identity"):
        ident = proposals_identity(pm)
        if at["identity"] != ident:
            return err(f"the teacher set was made from other proposals (identity "
                       f"{short(at['identity'])} from {at.get('path')}, {pdir} has "
                       f"{short(ident)}); check against the set in aligned_to.path, or re-run "
                       "teacher-features on these proposals into a new --out")
    if at.get("manifest_digest"):
        want = manifest_digest(pm)
        if at["manifest_digest"] != want:
            if require_record and not at.get("identity"):
                return err(
                    f"{fname} {fdir} was pooled over the proposals set {at.get('path')!r} "
                    f"(manifest digest {at['manifest_digest']}), but {pname} is {pdir} (digest "
                    f"{want}): the boxes differ. Pass the proposals set the teacher features "
                    f"were made from, or {fix}")
            out.append(Finding("warning", "alignment",
                               f"aligned_to.manifest_digest is {at['manifest_digest']} but {pdir} "
                               f"now has {want}: the proposals set changed after these features "
                               "were made"))

    if require_complete:
        for name, d, m in ((pname, pdir, pm), (fname, fdir, fm)):
            k = int(m.get("num_shards", 0) or 0)
            done = {int(e["index"]) for e in m.get("shards", [])}
            missing = [i for i in range(k) if i not in done]
            if missing or not k:
                return err(f"{name} {d} is incomplete: shards {missing} of {k} are missing; "
                           "finish the extraction (re-run the array jobs of those shard indices)")
    if pm.get("num_shards") != fm.get("num_shards"):
        return err(f"{pname} {pdir} has {pm.get('num_shards')} shards, {fname} {fdir} has "
                   f"{fm.get('num_shards')}; a teacher set mirrors its proposals set shard by "
                   f"shard -- re-run teacher-features over {pdir}")

    pentries = {int(e["index"]): e for e in pm.get("shards", [])}
    fentries = {int(e["index"]): e for e in fm.get("shards", [])}
    wanted = sorted(fentries) if only_shards is None else sorted(set(only_shards) & set(fentries))
    provenance = bool(at.get("identity"))
    for idx in wanted:
        te = fentries[idx]
        name = te.get("name", f"shard {idx}")
        pe = pentries.get(idx)
        if pe is None:
            out.append(Finding("error", name, f"the reference set {pdir} has no shard {idx}"))
            continue
        fpath, ppath = fdir / name, pdir / pe["name"]
        release_maps(ppath)
        # Fresh readers: their small arrays are dropped after the check (memory stays flat).
        freader, preader = ShardReader(fpath, index=idx), ShardReader(ppath, index=idx)
        try:
            preader.image_ids, preader.box_digests  # noqa: B018 - opens the shard
        except Exception as e:  # noqa: BLE001 - unreadable shards are findings
            out.append(Finding("error", name, f"cannot open the reference shard {ppath}: {e}"))
            continue
        try:
            freader.image_ids, freader.box_digests  # noqa: B018
        except Exception as e:  # noqa: BLE001
            out.append(Finding("error", name, f"cannot open {fpath}: {e}"))
            continue
        out += compare_shards(freader, preader, index=idx, where=name, proposals_dir=str(pdir),
                              names=names)
        if provenance:
            out += _provenance(fdir, pdir, te, pe, freader, preader)
    return out


def require_aligned(features_dir: str | os.PathLike, proposals_dir: str | os.PathLike, *,
                    names: tuple[str, str] = ("teacher features", "proposals"),
                    require_complete: bool = True) -> None:
    """:func:`check_aligned` with a recorded, complete pair required; raises on the first error.

    Raises:
        AlignmentError: the first error finding's message.
    """
    for f in check_aligned(features_dir, proposals_dir, require_record=True,
                           require_complete=require_complete, names=names):
        if f.level == "error":
            raise AlignmentError(f.message)
