"""report.md for the demo: detector AP; the six model settings × caption and VQA scores; the
VQA references a model must beat (answers by question type, by question text) and accuracy
per question type; Visual Token Alignment against its control; parameters and latency
measured alone; PNGs of boxes, attention maps and training curves; each stage's time.

Every number here is one run on one machine. The spread over seeds of the two claims that
matter (KD beats no KD, aligned beats unaligned) is ``benchmarks/kd_gain.py``'s, which writes
``kd_gain.md`` / ``kd_gain.json`` into the same folder; the report links them when present.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from vlkd.common.machine import describe

SETTINGS = [
    ("teacher-own", "teacher, its own boxes (not aligned)"),
    ("teacher-own-on-student-boxes", "teacher on student boxes, no adaptation"),
    ("teacher-ctrl-on-student-boxes", "teacher + N steps on its own boxes (control), on student "
                                      "boxes"),
    ("teacher-vta", "teacher + N steps on student boxes (VTA), on student boxes"),
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


def _num(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def collect(out: Path) -> dict:
    """Every number the report shows, as a dict (also written to report.json)."""
    res: dict = {"detectors": {}, "models": {}}
    for role in ("student", "teacher"):
        m = _load(out / "detectors" / role / "metrics.json")
        res["detectors"][role] = m
    latency = _load(out / "latency" / "latency.json")
    by_run = {(r["task"], r["name"]): r for r in latency.get("rows", [])}
    for key, _ in SETTINGS:
        row: dict = {}
        for task in ("caption", "vqa"):
            sc = _load(out / "eval" / f"{key}-{task}" / "scores.json")
            if task == "caption":
                row.update({k: sc.get(k) for k, _ in CAPTION_KEYS})
            else:
                row["VQA"] = sc.get("accuracy")
                row["vqa_metric"] = sc.get("vqa_metric")   # which official version scored it
                row["vqa_per_question_type"] = sc.get("per_question_type", {})
            if sc.get("num_parameters") is not None:
                row.setdefault("num_parameters", sc["num_parameters"])
            lat = by_run.get((task, key), {})
            if _num(lat.get("ms_per_sample")):
                row[f"{task}_ms"] = lat["ms_per_sample"]
        res["models"][key] = row
    res["latency"] = latency.get("settings")
    res["pipelines"] = {}
    for role in ("student", "teacher"):
        b = _load(out / "bundles" / role / "bundle" / "bundle.json")
        if b.get("latency"):
            res["pipelines"][role] = {
                "detector_parameters": b["detector"]["num_parameters"],
                "model_parameters": b["model"]["num_parameters"],
                "model": b["model"]["source"], **b["latency"]}
    res["vqa_prior"], res["vqa_text_prior"] = _vqa_priors(out) or (None, None)
    return res


def _vqa_priors(out: Path) -> tuple[dict, dict] | None:
    """VQA accuracy on the test split of answering by question type, and by the question's
    text, alone (no image, no model): what a VQA model must beat to show it reads the
    regions. Scored on the questions the models were scored on (``eval_max_samples`` may
    keep only the first ones), read from the student's predictions; the whole split when
    there are none."""
    ann = out / "data" / "annotations"
    paths = {sp: (ann / f"v2_OpenEnded_synthetic_{sp}_questions.json",
                  ann / f"v2_synthetic_{sp}_annotations.json") for sp in ("train", "test")}
    if not all(p.is_file() for pair in paths.values() for p in pair):
        return None
    from vlkd.data.vqa import load_vqa, question_type_prior, vqa_accuracy

    train, test = (load_vqa(*paths[sp]) for sp in ("train", "test"))
    for key in ("student-base", "student-kd", "teacher-own"):
        preds = out / "eval" / f"{key}-vqa" / "predictions_vqa.json"
        if preds.is_file():
            scored = {p["question_id"] for p in json.loads(preds.read_text())}
            test = [q for q in test if q.question_id in scored]
            break
    return tuple(vqa_accuracy(question_type_prior(train, test, by=by), test)
                 for by in ("question_type", "question"))


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


def _model_table(res: dict, adapt_steps: int) -> list[str]:
    lines = ["| model | CIDEr | BLEU-4 | METEOR | ROUGE-L | VQA acc. | params | "
             "ms / image (caption) | ms / question (VQA) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, label in SETTINGS:
        r = res["models"][key]
        params = r.get("num_parameters")
        ms = [f"{r[k]:.1f}" if _num(r.get(k)) else "n/a" for k in ("caption_ms", "vqa_ms")]
        lines.append(
            f"| {label.replace('N steps', f'{adapt_steps} steps')} | " +
            " | ".join(_fmt(r.get(k)) for k, _ in CAPTION_KEYS) +
            f" | {_fmt(r.get('VQA'), 1)} | "
            f"{f'{params / 1e6:.2f} M' if _num(params) else 'n/a'} | {ms[0]} | {ms[1]} |")
    for key, what in (("vqa_prior", "question-type prior (answers by question type; no image, "
                                     "no model)"),
                      ("vqa_text_prior", "question-text prior (answers by the question's "
                                         "words; no image)")):
        if res.get(key):
            lines.append(f"| *{what}* | | | | | {res[key]['accuracy']:.1f} | | | |")
    return lines


def _per_type_table(res: dict) -> list[str]:
    """VQA accuracy per question type: where the models beat the prior, and where not."""
    prior = (res.get("vqa_prior") or {}).get("per_question_type", {})
    keys = ["teacher-own", "teacher-vta", "student-base", "student-kd"]
    types = sorted(set(prior) | {t for k in keys for t in
                                 res["models"][k].get("vqa_per_question_type") or {}})
    if not types:
        return []
    lines = ["| question type | prior | " + " | ".join(keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for t in types:
        cells = [res["models"][k].get("vqa_per_question_type", {}).get(t) for k in keys]
        lines.append(f"| {t} | {_fmt(prior.get(t), 1)} | " +
                     " | ".join(_fmt(c, 1) for c in cells) + " |")
    return lines


def _effects(res: dict, adapt_steps: int) -> list[str]:
    """This run's KD gain and VTA effect (one seed), each as a difference of two rows."""
    m = res["models"]
    out = []

    def diff(a: str, b: str, key: str, scale: float) -> str | None:
        x, y = m[a].get(key), m[b].get(key)
        return f"{scale * (x - y):+.1f}" if _num(x) and _num(y) else None

    for what, a, b in (("KD gain (student with KD − without)", "student-kd", "student-base"),
                       (f"VTA effect (adapted − control: {adapt_steps} steps on the student's "
                        "boxes vs on its own, both read on the student's boxes)",
                        "teacher-vta", "teacher-ctrl-on-student-boxes"),
                       ("misalignment cost (teacher on its own boxes − on the student's, no "
                        "adaptation)", "teacher-own", "teacher-own-on-student-boxes")):
        parts = [f"{name} {d}" for name, d in (("CIDEr", diff(a, b, "CIDEr", 100.0)),
                                               ("VQA", diff(a, b, "VQA", 1.0))) if d]
        if parts:
            out.append(f"- {what}: {', '.join(parts)}")
    return out


def write_report(demo, previous: dict | None = None) -> Path:
    """Writes ``report.md`` and ``report.json`` for a demo whose stages have run.

    Args:
        demo: the :class:`~vlkd.demo.pipeline.Demo`.
        previous: the ``report.json`` of the run when the report is written again later
            (benchmarks/kd_gain.py): its wall time and stage times are kept.
    """
    out: Path = demo.out
    res = collect(out)
    res["wall_seconds"] = round(time.time() - demo.t0, 1)
    res["distill_losses"] = demo.raw.get("distill_losses", {})
    res["stages"] = [{"name": s.name, "seconds": round(s.seconds, 1), "skipped": s.skipped}
                     for s in demo.log]
    if previous and previous.get("stages"):
        res["wall_seconds"], res["stages"] = previous["wall_seconds"], previous["stages"]
    res["machine"] = describe()
    (out / "report.json").write_text(json.dumps(res, indent=1) + "\n")
    curves = _curves(out, out / "training_curves.png")
    adapt = demo.size["steps"]["teacher_adapt"]
    lines = ["# vlkd demo report", "",
             f"Synthetic world, {'quick' if demo.quick else 'full'} size: "
             f"{demo.size['data']['num_train']} train / {demo.size['data']['num_test']} test "
             "images. Everything below came out of the real commands (see each stage's "
             f"`stage.log`) in **one run on one machine** ({res['machine']}); another machine "
             "or seed gives other numbers (float training diverges across CPUs).", ""]
    kd_md = out / "kd_gain.md"
    if kd_md.is_file():
        lines += ["**Spread over seeds**: [kd_gain.md](kd_gain.md) (and `kd_gain.json`), "
                  "written by `benchmarks/kd_gain.py`: the KD gain and the VTA effect as mean "
                  "± sd over seeds, with how many seeds agree in sign.", ""]
    else:
        lines += ["The spread over seeds of the KD gain and of the VTA effect: run "
                  f"`python benchmarks/kd_gain.py --out {out}` (reuses this run's stages; "
                  "writes kd_gain.md / kd_gain.json here, linked from this report).", ""]
    lines += ["## Detectors (box AP on the synthetic val split, detectron2 COCOEvaluator)", "",
              "| detector | AP | AP50 | config |", "|---|---|---|---|"]
    for role in ("student", "teacher"):
        m = res["detectors"][role]
        lines.append(f"| {role} | {_fmt(m.get('AP'), 1)} | {_fmt(m.get('AP50'), 1)} | "
                     f"configs/demo/{role}_detector.yaml |")
    lines += ["", "## Vision-language models (test split)", ""]
    lines += _model_table(res, adapt)
    metrics = sorted({r["vqa_metric"] for r in res["models"].values() if r.get("vqa_metric")})
    if metrics:
        lines += ["", f"VQA accuracy: the official metric, version {', '.join(metrics)} "
                  "(`vqa_metric` in each scores.json; `current` is GT-Vision-Lab/VQA vqaEval.py "
                  "since a013f00, `legacy` the one before)."]
    lat = res.get("latency")
    if lat:
        lines += ["", f"Latency: the `latency` stage, alone (no other stage ran beside it), "
                  f"{lat['threads']} thread(s), batch {lat['batch_size']}, beam "
                  f"{lat['beam_size']}, the best of {lat['repeats']} passes over the same test "
                  f"samples for every model, on {lat['cpu']} ({lat['cores']} cores); "
                  "`latency/latency.md` has the medians. Parameters: the VL model's."]
    pipes = res.get("pipelines") or {}
    if pipes:
        lines += ["", "### Deployed pipelines, end to end (caption)", "",
                  "| pipeline | detector + VL params | ms / image | decode | detector | VL "
                  "(beam search) |", "|---|---|---|---|---|---|"]
        for role, what in (("student", "student detector + student with KD"),
                           ("teacher", "teacher detector + teacher on its own boxes")):
            q = pipes.get(role)
            if q:
                params = (q["detector_parameters"] + q["model_parameters"]) / 1e6
                lines.append(f"| {what} | {params:.2f} M | {q['ms_per_image']:.1f} | "
                             f"{q['decode_ms']:.1f} | {q['detector_ms']:.1f} | "
                             f"{q['vl_ms']:.1f} |")
        if len(pipes) == 2:
            r = pipes["student"]["ms_per_image"] / pipes["teacher"]["ms_per_image"]
            lines.append(f"| *student ÷ teacher* | | {r:.2f} | | | |")
        q = next(iter(pipes.values()))
        lines += ["", "Each pipeline exported as a bundle (`vlkd-train export`, `bundles/`), "
                  "its card's measurement: read + decode, detector and VL model per image from "
                  f"the file, {q['images']} synthetic scenes (320-640 px sides), batch 1, beam "
                  f"{q.get('beam_size')}, the fastest of {q['repeats']} passes, "
                  f"{q['threads']} thread(s), {q['device']}, alone (nothing ran beside it)."]
    effects = _effects(res, adapt)
    if effects:
        lines += ["", "This run (one seed; kd_gain gives the spread over seeds):"] + effects
        lines.append("- KD terms (`distill_losses` in configs/demo/demo.yaml): " + ", ".join(
            f"`{k}: {v}`" for k, v in res["distill_losses"].items()) + ".")
    per_type = _per_type_table(res)
    if per_type:
        lines += ["", "### VQA accuracy per question type (test split)", ""] + per_type
    lines += ["", "Caption scores ×100 (pycocoevalcap). SPICE needs Stanford CoreNLP models that "
              "cannot be downloaded here; see each scores.json note.", ""]
    pngs = [("boxes.png", "The best boxes of one test image: student boxes with student tags, "
             "the same boxes with teacher tags (VTA), the teacher's own boxes (no VTA) over "
             "the student's in grey"),
            ("attention.png", "Teacher vs. distilled student attention maps for one example"),
            ("training_curves.png", "Training curves")]
    lines.append("## Pictures")
    for name, cap in pngs:
        if (out / name).exists() or (name == "training_curves.png" and curves):
            lines += ["", f"![{cap}]({name})", f"*{cap}*"]

    ran = [st for st in res["stages"] if not st["skipped"]]
    lines += ["", "## Stages", "",
              f"Wall time of this run: {res['wall_seconds']:.0f} s for {len(ran)} stages "
              f"(up to {demo.jobs} at a time, {demo.cfg.threads} thread(s) each, on "
              f"{res['machine']}; the seconds below overlap; one run on one machine, with "
              "whatever else that machine ran).", "", "| stage | seconds | |", "|---|---|---|"]
    for s in res["stages"]:
        lines.append(f"| {s['name']} | {s['seconds']:.0f} | {'skipped (done before)' if s['skipped'] else ''} |")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
