"""GPU utilisation while a benchmark runs, for ``gpu_suite.py`` (per step) and
``extract_throughput.py --device cuda`` (per timed phase).

:class:`UtilSampler` reads ``nvidia-smi``'s own query loop (``-lms``) in a thread: utilisation
%, memory MiB, power W and SM clock, each sample stamped with the time it arrived. Without
nvidia-smi it samples the CPU's utilisation (psutil), so that a CPU run still fills the same
columns. A phase's numbers are the samples inside its time spans::

    with UtilSampler() as sampler:
        t0 = time.time(); run(); t1 = time.time()
    sampler.window(t0, t1)   # {"samples", "util_mean", "util_max", "mem_max_mib", ...}
"""
from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import threading
import time


def nvidia_smi_id(index: int = 0) -> str:
    """nvidia-smi's ``-i`` for torch's ``cuda:index``: that entry of ``CUDA_VISIBLE_DEVICES``
    when it is set (an index, a UUID or a MIG id, all of which ``-i`` accepts), else the index."""
    visible = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
               if x.strip()]
    return visible[index] if index < len(visible) else str(index)


class UtilSampler:
    """GPU utilisation (%), memory (MiB), power (W) and SM clock every ``interval_ms`` from
    ``nvidia-smi``'s query loop; without nvidia-smi (or with ``gpu_only=False`` and none
    found), CPU utilisation (%) from psutil.

    Args:
        interval_ms: sampling period.
        gpu: nvidia-smi's ``-i`` (see :func:`nvidia_smi_id`).
        gpu_only: when there is no nvidia-smi, sample nothing (``source`` is None) instead of
            the CPU.
    """

    def __init__(self, interval_ms: int = 200, gpu: str = "0", gpu_only: bool = False):
        self.samples: list[tuple] = []   # (unix time, util %, memory MiB, power W, sm MHz)
        self.interval_ms, self.gpu = interval_ms, gpu
        self.source = ("nvidia-smi" if shutil.which("nvidia-smi") else
                       None if gpu_only else "cpu (psutil)")
        self._stop = threading.Event()
        self._proc = None
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        if self.source is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)
        if self._thread.is_alive():
            self._thread.join(10)

    def _loop(self):
        if self.source == "nvidia-smi":
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used,power.draw,clocks.sm",
                 "--format=csv,noheader,nounits", "-lms", str(self.interval_ms), "-i", self.gpu],
                stdout=subprocess.PIPE, text=True)
            for line in self._proc.stdout:
                vals = [parse_number(x) for x in line.split(",")]
                if len(vals) == 4:
                    self.samples.append((time.time(), *vals))
                if self._stop.is_set():
                    break
        else:
            import psutil
            psutil.cpu_percent(None)
            while not self._stop.wait(self.interval_ms / 1e3):
                self.samples.append((time.time(), psutil.cpu_percent(None), None, None, None))

    def window(self, t0: float, t1: float) -> dict:
        """Mean and max utilisation, max memory and mean power between ``t0`` and ``t1``."""
        return self.over([(t0, t1)])

    def over(self, spans: list[tuple[float, float]]) -> dict:
        """:meth:`window` over the samples of several ``(t0, t1)`` spans together (the rounds
        of one phase)."""
        s = [x for x in list(self.samples) if any(a <= x[0] <= b for a, b in spans)]
        if not s:
            return {"samples": 0}
        util = [x[1] for x in s if x[1] is not None]
        mem = [x[2] for x in s if x[2] is not None]
        pw = [x[3] for x in s if x[3] is not None]
        return {"samples": len(s), "util_mean": _mean(util), "util_max": max(util, default=None),
                "mem_max_mib": max(mem, default=None), "power_mean_w": _mean(pw)}


def parse_number(x: str):
    """``float(x)``, or None for nvidia-smi's ``[N/A]`` and other non-numbers."""
    try:
        return float(x)
    except ValueError:
        return None


def _mean(xs):
    return round(statistics.fmean(xs), 1) if xs else None
