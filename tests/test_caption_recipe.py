"""VinVL's captioning recipe knobs (Oscar run_captioning.py): drop_worst_ratio /
drop_worst_after (BertCaptioningLoss) and freeze_embedding; both off by default."""
from __future__ import annotations

import pytest
import torch

from train_data import caption_model, cli_args, invoke, losses, make_world
from vlkd.train.config import TaskConfig, default_losses
from vlkd.train.losses import MaskedTokenLoss


def test_drop_worst_keeps_the_smallest_losses_after_the_warm_up_forwards():
    torch.manual_seed(0)
    logits, labels = torch.randn(10, 6), torch.randint(0, 6, (10,))
    labels[3] = -100                                            # 9 predicted positions
    keep = labels != -100
    nll = -torch.log_softmax(logits, -1)[keep][torch.arange(9), labels[keep]]
    loss = MaskedTokenLoss(drop_worst_ratio=0.2, drop_worst_after=2)
    loss.train()
    assert float(loss(logits, labels)) == pytest.approx(float(nll.mean()))   # forward 1
    assert float(loss(logits, labels)) == pytest.approx(float(nll.mean()))   # forward 2
    kept = int(9 * 0.8)                                         # Oscar: int(N * (1 - r)) = 7
    assert float(loss(logits, labels)) == pytest.approx(float(nll.sort().values[:kept].mean()))
    loss.eval()                                                 # evaluation: all, not counted
    assert float(loss(logits, labels)) == pytest.approx(float(nll.mean()))
    assert int(loss.state_dict()["iteration"]) == 3
    # with label smoothing, the per-token smoothed losses are ranked
    eps = 0.1
    logp = torch.log_softmax(logits, -1)[keep]
    smooth = (1 - eps) * nll + eps / 5 * (-(logp.sum(1)) - nll)
    ls = MaskedTokenLoss(label_smoothing=eps, drop_worst_ratio=0.5, drop_worst_after=0).train()
    assert float(ls(logits, labels)) == pytest.approx(float(smooth.sort().values[:4].mean()))
    assert float(MaskedTokenLoss(drop_worst_ratio=0.99).train()(logits, labels)) == \
        pytest.approx(float(nll.min()))                         # at least one position
    assert MaskedTokenLoss().state_dict() == {}                 # off: no new checkpoint key
    with pytest.raises(ValueError, match="drop_worst_ratio must be in"):
        MaskedTokenLoss(drop_worst_ratio=1.0)


def test_the_knobs_reach_the_caption_term_only_when_set():
    assert default_losses(TaskConfig(), distill=False)["task"]["params"] == {
        "label_smoothing": 0.1}
    on = default_losses(TaskConfig(drop_worst_ratio=0.2, drop_worst_after=20000), False)
    assert on["task"]["params"] == {"label_smoothing": 0.1, "drop_worst_ratio": 0.2,
                                    "drop_worst_after": 20000}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    w = make_world(tmp_path_factory.mktemp("recipe"))
    w["start"] = caption_model(w, w["root"] / "start", steps=3)
    return w


def test_drop_worst_in_a_run_changes_the_loss_only_after_its_forwards(world, tmp_path):
    from safetensors.torch import load_file

    def run(name, *extra):
        invoke(["finetune", "--task", "caption", "--regions", world["student"], "--model",
                "tiny", *cli_args(world, tmp_path / name, *extra, "--set",
                                  "train.checkpoint_every=6", steps=6)])
        return losses(tmp_path / name)

    plain = run("plain")
    drop = run("drop", "--set", "task.drop_worst_ratio=0.5", "--set", "task.drop_worst_after=3")
    assert [drop[s] for s in (1, 2, 3)] == pytest.approx([plain[s] for s in (1, 2, 3)],
                                                         abs=1e-7)
    assert drop[4] < plain[4]          # the same model at step 4; the worst half left out
    state = load_file(str(tmp_path / "drop" / "checkpoints" / "step-00000006" /
                          "losses.safetensors"))
    assert int(state["terms.task.iteration"]) == 6


def test_freeze_embedding_keeps_the_word_embeddings(world, tmp_path):
    from safetensors.torch import load_file

    start = load_file(str(world["start"] / "model.safetensors"))
    key = "bert.embeddings.word_embeddings.weight"
    for frozen in (True, False):
        out = tmp_path / f"f{frozen}"
        invoke(["finetune", "--task", "caption", "--regions", world["student"], "--model",
                world["start"], *cli_args(world, out, "--set",
                                          f"optim.freeze_embedding={str(frozen).lower()}",
                                          steps=3)])
        end = load_file(str(out / "final" / "model.safetensors"))
        assert torch.equal(end[key], start[key]) == frozen
        assert not torch.equal(end["bert.embeddings.position_embeddings.weight"],
                               start["bert.embeddings.position_embeddings.weight"])
