"""``ShardWriter``: append images to one shard of a region set; resumable and exclusive."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from .digest import DIGEST_SIZE, box_digest
from .locking import FileLock, LockHeldError, describe_holder
from .manifest import SCHEMA_VERSION, fsync_dir, update_manifest
from .shard_format import (BACKENDS, RegionSetError, ShardLockedError, check_extras,
                           check_feature_dtype, shard_name)
from .shard_reader import ShardReader
from .staging import Staging, build_shard, shard_size

__all__ = ["ShardWriter"]


class ShardWriter:
    """Append images to one shard of a region set; resumable and exclusive.

    Args:
        set_dir: the region set directory (created if missing).
        shard_index: this shard's index, ``0 <= shard_index < num_shards``.
        num_shards: shards in the set.
        backend: ``"hdf5"`` or ``"zarr"``.
        feature_dim: D, the feature width.
        feature_dtype: ``"float16"`` (default) or ``"float32"``; features are cast to it.
        commit_every: images per automatic commit.
        attrs: extra JSON-serialisable attributes stored with the shard (attribute ``extra``).
        durable: fsync every commit, so a commit also survives a machine crash, not only a
            killed process (False only for throwaway sets).
        extras: optional per-region arrays of the set, ``{name: (dtype, width)}`` (e.g.
            ``{"attr_ids": ("int32", 5), "attr_scores": ("float32", 5)}``); every ``append``
            then passes each of them. docs/FORMAT.md, "Optional arrays".

    The writer stages rows under ``<final name>.partial/`` and holds ``<final name>.lock``
    (host, pid) while open; a second live writer gets ``ShardLockedError`` naming the holder.
    Re-opening a partial shard resumes after its last commit (``committed_ids`` lists what is
    there; uncommitted rows are dropped). If the shard is already final, the writer opens in a
    finished state: ``complete`` is True, ``append`` raises, and ``finalize`` only re-records
    the shard in the manifest (covers a job killed between rename and manifest update).

    Used as a context manager: on an exception pending rows are dropped (the partial shard is
    kept for resume); on a normal exit without ``finalize`` pending rows are committed.
    """

    def __init__(self, set_dir: str | os.PathLike, shard_index: int, num_shards: int, *,
                 backend: str = "hdf5", feature_dim: int, feature_dtype="float16",
                 commit_every: int = 64, attrs: dict | None = None, durable: bool = True,
                 extras: dict | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
        if int(feature_dim) < 1:
            raise ValueError(f"feature_dim must be >= 1, got {feature_dim}")
        if commit_every < 1:
            raise ValueError(f"commit_every must be >= 1, got {commit_every}")
        self.set_dir = Path(set_dir)
        self.name = shard_name(shard_index, num_shards, backend)
        self.path = self.set_dir / self.name
        self.index = int(shard_index)
        self.num_shards = int(num_shards)
        self.backend = backend
        self.feature_dim = int(feature_dim)
        self.feature_dtype = check_feature_dtype(feature_dtype)
        self.commit_every = int(commit_every)
        self.extra = dict(attrs or {})
        try:
            json.dumps(self.extra)
        except TypeError as e:
            raise ValueError(f"attrs must be JSON-serialisable (plain str/int/float/bool/list/"
                             f"dict; convert numpy values with .item() or .tolist()): {e}") from None
        self.durable = durable
        self.extras = check_extras(extras)
        self._config = {"backend": backend, "feature_dim": self.feature_dim,
                        "feature_dtype": self.feature_dtype.name,
                        "shard_index": self.index, "num_shards": self.num_shards}
        if self.extras:  # absent for sets without optional arrays (their records unchanged)
            self._config["extras"] = self.extras
        self._pending: list[tuple] = []
        self._pending_failures: list[dict] = []
        self._seen: set[str] = set()
        self._info: dict | None = None
        self._closed = False
        self.complete = False

        self.set_dir.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(self.set_dir / (self.name + ".lock"))
        try:
            self._lock.acquire()
        except LockHeldError as e:
            raise ShardLockedError(
                f"shard {self.path} is being written by another live writer "
                f"({describe_holder(e.holder)}); wait for it to finish or stop that process. "
                f"(A lock left by a dead process is taken over automatically.)",
                e.holder) from None
        try:
            self._staging = Staging(self.path.with_name(self.name + ".partial"), self._config)
            if self.path.exists():
                self._open_complete()
            elif self._staging.path.exists():
                self._staging.resume()
                self._staging.open_for_append()
            else:
                self._staging.create()
                self._staging.open_for_append()
            self._seen.update(self.committed_ids)
            self._seen.update(self.failed_ids)
        except BaseException:
            self._lock.release()
            raise

    def _open_complete(self) -> None:
        reader = ShardReader(self.path)
        attrs = reader.attrs
        for key, want in (("feature_dim", self.feature_dim),
                          ("feature_dtype", self.feature_dtype.name),
                          ("extras", self.extras)):
            if attrs.get(key, {} if key == "extras" else None) != want:
                raise RegionSetError(
                    f"{self.path} already exists with {key}={attrs.get(key)!r}, but this "
                    f"writer has {key}={want!r}; delete the shard (and its manifest entry) "
                    "to write it again with the new options")
        self.complete = True
        self._complete_ids = list(reader.image_ids)
        self._complete_failures = list(attrs.get("failures", []))
        self._info = self._shard_info(attrs)

    # ---- state
    @property
    def committed_ids(self) -> list[str]:
        """Ids durably in the shard (after a resume: what an earlier run committed)."""
        return list(self._complete_ids) if self.complete else list(self._staging.ids)

    @property
    def num_committed(self) -> int:
        return len(self._complete_ids) if self.complete else self._staging.num_images

    @property
    def failed_ids(self) -> list[str]:
        """Ids recorded with ``add_failure`` and committed (skip these on resume too)."""
        failures = self._complete_failures if self.complete else self._staging.failures
        return [f["image_id"] for f in failures]

    # ---- writing
    def append(self, image_id: str, image_hw, boxes, scores, classes, features,
               image_digest: bytes = b"\0" * DIGEST_SIZE,
               extras: dict | None = None) -> None:
        """Add one image with n >= 0 regions.

        Args:
            image_id: unique key of the image within the set.
            image_hw: original (height, width).
            boxes: (n, 4) x1 y1 x2 y2 in original pixels (stored as float32).
            scores: (n,) confidences (float32).
            classes: (n,) class indices (int32).
            features: (n, D) region features; cast to the shard's feature dtype.
            image_digest: 16 bytes identifying the image file (zeros if unknown).
            extras: the set's optional arrays for this image, ``{name: (n, width)}``.
        """
        self._check_writable()
        if not isinstance(image_id, str):
            raise TypeError(f"image_id must be str, got {type(image_id).__name__}")
        if image_id in self._seen:
            raise RegionSetError(f"image {image_id!r} is already in shard {self.name} (ids must "
                                 "be unique; on resume skip writer.committed_ids)")
        if not image_id or "\0" in image_id:
            # HDF5 variable-length strings end at the first NUL; keep both backends identical
            raise ValueError(f"image id {image_id!r} must be a non-empty string without NUL "
                             "characters")
        boxes = np.ascontiguousarray(boxes, dtype="<f4")
        if boxes.size == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"{image_id}: boxes must have shape (n, 4), got {boxes.shape}")
        n = boxes.shape[0]
        scores = np.ascontiguousarray(scores, dtype="<f4").reshape(-1)
        classes = np.asarray(classes)
        if classes.size and not np.issubdtype(classes.dtype, np.integer):
            raise ValueError(f"{image_id}: classes must be integers, got {classes.dtype}")
        classes = np.ascontiguousarray(classes, dtype="<i4").reshape(-1)
        features = np.asarray(features)
        if features.size == 0:
            features = features.reshape(0, self.feature_dim)
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"{image_id}: features must have shape (n, {self.feature_dim}), "
                             f"got {features.shape}")
        if scores.shape[0] != n or classes.shape[0] != n or features.shape[0] != n:
            raise ValueError(f"{image_id}: {n} boxes but {scores.shape[0]} scores, "
                             f"{classes.shape[0]} classes, {features.shape[0]} feature rows; "
                             "every box needs exactly one of each")
        features = np.ascontiguousarray(features, dtype=self.feature_dtype.newbyteorder("<"))
        hw = tuple(int(v) for v in image_hw)
        if len(hw) != 2:
            raise ValueError(f"{image_id}: image_hw must be (height, width), got {image_hw!r}")
        image_digest = bytes(image_digest)
        if len(image_digest) != DIGEST_SIZE:
            raise ValueError(f"{image_id}: image_digest must be {DIGEST_SIZE} bytes, got "
                             f"{len(image_digest)}")
        self._pending.append((image_id, hw, boxes, scores, classes, features,
                              box_digest(boxes), image_digest, self._extras_of(image_id, n, extras)))
        self._seen.add(image_id)
        if len(self._pending) >= self.commit_every:
            self.commit()

    def _extras_of(self, image_id: str, n: int, given: dict | None) -> dict[str, np.ndarray]:
        given = dict(given or {})
        if set(given) != set(self.extras):
            raise ValueError(f"{image_id}: the set's optional arrays are "
                             f"{sorted(self.extras) or 'none'}, got {sorted(given) or 'none'}; "
                             "pass exactly the ones the writer was opened with (extras=...)")
        out = {}
        for name, (dt, k) in self.extras.items():
            a = np.asarray(given[name])
            if a.size == 0:
                a = a.reshape(0, k)
            if a.ndim == 1 and k == 1:
                a = a.reshape(-1, 1)
            if a.shape != (n, k):
                raise ValueError(f"{image_id}: optional array {name} must have shape ({n}, {k}) "
                                 f"(one row per box), got {a.shape}")
            if np.dtype(dt).kind in "iu" and a.size and not np.issubdtype(a.dtype, np.integer):
                raise ValueError(f"{image_id}: optional array {name} must hold integers, got "
                                 f"{a.dtype}")
            out[name] = np.ascontiguousarray(a, dtype=np.dtype(dt).newbyteorder("<"))
        return out

    def add_failure(self, image_id: str, reason: str) -> None:
        """Record an image that could not be processed (kept in the shard and the manifest)."""
        self._check_writable()
        if image_id in self._seen:
            raise RegionSetError(f"image {image_id!r} is already in shard {self.name}")
        self._pending_failures.append({"image_id": str(image_id), "reason": str(reason)})
        self._seen.add(image_id)

    def commit(self) -> None:
        """Make every appended image durable (fsync, then atomically publish the count)."""
        if self.complete or self._closed:
            return
        if not self._pending and not self._pending_failures:
            return
        pending, failures = self._pending, self._pending_failures
        self._pending, self._pending_failures = [], []
        self._staging.append(pending, failures, durable=self.durable)

    def finalize(self) -> dict:
        """Commit, build the final shard, rename it into place, record it in the manifest.

        Returns:
            The shard's manifest entry: ``{name, index, num_images, num_regions, digest,
            failures, bytes}``.
        """
        if self._closed and not self.complete:
            raise RegionSetError(f"writer for {self.name} is closed")
        if not self.complete:
            self.commit()
            self._staging.close()
            build = self._staging.path / ("build" + BACKENDS[self.backend])
            attrs = build_shard(self._staging, build, self.extra)
            os.rename(build, self.path)  # the shard appears complete or not at all
            fsync_dir(self.set_dir)
            attrs = dict(attrs, failures=json.loads(attrs["failures"]))
            self._info = self._shard_info(attrs)
            self.complete = True
            self._complete_ids = list(self._staging.ids)
            self._complete_failures = list(self._staging.failures)
        info = self._info
        update_manifest(self.set_dir, self._record_in_manifest)
        shutil.rmtree(self._staging.path, ignore_errors=True)
        self._release()
        return dict(info)

    def _shard_info(self, attrs: dict) -> dict:
        failures = attrs.get("failures", [])
        if isinstance(failures, str):
            failures = json.loads(failures)
        return {"name": self.name, "index": self.index,
                "num_images": int(attrs["num_images"]), "num_regions": int(attrs["num_regions"]),
                "digest": attrs["digest"], "failures": failures,
                "bytes": shard_size(self.path)}

    def _record_in_manifest(self, m: dict) -> dict:
        m.setdefault("schema_version", SCHEMA_VERSION)
        if m.get("extras", {}) != self.extras and m.get("shards"):
            raise RegionSetError(
                f"{self.set_dir}/manifest.json declares optional arrays "
                f"{m.get('extras', {})} but shard {self.name} was written with {self.extras}; "
                "all shards of a set must agree -- write this shard into a new set directory "
                "or re-run with the set's options")
        if self.extras:
            m["extras"] = self.extras
        for key, value in (("backend", self.backend), ("feature_dim", self.feature_dim),
                           ("feature_dtype", self.feature_dtype.name),
                           ("num_shards", self.num_shards)):
            if key in m and m[key] != value:
                raise RegionSetError(
                    f"{self.set_dir}/manifest.json has {key}={m[key]!r} but shard {self.name} "
                    f"was written with {key}={value!r}; all shards of a set must agree -- write "
                    "this shard into a new set directory or re-run with the set's options")
            m.setdefault(key, value)
        info = self._info
        shards = [s for s in m.get("shards", []) if s.get("index") != self.index]
        m["shards"] = sorted(shards + [info], key=lambda s: s["index"])
        failures = [f for f in m.get("failures", []) if f.get("shard") != self.index]
        failures += [dict(f, shard=self.index) for f in info["failures"]]
        m["failures"] = sorted(failures, key=lambda f: f.get("shard", -1))
        return m

    def _check_writable(self) -> None:
        if self.complete:
            raise RegionSetError(f"shard {self.path} is already complete; nothing to append "
                                 "(delete it to write it again)")
        if self._closed:
            raise RegionSetError(f"writer for {self.name} is closed")

    def _release(self) -> None:
        if not self._closed:
            self._closed = True
            if not self.complete:
                self._staging.close()
            self._lock.release()

    def close(self, commit: bool = True) -> None:
        """Commit (unless ``commit=False``: drop pending rows) and release the lock."""
        if self._closed:
            return
        if commit:
            self.commit()
        else:
            self._pending, self._pending_failures = [], []
        self._release()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(commit=exc_type is None)


