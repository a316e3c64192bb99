"""`vlkd-demo --quick`: the whole pipeline through the real commands (issue E's CI test)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.mark.demo
@pytest.mark.slow
def test_quick_demo_report(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([str(BIN / "vlkd-demo"), "--out", str(out), "--quick"],
                       capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert r.returncode == 0, r.stderr[-4000:]
    report = (out / "report.md").read_text()
    res = json.loads((out / "report.json").read_text())
    for role in ("student", "teacher"):
        ap = res["detectors"][role].get("AP")
        assert isinstance(ap, float) and math.isfinite(ap), (role, ap)
    for key in ("teacher-own", "teacher-own-on-student-boxes", "teacher-ctrl-on-student-boxes",
                "teacher-vta", "student-base", "student-kd"):
        row = res["models"][key]
        for metric in ("CIDEr", "Bleu_4", "METEOR", "ROUGE_L", "VQA", "caption_ms", "vqa_ms"):
            v = row.get(metric)
            assert isinstance(v, float) and math.isfinite(v), (key, metric, v)
        assert row["num_parameters"] > 0 and row["caption_ms"] > 0 and row["vqa_ms"] > 0
    for key in ("vqa_prior", "vqa_text_prior"):             # the model-free VQA references
        prior = res[key]["accuracy"]
        assert math.isfinite(prior) and 0 < prior < 100
    assert "question-type prior" in report and "question-text prior" in report
    assert "Wall time of this run" in report and "one run on one machine" in report
    assert "VTA effect (adapted − control" in report and "benchmarks/kd_gain.py" in report
    # latency: its own stage, alone, the config's threads, every model of both tasks
    lat = json.loads((out / "latency" / "latency.json").read_text())
    assert lat["settings"]["threads"] == 1 and lat["settings"]["batch_size"] == 1
    assert len(lat["rows"]) == 12 and f"{lat['settings']['threads']} thread(s)" in report
    st = {s["name"]: s for s in res["stages"]}
    assert "latency" in st and "caption: evaluate teacher-ctrl-on-student-boxes" in st
    for png in ("boxes.png", "attention.png", "training_curves.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, png
        assert png in report
    from PIL import Image
    with Image.open(out / "boxes.png") as im:   # student | teacher tags | teacher's own boxes
        assert im.width % 3 == 0 and im.width >= 3 * 480
    assert "n/a" not in report.split("## Pictures")[0]
    _bundles_of_the_demo_caption_and_answer(out, tmp_path)
    _ground_truth_boxes_of_the_vqa_diagnosis(out)
    # a re-run skips every finished stage
    r2 = subprocess.run([str(BIN / "vlkd-demo"), "--out", str(out), "--quick"],
                        capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert "skipped" in r2.stderr and " ok in " not in r2.stderr


def _run(args, timeout=300):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _ground_truth_boxes_of_the_vqa_diagnosis(out: Path) -> None:
    """benchmarks/vqa_diagnosis.py's ground-truth sets: every image of the world, its regions
    the scene's objects (visible boxes, x1 y1 x2 y2) tagged with their shapes (gt-boxes), the
    same boxes pooled by the demo's teacher detector (gt-teacher); its region-count table."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import vqa_diagnosis
    from vlkd.common.regionset import RegionSet

    work = out / "vqa-diagnosis"
    work.mkdir()
    gt = RegionSet(vqa_diagnosis.ground_truth_set(out, work))
    tags = RegionSet(work / "gt-boxes")
    classes = json.loads((out / "detectors" / "teacher" / "class_names.json").read_text())
    teacher = RegionSet(out / "regions" / "teacher-own")
    assert gt.feature_dim == teacher.feature_dim and gt.feature_dim != 8
    ann = out / "data" / "annotations"
    n = 0
    for split in ("train", "val", "test"):
        for scene in json.loads((ann / f"scenes_{split}.json").read_text()):
            r = gt.get(str(scene["image_id"]))
            want = [[x, y, x + w, y + h] for x, y, w, h in (o["bbox"] for o in scene["objects"])]
            assert r.boxes.tolist() == want
            t = tags.get(str(scene["image_id"]))
            assert t.boxes.tolist() == want
            assert [classes[c] for c in t.classes] == [o["shape"] for o in scene["objects"]]
            assert tuple(r.image_hw) == (scene["height"], scene["width"])
            assert r.features.any()
            n += 1
    assert n == len(gt) == len(teacher)
    lines = []
    vqa_diagnosis.region_counts(out, lines)
    assert lines[2].startswith("| teacher-own | ") and len(lines) == 4


def _bundles_of_the_demo_caption_and_answer(out: Path, tmp_path: Path) -> None:
    """Issue H: bundles of the quick demo's own models (the student detector with the distilled
    caption student, exported by the demo's pipeline-latency stage; the same detector with the
    distilled VQA student, exported here) caption a folder of fresh synthetic images holding
    one unreadable file and answer questions about them: official results formats, the
    unreadable image listed and skipped, byte-identical files on a second run."""
    from PIL import Image

    from vlkd.data.synthetic import make_scene

    cap = out / "bundles" / "student" / "bundle"
    assert (cap / "bundle.json").is_file()
    vqa = tmp_path / "vqa-bundle"
    _run([BIN / "vlkd-train", "export", "--detector", out / "detectors" / "student",
          "--model", out / "runs" / "student-kd-vqa" / "final", "--regions",
          out / "regions" / "student", "--out", vqa, "--latency-images", 0])
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    ids = [701, 702, 703]
    for k, iid in enumerate(ids):          # another seed than the demo's world: unseen images
        Image.fromarray(make_scene(17, "test", k)[0]).save(fresh / f"{iid}.png")
    (fresh / "799.png").write_bytes(b"not a PNG")
    qs = [{"question_id": 10 * iid + j, "image_id": str(iid), "question": q}
          for iid in ids + [799] for j, q in enumerate(("how many shapes are there?",
                                                        "is there a red circle?"))]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    for run in ("a", "b"):
        _run([BIN / "vlkd-infer", "caption", "--bundle", cap, "--images", fresh,
              "--out", tmp_path / run / "captions.json"])
        _run([BIN / "vlkd-infer", "answer", "--bundle", vqa, "--images", fresh,
              "--questions", tmp_path / "q.jsonl", "--out", tmp_path / run / "answers.json"])
    caps = json.loads((tmp_path / "a" / "captions.json").read_text())
    assert [r["image_id"] for r in caps] == ids                  # COCO caption results
    assert all(set(r) == {"image_id", "caption"} and isinstance(r["caption"], str)
               and r["caption"] for r in caps)
    answers = (vqa / "model" / "answers.txt").read_text().splitlines()
    ans = json.loads((tmp_path / "a" / "answers.json").read_text())   # VQA results
    assert [r["question_id"] for r in ans] == [q["question_id"] for q in qs
                                               if q["image_id"] != "799"]
    assert all(set(r) == {"question_id", "answer"} and r["answer"] in answers for r in ans)
    for name in ("captions.failures.json", "answers.failures.json"):
        fails = json.loads((tmp_path / "a" / name).read_text())
        assert [f["image_id"] for f in fails] == ["799"], fails
    for name in ("captions.json", "answers.json", "captions.failures.json",
                 "answers.failures.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
