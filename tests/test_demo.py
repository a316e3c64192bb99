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
    # a re-run skips every finished stage
    r2 = subprocess.run([str(BIN / "vlkd-demo"), "--out", str(out), "--quick"],
                        capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert "skipped" in r2.stderr and " ok in " not in r2.stderr
