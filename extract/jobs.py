"""Machinery shared by the extraction jobs: decoding in DataLoader workers, the writer thread,
progress (a tqdm bar or JSON lines on stderr) and failure accounting.

The throughput design: worker processes read, decode and resize images (CPU-bound, in
parallel); the main process only runs the network; a background thread hands results to the
shard writer (I/O, compression), so that device time is never spent waiting on disk.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import math
import queue
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from vlkd.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageRecord, read_image


def quiet_library_warnings() -> None:
    """Silence known, harmless third-party warnings so that stderr carries only the job's own
    messages (one JSON object per line with ``--log-format json``). Called by the CLI only:
    importing vlkd changes no warning filter."""
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated",
                            category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"torch\.meshgrid: in an upcoming release",
                            category=UserWarning)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


def _load_libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # glibc only
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


def release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    A job allocates and frees image-sized buffers and variable-size region tensors all the
    time. glibc serves them from its heap once its dynamic mmap threshold has grown, and the
    freed holes fragment: peak RSS then creeps up with the number of images although nothing
    stays live (measured on the tiny C4 model on CPU, 480 images: 960 -> 1460 MiB untrimmed,
    -> 1210 MiB trimming once per 32-image window, -> 1040 MiB trimming after every forward
    pass). Trimming after each forward pass costs ~5 % of a tiny model's CPU time (freed pages
    are faulted in again) and nothing measurable for real models; a fixed low mmap threshold
    (``MALLOC_MMAP_THRESHOLD_``) also bounds RSS but costs 15-30 %.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


# ----------------------------------------------------------------------------------- decode


@dataclass(kw_only=True)
class JobOptions:
    """Options every extraction command shares (``ProposalsConfig``, ``TeacherConfig``).

    Attributes:
        images: image source (folder, list file, COCO JSON, Karpathy JSON).
        config: detectron2 YAML config.
        weights: weights file.
        out: region-set directory.
        image_root: root for relative paths of JSON / list sources.
        shard_index: ``"all"``, an index, or None (from the array-job environment).
        batch_size: images per forward pass (images of the same padded size only).
        num_workers: decoding processes.
        device: ``cpu`` / ``cuda`` / ``cuda:N``.
        precision: ``fp32``, ``fp16``, ``bf16``.
        feature_dtype: stored feature dtype.
        max_pixels: decompression-bomb limit.
        trust_pickle: allow pickle weight files.
        log_format: ``text`` or ``json``.
        progress: show progress.
        opts: detectron2 config overrides (``KEY VALUE`` pairs).
        window: images per batching/commit window (0: ``max(32, 8 * batch_size)``).
    """

    images: str
    config: str
    weights: str
    out: str
    image_root: str | None = None
    shard_index: str | None = None
    batch_size: int = 4
    num_workers: int = 2
    device: str = "cpu"
    precision: str = "fp32"
    feature_dtype: str = "float16"
    max_pixels: int = DEFAULT_MAX_PIXELS
    trust_pickle: bool = False
    log_format: str = "text"
    progress: bool = True
    opts: tuple[str, ...] = field(default_factory=tuple)
    window: int = 0

    def window_size(self) -> int:
        return self.window or max(32, 8 * self.batch_size)

@dataclass
class DecodedItem:
    """One image as a worker delivers it.

    Attributes:
        position: index of the image in the job's list (keeps results in order).
        group: the job's grouping key for this image (e.g. its commit window).
        image_id: the image's id.
        image: (3, h, w) uint8 network input (resized, model channel order), or None on
            failure.
        orig_hw: original (height, width) after EXIF orientation; (0, 0) on failure.
        digest: 16-byte digest of the file's bytes (zeros on failure).
        error: why the image cannot be used (``kind: detail``), or None.
    """

    position: int
    group: int
    image_id: str
    image: torch.Tensor | None
    orig_hw: tuple[int, int]
    digest: bytes
    error: str | None = None


class DecodeDataset(Dataset):
    """Reads, decodes and preprocesses images; a failure is returned, never raised, so one
    bad file does not stop the job.

    Args:
        records: the images, in job order.
        groups: one grouping key per record (passed through to :class:`DecodedItem`).
        preprocess: picklable callable (H, W, 3) uint8 RGB -> (3, h, w) uint8 tensor.
        max_pixels: decompression-bomb limit (see ``vlkd.data.images.read_image``).
    """

    def __init__(self, records: Sequence[ImageRecord], groups: Sequence[int],
                 preprocess: Callable, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.records = list(records)
        self.groups = list(groups)
        self.preprocess = preprocess
        self.max_pixels = max_pixels
        self._served = 0

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> DecodedItem:
        self._served += 1  # per process: each worker has its own copy
        if self._served % 32 == 0:
            release_free_memory()
        r = self.records[i]
        try:
            dec = read_image(r.path, max_pixels=self.max_pixels)
        except ImageDecodeError as e:
            return DecodedItem(i, self.groups[i], r.image_id, None, (0, 0), b"\0" * 16, str(e))
        try:
            image = self.preprocess(dec.rgb)
        except Exception as e:  # noqa: BLE001 - e.g. a 1x50000 image the resize cannot take
            return DecodedItem(i, self.groups[i], r.image_id, None, dec.hw, dec.digest,
                               f"preprocess: {type(e).__name__}: {e}")
        return DecodedItem(i, self.groups[i], r.image_id, image, dec.hw, dec.digest)


def _collate_list(items: list) -> list:
    return items


def _worker_init(_: int) -> None:
    # Decoding is PIL work; torch threads inside each worker would only oversubscribe cores.
    torch.set_num_threads(1)


def decode_batches(dataset: DecodeDataset, *, batch_size: int, num_workers: int,
                   pin_memory: bool = False, prefetch_items: int = 0
                   ) -> Iterator[list[DecodedItem]]:
    """Decode ``dataset`` in order, ``batch_size`` items at a time, never mixing groups.

    Args:
        dataset: the images.
        batch_size: items per delivered list.
        num_workers: decoding processes (0: decode in this process).
        pin_memory: pin image tensors (faster host-to-GPU copies).
        prefetch_items: roughly how many items the workers may decode ahead of the consumer
            (at least two batches per worker).

    Yields:
        Lists of up to ``batch_size`` items of one group, in dataset order.
    """
    batches: list[list[int]] = []
    for i in range(len(dataset)):
        if batches and len(batches[-1]) < batch_size and \
                dataset.groups[batches[-1][0]] == dataset.groups[i]:
            batches[-1].append(i)
        else:
            batches.append([i])
    kwargs = {}
    if num_workers > 0:
        per_worker = math.ceil(prefetch_items / max(1, batch_size * num_workers))
        kwargs = dict(prefetch_factor=max(2, per_worker), worker_init_fn=_worker_init,
                      persistent_workers=False)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                        collate_fn=_collate_list, pin_memory=pin_memory, **kwargs)
    yield from loader


# ----------------------------------------------------------------------------------- writer

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
        """Stop after what is queued without raising (used while another error unwinds)."""
        if self._thread.is_alive():
            self._q.put(self._STOP)
            self._thread.join()


# --------------------------------------------------------------------------------- progress

class Progress:
    """Progress of a job on stderr: a tqdm bar (images/s) or JSON lines.

    Args:
        log_format: ``text`` (tqdm bar and plain messages) or ``json`` (one JSON object per
            line, for cluster logs: events ``start``, ``progress`` every ``interval`` seconds,
            ``shard_done``, ``summary``).
        enabled: show the bar / progress lines at all (events are always printed).
        interval: seconds between JSON progress lines.
        stream: where to write (default stderr).
    """

    def __init__(self, log_format: str = "text", *, enabled: bool = True,
                 interval: float = 30.0, stream=None):
        if log_format not in ("text", "json"):
            raise ValueError(f"--log-format must be text or json, got {log_format!r}")
        self.json = log_format == "json"
        self.enabled = enabled
        self.interval = interval
        self.stream = stream if stream is not None else sys.stderr
        self._bar = None
        self._ctx: dict = {}
        self._total = self._done = self._failed = self._initial = 0
        self._t0 = self._last = time.monotonic()

    def event(self, event: str, message: str = "", **fields) -> None:
        """Print one event: a JSON line, or ``message`` as text."""
        if self.json:
            rec = {"time": round(time.time(), 3), "event": event, **fields}
            self.stream.write(json.dumps(rec, default=str) + "\n")
            self.stream.flush()
        elif message:
            if self._bar is not None:
                self._bar.write(message, file=self.stream)
            else:
                self.stream.write(message + "\n")
                self.stream.flush()

    def start(self, total: int, desc: str, initial: int = 0, **ctx) -> None:
        """Begin counting ``total`` images (one shard), ``initial`` of them already done
        (resumed: shown as done, not counted in images/s)."""
        self._ctx = dict(ctx, desc=desc)
        self._total, self._done, self._failed, self._initial = total, initial, 0, initial
        self._t0 = self._last = time.monotonic()
        if self.enabled and not self.json:
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="img",
                             file=self.stream, dynamic_ncols=True, smoothing=0.1,
                             mininterval=0.5)

    def update(self, n: int, failed: int = 0) -> None:
        self._done += n
        self._failed += failed
        if self._bar is not None:
            self._bar.update(n)
            if failed:
                self._bar.set_postfix(failed=self._failed, refresh=False)
        elif self.json and self.enabled:
            now = time.monotonic()
            if now - self._last >= self.interval:
                self._last = now
                self.event("progress", **self._progress_fields())

    def _progress_fields(self) -> dict:
        el = max(time.monotonic() - self._t0, 1e-9)
        return dict(self._ctx, done=self._done, total=self._total, failed=self._failed,
                    elapsed_s=round(el, 2),
                    images_per_s=round((self._done - self._initial) / el, 3))

    def finish(self) -> dict:
        """Close the bar; returns the final counters."""
        fields = self._progress_fields()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        return fields


# --------------------------------------------------------------------------------- failures

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


def chunked(seq: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def same_size_batches(items: Sequence[DecodedItem], padded_hw: Callable[[int, int], tuple],
                      batch_size: int) -> list[list[DecodedItem]]:
    """Split the usable items of a window into batches whose images pad to the same size.

    detectron2 pads a batch to its largest image, and the padding is not zero after the first
    FrozenBN, so an image batched with a larger one gets other features than alone. Batching
    only images of equal padded size (``Detector.padded_hw``) keeps every image's result
    independent of its neighbours; batches follow the items' order within each size.

    Args:
        items: decoded items (failed ones are skipped).
        padded_hw: (h, w) of a network input -> the size it pads to alone.
        batch_size: most images per batch.
    """
    groups: dict[tuple, list[DecodedItem]] = {}
    for it in items:
        if it.error is None:
            h, w = it.image.shape[-2:]
            groups.setdefault(tuple(padded_hw(int(h), int(w))), []).append(it)
    return [list(c) for g in groups.values() for c in chunked(g, batch_size)]


# --- refusing to mix runs in one set -----------------------------------------------------------
def short(v) -> str:
    """A digest or value shortened for an error message."""
    s = str(v)
    return s[:12] + "…" if len(s) > 14 else s


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
    def refuse(what: str, here, there, fix: str) -> None:
        raise error(f"--out {out} holds a region set made {what} ({short(there)} in its "
                    f"manifest.json, {short(here)} now); {fix}")

    fix_new = "write to a new --out directory, or "
    if existing.get("role") != role:
        refuse("by another job (role)", role, existing.get("role"),
               f"write {role} to a new --out directory")
    ed, hd = existing.get("detector", {}), header["detector"]
    if ed.get("config_digest") != hd["config_digest"]:
        refuse(f"with another {detector} config (config digest)", hd["config_digest"],
               ed.get("config_digest"), fix_new + f"re-run with the {detector} config it was "
               "made with")
    if ed.get("weights_digest") != hd["weights_digest"]:
        refuse(f"with other {detector} weights (weights digest)", hd["weights_digest"],
               ed.get("weights_digest"), fix_new + f"re-run with the {detector} weights it was "
               "made with")
    for key, what in (("preprocessing", "other preprocessing"),
                      ("num_shards", "another --num-shards"),
                      ("backend", "another --backend"),
                      ("feature_dtype", "another --feature-dtype"),
                      ("feature_dim", "another feature dim"),
                      ("class_names", "other class names")):
        if key in existing and existing[key] != header[key]:
            refuse("with " + what, header[key], existing[key],
                   fix_new + "re-run with the set's options")
