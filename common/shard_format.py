"""The region-set shard format's names and records: backends, dtypes, errors, shard names,
and :class:`ImageRegions`, one image's regions as stored (docs/FORMAT.md)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import numpy as np

__all__ = ["BACKENDS", "FEATURE_DTYPES", "SHARD_FORMAT", "ZARR_INNER_CHUNK_BYTES",
           "ZARR_INNER_CHUNKS_PER_SHARD", "RegionSetError", "ShardLockedError", "shard_name",
           "check_feature_dtype", "tool_version", "ImageRegions", "EXTRA_ARRAYS", "EXTRA_DTYPES",
           "check_extras", "NO_EXTRAS"]

BACKENDS = {"hdf5": ".h5", "zarr": ".zarr"}
FEATURE_DTYPES = ("float16", "float32")
SHARD_FORMAT = "vlkd-region-shard"

#: zarr layout of ``features``: inner chunks of about 1 MiB (a whole number of rows), 64 inner
#: chunks per shard file (~64 MiB). See docs/FORMAT.md, "Chunking", for the measurements.
ZARR_INNER_CHUNK_BYTES = 1 << 20
ZARR_INNER_CHUNKS_PER_SHARD = 64


#: Optional per-region arrays a set may carry besides the required ones (docs/FORMAT.md,
#: "Optional arrays"): the names vlkd writes, and what they hold. A set declares those it has
#: as ``extras: {name: [dtype, width]}`` in its manifest and shard attributes; each is an
#: ``(R, width)`` array, row r describing box r.
EXTRA_ARRAYS = {
    "attr_ids": "attribute ids of the box, best first (-1: no attribute in that slot)",
    "attr_scores": "the scores of attr_ids (0 where the id is -1)",
}
EXTRA_DTYPES = ("int32", "float32", "float16", "uint8")
_EXTRA_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
#: The (empty, read-only) extras of a record from a set without optional arrays.
NO_EXTRAS: Mapping[str, np.ndarray] = MappingProxyType({})


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


def check_extras(spec: Mapping | None) -> dict[str, list]:
    """Normalise an optional-arrays declaration to ``{name: [dtype name, width]}``, sorted.

    Raises:
        ValueError: a bad name (lower-case identifier, not a required array), dtype or width.
    """
    from .digest import ARRAY_NAMES

    out: dict[str, list] = {}
    for name, value in sorted((spec or {}).items()):
        try:
            dtype, width = value
            dt, width = np.dtype(dtype).name, int(width)
        except (TypeError, ValueError):
            raise ValueError(f"optional array {name!r}: expected (dtype, width), got "
                             f"{value!r}") from None
        if not _EXTRA_NAME.match(str(name)) or name in ARRAY_NAMES or name == "counts":
            raise ValueError(f"optional array name {name!r} must be a lower-case identifier of "
                             f"at most 32 characters and not one of {ARRAY_NAMES}")
        if dt not in EXTRA_DTYPES:
            raise ValueError(f"optional array {name!r}: dtype {dt} is not one of {EXTRA_DTYPES}")
        if width < 1:
            raise ValueError(f"optional array {name!r}: width must be >= 1, got {width}")
        out[str(name)] = [dt, width]
    return out


def check_feature_dtype(feature_dtype) -> np.dtype:
    dt = np.dtype(feature_dtype)
    if dt.name not in FEATURE_DTYPES:
        raise ValueError(f"feature_dtype must be float16 or float32, got {dt.name}")
    return dt


def tool_version() -> str:
    try:
        from vlkd import __version__
        return __version__
    except Exception:  # running from a source tree without the package installed
        return "unknown"


# --------------------------------------------------------------------------- the image record

@dataclass(slots=True)
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
        extras: the set's optional per-region arrays (e.g. ``attr_ids`` (n, k)), by name;
            empty for a set without them.

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
    extras: Mapping[str, np.ndarray] = field(default_factory=lambda: NO_EXTRAS)

    @property
    def num_regions(self) -> int:
        return int(self.boxes.shape[0])


