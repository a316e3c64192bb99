"""Every digest of the region-set format, and the one order their bytes are fed in.

docs/FORMAT.md ("Digests") is the specification; this module is its reference implementation.
All digests are blake2b with a 16-byte (128-bit) output:

- ``box_digest``: one image's boxes as C-ordered little-endian float32 (the alignment key:
  a teacher box row is the student's box row bit for bit when the digests agree);
- ``file_digest``: an image file's bytes (``image_digest``: a later phase can verify it reads
  the same image);
- the shard content digest (:class:`ShardDigest`, :func:`content_digest`,
  :func:`reader_content_digest`): every array of a shard, in :data:`ARRAY_NAMES` order, each
  as its ASCII name, a newline, then its bytes (ids as :func:`encode_ids`, every other array as
  C-ordered little-endian bytes of its stored dtype), then the shard's optional arrays the same
  way in sorted name order. Backend and chunking do not enter it, so
  an HDF5 and a zarr shard with equal arrays have equal digests;
- :func:`manifest_digest`: a manifest's canonical JSON (sorted keys, no whitespace);
  :func:`stable_manifest_digest`: the same without the keys that grow while a set's shards are
  being finished (the proposals *identity*, ``vlkd.common.alignment.proposals_identity``).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["DIGEST_SIZE", "ARRAY_NAMES", "bytes_digest", "box_digest", "file_digest",
           "encode_ids", "decode_ids", "ShardDigest", "content_digest",
           "reader_content_digest", "manifest_digest", "stable_manifest_digest",
           "DIGEST_BLOCK_BYTES"]

DIGEST_SIZE = 16
#: Arrays in a shard, in the order they enter the shard content digest.
ARRAY_NAMES = ("image_ids", "image_hw", "offsets", "boxes", "scores", "classes", "box_digest",
               "image_digest", "features")
#: Feature bytes read per step when a digest is recomputed from a shard.
DIGEST_BLOCK_BYTES = 32 << 20


def bytes_digest(data: bytes) -> bytes:
    """16-byte blake2b of ``data``."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


def box_digest(boxes: np.ndarray) -> bytes:
    """16-byte digest of one image's boxes.

    Args:
        boxes: (n, 4) box coordinates; hashed as C-ordered little-endian float32.

    Returns:
        ``blake2b(np.ascontiguousarray(boxes, '<f4').tobytes(), digest_size=16)``.
    """
    return bytes_digest(np.ascontiguousarray(np.asarray(boxes).reshape(-1, 4), "<f4").tobytes())


def file_digest(path: str | os.PathLike, block: int = 1 << 20) -> bytes:
    """16-byte blake2b of a file's bytes, read in blocks."""
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.digest()


def encode_ids(ids: Sequence[str]) -> bytes:
    """Image ids as they enter the content digest: per id, uint32 LE byte length + utf-8."""
    parts = []
    for image_id in ids:
        raw = image_id.encode("utf-8")
        parts.append(len(raw).to_bytes(4, "little"))
        parts.append(raw)
    return b"".join(parts)


def decode_ids(raw: bytes, n: int) -> list[str]:
    """The first ``n`` ids of an :func:`encode_ids` byte string."""
    ids, pos = [], 0
    for _ in range(n):
        length = int.from_bytes(raw[pos:pos + 4], "little")
        ids.append(raw[pos + 4:pos + 4 + length].decode("utf-8"))
        pos += 4 + length
    return ids


class ShardDigest:
    """The shard content digest (the manifest's per-shard ``digest``), fed array by array.

    Arrays must be fed in :data:`ARRAY_NAMES` order, then the shard's optional arrays
    (``extras``) in sorted name order (``begin`` refuses another); ``features`` may come in
    pieces. Prefer :func:`content_digest`, which feeds a whole shard.

    Args:
        extras: the names of the shard's optional arrays (none: the digest of a shard without
            them, as in schema version 1).
    """

    def __init__(self, extras: Sequence[str] = ()):
        self._h = hashlib.blake2b(digest_size=DIGEST_SIZE)
        self._order = ARRAY_NAMES + tuple(sorted(extras))
        self._next = 0

    def begin(self, name: str) -> None:
        expected = self._order[self._next] if self._next < len(self._order) else None
        if name != expected:
            raise RuntimeError(f"shard digest: expected array {expected!r}, got {name!r}")
        self._next += 1
        self._h.update(name.encode("ascii") + b"\n")

    def feed(self, data: bytes | np.ndarray) -> None:
        if isinstance(data, np.ndarray):
            data = np.ascontiguousarray(data, data.dtype.newbyteorder("<")).data
        self._h.update(data)

    def add(self, name: str, data: bytes | np.ndarray) -> None:
        self.begin(name)
        self.feed(data)

    def hexdigest(self) -> str:
        if self._next != len(self._order):
            raise RuntimeError("shard digest: not every array was fed")
        return self._h.hexdigest()


def content_digest(ids: Sequence[str] | bytes, arrays: Mapping[str, np.ndarray],
                   feature_blocks: Iterable[np.ndarray],
                   extras: Mapping[str, np.ndarray] | None = None) -> str:
    """The shard content digest of a shard's arrays.

    Args:
        ids: the image ids, or their :func:`encode_ids` bytes.
        arrays: every array of :data:`ARRAY_NAMES` between ``image_ids`` and ``features``
            (``image_hw``, ``offsets``, ``boxes``, ``scores``, ``classes``, ``box_digest``,
            ``image_digest``) in its stored dtype.
        feature_blocks: the feature rows in order, in any number of pieces (consumed once:
            a generator that also checks or writes each block works).
        extras: the shard's optional per-region arrays by name (fed after the features, in
            sorted name order).

    Returns:
        The hex digest.
    """
    extras = extras or {}
    d = ShardDigest(extras)
    d.add("image_ids", ids if isinstance(ids, (bytes, bytearray, memoryview)) else encode_ids(ids))
    for name in ARRAY_NAMES[1:-1]:
        d.add(name, np.ascontiguousarray(arrays[name]))
    d.begin("features")
    for block in feature_blocks:
        d.feed(block)
    for name in sorted(extras):
        d.add(name, np.ascontiguousarray(extras[name]))
    return d.hexdigest()


def reader_feature_blocks(reader, block_bytes: int = DIGEST_BLOCK_BYTES) -> Iterable[np.ndarray]:
    """A shard reader's feature rows in blocks of about ``block_bytes``."""
    rows = reader.num_regions
    step = max(1, block_bytes // max(1, reader.feature_dim * reader.feature_dtype.itemsize))
    for r0 in range(0, rows, step):
        yield reader.features_rows(r0, min(rows, r0 + step))


def reader_content_digest(reader, feature_blocks: Iterable[np.ndarray] | None = None) -> str:
    """Recompute a shard's content digest from a ``ShardReader`` (streams its features).

    Args:
        reader: a ``vlkd.common.regionset.ShardReader`` (opened or not).
        feature_blocks: the reader's feature blocks, when the caller inspects them on the way
            (default: :func:`reader_feature_blocks`).
    """
    arrays = {"image_hw": reader.image_hw, "offsets": reader.offsets, "boxes": reader.boxes,
              "scores": reader.scores, "classes": reader.classes,
              "box_digest": reader.box_digests, "image_digest": reader.image_digests}
    blocks = reader_feature_blocks(reader) if feature_blocks is None else feature_blocks
    return content_digest(reader.image_ids, arrays, blocks, getattr(reader, "extras", None))


def manifest_digest(manifest: Mapping) -> str:
    """Hex blake2b-128 of a manifest's canonical JSON (sorted keys, no whitespace).

    It identifies a set's content: the shard entries carry each shard's content digest, so two
    sets with the same manifest digest hold the same arrays.
    """
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return bytes_digest(canonical.encode("utf-8")).hex()


def stable_manifest_digest(manifest: Mapping, growing_keys: Sequence[str]) -> str:
    """:func:`manifest_digest` of the manifest without ``growing_keys``."""
    return manifest_digest({k: v for k, v in manifest.items() if k not in growing_keys})
