"""Pipeline bundles and `vlkd-infer`: a tiny detector and tiny VL models trained a few steps on the
synthetic world, exported together, caption fresh images (one of them unreadable) and answer
questions about them; the results are in the official formats, byte-identical run to run, and
equal to what `vlkd-extract proposals` + `vlkd-train evaluate` give for the same images. Export
refuses models that do not fit the detector; `vlkd-train evaluate` writes predictions without
references."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from extract_fixtures import DETECTOR_CONFIGS, invoke_extract, tiny_model
from train_data import invoke

PY = sys.executable
CLASS_NAMES = [f"shape{i}" for i in range(8)]  # the tiny detectors' 8 classes
FRESH_IDS = ["501", "502", "503"]


def _infer(args, expect: int = 0):
    from vlkd.infer.cli import main

    res = CliRunner().invoke(main, [str(a) for a in args])
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert res.exit_code == expect, res.output
    return res


def _detector_dir(root: Path, kind: str = "fpn", names=CLASS_NAMES) -> Path:
    """A detector folder as train-detector writes one: config.yaml, model_final.pth,
    class_names.json (the tiny model with readable outputs, extract_fixtures.tiny_model)."""
    root.mkdir(parents=True)
    shutil.copy(DETECTOR_CONFIGS[kind], root / "config.yaml")
    _, model = tiny_model(kind)
    torch.save({"model": model.state_dict()}, root / "model_final.pth")
    (root / "class_names.json").write_text(json.dumps(names))
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic world, a tiny FPN detector, its proposals set, a tokenizer, a caption and a
    VQA model fine-tuned a few steps on the set, and a bundle of each."""
    from vlkd.data.synthetic.writers import generate, make_scene

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("infer")
    paths = generate(root / "w", num_train=16, num_val=0, num_test=0, seed=3)
    det = _detector_dir(root / "detector")
    regions = root / "regions"
    invoke_extract(["proposals", "--images", paths["karpathy"], "--image-root", paths["root"],
                    "--config", det / "config.yaml", "--weights", det / "model_final.pth",
                    "--out", regions, "--shard-index", "all", "--num-workers", 0,
                    "--no-progress", "--min-boxes", 4, "--max-boxes", 12])
    q, a = paths["vqa_questions_train"], paths["vqa_annotations_train"]
    invoke(["build-vocab", paths["karpathy"], q, a, "--regions", regions, "--out", root / "tok",
            "--vocab-size", 2000, "--min-frequency", 1])
    common = ["--regions", regions, "--model", "tiny", "--tokenizer", root / "tok",
              "--max-steps", 10, "--batch-size", 8, "--lr", "2e-3",
              "--set", "optim.warmup_ratio=0", "--set", "train.progress=false",
              "--set", "data.num_workers=0", "--set", "train.checkpoint_every=0",
              "--set", "train.tensorboard=false"]
    invoke(["finetune", "--task", "caption", "--captions", paths["karpathy"],
            "-o", root / "cap", *common])
    invoke(["finetune", "--task", "vqa", "--vqa-questions", q, "--vqa-annotations", a,
            "--set", "data.answer_min_count=1", "-o", root / "vqa", *common])
    # the caption bundle through vlkd-train export (a child process), the VQA one directly
    res = subprocess.run([str(Path(PY).parent / "vlkd-train"), "export", "--detector", str(det),
                          "--model", str(root / "cap" / "final"), "--out",
                          str(root / "cap-bundle"), "--regions", str(regions),
                          "--latency-images", "2", "--latency-repeats", "2", "--threads", "1"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    _infer(["export", "--detector", det, "--model", root / "vqa" / "final", "--out",
            root / "vqa-bundle", "--regions", regions, "--latency-images", 1,
            "--latency-repeats", 1, "--threads", 1])
    # fresh images (another seed, other ids) and one file that is not an image
    fresh = root / "fresh"
    fresh.mkdir()
    for k, iid in enumerate(FRESH_IDS):
        rgb, _ = make_scene(11, "test", k, 64, 160)
        Image.fromarray(rgb).save(fresh / f"{iid}.png")
    (fresh / "999.png").write_bytes(b"this is not a PNG file")
    return {"root": root, "paths": paths, "detector": det, "regions": regions,
            "cap_model": root / "cap" / "final", "vqa_model": root / "vqa" / "final",
            "cap_bundle": root / "cap-bundle", "vqa_bundle": root / "vqa-bundle",
            "fresh": fresh, "export_stderr": res.stderr, "export_stdout": res.stdout}


# ------------------------------------------------------------------------------------ bundle
def test_bundle_layout_card_and_settings(world):
    b = world["cap_bundle"]
    for f in ("README.md", "bundle.json", "pipeline.yaml", "detector/config.yaml",
              "detector/model.safetensors", "detector/class_names.json", "model/config.json",
              "model/model.safetensors", "model/vocab.txt", "model/vlkd_train.json"):
        assert (b / f).is_file(), f
    assert not list(world["root"].glob(".cap-bundle.partial-*"))
    info = json.loads((b / "bundle.json").read_text())
    assert info["task"] == "caption" and info["format_version"] == 1
    assert json.loads((b / "detector" / "class_names.json").read_text()) == CLASS_NAMES
    # the bundle's detector is the source detector: same resolved config, same tensors
    import yaml

    from vlkd.extract.detector import Detector
    src = Detector.load(world["detector"] / "config.yaml", world["detector"] / "model_final.pth")
    got = Detector.load(b / "detector" / "config.yaml", b / "detector" / "model.safetensors")
    def values(cfg):  # the config as plain values (its digest also sees YAML anchors)
        d = yaml.safe_load(cfg.dump())
        del d["MODEL"]["WEIGHTS"], d["MODEL"]["DEVICE"]
        return d
    assert values(got.cfg) == values(src.cfg)
    assert info["detector"]["config_digest"] == src.config_digest
    for k, v in src.model.state_dict().items():
        assert torch.equal(v, got.model.state_dict()[k]), k
    assert info["detector"]["num_parameters"] == sum(p.numel() for p in src.model.parameters())
    # --regions: the training set's box selection became the bundle's
    from vlkd.common.config import load
    from vlkd.infer.config import PipelineConfig
    pipe = load(PipelineConfig, b / "pipeline.yaml")
    assert (pipe.selection.min_boxes, pipe.selection.max_boxes) == (4, 12)
    assert pipe.feature_dtype == "float16"
    # the card: parts, parameters, the measured latency with its conditions
    card = (b / "README.md").read_text()
    lat = info["latency"]
    assert lat["images"] == 2 and lat["repeats"] == 2 and lat["threads"] == 1
    assert lat["ms_per_image"] > 0 and lat["detector_ms"] > 0 and lat["vl_ms"] > 0
    assert f"**{lat['ms_per_image']}**" in card and "1 CPU thread," in card
    assert f"{info['model']['num_parameters'] / 1e6:.2f} M" in card
    assert "vlkd-infer caption --bundle BUNDLE" in card
    assert "wrote" in world["export_stdout"] and "ms/image" in world["export_stdout"]


def test_export_refuses_a_model_of_another_detector(world, tmp_path):
    other = _detector_dir(tmp_path / "renamed", names=["thing"] + CLASS_NAMES[1:])
    res = _infer(["export", "--detector", other, "--model", world["cap_model"], "--out",
                  tmp_path / "b1", "--latency-images", 0], expect=1)
    assert "differ from the detector's at index 0 ('shape0' in the model, 'thing' in the " \
           "detector)" in res.output
    c4 = _detector_dir(tmp_path / "c4", kind="c4")
    res = _infer(["export", "--detector", c4, "--model", world["cap_model"], "--out",
                  tmp_path / "b2", "--latency-images", 0], expect=1)
    assert "the model takes 64-d region features, the detector (C4) pools 256-d ones" \
        in res.output
    res = _infer(["export", "--detector", c4, "--model", world["cap_model"], "--out",
                  tmp_path / "b3", "--latency-images", 0, "--regions", world["regions"]],
                 expect=1)
    assert "the model takes 64-d" in res.output  # the model/detector check comes first
    for k in ("b1", "b2", "b3"):
        assert not (tmp_path / k).exists()
    # a set made by another detector, an existing folder
    res = _infer(["export", "--detector", other, "--model", world["vqa_model"], "--out",
                  tmp_path / "b4", "--latency-images", 0], expect=1)
    assert "index 0" in res.output
    res = _infer(["export", "--detector", world["detector"], "--model", world["cap_model"],
                  "--out", world["cap_bundle"], "--latency-images", 0], expect=1)
    assert "exists and is not an empty folder" in res.output


def test_export_refuses_a_set_of_another_detector(world, tmp_path):
    other = _detector_dir(tmp_path / "d")
    with open(other / "config.yaml", "a") as f:  # same classes and width, another config
        f.write("TEST:\n  DETECTIONS_PER_IMAGE: 50\n")
    res = _infer(["export", "--detector", other, "--model", world["cap_model"], "--out",
                  tmp_path / "b", "--regions", world["regions"], "--latency-images", 0],
                 expect=1)
    assert "was made by another detector: its config digest" in res.output


# ----------------------------------------------------------------------------------- caption
def _caption(world, out, *extra):
    return _infer(["caption", "--bundle", world["cap_bundle"], "--images", world["fresh"],
                   "--out", out, "--device", "cpu", "--batch-size", 2, *extra])


def test_caption_a_folder_official_format_deterministic(world, tmp_path):
    res = _caption(world, tmp_path / "a" / "results.json")
    assert "skipped image '999': not-an-image" in res.output
    assert "3 of 4 images captioned, 1 image(s) skipped" in res.output
    rows = json.loads((tmp_path / "a" / "results.json").read_text())
    # COCO caption results: a list of {image_id: int, caption: str}, one per readable image
    assert isinstance(rows, list) and len(rows) == 3
    assert [r["image_id"] for r in rows] == [int(i) for i in FRESH_IDS]
    for r in rows:
        assert set(r) == {"image_id", "caption"}
        assert type(r["image_id"]) is int and isinstance(r["caption"], str) and r["caption"]
    fails = json.loads((tmp_path / "a" / "results.failures.json").read_text())
    assert [f["image_id"] for f in fails] == ["999"]
    assert fails[0]["reason"].startswith("not-an-image")
    from vlkd.infer.config import InferConfig
    from vlkd.common.config import load
    cfg = load(InferConfig, tmp_path / "a" / "results.config.yaml")
    assert cfg.pipeline.selection.max_boxes == 12 and cfg.batch_size == 2
    # a second run gives byte-identical files
    _caption(world, tmp_path / "b" / "results.json")
    for name in ("results.json", "results.failures.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_caption_equals_proposals_then_evaluate(world, tmp_path):
    """The bundle in one process gives what the two phases give through a region set; the set
    --save-regions writes is that set, and evaluate without references writes predictions."""
    _caption(world, tmp_path / "direct.json")
    _caption(world, tmp_path / "saved.json", "--save-regions", tmp_path / "set")
    assert (tmp_path / "direct.json").read_bytes() == (tmp_path / "saved.json").read_bytes()
    from vlkd.common.manifest import read_manifest
    m = read_manifest(tmp_path / "set")
    assert m["role"] == "proposals" and [f["image_id"] for f in m["failures"]] == ["999"]
    # predictions-only evaluate (no --captions): every image of the set, the same results file
    out = tmp_path / "eval"
    res = invoke(["evaluate", "--model", world["cap_bundle"] / "model", "--regions",
                  tmp_path / "set", "-o", out, "--batch-size", 2])
    assert "predictions only" in res.output
    assert json.loads((out / "predictions_caption.json").read_text()) == \
        json.loads((tmp_path / "direct.json").read_text())
    scores = json.loads((out / "scores.json").read_text())
    assert "CIDEr" not in scores and scores["num_predictions"] == 3
    assert any("predictions only" in n for n in scores["notes"])
    # and the same model directory, exported from its run, evaluated on a set made by
    # vlkd-extract proposals itself
    made = tmp_path / "proposals"
    invoke_extract(["proposals", "--images", world["fresh"], "--config",
                    world["detector"] / "config.yaml", "--weights",
                    world["detector"] / "model_final.pth", "--out", made, "--shard-index", "all",
                    "--num-workers", 0, "--no-progress", "--min-boxes", 4, "--max-boxes", 12,
                    "--max-failures", "100%", "--batch-size", 2])
    invoke(["evaluate", "--model", world["cap_model"], "--regions", made, "-o",
            tmp_path / "eval2", "--batch-size", 2])
    assert (tmp_path / "eval2" / "predictions_caption.json").read_bytes() == \
        (out / "predictions_caption.json").read_bytes()
    # region by region: the pipeline's regions are the ones proposals stored
    import numpy as np

    import vlkd
    from vlkd.common.regionset import RegionSet
    stored = RegionSet(made)
    pipe = vlkd.Pipeline.from_pretrained(world["cap_bundle"], device="cpu", batch_size=2)
    got = {rec.image_id: r for rec, r in pipe.regions(world["fresh"])}
    assert got["999"].reason.startswith("not-an-image")
    for iid in FRESH_IDS:
        want = stored.get(iid)
        assert got[iid].num_regions == want.num_regions >= 4
        for key in ("boxes", "scores", "classes", "features"):
            np.testing.assert_array_equal(getattr(got[iid], key), getattr(want, key), key)


def test_python_api(world, tmp_path):
    import vlkd

    pipe = vlkd.Pipeline.from_pretrained(world["cap_bundle"], device="cpu", batch_size=2)
    results = pipe(world["fresh"])
    assert [r.image_id for r in results] == [*FRESH_IDS, "999"]
    assert results[-1].caption is None and results[-1].error.startswith("not-an-image")
    _caption(world, tmp_path / "r.json")
    want = {str(r["image_id"]): r["caption"]
            for r in json.loads((tmp_path / "r.json").read_text())}
    assert {r.image_id: r.caption for r in results[:3]} == want
    assert all(r.tags for r in results[:3])
    # decoded images and paths, in the order given
    images = [Image.open(world["fresh"] / f"{i}.png") for i in reversed(FRESH_IDS)]
    got = pipe(images)
    assert [r.caption for r in got] == [want[i] for i in reversed(FRESH_IDS)]
    got = pipe([str(world["fresh"] / "502.png")])
    assert got[0].caption == want["502"]
    # `import vlkd` stays light: vlkd.Pipeline is vlkd.infer's, imported on first use
    from vlkd.infer.pipeline import Pipeline
    assert vlkd.Pipeline is Pipeline
    res = subprocess.run([PY, "-c", "import sys, vlkd; assert 'torch' not in sys.modules; "
                          "assert 'vlkd.infer' not in sys.modules"], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr


# ------------------------------------------------------------------------------------ answer
def _questions(world, path: Path, *, jsonl: bool) -> list[dict]:
    qs = []
    for k, iid in enumerate([*FRESH_IDS, "999"]):
        qs.append({"question_id": 9000 + 2 * k, "image_id": int(iid),
                   "question": "how many shapes are there?"})
        qs.append({"question_id": 9001 + 2 * k, "image_id": iid,
                   "question": "what color is the circle?"})
    if jsonl:
        path.write_text("".join(json.dumps(q) + "\n" for q in reversed(qs)))
    else:
        path.write_text(json.dumps({"questions": qs}))
    return qs


def _answer(world, questions, out, *extra, expect=0):
    return _infer(["answer", "--bundle", world["vqa_bundle"], "--images", world["fresh"],
                   "--questions", questions, "--out", out, "--device", "cpu",
                   "--batch-size", 3, *extra], expect=expect)


def test_answer_official_format_topk_deterministic(world, tmp_path):
    qs = _questions(world, tmp_path / "q.jsonl", jsonl=True)
    res = _answer(world, tmp_path / "q.jsonl", tmp_path / "a" / "vqa.json", "--top-k", 3)
    assert "6 of 8 questions answered" in res.output
    rows = json.loads((tmp_path / "a" / "vqa.json").read_text())
    # VQA results: a list of {question_id: int, answer: str}, one per answerable question
    usable = [q["question_id"] for q in qs if str(q["image_id"]) != "999"]
    assert [r["question_id"] for r in rows] == usable
    answers = (world["vqa_bundle"] / "model" / "answers.txt").read_text().splitlines()
    for r in rows:
        assert set(r) == {"question_id", "answer"} and type(r["question_id"]) is int
        assert r["answer"] in answers
    fails = json.loads((tmp_path / "a" / "vqa.failures.json").read_text())
    assert fails == [{"image_id": "999", "reason": fails[0]["reason"],
                      "question_ids": [9006, 9007]}]
    top = json.loads((tmp_path / "a" / "vqa.topk.json").read_text())
    assert [t["question_id"] for t in top] == usable
    for t, r in zip(top, rows):
        assert len(t["answers"]) == 3 and t["answers"][0]["answer"] == r["answer"]
        scores = [a["score"] for a in t["answers"]]
        assert scores == sorted(scores, reverse=True) and 0 <= scores[-1] <= scores[0] <= 1
        assert t["tags"]
    # the VQA v2 questions file gives the same results; a second run the same bytes
    _questions(world, tmp_path / "q.json", jsonl=False)
    _answer(world, tmp_path / "q.json", tmp_path / "b" / "vqa.json", "--top-k", 3)
    for name in ("vqa.json", "vqa.topk.json", "vqa.failures.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # and the Python API answers the same
    import vlkd
    got = vlkd.Pipeline.from_pretrained(world["vqa_bundle"], device="cpu", batch_size=3).answer(
        world["fresh"], qs)
    assert [(a.question_id, a.answer) for a in got if a.error is None] == \
        [(r["question_id"], r["answer"]) for r in rows]


def test_bad_inputs_are_explained(world, tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 1, "image_id": 777, "question": "what?"}) + "\n")
    res = _answer(world, q, tmp_path / "x.json", expect=1)
    assert "1 question(s) are about 1 image(s) that --images" in res.output
    assert "image_id '777'" in res.output
    q.write_text(json.dumps({"question_id": "a", "image_id": 501, "question": "what?"}) + "\n")
    res = _answer(world, q, tmp_path / "x.json", expect=1)
    assert "question_id 'a' is not an integer" in res.output
    res = _answer(world, tmp_path / "none.json", tmp_path / "x.json", expect=1)
    assert "--questions" in res.output and "no such file" in res.output
    res = _infer(["caption", "--bundle", world["cap_bundle"], "--images", tmp_path / "nowhere",
                  "--out", tmp_path / "x.json"], expect=1)
    assert "--images" in res.output and "no such folder or file" in res.output
    res = _infer(["caption", "--bundle", tmp_path, "--images", world["fresh"], "--out",
                  tmp_path / "x.json"], expect=1)
    assert "is not a pipeline bundle" in res.output
    res = _infer(["caption", "--bundle", world["vqa_bundle"], "--images", world["fresh"],
                  "--out", tmp_path / "x.json", "--device", "cpu"], expect=1)
    assert "holds a 'vqa' model; use `vlkd-infer answer`" in res.output
    res = _infer(["caption", "--bundle", world["cap_bundle"], "--images", world["fresh"],
                  "--out", tmp_path / "x.json", "--device", "cpu", "--precision", "fp16"],
                 expect=1)
    assert "runs on CUDA only" in res.output
    res = _infer(["caption", "--bundle", world["cap_bundle"], "--images", world["fresh"],
                  "--out", tmp_path / "x.json", "--set", "pipeline.selection.score=1"],
                 expect=1)
    assert "unknown key" in res.output
    # only unusable images: results are empty, exit status 3
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "1.jpg").write_bytes(b"")
    res = _infer(["caption", "--bundle", world["cap_bundle"], "--images", bad, "--out",
                  tmp_path / "y.json", "--device", "cpu"], expect=3)
    assert "empty" in res.output and json.loads((tmp_path / "y.json").read_text()) == []
