"""What machine a measurement ran on, for the reports that state it (the demo's, latency)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

__all__ = ["cpu_name", "cpu_count", "describe"]


def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo reports it (else the platform's)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_count() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover (macOS)
        return max(1, os.cpu_count() or 1)


def describe() -> str:
    """``2 cores, Intel(R) Xeon(R) Processor``."""
    return f"{cpu_count()} cores, {cpu_name()}"
