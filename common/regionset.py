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

The modules, along those concepts (every public name is importable from here):

- ``shard_format``: backends, dtypes, errors, shard names, ``ImageRegions``;
- ``digest``: every digest and the content digest's feed order;
- ``staging``: the ``.partial/`` staging files and the one-pass build of the final shard;
- ``shard_writer``: ``ShardWriter``;
- ``fast_rows``: memory-mapped row readers (HDF5 contiguous, zarr shard index) and the fallback;
- ``shard_reader``: ``ShardReader`` and ``RegionSet``.
"""
from __future__ import annotations

# The format lives in a few modules along its concepts; this module is their public face.
from .digest import (ARRAY_NAMES, DIGEST_SIZE, ShardDigest, box_digest, bytes_digest,  # noqa: F401
                     encode_ids, file_digest)
from .fast_rows import release_maps  # noqa: F401
from .shard_format import (BACKENDS, FEATURE_DTYPES, SHARD_FORMAT, ZARR_INNER_CHUNK_BYTES,  # noqa: F401
                           ZARR_INNER_CHUNKS_PER_SHARD, ImageRegions, RegionSetError,
                           ShardLockedError, shard_name)
from .shard_reader import RegionSet, ShardReader  # noqa: F401
from .shard_writer import ShardWriter  # noqa: F401

__all__ = ["ARRAY_NAMES", "BACKENDS", "DIGEST_SIZE", "FEATURE_DTYPES", "SHARD_FORMAT",
           "ImageRegions", "RegionSet", "RegionSetError", "ShardDigest", "ShardLockedError",
           "ZARR_INNER_CHUNK_BYTES", "ZARR_INNER_CHUNKS_PER_SHARD",
           "ShardReader", "ShardWriter", "box_digest", "bytes_digest", "encode_ids",
           "file_digest", "release_maps", "shard_name"]
