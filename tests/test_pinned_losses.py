"""The first losses of seeded tiny runs, pinned against numbers computed once.

The end-to-end tests check that training lowers the loss; these pin what the first steps
compute, so that a change anywhere on the way (data order, masking, tags, model init, loss
terms, optimizer, schedule) shows as a changed number. The fixture
``tests/fixtures/train_first_losses.json`` was written by this test with
``VLKD_REGENERATE_FIXTURES=1``; regenerate it only for an intended change, and say why in the
commit.

Runs: ``finetune --task caption`` of the tiny student and ``distill --task caption`` of the
tiny student from a tiny teacher adapted for 10 steps (tests/train_data.py), one thread, no
DataLoader workers, 5 optimizer steps each, every step logged.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from train_data import cli_args, invoke, make_world, metrics, train_teacher

FIXTURE = Path(__file__).parent / "fixtures" / "train_first_losses.json"
STEPS = 5
# Two runs on one machine give the same bits; other CPUs (vector widths, BLAS builds) may
# differ in the last digits, far below what a change of behaviour moves.
REL, ABS = 1e-4, 1e-9


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    world = make_world(tmp_path_factory.mktemp("pinned"))
    teacher = train_teacher(world, world["root"] / "teacher-run")
    out = {}
    invoke(["finetune", "--task", "caption", "--regions", world["student"], "--model", "tiny",
            *cli_args(world, world["root"] / "finetune", steps=STEPS)])
    out["finetune_caption"] = world["root"] / "finetune"
    invoke(["distill", "--task", "caption", "--teacher", teacher, "--student", "tiny",
            "--student-regions", world["student"], "--teacher-regions", world["teacher"],
            *cli_args(world, world["root"] / "distill", "--set",
                      "losses.hidden.params.queue_size=64", steps=STEPS)])
    out["distill_caption"] = world["root"] / "distill"
    return {name: [{k: v for k, v in m.items() if k == "loss" or k.startswith("loss/")}
                   for m in metrics(run) if "loss" in m] for name, run in out.items()}


def test_first_losses_match_the_fixture(runs):
    if os.environ.get("VLKD_REGENERATE_FIXTURES"):
        FIXTURE.parent.mkdir(exist_ok=True)
        FIXTURE.write_text(json.dumps(runs, indent=1, sort_keys=True) + "\n")
    want = json.loads(FIXTURE.read_text())
    assert sorted(runs) == sorted(want)
    for name, rows in want.items():
        got = runs[name]
        assert len(got) == len(rows) == STEPS, name
        for step, (g, w) in enumerate(zip(got, rows), start=1):
            assert sorted(g) == sorted(w), (name, step)
            for key, value in w.items():
                assert g[key] == pytest.approx(value, rel=REL, abs=ABS), (name, step, key)
    # what the pinned rows are: the distill run logs the task and both KD terms, whose
    # weighted sum is the loss; the hidden-state term is 0 while the queue is empty (step 1)
    assert set(want["finetune_caption"][0]) == {"loss", "loss/task"}
    first = want["distill_caption"][0]
    assert set(first) == {"loss", "loss/task", "loss/attention", "loss/hidden"}
    assert first["loss/hidden"] == 0 and all(r["loss/hidden"] > 0
                                             for r in want["distill_caption"][1:])
    for r in want["distill_caption"]:
        assert r["loss"] == pytest.approx(r["loss/task"] + r["loss/attention"] + r["loss/hidden"],
                                          rel=1e-6)
