"""The options of vlkd-extract's jobs live once (vlkd.extract.options): the click options are
generated from the dataclasses, a job file (--job-config) and --set merge in, unknown keys are
refused with the valid ones, and the options that made a set are saved beside it."""
from __future__ import annotations

import dataclasses

import pytest
import yaml
from click.testing import CliRunner

from extract_fixtures import DETECTOR_CONFIGS, make_images, tiny_weights  # noqa: F401
from extract_fixtures import invoke_extract as invoke
from vlkd.common.config import field_default, load
from vlkd.common.manifest import read_manifest
from vlkd.extract.cli import main
from vlkd.extract.options import (PER_JOB_KEYS, SET_CONFIG_FILE, BoxSelection, ProposalsConfig,
                                  TeacherConfig, TrainDetectorOptions)

SCHEMAS = {"proposals": ProposalsConfig, "teacher-features": TeacherConfig,
           "train-detector": TrainDetectorOptions}


def props_argv(weights, images, out, *args):
    return ["proposals", "--images", images, "--config", DETECTOR_CONFIGS["c4"], "--weights",
            weights, "--out", out, "--no-progress", "--num-workers", 0, *args]


@pytest.mark.parametrize("command", sorted(SCHEMAS))
def test_every_option_is_generated_from_the_schema(command):
    schema, cmd = SCHEMAS[command], main.commands[command]
    keys = set()
    for p in cmd.params:
        if p.name in ("job_config", "overrides", "opts"):
            continue
        # Every other option sets a schema key and has no default of its own ("not given"):
        # the default shown in --help is the field's, so the two cannot differ.
        assert p.name.startswith("cfg__"), f"{command} {p.opts} is not generated"
        key = p.name[len("cfg__"):].replace("__", ".")
        assert p.default is None and not p.required, (command, key)
        shown = field_default(schema, key)
        text = " ".join(p.help.split())
        assert f"[{key}; default: " in text, (command, key, text)
        if shown not in (None, "", [], True, False):
            assert f"default: {shown}]" in text, (command, key, text)
        keys.add(key)
    assert {"images", "out", "selection.score_thresh"} <= keys or command != "proposals"
    assert "proposals" in keys or command != "teacher-features"


def test_box_selection_defaults_are_the_clis():
    help_text = " ".join(CliRunner().invoke(main, ["proposals", "--help"]).output.split())
    sel = BoxSelection()
    for flag, value in (("--score-thresh", sel.score_thresh), ("--nms-thresh", sel.nms_thresh),
                        ("--min-boxes", sel.min_boxes), ("--max-boxes", sel.max_boxes)):
        assert f"{flag}" in help_text and f"default: {value}]" in help_text
    assert ProposalsConfig(images="i", config="c", weights="w", out="o").selection == sel


def test_job_file_then_options_then_set(tiny_weights, tmp_path):
    make_images(tmp_path / "imgs", 4)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "images": str(tmp_path / "imgs"), "config": str(DETECTOR_CONFIGS["c4"]),
        "weights": str(tiny_weights["c4"]), "num_shards": 2, "shard_index": "all",
        "selection": {"score_thresh": 0.5, "min_boxes": 2, "max_boxes": 5}}))
    out = tmp_path / "set"
    invoke(["proposals", "--job-config", job, "--out", out, "--no-progress", "--num-workers",
            0, "--max-boxes", 4, "--set", "selection.min_boxes=3"])
    m = read_manifest(out)
    assert m["num_shards"] == 2 and len(m["shards"]) == 2
    o = m["options"]
    assert (o["score_thresh"], o["min_boxes"], o["max_boxes"]) == (0.5, 3, 4)
    assert o["nms_thresh"] == BoxSelection().nms_thresh
    # The resolved options are saved beside the set, without the per-job keys, and load back.
    saved = yaml.safe_load((out / SET_CONFIG_FILE).read_text())
    assert not set(PER_JOB_KEYS) & set(saved)
    assert saved["selection"] == {**dataclasses.asdict(BoxSelection()), "score_thresh": 0.5,
                                  "min_boxes": 3, "max_boxes": 4}
    assert saved["out"] == str(out) and saved["num_shards"] == 2
    cfg = load(ProposalsConfig, out / SET_CONFIG_FILE)
    assert cfg.selection == BoxSelection(0.5, 0.5, 3, 4)
    # Re-running from the saved file is the same job: nothing is refused, nothing changes.
    before = (out / "manifest.json").read_text()
    invoke(["proposals", "--job-config", out / SET_CONFIG_FILE, "--shard-index", "all",
            "--no-progress", "--num-workers", 0])
    assert (out / "manifest.json").read_text() == before
    # An option that changes the content is refused on resume, as from the command line.
    res = invoke(["proposals", "--job-config", out / SET_CONFIG_FILE, "--shard-index", "all",
                  "--no-progress", "--set", "selection.score_thresh=0.6"], expect=1)
    assert "another --score-thresh" in res.output


def test_config_file_is_written_once_and_identical_across_shard_jobs(tiny_weights, tmp_path):
    make_images(tmp_path / "imgs", 5)
    out = tmp_path / "set"
    base = props_argv(tiny_weights["c4"], tmp_path / "imgs", out, "--num-shards", 2)
    invoke([*base, "--shard-index", 1, "--batch-size", 1])
    first = (out / SET_CONFIG_FILE).read_bytes()
    # Another array job of the same set, run otherwise (batch size, log format): same file.
    invoke([*base, "--shard-index", 0, "--batch-size", 3, "--log-format", "json"])
    assert (out / SET_CONFIG_FILE).read_bytes() == first
    assert len(read_manifest(out)["shards"]) == 2
    assert not list(out.glob(f".{SET_CONFIG_FILE}.*"))  # no temporary file left


def test_unknown_keys_and_missing_options_are_refused(tiny_weights, tmp_path):
    make_images(tmp_path / "imgs", 2)
    base = props_argv(tiny_weights["c4"], tmp_path / "imgs", tmp_path / "set")
    res = invoke([*base, "--set", "selection.score=0.3"], expect=2)
    assert "unknown key 'selection.score'" in res.output
    assert "valid keys in 'selection': ['max_boxes', 'min_boxes', 'nms_thresh', 'score_thresh'" \
        in res.output
    job = tmp_path / "job.yaml"
    job.write_text("score_thresh: 0.3\n")  # belongs under selection:
    res = invoke([*base, "--job-config", job], expect=2)
    assert f"{job}: unknown key 'score_thresh'" in res.output and "'selection'" in res.output
    res = invoke(["proposals", "--config", DETECTOR_CONFIGS["c4"], "--weights",
                  tiny_weights["c4"], "--out", tmp_path / "set"], expect=2)
    assert "Missing option '--images'" in res.output
    res = invoke([*base, "--min-boxes", 20, "--max-boxes", 10], expect=2)
    assert "min-boxes <= --max-boxes" in res.output
    assert not (tmp_path / "set").exists()  # refused before anything is written


def test_teacher_config_file_records_the_resolved_layout(tiny_weights, tmp_path):
    make_images(tmp_path / "imgs", 3)
    props = tmp_path / "props"
    invoke([*props_argv(tiny_weights["c4"], tmp_path / "imgs", props, "--num-shards", 2,
                        "--backend", "zarr"), "--shard-index", "all"])
    out = tmp_path / "teacher"
    job = tmp_path / "teacher.yaml"
    job.write_text(yaml.safe_dump({"proposals": str(props), "images": str(tmp_path / "imgs"),
                                   "config": str(DETECTOR_CONFIGS["fpn"])}))
    invoke(["teacher-features", "--job-config", job, "--weights", tiny_weights["fpn"],
            "--out", out, "--shard-index", "all", "--no-progress", "--num-workers", 0])
    saved = load(TeacherConfig, out / SET_CONFIG_FILE)
    assert (saved.num_shards, saved.backend) == (2, "zarr")  # taken from the proposals
    assert saved.proposals == str(props) and saved.weights == str(tiny_weights["fpn"])


def test_train_detector_reads_job_file_options_and_saves_them(tmp_path, monkeypatch):
    import vlkd.extract.detector_training as dt

    calls = []
    monkeypatch.setattr(dt, "train_detector", lambda *a, **kw: calls.append((a, kw)) or {})
    (tmp_path / "imgs").mkdir()
    (tmp_path / "train.json").write_text("{}")
    cfg = tmp_path / "det.yaml"
    cfg.write_text("{}")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"config": str(cfg), "train_json": str(tmp_path / "train.json"),
                                   "image_root": str(tmp_path / "imgs"), "max_iter": 7,
                                   "opts": ["SOLVER.BASE_LR", "0.1"]}))
    out = tmp_path / "det"
    invoke(["train-detector", "--job-config", job, "--out", out, "--set", "max_iter=9",
            "SOLVER.IMS_PER_BATCH", "2"])
    (args, kw), = calls
    assert args == (str(cfg), str(tmp_path / "train.json"), str(tmp_path / "imgs"), str(out))
    assert kw["max_iter"] == 9 and kw["device"] == TrainDetectorOptions.device
    assert kw["opts"] == ["SOLVER.IMS_PER_BATCH", "2"]  # the command line's OPTS win
    saved = load(TrainDetectorOptions, out / "train-detector.yaml")
    assert saved.max_iter == 9 and saved.opts == ["SOLVER.IMS_PER_BATCH", "2"]
    res = invoke(["train-detector", "--job-config", job, "--out", out, "SOLVER.BASE_LR"],
                 expect=2)
    assert "KEY VALUE pairs" in res.output
