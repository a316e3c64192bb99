"""TSV files as rows: Oscar's ``.lineidx`` line index, streaming and random access, atomic writes.

The Oscar / VinVL / scene_graph_benchmark (SGB) tooling addresses a TSV file by *row*: row ``i``
starts at byte ``lineidx[i]``, and ``<name>.lineidx`` (``os.path.splitext(tsv)[0] +
'.lineidx'``, so ``train.feature.tsv`` -> ``train.feature.lineidx``) holds one decimal byte
offset per line (microsoft/Oscar ``oscar/utils/tsv_file.py``: ``TSVFile``,
``generate_lineidx_file``). A row is split on tabs and every field is stripped of surrounding
whitespace (``TSVFile.seek``), which is why CRLF line ends read the same as LF ones.

:class:`TsvRows` reads such a file: streaming in file order (one buffered ``readline`` per row,
no index needed), or by row / by key through the line index. The ``.lineidx`` is used when it
is present and agrees with the file (checked without reading the rows: offsets increasing,
each one just after a newline, the last row ending at the end of the file); when it is absent
or stale the index is built by scanning the file for newlines in 16 MiB blocks (the file is
never held in memory) and, on request, saved in Oscar's format.

:class:`TsvWriter` writes one TSV file row by row to a temporary name in the same folder and
renames it (and its ``.lineidx``, written alongside) into place on :meth:`TsvWriter.close`, so
a reader never sees half a file.
"""
from __future__ import annotations

import json
import mmap
import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from vlkd.common.manifest import fsync_dir

__all__ = ["Closing", "LINEIDX_SUFFIX", "RowFileWriter", "TsvIndexError", "TsvRows",
           "TsvWriter", "check_image_id",
           "lineidx_path", "read_lineidx", "scan_line_starts", "verify_line_starts",
           "write_lineidx"]

LINEIDX_SUFFIX = ".lineidx"
_SCAN_BLOCK = 1 << 24          # 16 MiB per read while scanning for newlines
_KEY_PEEK = 4096               # bytes read to find a row's key (its first field)


class TsvIndexError(ValueError):
    """A ``.lineidx`` that cannot be read, or a row number outside the file."""


def lineidx_path(tsv_path: str | os.PathLike) -> Path:
    """Oscar's name for a TSV file's line index: ``splitext(tsv)[0] + '.lineidx'``."""
    return Path(os.path.splitext(os.fspath(tsv_path))[0] + LINEIDX_SUFFIX)


def read_lineidx(path: str | os.PathLike) -> np.ndarray:
    """The offsets of a ``.lineidx`` file, ``(rows,)`` int64 (whitespace-separated decimal
    numbers; Oscar writes one per line, ``concat_tsv_files`` without the final newline)."""
    try:
        return np.array([int(v) for v in Path(path).read_bytes().split()], dtype=np.int64)
    except ValueError as e:
        raise TsvIndexError(f"{path}: not a .lineidx file (one byte offset per line): {e}") \
            from None


def scan_line_starts(path: str | os.PathLike) -> np.ndarray:
    """Byte offset of every line of ``path``, ``(rows,)`` int64, as Oscar's
    ``generate_lineidx_file`` writes them: one per line, the last line counted whether or not
    it ends with a newline. Reads the file in 16 MiB blocks."""
    size = os.path.getsize(path)
    if size == 0:
        return np.zeros(0, np.int64)
    parts = [np.zeros(1, np.int64)]
    base = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            block = f.read(_SCAN_BLOCK)
            if not block:
                break
            newlines = np.flatnonzero(np.frombuffer(block, np.uint8) == 10)
            parts.append(newlines.astype(np.int64) + (base + 1))
            base += len(block)
    starts = np.concatenate(parts)
    return starts[starts < size]


def verify_line_starts(path: str | os.PathLike, offsets: np.ndarray, *,
                       full: bool = False, sample: int | None = None) -> str | None:
    """Why ``offsets`` is not the line index of ``path`` (None when it agrees).

    Checks, without reading the rows: offsets start at 0 and increase, each is just after a
    newline (``sample``: only that many, evenly spread, which bounds the page reads on a huge
    file), and the last row ends at the end of the file (so no row was appended, removed or
    resized since the index was made). An index that merely leaves out whole rows passes these;
    ``full`` also counts the file's lines (one read of the file) to catch that, and
    :meth:`TsvRows.line` catches it when such a row is read.
    """
    size = os.path.getsize(path)
    n = len(offsets)
    if n == 0:
        return None if size == 0 else f"it lists no rows but the file has {size:,} bytes"
    if offsets[0] != 0:
        return f"row 0 starts at byte {int(offsets[0]):,}, not 0"
    steps = np.diff(offsets)
    if n > 1 and steps.min() <= 0:
        i = int(np.argmax(steps <= 0)) + 1
        return f"row {i} starts at byte {int(offsets[i]):,}, not after row {i - 1}"
    if offsets[-1] >= size:
        return f"row {n - 1} starts at byte {int(offsets[-1]):,}, past the end ({size:,} bytes)"
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        rows = np.arange(1, n)
        if sample is not None and len(rows) > sample:
            rows = np.unique(np.linspace(1, n - 1, sample).astype(np.int64))
        data = np.frombuffer(mm, np.uint8)
        try:
            bad = rows[data[offsets[rows] - 1] != 10]
        finally:
            del data
        if len(bad):
            i = int(bad[0])
            return f"row {i} (byte {int(offsets[i]):,}) does not start a line"
        end = mm.find(b"\n", int(offsets[-1]))
    if end not in (-1, size - 1):
        return f"the file has lines after its last indexed row {n - 1} (byte {end + 1:,})"
    if full:
        lines = len(scan_line_starts(path))
        if lines != n:
            return f"it lists {n} rows but the file has {lines} lines"
    return None


def write_lineidx(path: str | os.PathLike, offsets: Sequence[int]) -> None:
    """Write a ``.lineidx`` in Oscar's format (one decimal offset and a newline per row),
    atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write("".join(f"{int(o)}\n" for o in offsets).encode("ascii"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    fsync_dir(path.parent)


def check_image_id(image_id: str) -> bytes:
    """The UTF-8 bytes of an image id that reads back unchanged as a TSV key, or ValueError.

    Oscar's ``TSVFile.seek`` splits rows on tabs and strips every field, and a newline ends the
    row, so an id with a tab, a line break or surrounding whitespace would come back different.
    """
    if not isinstance(image_id, str) or not image_id:
        raise ValueError(f"image id {image_id!r}: a TSV key must be a non-empty string")
    for ch, name in (("\t", "a tab"), ("\n", "a newline"), ("\r", "a carriage return")):
        if ch in image_id:
            raise ValueError(
                f"image id {image_id!r} contains {name}: TSV rows are split on tabs and end at "
                "line breaks, so this row would not read back (Oscar's TSVFile.seek); rename "
                "the image in the region set before exporting")
    if image_id != image_id.strip():
        raise ValueError(
            f"image id {image_id!r} has surrounding whitespace, which Oscar's TSVFile.seek "
            "strips when it reads the key back; rename the image before exporting")
    return image_id.encode("utf-8")


def _unlink(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _key_text(raw: bytes) -> str:
    """A key field as Oscar reads it: decoded, surrounding whitespace stripped."""
    return raw.decode("utf-8").strip()


class TsvRows:
    """One TSV file as rows, streamed or read by row number / key.

    Args:
        path: the TSV file.
        use_lineidx: use ``<name>.lineidx`` when present and it agrees with the file (a stale
            one is ignored and the index rebuilt by scanning; :attr:`index_status` says which).
        save_lineidx: write the rebuilt index as ``<name>.lineidx`` (atomically) when there was
            none or it was stale.
        full_check_bytes: files up to this size have every offset checked and their lines
            counted against the ``.lineidx`` (one extra read; :func:`verify_line_starts`);
            larger ones get the checks that read no rows on a sample of 4,096 offsets, and a
            row found not to be one line when it is read rebuilds the index.

    Row numbers are the positions in the line index (``TSVFile.seek(i)``). The file is opened
    lazily and again after a fork, so one object can be shared with DataLoader workers.
    """

    def __init__(self, path: str | os.PathLike, *, use_lineidx: bool = True,
                 save_lineidx: bool = False, full_check_bytes: int = 1 << 30):
        self.path = Path(path)
        self.full_check_bytes = full_check_bytes
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such TSV file")
        self.lineidx = lineidx_path(self.path)
        self.use_lineidx = use_lineidx
        self.save_lineidx = save_lineidx
        self.index_status = "not loaded"
        self._offsets: np.ndarray | None = None
        self._size = 0
        self._keys: list[str | None] | None = None
        self._rows_by_key: dict[str, int] | None = None
        self.duplicate_keys: dict[str, list[int]] = {}
        self._fd: int | None = None
        self._pid: int | None = None

    # ------------------------------------------------------------------ the line index
    @property
    def offsets(self) -> np.ndarray:
        """Start byte of every row, ``(rows,)`` int64 (loaded or built on first use)."""
        if self._offsets is None:
            self._load_index()
        return self._offsets

    def _load_index(self, reason: str | None = None) -> None:
        self._size = os.path.getsize(self.path)
        if reason is None and self.use_lineidx and self.lineidx.is_file():
            try:
                offsets = read_lineidx(self.lineidx)
                small = self._size <= self.full_check_bytes
                reason = verify_line_starts(self.path, offsets, full=small,
                                            sample=None if small else 4096)
            except TsvIndexError as e:
                reason = str(e)
            if reason is None:
                self._offsets = offsets
                self.index_status = f"read {self.lineidx.name}"
                return
            status = f"stale {self.lineidx.name} ({reason}): rebuilt by scanning the file"
        elif reason is not None:
            status = f"stale line index ({reason}): rebuilt by scanning the file"
        else:
            status = f"no {self.lineidx.name}: built by scanning the file"
        self._offsets = scan_line_starts(self.path)
        self._keys = self._rows_by_key = None
        if self.save_lineidx:
            write_lineidx(self.lineidx, self._offsets)
            status += f", saved as {self.lineidx.name}"
        self.index_status = status

    def __len__(self) -> int:
        return len(self.offsets)

    # ------------------------------------------------------------------ random access
    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def _span(self, i: int) -> tuple[int, int]:
        offsets = self.offsets
        if not -len(offsets) <= i < len(offsets):
            raise TsvIndexError(f"{self.path.name}: no row {i} (the file has {len(offsets)})")
        i %= len(offsets)
        start = int(offsets[i])
        end = int(offsets[i + 1]) if i + 1 < len(offsets) else self._size
        return start, end

    def line(self, i: int) -> bytes:
        """Row ``i`` as raw bytes, line end included (one ``pread``)."""
        start, end = self._span(i)
        data = os.pread(self._file(), end - start, start)
        nl = data.find(b"\n")
        if len(data) != end - start or nl not in (len(data) - 1, -1) or \
                (nl == -1 and end != self._size):
            # The file changed, or the index skips rows: rebuild it once and read again.
            self._load_index(reason=f"row {i} at byte {start:,} is not one line")
            start, end = self._span(i)
            data = os.pread(self._file(), end - start, start)
        return data

    def line_of(self, key: str) -> tuple[int, bytes] | None:
        """``(row, line)`` of ``key`` (its first row), or None; re-resolved when reading the
        row showed the index to be stale."""
        for _ in range(2):
            row = self.find(key)
            if row is None:
                return None
            offsets = self._offsets
            data = self.line(row)
            if self._offsets is offsets:
                return row, data
        return row, data

    def key(self, i: int) -> str | None:
        """The key (first field) of row ``i``; None for a blank row or an undecodable key."""
        if self._keys is not None:
            return self._keys[i]
        start, end = self._span(i)
        data = os.pread(self._file(), min(end - start, _KEY_PEEK), start)
        tab = data.find(b"\t")
        if tab < 0 and end - start > _KEY_PEEK:
            data = self.line(i)
            tab = data.find(b"\t")
        try:
            return _key_text(data if tab < 0 else data[:tab]) or None
        except UnicodeDecodeError:
            return None

    def keys(self) -> list[str | None]:
        """Every row's key in row order (None for blank rows / undecodable keys)."""
        if self._keys is None:
            self._keys = [self.key(i) for i in range(len(self))]
        return self._keys

    def find(self, key: str) -> int | None:
        """The row of ``key`` (its first row when it appears more than once), or None."""
        if self._rows_by_key is None:
            rows: dict[str, int] = {}
            dups: dict[str, list[int]] = {}
            for i, k in enumerate(self.keys()):
                if k is None:
                    continue
                if k in rows:
                    dups.setdefault(k, [rows[k]]).append(i)
                else:
                    rows[k] = i
            self._rows_by_key, self.duplicate_keys = rows, dups
        return self._rows_by_key.get(key)

    # ------------------------------------------------------------------ streaming
    def iter_lines(self) -> Iterator[tuple[int, int, bytes]]:
        """``(row, offset, line)`` for every row in file order, read with buffered
        ``readline`` (no index needed; a loaded index is checked against what is read)."""
        offsets = self._offsets
        agrees = offsets is not None
        seen: list[int] = []
        pos = 0
        with open(self.path, "rb", buffering=1 << 20) as f:
            for row, line in enumerate(iter(f.readline, b"")):
                if agrees and (row >= len(offsets) or offsets[row] != pos):
                    agrees = False
                seen.append(pos)
                yield row, pos, line
                pos += len(line)
        if agrees and len(seen) == len(offsets):
            return
        # A whole pass is a scan: keep what it found as the line index.
        self._offsets = np.array(seen, dtype=np.int64)
        self._size = pos
        self._keys = self._rows_by_key = None
        self.index_status = ("indexed while streaming" if offsets is None else
                             "the line index disagreed with the rows: rebuilt while streaming")
        if self.save_lineidx and not self._lineidx_file_agrees():
            write_lineidx(self.lineidx, self._offsets)
            self.index_status += f", saved as {self.lineidx.name}"

    def _lineidx_file_agrees(self) -> bool:
        try:
            return np.array_equal(read_lineidx(self.lineidx), self._offsets)
        except (OSError, TsvIndexError):
            return False

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fd"] = None
        return state


class Closing:
    """``with`` support for writers: :meth:`close` on success, :meth:`abort` on an
    exception (so an interrupted export leaves the previous files, not half-written ones)."""

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class TsvWriter(Closing):
    """Writes one TSV file row by row, atomically, with its ``.lineidx``.

    Rows go to a temporary file in the destination folder; :meth:`close` flushes and fsyncs it
    and renames it (then the ``.lineidx``, then the optional maps) into place. Leaving a
    ``with`` block by an exception removes the temporary files instead, so the destination
    holds either the previous file or the complete new one. (Two files cannot be replaced at
    one instant: a crash between the renames leaves a new TSV with an old ``.lineidx``, which
    :class:`TsvRows` detects as stale.)

    Args:
        path: destination TSV file.
        lineidx: also write ``<name>.lineidx`` (byte offsets; Oscar's format).
        line_ending: ``b"\\n"`` (Oscar, SGB) or ``b"\\r\\n"`` (BUTD's ``csv.DictWriter``).
        offset_map: also write this JSON file mapping each key to its row's byte offset
            (Oscar ``run_vqa.py``: ``{name}_img_frcnn_feats_offset_map.json``).
        row_map: also write this JSON file mapping each key to its row number
            (Oscar ``run_retrieval.py`` / ``oscar_tsv.py``: ``imageid2idx.json``).
    """

    def __init__(self, path: str | os.PathLike, *, lineidx: bool = True,
                 line_ending: bytes = b"\n", offset_map: str | os.PathLike | None = None,
                 row_map: str | os.PathLike | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.line_ending = line_ending
        self.rows = 0
        self.offset = 0
        self._targets: list[Path] = [self.path]
        self._tmps: list[str] = []
        self._f = self._open_tmp(self.path)
        self._idx = None
        if lineidx:
            self._targets.append(lineidx_path(self.path))
            self._idx = self._open_tmp(self._targets[-1], buffering=1 << 16)
        self._maps = [(Path(p), kind) for p, kind in ((offset_map, "offset"), (row_map, "row"))
                      if p is not None]
        self._keys: list[tuple[str, int]] | None = [] if self._maps else None
        self._seen: set[str] = set()
        self.closed = False

    def _open_tmp(self, target: Path, buffering: int = 1 << 20):
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        self._tmps.append(tmp)
        return os.fdopen(fd, "wb", buffering=buffering)

    def write_row(self, image_id: str, fields: Sequence[bytes | Sequence[bytes]]) -> int:
        """Append ``image_id<TAB>field<TAB>...`` and a line end; returns the row number.

        ``image_id`` is checked (:func:`check_image_id`) and must not repeat. A field is bytes,
        or a sequence of byte strings written one after the other (so a large base64 payload
        is not copied into a joined string); fields must hold no tab or line break (callers
        encode them: base64, JSON, decimal numbers).
        """
        if self.closed:
            raise ValueError(f"{self.path.name}: writer is closed")
        key = check_image_id(image_id)
        if image_id in self._seen:
            raise ValueError(f"{self.path.name}: image id {image_id!r} written twice")
        self._seen.add(image_id)
        f = self._f
        start = self.offset
        f.write(key)
        n = len(key)
        for field in fields:
            f.write(b"\t")
            n += 1
            for part in ((field,) if isinstance(field, (bytes, bytearray, memoryview))
                         else field):
                f.write(part)
                n += len(part)
        f.write(self.line_ending)
        n += len(self.line_ending)
        if self._idx is not None:
            self._idx.write(b"%d\n" % start)
        if self._keys is not None:
            self._keys.append((image_id, start))
        self.offset = start + n
        self.rows += 1
        return self.rows - 1

    def close(self) -> None:
        """Make the files durable and rename them into place."""
        if self.closed:
            return
        for tmp, f in zip(self._tmps, (self._f, self._idx)):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        for path, kind in self._maps:
            value = ({k: off for k, off in self._keys} if kind == "offset"
                     else {k: i for i, (k, _) in enumerate(self._keys)})
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            self._tmps.append(tmp)
            self._targets.append(path)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(value, f)
                f.flush()
                os.fsync(f.fileno())
        for tmp, target in zip(self._tmps, self._targets):
            os.replace(tmp, target)
        for folder in {t.parent for t in self._targets}:
            fsync_dir(folder)
        self.closed = True

    def abort(self) -> None:
        """Drop what was written; the destination files are left as they were."""
        if self.closed:
            return
        for f in (self._f, self._idx):
            if f is not None:
                f.close()
        for tmp in self._tmps:
            _unlink(tmp)
        self.closed = True


class RowFileWriter(Closing):
    """Base of the writers of one TSV file: rows go through ``self._tsv``, a
    :class:`TsvWriter`."""
    _tsv: TsvWriter

    def close(self) -> None:
        self._tsv.close()

    def abort(self) -> None:
        self._tsv.abort()
