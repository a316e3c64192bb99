"""Inference latency of trained models, measured alone: ``vlkd-train latency``.

Each model predicts the first ``eval.max_samples`` samples of its evaluation stream exactly as
``vlkd-train evaluate`` does (captioning: beam search and decoding, one sample per image; VQA:
one forward pass per question), with the same batch size, beam and thread count for every
model. The passes are repeated and interleaved (model 1, model 2, ..., then again), so a load
that comes and goes hits every model alike, and each model's time is its fastest pass: the
others absorb warm-up (first page reads, allocator growth) and interference. Milliseconds per
sample are that pass's wall time over its samples. The result names the machine, the threads
and torch's version, since these numbers belong to one machine.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from vlkd.common.machine import cpu_count, cpu_name

__all__ = ["LatencyRow", "time_passes", "latency_table", "write_latency"]


@dataclass
class LatencyRow:
    """One model's latency.

    Attributes:
        task, name: the task and the label the caller gave the model.
        model, regions: the model directory and the region set it read.
        samples: samples of one pass (images for captioning, questions for VQA).
        ms_per_sample: the fastest pass, milliseconds per sample.
        ms_median: the median pass, milliseconds per sample.
        passes_s: every pass's wall time, seconds.
        num_parameters: the model's parameters.
    """

    task: str
    name: str
    model: str
    regions: str
    samples: int = 0
    ms_per_sample: float = float("nan")
    ms_median: float = float("nan")
    passes_s: list[float] = field(default_factory=list)
    num_parameters: int = 0


def time_passes(rows: list[LatencyRow], predict: list[Callable[[], int]], repeats: int) -> None:
    """Runs every ``predict[i]`` (one pass over its samples, returning how many it predicted)
    ``repeats`` times, interleaved, and fills ``rows[i]``'s times."""
    if repeats < 1:
        raise ValueError(f"latency: repeats must be >= 1, got {repeats}")
    for _ in range(repeats):
        for row, run in zip(rows, predict):
            t = time.perf_counter()
            n = run()
            row.passes_s.append(time.perf_counter() - t)
            if row.samples and n != row.samples:
                raise RuntimeError(f"latency: {row.name} predicted {n} samples in one pass and "
                                   f"{row.samples} in another")
            row.samples = n
    for row in rows:
        per = [s * 1e3 / max(row.samples, 1) for s in row.passes_s]
        row.ms_per_sample, row.ms_median = min(per), statistics.median(per)


def latency_table(result: dict) -> str:
    """The result as a markdown table with a header line naming the machine and settings."""
    s = result["settings"]
    lines = [f"# latency: {s['cpu']} ({s['cores']} cores), {s['threads']} thread(s), torch "
             f"{s['torch']}, device {s['device']}; batch {s['batch_size']}, beam "
             f"{s['beam_size']}, best of {s['repeats']} passes",
             "| task | model | samples | ms / sample (best) | ms / sample (median) | params |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['task']} | {r['name']} | {r['samples']} | {r['ms_per_sample']:.2f} "
                     f"| {r['ms_median']:.2f} | {r['num_parameters'] / 1e6:.3f} M |")
    return "\n".join(lines)


def write_latency(rows: list[LatencyRow], out_dir: str | os.PathLike, *, threads: int,
                  batch_size: int, beam_size: int, repeats: int, device: str) -> Path:
    """Writes ``latency.json`` and ``latency.md`` under ``out_dir``; returns the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"settings": {"cpu": cpu_name(), "cores": cpu_count(),
                           "threads": threads, "torch": torch.__version__, "device": device,
                           "batch_size": batch_size, "beam_size": beam_size,
                           "repeats": repeats},
              "rows": [asdict(r) for r in rows]}
    (out / "latency.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "latency.md").write_text(latency_table(result) + "\n")
    return out / "latency.json"
