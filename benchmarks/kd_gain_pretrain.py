"""``kd_gain.py --stage pretrain``: the KD gain of pre-training-stage distillation on the
embedded synthetic world (DistillVLM distils in VL pre-training and in fine-tuning). A helper
of benchmarks/kd_gain.py, not a benchmark of its own.

On the demo's world (data, detectors, region sets and tokenizer, built or reused like the
demo's), the two-stage recipe of docs/TRAIN.md:

1. the teacher (``models.teacher``) pre-trained on its own boxes (``--task pretrain``: masked
   tokens over text and tags + the contrastive loss, over the training captions) for
   ``steps.teacher`` steps, then VTA-adapted in pre-training on its features pooled over the
   student's boxes for ``steps.teacher_adapt`` steps;
2. for every seed, the student (``models.student``) pre-trained ``steps.student`` steps twice
   from the same initialisation and data order: with KD from that teacher (``vlkd-train distill
   --task pretrain`` with the demo's ``distill_losses``) and without (``finetune --task
   pretrain``);
3. each pre-trained student fine-tuned for captioning ``steps.student`` steps the same way:
   ``plain`` (``finetune``) and/or ``kd`` (``distill`` from the demo's caption teacher adapted
   to the student's boxes, the one of the fine-tuning-stage table), with the demo's training
   settings;
4. every fine-tuned student scored on the test split (``vlkd-train evaluate``, CIDEr).

The gain is (pre-trained with KD, then fine-tuned) minus (pre-trained without KD, then
fine-tuned the same way), per seed. Pre-training uses Oscar's masking (15 % of the text and the
tag tokens, tags swapped with probability 0.5): the demo's ``task.*`` settings are captioning's
(40 % of a caption's tokens, at most 6) and are left out of the pre-training runs only. Nothing
is tuned on the KD runs. Only the stages these runs need are run (not the demo's VQA, students,
pictures or latency); they are reused from and by the demo's own output folder.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

#: The fine-tuning modes (``--finetune``).
FINETUNES = ("plain", "kd")


def _sets(keys: dict) -> list[str]:
    return [a for k, v in keys.items() for a in ("--set", f"{k}={v}")]


def plan(demo, seeds: list[int], finetunes: tuple[str, ...]) -> dict:
    """Adds the pre-training stages to a planned :class:`~vlkd.demo.pipeline.Demo`; returns
    ``{(seed, pretrain, finetune): evaluation folder}`` (pretrain ``kd`` / ``base``)."""
    from vlkd.demo.pipeline import BIN

    s, P, m = demo.scale, demo.paths, demo.cfg.models
    tr = str(BIN / "vlkd-train")
    reg, runs = P["reg"], P["runs"]
    train = dict(demo.cfg.train)
    pre_train = {k: v for k, v in train.items() if not k.startswith("task.")}
    demo_seed = int(demo.size["data"]["seed"])

    def pre_args(seed: int) -> list[str]:
        return ["--task", "pretrain", "--tokenizer", str(P["tok"]), "--batch-size",
                str(s.batch_size), "--seed", str(seed), "--captions", str(P["karpathy"]),
                "--split", "train", *_sets(pre_train)]

    t_own, t_vta = runs / "teacher-pre-own", runs / "teacher-pre-vta"
    own = demo.stage("pretrain: teacher on its own boxes", [
        tr, "finetune", "--model", m.teacher, "--regions", str(reg / "teacher-own"),
        "--max-steps", str(s.steps.teacher), "--output-dir", str(t_own), *pre_args(demo_seed)],
        t_own, after=("proposals-teacher", "tokenizer"))
    vta = demo.stage("pretrain: teacher adapted to student boxes (VTA)", [
        tr, "finetune", "--model", str(demo.model_dir(t_own)), "--regions",
        str(reg / "teacher-vta"), "--max-steps", str(s.steps.teacher_adapt), "--output-dir",
        str(t_vta), *pre_args(demo_seed)], t_vta, after=(own, "teacher-features"))
    out = {}
    for seed in seeds:
        sfx = "" if seed == demo_seed else f"-seed{seed}"
        pre = {}
        for kind in ("kd", "base"):
            run = runs / f"student-pre-{kind}{sfx}"
            common = ["--max-steps", str(s.steps.student), "--output-dir", str(run),
                      *pre_args(seed)]
            if kind == "kd":
                pre[kind] = demo.stage(f"pretrain: student with KD{sfx}", [
                    tr, "distill", "--teacher", str(demo.model_dir(t_vta)), "--student",
                    m.student, "--student-regions", str(reg / "student"), "--teacher-regions",
                    str(reg / "teacher-vta"), *common, *_sets(demo.cfg.distill_losses)], run,
                    after=(vta,))
            else:
                pre[kind] = demo.stage(f"pretrain: student without KD{sfx}", [
                    tr, "finetune", "--model", m.student, "--regions", str(reg / "student"),
                    *common], run, after=("tokenizer",))
        for kind in ("kd", "base"):
            start = demo.model_dir(runs / f"student-pre-{kind}{sfx}")
            for ft in finetunes:
                key = f"student-pre-{kind}-ft-{ft}{sfx}"
                run = runs / f"{key}-caption"
                args = ["--max-steps", str(s.steps.student), "--output-dir", str(run),
                        *demo._train_args("caption", seed)]
                if ft == "kd":
                    teacher = "caption: teacher adapted to student boxes (VTA)"
                    trained = demo.stage(f"pretrain: {key}", [
                        tr, "distill", "--teacher",
                        str(demo.model_dir(runs / "teacher-vta-caption")), "--student",
                        str(start), "--student-regions", str(reg / "student"),
                        "--teacher-regions", str(reg / "teacher-vta"), *args,
                        *_sets(demo.cfg.distill_losses)], run, after=(pre[kind], teacher))
                else:
                    trained = demo.stage(f"pretrain: {key}", [
                        tr, "finetune", "--model", str(start), "--regions",
                        str(reg / "student"), *args], run, after=(pre[kind],))
                demo.evaluate("caption", key, run, reg / "student", trained)
                out[(seed, kind, ft)] = P["evals"] / f"{key}-caption"
    return out


def keep_only_what(demo, wanted: set[str]) -> None:
    """Drops the planned stages that the ``wanted`` ones do not need."""
    by_name = {st.name: st for st in demo.log}
    need, todo = set(), list(wanted)
    while todo:
        name = todo.pop()
        if name not in need:
            need.add(name)
            todo.extend(by_name[name].after)
    demo.log[:] = [st for st in demo.log if st.name in need]


def run(out: Path, quick: bool, seeds: list[int], jobs: int, config: Path | None,
        finetunes: tuple[str, ...]) -> dict:
    import json

    from vlkd.demo.pipeline import Demo

    demo = Demo(out, quick=quick, jobs=jobs, config=config)
    demo.plan()
    if "caption" not in demo.cfg.tasks:
        raise RuntimeError("--stage pretrain measures captioning: the demo config's tasks "
                           "must include caption")
    evals = plan(demo, seeds, finetunes)
    keep_only_what(demo, {st.name for st in demo.log
                          if st.name.startswith("caption: evaluate student-pre-")})
    t0 = time.time()
    demo.execute()
    res = {"size": "quick" if quick else "full", "seeds": seeds, "finetunes": list(finetunes),
           "steps": dict(demo.size["steps"]), "batch_size": demo.size["batch_size"],
           "distill_losses": demo.raw.get("distill_losses", {}),
           "seconds": round(time.time() - t0, 1),
           "stages_run": sum(not st.skipped for st in demo.log),
           "stages_reused": sum(st.skipped for st in demo.log), "rows": {}}
    for ft in finetunes:
        rows = []
        for seed in seeds:
            score = {kind: 100.0 * float(json.loads(
                (evals[(seed, kind, ft)] / "scores.json").read_text())["CIDEr"])
                for kind in ("kd", "base")}
            rows.append({"seed": seed, "base": score["base"], "kd": score["kd"],
                         "gain": score["kd"] - score["base"]})
        gains = [r["gain"] for r in rows]
        res["rows"][ft] = {"rows": rows,
                           "mean_base": statistics.fmean(r["base"] for r in rows),
                           "mean_kd": statistics.fmean(r["kd"] for r in rows),
                           "mean_gain": statistics.fmean(gains),
                           "std_gain": statistics.stdev(gains) if len(gains) > 1
                           else float("nan"),
                           "wins": sum(g > 0 for g in gains)}
    return res


def table(res: dict) -> str:
    st = res["steps"]
    lines = [f"# kd_gain --stage pretrain ({res['size']}): teacher pre-trained {st['teacher']} "
             f"+ VTA {st['teacher_adapt']} steps; students pre-trained {st['student']} steps "
             f"then fine-tuned {st['student']} steps for captioning, batch {res['batch_size']}, "
             f"seeds {res['seeds']}; KD terms {res['distill_losses']}; "
             f"{res['seconds']:.0f} s ({res['stages_run']} stages run, "
             f"{res['stages_reused']} finished before)",
             "| fine-tuning | seed | pre-trained without KD | pre-trained with KD | gain | "
             "ratio |", "|---|---|---|---|---|---|"]
    verdicts = []
    for ft, t in res["rows"].items():
        name = "with KD" if ft == "kd" else "without KD"
        for r in t["rows"]:
            ratio = r["kd"] / r["base"] if r["base"] else float("nan")
            lines.append(f"| {name} | {r['seed']} | {r['base']:.2f} | {r['kd']:.2f} | "
                         f"{r['gain']:+.2f} | {ratio:.3f} |")
        ratio = t["mean_kd"] / t["mean_base"] if t["mean_base"] else float("nan")
        lines.append(f"| {name} | mean | {t['mean_base']:.2f} | {t['mean_kd']:.2f} | "
                     f"{t['mean_gain']:+.2f} ± {t['std_gain']:.2f} | {ratio:.3f} |")
        verdicts.append(f"fine-tuned {name}: pre-training KD "
                        f"{'helps' if t['mean_gain'] > 0 else 'does not help'} on average "
                        f"({t['wins']}/{len(t['rows'])} seeds better)")
    lines.append("# captioning CIDEr x 100 on the test split; " + "; ".join(verdicts))
    return "\n".join(lines)


def main(args, seeds: list[int]) -> int:
    """``kd_gain.py --stage pretrain``: runs, prints the table, writes it beside the JSON."""
    import json
    import sys

    finetunes = tuple(f.strip() for f in args.finetune.split(",") if f.strip())
    bad = [f for f in finetunes if f not in FINETUNES]
    if bad or not finetunes:
        print(f"kd_gain: --finetune: give plain, kd or plain,kd, not {args.finetune!r}",
              file=sys.stderr)
        return 2
    if args.variant or args.tasks:
        print("kd_gain: --stage pretrain takes no --variant / --tasks (captioning only)",
              file=sys.stderr)
        return 2
    try:
        res = run(args.out, args.quick, seeds, args.jobs, args.config, finetunes)
    except RuntimeError as e:
        print(f"kd_gain: {e}", file=sys.stderr)
        return 1
    text = table(res)
    (args.out / "kd_gain_pretrain.json").write_text(json.dumps(res, indent=2))
    (args.out / "kd_gain_pretrain.md").write_text(text + "\n")
    print(text)
    return 0
