"""report.md for the demo: detector AP, the five model settings × caption and VQA scores,
parameters and time per image; PNGs of boxes, attention maps and training curves."""
from __future__ import annotations

import json
import math
from pathlib import Path

SETTINGS = [
    ("teacher-own", "teacher, its own boxes (not aligned)"),
    ("teacher-own-on-student-boxes", "teacher on student boxes, no adaptation"),
    ("teacher-vta", "teacher on student boxes, adapted (VTA)"),
    ("student-base", "student without KD"),
    ("student-kd", "student with KD (DistillVLM)"),
]
CAPTION_KEYS = [("CIDEr", "CIDEr"), ("Bleu_4", "BLEU-4"), ("METEOR", "METEOR"),
                ("ROUGE_L", "ROUGE-L")]


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _fmt(v, scale: float = 100.0) -> str:
    if isinstance(v, (int, float)) and math.isfinite(v):
        return f"{v * scale:.1f}"
    return "n/a"


def collect(out: Path) -> dict:
    """Every number the report shows, as a dict (also written to report.json)."""
    res: dict = {"detectors": {}, "models": {}}
    for role in ("student", "teacher"):
        m = _load(out / "detectors" / role / "metrics.json")
        res["detectors"][role] = m
    for key, _ in SETTINGS:
        row: dict = {}
        for task in ("caption", "vqa"):
            sc = _load(out / "eval" / f"{key}-{task}" / "scores.json")
            if task == "caption":
                row.update({k: sc.get(k) for k, _ in CAPTION_KEYS})
            else:
                row["VQA"] = sc.get("accuracy")
                row["vqa_metric"] = sc.get("vqa_metric")   # which official version scored it
            if sc.get("num_parameters") is not None:
                row.setdefault("num_parameters", sc["num_parameters"])
            if task == "caption" and sc.get("seconds_per_sample") is not None:
                # captioning: one sample per image, beam search included
                row["seconds_per_image"] = sc["seconds_per_sample"]
        res["models"][key] = row
    res["vqa_prior"] = _vqa_prior(out)
    return res


def _vqa_prior(out: Path) -> dict | None:
    """VQA accuracy on the test split of answering by question type alone (no image, no model):
    what a VQA model must beat to show it looks at the regions."""
    ann = out / "data" / "annotations"
    paths = {sp: (ann / f"v2_OpenEnded_synthetic_{sp}_questions.json",
                  ann / f"v2_synthetic_{sp}_annotations.json") for sp in ("train", "test")}
    if not all(p.is_file() for pair in paths.values() for p in pair):
        return None
    from vlkd.data.vqa import load_vqa, question_type_prior, vqa_accuracy

    train, test = (load_vqa(*paths[sp]) for sp in ("train", "test"))
    return vqa_accuracy(question_type_prior(train, test), test)


def _curves(out: Path, png: Path) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the demo's own runs (benchmarks/kd_gain.py adds "-seed<n>" runs beside them)
    runs = sorted(p for p in (out / "runs").glob("*/metrics.jsonl") if "-seed" not in p.parent.name)
    if not runs:
        return False
    tasks = sorted({p.parent.name.rsplit("-", 1)[-1] for p in runs})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for p in runs:
            if not p.parent.name.endswith(task):
                continue
            steps, losses = [], []
            for line in p.read_text().splitlines():
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                loss = r.get("loss/task", r.get("loss"))
                if r.get("step") is not None and isinstance(loss, (int, float)):
                    steps.append(r["step"])
                    losses.append(loss)
            if steps:
                ax.plot(steps, losses, label=p.parent.name.rsplit("-", 1)[0])
        ax.set_title(f"{task}: task loss")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return True


def write_report(demo) -> Path:
    out: Path = demo.out
    res = collect(out)
    res["distill_losses"] = demo.raw.get("distill_losses", {})
    res["stages"] = [{"name": s.name, "seconds": round(s.seconds, 1), "skipped": s.skipped}
                     for s in demo.log]
    (out / "report.json").write_text(json.dumps(res, indent=1) + "\n")
    curves = _curves(out, out / "training_curves.png")
    lines = ["# vlkd demo report", "",
             f"Synthetic world, {'quick' if demo.quick else 'full'} size: "
             f"{demo.size['data']['num_train']} train / {demo.size['data']['num_test']} test "
             "images. Everything below came out of the real commands (see each stage's "
             "`stage.log`).", "",
             "## Detectors (box AP on the synthetic val split, detectron2 COCOEvaluator)", "",
             "| detector | AP | AP50 | config |", "|---|---|---|---|"]
    for role in ("student", "teacher"):
        m = res["detectors"][role]
        lines.append(f"| {role} | {_fmt(m.get('AP'), 1)} | {_fmt(m.get('AP50'), 1)} | "
                     f"configs/demo/{role}_detector.yaml |")
    lines += ["", "## Vision-language models (test split)", "",
              "| model | CIDEr | BLEU-4 | METEOR | ROUGE-L | VQA acc. | params | ms / image |",
              "|---|---|---|---|---|---|---|---|"]
    for key, label in SETTINGS:
        r = res["models"][key]
        params = r.get("num_parameters")
        spi = r.get("seconds_per_image")
        lines.append(
            f"| {label} | " + " | ".join(_fmt(r.get(k)) for k, _ in CAPTION_KEYS) +
            f" | {_fmt(r.get('VQA'), 1)} | "
            f"{f'{params / 1e6:.2f} M' if isinstance(params, (int, float)) else 'n/a'} | "
            f"{f'{spi * 1e3:.1f}' if isinstance(spi, (int, float)) else 'n/a'} |")
    prior = res.get("vqa_prior")
    if prior:
        lines.append(f"| *question-type prior (answers by question type; no image, no model)* | "
                     f"| | | | {prior['accuracy']:.1f} | | |")
    metrics = sorted({r["vqa_metric"] for r in res["models"].values() if r.get("vqa_metric")})
    if metrics:
        lines += ["", f"VQA accuracy: the official metric, version {', '.join(metrics)} "
                  "(`vqa_metric` in each scores.json; `current` is GT-Vision-Lab/VQA vqaEval.py "
                  "since a013f00, `legacy` the one before)."]
    kd, base = res["models"]["student-kd"], res["models"]["student-base"]
    if all(isinstance(x.get("CIDEr"), float) for x in (kd, base)):
        lines += ["", f"KD gain on this run: CIDEr {100 * (kd['CIDEr'] - base['CIDEr']):+.1f}, "
                  f"VQA {((kd.get('VQA') or 0) - (base.get('VQA') or 0)):+.1f} "
                  "(one seed; benchmarks/kd_gain.py averages three). KD terms (`distill_losses` "
                  "in configs/demo/demo.yaml): " + ", ".join(
                      f"`{k}: {v}`" for k, v in res["distill_losses"].items()) + "."]
    lines += ["", "Caption scores ×100 (pycocoevalcap). SPICE needs Stanford CoreNLP models that "
              "cannot be downloaded here; see each scores.json note.", ""]
    pngs = [("boxes.png", "Student (left) and teacher (right) boxes with their class tags on one "
             "test image"),
            ("attention.png", "Teacher vs. distilled student attention maps for one example"),
            ("training_curves.png", "Training curves")]
    lines.append("## Pictures")
    for name, cap in pngs:
        if (out / name).exists() or (name == "training_curves.png" and curves):
            lines += ["", f"![{cap}]({name})", f"*{cap}*"]
    import time

    ran = [st for st in res["stages"] if not st["skipped"]]
    lines += ["", "## Stages", "",
              f"Wall time of this run: {time.time() - demo.t0:.0f} s for {len(ran)} stages "
              f"(up to {demo.jobs} at a time on {demo.cores} cores; the seconds below overlap).",
              "", "| stage | seconds | |", "|---|---|---|"]
    for s in res["stages"]:
        lines.append(f"| {s['name']} | {s['seconds']:.0f} | {'skipped (done before)' if s['skipped'] else ''} |")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
