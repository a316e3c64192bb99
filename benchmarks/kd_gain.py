"""KD gain and VTA effect on the embedded synthetic benchmark, over several seeds:
DistillVLM's two claims, distilled minus non-distilled student, and aligned minus unaligned
teacher adaptation.

The demo (``vlkd-demo``) builds the world once: data, both detectors, the three region sets,
the tokenizer and, per task, the teacher fine-tuned on its own boxes. Then, for every seed:

- **KD**: the student trained twice from the same initialisation and data order, with the same
  steps, batch size and learning-rate schedule: ``vlkd-train finetune`` (task loss only) and
  ``vlkd-train distill`` with the demo's KD terms (``distill_losses`` in
  ``configs/demo/demo.yaml``: attention-distribution MSE + token-wise hidden-state InfoNCE with
  a queue) from the frozen VTA teacher of the demo's own seed. The seed changes the student's
  initialisation and batch order.
- **VTA**: the teacher trained on its own boxes is trained ``teacher_adapt`` more steps twice,
  from the same weights, with the same seed and schedule: on the student's boxes (Visual Token
  Alignment) and, the control, on its own boxes; both are scored on the student's boxes. Their
  difference is what the boxes of the extra steps do, with the extra training itself taken
  out. The seed changes these two runs' data order (and dropout); the starting teacher is the
  same for every seed.

Everything is scored on the test split by ``vlkd-train evaluate`` (CIDEr with pycocoevalcap,
VQA accuracy with the official metric). The table prints each seed, the mean and sample
standard deviation of the difference, how many seeds agree in sign, and the ratio. There is
no target: the numbers are what they are (benchmarks/README.md). The table is also written
to ``<out>/kd_gain.md`` and ``<out>/kd_gain.json``, which the demo's report links; the report
is rewritten at the end.

Ablations: ``--variant NAME:KEY=VALUE[,...]`` (repeatable) also distils every seed with
``distill_losses`` changed, e.g. ``no-attn:losses.attention.weight=0``,
``no-hidden:losses.hidden.weight=0``, ``mse:losses.hidden.type=hidden_mse``,
``queue4096:losses.hidden.params.queue_size=4096``; each is compared with the same baselines.

Run: ``python benchmarks/kd_gain.py`` (full demo size, ``--out bench-out/kd_gain``; finished
stages are reused, so the demo's own output works: ``--out demo-out``) or ``--quick``.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from vlkd.common.machine import describe
from vlkd.demo.pipeline import Demo

METRICS = {"caption": ("CIDEr", 100.0), "vqa": ("accuracy", 1.0)}


def _score(path: Path, task: str) -> float:
    key, scale = METRICS[task]
    sc = json.loads(path.read_text())
    return float(sc[key]) * scale


def parse_variant(spec: str) -> tuple[str, dict]:
    """``NAME:KEY=VALUE[,KEY=VALUE...]`` → (name, {key: value}); values are YAML scalars."""
    import yaml

    name, sep, rest = spec.partition(":")
    pairs = [kv.partition("=") for kv in rest.split(",") if kv.strip()]
    if not sep or not name.strip() or not pairs or any(not eq or not k.strip()
                                                       for k, eq, _ in pairs):
        raise ValueError(f"--variant {spec!r}: expected NAME:KEY=VALUE[,KEY=VALUE...], e.g. "
                         "no-attn:losses.attention.weight=0")
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"--variant {spec!r}: the name may hold letters, digits, - and _ only")
    return name.strip(), {k.strip(): yaml.safe_load(v) for k, _, v in pairs}


def _summary(rows: list[dict], metric: str) -> dict:
    diffs = [r["gain"] for r in rows]
    return {"metric": metric, "rows": rows,
            "mean_base": statistics.fmean(r["base"] for r in rows),
            "mean_kd": statistics.fmean(r["kd"] for r in rows),
            "mean_gain": statistics.fmean(diffs),
            "std_gain": statistics.stdev(diffs) if len(diffs) > 1 else float("nan"),
            "wins": sum(g > 0 for g in diffs)}


def run(out: Path, quick: bool, seeds: list[int], jobs: int, config: Path | None,
        variants: dict[str, dict] | None = None, tasks: list[str] | None = None,
        vta: bool = True) -> dict:
    demo = Demo(out, quick=quick, jobs=jobs, config=config)
    demo.plan()
    demo_seed = int(demo.size["data"]["seed"])
    tasks = tasks or demo.raw["tasks"]
    missing = [t for t in tasks if t not in demo.raw["tasks"]]
    if missing:
        raise RuntimeError(f"--tasks {','.join(missing)}: not among the demo config's tasks "
                           f"{demo.raw['tasks']}")
    variants = {"KD": {}, **(variants or {})}
    seed_sfx = lambda seed: "" if seed == demo_seed else f"-seed{seed}"  # noqa: E731
    sfx = lambda name, seed: ("" if name == "KD" else f"-{name}") + seed_sfx(seed)  # noqa: E731
    for task in tasks:
        for seed in seeds:
            if seed != demo_seed:
                demo.add_students(task, seed, sfx("KD", seed))
                if vta:
                    demo.add_teacher_pair(task, seed, seed_sfx(seed))
            for name, sets in variants.items():
                if name != "KD":
                    demo.add_student(task, seed, sfx(name, seed), kd=True, kd_sets=sets)
    t0 = time.time()
    demo.execute()
    res: dict = {"size": "quick" if quick else "full", "seeds": seeds,
                 "steps": demo.size["steps"]["student"],
                 "adapt_steps": demo.size["steps"]["teacher_adapt"],
                 "batch_size": demo.size["batch_size"],
                 "distill_losses": demo.raw.get("distill_losses", {}), "variants": variants,
                 "seconds": round(time.time() - t0, 1), "machine": describe(),
                 "threads": demo.cfg.threads, "jobs": demo.jobs,
                 "stages_run": sum(not st.skipped for st in demo.log),
                 "stages_reused": sum(st.skipped for st in demo.log), "tasks": {}}
    ev = demo.paths["evals"]
    for task in tasks:
        res["tasks"][task] = {}
        score = lambda key: _score(ev / f"{key}-{task}" / "scores.json", task)  # noqa: E731
        base = {seed: score(f"student-base{sfx('KD', seed)}") for seed in seeds}
        for name in variants:
            rows = []
            for seed in seeds:
                kd = score(f"student-kd{sfx(name, seed)}")
                rows.append({"seed": seed, "base": base[seed], "kd": kd, "gain": kd - base[seed]})
            res["tasks"][task][name] = _summary(rows, METRICS[task][0])
        if vta:
            rows = []
            for seed in seeds:
                ctrl = score(f"teacher-ctrl{seed_sfx(seed)}-on-student-boxes")
                adapted = score(f"teacher-vta{seed_sfx(seed)}")
                rows.append({"seed": seed, "base": ctrl, "kd": adapted, "gain": adapted - ctrl})
            res["tasks"][task]["VTA"] = _summary(rows, METRICS[task][0])
    return res


#: What each comparison's two columns are.
COLUMNS = {"VTA": ("teacher + steps on own boxes (control)", "teacher + steps on student boxes"),
           None: ("student (no KD)", "student (KD)")}


def table(res: dict) -> str:
    """The printed table: a header line, one row a seed and a mean row per comparison, then
    one verdict line with each comparison's mean ± sd, n and how many seeds agree in sign."""
    lines = [f"# kd_gain ({res['size']}): student {res['steps']} steps, VTA/control "
             f"{res.get('adapt_steps', '?')} steps, batch {res['batch_size']}, seeds "
             f"{res['seeds']}; KD terms {res['distill_losses']}; {res['seconds']:.0f} s "
             f"({res['stages_run']} stages run, {res['stages_reused']} finished before) on "
             f"{res.get('machine', '?')}, {res.get('jobs', '?')} stages at a time, "
             f"{res.get('threads', '?')} thread(s) each",
             "| task | metric | comparison | seed | without | with | difference | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for task, by_variant in res["tasks"].items():
        name = "CIDEr" if task == "caption" else "VQA acc."
        for variant, t in by_variant.items():
            for r in t["rows"]:
                ratio = r["kd"] / r["base"] if r["base"] else math.nan
                lines.append(f"| {task} | {name} | {variant} | {r['seed']} | {r['base']:.2f} | "
                             f"{r['kd']:.2f} | {r['gain']:+.2f} | {ratio:.3f} |")
            ratio = t["mean_kd"] / t["mean_base"] if t["mean_base"] else math.nan
            lines.append(f"| {task} | {name} | {variant} | mean | {t['mean_base']:.2f} | "
                         f"{t['mean_kd']:.2f} | {t['mean_gain']:+.2f} ± {t['std_gain']:.2f} | "
                         f"{ratio:.3f} |")
            n = len(t["rows"])
            verdicts.append(f"{task} {variant}: {t['mean_gain']:+.2f} ± {t['std_gain']:.2f} "
                            f"(n={n}; {t['wins']}/{n} seeds positive)")
    for variant, sets in res["variants"].items():
        if sets:
            lines.append(f"# {variant}: distill_losses + {sets}")
    if any("VTA" in v for v in res["tasks"].values()):
        lines.append("# KD rows: without = " + COLUMNS[None][0] + ", with = " + COLUMNS[None][1]
                     + "; VTA rows: without = " + COLUMNS["VTA"][0] + ", with = "
                     + COLUMNS["VTA"][1] + " (both read the student's boxes)")
    lines.append("# " + "; ".join(verdicts))
    return "\n".join(lines)


def write_table(res: dict, out: Path) -> Path:
    """``<out>/kd_gain.json`` and ``<out>/kd_gain.md`` (the table, as printed)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "kd_gain.json").write_text(json.dumps(res, indent=2) + "\n")
    md = out / "kd_gain.md"
    md.write_text("# kd_gain: KD gain and VTA effect over seeds\n\nWritten by "
                  "`benchmarks/kd_gain.py` (its docstring and benchmarks/README.md say what each "
                  "row compares). One machine, as stated in the header line.\n\n```\n"
                  + table(res) + "\n```\n")
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench-out/kd_gain"),
                    help="demo output folder (finished stages are reused)")
    ap.add_argument("--quick", action="store_true", help="the demo's quick size")
    ap.add_argument("--stage", choices=("finetune", "pretrain"), default="finetune",
                    help="the stage distilled: finetune, or pretrain (pre-training-stage KD, "
                         "then the same caption fine-tuning: benchmarks/kd_gain_pretrain.py)")
    ap.add_argument("--finetune", default="plain,kd", metavar="plain,kd",
                    help="--stage pretrain: how the pre-trained students are fine-tuned")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated student seeds")
    ap.add_argument("--config", type=Path, default=None,
                    help="demo config (default configs/demo/demo.yaml); for an ablation, a copy "
                         "with other distill_losses and another --out")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                    help="also distil with distill_losses changed (an ablation), e.g. "
                         "no-attn:losses.attention.weight=0 (repeatable)")
    ap.add_argument("--tasks", default="", help="comma-separated subset of the demo's tasks "
                    "(default: all; the demo itself still runs all of them)")
    ap.add_argument("--jobs", type=int, default=0, help="stages at once (0: one per core)")
    ap.add_argument("--no-vta", action="store_true", help="KD rows only (no adaptation and "
                    "control runs for the extra seeds), e.g. for ablations")
    args = ap.parse_args(argv)
    try:
        seeds = sorted({int(x) for x in args.seeds.split(",") if x.strip()})
    except ValueError:
        ap.error(f"--seeds: expected comma-separated integers such as 0,1,2, got {args.seeds!r}")
    if not seeds:
        ap.error("--seeds: give at least one seed")
    if args.stage == "pretrain":
        import kd_gain_pretrain  # beside this file

        return kd_gain_pretrain.main(args, seeds)
    try:
        variants = dict(parse_variant(v) for v in args.variant)
    except ValueError as e:
        ap.error(str(e))
    if "KD" in variants:
        ap.error("--variant: the name KD is the default recipe's; choose another")
    try:
        res = run(args.out, args.quick, seeds, args.jobs, args.config, variants,
                  [t.strip() for t in args.tasks.split(",") if t.strip()], vta=not args.no_vta)
    except RuntimeError as e:
        print(f"kd_gain: {e}", file=sys.stderr)
        return 1
    write_table(res, args.out)
    print(table(res))
    _rewrite_report(args.out, args.quick, args.jobs, args.config)
    return 0


def _rewrite_report(out: Path, quick: bool, jobs: int, config: Path | None) -> None:
    """The demo's report again, now that kd_gain.md is beside it (its own stage times kept)."""
    from vlkd.demo.report import write_report

    if not (out / "report.json").is_file():
        return
    demo = Demo(out, quick=quick, jobs=jobs, config=config)
    demo.plan()
    write_report(demo, previous=json.loads((out / "report.json").read_text()))


if __name__ == "__main__":
    sys.exit(main())
