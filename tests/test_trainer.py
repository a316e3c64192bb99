"""The training loop: schedule, optimizer groups, pickle-free checkpoints, exact resume, NaN
stop, best-model selection."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from train_data import (cli_args, invoke, losses, make_world, metrics, scenes, train_teacher,
                        write_captions, write_sets)
from vlkd.train.checkpoint import optimizer_from_files, optimizer_to_files
from vlkd.train.trainer import build_optimizer, linear_schedule


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    w = make_world(tmp_path_factory.mktemp("trainer"))
    w["teacher_model"] = train_teacher(w, w["root"] / "teacher-run")
    return w


def test_linear_schedule_matches_formula():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=2.0)
    sched = linear_schedule(opt, warmup=4, total=10)
    got = []
    for _ in range(10):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [2.0 * (s + 1) / 4 for s in range(4)] + [2.0 * (10 - s) / 6 for s in range(4, 10)]
    np.testing.assert_allclose(got, want)


def test_no_weight_decay_on_biases_and_layer_norms():
    from vlkd.train.model import VLConfig, VLModel

    model = VLModel(VLConfig.preset("tiny", vocab_size=50, region_dim=8))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    for name, p in model.named_parameters():
        expect = p.ndim >= 2 and "LayerNorm" not in name and "layer_norm" not in name
        assert (id(p) in decayed) == expect, name
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0


def test_optimizer_state_round_trips_through_safetensors_and_json(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = build_optimizer(net, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        net(torch.randn(5, 4)).square().sum().backward()
        opt.step()
    tensors, meta = optimizer_to_files(opt)
    save_file(tensors, str(tmp_path / "o.safetensors"))
    (tmp_path / "o.json").write_text(json.dumps(meta))
    restored = optimizer_from_files(load_file(str(tmp_path / "o.safetensors")),
                                     json.loads((tmp_path / "o.json").read_text()))
    ref = opt.state_dict()
    assert restored["param_groups"] == [dict(g, betas=tuple(g["betas"])) for g in ref["param_groups"]]
    for pid, st in ref["state"].items():
        for k, v in st.items():
            assert torch.equal(restored["state"][pid][k], v)


def _distill_args(world, out, *extra, steps=14, workers=2):
    return ["distill", "--task", "caption", "--teacher", world["teacher_model"], "--student",
            "tiny", "--student-regions", world["student"], "--teacher-regions", world["teacher"],
            *cli_args(world, out, "--batch-size", "5", "--set", "optim.grad_accum=2",
                      "--set", "train.checkpoint_every=4", "--set", "data.chunk_size=3",
                      "--set", "data.shuffle_buffer=7",
                      "--set", "losses.hidden.params.queue_size=50", *extra,
                      steps=steps, workers=workers)]


def test_resume_continues_exactly(world, tmp_path):
    """Stopped after step 6 (checkpoint at 4), resumed from step 4: steps 5..14 (crossing an
    epoch, with DataLoader workers, accumulation, dropout and the KD queue) are the same."""
    invoke(_distill_args(world, tmp_path / "full"))
    invoke(_distill_args(world, tmp_path / "cut", "--set", "train.stop_after=6"))
    cut = tmp_path / "cut" / "checkpoints"
    assert sorted(p.name for p in cut.iterdir()) == ["step-00000004"]
    assert max(losses(tmp_path / "cut")) == 6
    invoke(_distill_args(world, tmp_path / "cut", "--resume", cut / "step-00000004"))
    a, b = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(a) == sorted(b) == list(range(1, 15))
    for step in range(5, 15):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    assert len({round(v, 6) for v in a.values()}) > 5  # the losses do change between steps
    # same final weights and the same queue of negatives
    wa = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    qa = load_file(str(tmp_path / "full/checkpoints/step-00000014/losses.safetensors"))
    qb = load_file(str(tmp_path / "cut/checkpoints/step-00000014/losses.safetensors"))
    assert any("queue" in k for k in qa)
    assert all(torch.allclose(qa[k].float(), qb[k].float(), atol=1e-6) for k in qa)


def test_resume_refuses_another_data_layout(world, tmp_path):
    invoke(_distill_args(world, tmp_path / "r", "--set", "train.stop_after=4", steps=8))
    from click.testing import CliRunner
    from vlkd.train.cli import main
    args = _distill_args(world, tmp_path / "r", "--resume", tmp_path / "r", steps=8, workers=1)
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 2
    assert "num_workers: checkpoint 2 vs now 1" in res.output


def test_checkpoints_are_pickle_free_and_rotated(world, tmp_path):
    run = tmp_path / "ck"
    invoke(["finetune", "--task", "caption", "--regions", world["student"], "--model", "tiny",
            *cli_args(world, run, "--set", "train.checkpoint_every=3",
                      "--set", "train.keep_checkpoints=2", steps=10)])
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-00000009", "step-00000010"]
    for ck in (run / "checkpoints").iterdir():
        for f in ck.rglob("*"):
            if f.is_file():
                assert f.suffix in (".safetensors", ".json", ".txt"), f
                if f.suffix == ".safetensors":
                    with safe_open(str(f), "pt") as h:  # no pickle anywhere
                        list(h.keys())
        state = json.loads((ck / "trainer_state.json").read_text())
        assert {"step", "epoch", "batch_in_epoch", "data", "optimizer", "scheduler"} <= set(state)
    state = json.loads((run / "checkpoints/step-00000010/trainer_state.json").read_text())
    # 32 training images × 2 captions = 64 samples = 8 batches per epoch: step 10 = epoch 1 + 2
    assert (state["epoch"], state["batch_in_epoch"]) == (1, 2)
    assert state["scheduler"]["last_epoch"] == 10


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    from click.testing import CliRunner
    from vlkd.train.cli import main
    from vlkd.train.stream import Record, RegionStream

    torch.set_num_threads(1)
    sc = scenes(20, seed=2)
    clean, _ = write_sets(tmp_path / "clean", sc, num_shards=2, teacher=False)
    caps = write_captions(tmp_path / "c.json", sc, per_image=1)
    world = make_world(tmp_path / "w")  # for the tokenizer
    # the data order depends only on ids and records: find an image first seen in batch 3
    recs = [Record(im["image_id"], im["image_id"]) for im in sc]
    s = RegionStream(clean, recs, transform=lambda x: {}, collate=lambda x: {}, batch_size=4,
                     chunk_size=64, shuffle_buffer=1024, seed=42, rank=0, world_size=1)
    order = [iid for iid, _ in s.iter_refs(0, 0, 0)]
    bad = order[9]  # third batch of 4
    poisoned, _ = write_sets(tmp_path / "bad", sc, num_shards=2, teacher=False, poison_image=bad)
    run = tmp_path / "run"
    args = ["finetune", "--task", "caption", "--regions", poisoned, "--model", "tiny",
            "--captions", caps, "--tokenizer", world["tok"], "-o", run, "--max-steps", "10",
            "--batch-size", "4", "--set", "train.progress=false", "--set", "data.num_workers=0",
            "--set", "train.checkpoint_every=1", "--set", "train.log_every=1"]
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 3
    assert "loss is not finite at step 3" in res.output
    assert "The last good checkpoint is" in res.output and "step-00000002" in res.output
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001",
                                                                      "step-00000002"]
    assert "error" in metrics(run)[-1]


def test_periodic_evaluation_keeps_the_best_model(world, tmp_path):
    run = tmp_path / "vqa"
    q, a = world["vqa"]
    eq, ea = world["vqa_val"]
    invoke(["finetune", "--task", "vqa", "--regions", world["student"], "--model", "tiny",
            "--vqa-questions", q, "--vqa-annotations", a, "--eval-vqa-questions", eq,
            "--eval-vqa-annotations", ea, "--set", "data.answer_min_count=1",
            *cli_args(world, run, "--set", "train.eval_every=4", steps=12)])
    evals = [m for m in metrics(run) if "eval/accuracy" in m]
    assert [m["step"] for m in evals] == [4, 8, 12]
    best = json.loads((run / "best" / "best.json").read_text())
    top = max(evals, key=lambda m: m["eval/accuracy"])  # first of the maxima wins
    assert best == {"metric": "accuracy", "value": pytest.approx(top["eval/accuracy"]),
                    "step": top["step"]}
    assert (run / "best" / "model.safetensors").is_file()
    assert (run / "best" / "answers.txt").is_file()
