"""Writing a shard: the append-only staging directory and the one-pass build of the final file.

A ``ShardWriter`` appends images to ``<shard>.partial/``: plain append-only files plus
``commit.json``, the record of what is durable. A commit appends the pending rows, fsyncs them
and then atomically replaces ``commit.json``; a writer killed at any point (SIGKILL included)
leaves at worst bytes past the last commit, which the next writer truncates away before it
resumes. :func:`build_shard` writes the HDF5 file or zarr group from the staging files in one
sequential pass (so a zarr shard is written once, not re-encoded on every commit); its sizes
are known when its datasets are created, which is why they need not be resizable.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .digest import ARRAY_NAMES, DIGEST_SIZE, content_digest, decode_ids, encode_ids
from .manifest import SCHEMA_VERSION, fsync_dir
from .shard_format import (SHARD_FORMAT, ZARR_INNER_CHUNK_BYTES, ZARR_INNER_CHUNKS_PER_SHARD,
                           RegionSetError, tool_version)

__all__ = ["Staging", "build_shard", "fsync_tree", "shard_size"]

#: Rows copied per step when a shard is built from its staging files.
_BUILD_BLOCK_BYTES = 32 << 20


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


def _extra_file(name: str) -> str:
    """Staging file (without .bin) of optional array ``name``."""
    return f"extra.{name}"


class Staging:
    """The ``<shard>.partial/`` directory: append-only files + the commit record.

    ``ids.bin`` holds ``encode_ids`` records; ``features.bin`` rows of the stored dtype; the
    other files fixed-size records (see ``_STAGING``). ``commit.json`` says how many images and
    regions (and id bytes) are durable; anything past that is an interrupted commit.
    """

    def __init__(self, path: Path, config: dict):
        self.path = path
        self.config = config
        #: optional arrays: name -> (little-endian dtype, width)
        self.extras = {name: (np.dtype(dt).newbyteorder("<"), int(k))
                       for name, (dt, k) in (config.get("extras") or {}).items()}
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
        for name, (dt, k) in self.extras.items():
            sizes[_extra_file(name)] = r * k * dt.itemsize
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
        fsync_dir(self.path.parent)

    def resume(self) -> None:
        """Load the commit record and cut every file back to it."""
        try:
            record = json.loads((self.path / _COMMIT).read_text())
        except (OSError, ValueError) as e:
            raise RegionSetError(
                f"{self.path} is a partial shard without a readable {_COMMIT} ({e}); delete "
                f"the directory {self.path} and re-run to write the shard from the start"
            ) from None
        for key in ("backend", "feature_dim", "feature_dtype", "shard_index", "num_shards",
                    "extras"):
            if record.get(key) != self.config.get(key):
                raise RegionSetError(
                    f"{self.path}: the partial shard was written with {key}="
                    f"{record.get(key)!r} but this writer has {key}={self.config.get(key)!r}; "
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
            for name in self.extras:
                f = self._files[_extra_file(name)]
                for p in pending:
                    if p[8][name].size:
                        f.write(p[8][name].data)
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

    def read_extras(self) -> dict[str, np.ndarray]:
        """The optional arrays, ``(R, width)`` each."""
        return {name: np.fromfile(self.file(_extra_file(name)), dtype=dt).reshape(-1, k)
                for name, (dt, k) in self.extras.items()}

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
        "tool_version": tool_version(),
        **({"extras": json.dumps(config["extras"], sort_keys=True)} if config.get("extras")
           else {}),
    }


def build_shard(staging: Staging, out: Path, extra: dict) -> dict:
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
    extras = staging.read_extras()

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
            digest = content_digest(ids_bytes, arrays, blocks, extras)
            for name, a in extras.items():
                f.create_dataset(name, data=a)
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
        digest = content_digest(ids_bytes, arrays, blocks, extras)
        for name, a in extras.items():
            put(name, a)
        attrs = _shard_attrs(cfg, n, r, digest, staging.failures, extra)
        root.attrs.update(attrs)
    fsync_tree(out)
    return attrs


def fsync_tree(path: Path) -> None:
    if path.is_dir():
        for dirpath, _, files in os.walk(path):
            for name in files:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            fsync_dir(Path(dirpath))
    else:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def shard_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


