"""`vlkd-extract import-tsv`: Oscar/VinVL, BUTD/LXMERT and scene_graph_benchmark TSV features
into a region set.

The rows are read by ``vlkd.data.tsv`` (docs/TSV.md: layouts, float16 by byte count, the
geometry columns and their cross-check, label/hw pairing by key, per-row failures); this job
turns them into a region set on the shard-job scaffold (``vlkd.extract.job``), so an import is
sharded, committed per window, resumable after SIGKILL and stopped cleanly by SIGTERM/SIGINT
exactly as ``proposals`` is.

What an imported set is (docs/EXTRACT.md, "Importing TSV features"):

- **Role ``proposals``.** An imported set is a set of boxes with one feature row per box, like
  one made by a student detector: ``vlkd-train`` streams it with no extra step (its classes are
  the object tags), and ``teacher-features`` can pool a teacher over its boxes
  (``common/alignment.py`` aligns teacher sets to ``proposals`` sets only). The manifest's
  ``detector`` says where the features came from (``kind: "imported"``, the files and their
  fingerprints); ``preprocessing`` is null (unknown: the features were computed elsewhere).
- **Images.** Every non-blank row of the feature file is one image of the sorted image list:
  its key, or ``"<row N>"`` for a row whose key cannot be stored (unreadable, repeated, with a
  NUL). Such rows, and rows that cannot be decoded, are the shard's failures, so shard ``i``
  holds range ``i`` of the list exactly as extraction shards do.
- **Classes.** ``class_names`` is the ``--labelmap`` vocabulary (VinVL's label ids 1..K become
  classes 0..K-1, as ``convert-detector --from vinvl`` numbers them), or the sorted names of the
  label rows, plus one *fill* name ``""`` (unless the vocabulary has it): the class of every
  region without one (boxes from the geometry columns, BUTD rows, names outside the
  vocabulary). ``""`` tokenises to nothing, so such a region adds no object tag. Its score is
  ``0``. Attributes (``--attributes K``) become ``attr_ids`` / ``attr_scores`` (best first, -1 / 0
  in empty slots; names through the labelmap's ``attribute_to_idx``, ids 1..A -> 0..A-1).
- **Warnings.** What the reader found and did beyond the plain case (``TsvImage.notes``: a label
  row with another box count, an image size taken from elsewhere, ...) goes to the job log and,
  per shard, to ``SET/import-warnings/shard-XXXXX-of-YYYYY.jsonl`` (one ``{"image_id",
  "notes"}`` per image). Not into the manifest: it would change the set's proposals identity
  while shards finish.
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from vlkd import __version__
from vlkd.common.alignment import PROPOSALS_ROLE
from vlkd.common.manifest import ManifestError, fsync_dir, read_manifest
from vlkd.common.preemption import ignore_stop_signals
from vlkd.common.regionset import ImageRegions, shard_name
from vlkd.common.sharding import resolve_shard_indices, shard_ranges
from vlkd.data.tsv import ButdTsv, OscarTsv

from .import_inputs import (FILL_CLASS_NAME, FILL_SCORE, _NO_DIGEST, Converter, ImageList,
                            ImportTsvError, Vocabulary, feature_rows, fingerprint, open_reader,
                            probe_feature_dim, read_vocabulary, scan_names)
from .job import NEW_OUT, Failure, FailureLimit, Shard, ShardJob, image_regions, refuse, run_job
from .options import ImportTsvConfig
from .progress import Progress, format_shards

ROLE = PROPOSALS_ROLE
#: Per-shard warnings, beside the shards.
WARNINGS_DIR = "import-warnings"
#: How many images' warnings each shard also prints in the job log.
LOGGED_WARNINGS = 5


# ------------------------------------------------------------------------------ warnings

def warnings_path(out: Path, index: int, num_shards: int) -> Path:
    """Where shard ``index``'s warnings are kept (``.partial`` while it is written)."""
    return out / WARNINGS_DIR / (shard_name(index, num_shards, "hdf5")[:-3] + ".jsonl")


class ShardWarnings:
    """The warnings of one shard: appended (and fsynced) before each window commits, cut back
    to the committed images on resume, renamed into place when the shard is finished."""

    def __init__(self, path: Path):
        self.final, self.partial = path, path.with_name(path.name + ".partial")
        self.count = 0

    def resume(self, committed: set[str]) -> None:
        """Keep the entries of committed images (once each), drop the rest."""
        kept, seen = [], set()
        if self.partial.exists():
            for line in self.partial.read_text(encoding="utf-8").splitlines():
                try:
                    e = json.loads(line)
                except ValueError:
                    continue     # a line cut by a kill
                if e.get("image_id") in committed and e["image_id"] not in seen:
                    seen.add(e["image_id"])
                    kept.append(line + "\n")
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.partial, "".join(kept))
        self.count = len(kept)

    def append(self, entries: list[dict]) -> None:
        if not entries:
            return
        with open(self.partial, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
            f.flush()
            os.fsync(f.fileno())
        self.count += len(entries)

    def finish(self) -> None:
        if self.partial.exists():
            os.replace(self.partial, self.final)
            fsync_dir(self.final.parent)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- decoding rows

class RowDecoder:
    """Reads and converts rows of the feature file: in the job's process, or in worker
    processes forked from it (which inherit the reader and its line index).

    Args:
        reader: the ``vlkd.data.tsv`` reader.
        convert: the :class:`Converter`.
        problems: image id -> why its row cannot be stored (:attr:`ImageList.problems`).
        feature_dtype: the set's feature dtype (features are cast here, so workers do it).
    """

    def __init__(self, reader, convert: Converter, problems: dict[str, str],
                 feature_dtype: str):
        self.reader, self.convert, self.problems = reader, convert, problems
        self.dtype = np.dtype(feature_dtype).newbyteorder("<")

    def decode(self, image_id: str, row: int) -> tuple:
        """``("ok", fields of ImageRegions..., notes)`` or ``("failed", reason, notes)``:
        plain values, so they travel between processes. Features are packed in the set's
        dtype here (the row's view has the full row's stride); in the writer's thread the cast
        would hold the lock the decoding needs (measured: slower)."""
        problem = self.problems.get(image_id)
        if problem is not None:
            return ("failed", problem, [])
        res, notes = self.convert(self.reader.read(row))
        if isinstance(res, Failure):
            return ("failed", res.reason, notes)
        extras = dict(res.extras) or None
        return ("ok", res.image_hw, res.boxes, res.scores, res.classes,
                np.ascontiguousarray(res.features, dtype=self.dtype), extras, notes)


_WORKER: RowDecoder | None = None


def _init_worker(decoder: RowDecoder, parent: int) -> None:
    global _WORKER
    ignore_stop_signals()   # the job's process stops at a window boundary, then ends them
    _WORKER = decoder

    def watch() -> None:    # a SIGKILLed job leaves no decoding process behind
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)
    threading.Thread(target=watch, name="vlkd-parent-watch", daemon=True).start()


def _decode_chunk(rows: list[tuple[str, int]]) -> list[tuple]:
    return [_WORKER.decode(iid, row) for iid, row in rows]


def _result(image_id: str, decoded: tuple) -> tuple[ImageRegions | Failure, list[str]]:
    if decoded[0] == "failed":
        return Failure(image_id, decoded[1]), decoded[2]
    _, hw, boxes, scores, classes, features, extras, notes = decoded
    return image_regions(image_id, hw, boxes, scores, classes, features, _NO_DIGEST,
                         extras), notes


# -------------------------------------------------------------------------------------- job

@dataclass
class _Row:
    """An item of a shard: one image of the list, its feature-file row and, with workers,
    what they decoded."""

    image_id: str
    group: int
    row: int
    decoded: tuple | None = None


class _Shard(Shard):
    """A contiguous range of the sorted image list, read row by row through the line index
    (by worker processes a window or two ahead, with ``--num-workers``)."""

    job: "ImportTsvJob"

    def __init__(self, job: "ImportTsvJob", index: int, image_ids: list[str]):
        super().__init__(job, index, image_ids)
        self.warnings = ShardWarnings(warnings_path(job.out, index, job.num_shards))
        self._window: list = []
        self._notes: list[dict] = []
        self._logged = 0

    def begin(self, writer) -> None:
        self.warnings.resume(set(writer.committed_ids) | set(writer.failed_ids))

    def items(self, todo: list[int], groups: list[int]) -> Iterable[list[_Row]]:
        rows = self.job.images.rows
        windows: list[list[_Row]] = []
        for p, g in zip(todo, groups):
            if not windows or windows[-1][0].group != g:
                windows.append([])
            iid = self.image_ids[p]
            windows[-1].append(_Row(iid, g, rows[iid]))
        pool = self.job.pool
        if pool is None:
            yield from windows
            return
        pending: deque = deque()
        ahead = iter(windows)

        def submit() -> None:
            w = next(ahead, None)
            if w is not None:
                pairs = [(r.image_id, r.row) for r in w]
                step = max(1, -(-len(pairs) // (4 * self.job.options.num_workers)))
                chunks = [pairs[i:i + step] for i in range(0, len(pairs), step)]
                pending.append((w, [pool.submit(_decode_chunk, c) for c in chunks]))
        for _ in range(2):     # decode up to two windows ahead of the one being written
            submit()
        while pending:
            w, futures = pending.popleft()
            decoded = [d for f in futures for d in f.result()]
            submit()
            for r, d in zip(w, decoded):
                r.decoded = d
            yield w

    def add(self, item: _Row) -> None:
        job = self.job
        decoded = item.decoded if item.decoded is not None else job.decoder.decode(
            item.image_id, item.row)
        item.decoded = None
        res, notes = _result(item.image_id, decoded)
        self._window.append(res)
        if notes:
            self._notes.append({"image_id": item.image_id, "notes": notes})

    def end_window(self) -> list:
        out, notes = self._window, self._notes
        self._window, self._notes = [], []
        self.warnings.append(notes)   # before the window commits: a resume keeps them
        for e in notes[:max(0, LOGGED_WARNINGS - self._logged)]:
            self.job.progress.event("warning", f"warning: {e['image_id']}: "
                                    + "; ".join(e["notes"]), image_id=e["image_id"],
                                    shard=self.index, notes=e["notes"])
            self._logged += 1
        return out

    def check_finished(self, info: dict) -> None:
        self.warnings.finish()
        n = _count_lines(self.warnings.final)
        if n:
            self.job.warning_count += n
            self.job.progress.event(
                "warnings", f"shard {self.index}: {n} image(s) with warnings in "
                f"{self.warnings.final}", shard=self.index, images=n,
                file=str(self.warnings.final))


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


class ImportTsvJob(ShardJob):
    """``import-tsv`` on the scaffold: the header, the shards' rows, a row per image."""

    name, role = "import-tsv", ROLE
    mismatch_error = ImportTsvError

    def __init__(self, cfg: ImportTsvConfig, progress: Progress):
        self.options, self.progress = cfg, progress
        self.out = Path(cfg.out)
        self.num_shards, self.backend, self.window = cfg.num_shards, cfg.backend, cfg.window
        self.reader = open_reader(cfg)
        dim = probe_feature_dim(self.reader)
        if not dim:
            raise ImportTsvError(f"{cfg.features}: no row gives the feature width; pass "
                                 "--feature-dim")
        self.feature_dim = int(dim)
        self.tsv_dtype = np.dtype(self.reader.feature_dtype).name
        self.feature_dtype = cfg.feature_dtype
        self.files = {"features": fingerprint(cfg.features)}
        for key in ("labels", "hw", "labelmap", "attribute_names"):
            if getattr(cfg, key):
                self.files[key] = fingerprint(getattr(cfg, key))
        self.images = ImageList.of(feature_rows(self.reader))
        if not self.images.ids:
            raise ImportTsvError(f"{cfg.features} has no rows")
        self.vocab = self._vocabulary()
        self.extras = ({"attr_ids": ("int32", cfg.attributes),
                        "attr_scores": ("float32", cfg.attributes)} if cfg.attributes else None)
        atol = getattr(self.reader, "atol", 1e-4)
        self.decoder = RowDecoder(self.reader, Converter(self.vocab, cfg.attributes, atol),
                                  self.images.problems, self.feature_dtype)
        self.ranges = shard_ranges(len(self.images.ids), cfg.num_shards)
        self.warning_count = 0
        self.pool = None

    def start_workers(self) -> None:
        """Fork ``--num-workers`` decoding processes (before any thread of the job starts:
        they inherit the reader, its line index and the vocabulary)."""
        if self.options.num_workers and self.pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(
                self.options.num_workers, mp_context=multiprocessing.get_context("fork"),
                initializer=_init_worker, initargs=(self.decoder, os.getpid()))
            self.pool.submit(int).result()   # fork them all now, while no thread runs

    def stop_workers(self, finished: bool = True) -> None:
        """End the workers: after their last task, or (``finished`` False: stopped or
        failed) dropping the tasks they have not started; either way wait for them (a chunk
        of rows at most), which also keeps Python 3.11's exit hook of the executor from
        writing to its closed wake-up pipe."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=not finished)
            self.pool = None

    # ---------------------------------------------------------------- vocabulary
    def _vocabulary(self) -> Vocabulary:
        cfg = self.options
        classes = attrs = None
        if cfg.labelmap:
            classes, attrs = read_vocabulary(cfg.labelmap)
        if cfg.attribute_names:
            attrs = read_vocabulary(cfg.attribute_names)[0]
        need_attrs = bool(cfg.attributes) and attrs is None
        if classes is None or need_attrs:
            known = self._known_vocabulary()
            if known is not None:
                return known
        seen_c = seen_a = set()
        names_file = {"vinvl": self.reader.labels if isinstance(self.reader, OscarTsv) else None,
                      "sgb": feature_rows(self.reader), "butd": None}[cfg.format]
        if names_file is not None and (classes is None or need_attrs):
            seen_c, seen_a = scan_names(names_file, need_attrs)
        if classes is None:
            classes = sorted(seen_c - {FILL_CLASS_NAME})
        attributes = [] if not cfg.attributes else attrs if attrs is not None else sorted(seen_a)
        return Vocabulary.build(classes, bool(cfg.labelmap), attributes, attrs is not None)

    def _known_vocabulary(self) -> Vocabulary | None:
        """The vocabulary of an existing set made from the same files (names found by a scan
        need not be scanned again by every array job)."""
        try:
            m = read_manifest(self.out)
        except ManifestError:
            return None
        imp = m.get("import") or {}
        if m.get("role") != ROLE or _file_keys(imp.get("files")) != _file_keys(self.files) or \
                m.get("options") != self._content_options():
            return None
        v = imp.get("vocabulary") or {}
        return Vocabulary(list(m.get("class_names", [])), int(v.get("fill", -1)),
                          bool(v.get("given")), list(m.get("attribute_names", [])),
                          bool(v.get("attributes_given")))

    # ---------------------------------------------------------------- manifest
    def _content_options(self) -> dict:
        cfg, r = self.options, self.reader
        opts = {"format": cfg.format, "tsv_dtype": self.tsv_dtype,
                "attributes": cfg.attributes, "fill_class_name": FILL_CLASS_NAME,
                "fill_score": FILL_SCORE}
        if isinstance(r, OscarTsv):
            opts.update(tsv_layout=r.layout.layout, tsv_feature_dim=r.layout.dim,
                        geometry=r.layout.geometry)
        elif isinstance(r, ButdTsv):
            opts.update(tsv_fields=r.fields)
        return opts

    def header(self) -> dict:
        cfg, v = self.options, self.vocab
        h = {"schema_version": 1, "role": ROLE,
             "detector": {"name": f"tsv:{cfg.format}", "kind": "imported",
                          "source": self.files["features"]["path"]},
             "preprocessing": None,
             "feature_dim": self.feature_dim, "feature_dtype": self.feature_dtype,
             "backend": self.backend, "class_names": v.class_names,
             "num_shards": self.num_shards,
             "image_source": {"kind": "tsv", "path": self.files["features"]["path"],
                              "num_images": len(self.images.ids),
                              "ids_digest": self.images.ids_digest()},
             "tool_version": __version__,
             "options": self._content_options(),
             "import": {"files": self.files,
                        "vocabulary": {"fill": v.fill, "given": v.given,
                                       "attributes_given": v.attributes_given}}}
        if cfg.attributes:
            h["attribute_names"] = v.attribute_names
        return h

    def compare(self, existing: dict, header: dict) -> None:
        out, err = str(self.out), ImportTsvError
        if existing.get("role") != ROLE or (existing.get("detector") or {}).get("kind") != \
                "imported":
            raise refuse(err, out, "by another job (role, detector kind)", "imported proposals",
                         f"{existing.get('role')}, {(existing.get('detector') or {}).get('kind')}",
                         "import into a new --out directory")
        ef = (existing.get("import") or {}).get("files") or {}
        hf = header["import"]["files"]
        for key in [k for k in hf if k in ef] + sorted(set(hf) ^ set(ef)):
            flag = "--" + key.replace("_", "-")
            here, there = hf.get(key), ef.get(key)
            if here is None or there is None:
                raise refuse(err, out, f"{'without' if here else 'with'} {flag}",
                             here and here["path"], there and there["path"],
                             NEW_OUT + "pass the files the set was made from")
            if _file_keys({key: there}) != _file_keys({key: here}):
                raise refuse(err, out, f"from another {flag} file (size and fingerprint of "
                             "its first and last MiB)",
                             f"{here['bytes']} bytes {here['fingerprint']}",
                             f"{there.get('bytes')} bytes {there.get('fingerprint')}",
                             NEW_OUT + "point the options at the files the set was made from")
        ei, hi = existing.get("image_source") or {}, header["image_source"]
        if ei.get("ids_digest") != hi["ids_digest"]:
            raise refuse(err, out, "with another image list (ids digest)", hi["ids_digest"],
                         ei.get("ids_digest"), NEW_OUT + "use the files it was made from")
        eo, ho = existing.get("options") or {}, header["options"]
        for key in ho:
            if eo.get(key) != ho[key]:
                raise refuse(err, out, f"with another {key}", ho[key], eo.get(key),
                             NEW_OUT + "re-run with the set's options")
        for key, what in (("num_shards", "another --num-shards"), ("backend", "another --backend"),
                          ("feature_dtype", "another --feature-dtype"),
                          ("feature_dim", "another feature dim"),
                          ("class_names", "other class names (--labelmap)"),
                          ("attribute_names", "other attribute names (--labelmap, "
                                              "--attribute-names, --attributes)")):
            if existing.get(key) != header.get(key):
                raise refuse(err, out, f"with {what}", header.get(key), existing.get(key),
                             NEW_OUT + "re-run with the set's options")

    def start_event(self, indices: list[int]) -> tuple[str, dict]:
        cfg, v = self.options, self.vocab
        rows = feature_rows(self.reader)
        where = "--labelmap" if v.given else "the label rows"
        classes = (f"{len(v.class_names) - 1} classes from {where}" if len(v.class_names) > 1
                   else "no classes")
        return (f"import-tsv: {len(self.images.ids)} images from {cfg.features} ({cfg.format}, "
                f"{self.tsv_dtype}, D={self.feature_dim}; {rows.index_status}), {classes}, "
                f"{cfg.num_shards} shard(s), running {format_shards(indices)}",
                dict(images=len(self.images.ids), num_shards=cfg.num_shards, shards=indices,
                     format=cfg.format, feature_dim=self.feature_dim, out=str(self.out),
                     line_index=rows.index_status))

    def shard(self, index: int) -> _Shard:
        a, b = self.ranges[index]
        return _Shard(self, index, self.images.ids[a:b])


def _file_keys(files: dict | None) -> dict | None:
    """What is compared of the recorded input files: sizes and fingerprints, not paths."""
    if files is None:
        return None
    return {k: (f.get("bytes"), f.get("fingerprint")) for k, f in files.items()}


# ------------------------------------------------------------------------------------- run

@dataclass
class ImportResult:
    """What a run did: the shard entries it finished, failures against the limit, warnings."""

    shards: list[dict]
    num_images: int
    num_failures: int
    limit: FailureLimit
    num_warnings: int = 0

    @property
    def failures_exceeded(self) -> bool:
        return self.limit.exceeded(self.num_failures, self.num_images)


def run_import_tsv(cfg: ImportTsvConfig, progress: Progress | None = None) -> ImportResult:
    """Run ``import-tsv`` for the selected shards.

    Returns:
        The finished shards and counts; the caller decides the exit code from
        ``failures_exceeded``.

    Raises:
        ImportTsvError: the files cannot be imported, or ``--out`` holds a set made otherwise.
    """
    progress = progress or Progress(cfg.log_format, enabled=cfg.progress)
    limit = FailureLimit.parse(cfg.max_failures)
    indices = resolve_shard_indices(cfg.shard_index, cfg.num_shards)
    job = ImportTsvJob(cfg, progress)
    job.start_workers()
    try:
        runs = run_job(job, indices, progress)
    except BaseException:
        job.stop_workers(finished=False)
        raise
    job.stop_workers()
    infos = [r.info for r in runs]
    total = sum(job.ranges[i][1] - job.ranges[i][0] for i in indices)
    failed = sum(len(info["failures"]) for info in infos)
    result = ImportResult(infos, total, failed, limit, job.warning_count)
    progress.event("summary", f"import-tsv: {total} images in {len(indices)} shard(s), "
                   f"{failed} failed (limit {limit.allowed(total):.4g}), {job.warning_count} "
                   "with warnings" + (": TOO MANY FAILURES" if result.failures_exceeded else ""),
                   images=total, failed=failed, allowed=limit.allowed(total),
                   warnings=job.warning_count, exceeded=result.failures_exceeded)
    return result


__all__ = ["ImportTsvConfig", "ImportTsvError", "ImportTsvJob", "ImportResult", "ImageList",
           "Converter", "Vocabulary", "FILL_CLASS_NAME", "FILL_SCORE", "WARNINGS_DIR", "ROLE",
           "fingerprint", "open_reader", "read_vocabulary", "run_import_tsv", "scan_names",
           "warnings_path"]
