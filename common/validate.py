"""Validate a region set: returns human-readable findings, never raises on bad data.

Checks (docs/FORMAT.md is the contract checked against):
- manifest: readable, required keys, schema version, shard entries vs ``num_shards``;
- per shard: opens, attributes agree with the manifest, array names/shapes/dtypes, counts
  (``N``, ``R``) agree across arrays, attributes and manifest, offsets start at 0, never
  decrease and end at ``R``, ids unique, box digests recomputed, boxes/scores finite;
- features streamed in blocks: NaN/Inf rows, and the shard content digest recomputed and
  compared with the manifest's and the shard's own (a flipped byte anywhere in the arrays
  shows up here);
- leftovers: partial shards and lock files of writers that did not finish;
- ``against``: a teacher set is aligned with its proposals set
  (:func:`vlkd.common.alignment.check_aligned`).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .alignment import check_aligned
from .digest import ARRAY_NAMES, DIGEST_SIZE, box_digest, reader_content_digest
from .findings import MAX_PER_KIND, Finding
from .manifest import SCHEMA_VERSION, read_manifest
from .regionset import (FEATURE_DTYPES, SHARD_FORMAT, RegionSetError, ShardReader, release_maps,
                        shard_name)
from .shard_format import check_extras

_FEATURE_BLOCK_BYTES = 64 << 20

#: Expected dtype kind/size per array (image_ids is checked separately: a string type).
_EXPECTED = {
    "image_hw": ("int32", 2), "offsets": ("int64", 1), "boxes": ("float32", 2),
    "scores": ("float32", 1), "classes": ("int32", 1), "box_digest": ("uint8", 2),
    "image_digest": ("uint8", 2), "features": (None, 2),
}


class _Report:
    def __init__(self):
        self.findings: list[Finding] = []

    def error(self, where: str, message: str) -> None:
        self.findings.append(Finding("error", where, message))

    def warning(self, where: str, message: str) -> None:
        self.findings.append(Finding("warning", where, message))

    def capped(self, level: str, where: str, items: list[tuple[str, str]], what: str) -> None:
        """Report up to MAX_PER_KIND items (sub-where, message), then a count of the rest."""
        for sub, msg in items[:MAX_PER_KIND]:
            self.findings.append(Finding(level, f"{where}{sub}", msg))
        if len(items) > MAX_PER_KIND:
            self.findings.append(Finding(level, where, f"... and {len(items) - MAX_PER_KIND} "
                                         f"more {what}"))


def _raw_array_info(path: Path) -> dict[str, tuple[tuple, np.dtype | str]]:
    """Shapes and stored dtypes of every array, as the container declares them (no coercion)."""
    info = {}
    if path.is_dir():
        import zarr
        root = zarr.open_group(str(path), mode="r", zarr_format=3)
        for name in sorted(root.array_keys()):
            a = root[name]
            dt = a.dtype
            info[name] = (tuple(a.shape), "string" if name == "image_ids" and
                          (dt == object or getattr(dt, "kind", "") in "OTU") else np.dtype(dt))
    else:
        import h5py
        with h5py.File(path, "r") as f:
            for name in sorted(f.keys()):
                ds = f[name]
                if not isinstance(ds, h5py.Dataset):
                    continue
                is_str = h5py.check_string_dtype(ds.dtype) is not None
                info[name] = (tuple(ds.shape), "string" if is_str else ds.dtype)
    return info


def _check_extras(rep: _Report, where: str, info: dict, declared: dict) -> bool:
    """The optional arrays the manifest declares are there, (R, width), of their dtype; arrays
    nobody declared are reported. Returns False when reading on would fail."""
    ok = True
    r = info["boxes"][0][0] if info.get("boxes") and info["boxes"][0] else 0
    for name, (dt, k) in declared.items():
        if name not in info:
            rep.error(where, f"optional array {name!r} is declared in the manifest's extras but "
                      "missing from the shard; re-extract it")
            ok = False
            continue
        shape, got = info[name]
        if shape != (r, k):
            rep.error(where, f"optional array {name!r} has shape {shape}, expected ({r}, {k}) "
                      f"(one row per box, width {k})")
            ok = False
        elif np.dtype(got) != np.dtype(dt):
            rep.error(where, f"optional array {name!r} dtype is {np.dtype(got).name}, expected "
                      f"{dt}")
    for name in sorted(set(info) - set(ARRAY_NAMES) - set(declared)):
        rep.warning(where, f"array {name!r} is not a format array and not declared in the "
                    "manifest's extras; readers ignore it")
    return ok


def _check_arrays(rep: _Report, where: str, info: dict, manifest: dict) -> bool:
    """Names, ranks and dtypes; returns False when reading on would be meaningless."""
    ok = True
    for name in ARRAY_NAMES:
        if name not in info:
            rep.error(where, f"array {name!r} is missing (expected every one of "
                      f"{', '.join(ARRAY_NAMES)}); the shard is incomplete -- re-extract it")
            ok = False
    if not ok:
        return False
    shape, dt = info["image_ids"]
    if dt != "string" or len(shape) != 1:
        rep.error(where, f"image_ids must be a 1-d utf-8 string array, found {dt} {shape}")
        ok = False
    want_feat = manifest.get("feature_dtype")
    for name, (want, ndim) in _EXPECTED.items():
        shape, dt = info[name]
        if len(shape) != ndim:
            rep.error(where, f"{name} must have {ndim} dimension(s), found shape {shape}")
            ok = False
            continue
        want = want or want_feat
        if name == "features" and np.dtype(dt).name not in FEATURE_DTYPES:
            rep.error(where, f"features dtype is {np.dtype(dt).name}, expected float16 or "
                      "float32")
        elif want and np.dtype(dt) != np.dtype(want):
            rep.error(where, f"{name} dtype is {np.dtype(dt).name}, expected {want}")
    d = manifest.get("feature_dim")
    if info["features"][0] and len(info["features"][0]) == 2 and d is not None \
            and info["features"][0][1] != d:
        rep.error(where, f"features have {info['features'][0][1]} columns but the manifest's "
                  f"feature_dim is {d}; the shard belongs to another set or extraction")
    for name in ("box_digest", "image_digest"):
        shape = info[name][0]
        if len(shape) == 2 and shape[1] != DIGEST_SIZE:
            rep.error(where, f"{name} rows have {shape[1]} bytes, expected {DIGEST_SIZE}")
            ok = False
    return ok


def _check_counts(rep: _Report, where: str, shard: ShardReader, info: dict,
                  entry: dict) -> bool:
    n = len(shard.image_ids)
    r = info["boxes"][0][0]
    ok = True
    for name, rows in (("image_hw", n), ("box_digest", n), ("image_digest", n),
                       ("offsets", n + 1), ("boxes", r), ("scores", r), ("classes", r),
                       ("features", r)):
        if info[name][0][0] != rows:
            rep.error(where, f"{name} has {info[name][0][0]} rows, expected {rows} "
                      f"({'N+1' if name == 'offsets' else 'N' if rows == n else 'R'} with "
                      f"N={n} images, R={r} regions); the shard is inconsistent -- re-extract it")
            ok = False
    for label, want, got in (("num_images", entry.get("num_images"), n),
                             ("num_regions", entry.get("num_regions"), r)):
        if want is not None and want != got:
            rep.error(where, f"manifest says {label}={want}, the shard holds {got}")
        attr = shard.attrs.get(label)
        if attr is not None and attr != got:
            rep.error(where, f"shard attribute {label}={attr}, the arrays hold {got}")
    o = shard.offsets
    if len(o) == n + 1:
        problems = []
        if o[0] != 0:
            problems.append(f"offsets[0] is {o[0]}, expected 0")
        bad = np.nonzero(np.diff(o) < 0)[0]
        if bad.size:
            i = int(bad[0])
            problems.append(f"offsets decrease at image {i}: offsets[{i}]={o[i]} > "
                            f"offsets[{i + 1}]={o[i + 1]} ({bad.size} place(s))")
        if o[-1] != r:
            problems.append(f"offsets[-1] is {o[-1]}, expected R={r} (the number of boxes)")
        for p in problems:
            rep.error(where, p + "; the offsets array was edited or damaged -- re-extract "
                      "the shard")
        ok = ok and not problems
    ids = shard.image_ids
    if len(set(ids)) != len(ids):
        seen, dups = set(), []
        for k in ids:
            if k in seen:
                dups.append(k)
            seen.add(k)
        rep.error(where, f"{len(dups)} duplicate image id(s), e.g. {dups[:3]}")
    return ok


def _check_regions(rep: _Report, where: str, shard: ShardReader) -> None:
    o, ids = shard.offsets, shard.image_ids
    mismatches = []
    for i in range(len(ids)):
        got = box_digest(shard.boxes[o[i]:o[i + 1]])
        if got != shard.box_digests[i].tobytes():
            mismatches.append((f"[image {i} {ids[i]!r}]",
                               f"box_digest {shard.box_digests[i].tobytes().hex()} does not "
                               f"match its boxes ({got.hex()}); boxes or digests were altered"))
    rep.capped("error", where, mismatches, "box digest mismatches")
    hw = shard.image_hw
    bad_hw = np.nonzero((hw <= 0).any(axis=1))[0]
    rep.capped("error", where, [(f"[image {i} {ids[i]!r}]", f"image_hw {tuple(hw[i])} is not "
                                 "a positive (height, width)") for i in bad_hw],
               "images with bad image_hw")
    for name in ("boxes", "scores"):
        a = getattr(shard, name)
        # (R,) scores or (R, 4) boxes; R may be 0, which reshape(0, -1) cannot take.
        finite = np.isfinite(a) if a.ndim == 1 else np.isfinite(a).all(axis=1)
        rows = np.nonzero(~finite)[0]
        if rows.size:
            img = np.searchsorted(o, rows, side="right") - 1
            rep.capped("error", where, [(f"[image {int(i)} {ids[int(i)]!r}]",
                                         f"{name} row {int(r)} is not finite")
                                        for r, i in zip(rows, img)], f"non-finite {name}")
    for name, a in shard.extras.items():
        if a.dtype.kind == "f" and a.size and not np.isfinite(a).all():
            rows = np.nonzero(~np.isfinite(a).all(axis=1))[0]
            img = np.searchsorted(o, rows, side="right") - 1
            rep.capped("error", where, [(f"[image {int(i)} {ids[int(i)]!r}]",
                                         f"optional array {name} row {int(r)} is not finite")
                                        for r, i in zip(rows, img)], f"non-finite {name}")
    b = shard.boxes
    inverted = np.nonzero((b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1]))[0]
    if inverted.size:
        rep.warning(where, f"{inverted.size} box(es) have x2 < x1 or y2 < y1 (first: row "
                    f"{int(inverted[0])}: {b[inverted[0]].tolist()})")


def _check_features(rep: _Report, where: str, shard: ShardReader, entry: dict) -> None:
    """Stream features: NaN/Inf per image, and the content digest."""
    o, ids = shard.offsets, shard.image_ids
    r = shard.num_regions
    row_bytes = shard.feature_dim * shard.feature_dtype.itemsize
    step = max(1, _FEATURE_BLOCK_BYTES // max(1, row_bytes))
    bad_rows: list[int] = []

    def checked_blocks():
        for r0 in range(0, r, step):
            block = shard.features_rows(r0, min(r, r0 + step))
            finite = np.isfinite(block).all(axis=1)
            if not finite.all():
                bad_rows.extend((r0 + np.nonzero(~finite)[0]).tolist())
            yield block
    try:
        got = reader_content_digest(shard, checked_blocks())
    except RegionSetError as e:
        rep.error(where, f"features cannot be read: {e}")
        return
    except Exception as e:  # the fallback readers raise library-specific errors
        rep.error(where, f"features cannot be read ({type(e).__name__}: {e}); the shard is "
                  "corrupt -- re-extract it")
        return
    if bad_rows:
        img = np.searchsorted(o, bad_rows, side="right") - 1
        per_image: dict[int, int] = {}
        for i in img.tolist():
            per_image[i] = per_image.get(i, 0) + 1
        rep.capped("error", where, [(f"[image {i} {ids[i]!r}]", f"{c} feature row(s) contain "
                                     "NaN or Inf") for i, c in per_image.items()],
                   "images with NaN/Inf features")
    want = entry.get("digest")
    if want is not None and want != got:
        rep.error(where, f"content digest {got} differs from the manifest's {want}: the shard's "
                  "arrays changed after it was written (a damaged or edited file) -- "
                  "re-extract the shard")
    attr = shard.attrs.get("digest")
    if attr is not None and attr != got and attr != want:
        rep.error(where, f"content digest {got} differs from the shard's own digest attribute "
                  f"{attr}")


def validate_region_set(path: str | os.PathLike, *, against: str | None = None,
                        check_features: bool = True) -> list[Finding]:
    """Check a region set; never raises on bad data.

    Args:
        path: the set directory.
        against: a proposals set this (teacher-features) set must be aligned with.
        check_features: stream every feature row (NaN/Inf, content digest); False checks only
            the small arrays.

    Returns:
        Findings, errors first within each place; empty when the set is valid.
    """
    path = Path(path)
    rep = _Report()
    try:
        manifest = read_manifest(path)
    except Exception as e:
        rep.error("manifest.json", str(e))
        return rep.findings
    where = "manifest.json"
    if manifest.get("schema_version") != SCHEMA_VERSION:
        rep.error(where, f"schema_version is {manifest.get('schema_version')!r}, this vlkd reads "
                  f"{SCHEMA_VERSION}")
    for key in ("feature_dim", "feature_dtype", "backend", "num_shards", "shards"):
        if key not in manifest:
            rep.error(where, f"required key {key!r} is missing")
    if manifest.get("feature_dtype") not in (None, *FEATURE_DTYPES):
        rep.error(where, f"feature_dtype {manifest['feature_dtype']!r} is not float16/float32")
    if rep.findings:
        return rep.findings
    num_shards, backend = manifest["num_shards"], manifest["backend"]
    try:
        declared_extras = check_extras(manifest.get("extras"))
    except ValueError as e:
        rep.error(where, f"extras: {e}")
        return rep.findings
    entries = manifest["shards"]
    by_index: dict[int, dict] = {}
    for e in entries:
        idx = e.get("index")
        if not isinstance(idx, int) or not 0 <= idx < num_shards:
            rep.error(where, f"shard entry {e.get('name')!r} has index {idx!r} outside "
                      f"0..{num_shards - 1}")
            continue
        if idx in by_index:
            rep.error(where, f"shard {idx} is listed twice")
        expected_name = shard_name(idx, num_shards, backend)
        if e.get("name") != expected_name:
            rep.error(where, f"shard {idx} is named {e.get('name')!r}, expected {expected_name!r}")
        by_index[idx] = e
    missing = [i for i in range(num_shards) if i not in by_index]
    if missing:
        rep.warning(where, f"{len(missing)} of {num_shards} shard(s) are not finalised yet: "
                    f"{missing[:10]}{' ...' if len(missing) > 10 else ''} (run or re-run "
                    "those array jobs)")
    top_failures = sorted((f.get("shard"), f.get("image_id")) for f in manifest.get("failures", []))
    entry_failures = sorted((e["index"], f.get("image_id")) for e in by_index.values()
                            for f in e.get("failures", []))
    if top_failures != entry_failures:
        rep.warning(where, f"the top-level failures list ({len(top_failures)}) differs from the "
                    f"shard entries' failures ({len(entry_failures)})")
    for leftover in sorted(path.glob("shard-*.partial")):
        rep.warning(leftover.name, "a partial shard: a writer was interrupted (re-run its job to "
                    "resume) or is running now")
    for lock in sorted(path.glob("shard-*.lock")):
        rep.warning(lock.name, "a shard lock file: a writer is running or died before "
                    "releasing it (the next writer takes over a dead writer's lock)")

    shards: dict[int, ShardReader] = {}
    seen_ids: dict[str, str] = {}
    for idx in sorted(by_index):
        e = by_index[idx]
        sw = e.get("name", f"shard {idx}")
        spath = path / sw
        if not spath.exists():
            rep.error(sw, "listed in the manifest but missing on disk; re-extract it")
            continue
        size = (sum(p.stat().st_size for p in spath.rglob("*") if p.is_file())
                if spath.is_dir() else spath.stat().st_size)
        if e.get("bytes") is not None and e["bytes"] != size:
            rep.error(sw, f"{size} bytes on disk, the manifest recorded {e['bytes']}: the shard "
                      "was truncated, extended or replaced after it was written")
        release_maps(spath)  # map the files as they are now
        shard = ShardReader(spath, index=idx)
        try:
            info = _raw_array_info(spath)
        except Exception as ex:
            rep.error(sw, f"cannot be opened ({type(ex).__name__}: {ex}); the file is truncated "
                      "or corrupt -- re-extract the shard")
            continue
        if not _check_arrays(rep, sw, info, manifest):
            continue
        if not _check_extras(rep, sw, info, declared_extras):
            continue
        try:
            attrs = shard.attrs
        except Exception as ex:
            rep.error(sw, f"cannot be read: {ex}" if isinstance(ex, RegionSetError) else
                      f"cannot be read ({type(ex).__name__}: {ex}); the shard is corrupt -- "
                      "re-extract it")
            continue
        if attrs.get("vlkd_format") != SHARD_FORMAT:
            rep.warning(sw, f"attribute vlkd_format is {attrs.get('vlkd_format')!r}, expected "
                        f"{SHARD_FORMAT!r}")
        for key, want in (("shard_index", idx), ("num_shards", num_shards),
                          ("feature_dim", manifest["feature_dim"]),
                          ("feature_dtype", manifest["feature_dtype"]),
                          ("schema_version", SCHEMA_VERSION)):
            if attrs.get(key) != want:
                rep.error(sw, f"attribute {key} is {attrs.get(key)!r}, expected {want!r} (from "
                          "the manifest)")
        if (attrs.get("extras") or {}) != declared_extras:
            rep.error(sw, f"attribute extras is {attrs.get('extras') or {}}, expected "
                      f"{declared_extras} (the manifest's declaration of optional arrays)")
        if not _check_counts(rep, sw, shard, info, e):
            continue
        for k in shard.image_ids:
            if k in seen_ids:
                rep.error(sw, f"image id {k!r} is also in {seen_ids[k]}")
                break
            seen_ids[k] = sw
        _check_regions(rep, sw, shard)
        if check_features:
            _check_features(rep, sw, shard, e)
        shards[idx] = shard
    if against is not None:
        rep.findings.extend(check_aligned(path, against, only_shards=shards))
    return rep.findings
