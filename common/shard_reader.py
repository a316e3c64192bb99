"""Reading region sets: ``ShardReader`` (one shard, lazy, fork-safe) and ``RegionSet`` (a set).

A reader opens a shard lazily, keeps the small per-image and per-region arrays in memory and
copies feature rows out of memory maps (``vlkd.common.fast_rows``). Features are returned in
their stored dtype: the fp16->fp32 cast costs more than the read and belongs after batching,
on the device.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import MappingProxyType
from typing import Iterator, Sequence

import numpy as np

from .fast_rows import ContiguousRows, LibraryRows, ZarrShardedRows, release_maps, zarr_fast_meta
from .manifest import ManifestError, read_manifest
from .shard_format import FEATURE_DTYPES, NO_EXTRAS, ImageRegions, RegionSetError, check_extras

__all__ = ["ShardReader", "RegionSet"]


def _read_only(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


class ShardData:
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
        # One bytes object each: a record's digests are 16-byte slices of them.
        self.box_digest_bytes = self.box_digests.tobytes()
        self.image_digest_bytes = self.image_digests.tobytes()
        #: Per image, made on its first read and reused (``_small_views``): boxes, scores,
        #: classes, digests and extras as read-only views and bytes (the slices cost about half
        #: a microsecond, several percent of a by-id read).
        self.small_views: list = [None] * self.num_images
        self.id_to_pos: dict[str, int] | None = None

    def _set_small(self, get):
        self.extras = {}
        for name, (dt, k) in check_extras(self.attrs.get("extras")).items():
            self.extras[name] = _read_only(np.asarray(get(name), dtype=dt).reshape(-1, k))
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
                    self.rows = ContiguousRows(str(self.path), offset, self.feature_dtype,
                                               self.feature_dim, ds.shape[0])
                elif ds.shape[0] == 0:
                    self.rows = ContiguousRows(str(self.path), None, self.feature_dtype,
                                               self.feature_dim, 0)
                else:
                    self.rows = LibraryRows(self.path, "hdf5")
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
        meta = zarr_fast_meta(self.path / "features", self.feature_dim)
        if meta is not None and self.feature_dtype.name in FEATURE_DTYPES:
            self.rows = ZarrShardedRows(self.path / "features", meta, self.feature_dtype,
                                         self.feature_dim, meta["fill_value"])
        else:
            self.rows = LibraryRows(self.path, "zarr")


def _decode_attrs(attrs: dict) -> dict:
    out = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        elif isinstance(value, np.generic):
            value = value.item()
        if key in ("failures", "extra", "extras") and isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key] = value
    return out


def _small_views(d: "ShardData", i: int, r0: int, r1: int) -> tuple:
    """Image ``i``'s (boxes, scores, classes, box digest, image digest, extras): read-only
    views and bytes of the shard's in-memory arrays, made once and kept in ``d.small_views``."""
    j = 16 * i
    v = d.small_views[i] = (
        d.boxes[r0:r1], d.scores[r0:r1], d.classes[r0:r1], d.box_digest_bytes[j:j + 16],
        d.image_digest_bytes[j:j + 16],
        MappingProxyType({k: a[r0:r1] for k, a in d.extras.items()}) if d.extras else NO_EXTRAS)
    return v


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
        self._data: ShardData | None = None

    def __getstate__(self):  # pickled into spawned workers: re-open there
        return {"path": self.path, "_index": self._index, "_data": None}

    def __repr__(self) -> str:
        return f"ShardReader({str(self.path)!r})"

    @property
    def data(self) -> ShardData:
        if self._data is None:
            if not self.path.exists():
                raise RegionSetError(f"shard {self.path} does not exist (listed in the manifest "
                                     "but missing on disk?); re-extract it")
            self._data = ShardData(self.path)
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
    #: The shard's optional per-region arrays, ``{name: (R, width)}`` (empty for none).
    extras = property(lambda self: self.data.extras)

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

    @staticmethod
    def _record(d: ShardData, i: int, r0: int, r1: int, features: np.ndarray) -> ImageRegions:
        v = d.small_views[i]
        if v is None:
            v = _small_views(d, i, r0, r1)
        return ImageRegions(d.image_ids[i], d.hw_list[i], v[0], v[1], v[2], features, v[3], v[4],
                            v[5])

    def read(self, i: int) -> ImageRegions:
        """Image ``i`` of this shard (one feature read)."""
        # _record inlined: a by-id read is a few microseconds, and each call layer is a tenth
        # of one (benchmarks/region_io.py compares it with a bare np.memmap copy)
        d = self._data
        if d is None:
            d = self.data
        n = d.num_images
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"image {i} outside 0:{n} of {self.path.name}")
        o = d.offsets_list
        r0, r1 = o[i], o[i + 1]
        v = d.small_views[i]
        if v is None:
            v = _small_views(d, i, r0, r1)
        return ImageRegions(d.image_ids[i], d.hw_list[i], v[0], v[1], v[2], d.rows.read(r0, r1),
                            v[3], v[4], v[5])

    def read_many(self, positions, out: np.ndarray | None = None, start: int = 0
                  ) -> list[ImageRegions]:
        """Images at ``positions`` (any order), their feature rows copied in one pass into one
        array; each image's features are a view of it (keep that in mind before holding one
        image's features for long: the view keeps the whole batch alive).

        Args:
            positions: image positions in this shard.
            out: copy into rows ``start:`` of this array instead of a new one.
        """
        d = self._data
        if d is None:
            d = self.data
        o, n = d.offsets_list, d.num_images
        spans, at = [], start
        for i in positions:
            if not 0 <= i < n:
                raise IndexError(f"image {i} outside 0:{n} of {self.path.name}")
            r0, r1 = o[i], o[i + 1]
            spans.append((r0, r1, at))
            at += r1 - r0
        if out is None:
            if start:
                raise ValueError("read_many: start needs out")
            out = np.empty((at, d.feature_dim), dtype=d.feature_dtype)
        d.rows.read_into(out, spans)
        rec = self._record
        return [rec(d, i, r0, r1, out[o0:o0 + r1 - r0])
                for i, (r0, r1, o0) in zip(positions, spans)]

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
        #: optional per-region arrays of the set: ``{name: [dtype, width]}``.
        self.extras = check_extras(m.get("extras"))
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

    def _build_lookup(self) -> dict[str, tuple[int, int]]:
        lookup = {}
        for s, shard in enumerate(self.shards):
            for i, key in enumerate(shard.image_ids):
                lookup[key] = (s, i)
        self._lookup = lookup
        return lookup

    def locate(self, image_id: str) -> tuple[int, int]:
        """(position in ``shards``, image position in that shard); KeyError if absent."""
        lookup = self._lookup if self._lookup is not None else self._build_lookup()
        try:
            return lookup[image_id]
        except KeyError:
            raise KeyError(f"image {image_id!r} is not in region set {self.path}") from None

    def get(self, image_id: str) -> ImageRegions:
        """One image's regions (its features a fresh array in the stored dtype)."""
        lookup = self._lookup if self._lookup is not None else self._build_lookup()
        try:
            s, i = lookup[image_id]
        except KeyError:
            raise KeyError(f"image {image_id!r} is not in region set {self.path}") from None
        return self.shards[s].read(i)

    def get_many(self, image_ids: Sequence[str]) -> list[ImageRegions]:
        """Several images by id, in the order given, with one pass of copies into one feature
        array: each image's features are a view of it (a batch read by a loader).

        Raises:
            KeyError: an id is not in the set.
        """
        lookup = self._lookup if self._lookup is not None else self._build_lookup()
        try:
            locs = [lookup[k] for k in image_ids]
        except KeyError as e:
            raise KeyError(f"image {e.args[0]!r} is not in region set {self.path}") from None
        by_shard: dict[int, list[int]] = {}
        for j, (s, _) in enumerate(locs):
            by_shard.setdefault(s, []).append(j)
        total = 0
        for s, js in by_shard.items():
            o = self.shards[s].data.offsets_list
            total += sum(o[locs[j][1] + 1] - o[locs[j][1]] for j in js)
        out = np.empty((total, self.feature_dim), dtype=self.feature_dtype)
        records: list = [None] * len(locs)
        at = 0
        for s, js in by_shard.items():
            got = self.shards[s].read_many([locs[j][1] for j in js], out=out, start=at)
            for j, r in zip(js, got):
                records[j] = r
                at += r.num_regions
        return records

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

