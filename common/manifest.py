"""The region set's ``manifest.json``: atomic replacement and locked read-modify-write.

Array jobs finishing different shards of one set update the same manifest; ``update_manifest``
serialises them with an flock on ``.manifest.lock`` and replaces the file atomically
(temp file, fsync, ``os.replace``), so a reader never sees a half-written manifest and no
shard's entry is lost. The keys are documented in docs/FORMAT.md.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from .locking import FileLock

MANIFEST_NAME = "manifest.json"
#: Kept (empty) in the set directory; flocked while the manifest is updated.
MANIFEST_LOCK_NAME = ".manifest.lock"
SCHEMA_VERSION = 1


class ManifestError(RuntimeError):
    """manifest.json is missing or unreadable."""


def manifest_path(set_dir: str | os.PathLike) -> Path:
    return Path(set_dir) / MANIFEST_NAME


def read_manifest(set_dir: str | os.PathLike) -> dict:
    """Read ``<set_dir>/manifest.json``.

    Raises:
        ManifestError: missing or not valid JSON (the message says which and what to do).
    """
    path = manifest_path(set_dir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{path} not found: is {set_dir} a region set? (a set is a "
                            "directory made by vlkd-extract, holding manifest.json and "
                            "shard-*-of-*.h5|.zarr)") from None
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise ManifestError(f"{path} is not valid JSON ({e}); restore it or re-run the "
                            "extraction, which rewrites it from the shards") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path} holds a {type(manifest).__name__}, expected a JSON object")
    return manifest


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_manifest(set_dir: str | os.PathLike, manifest: dict) -> None:
    """Replace ``<set_dir>/manifest.json`` atomically (temp file + fsync + os.replace)."""
    set_dir = Path(set_dir)
    set_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(manifest, indent=2, sort_keys=False, ensure_ascii=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".tmp", dir=set_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, manifest_path(set_dir))
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(set_dir)


def update_manifest(set_dir: str | os.PathLike, fn: Callable[[dict], dict | None]) -> dict:
    """Read-modify-write the manifest under an exclusive lock.

    Args:
        set_dir: the region set directory (created if missing).
        fn: receives the current manifest (``{}`` if there is none yet) and returns the new one,
            or mutates it in place and returns None.

    Returns:
        The manifest as written.
    """
    set_dir = Path(set_dir)
    set_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(set_dir / MANIFEST_LOCK_NAME, blocking=True, remove_on_release=False):
        try:
            current = read_manifest(set_dir)
        except ManifestError:
            if manifest_path(set_dir).exists():
                raise
            current = {}
        new = fn(current)
        if new is None:
            new = current
        write_manifest(set_dir, new)
        return new


def manifest_digest(set_dir_or_manifest: str | os.PathLike | dict) -> str:
    """Hex blake2b-128 of the manifest's canonical JSON (``vlkd.common.digest.manifest_digest``)
    of a set directory or a manifest dict.

    It identifies a set's content: the shard entries carry each shard's content digest, so two
    sets with the same manifest digest hold the same arrays. A teacher set records its proposals
    set's digest in ``aligned_to.manifest_digest``.
    """
    from .digest import manifest_digest as digest_of

    manifest = (set_dir_or_manifest if isinstance(set_dir_or_manifest, dict)
                else read_manifest(set_dir_or_manifest))
    return digest_of(manifest)
