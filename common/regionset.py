"""The region-set format: shard writer and reader, for HDF5 (h5py) and zarr v3.

A region set is a directory holding ``manifest.json`` and shards
``shard-00003-of-00016.{h5,zarr}``. Each shard holds the same arrays under the same names in
both backends (docs/FORMAT.md is the specification)::

    image_ids     (N,)      utf-8 string
    image_hw      (N, 2)    int32      original height, width
    offsets       (N+1,)    int64      regions of image i are rows offsets[i]:offsets[i+1]
    boxes         (R, 4)    float32    x1 y1 x2 y2, original-image pixels
    scores        (R,)      float32
    classes       (R,)      int32
    box_digest    (N, 16)   uint8      blake2b-128 of the image's boxes as little-endian float32
    image_digest  (N, 16)   uint8      blake2b-128 of the image file's bytes (zeros if unknown)
    features      (R, D)    float16 (float32 on request)

Writing. A ``ShardWriter`` appends images to a staging directory ``<shard>.partial/`` made of
plain append-only files plus ``commit.json``, the record of what is durable. A commit appends
the pending rows, fsyncs them and then atomically replaces ``commit.json``; a writer killed at
any point (SIGKILL included) leaves at worst bytes past the last commit, which the next writer
truncates away before it resumes. ``finalize()`` builds the HDF5 file or zarr group from the
staging files in one sequential pass (so a zarr shard is written once, not re-encoded on every
commit), renames it to its final name, and records it in the manifest. This is why the final
datasets need not be resizable: their sizes are known when they are created.

Reading. ``ShardReader`` opens a shard lazily, loads the small per-image and per-region arrays
into memory, and copies feature rows out of a per-process memory map of the file, at byte
offsets taken from the container's own index: the HDF5 dataset's contiguous storage offset, or
the zarr sharding codec's shard index (read once per shard file). This avoids the per-call cost
of h5py and zarr-python (0.1-2 ms), which would dominate a by-id read of ~50 regions. Any
layout the fast path does not recognise (a re-chunked or compressed copy) is read through
h5py or zarr-python instead. Files are mapped per process, so readers work in forked
DataLoader workers. Features are returned in their stored dtype: the fp16->fp32 cast
costs more than the read and belongs after batching, on the device.
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .digest import (ARRAY_NAMES, DIGEST_SIZE, ShardDigest, box_digest, bytes_digest,
                     content_digest, decode_ids, encode_ids, file_digest)
from .locking import FileLock, LockHeldError, describe_holder
from .manifest import (SCHEMA_VERSION, ManifestError, _fsync_dir, read_manifest,
                       update_manifest)

BACKENDS = {"hdf5": ".h5", "zarr": ".zarr"}
FEATURE_DTYPES = ("float16", "float32")
SHARD_FORMAT = "vlkd-region-shard"

#: zarr layout of ``features``: inner chunks of about 1 MiB (a whole number of rows), 64 inner
#: chunks per shard file (~64 MiB). See docs/FORMAT.md, "Chunking", for the measurements.
ZARR_INNER_CHUNK_BYTES = 1 << 20
ZARR_INNER_CHUNKS_PER_SHARD = 64
#: Rows copied per step when a shard is built from its staging files.
_BUILD_BLOCK_BYTES = 32 << 20
_MISSING = np.uint64(2**64 - 1)


class RegionSetError(RuntimeError):
    """A region set or shard is missing, inconsistent, or used against its contract."""


class ShardLockedError(RegionSetError):
    """Another live writer holds the shard's lock.

    Attributes:
        holder: ``{"host": str, "pid": int, "since": float}`` of the holder.
    """

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


# --------------------------------------------------------------------------- names

def shard_name(index: int, num_shards: int, backend: str) -> str:
    """``shard-00003-of-00016.h5`` (hdf5) or ``.zarr`` (zarr)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    if not 0 <= index < num_shards:
        raise ValueError(f"shard index {index} outside 0..{num_shards - 1}")
    return f"shard-{index:05d}-of-{num_shards:05d}{BACKENDS[backend]}"


def _check_feature_dtype(feature_dtype) -> np.dtype:
    dt = np.dtype(feature_dtype)
    if dt.name not in FEATURE_DTYPES:
        raise ValueError(f"feature_dtype must be float16 or float32, got {dt.name}")
    return dt


def _tool_version() -> str:
    try:
        from vlkd import __version__
        return __version__
    except Exception:  # running from a source tree without the package installed
        return "unknown"


# --------------------------------------------------------------------------- the image record

@dataclass
class ImageRegions:
    """One image's regions as stored.

    Attributes:
        image_id: the image key.
        image_hw: original (height, width).
        boxes: (n, 4) float32, x1 y1 x2 y2 in original-image pixels.
        scores: (n,) float32.
        classes: (n,) int32.
        features: (n, D) in the stored dtype (float16 by default).
        box_digest: 16 bytes, ``box_digest(boxes)``.
        image_digest: 16 bytes (zeros if unknown).

    Arrays returned by a reader are read-only views of the shard's in-memory arrays (features
    are a fresh array); copy before modifying.
    """

    image_id: str
    image_hw: tuple[int, int]
    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    features: np.ndarray
    box_digest: bytes
    image_digest: bytes

    @property
    def num_regions(self) -> int:
        return int(self.boxes.shape[0])


# --------------------------------------------------------------------------- staging files

# name -> (dtype, values per record); records are images ("N") or regions ("R").
_STAGING = {
    "image_hw": ("<i4", 2, "N"),
    "counts": ("<i8", 1, "N"),
    "box_digest": ("u1", DIGEST_SIZE, "N"),
    "image_digest": ("u1", DIGEST_SIZE, "N"),
    "boxes": ("<f4", 4, "R"),
    "scores": ("<f4", 1, "R"),
    "classes": ("<i4", 1, "R"),
}
_COMMIT = "commit.json"


class _Staging:
    """The ``<shard>.partial/`` directory: append-only files + the commit record.

    ``ids.bin`` holds ``encode_ids`` records; ``features.bin`` rows of the stored dtype; the
    other files fixed-size records (see ``_STAGING``). ``commit.json`` says how many images and
    regions (and id bytes) are durable; anything past that is an interrupted commit.
    """

    def __init__(self, path: Path, config: dict):
        self.path = path
        self.config = config
        self.feature_dtype = np.dtype(config["feature_dtype"]).newbyteorder("<")
        self.row_bytes = config["feature_dim"] * self.feature_dtype.itemsize
        self.num_images = 0
        self.num_regions = 0
        self.ids_bytes = 0
        self.failures: list[dict] = []
        self.ids: list[str] = []
        self._files: dict[str, Any] = {}

    # sizes of each staging file for a given commit
    def _expected_sizes(self, n: int, r: int, ids_bytes: int) -> dict[str, int]:
        sizes = {"ids": ids_bytes, "features": r * self.row_bytes}
        for name, (dt, k, per) in _STAGING.items():
            sizes[name] = (n if per == "N" else r) * k * np.dtype(dt).itemsize
        return sizes

    def file(self, name: str) -> Path:
        return self.path / f"{name}.bin"

    def create(self) -> None:
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        for name in self._expected_sizes(0, 0, 0):
            self.file(name).touch()
        self._write_commit()
        _fsync_dir(self.path.parent)

    def resume(self) -> None:
        """Load the commit record and cut every file back to it."""
        try:
            record = json.loads((self.path / _COMMIT).read_text())
        except (OSError, ValueError) as e:
            raise RegionSetError(
                f"{self.path} is a partial shard without a readable {_COMMIT} ({e}); delete "
                f"the directory {self.path} and re-run to write the shard from the start"
            ) from None
        for key in ("backend", "feature_dim", "feature_dtype", "shard_index", "num_shards"):
            if record.get(key) != self.config[key]:
                raise RegionSetError(
                    f"{self.path}: the partial shard was written with {key}="
                    f"{record.get(key)!r} but this writer has {key}={self.config[key]!r}; "
                    f"re-run with the original options, or delete {self.path} to start over")
        n, r, ids_bytes = record["num_images"], record["num_regions"], record["ids_bytes"]
        for name, size in self._expected_sizes(n, r, ids_bytes).items():
            path = self.file(name)
            actual = path.stat().st_size if path.exists() else -1
            if actual < size:
                raise RegionSetError(
                    f"{path} holds {actual} bytes but the last commit recorded {size}: the "
                    f"partial shard is damaged (was it copied or edited?); delete {self.path} "
                    "and re-run to write the shard from the start")
            if actual > size:  # an interrupted commit: drop its bytes
                os.truncate(path, size)
        self.num_images, self.num_regions, self.ids_bytes = n, r, ids_bytes
        self.failures = list(record.get("failures", []))
        self.ids = decode_ids(self.file("ids").read_bytes(), n)
        counts = np.fromfile(self.file("counts"), dtype="<i8")
        if int(counts.sum()) != r:
            raise RegionSetError(
                f"{self.path}: per-image region counts sum to {int(counts.sum())} but the commit "
                f"records {r} regions; delete {self.path} and re-run")

    def open_for_append(self) -> None:
        for name in self._expected_sizes(0, 0, 0):
            self._files[name] = open(self.file(name), "ab")

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def append(self, pending: list[tuple], failures: list[dict], durable: bool = True) -> None:
        """Append pending images, fsync, then publish the new commit record."""
        if pending:
            ids = encode_ids([p[0] for p in pending])
            self._files["ids"].write(ids)
            hw = np.array([p[1] for p in pending], dtype="<i4").reshape(-1, 2)
            self._files["image_hw"].write(hw.tobytes())
            counts = np.array([p[2].shape[0] for p in pending], dtype="<i8")
            self._files["counts"].write(counts.tobytes())
            self._files["box_digest"].write(b"".join(p[6] for p in pending))
            self._files["image_digest"].write(b"".join(p[7] for p in pending))
            for j, name in ((2, "boxes"), (3, "scores"), (4, "classes"), (5, "features")):
                f = self._files[name]
                for p in pending:
                    if p[j].size:
                        f.write(p[j].data)
            self.num_images += len(pending)
            self.num_regions += int(counts.sum())
            self.ids_bytes += len(ids)
            self.ids.extend(p[0] for p in pending)
        self.failures.extend(failures)
        for f in self._files.values():
            f.flush()
            if durable:
                os.fsync(f.fileno())
        self._write_commit()

    def _write_commit(self) -> None:
        record = dict(self.config, num_images=self.num_images, num_regions=self.num_regions,
                      ids_bytes=self.ids_bytes, failures=self.failures)
        tmp = self.path / (_COMMIT + ".tmp")
        with open(tmp, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / _COMMIT)

    # ---- reading back for the build
    def read_small(self) -> dict[str, np.ndarray]:
        out = {}
        for name, (dt, k, per) in _STAGING.items():
            a = np.fromfile(self.file(name), dtype=dt)
            out[name] = a.reshape(-1, k) if k > 1 else a
        return out

    def feature_blocks(self, rows_per_block: int) -> Iterator[tuple[int, np.ndarray]]:
        with open(self.file("features"), "rb") as f:
            start = 0
            while start < self.num_regions:
                n = min(rows_per_block, self.num_regions - start)
                count = n * self.config["feature_dim"]
                block = np.fromfile(f, dtype=self.feature_dtype, count=count)
                if block.size != count:
                    raise RegionSetError(f"{self.file('features')} ended early while building")
                yield start, block.reshape(n, self.config["feature_dim"])
                start += n


# --------------------------------------------------------------------------- building a shard

def _zarr_feature_layout(feature_dim: int, dtype: np.dtype, num_rows: int) -> tuple[int, int]:
    """(inner chunk rows, shard rows) for the zarr ``features`` array of ``num_rows`` rows.

    Inner chunks are stored at full size even when the array ends inside one, so a shard with
    fewer rows than one inner chunk gets a chunk of exactly its rows (no padding).
    """
    row_bytes = max(1, feature_dim * dtype.itemsize)
    inner = max(1, min(ZARR_INNER_CHUNK_BYTES // row_bytes, num_rows))
    return inner, inner * ZARR_INNER_CHUNKS_PER_SHARD


def _shard_attrs(config: dict, n: int, r: int, digest: str, failures: list[dict],
                 extra: dict) -> dict:
    return {
        "vlkd_format": SHARD_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "backend": config["backend"],
        "shard_index": int(config["shard_index"]),
        "num_shards": int(config["num_shards"]),
        "num_images": int(n),
        "num_regions": int(r),
        "feature_dim": int(config["feature_dim"]),
        "feature_dtype": str(config["feature_dtype"]),
        "digest": digest,
        "failures": json.dumps(failures, ensure_ascii=False),
        "extra": json.dumps(extra, ensure_ascii=False, sort_keys=True),
        "tool_version": _tool_version(),
    }


def _build_shard(staging: _Staging, out: Path, extra: dict) -> dict:
    """Write the final container at ``out`` from the staging files; return its attributes."""
    cfg = staging.config
    small = staging.read_small()
    n, r = staging.num_images, staging.num_regions
    offsets = np.zeros(n + 1, dtype="<i8")
    np.cumsum(small["counts"], out=offsets[1:])
    arrays = {
        "image_ids": staging.ids,
        "image_hw": small["image_hw"],
        "offsets": offsets,
        "boxes": small["boxes"],
        "scores": small["scores"],
        "classes": small["classes"],
        "box_digest": small["box_digest"],
        "image_digest": small["image_digest"],
    }
    ids_bytes = staging.file("ids").read_bytes()

    def written(blocks, write):
        """The feature blocks, each written as it passes on to the digest."""
        for start, block in blocks:
            write(start, block)
            yield block
    rows_per_block = max(1, _BUILD_BLOCK_BYTES // max(1, staging.row_bytes))
    dt = staging.feature_dtype
    d = cfg["feature_dim"]
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()

    if cfg["backend"] == "hdf5":
        import h5py
        with h5py.File(out, "w") as f:
            f.create_dataset("image_ids", data=np.array(staging.ids, dtype=object),
                             dtype=h5py.string_dtype("utf-8"))
            for name in ARRAY_NAMES[1:-1]:
                f.create_dataset(name, data=arrays[name])
            # Contiguous (not chunked): one image's rows, or any run of consecutive images,
            # is one contiguous byte range -- the best layout for both read patterns when the
            # data is uncompressed (docs/FORMAT.md, "Chunking").
            ds = f.create_dataset("features", shape=(r, d), dtype=dt)
            blocks = written(staging.feature_blocks(rows_per_block),
                             lambda start, b: ds.__setitem__(slice(start, start + len(b)), b))
            digest = content_digest(ids_bytes, arrays, blocks)
            attrs = _shard_attrs(cfg, n, r, digest, staging.failures, extra)
            f.attrs.update(attrs)
    else:
        import zarr
        inner, shard_rows = _zarr_feature_layout(d, dt, r)
        root = zarr.open_group(str(out), mode="w", zarr_format=3)

        def put(name, data, dtype=None):
            data_dtype = dtype if dtype is not None else data.dtype
            chunks = tuple(max(1, s) for s in data.shape)  # small arrays: one chunk each
            a = root.create_array(name, shape=data.shape, dtype=data_dtype, chunks=chunks,
                                  compressors=None, filters=None)
            if data.size:
                a[...] = data

        put("image_ids", np.array(staging.ids, dtype=object), dtype=str)
        for name in ARRAY_NAMES[1:-1]:
            put(name, arrays[name])
        feats = root.create_array(
            "features", shape=(r, d), dtype=dt, chunks=(inner, d), shards=(shard_rows, d),
            compressors=None, filters=None, fill_value=0,
            config={"write_empty_chunks": True})
        # Write whole zarr shards so each shard file is encoded and written exactly once.
        rows_per_block = max(shard_rows, (rows_per_block // shard_rows) * shard_rows)
        blocks = written(staging.feature_blocks(rows_per_block),
                         lambda start, b: feats.__setitem__(slice(start, start + len(b)), b))
        digest = content_digest(ids_bytes, arrays, blocks)
        attrs = _shard_attrs(cfg, n, r, digest, staging.failures, extra)
        root.attrs.update(attrs)
    _fsync_tree(out)
    return attrs


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for dirpath, _, files in os.walk(path):
            for name in files:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            _fsync_dir(Path(dirpath))
    else:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _shard_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


# --------------------------------------------------------------------------- the writer

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
                 commit_every: int = 64, attrs: dict | None = None, durable: bool = True):
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
        self.feature_dtype = _check_feature_dtype(feature_dtype)
        self.commit_every = int(commit_every)
        self.extra = dict(attrs or {})
        try:
            json.dumps(self.extra)
        except TypeError as e:
            raise ValueError(f"attrs must be JSON-serialisable (plain str/int/float/bool/list/"
                             f"dict; convert numpy values with .item() or .tolist()): {e}") from None
        self.durable = durable
        self._config = {"backend": backend, "feature_dim": self.feature_dim,
                        "feature_dtype": self.feature_dtype.name,
                        "shard_index": self.index, "num_shards": self.num_shards}
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
            self._staging = _Staging(self.path.with_name(self.name + ".partial"), self._config)
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
                          ("feature_dtype", self.feature_dtype.name)):
            if attrs.get(key) != want:
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
               image_digest: bytes = b"\0" * DIGEST_SIZE) -> None:
        """Add one image with n >= 0 regions.

        Args:
            image_id: unique key of the image within the set.
            image_hw: original (height, width).
            boxes: (n, 4) x1 y1 x2 y2 in original pixels (stored as float32).
            scores: (n,) confidences (float32).
            classes: (n,) class indices (int32).
            features: (n, D) region features; cast to the shard's feature dtype.
            image_digest: 16 bytes identifying the image file (zeros if unknown).
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
                              box_digest(boxes), image_digest))
        self._seen.add(image_id)
        if len(self._pending) >= self.commit_every:
            self.commit()

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
            attrs = _build_shard(self._staging, build, self.extra)
            os.rename(build, self.path)  # the shard appears complete or not at all
            _fsync_dir(self.set_dir)
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
                "bytes": _shard_size(self.path)}

    def _record_in_manifest(self, m: dict) -> dict:
        m.setdefault("schema_version", SCHEMA_VERSION)
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


# --------------------------------------------------------------------------- reading

class _MapCache:
    """Read-only memory maps of shard files, per process, least recently used dropped first.

    Copying rows out of a map is cheaper than ``os.pread`` (no syscall and no page-cache lookup
    per call once mapped: ~19 vs ~24 us for a 230 KB image here), and it is what a raw
    ``np.memmap`` read does.
    Shards are immutable once finalised, so a mapping never sees its file shrink.
    """

    def __init__(self, max_open: int = 256):
        self.max_open = max_open
        self._pid = os.getpid()
        self._maps: OrderedDict[str, mmap.mmap] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str) -> mmap.mmap:
        with self._lock:
            if self._pid != os.getpid():
                # A forked child inherits the parent's mappings; map its own files instead of
                # sharing Python objects (and their bookkeeping) across processes.
                self._maps = OrderedDict()
                self._pid = os.getpid()
            m = self._maps.pop(path, None)
            if m is None:
                m = self._open(path)
                while len(self._maps) >= self.max_open:
                    old = self._maps.popitem(last=False)[1]
                    try:
                        old.close()
                    except BufferError:  # a view is still alive: let it go with its last user
                        pass
            self._maps[path] = m
            return m

    def forget(self, prefix: str) -> None:
        """Drop the maps of files under ``prefix`` (before re-checking files that may have
        changed on disk: a mapped file that shrinks would fault on access)."""
        with self._lock:
            for path in [p for p in self._maps if p.startswith(prefix)]:
                m = self._maps.pop(path)
                try:
                    m.close()
                except BufferError:
                    pass

    @staticmethod
    def _open(path: str) -> mmap.mmap:
        fd = os.open(path, os.O_RDONLY)
        try:
            if os.fstat(fd).st_size == 0:
                raise RegionSetError(f"{path} is empty; the shard is truncated -- run "
                                     "`vlkd-extract validate` on the set and re-extract it")
            return mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        finally:
            os.close(fd)  # the mapping keeps the file open


_MAPS = _MapCache()


def release_maps(path: str | Path) -> None:
    """Drops this process's memory maps of the shard at ``path`` (see
    :meth:`ShardReader.release_maps`); the next read maps its files as they are then."""
    _MAPS.forget(str(path))


def _file_view(path: str, offset: int, shape: tuple, dtype: np.dtype) -> np.ndarray:
    """A read-only view of ``shape``/``dtype`` at byte ``offset`` of ``path`` (mapped)."""
    m = _MAPS.get(path)
    nbytes = dtype.itemsize
    for extent in shape:
        nbytes *= extent
    if offset + nbytes > len(m):
        raise RegionSetError(
            f"{path}: file ends at byte {len(m)}, but {nbytes} bytes are needed at {offset}; "
            "the shard is truncated -- run `vlkd-extract validate` on the set and re-extract it")
    return np.ndarray(shape, dtype=dtype, buffer=m, offset=offset)


class _ContiguousRows:
    """Feature rows stored contiguously at ``offset`` in one file (HDF5 contiguous layout)."""

    def __init__(self, path: str, offset: int | None, dtype: np.dtype, dim: int):
        self.path, self.offset, self.dtype, self.dim = path, offset, dtype, dim
        self.row_bytes = dim * dtype.itemsize

    def read(self, r0: int, r1: int) -> np.ndarray:
        if r1 <= r0:
            return np.empty((0, self.dim), dtype=self.dtype)
        if self.offset is None:  # storage never allocated: the fill value
            return np.zeros((r1 - r0, self.dim), dtype=self.dtype)
        return _file_view(self.path, self.offset + r0 * self.row_bytes, (r1 - r0, self.dim),
                          self.dtype).copy()


class _ZarrShardedRows:
    """Feature rows of a zarr v3 array with the sharding codec and uncompressed inner chunks.

    Inner chunks span the full row width, so row ``r`` of inner chunk ``k`` sits at
    ``chunk_offset[k] + (r - k * inner) * row_bytes`` in the shard file: one copy per run of
    rows, after reading each shard file's index once (and checking its crc32c).
    """

    def __init__(self, array_dir: Path, meta: dict, dtype: np.dtype, dim: int, fill: float):
        self.dir, self.dtype, self.dim, self.fill = array_dir, dtype, dim, fill
        self.shard_rows = meta["shard_rows"]
        self.inner = meta["inner_rows"]
        self.sep = meta["separator"]
        self.index_at_end = meta["index_location"] == "end"
        self.has_crc = meta["crc"]
        self.row_bytes = dim * dtype.itemsize
        self.chunks_per_shard = self.shard_rows // self.inner
        self._index: dict[int, list | None] = {}

    def _file(self, s: int) -> str:
        key = f"c/{s}/0" if self.sep == "/" else f"c.{s}.0"
        return str(self.dir / key)

    def _shard_index(self, s: int) -> list | None:
        """[(offset, nbytes) or None per inner chunk] of zarr shard file ``s``."""
        if s in self._index:
            return self._index[s]
        path = self._file(s)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            self._index[s] = None  # a shard never written holds the fill value
            return None
        n = self.chunks_per_shard
        nbytes = n * 16 + (4 if self.has_crc else 0)
        if size < nbytes:
            raise RegionSetError(f"{path}: {size} bytes, smaller than its shard index "
                                 f"({nbytes} bytes); the file is truncated -- re-extract")
        raw = _file_view(path, size - nbytes if self.index_at_end else 0, (nbytes,),
                         np.dtype(np.uint8)).tobytes()
        if self.has_crc:
            import google_crc32c  # zarr's own dependency for its crc32c codec
            if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                raise RegionSetError(f"{path}: shard index checksum mismatch; the file is "
                                     "corrupt or truncated -- re-extract this shard")
        table = np.frombuffer(raw[:n * 16], dtype="<u8").reshape(n, 2)
        chunk_bytes = self.inner * self.row_bytes
        index = []
        for k, (off, size_k) in enumerate(table.tolist()):
            if off == 2**64 - 1:
                index.append(None)
            elif size_k != chunk_bytes:
                raise RegionSetError(
                    f"{path}: inner chunk {k} has {size_k} bytes, expected {chunk_bytes} "
                    f"(uncompressed {self.inner} x {self.dim} {self.dtype.name}); the shard is "
                    "corrupt -- re-extract it")
            else:
                index.append(off)
        self._index[s] = index
        return index

    def read(self, r0: int, r1: int) -> np.ndarray:
        if r1 <= r0:
            return np.empty((0, self.dim), dtype=self.dtype)
        # Fast case: the rows lie in one inner chunk (most single images).
        s, rr = divmod(r0, self.shard_rows)
        k, within = divmod(rr, self.inner)
        if within + (r1 - r0) <= self.inner:
            index = self._shard_index(s)
            off = index[k] if index is not None else None
            if off is None:
                return np.full((r1 - r0, self.dim), self.fill, dtype=self.dtype)
            return _file_view(self._file(s), off + within * self.row_bytes,
                              (r1 - r0, self.dim), self.dtype).copy()
        out = np.empty((r1 - r0, self.dim), dtype=self.dtype)
        rb = self.row_bytes
        r = r0
        while r < r1:
            s, rr = divmod(r, self.shard_rows)
            k, within = divmod(rr, self.inner)
            n = min(r1 - r, self.inner - within)
            index = self._shard_index(s)
            off = index[k] if index is not None else None
            if off is None:
                out[r - r0:r - r0 + n] = self.fill
                r += n
                continue
            start = off + within * rb
            # Inner chunks written in order are adjacent in the shard file: extend the run
            # over them and copy it at once.
            while r + n < r1 and k + 1 < self.chunks_per_shard and \
                    index[k + 1] == off + self.inner * rb:
                k += 1
                off = index[k]
                n += min(r1 - r - n, self.inner)
            out[r - r0:r - r0 + n] = _file_view(self._file(s), start, (n, self.dim), self.dtype)
            r += n
        return out


class _LibraryRows:
    """Fallback: rows through h5py or zarr-python (any chunking or compression)."""

    def __init__(self, path: Path, backend: str):
        self.path, self.backend = path, backend
        self._pid = None
        self._handle = None
        self._array = None

    def _open(self):
        if self._pid != os.getpid():
            if self.backend == "hdf5":
                import h5py
                self._handle = h5py.File(self.path, "r")
                self._array = self._handle["features"]
            else:
                import zarr
                self._array = zarr.open_group(str(self.path), mode="r")["features"]
            self._pid = os.getpid()
        return self._array

    def read(self, r0: int, r1: int) -> np.ndarray:
        return np.asarray(self._open()[r0:r1])


def _zarr_fast_meta(array_dir: Path, dim: int) -> dict | None:
    """Parse features/zarr.json; None unless the fast path understands the layout."""
    try:
        meta = json.loads((array_dir / "zarr.json").read_text())
        grid = meta["chunk_grid"]
        if grid["name"] != "regular" or meta.get("storage_transformers"):
            return None
        shard_shape = grid["configuration"]["chunk_shape"]
        cke = meta["chunk_key_encoding"]
        if cke["name"] != "default":
            return None
        sep = cke.get("configuration", {}).get("separator", "/")
        codecs = meta["codecs"]
        if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
            return None
        conf = codecs[0]["configuration"]
        inner_shape = conf["chunk_shape"]
        inner_codecs = conf["codecs"]
        if len(inner_codecs) != 1 or inner_codecs[0]["name"] != "bytes" or \
                inner_codecs[0].get("configuration", {}).get("endian", "little") != "little":
            return None
        index_codecs = [c["name"] for c in conf.get("index_codecs", [])]
        if index_codecs not in (["bytes"], ["bytes", "crc32c"]):
            return None
        if conf["index_codecs"][0].get("configuration", {}).get("endian", "little") != "little":
            return None
        if shard_shape[1] != dim or inner_shape[1] != dim or shard_shape[0] % inner_shape[0]:
            return None
        return {"shard_rows": int(shard_shape[0]), "inner_rows": int(inner_shape[0]),
                "separator": sep, "index_location": conf.get("index_location", "end"),
                "crc": index_codecs == ["bytes", "crc32c"],
                "fill_value": float(meta.get("fill_value", 0) or 0)}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _read_only(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


class _ShardData:
    """What a reader holds in memory after opening a shard."""

    def __init__(self, path: Path):
        self.path = path
        if path.is_dir():
            self.backend = "zarr"
            self._load_zarr()
        else:
            self.backend = "hdf5"
            self._load_hdf5()
        self.num_images = len(self.image_ids)
        self.num_regions = int(self.offsets[-1]) if len(self.offsets) else 0
        # Python-int copies for the per-image hot path (numpy scalar indexing costs ~100 ns
        # each and int() conversions add up at tens of thousands of reads per second).
        self.offsets_list = self.offsets.tolist()
        self.hw_list = [tuple(hw) for hw in self.image_hw.tolist()]
        self.id_to_pos: dict[str, int] | None = None

    def _set_small(self, get):
        self.image_hw = _read_only(np.asarray(get("image_hw"), dtype=np.int32).reshape(-1, 2))
        self.offsets = _read_only(np.asarray(get("offsets"), dtype=np.int64))
        self.boxes = _read_only(np.asarray(get("boxes"), dtype=np.float32).reshape(-1, 4))
        self.scores = _read_only(np.asarray(get("scores"), dtype=np.float32))
        self.classes = _read_only(np.asarray(get("classes"), dtype=np.int32))
        self.box_digests = _read_only(np.asarray(get("box_digest"), dtype=np.uint8))
        self.image_digests = _read_only(np.asarray(get("image_digest"), dtype=np.uint8))

    def _load_hdf5(self):
        import h5py
        try:
            f = h5py.File(self.path, "r")
        except OSError as e:
            raise RegionSetError(f"{self.path}: cannot open as HDF5 ({e}); the file is "
                                 "truncated or corrupt -- re-extract this shard") from None
        try:
            with f:
                self.attrs = _decode_attrs(dict(f.attrs))
                self.image_ids = list(f["image_ids"].asstr()[:])
                self._set_small(lambda name: f[name][()])
                ds = f["features"]
                self.feature_dim = int(ds.shape[1])
                self.feature_dtype = np.dtype(ds.dtype.name)  # native order, as returned
                plist = ds.id.get_create_plist()
                offset = ds.id.get_offset()
                # Only plain contiguous storage in the file itself is mapped directly; virtual,
                # external, chunked or unallocated data goes through h5py.
                direct = (plist.get_layout() == h5py.h5d.CONTIGUOUS
                          and plist.get_external_count() == 0 and offset is not None
                          and ds.dtype.byteorder in "<=|")
                if direct:
                    self.rows = _ContiguousRows(str(self.path), offset, self.feature_dtype,
                                                self.feature_dim)
                elif ds.shape[0] == 0:
                    self.rows = _ContiguousRows(str(self.path), None, self.feature_dtype,
                                                self.feature_dim)
                else:
                    self.rows = _LibraryRows(self.path, "hdf5")
        except RegionSetError:
            raise
        except Exception as e:  # a missing array, a damaged object header, ...
            raise RegionSetError(f"{self.path}: cannot read the shard ({type(e).__name__}: {e})"
                                 "; it is incomplete or corrupt -- run `vlkd-extract validate` "
                                 "and re-extract it") from None

    def _load_zarr(self):
        import zarr
        try:
            root = zarr.open_group(str(self.path), mode="r", zarr_format=3)
            self.attrs = _decode_attrs(dict(root.attrs))
            ids = root["image_ids"]
            self.image_ids = [str(s) for s in ids[...]] if ids.shape[0] else []
            self._set_small(lambda name: root[name][...])
            feats = root["features"]
        except RegionSetError:
            raise
        except Exception as e:  # zarr raises many types for damaged stores
            raise RegionSetError(f"{self.path}: cannot open as a zarr v3 group ({type(e).__name__}"
                                 f": {e}); the shard is truncated or corrupt -- re-extract it"
                                 ) from None
        self.feature_dim = int(feats.shape[1])
        self.feature_dtype = np.dtype(feats.dtype)
        meta = _zarr_fast_meta(self.path / "features", self.feature_dim)
        if meta is not None and self.feature_dtype.name in FEATURE_DTYPES:
            self.rows = _ZarrShardedRows(self.path / "features", meta, self.feature_dtype,
                                         self.feature_dim, meta["fill_value"])
        else:
            self.rows = _LibraryRows(self.path, "zarr")


def _decode_attrs(attrs: dict) -> dict:
    out = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        elif isinstance(value, np.generic):
            value = value.item()
        if key in ("failures", "extra") and isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key] = value
    return out


class ShardReader:
    """Read one shard (HDF5 file or zarr group); opens lazily, fork-safe.

    Args:
        path: the shard file (``.h5``) or directory (``.zarr``).
        index: the shard index (default: from the shard's attributes).

    The small arrays are loaded on first use and kept in memory (inherited by forked workers);
    feature bytes are copied per call from memory maps made by the calling process.
    """

    def __init__(self, path: str | os.PathLike, index: int | None = None):
        self.path = Path(path)
        self._index = index
        self._data: _ShardData | None = None

    def __getstate__(self):  # pickled into spawned workers: re-open there
        return {"path": self.path, "_index": self._index, "_data": None}

    def __repr__(self) -> str:
        return f"ShardReader({str(self.path)!r})"

    @property
    def data(self) -> _ShardData:
        if self._data is None:
            if not self.path.exists():
                raise RegionSetError(f"shard {self.path} does not exist (listed in the manifest "
                                     "but missing on disk?); re-extract it")
            self._data = _ShardData(self.path)
        return self._data

    # small arrays
    image_ids = property(lambda self: self.data.image_ids)
    image_hw = property(lambda self: self.data.image_hw)
    offsets = property(lambda self: self.data.offsets)
    boxes = property(lambda self: self.data.boxes)
    scores = property(lambda self: self.data.scores)
    classes = property(lambda self: self.data.classes)
    box_digests = property(lambda self: self.data.box_digests)
    image_digests = property(lambda self: self.data.image_digests)
    feature_dim = property(lambda self: self.data.feature_dim)
    feature_dtype = property(lambda self: self.data.feature_dtype)
    attrs = property(lambda self: self.data.attrs)
    backend = property(lambda self: self.data.backend)
    num_regions = property(lambda self: self.data.num_regions)

    @property
    def index(self) -> int:
        if self._index is None:
            self._index = int(self.attrs["shard_index"])
        return self._index

    def release_maps(self) -> None:
        """Drop this process's memory maps of the shard's files.

        Pages copied out of a map stay mapped (and count in RSS) until the map goes; a reader
        streaming many shards calls this when it moves past one, so memory stays flat. The next
        read maps the file again.
        """
        release_maps(self.path)

    def __len__(self) -> int:
        return self.data.num_images

    def index_of(self, image_id: str) -> int:
        """Position of ``image_id`` in this shard (KeyError if absent)."""
        d = self.data
        if d.id_to_pos is None:
            d.id_to_pos = {k: i for i, k in enumerate(d.image_ids)}
        return d.id_to_pos[image_id]

    def _check_range(self, a: int, b: int) -> None:
        n = len(self)
        if not 0 <= a <= b <= n:
            raise IndexError(f"image range {a}:{b} outside 0:{n} of {self.path.name}")

    def features_rows(self, r0: int, r1: int) -> np.ndarray:
        """Feature rows ``r0:r1``, (r1 - r0, D), stored dtype."""
        return self.data.rows.read(r0, r1)

    def features_range(self, a: int, b: int) -> np.ndarray:
        """Features of images ``a:b``: rows ``offsets[a]:offsets[b]``, stored dtype."""
        self._check_range(a, b)
        o = self.data.offsets
        return self.features_rows(int(o[a]), int(o[b]))

    def _record(self, d: _ShardData, i: int, r0: int, r1: int,
                features: np.ndarray) -> ImageRegions:
        return ImageRegions(
            image_id=d.image_ids[i], image_hw=d.hw_list[i],
            boxes=d.boxes[r0:r1], scores=d.scores[r0:r1], classes=d.classes[r0:r1],
            features=features,
            box_digest=d.box_digests[i].tobytes(), image_digest=d.image_digests[i].tobytes())

    def read(self, i: int) -> ImageRegions:
        """Image ``i`` of this shard (one feature read)."""
        d = self._data if self._data is not None else self.data
        if i < 0:
            i += d.num_images
        if not 0 <= i < d.num_images:
            raise IndexError(f"image {i} outside 0:{d.num_images} of {self.path.name}")
        r0, r1 = d.offsets_list[i], d.offsets_list[i + 1]
        return self._record(d, i, r0, r1, d.rows.read(r0, r1))

    def read_range(self, a: int, b: int) -> list[ImageRegions]:
        """Images ``a:b`` with one feature read; each image's features are views of it."""
        self._check_range(a, b)
        d = self.data
        o = d.offsets_list
        base = o[a]
        feats = d.rows.read(base, o[b])
        return [self._record(d, i, o[i], o[i + 1], feats[o[i] - base:o[i + 1] - base])
                for i in range(a, b)]

    def __iter__(self) -> Iterator[ImageRegions]:
        for a in range(0, len(self), 64):
            yield from self.read_range(a, min(a + 64, len(self)))


class RegionSet:
    """A region set directory: manifest plus completed shards.

    Args:
        path: the set directory (holding manifest.json).

    Attributes:
        manifest: the parsed manifest.json.
        shards: readers of the completed shards listed in the manifest, by index.
        feature_dim, feature_dtype, class_names, num_shards: from the manifest.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.manifest = read_manifest(self.path)
        except ManifestError as e:
            raise RegionSetError(str(e)) from None
        m = self.manifest
        for key in ("feature_dim", "feature_dtype"):
            if key not in m:
                raise RegionSetError(f"{self.path}/manifest.json has no {key!r}: no shard was "
                                     "ever finalised into it, or it was not written by vlkd")
        self._entries = sorted(m.get("shards", []), key=lambda s: s["index"])
        self.shards = [ShardReader(self.path / e["name"], index=e["index"])
                       for e in self._entries]
        self.feature_dim = int(m["feature_dim"])
        self.feature_dtype = np.dtype(m["feature_dtype"])
        self.class_names = list(m.get("class_names", []))
        self.num_shards = int(m.get("num_shards", len(self.shards)))
        self._lookup: dict[str, tuple[int, int]] | None = None

    @property
    def missing_shards(self) -> list[int]:
        """Shard indices the manifest's ``num_shards`` promises but no entry records."""
        present = {e["index"] for e in self._entries}
        return [i for i in range(self.num_shards) if i not in present]

    @property
    def shard_entries(self) -> list[dict]:
        return [dict(e) for e in self._entries]

    def __len__(self) -> int:
        return sum(int(e["num_images"]) for e in self._entries)

    def __iter__(self) -> Iterator[ImageRegions]:
        for shard in self.shards:
            yield from shard

    def locate(self, image_id: str) -> tuple[int, int]:
        """(position in ``shards``, image position in that shard); KeyError if absent."""
        if self._lookup is None:
            lookup = {}
            for s, shard in enumerate(self.shards):
                for i, key in enumerate(shard.image_ids):
                    lookup[key] = (s, i)
            self._lookup = lookup
        try:
            return self._lookup[image_id]
        except KeyError:
            raise KeyError(f"image {image_id!r} is not in region set {self.path}") from None

    def get(self, image_id: str) -> ImageRegions:
        s, i = self.locate(image_id)
        return self.shards[s].read(i)

    def __contains__(self, image_id: object) -> bool:
        try:
            self.locate(image_id)  # type: ignore[arg-type]
        except KeyError:
            return False
        return True

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_lookup"] = None
        return state
