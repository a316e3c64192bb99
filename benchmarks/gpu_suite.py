"""One run of every GPU measurement issue L asks for, in about five minutes on one GPU.

Steps, in priority order (a step that would not fit in what is left of ``--budget`` is skipped
and listed as such):

1. ``amp``: AMP correctness. 50 distillation steps of the paper-sized pair (12L/768 teacher,
   12L/384 student, batch 64, 40 text + 50 region tokens, K = 4096 queue) in fp32, bf16 and
   fp16 from the same initialisation on the same batches, with the trainer's AMP recipe
   (autocast over both forwards and the losses; fp16 with a GradScaler; unscale, clip to 1.0,
   step). Every loss must be finite; the AMP losses must match fp32's within
   ``TOL_FIRST`` at the first step (same weights: precision alone) and ``TOL_LAST`` over the
   mean of the last 10 steps (the trajectories). Its step times give the distill samples/s.
2. ``distill_step``: ``benchmarks/distill_step.py --device cuda`` at paper sizes with AMP bf16
   and fp16 (distill step ÷ (student step + teacher forward), samples/s).
3. ``extract``: ``benchmarks/extract_throughput.py --teacher-only --models R101-C4,R50-FPN``
   over precision x batch size (full detection and teacher-features, forward-only and end to
   end, 8 decode workers, GPU utilisation per row); the later configurations time R101-C4
   only, the last one at 800/1333.
4. ``loader``: ``benchmarks/loader_throughput.py`` at batch 64, 2048-d features, 0, 4 and 8
   workers; its best stream samples/s must be >= 3x the fastest distill samples/s measured.

Beside every step's numbers it records the GPU's utilisation, memory and power while that step
ran (``nvidia-smi`` polled every 200 ms; CPU utilisation when there is no GPU) and, once, the
card, driver and CUDA version (``nvidia-smi``) and torch's versions. A benchmark that lacks an
option a step needs (``--device`` for the distill step, say) is not run: the step is listed as
blocked, naming the option, and the suite goes on. ``--dry-run`` prints the plan as JSON and,
on stderr, which steps fit ``--budget`` if each takes its estimate.

Writes five files under ``--out`` (default ``$OUT``, else ``bench-out/gpu``; ``--quick``:
``bench-out/gpu-quick``): ``summary.md`` (what it printed), ``results.json`` (everything),
``nvidia-smi.txt``, ``steps.log`` (every step's full output) and ``util.csv`` (the samples).

    python benchmarks/gpu_suite.py                 # on a GPU machine (~5 min)
    python benchmarks/gpu_suite.py --quick         # the same steps, tiny, on CPU (~3 min)
    python benchmarks/gpu_suite.py --dry-run       # the plan: every command, nothing run
    python benchmarks/gpu_suite.py --fetch-wheels .whl
                                   # wheels a bare GPU machine lacks (benchmarks/README.md)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gpu_util import UtilSampler, nvidia_smi_id, parse_number

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
PY = sys.executable

#: AMP vs fp32 tolerances (relative difference of the total loss).
TOL_FIRST = {"bf16": 0.02, "fp16": 0.01}   # first step: same weights, precision alone
TOL_LAST = 0.03                            # mean of the last 10 of 50 steps
#: Issue L's targets, checked where the suite has the numbers.
TARGET_LOADER_VS_DISTILL = 3.0

# (precision, batch size, models, test size) of the extraction sweep, most wanted first: fp16
# batch 4 is the configuration the cluster templates run, R101-C4 the model of issue L's
# teacher-features target (>= 30 img/s fp16 on an H100-class card); after the first two,
# R101-C4 alone on fewer images, to fit the budget.
BOTH, R101 = "R101-C4,R50-FPN", "R101-C4"
EXTRACT_SWEEP = [("fp16", 4, BOTH, None), ("fp32", 4, BOTH, None), ("fp16", 8, R101, None),
                 ("fp16", 1, R101, None), ("fp32", 8, R101, None), ("fp32", 1, R101, None),
                 ("fp16", 4, R101, "800/1333")]
#: Seconds outside the steps: probing the card, and on a bare device-tool machine installing the
#: wheels (benchmarks/README.md); reported by --dry-run beside the budget.
OVERHEAD_S = 60


@dataclass
class Step:
    """One command of the plan.

    Attributes:
        name: shown in the summary, e.g. ``extract fp16 b4``.
        group: ``amp``, ``distill_step``, ``extract`` or ``loader``.
        argv: the command.
        estimate_s: expected seconds; the step is skipped when less budget is left.
        needs: options the benchmark must accept for this step (else it is blocked).
        note: what the step cannot measure yet, and why.
        params: what the step measures (precision, batch, ...), copied into its result.
    """
    name: str
    group: str
    argv: list[str]
    estimate_s: float
    needs: list[str] = field(default_factory=list)
    note: str = ""
    params: dict = field(default_factory=dict)


def accepted_options(script: Path) -> set[str]:
    """The ``--options`` a benchmark's argparse declares, read from its source (no import)."""
    text = script.read_text()
    return set(re.findall(r"add_argument\(\s*[\"'](--[\w-]+)[\"']", text))


def plan(args) -> list[Step]:
    """The steps for ``args`` (quick: tiny sizes on CPU; else paper sizes on ``args.device``)."""
    dev, quick, amp_json = args.device, args.quick, str(args.work / "amp.json")
    steps = [Step("amp", "amp", [PY, str(Path(__file__)), "--amp-child", amp_json, "--device",
                                 dev, "--size", "tiny" if quick else "paper"],
                  30 if quick else 60, params={"json": amp_json})]

    ds = BENCH / "distill_step.py"
    if quick:
        js = str(args.work / "distill-tiny.json")
        steps.append(Step("distill_step tiny", "distill_step",
                          [PY, str(ds), "--quick", "--device", dev, "--setups", "tiny",
                           "--rounds", "3", "--json", js], 25,
                          needs=["--device", "--json"], params={"json": js}))
    else:
        for amp in ("bf16", "fp16"):
            js = str(args.work / f"distill-{amp}.json")
            steps.append(Step(
                f"distill_step {amp}", "distill_step",
                [PY, str(ds), "--device", dev, "--amp", amp, "--clock", "wall", "--batch", "64",
                 "--text-len", "40", "--regions", "50", "--rounds", "5", "--setups",
                 "student/teacher", "--json", js], 30, needs=["--device", "--amp", "--json"],
                params={"amp": amp, "json": js}))

    ex = BENCH / "extract_throughput.py"
    # quick: the tiny FPN stands in for the real models (the same --models path, seconds on a CPU)
    sweep = [("fp32", 4, "tiny-FPN", None)] if quick else EXTRACT_SWEEP
    for prec, bs, models, size in sweep:
        argv = [PY, str(ex), "--teacher-only", "--device", dev, "--precision", prec,
                "--batch-size", str(bs), "--models", models,
                "--teacher-rounds", "1" if quick else "2"]
        needs = ["--models"] + (["--sizes"] if size else [])
        if size:
            argv += ["--sizes", size]
        if quick:
            argv += ["--quick", "--n-r50", "4", "--n-tiny", "8", "--teacher-n", "8",
                     "--workers", "1"]
            estimate = 35
        elif models == BOTH:
            argv += ["--n-r50", "16", "--teacher-n", "48", "--n-tiny", "8", "--workers", "8"]
            estimate = 60
        else:
            argv += ["--n-r50", "8", "--teacher-n", "24", "--n-tiny", "8", "--workers", "8"]
            estimate = 35
        name = f"extract {prec} b{bs}" + (f" {size}" if size else "")
        steps.append(Step(name, "extract", argv, estimate, needs=needs,
                          note="tiny-FPN and tiny-C4 (quick)" if quick else models,
                          params={"precision": prec, "batch": bs, "models": models,
                                  "size": size or "600/1000"}))

    lt = BENCH / "loader_throughput.py"
    argv = [PY, str(lt), "--rss-images", "250"]
    argv += (["--quick", "--images", "300", "--dim", "256", "--workers", "0", "2"] if quick else
             ["--images", "2000", "--dim", "2048", "--batch", "64", "--workers", "0", "4", "8"])
    steps.append(Step("loader", "loader", argv, 40 if quick else 90, needs=["--workers"]))

    # Priority: AMP check, one extraction config, the distill steps, the loader, the rest of
    # the sweep.
    extract = [s for s in steps if s.group == "extract"]
    rest = [s for s in steps if s.group != "extract"]
    order = ([rest[0], *extract[:1], *[s for s in rest if s.group == "distill_step"],
              *[s for s in rest if s.group == "loader"], *extract[1:]])
    for s in order:
        opts = accepted_options(Path(s.argv[1])) if s.group != "amp" else set()
        s.params["missing"] = [o for o in s.needs if o not in opts]
    return order


def budget_plan(steps: list[Step], budget: float) -> tuple[list[Step], list[Step], float]:
    """(steps that run, steps skipped, seconds) if every step takes its estimate: the rule of
    :func:`run_steps` (a step starts only when its estimate fits in what is left)."""
    used, run, skipped = 0.0, [], []
    for s in steps:
        if s.params.get("missing"):
            continue
        if budget - used >= s.estimate_s:
            run.append(s)
            used += s.estimate_s
        else:
            skipped.append(s)
    return run, skipped, used


# ---------------------------------------------------------------------------- environment
def probe_environment(device: str) -> tuple[dict, str]:
    """The card, driver, CUDA and library versions; and nvidia-smi's own text."""
    import torch

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "host_cpus": os.cpu_count(), "python": platform.python_version(),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "device": device, "git": _git_revision()}
    for mod in ("detectron2", "transformers", "numpy"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001  (reported, not fatal: a step fails instead)
            env[mod] = f"missing ({e})"
    text = ""
    if shutil.which("nvidia-smi"):
        text = _run_text(["nvidia-smi"])
        q = _run_text(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                       "compute_cap,pci.bus_id", "--format=csv,noheader"]).strip()
        if q:
            first = [x.strip() for x in q.splitlines()[0].split(",")]
            env.update(zip(["gpu", "driver", "gpu_memory", "compute_cap", "pci"], first))
            env["gpus"] = len(q.splitlines())
        m = re.search(r"CUDA Version:\s*([\d.]+)", text)
        env["driver_cuda"] = m.group(1) if m else None
        text += "\n" + _run_text(["nvidia-smi", "-q", "-d", "CLOCK,POWER,PERFORMANCE"])
    else:
        env["gpu"] = "none (nvidia-smi not found)"
    if device == "cuda" and torch.cuda.is_available():
        env["torch_device_name"] = torch.cuda.get_device_name(0)
    return env, text


def _run_text(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"{argv[0]}: {e}\n"


def _git_revision() -> str:
    r = _run_text(["git", "-C", str(ROOT), "rev-parse", "HEAD"]).strip()
    return r if re.fullmatch(r"[0-9a-f]{40}", r) else "unknown"


# ------------------------------------------------------------------------------- running
def run_steps(steps: list[Step], args, sampler: UtilSampler, log) -> list[dict]:
    """Runs the plan within ``args.budget`` seconds; a result per step."""
    t_start, results = time.time(), []
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=_pythonpath())
    for s in steps:
        left = args.budget - (time.time() - t_start)
        res = {"name": s.name, "group": s.group, "argv": s.argv, "note": s.note,
               "params": s.params}
        if s.params.get("missing"):
            res.update(status="blocked", why=f"{Path(s.argv[1]).name} has no "
                       + ", ".join(s.params["missing"]))
        elif left < s.estimate_s:
            res.update(status="skipped", why=f"time budget: {left:.0f} s left, needs "
                       f"~{s.estimate_s:.0f} s")
        if "status" in res:
            print(f"[gpu_suite] {s.name}: {res['status']} ({res['why']})", flush=True)
            results.append(res)
            continue
        timeout = max(60.0, min(4 * s.estimate_s, left + 30))
        print(f"[gpu_suite] {s.name}: running (~{s.estimate_s:.0f} s, limit {timeout:.0f} s)",
              flush=True)
        log.write(f"\n===== {s.name}\n$ {' '.join(s.argv)}\n")
        log.flush()
        t0 = time.time()
        try:
            p = subprocess.run(s.argv, capture_output=True, text=True, timeout=timeout,
                               cwd=ROOT, env=env)
            rc, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            rc, out, err = "timeout", _text(e.stdout), _text(e.stderr)
        t1 = time.time()
        log.write(out + ("\n--- stderr\n" + err if err else "") + f"\n--- exit {rc}, "
                  f"{t1 - t0:.1f} s\n")
        log.flush()
        # The benchmarks exit 1 after printing a table with a missed target: measured, not broken.
        status = ("ok" if rc == 0 else
                  "target missed" if rc == 1 and re.search(r"\bMISSED\b", out) else "failed")
        res.update(status=status, rc=rc, wall_s=round(t1 - t0, 1),
                   util=sampler.window(t0, t1), stdout=out, stderr_tail=err[-3000:],
                   tables=parse_tables(out))
        if s.group == "amp" and Path(s.params["json"]).exists():
            res["amp"] = json.loads(Path(s.params["json"]).read_text())
        if s.group == "distill_step" and Path(s.params["json"]).exists():
            res["distill"] = json.loads(Path(s.params["json"]).read_text())
        if rc == "timeout":
            res["why"] = f"timed out after {timeout:.0f} s"
        elif status == "failed":
            res["why"] = f"exit {rc}: " + (err.strip().splitlines() or ["(no stderr)"])[-1]
        print(f"[gpu_suite] {s.name}: {res['status']} in {t1 - t0:.1f} s", flush=True)
        results.append(res)
    return results


def _text(b) -> str:
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else b


def _pythonpath() -> str:
    """The repository root first (``benchmarks.*`` imports), then whatever was set."""
    old = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join([str(ROOT)] + ([old] if old else []))


def parse_tables(text: str) -> list[list[dict]]:
    """Every markdown table in ``text`` as a list of rows {header: cell}."""
    tables, header, rows = [], None, []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not all(re.fullmatch(r":?-+:?", c) for c in cells if c):
                rows.append(dict(zip(header, cells)))
            continue
        if header is not None:
            tables.append(rows)
        header, rows = None, []
    return tables


# ------------------------------------------------------------------------------- summary
def checks(results: list[dict]) -> list[tuple[str, str, str]]:
    """(check, value, verdict) for the targets the suite has numbers for."""
    out = []
    amp = next((r for r in results if r["group"] == "amp" and "amp" in r), None)
    distill_sps = None
    if amp:
        a = amp["amp"]
        for p in ("bf16", "fp16"):
            if p in a["runs"]:
                c = a["compare"][p]
                out.append((f"AMP {p} vs fp32 ({a['steps']} steps)",
                            f"finite {c['finite']}, first step {c['first_rel']:.2e} "
                            f"(≤ {c['tol_first']}), last 10 {c['last_rel']:.2e} "
                            f"(≤ {c['tol_last']})", "ok" if c["ok"] else "MISSED"))
        distill_sps = [(a["runs"][p]["samples_per_s"], f"amp {p}")
                       for p in ("bf16", "fp16", "fp32") if p in a["runs"]]
    else:
        distill_sps = []
    for r in results:
        d = r.get("distill")
        for row in (d or {}).get("rows", []):
            out.append((f"{r['name']}: {row['pair']}, batch {row['batch']}, amp {d['amp']}",
                        f"distill {row['distill_ms']:.1f} ms ÷ (student {row['student_ms']:.1f}"
                        f" + teacher {row['teacher_ms']:.1f}) = {row['ratio']:.2f}, "
                        f"{row['samples_per_s']:,.0f} samples/s",
                        f"≤ {d['target']} " + ("ok" if row["passed"] else "MISSED")
                        if row["gated"] else "report"))
            if row["gated"]:
                distill_sps.append((row["samples_per_s"], r["name"]))
    for r in results:
        for line in r.get("stdout", "").splitlines():
            if line.startswith("R101-C4 teacher-features, fp16") and ": " in line:
                head, _, verdict = line.rpartition(": ")
                out.append((f"{r['name']}: R101-C4 teacher-features ≥ 30 img/s",
                            head.split(": ", 1)[-1], verdict))
    loader = next((r for r in results if r["group"] == "loader" and r.get("tables")), None)
    if loader and distill_sps:
        # (steady samples/s, workers) of the stream rows; with workers only where there are
        # some: a training job loads in workers, and 0 workers would block its GPU step
        stream = [(parse_number(row.get("steady samples/s", "").replace(",", "")), int(m[1]))
                  for t in loader["tables"] for row in t
                  if (m := re.fullmatch(r"stream \((\d+) workers\)", row.get("loader", "")))]
        stream = [x for x in stream if x[0]]
        stream = [x for x in stream if x[1] > 0] or stream
        if stream:
            best, workers = max(stream)
            # the fastest distill step is the one the loader has to keep up with
            sps, source = max(distill_sps)
            ratio = best / sps
            out.append((f"loader (best stream, {workers} workers) ÷ distill samples/s",
                        f"{best:,.0f} / {sps:,.0f} ({source}) = {ratio:.1f}x",
                        f"≥ {TARGET_LOADER_VS_DISTILL:.0f}x " +
                        ("ok" if ratio >= TARGET_LOADER_VS_DISTILL else "MISSED")))
    return out


def extract_rows(results: list[dict]) -> list[list[str]]:
    """One row per (sweep config, model) from extract_throughput's teacher-features tables."""
    rows = []
    for r in results:
        if r["group"] != "extract" or "rc" not in r or len(r["tables"]) < 2:
            continue
        # the two tables list the same models in the same order (one row per model and size)
        for d, row in zip(r["tables"][0], r["tables"][1]):
            dcol = next((k for k in d if k.startswith("detection s/img")), None)
            u = r["util"]
            rows.append([r["params"]["precision"], str(r["params"]["batch"]), row["model"],
                         d.get("input", ""), d.get(dcol, "") if dcol else "",
                         row.get("teacher-features forward-only img/s (best)", ""),
                         row.get("end-to-end img/s (best)", ""),
                         row.get("ratio (median per round)", ""),
                         row.get("GPU util fwd / e2e %", "-"),
                         _fmt(u.get("util_mean")), _fmt(u.get("util_max")),
                         _fmt(u.get("mem_max_mib"))])
    return rows


def _fmt(x) -> str:
    return "-" if x is None else (f"{x:.0f}" if isinstance(x, float) else str(x))


def write_summary(path: Path, env: dict, results: list[dict], sampler: UtilSampler,
                  args, wall: float) -> str:
    L = []
    L.append(f"# gpu_suite ({'quick, CPU' if args.quick else 'full'}): {env['date']}")
    L.append("")
    L.append(f"- card: {env.get('gpu')} · driver {env.get('driver', '-')} · CUDA (driver) "
             f"{env.get('driver_cuda', '-')} · memory {env.get('gpu_memory', '-')} · compute "
             f"capability {env.get('compute_cap', '-')}")
    L.append(f"- torch {env['torch']} (CUDA {env['torch_cuda']}) · detectron2 "
             f"{env['detectron2']} · transformers {env['transformers']} · numpy "
             f"{env['numpy']} · Python {env['python']} · {env['host_cpus']} CPUs · "
             f"device {env['device']} · vlkd {env['git'][:12]}")
    L.append(f"- utilisation: {sampler.source}, every 200 ms, per step: mean / max %, peak "
             f"memory MiB · {wall:.0f} s in all, budget {args.budget:.0f} s")
    L.append("")
    L.append("| step | status | wall s | util mean % | util max % | mem max MiB | power W | "
             "note |")
    L.append("|---|---|---:|---:|---:|---:|---:|---|")
    for r in results:
        u = r.get("util", {})
        note = "; ".join(x for x in (r.get("why", ""), r.get("note", "")) if x)
        L.append(f"| {r['name']} | {r['status']} | {r.get('wall_s', '-')} | "
                 f"{_fmt(u.get('util_mean'))} | {_fmt(u.get('util_max'))} | "
                 f"{_fmt(u.get('mem_max_mib'))} | {_fmt(u.get('power_mean_w'))} | {note} |")
    ck = checks(results)
    if ck:
        L += ["", "| check | value | verdict |", "|---|---|---|"]
        L += [f"| {a} | {b} | {c} |" for a, b, c in ck]
    ex = extract_rows(results)
    if ex:
        L += ["", "teacher-features (extract_throughput.py --teacher-only): detection s/img "
              "fwd / e2e, teacher-features img/s, GPU utilisation during the row's "
              "teacher-features runs (the benchmark's) and during the whole step", "",
              "| precision | batch | model | input | detection s/img fwd / e2e (images) | "
              "tf fwd img/s | tf e2e img/s | e2e ÷ fwd | tf util fwd / e2e % | step util "
              "mean % | step util max % | mem MiB |",
              "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        L += ["| " + " | ".join(row) + " |" for row in ex]
    for r in results:
        if "rc" in r and r.get("stdout", "").strip():
            u = r.get("util", {})
            L += ["", f"## {r['name']} ({r['status']}, {r.get('wall_s')} s; util mean "
                  f"{_fmt(u.get('util_mean'))} % / max {_fmt(u.get('util_max'))} %, mem "
                  f"{_fmt(u.get('mem_max_mib'))} MiB)", "", "```", r["stdout"].rstrip(), "```"]
        if r["status"] == "failed":
            L += ["", "stderr (end):", "", "```", r.get("stderr_tail", "").rstrip()[-1500:],
                  "```"]
    text = "\n".join(L) + "\n"
    path.write_text(text)
    return text


# ----------------------------------------------------------------------------- AMP check
def amp_child(args) -> int:
    """The AMP correctness run (step 1); writes its numbers to ``args.amp_child`` (JSON)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks.distill_step import DEFAULT_RECIPE, make_batch
    from vlkd.train.losses import LossCombiner
    from vlkd.train.model import VLConfig, VLModel

    dev = torch.device(args.device)
    paper = args.size == "paper"
    s_name, t_name = ("student", "teacher") if paper else ("tiny", "tiny-teacher")
    bsz, n_text, n_regions = (64, 40, 50) if paper else (4, 20, 20)
    steps, n_batches = args.steps, 5
    if dev.type == "cpu":
        torch.set_num_threads(1)        # as the other benchmarks: steady on a shared machine
    torch.manual_seed(0)
    s_cfg = VLConfig.preset(s_name, heads=("mlm",))
    t_cfg = VLConfig.preset(t_name, heads=("mlm",))
    student0 = VLModel(s_cfg)
    teacher = VLModel(t_cfg).eval().to(dev)
    for p in teacher.parameters():
        p.requires_grad_(False)
    init = copy.deepcopy(student0.state_dict())
    losses_cfg = {
        "task": {"type": "masked_token_ce", "params": {"label_smoothing": 0.1}},
        "attention": {"type": "attention_mse", "weight": 1.0},
        "hidden": {"type": "hidden_infonce", "weight": 1.0,
                   "params": {"queue_size": 4096, "temperature": 0.07,
                              **(DEFAULT_RECIPE if paper else {})}},
    }
    batches = []
    for k in range(n_batches):
        b = make_batch(s_cfg, bsz, n_text, n_regions, seed=k)
        batches.append({key: v.to(dev) for key, v in b.items()})
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    runs = {}
    for name, dtype in dtypes.items():
        torch.manual_seed(1)            # the same loss projections in every run
        student = VLModel(s_cfg)
        student.load_state_dict(init)
        student.to(dev).train()
        combiner = LossCombiner.from_config(copy.deepcopy(losses_cfg), s_cfg, t_cfg).to(dev)
        combiner.train()
        params = list(student.parameters()) + list(combiner.parameters())
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
        # as vlkd.train.trainer.Trainer: a scaler for fp16 only
        scaler = torch.amp.GradScaler(dev.type, enabled=dtype is torch.float16)
        flags = combiner.output_flags()
        torch.manual_seed(2)            # the same dropout masks in every run
        total_hist, terms_hist, times, skipped = [], [], [], 0
        for i in range(steps):
            batch = batches[i % n_batches]
            sync()
            t0 = time.perf_counter()
            ctx = (torch.autocast(dev.type, dtype=dtype) if dtype is not None
                   else contextlib.nullcontext())
            with ctx:
                with torch.no_grad():
                    t_out = teacher(batch, task="caption", **flags)
                s_out = student(batch, task="caption", **flags)
                total, terms = combiner(s_out, t_out, batch)
            scaler.scale(total).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            before = scaler.get_scale() if scaler.is_enabled() else None
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sync()
            times.append(time.perf_counter() - t0)
            if before is not None and scaler.get_scale() < before:
                skipped += 1            # inf/nan gradients: the scaler skipped this step
            total_hist.append(float(total.detach()))
            terms_hist.append({k: float(torch.as_tensor(v).detach()) for k, v in terms.items()})
        steady = times[min(10, steps - 1):]
        ms = statistics.median(steady) * 1e3
        runs[name] = {"total": total_hist, "terms": terms_hist, "ms_per_step": ms,
                      "samples_per_s": bsz / (ms / 1e3), "skipped_steps": skipped}
        del student, combiner, opt
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    ref = runs["fp32"]["total"]
    compare = {}
    for name in ("bf16", "fp16"):
        got = runs[name]["total"]
        finite = all(math.isfinite(x) for x in got)
        first = abs(got[0] - ref[0]) / abs(ref[0])
        m_ref, m_got = statistics.fmean(ref[-10:]), statistics.fmean(got[-10:])
        last = abs(m_got - m_ref) / abs(m_ref)
        ok = finite and first <= TOL_FIRST[name] and last <= TOL_LAST
        compare[name] = {"finite": finite, "first_rel": first, "last_rel": last,
                         "tol_first": TOL_FIRST[name], "tol_last": TOL_LAST, "ok": ok}
    out = {"setup": f"{s_name}/{t_name}", "batch": bsz, "tokens": n_text + n_regions,
           "steps": steps, "device": str(dev), "queue": 4096, "lr": 1e-4, "runs": runs,
           "compare": compare,
           "device_name": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"}
    Path(args.amp_child).write_text(json.dumps(out))
    print(f"amp check: {steps} distill steps, {s_name} ({s_cfg.num_layers}L/"
          f"{s_cfg.hidden_size}) from {t_name} ({t_cfg.num_layers}L/{t_cfg.hidden_size}), "
          f"batch {bsz}, {n_text}+{n_regions} tokens, K = 4096, AdamW 1e-4, clip 1.0, "
          f"{out['device_name']}, torch {torch.__version__}")
    print()
    print("| precision | loss step 1 | loss, mean of last 10 | Δ step 1 | Δ last 10 | finite | "
          "scaler-skipped steps | ms/step (median) | samples/s | verdict |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|---|")
    for name, r in runs.items():
        c = compare.get(name)
        verdict = "reference" if c is None else ("ok" if c["ok"] else "MISSED")
        d1 = "-" if c is None else f"{c['first_rel']:.2e} (≤ {c['tol_first']})"
        d2 = "-" if c is None else f"{c['last_rel']:.2e} (≤ {c['tol_last']})"
        fin = all(math.isfinite(x) for x in r["total"])
        print(f"| {name} | {r['total'][0]:.4f} | {statistics.fmean(r['total'][-10:]):.4f} | "
              f"{d1} | {d2} | {fin} | {r['skipped_steps']} | {r['ms_per_step']:.1f} | "
              f"{r['samples_per_s']:,.1f} | {verdict} |")
    return 0 if all(c["ok"] for c in compare.values()) else 1


# ----------------------------------------------------------------------------- wheels
#: What a bare GPU machine with torch, transformers, h5py, ... lacks for these benchmarks, at
#: requirements.lock's versions (pycocoevalcap, ~100 MB, is not needed: no captioning metric
#: runs here).
DEVICE_WHEELS = ["fvcore", "iopath", "yacs", "termcolor", "omegaconf", "antlr4-python3-runtime",
                 "zarr", "numcodecs", "donfig", "google-crc32c", "pycocotools"]


def fetch_wheels(dest: Path, python: str = "3.12") -> int:
    """Downloads :data:`DEVICE_WHEELS` (+ the retagged detectron2 snapshot) for CPython
    ``python`` on manylinux x86-64 into ``dest`` (an sdist where a package has no wheel)."""
    lock = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            n, _, v = line.partition("==")
            lock[n.lower()] = v
    install = (ROOT / "scripts" / "install.sh").read_text()
    d2 = re.search(r'D2_PYPI_PIN="([^"]+)"', install).group(1)
    dest.mkdir(parents=True, exist_ok=True)
    pip = [PY, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest)]
    plat = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
    for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
              "manylinux2014_x86_64", "manylinux1_x86_64"):
        plat += ["--platform", p]
    for name in DEVICE_WHEELS:
        spec = f"{name}=={lock[name.lower()]}"
        if subprocess.run(pip + plat + [spec], capture_output=True).returncode != 0:
            subprocess.run(pip + ["--no-binary=:all:", spec], check=True)  # no wheel: sdist
    # the snapshot's only wheel is cp310: retag it as install.sh does
    tmp = Path(tempfile.mkdtemp())
    subprocess.run(pip[:-1] + [str(tmp), "--only-binary=:all:", "--python-version", "3.10", d2],
                   check=True)
    for whl in tmp.glob("*.whl"):
        shutil.move(str(whl), dest / re.sub(r"-[^-]+-[^-]+-[^-]+\.whl$", "-py3-none-any.whl",
                                            whl.name))
    size = sum(f.stat().st_size for f in dest.iterdir()) / 2 ** 20
    print(f"{len(list(dest.iterdir()))} files, {size:.1f} MiB in {dest}")
    return 0


# ------------------------------------------------------------------------------------ main
def dry_run_summary(steps: list[Step], args) -> str:
    """What runs within ``--budget`` if every step takes its estimate, and the device time."""
    run, skipped, used = budget_plan(steps, args.budget)
    blocked = [s for s in steps if s.params.get("missing")]
    L = [f"plan: {len(steps)} steps; at their estimates {len(run)} run in {used:.0f} s of "
         f"--budget {args.budget:.0f} s:"]
    L += [f"  {s.estimate_s:>4.0f} s  {s.name}" + (f"  ({s.note})" if s.note else "")
          for s in run]
    if skipped:
        L.append("skipped unless the steps before run faster than estimated (the budget counts "
                 "real time): " + ", ".join(s.name for s in skipped))
    if blocked:
        L.append("blocked (options missing): " + ", ".join(
            f"{s.name} ({', '.join(s.params['missing'])})" for s in blocked))
    L.append(f"device time: about {used + OVERHEAD_S:.0f} s ({used:.0f} s of steps + "
             f"~{OVERHEAD_S} s for the card probe and, on a bare machine, the wheels' install); "
             f"at most ~{args.budget + OVERHEAD_S:.0f} s plus the overrun of the last step")
    return "\n".join(L)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the same steps, tiny, on CPU")
    ap.add_argument("--device", default=None, help="cuda (default) or cpu (--quick: cpu)")
    ap.add_argument("--out", default=None, help="output folder (default $OUT, else "
                    "bench-out/gpu; --quick: bench-out/gpu-quick)")
    ap.add_argument("--budget", type=float, default=300, help="seconds for all steps")
    ap.add_argument("--only", default="", help="comma-separated groups: amp, distill_step, "
                    "extract, loader")
    ap.add_argument("--dry-run", action="store_true", help="print the plan as JSON; run nothing")
    ap.add_argument("--fetch-wheels", metavar="DIR", help="download the wheels a bare GPU "
                    "machine lacks (CPython 3.12, manylinux x86-64) and exit")
    ap.add_argument("--amp-child", metavar="JSON", help=argparse.SUPPRESS)
    ap.add_argument("--size", default="paper", choices=["paper", "tiny"], help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=50, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.device = args.device or ("cpu" if args.quick else "cuda")
    if args.amp_child:
        return amp_child(args)
    if args.fetch_wheels:
        return fetch_wheels(Path(args.fetch_wheels))

    with tempfile.TemporaryDirectory(prefix="vlkd-gpu-suite-") as tmp:
        args.work = Path(tmp)
        steps = plan(args)
        if args.only:
            groups = set(args.only.split(","))
            steps = [s for s in steps if s.group in groups]
        if args.dry_run:
            print(json.dumps([asdict(s) for s in steps], indent=1))
            print(dry_run_summary(steps, args), file=sys.stderr)
            return 0
        import torch
        if args.device == "cuda" and not torch.cuda.is_available():
            print("gpu_suite: no CUDA device here; use --quick for the CPU run", file=sys.stderr)
            return 2
        out = Path(args.out or os.environ.get("OUT") or
                   ROOT / "bench-out" / ("gpu-quick" if args.quick else "gpu"))
        out.mkdir(parents=True, exist_ok=True)
        env, smi = probe_environment(args.device)
        (out / "nvidia-smi.txt").write_text(smi or "nvidia-smi not found\n")
        print(f"[gpu_suite] {env.get('gpu')} · torch {env['torch']} · {len(steps)} steps, "
              f"budget {args.budget:.0f} s · output {out}", flush=True)
        t0 = time.time()
        with UtilSampler(gpu=nvidia_smi_id(0)) as sampler, open(out / "steps.log", "w") as log:
            results = run_steps(steps, args, sampler, log)
        wall = time.time() - t0
        with open(out / "util.csv", "w") as f:
            f.write(f"# {sampler.source}: unix time, util %, memory MiB, power W, sm MHz\n")
            f.writelines(",".join("" if v is None else f"{v:.3f}" if i == 0 else f"{v:g}"
                                  for i, v in enumerate(x)) + "\n" for x in sampler.samples)
        (out / "results.json").write_text(json.dumps(
            {"env": env, "util_source": sampler.source, "budget_s": args.budget,
             "wall_s": wall, "quick": args.quick, "steps": results}, indent=1))
        print()
        print(write_summary(out / "summary.md", env, results, sampler, args, wall))
        bad = [r["name"] for r in results if r["status"] == "failed"]
        return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
