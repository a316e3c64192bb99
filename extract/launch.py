"""`vlkd-extract launch`: a job's shards as N local processes, for machines without a batch system.

``vlkd-extract launch --gpus 4 -- proposals --images ... --out SET --num-shards 64`` starts one
process per GPU (``CUDA_VISIBLE_DEVICES`` pins it, ``--device cuda``); each takes the next shard
not yet done, runs it as ``vlkd-extract proposals ... --shard-index i`` (exactly what an array
job runs) and takes another, until every shard is done. ``--gpus 0 --workers N`` does the same
with N CPU processes, each with ``cores // N`` threads. Shards that are already complete are not
started again; a shard that fails does not stop the others: the failures are listed at the end,
each with its log, and the exit status is 1 (3 when a shard exceeded ``--max-failures``).
SIGTERM / SIGINT are passed on to the running shard processes, which stop at a window boundary
(docs/EXTRACT.md, "Preemption"); the launcher then exits 143 / 130 and a re-run resumes.

This is MILVLG bottom-up-attention.pytorch's ``--gpus`` (one extraction process per GPU), with
vlkd's shards as the unit of work so that the set is the one an array job would write.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from vlkd.common.machine import cpu_count
from vlkd.common.manifest import ManifestError, read_manifest

__all__ = ["LaunchError", "ShardOutcome", "LaunchResult", "launch", "COMMANDS"]

#: The jobs launch runs (each takes --shard-index like an array task).
COMMANDS = ("proposals", "teacher-features", "import-tsv")


class LaunchError(ValueError):
    """The launch cannot start (message says what to change)."""


@dataclass
class ShardOutcome:
    """How one shard's process ended."""

    index: int
    slot: str
    returncode: int
    seconds: float
    log: Path

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@dataclass
class LaunchResult:
    """Every shard started, by index, and the signal that stopped the launch (or None)."""

    outcomes: list[ShardOutcome]
    stopped_by: int | None = None

    @property
    def failed(self) -> list[ShardOutcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def exit_status(self) -> int:
        """0 every shard done; 128 + signal when stopped; 3 when every failed shard exceeded
        --max-failures (the sets are written); 1 another failure."""
        if self.stopped_by:
            return 128 + self.stopped_by
        if not self.failed:
            return 0
        return 3 if all(o.returncode == 3 for o in self.failed) else 1


def _visible_gpus() -> int:
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no usable CUDA at all
        return 0


def _complete(out: Path) -> set[int]:
    try:
        return {int(e["index"]) for e in read_manifest(out).get("shards", [])}
    except ManifestError:
        return set()


def launch(command: str, args: Sequence[str], *, num_shards: int, out: str | os.PathLike,
           gpus: int = 0, workers: int = 1, plugins: Sequence[str] = (),
           log_dir: str | os.PathLike | None = None,
           say: Callable[[str], None] = print) -> LaunchResult:
    """Run shards ``0..num_shards-1`` of ``vlkd-extract COMMAND ARGS`` in local processes.

    Args:
        command: ``proposals``, ``teacher-features`` or ``import-tsv``.
        args: the command's arguments, without ``--shard-index``.
        num_shards: shards of the set.
        out: the set (``--out``): complete shards are skipped.
        gpus: processes pinned to GPUs 0..gpus-1 (0: CPU processes).
        workers: CPU processes when ``gpus`` is 0.
        plugins: ``--plugin`` modules passed on.
        log_dir: one log per shard (default: ``<out>.logs`` beside the set).
        say: where progress lines go.

    Returns:
        The outcome of every shard started, by shard index, and the stop signal if one came.

    Raises:
        LaunchError: bad arguments, or fewer GPUs than ``gpus``.
    """
    if command not in COMMANDS:
        raise LaunchError(f"launch runs {' or '.join(COMMANDS)}, not {command!r}")
    if any(a == "--shard-index" or a.startswith("--shard-index=") for a in args):
        raise LaunchError("leave --shard-index out: launch gives each process its shards")
    if gpus < 0 or workers < 1:
        raise LaunchError(f"need --gpus >= 0 and --workers >= 1, got {gpus} and {workers}")
    if gpus:
        have = _visible_gpus()
        if have < gpus:
            raise LaunchError(f"--gpus {gpus}: this machine shows {have} CUDA device(s); use "
                              f"--gpus {have}" + (" or --gpus 0 --workers N for CPU processes"
                                                   if not have else ""))
        slots = [f"GPU {i}" for i in range(gpus)]
    else:
        slots = [f"CPU worker {i}" for i in range(workers)]
    out = Path(out)
    logs = Path(log_dir) if log_dir else out.with_name(out.name + ".logs")
    logs.mkdir(parents=True, exist_ok=True)
    done = _complete(out)
    todo = [i for i in range(num_shards) if i not in done]
    if done:
        say(f"launch: {len(done)} of {num_shards} shard(s) already complete")
    say(f"launch: {command}, {len(todo)} shard(s) on {len(slots)} process slot(s) "
        f"({', '.join(slots)}); logs in {logs}")
    threads = max(1, cpu_count() // len(slots))
    queue = list(todo)
    lock = threading.Lock()
    outcomes: dict[int, ShardOutcome] = {}
    running: dict[int, subprocess.Popen] = {}
    stop: list[int] = []

    def worker(k: int) -> None:
        slot = slots[k]
        while True:
            with lock:
                if stop or not queue:
                    return
                i = queue.pop(0)
            env = dict(os.environ)
            argv = [sys.executable, "-m", "vlkd.extract.cli",
                    *[a for p in plugins for a in ("--plugin", p)], command, *args,
                    "--shard-index", str(i)]
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(k)
                if "--device" not in args and command != "import-tsv":  # import runs no model
                    argv += ["--device", "cuda"]
            else:
                env["CUDA_VISIBLE_DEVICES"] = ""
                env.setdefault("OMP_NUM_THREADS", str(threads))
                env.setdefault("MKL_NUM_THREADS", str(threads))
            log = logs / f"shard-{i:05d}.log"
            t0 = time.monotonic()
            with open(log, "w") as f:
                f.write("$ " + " ".join(argv) + "\n")
                f.flush()
                # Its own process group: a terminal's Ctrl-C reaches the launcher, which passes
                # it on once (a second Ctrl-C would otherwise hit the children directly).
                proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
                with lock:
                    running[i] = proc
                rc = proc.wait()
                with lock:
                    running.pop(i, None)
            res = ShardOutcome(i, slot, rc, time.monotonic() - t0, log)
            with lock:
                outcomes[i] = res
            if res.ok:
                say(f"launch: shard {i}/{num_shards} on {slot}: ok in {res.seconds:.0f} s")
            else:
                tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                say(f"launch: shard {i}/{num_shards} on {slot}: FAILED (exit {rc}) after "
                    f"{res.seconds:.0f} s; log {log}" + "".join(f"\n    {t}" for t in tail))

    def forward(signum, frame) -> None:
        with lock:
            first = not stop
            stop.append(signum)
            procs = list(running.values())
        if first:
            say(f"launch: {signal.Signals(signum).name}: passing it on to {len(procs)} running "
                "shard process(es); they stop at a window boundary")
            for p in procs:
                try:
                    p.send_signal(signum)
                except ProcessLookupError:
                    pass

    old = {}
    if threading.current_thread() is threading.main_thread():
        old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        pool = [threading.Thread(target=worker, args=(k,), daemon=True)
                for k in range(len(slots))]
        for t in pool:
            t.start()
        for t in pool:
            while t.is_alive():
                t.join(0.2)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return LaunchResult([outcomes[i] for i in sorted(outcomes)], stop[0] if stop else None)
