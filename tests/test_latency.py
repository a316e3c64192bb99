"""`vlkd-train latency`: every model timed as evaluate predicts, interleaved passes, the fastest
counts; the demo's latency stage runs it."""
from __future__ import annotations

import json

import pytest
import torch

from train_data import cli_args, invoke, make_world
from vlkd.train.latency import LatencyRow, latency_table, time_passes


def test_passes_interleave_and_the_fastest_counts():
    calls, clock = [], iter([0.0, 0.3, 0.3, 0.5, 0.5, 0.6, 0.6, 1.0])   # perf_counter values
    rows = [LatencyRow("caption", n, "m", "r") for n in ("a", "b")]

    def run(name):
        def f():
            calls.append(name)
            return 10
        return f

    import vlkd.train.latency as lat
    orig = lat.time.perf_counter
    lat.time.perf_counter = lambda: next(clock)
    try:
        time_passes(rows, [run("a"), run("b")], repeats=2)
    finally:
        lat.time.perf_counter = orig
    assert calls == ["a", "b", "a", "b"]
    a, b = rows
    assert a.passes_s == pytest.approx([0.3, 0.1]) and b.passes_s == pytest.approx([0.2, 0.4])
    assert a.ms_per_sample == pytest.approx(10.0) and b.ms_per_sample == pytest.approx(20.0)
    assert a.ms_median == pytest.approx(20.0) and a.samples == 10
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        time_passes(rows, [run("a"), run("b")], repeats=0)


def test_latency_command_times_caption_and_vqa_models(tmp_path):
    torch.set_num_threads(1)
    w = make_world(tmp_path / "w", num_images=24, num_val=6)
    cap, vqa = tmp_path / "cap", tmp_path / "vqa"
    invoke(["finetune", "--task", "caption", "--regions", w["student"], "--model", "tiny",
            *cli_args(w, cap, steps=3)])
    q, a = w["vqa"]
    invoke(["finetune", "--task", "vqa", "--regions", w["student"], "--model", "tiny",
            "--vqa-questions", q, "--vqa-annotations", a, "--set", "data.answer_min_count=1",
            *cli_args(w, vqa, steps=3)])
    eq, ea = w["vqa_val"]
    out = tmp_path / "lat"
    res = invoke(["latency", "--output-dir", out, "--captions", w["captions"], "--split", "val",
                  "--vqa-questions", eq, "--vqa-annotations", ea, "--samples", 4,
                  "--batch-size", 1, "--beam-size", 2, "--repeats", 2, "--threads", 1,
                  "--run", "caption", "student", cap / "final", w["student"],
                  "--run", "vqa", "student", vqa / "final", w["student"]])
    got = json.loads((out / "latency.json").read_text())
    s = got["settings"]
    assert (s["threads"], s["batch_size"], s["beam_size"], s["repeats"]) == (1, 1, 2, 2)
    assert s["cpu"] and s["cores"] >= 1 and s["torch"] == torch.__version__
    rows = {r["task"]: r for r in got["rows"]}
    for task in ("caption", "vqa"):
        r = rows[task]
        assert r["samples"] == 4 and len(r["passes_s"]) == 2 and r["num_parameters"] > 0
        assert 0 < r["ms_per_sample"] <= r["ms_median"]
        assert r["ms_per_sample"] == pytest.approx(min(r["passes_s"]) * 1e3 / 4)
    assert (out / "latency.md").read_text().strip() == latency_table(got)
    assert "| caption | student | 4 |" in res.output
