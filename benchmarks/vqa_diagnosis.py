"""Why the demo's VQA models stay near the prior: the measurements of docs/DEMO.md ("VQA"),
on a finished demo folder (``make demo`` or ``vlkd-demo --out DIR``).

1. **Regions against objects.** For the teacher's and the student's region sets: regions per
   image, and how often the regions above a score are exactly the scene's objects in number.
2. **Ground-truth boxes.** A region set whose boxes are the scene's objects (their visible
   boxes, tagged with their true shape): written as VinVL TSV files by vlkd's own writer
   (``feature.tsv`` with an 8-d zero placeholder feature, ``label.tsv``, ``hw.tsv``), imported with ``vlkd-extract
   import-tsv`` (``gt-boxes``), and pooled by the demo's teacher detector with ``vlkd-extract
   teacher-features`` (``gt-teacher``), whose object tags are, as for every teacher-features
   set, the classes of the proposals it was pooled over: the true shapes. It is what a perfect
   detector would hand the VL model: one region per object, and the right tags.
3. **VQA teacher runs** with the demo's settings (``config.yaml``'s model, batch size, ``train``
   overrides; seed 0), trained on the train split and scored on the **val** split (the demo
   reports test), per question type against the question-type prior on the same questions:
   on the demo's regions and on the ground-truth ones, with the demo's 2 attention heads and
   with 4, on all question types and on ``is there a [shape]`` alone (a question the true
   tags answer by themselves: is the question's shape word among the tag words?).

Run: ``python benchmarks/vqa_diagnosis.py --out demo-out`` (about 4 min on 2 cores with
``--jobs 2``); results in ``<out>/vqa-diagnosis/`` (``vqa_diagnosis.md`` holds the tables as
printed). Runs already finished there are reused.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

from vlkd.common.machine import describe
from vlkd.common.regionset import RegionSet
from vlkd.data.tsv.oscar_writers import OscarTsvWriter

BIN = Path(sys.executable).parent
SHAPE_TYPE = "is there a [shape]"
#: name, regions ("own": the demo's teacher-own set, "gt": ground-truth boxes and tags),
#: question type kept (None: all), steps (None: the demo's teacher steps), model.config
#: overrides
RUNS = [
    ("own, 2 heads", "own", None, None, {}),
    ("own, 4 heads", "own", None, None, {"num_heads": 4}),
    ("gt, 2 heads", "gt", None, None, {}),
    ("gt, 4 heads", "gt", None, None, {"num_heads": 4}),
    ("gt, 2 heads, shape-existence only", "gt", SHAPE_TYPE, 1000, {}),
    ("gt, 4 heads, shape-existence only", "gt", SHAPE_TYPE, 1000, {"num_heads": 4}),
]


def _run(argv: list[str], log: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with open(log, "w") as f:
        r = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode:
        raise SystemExit(f"vqa_diagnosis: {' '.join(argv[:2])} failed (exit {r.returncode}); "
                         f"see {log}")


def region_counts(out: Path, lines: list[str]) -> None:
    ann = out / "data" / "annotations"
    objects = {str(s["image_id"]): len(s["objects"])
               for split in ("train", "val", "test")
               for s in json.loads((ann / f"scenes_{split}.json").read_text())}
    lines += ["| region set | regions / image | objects / image | exact count at score > "
              "0.2 / 0.3 / 0.4 / 0.5 |", "|---|---:|---:|---|"]
    for name in ("teacher-own", "student"):
        rs = RegionSet(out / "regions" / name)
        n, k, hits = [], [], {t: 0 for t in (0.2, 0.3, 0.4, 0.5)}
        for shard in rs.shards:
            for r in shard.read_range(0, len(shard)):
                n.append(r.num_regions)
                k.append(objects[r.image_id])
                for t in hits:
                    hits[t] += int((r.scores > t).sum() == objects[r.image_id])
        exact = " / ".join(f"{100 * v / len(n):.0f} %" for v in hits.values())
        lines.append(f"| {name} | {np.mean(n):.1f} | {np.mean(k):.1f} | {exact} |")


def ground_truth_set(out: Path, work: Path) -> Path:
    """The ground-truth-box region set pooled by the demo's teacher detector."""
    final = work / "gt-teacher"
    if (final / "manifest.json").is_file():
        return final
    ann, tsv = out / "data" / "annotations", work / "gt-tsv"
    tsv.mkdir(parents=True, exist_ok=True)
    classes = json.loads((out / "detectors" / "teacher" / "class_names.json").read_text())
    with OscarTsvWriter(tsv, geometry=0, layout="columns") as w:  # run_vqa.py's layout
        for split in ("train", "val", "test"):
            for s in json.loads((ann / f"scenes_{split}.json").read_text()):
                objs = s["objects"]
                boxes = np.array([[x, y, x + bw, y + bh] for x, y, bw, bh in
                                  (o["bbox"] for o in objs)], np.float32)
                w.write(str(s["image_id"]), (s["height"], s["width"]), boxes,
                        np.zeros((len(objs), 8), np.float32), [o["shape"] for o in objs],
                        scores=np.ones(len(objs), np.float32))
    (tsv / "classes.json").write_text(json.dumps(classes))
    boxes = work / "gt-boxes"
    if not (boxes / "manifest.json").is_file():
        _run([str(BIN / "vlkd-extract"), "import-tsv", "--format", "vinvl",
              "--features", str(tsv / "feature.tsv"), "--labels", str(tsv / "label.tsv"),
              "--hw", str(tsv / "hw.tsv"), "--labelmap", str(tsv / "classes.json"),
              "--feature-dim", "8", "--tsv-dtype", "float32", "--geometry", "0",
              "--shard-index", "all", "--out", str(boxes)], work / "import-tsv.log")
    det = out / "detectors" / "teacher"
    _run([str(BIN / "vlkd-extract"), "teacher-features", "--proposals", str(boxes),
          "--images", str(ann / "dataset_coco.json"), "--image-root", str(out / "data"),
          "--config", str(det / "config.yaml"), "--weights", str(det / "model_final.pth"),
          "--shard-index", "all", "--num-workers", "0", "--no-progress", "--out", str(final)],
         work / "teacher-features.log")
    return final


def _only_type(out: Path, work: Path, qtype: str, split: str) -> tuple[Path, Path]:
    ann = out / "data" / "annotations"
    q = json.loads((ann / f"v2_OpenEnded_synthetic_{split}_questions.json").read_text())
    a = json.loads((ann / f"v2_synthetic_{split}_annotations.json").read_text())
    keep = {x["question_id"] for x in a["annotations"] if x["question_type"] == qtype}
    q["questions"] = [x for x in q["questions"] if x["question_id"] in keep]
    a["annotations"] = [x for x in a["annotations"] if x["question_id"] in keep]
    paths = work / f"questions-{split}-only.json", work / f"annotations-{split}-only.json"
    paths[0].write_text(json.dumps(q))
    paths[1].write_text(json.dumps(a))
    return paths


def vqa_run(out: Path, work: Path, cfg: dict, regions: Path, name: str, qtype, steps,
            model_over: dict) -> dict:
    rd = work / "runs" / name.replace(", ", "-").replace(" ", "_")
    scores = rd / "eval" / "scores.json"
    if scores.is_file():
        return json.loads(scores.read_text())
    rd.mkdir(parents=True, exist_ok=True)
    ann = out / "data" / "annotations"
    qa = {sp: ((ann / f"v2_OpenEnded_synthetic_{sp}_questions.json",
                ann / f"v2_synthetic_{sp}_annotations.json") if qtype is None
               else _only_type(out, rd, qtype, sp)) for sp in ("train", "val")}
    sets = [f"{k}={v}" for k, v in cfg["train"].items()]
    sets += [f"model.config.{k}={v}" for k, v in model_over.items()]
    sets += ["train.progress=false", "train.tensorboard=false"]
    _run([str(BIN / "vlkd-train"), "finetune", "--model", cfg["models"]["teacher"],
          "--regions", str(regions), "--task", "vqa", "--tokenizer", str(out / "tokenizer"),
          "--max-steps", str(steps or cfg["full"]["steps"]["teacher"]),
          "--batch-size", str(cfg["full"]["batch_size"]), "--seed", "0",
          "--vqa-questions", str(qa["train"][0]), "--vqa-annotations", str(qa["train"][1]),
          "--output-dir", str(rd / "run"), *[x for s in sets for x in ("--set", s)]],
         rd / "train.log")
    _run([str(BIN / "vlkd-train"), "evaluate", "--model", str(rd / "run" / "final"),
          "--regions", str(regions), "--task", "vqa", "--vqa-questions", str(qa["val"][0]),
          "--vqa-annotations", str(qa["val"][1]), "--set", "eval.max_samples=0",
          "--output-dir", str(rd / "eval")], rd / "eval.log")
    return json.loads(scores.read_text())


def priors(out: Path) -> dict:
    from vlkd.data.vqa import load_vqa, question_type_prior, vqa_accuracy

    ann = out / "data" / "annotations"
    train, val = (load_vqa(ann / f"v2_OpenEnded_synthetic_{sp}_questions.json",
                           ann / f"v2_synthetic_{sp}_annotations.json")
                  for sp in ("train", "val"))
    return vqa_accuracy(question_type_prior(train, val), val)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="a finished demo folder (make demo: demo-out)")
    p.add_argument("--jobs", type=int, default=2, help="VQA runs at the same time (1 thread each)")
    args = p.parse_args(argv)
    out = Path(args.out)
    cfg_path = out / "config.yaml"
    if not (cfg_path.is_file() and (out / "detectors" / "teacher" / "model_final.pth").is_file()
            and (out / "regions" / "teacher-own" / "manifest.json").is_file()):
        p.error(f"{out} is not a finished demo folder (config.yaml, detectors/teacher, "
                "regions/teacher-own); run `make demo` or `vlkd-demo --out DIR` first")
    cfg = yaml.safe_load(cfg_path.read_text())
    work = out / "vqa-diagnosis"
    work.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    lines = [f"# vqa_diagnosis on {out} (demo seed {cfg['full']['data']['seed']}); "
             f"{describe()}; VQA runs {args.jobs} at a time, 1 thread each", ""]
    region_counts(out, lines)
    gt = ground_truth_set(out, work)
    sets = {"own": out / "regions" / "teacher-own", "gt": gt}
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futs = [pool.submit(vqa_run, out, work, cfg, sets[r], name, qt, st, mo)
                for name, r, qt, st, mo in RUNS]
        results = [f.result() for f in futs]
    prior = priors(out)
    types = sorted(prior["per_question_type"])
    lines += ["", "VQA accuracy on the val split (official metric, current version); "
              f"teacher `{cfg['models']['teacher']}`, seed 0, one run each", "",
              "| run | steps | all | " + " | ".join(types) + " |",
              "|---|---:|---:|" + "---:|" * len(types)]
    pt = prior["per_question_type"]
    lines.append("| *question-type prior* | | " + f"{prior['accuracy']:.1f} | "
                 + " | ".join(f"{pt[t]:.1f}" for t in types) + " |")
    for (name, _, qt, st, _), sc in zip(RUNS, results):
        per = sc["per_question_type"]
        steps = st or cfg["full"]["steps"]["teacher"]
        lines.append(f"| {name} | {steps} | {sc['accuracy']:.1f} | "
                     + " | ".join(f"{per[t]:.1f}" if t in per else "" for t in types) + " |")
    lines += ["", f"({time.perf_counter() - t0:.0f} s)"]
    text = "\n".join(lines) + "\n"
    print(text)
    (work / "vqa_diagnosis.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
