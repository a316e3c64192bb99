"""KD gain on the embedded synthetic benchmark: DistillVLM's claim, distilled minus
non-distilled student, over several seeds.

The demo (``vlkd-demo``) builds the world once: data, both detectors, the three region sets,
the tokenizer and, per task, the teacher fine-tuned on its own boxes and adapted to the
student's boxes (VTA). For every seed the student is then trained twice from the same
initialisation and data order, with the same steps, batch size and learning-rate schedule:

- baseline: ``vlkd-train finetune`` (task loss only);
- distilled: ``vlkd-train distill`` with the demo's KD terms (``distill_losses`` in
  ``configs/demo/demo.yaml``: attention-distribution MSE + token-wise hidden-state InfoNCE
  with a queue) from the frozen VTA teacher.

Both are scored on the test split by ``vlkd-train evaluate`` (CIDEr with pycocoevalcap, VQA
accuracy with the official normalisation). The seed changes the student's initialisation and
batch order; the teacher is the same for every seed. The table prints each seed, the mean
and the sample standard deviation of the gain, and the ratio distilled ÷ baseline. There is
no target: the numbers are what they are (benchmarks/README.md).

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


def run(out: Path, quick: bool, seeds: list[int], jobs: int, config: Path | None,
        variants: dict[str, dict] | None = None, tasks: list[str] | None = None) -> dict:
    demo = Demo(out, quick=quick, jobs=jobs, config=config)
    demo.plan()
    demo_seed = int(demo.size["data"]["seed"])
    tasks = tasks or demo.raw["tasks"]
    missing = [t for t in tasks if t not in demo.raw["tasks"]]
    if missing:
        raise RuntimeError(f"--tasks {','.join(missing)}: not among the demo config's tasks "
                           f"{demo.raw['tasks']}")
    variants = {"KD": {}, **(variants or {})}
    sfx = lambda name, seed: ("" if name == "KD" else f"-{name}") + (  # noqa: E731
        "" if seed == demo_seed else f"-seed{seed}")
    for task in tasks:
        for seed in seeds:
            if seed != demo_seed:
                demo.add_students(task, seed, sfx("KD", seed))
            for name, sets in variants.items():
                if name != "KD":
                    demo.add_student(task, seed, sfx(name, seed), kd=True, kd_sets=sets)
    t0 = time.time()
    demo.execute()
    res: dict = {"size": "quick" if quick else "full", "seeds": seeds,
                 "steps": demo.size["steps"]["student"], "batch_size": demo.size["batch_size"],
                 "distill_losses": demo.raw.get("distill_losses", {}), "variants": variants,
                 "seconds": round(time.time() - t0, 1),
                 "stages_run": sum(not st.skipped for st in demo.log),
                 "stages_reused": sum(st.skipped for st in demo.log), "tasks": {}}
    ev = demo.paths["evals"]
    for task in tasks:
        res["tasks"][task] = {}
        base = {seed: _score(ev / f"student-base{sfx('KD', seed)}-{task}" / "scores.json", task)
                for seed in seeds}
        for name in variants:
            rows = []
            for seed in seeds:
                kd = _score(ev / f"student-kd{sfx(name, seed)}-{task}" / "scores.json", task)
                rows.append({"seed": seed, "base": base[seed], "kd": kd, "gain": kd - base[seed]})
            gains = [r["gain"] for r in rows]
            res["tasks"][task][name] = {
                "metric": METRICS[task][0], "rows": rows,
                "mean_base": statistics.fmean(r["base"] for r in rows),
                "mean_kd": statistics.fmean(r["kd"] for r in rows),
                "mean_gain": statistics.fmean(gains),
                "std_gain": statistics.stdev(gains) if len(gains) > 1 else float("nan"),
                "wins": sum(g > 0 for g in gains)}
    return res


def table(res: dict) -> str:
    lines = [f"# kd_gain ({res['size']}): student {res['steps']} steps, batch {res['batch_size']}, "
             f"seeds {res['seeds']}; KD terms {res['distill_losses']}; {res['seconds']:.0f} s "
             f"({res['stages_run']} stages run, {res['stages_reused']} finished before)",
             "| task | metric | KD | seed | student (no KD) | student (KD) | gain | ratio KD/base |",
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
            verdicts.append(f"{task} {variant}: {'helps' if t['mean_gain'] > 0 else 'does not help'}"
                            f" on average ({t['wins']}/{n} seeds better)")
    for variant, sets in res["variants"].items():
        if sets:
            lines.append(f"# {variant}: distill_losses + {sets}")
    lines.append("# " + "; ".join(verdicts))
    return "\n".join(lines)


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
                  [t.strip() for t in args.tasks.split(",") if t.strip()])
    except RuntimeError as e:
        print(f"kd_gain: {e}", file=sys.stderr)
        return 1
    (args.out / "kd_gain.json").write_text(json.dumps(res, indent=2))
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
