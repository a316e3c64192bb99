"""The scaffold every phase-one job runs on: one region set, written shard by shard, resumable.

A job (``proposals``, ``teacher-features``, and next ``import-tsv``) supplies what is particular
to it; :func:`run_job` does the rest, the same way for every job.

The job supplies (:class:`ShardJob`, :class:`Shard`):

- ``header()``, its manifest header, and ``compare()`` / ``refresh()`` against an existing
  set's;
- ``shard(i)``: the shard's image ids in order and the attributes stored with it;
- ``Shard.items(todo, groups)``: the items of the positions still to do, delivered one
  window's at a time (decoded images, or rows of a feature file);
- ``Shard.add(item)`` / ``Shard.end_window()``: how a window of items becomes results
  (:class:`ImageRegions` or :class:`Failure`, one per item);
- its own checks: ``check_complete``, ``begin`` (resumable? failures known in advance),
  ``check_finished``.

The scaffold (:func:`run_job`, :func:`run_shard`):

- writes the header, and ``config.yaml`` with the job's options, when it creates the set, or
  compares, under the manifest lock (:func:`prepare_set`);
- opens the :class:`ShardWriter`, re-records a complete shard, resumes a partial one after its
  last commit;
- cuts the items into windows of ``window`` images (the unit of batching, commit and resume),
  times the job's work, counts images and failures;
- hands each window's results to a background writer thread that appends and commits them;
- finalises the shard and reports progress (``start``, ``resume``, ``shard_done``).

Images are assigned to windows by their position in the shard's list (``position // window``),
and a window is committed as a whole, so a job killed at any point and re-run with the same
arguments forms the same windows, hence the same batches, and produces the same shard as an
uninterrupted run. Jobs over images share :class:`ImageJob` / :class:`ImageShard`: their items are
images decoded in DataLoader workers (``vlkd.extract.decoding``) with the detector's
preprocessing, batched by padded size (``vlkd.extract.batching``).

Also here: the refusal to mix runs in one set (:func:`check_set_header`, :func:`refuse`), the
``--max-failures`` rule (:class:`FailureLimit`) and the writer thread
(:class:`BackgroundWriter`).
"""
from __future__ import annotations

import abc
import datetime as _dt
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from vlkd import __version__

from vlkd.common.alignment import GROWING_KEYS
from vlkd.common.config import save as save_config
from vlkd.common.config import to_dict
from vlkd.common.digest import box_digest
from vlkd.common.manifest import update_manifest
from vlkd.common.preemption import StopSignals
from vlkd.common.regionset import ImageRegions, ShardWriter
from vlkd.data.images import ImageRecord

from .batching import WindowBatcher
from .decoding import DecodeDataset, DecodedItem, decode_batches
from .options import PER_JOB_KEYS, SET_CONFIG_FILE, JobOptions
from .progress import Progress


# ----------------------------------------------------------------------------------- results

def image_regions(image_id: str, image_hw: tuple[int, int], boxes: np.ndarray,
                  scores: np.ndarray, classes: np.ndarray, features: np.ndarray,
                  image_digest: bytes, extras: dict | None = None) -> ImageRegions:
    """One image's regions as a shard stores them (the format's :class:`ImageRegions`).

    Args:
        image_id, image_hw: the image's id and original (height, width).
        boxes: (n, 4) float32, x1 y1 x2 y2 in original pixels.
        scores: (n,) float32; classes: (n,) int32.
        features: (n, D) in the stored dtype, row j describes box j.
        image_digest: 16-byte digest of the image file's bytes.
        extras: the set's optional per-region arrays, ``{name: (n, width)}``.
    """
    return ImageRegions(image_id, tuple(image_hw), boxes, scores, classes, features,
                        box_digest(boxes), image_digest,
                        **({"extras": extras} if extras else {}))


@dataclass
class Failure:
    """An image the shard lists as failed instead of storing it (``kind: detail``)."""

    image_id: str
    reason: str


def with_failures(items: Sequence[DecodedItem], results: Iterable[ImageRegions]
                  ) -> list[ImageRegions | Failure]:
    """A window's results in item order: ``results`` for the usable items (in order), a
    :class:`Failure` for each item that could not be decoded."""
    it = iter(results)
    return [Failure(i.image_id, i.error) if i.error is not None else next(it) for i in items]


def _write_window(writer: ShardWriter, results: list[ImageRegions | Failure]) -> None:
    for res in results:
        if isinstance(res, Failure):
            writer.add_failure(res.image_id, res.reason)
        else:
            writer.append(res.image_id, res.image_hw, res.boxes, res.scores, res.classes,
                          res.features, image_digest=res.image_digest,
                          extras=dict(res.extras) or None)
    writer.commit()  # windows are the unit of resume: commit exactly at their ends


# ------------------------------------------------------------------------------- failures

@dataclass(frozen=True)
class FailureLimit:
    """``--max-failures``: a count (``5``) or a fraction (``0.01``, ``1%``) of the images."""

    count: int | None = None
    fraction: float | None = None

    @classmethod
    def parse(cls, text: str | int | float) -> "FailureLimit":
        s = str(text).strip()
        try:
            if s.endswith("%"):
                frac = float(s[:-1]) / 100.0
            elif any(c in s for c in ".eE"):
                frac = float(s)
            else:
                n = int(s)
                if n < 0:
                    raise ValueError
                return cls(count=n)
        except ValueError:
            raise ValueError(f"--max-failures {text!r}: expected a count (5), a fraction "
                             "(0.01) or a percentage (1%)") from None
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"--max-failures {text!r}: a fraction must be within 0..1 "
                             "(0%..100%)")
        return cls(fraction=frac)

    def allowed(self, total: int) -> float:
        """How many failures out of ``total`` images are tolerated."""
        return float(self.count) if self.count is not None else self.fraction * total

    def exceeded(self, failures: int, total: int) -> bool:
        return failures > self.allowed(total)

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else f"{self.fraction:.4g}"


# --------------------------------------------------------------------------------- writer

class BackgroundWriter:
    """Runs submitted callables in order on one background thread.

    The callables own all access to the writer object they close over, so that object is
    only ever used from one thread at a time. An exception in the thread is re-raised in the
    caller at the next :meth:`submit` or at :meth:`close`.

    Args:
        max_pending: callables queued before :meth:`submit` blocks (bounds memory when the
            disk is slower than the device).
    """

    _STOP = object()

    def __init__(self, max_pending: int = 4):
        self._q: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="vlkd-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            fn = self._q.get()
            if fn is self._STOP:
                return
            if self._error is None:
                try:
                    fn()
                except BaseException as e:  # noqa: BLE001 - handed to the main thread
                    self._error = e

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def submit(self, fn: Callable[[], None]) -> None:
        self._raise()
        self._q.put(fn)

    def close(self) -> None:
        """Wait for everything submitted, stop the thread, re-raise its error if any."""
        if self._thread.is_alive():
            self._q.put(self._STOP)
            self._thread.join()
        self._raise()

    def abandon(self) -> None:
        """Write what is queued, then stop without raising (used while another error unwinds:
        the windows submitted before it are committed, and a re-run resumes after them)."""
        if self._thread.is_alive():
            self._q.put(self._STOP)
            self._thread.join()


# ------------------------------------------------------------------ refusing to mix runs

def short(v) -> str:
    """A digest or value shortened for an error message."""
    s = str(v)
    return s[:12] + "…" if len(s) > 14 else s


def refuse(error: type[Exception], out: str | Path, what: str, here, there, fix: str
           ) -> Exception:
    """The exception for "``--out`` holds a set made ``what``": names both values and the fix."""
    return error(f"--out {out} holds a region set made {what} ({short(there)} in its "
                 f"manifest.json, {short(here)} now); {fix}")


NEW_OUT = "write to a new --out directory, or "


def check_set_header(existing: dict, header: dict, out: str, *, error: type[Exception],
                     role: str, detector: str) -> None:
    """Refuse (raise ``error``) to add shards to a set whose manifest was written by another
    kind of job, another detector (config or weights digest), other preprocessing or another
    layout. Job-specific checks (image list, options, the proposals a teacher set is aligned
    to) stay with the job.

    Args:
        existing: the set's manifest.json; header: this run's manifest header.
        out: the --out directory (named in the message).
        error: the exception class to raise.
        role: this job's role; detector: "detector" or "teacher" (for the message).
    """
    if existing.get("role") != role:
        raise refuse(error, out, "by another job (role)", role, existing.get("role"),
                     f"write {role} to a new --out directory")
    ed, hd = existing.get("detector", {}), header["detector"]
    if ed.get("config_digest") != hd["config_digest"]:
        raise refuse(error, out, f"with another {detector} config (config digest)",
                     hd["config_digest"], ed.get("config_digest"),
                     NEW_OUT + f"re-run with the {detector} config it was made with")
    if ed.get("weights_digest") != hd["weights_digest"]:
        raise refuse(error, out, f"with other {detector} weights (weights digest)",
                     hd["weights_digest"], ed.get("weights_digest"),
                     NEW_OUT + f"re-run with the {detector} weights it was made with")
    for key, what in (("preprocessing", "other preprocessing"),
                      ("num_shards", "another --num-shards"),
                      ("backend", "another --backend"),
                      ("feature_dtype", "another --feature-dtype"),
                      ("feature_dim", "another feature dim"),
                      ("class_names", "other class names")):
        if key in existing and existing[key] != header[key]:
            raise refuse(error, out, "with " + what, header[key], existing[key],
                         NEW_OUT + "re-run with the set's options")


def check_options(existing: dict, header: dict, out: str, *, error: type[Exception],
                  keys: Iterable[str] | None = None) -> None:
    """Refuse when the manifest's ``options`` (those that change the content: box selection,
    precision, ...) differ from this run's; ``keys`` limits the comparison (default: all of
    this run's)."""
    eo, ho = existing.get("options", {}), header["options"]
    for key in (ho if keys is None else keys):
        if eo.get(key) != ho[key]:
            raise refuse(error, out, f"with another --{key.replace('_', '-')}", ho[key],
                         eo.get(key), NEW_OUT + "re-run with the set's options")


# ---------------------------------------------------------------------------- the contract

class Shard(abc.ABC):
    """One shard of a job, as :func:`run_shard` runs it.

    Args:
        job: the job.
        index: the shard index.
        image_ids: the images the shard holds when complete, in order (the failed ones
            included, if the job fails them in its windows).
        attrs: attributes stored with the shard (default: its role).
    """

    def __init__(self, job: "ShardJob", index: int, image_ids: Sequence[str],
                 attrs: dict | None = None):
        self.job, self.index = job, index
        self.image_ids = list(image_ids)
        self.attrs = attrs if attrs is not None else {"role": job.role}

    def check_complete(self, writer: ShardWriter) -> None:
        """The shard is already complete and about to be re-recorded: refuse (raise) if it was
        made from other input."""

    def begin(self, writer: ShardWriter) -> None:
        """Before the first window: check that a partial shard may be resumed, record
        failures known in advance (``writer.add_failure``)."""

    @abc.abstractmethod
    def items(self, todo: list[int], groups: list[int]) -> Iterable[list[Any]]:
        """The items of shard positions ``todo`` (in order), delivered in lists that never
        mix windows; each item has ``image_id`` and ``group`` (``groups[i]`` for ``todo[i]``:
        its window)."""

    @abc.abstractmethod
    def add(self, item: Any) -> None:
        """Take one item of the current window (may compute a batch)."""

    @abc.abstractmethod
    def end_window(self) -> list[ImageRegions | Failure]:
        """The current window's results, one per item in order; raise to stop the shard here
        (the windows before are committed, a re-run resumes at this one)."""

    def check_finished(self, info: dict) -> None:
        """The finalised shard (``info``: its manifest entry) holds what it should."""


class ShardJob(abc.ABC):
    """One job writing one region set (the scaffold's contract; see the module docstring).

    Attributes (set by the job):
        name: the command, at the start of messages (``proposals``).
        role: the manifest's role.
        mismatch_error: raised when ``--out`` holds a set made otherwise.
        options: the resolved options (saved as ``config.yaml`` when the set is created).
        out: the set directory.
        num_shards, backend, feature_dim, feature_dtype: the shards' layout.
        window: images per batching and commit window.
        shard_label: how progress calls a shard (``shard``, ``teacher shard``).
        extras: the set's optional per-region arrays, ``{name: (dtype, width)}`` (None: none;
            ``ShardWriter(extras=...)``, docs/FORMAT.md "Optional arrays").
        failure_word, failure_field: how ``shard_done`` calls the shard's failures.
    """

    name: str
    role: str
    mismatch_error: type[Exception] = RuntimeError
    options: Any
    out: Path
    num_shards: int
    backend: str
    feature_dim: int
    feature_dtype: str
    window: int
    extras: dict | None = None
    shard_label = "shard"
    failure_word, failure_field = "failed", "num_failed"

    @abc.abstractmethod
    def header(self) -> dict:
        """The manifest header: every key but ``shards``, ``failures`` and ``created``."""

    def compare(self, existing: dict, header: dict) -> None:
        """Refuse (raise :attr:`mismatch_error`) to add to a set made otherwise."""
        check_set_header(existing, header, str(self.out), error=self.mismatch_error,
                         role=self.role, detector="detector")

    def refresh(self, manifest: dict, header: dict) -> dict:
        """The existing manifest after :meth:`compare` passed (a job may update a record)."""
        return manifest

    def set_config(self) -> dict | None:
        """What ``config.yaml`` beside a new set records: the resolved options without the
        per-job keys (None: no file)."""
        if self.options is None:
            return None
        return {k: v for k, v in to_dict(self.options).items() if k not in PER_JOB_KEYS}

    @abc.abstractmethod
    def start_event(self, indices: list[int]) -> tuple[str, dict]:
        """The ``start`` event's message and fields."""

    @abc.abstractmethod
    def shard(self, index: int) -> Shard:
        """Shard ``index`` of this run."""


# ---------------------------------------------------------------------------- the scaffold

def prepare_set(job: ShardJob) -> dict:
    """Write the job's header into ``out/manifest.json`` (and its options into
    ``out/config.yaml``), or check it against an existing set's.

    Concurrent array jobs serialise on the manifest lock: the first writes the header and the
    config file (atomically, once: every shard of the set is made with the same options), the
    others find the header and compare.
    """
    header = job.header()

    def fn(m: dict) -> dict:
        if m.get("role") is None and "detector" not in m:
            created = m.get("created") or _dt.datetime.now(_dt.timezone.utc).isoformat(
                timespec="seconds")
            config = job.set_config()
            if config is not None:
                save_config(config, job.out, SET_CONFIG_FILE)
            return {**header, **{k: v for k, v in m.items() if k in GROWING_KEYS},
                    "created": created}
        job.compare(m, header)
        return job.refresh(m, header)
    return update_manifest(job.out, fn)


@dataclass
class ShardRun:
    """What running one shard did: its manifest entry and the seconds spent in the job's own
    work (``Shard.add`` / ``end_window``: the network), the rest being the pipeline's."""

    info: dict
    compute_s: float = 0.0


def _info_fields(job: ShardJob, info: dict) -> dict:
    return {"name": info["name"], "num_images": info["num_images"],
            "num_regions": info["num_regions"], job.failure_field: len(info["failures"])}


def run_shard(job: ShardJob, index: int, progress: Progress,
              stop: StopSignals | None = None) -> ShardRun:
    """Write (or resume, or re-record) shard ``index`` of ``job``'s set.

    With ``stop``, a SIGTERM / SIGINT ends the shard at the next window boundary: the windows
    done so far are committed (the partial shard resumes from them) and :class:`Stopped` is
    raised. The time from the signal to the exit is at most one window's work and commit.
    """
    shard = job.shard(index)
    W = job.window
    with ShardWriter(job.out, index, job.num_shards, backend=job.backend,
                     feature_dim=job.feature_dim, feature_dtype=job.feature_dtype,
                     commit_every=W + 1, attrs=shard.attrs, extras=job.extras) as writer:
        if writer.complete:
            shard.check_complete(writer)
            info = writer.finalize()  # already built: make sure the manifest lists it
            shard.check_finished(info)
            progress.event("shard_done", f"shard {index}: already complete "
                           f"({info['num_images']} images)", shard=index, resumed=True,
                           **_info_fields(job, info))
            return ShardRun(info)
        shard.begin(writer)
        done = set(writer.committed_ids) | set(writer.failed_ids)
        todo = [p for p, iid in enumerate(shard.image_ids) if iid not in done]
        n_done = len(shard.image_ids) - len(todo)
        if n_done:
            progress.event("resume", f"shard {index}: resuming, {n_done} of "
                           f"{len(shard.image_ids)} images already committed", shard=index,
                           committed=n_done)
        progress.start(len(shard.image_ids), f"{job.shard_label} {index}/{job.num_shards}",
                       initial=n_done, shard=index)
        bg = BackgroundWriter(max_pending=2)
        compute = 0.0
        try:
            def end_window() -> None:
                nonlocal compute
                t0 = time.perf_counter()
                results = shard.end_window()
                compute += time.perf_counter() - t0
                bg.submit(lambda: _write_window(writer, results))
                progress.update(len(results), failed=sum(isinstance(r, Failure)
                                                         for r in results))
            def stop_here() -> None:
                if stop is not None and stop.requested is not None:
                    bg.close()  # the windows handed to the writer thread are committed
                    progress.event("stopped", f"shard {index}: stopping at a window boundary "
                                   f"({writer.num_committed} images committed)", shard=index,
                                   committed=writer.num_committed)
                    stop.check(f"at a window boundary of shard {index}")
            group = None
            for batch in shard.items(todo, [p // W for p in todo]):
                if group is not None and batch[0].group != group:
                    end_window()
                    stop_here()
                group = batch[0].group
                t0 = time.perf_counter()
                for item in batch:
                    shard.add(item)
                compute += time.perf_counter() - t0
            if group is not None:
                end_window()
                stop_here()  # before finalize: a large shard's build is not bounded by a window
            bg.close()
        except BaseException:
            bg.abandon()
            raise
        finally:
            stats = progress.finish()
        info = writer.finalize()
    shard.check_finished(info)
    progress.event("shard_done", f"shard {index}: {info['num_images']} images, "
                   f"{info['num_regions']} regions, {len(info['failures'])} {job.failure_word} "
                   f"({stats['images_per_s']:.2f} img/s)", shard=index,
                   **_info_fields(job, info), images_per_s=stats["images_per_s"],
                   compute_s=round(compute, 3))
    return ShardRun(info, compute)


def run_job(job: ShardJob, indices: list[int], progress: Progress) -> list[ShardRun]:
    """Prepare the set, then run the selected shards in turn (the job reports the summary).

    SIGTERM and SIGINT stop the job at the next window boundary (:func:`run_shard`) or between
    shards, with everything committed, by raising :class:`vlkd.common.preemption.Stopped`.
    """
    prepare_set(job)
    message, fields = job.start_event(indices)
    progress.event("start", message, **fields)
    runs = []
    with StopSignals() as stop:
        for i in indices:
            runs.append(run_shard(job, i, progress, stop))
            stop.check(f"after shard {i}")
    return runs


# ----------------------------------------------------------------------- jobs over images

class ImageJob(ShardJob):
    """A job whose items are images run through a detector, batched by padded size.

    Args:
        det: the loaded detector (``vlkd.extract.detector.Detector``).
        options: the job's options.
    """

    def __init__(self, det, options: JobOptions):
        self.det, self.options = det, options
        self.out = Path(options.out)
        self.feature_dim = det.feature_dim
        self.feature_dtype = options.feature_dtype
        self.window = options.window_size()

    def header_base(self, image_source: dict) -> dict:
        """The header keys every detector job writes, in manifest order."""
        det = self.det
        return {"schema_version": 1, "role": self.role, "detector": det.manifest_info(),
                "preprocessing": det.preprocessing.manifest_info(),
                "feature_dim": det.feature_dim, "feature_dtype": self.feature_dtype,
                "backend": self.backend, "class_names": det.class_names,
                "num_shards": self.num_shards, "image_source": image_source,
                "tool_version": __version__}

    def start_fields(self, indices: list[int]) -> dict:
        """The ``start`` event's fields every detector job reports."""
        det = self.det
        return dict(num_shards=self.num_shards, shards=indices, detector=det.name,
                    kind=det.kind, feature_dim=det.feature_dim, device=self.options.device,
                    out=str(self.out))

    @abc.abstractmethod
    def run_batch(self, items: list[DecodedItem], payloads: list[Any]) -> list[ImageRegions]:
        """Images of one padded size (with what each was added with) -> their regions."""

    def batcher(self) -> WindowBatcher[ImageRegions]:
        return WindowBatcher(self.run_batch, self.det.padded_hw, self.options.batch_size)


class ImageShard(Shard):
    """A shard of an :class:`ImageJob`: its items are the images of ``records`` at the
    positions to do, decoded in DataLoader workers with the detector's preprocessing.

    Subclasses use :attr:`batcher` in ``add``/``end_window``; :meth:`position` maps an item
    back to its position in the shard.
    """

    job: ImageJob

    def __init__(self, job: ImageJob, index: int, records: Sequence[ImageRecord],
                 attrs: dict | None = None):
        super().__init__(job, index, [r.image_id for r in records], attrs)
        self.records = list(records)
        self.batcher = job.batcher()
        self._todo: list[int] = []

    def items(self, todo: list[int], groups: list[int]) -> Iterable[list[DecodedItem]]:
        job, o = self.job, self.job.options
        self._todo = todo
        dataset = DecodeDataset([self.records[p] for p in todo], groups,
                                job.det.preprocessing, o.max_pixels)
        return decode_batches(dataset, batch_size=o.batch_size, num_workers=o.num_workers,
                              pin_memory=job.det.device.type == "cuda",
                              prefetch_items=2 * job.window)

    def position(self, item: DecodedItem) -> int:
        """The item's position in the shard's list."""
        return self._todo[item.position]


__all__ = ["image_regions", "Failure", "with_failures", "FailureLimit", "BackgroundWriter",
           "short", "refuse", "check_set_header", "check_options", "Shard", "ShardJob",
           "prepare_set", "ShardRun", "run_shard", "run_job", "ImageJob", "ImageShard"]
