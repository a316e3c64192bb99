"""Pre-training-stage distillation end to end (`vlkd-train distill --task pretrain` with the
shipped configs/train/pretrain-distill.yaml): two corpora mixed by weight (a Karpathy caption
file, and an Oscar+ corpus TSV with caption and QA rows), masked tokens over text and tags, the
3-way contrastive loss and both KD terms, every term logged and finite; a real SIGKILL then
--resume reproduces the loss sequence; a caption fine-tune (plain and with KD) starts from the
pre-trained student."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from train_data import (COLOURS, SHAPES, caption_of, cli_args, invoke, losses, make_world,
                        metrics, scenes, sigkill_when, write_sets)
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train" / "pretrain-distill.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pre")
    w = make_world(root / "a")
    # corpus b: other images, an Oscar+ corpus file (caption rows and QA rows) over them
    sc = scenes(12, seed=5)
    w["b_student"], w["b_teacher"] = write_sets(root / "b", sc)
    rows, qa = [], []
    for k, im in enumerate(sc):
        i = im["image_id"]
        rows.append(f"coco_{i}\tcoco_{i}\t{caption_of(im)}")
        rows.append(f"gqa_{i}\tgqa_qa_{i}_{k:08d}\twhat colour is the "
                    f"{SHAPES[im['objects'][0][1]]}?")
        qa.append(f"{k:08d}\t" + json.dumps({"labels": [COLOURS[im["objects"][0][0]]]}))
    (root / "b" / "corpus.tsv").write_text("\n".join(rows) + "\n")
    (root / "b" / "QA_fileB.tsv").write_text("\n".join(qa) + "\n")
    w["corpus"], w["qa"] = root / "b" / "corpus.tsv", root / "b" / "QA_fileB.tsv"
    # the teacher: pre-trained on its own features of world a, 10 steps (VTA in pre-training)
    invoke(["finetune", "--task", "pretrain", "--regions", w["teacher"], "--model",
            "tiny-teacher", *cli_args(w, root / "teacher", steps=10)])
    w["teacher_model"] = root / "teacher" / "final"
    return w


def _corpora(w) -> str:
    return ("data.corpora=["
            f"{{name: a, regions: {w['student']}, teacher_regions: {w['teacher']}, "
            f"pairs: {w['captions']}, split: train, weight: 3}}, "
            f"{{name: b, regions: {w['b_student']}, teacher_regions: {w['b_teacher']}, "
            f"pairs: {w['corpus']}, qa_labels: {w['qa']}, weight: 1}}]")


def _distill_args(w, out, *extra, steps=12, workers=0):
    return [str(a) for a in [
        "distill", "--config", CONFIG, "--teacher", w["teacher_model"], "--student", "tiny",
        *cli_args(w, out, "--set", _corpora(w), "--set", "losses.hidden.params.queue_size=64",
                  "--set", "train.log_samples=true", "--set", "task.tag_swap_prob=0.25",
                  "--set", "task.caption_swap_prob=0.25", "--set", "task.contrast_classes=3",
                  *extra, steps=steps, workers=workers)]]


def test_distill_pretrain_mixes_corpora_and_logs_every_term(world, tmp_path):
    run = tmp_path / "pd"
    invoke(_distill_args(world, run, steps=12))
    rows = [m for m in metrics(run) if "loss" in m]
    assert [r["step"] for r in rows] == list(range(1, 13))
    for r in rows:
        terms = {k: r[k] for k in ("loss/mlm", "loss/itm", "loss/attention", "loss/hidden")}
        assert all(math.isfinite(v) for v in terms.values()), r
        assert r["loss"] == pytest.approx(sum(terms.values()), rel=1e-5)
    assert rows[0]["loss/hidden"] == 0 and all(r["loss/hidden"] > 0 for r in rows[1:])
    # the weights 3:1 hold in every batch of 8: 6 of a, 2 of b, within one sample
    steps = [json.loads(x) for x in (run / "samples" / "rank0.jsonl").read_text().splitlines()]
    for s in steps:
        c = Counter(k.split("/", 1)[0] for k in s["keys"])
        assert abs(c["a"] - 6) <= 1 and abs(c["b"] - 2) <= 1, s
    assert any(k.startswith("b/") and int(k.split("/")[1]) % 2 == 0   # a QA row (even line)
               for s in steps for k in s["keys"])
    cfg = (run / "config.yaml").read_text()
    assert "contrast_classes: 3" in cfg and "qa_labels:" in cfg
    model_cfg = json.loads((run / "final" / "config.json").read_text())
    assert model_cfg["num_itm_classes"] == 3
    meta = json.loads((run / "final" / "vlkd_train.json").read_text())
    assert meta["task"] == "pretrain" and meta["class_names"] == SHAPES


def test_sigkill_then_resume_reproduces_the_loss_sequence(world, tmp_path):
    """A real kill (no cleanup) after the step-4 checkpoint of a mixed, distilled pre-training
    run; --resume from it gives the uninterrupted run's losses, every term (the mixture's
    resumption with DataLoader workers: tests/test_mixture.py)."""
    def args(out, *extra):
        return _distill_args(world, out, "--set", "train.checkpoint_every=4", *extra,
                             steps=10)

    killed = tmp_path / "killed"
    ck = killed / "checkpoints" / "step-00000004"
    sigkill_when(args(killed), ck)
    assert not (killed / "final").exists()
    ref = tmp_path / "ref"
    invoke(args(ref))
    invoke(args(killed, "--resume", str(ck)))
    a, b = losses(ref), losses(killed)
    assert sorted(b) == list(range(1, 11))
    assert max(abs(a[s] - b[s]) for s in range(5, 11)) <= 1e-6
    ma = {m["step"]: m for m in metrics(ref) if "loss" in m}
    mb = {m["step"]: m for m in metrics(killed) if "loss" in m}
    for s in range(5, 11):
        for k in ("loss/mlm", "loss/itm", "loss/attention", "loss/hidden"):
            assert ma[s][k] == pytest.approx(mb[s][k], abs=1e-6), (s, k)
    last = sorted((killed / "checkpoints").glob("step-*"))[-1]
    state = json.loads((last / "trainer_state.json").read_text())
    assert [c[0] for c in state["data"]["corpora"]] == ["a", "b"]  # part of the data layout


def test_caption_finetune_starts_from_the_pretrained_student(world, tmp_path):
    from safetensors.torch import load_file

    pre = tmp_path / "pre"
    invoke(_distill_args(world, pre, steps=6))
    start = pre / "final"
    # lr 0: one step changes nothing, so the fine-tune's model is the pre-trained one
    same = tmp_path / "same"
    invoke(["finetune", "--task", "caption", "--regions", world["student"], "--model", start,
            *cli_args(world, same, "--set", "optim.weight_decay=0", steps=1), "--lr", "0"])
    a, b = load_file(str(start / "model.safetensors")), load_file(str(same / "final" /
                                                                     "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # plain fine-tuning and fine-tuning with KD from the pre-trained student both train
    for command, extra in [("finetune", ["--regions", world["student"], "--model", start]),
                           ("distill", ["--teacher", world["teacher_model"], "--student", start,
                                        "--student-regions", world["student"],
                                        "--teacher-regions", world["teacher"], "--set",
                                        "losses.hidden.params.queue_size=64"])]:
        run = tmp_path / command
        invoke([command, "--task", "caption", *extra, *cli_args(world, run, steps=20)])
        ls = losses(run)
        assert all(math.isfinite(v) for v in ls.values())
        assert sum(ls[s] for s in range(17, 21)) < sum(ls[s] for s in range(1, 5))
        assert json.loads((run / "final" / "vlkd_train.json").read_text())["task"] == "caption"


def test_corpora_are_checked_before_training(world, tmp_path):
    from click.testing import CliRunner

    from vlkd.train.cli import main

    def run(*extra):
        return CliRunner().invoke(main, _distill_args(world, tmp_path / "x", *extra, steps=1))

    res = run("--set", _corpora(world).replace(f"teacher_regions: {world['b_teacher']}, ", ""))
    assert res.exit_code == 2 and "data.corpora[1] (b): distill needs its teacher_regions" \
        in res.output
    res = run("--set", _corpora(world).replace("weight: 1}", "weight: 0}"))
    assert res.exit_code == 2 and "weights must be finite and > 0" in res.output
    res = run("--student-regions", str(world["student"]))
    assert res.exit_code == 2 and "data.corpora replaces data.regions" in res.output
