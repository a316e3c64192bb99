"""Self-critical sequence training (`--scst`): the CIDEr-D reward is pycocoevalcap's with the
training references' document frequencies (cached once), the one-pass log-probabilities are
decoding's, the loss is Oscar's, finetune/distill --scst run, log their rewards and resume
exactly, and (slow) a few hundred SCST steps raise train-split CIDEr over the XE model."""
from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest
import torch

from train_data import caption_model, cli_args, invoke, losses, make_world, metrics, train_teacher
from vlkd.train.losses import SCSTLoss
from vlkd.train.scst import CiderReward, reference_texts, reward_text, scoring_inputs

REFS = {
    "1": ["a red circle and a blue star", "a red circle with a blue star"],
    "2": ["a green square", "one green square"],
    "3": ["a yellow star and a red star and a blue circle", "three shapes"],
    "4": ["a blue triangle", "a triangle that is blue", "blue triangle"],
    "5": ["a red square and a red circle"],
}
HYPS = {"1": "a red circle and a star", "2": "a green square", "3": "a yellow star and a star",
        "4": "a blue blue triangle", "5": "a red circle"}


def test_reward_is_pycocoevalcaps_cider_over_the_whole_reference_set():
    from pycocoevalcap.cider.cider import Cider

    reward = CiderReward.from_references(REFS.values())
    assert reward.num_documents == 5
    ids = list(REFS)
    _, corpus = Cider().compute_score(REFS, {i: [HYPS[i]] for i in ids})
    # scored a few at a time (a batch), repeated (several samples of an image), and more
    # captions than images: each caption gets the score the whole corpus gives it
    batch = ["3", "1", "3", "3", "5", "2", "4", "1"]
    got = reward.scores([HYPS[i] for i in batch], [REFS[i] for i in batch])
    np.testing.assert_allclose(got, [corpus[ids.index(i)] for i in batch], rtol=1e-12)
    assert reward.scores([], []).shape == (0,)
    # scoring does not add the captions' unseen n-grams to the frequency table
    size = len(reward.frequencies)
    reward.scores(["zebra crossing the road"], [REFS["1"]])
    assert len(reward.frequencies) == size


def test_frequencies_are_counted_once_and_cached(tmp_path, monkeypatch, caplog):
    path = tmp_path / "df.json.gz"
    first = CiderReward.cached(path, REFS)
    data = json.loads(gzip.open(path).read())
    assert data["format"] == "vlkd-cider-df/1" and data["num_documents"] == 5
    calls = []
    monkeypatch.setattr(CiderReward, "from_references",
                        classmethod(lambda cls, refs, **kw: calls.append(1) or first))
    again = CiderReward.cached(path, REFS)              # read, not counted
    assert calls == [] and dict(again.frequencies) == dict(first.frequencies)
    assert again.num_documents == first.num_documents
    other = {**REFS, "6": ["a purple circle"]}
    CiderReward.cached(path, other)                     # other references: counted again
    assert calls == [1] and "other references" in caplog.text


def test_texts_are_compared_as_words(tmp_path):
    from vlkd.train.tokenizer import build_vocab

    f = tmp_path / "c.txt"
    f.write_text("A man's red bike. A dog!\n")
    tok = build_vocab([f], tmp_path / "tok", vocab_size=200, min_frequency=1)
    assert reward_text("a man ' s red bike .") == "a man s red bike <eos>"
    refs = reference_texts(tok, {"9": ["A man's red bike.", "A dog!"]})
    assert refs == {"9": ["a man s red bike <eos>", "a dog <eos>"]}


def test_scst_loss_is_minus_advantage_times_mean_log_probability():
    torch.manual_seed(0)
    logits = torch.randn(5, 7, requires_grad=True)
    targets = torch.tensor([1, 2, 3, 0, 6])
    seq = torch.tensor([0, 0, 0, 1, 1])             # caption 0: 3 tokens, caption 1: 2
    adv = torch.tensor([0.5, -2.0])
    loss = SCSTLoss()(logits, targets, seq, adv)
    lp = torch.log_softmax(logits, -1)[torch.arange(5), targets]
    want = -(0.5 * lp[:3].mean() - 2.0 * lp[3:].mean()) / 2
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    w = make_world(tmp_path_factory.mktemp("scst"))
    w["xe"] = caption_model(w, w["root"] / "xe", steps=30)
    return w


def test_one_forward_gives_the_log_probabilities_decoding_had(world):
    from vlkd.train import build
    from vlkd.train.config import load_config
    from vlkd.train.decode import caption_step_logprobs
    from vlkd.train.scst import expand, sample_captions
    from vlkd.train.stream import make_loader
    from vlkd.train.tasks import build_task

    cfg = load_config(None, [f"data.captions={world['captions']}"])
    tok = build.resolve_tokenizer(cfg, str(world["xe"]))
    enc = build.make_encoder(cfg, tok, build.tag_names(cfg, str(world["student"])))
    records, _ = build.scst_records(cfg)
    stream = build.make_stream(cfg, records, build_task(cfg, enc, train=False),
                               regions=str(world["student"]), batch_size=3)
    batch = next(iter(make_loader(stream)))
    model = build.load_model_dir(world["xe"]).eval()
    v = tok.get_vocab()
    torch.manual_seed(3)
    ctx = expand(batch, 2)
    caps = sample_captions(model, ctx, cls_id=v["[CLS]"], sep_id=v["[SEP]"],
                           mask_id=v["[MASK]"], max_len=10)
    inputs = scoring_inputs(ctx, caps, cls_id=v["[CLS]"], mask_id=v["[MASK]"],
                            pad_id=v["[PAD]"], geometry_dim=model.config.geometry_dim)
    with torch.no_grad():
        out = model(inputs, task="caption", output_hidden_states=False, output_attentions=False)
    got = torch.log_softmax(out.mlm_logits.float(), -1)
    got = got[torch.arange(len(inputs["scst_targets"])), inputs["scst_targets"]]
    want = []
    for r, cap in enumerate(caps):
        row = {k: t[r:r + 1] for k, t in ctx.items()}
        for t, token in enumerate(cap):
            prefix = torch.tensor([[v["[CLS]"], *cap[:t]]])
            want.append(float(caption_step_logprobs(model, row, prefix, v["[MASK]"])[0, token]))
    assert len(want) == got.numel() == sum(map(len, caps))
    np.testing.assert_allclose(got.numpy(), want, atol=2e-5)


def _scst_args(world, out, *extra, steps=4):
    return cli_args(world, out, "--scst", "--set", "scst.max_len=14", "--set",
                    "scst.samples=3", *extra, steps=steps)


def test_finetune_scst_logs_rewards_and_resumes_exactly(world, tmp_path):
    run = tmp_path / "scst"
    invoke(["finetune", "--task", "caption", "--regions", world["student"], "--model",
            world["xe"], *_scst_args(world, run, "--set", "train.checkpoint_every=3", steps=6)])
    rows = [m for m in metrics(run) if "loss" in m]
    assert len(rows) == 6
    for r in rows:
        for k in ("loss", "loss/task", "scst/sample_cider", "scst/greedy_cider"):
            assert math.isfinite(r[k]), (k, r)
        assert r["loss"] == r["loss/task"] and r["scst/sample_cider"] >= 0
    assert (run / "cider-df.json.gz").is_file()
    assert "scst:\n  enabled: true" in (run / "config.yaml").read_text()
    # stopped after step 3, resumed: the same samples (RNG restored), the same losses
    part = tmp_path / "part"
    args = ["finetune", "--task", "caption", "--regions", world["student"], "--model",
            world["xe"], *_scst_args(world, part, "--set", "train.checkpoint_every=3",
                                     steps=6)]
    invoke([*args, "--set", "train.stop_after=3"])
    invoke([*args, "--resume", str(part)])
    a, b = losses(run), losses(part)
    assert sorted(b) == list(range(1, 7))
    assert max(abs(a[s] - b[s]) for s in range(4, 7)) <= 1e-6


def test_distill_scst_computes_the_kd_terms_on_the_sampled_captions(world, tmp_path):
    teacher = train_teacher(world, tmp_path / "teacher", steps=5)
    run = tmp_path / "kd"
    invoke(["distill", "--task", "caption", "--teacher", teacher, "--student", world["xe"],
            "--student-regions", world["student"], "--teacher-regions", world["teacher"],
            *_scst_args(world, run, "--set", "losses.hidden.params.queue_size=64", steps=3)])
    rows = [m for m in metrics(run) if "loss" in m]
    assert len(rows) == 3
    for r in rows:
        terms = [r[k] for k in ("loss/task", "loss/attention", "loss/hidden")]
        assert all(math.isfinite(x) for x in terms + [r["scst/greedy_cider"]])
        assert r["loss"] == pytest.approx(sum(terms), rel=1e-5)
    assert rows[-1]["loss/attention"] > 0 and rows[-1]["loss/hidden"] > 0


def test_scst_is_refused_for_other_tasks(world, tmp_path):
    from click.testing import CliRunner

    from vlkd.train.cli import main

    vq, va = world["vqa"]
    res = CliRunner().invoke(main, [str(a) for a in [
        "finetune", "--task", "vqa", "--regions", world["student"], "--model", "tiny",
        "--vqa-questions", vq, "--vqa-annotations", va, *cli_args(world, tmp_path / "v"),
        "--scst"]])
    assert res.exit_code == 2 and "--scst optimises captions" in res.output


@pytest.mark.slow
def test_a_few_hundred_scst_steps_raise_train_cider_over_the_xe_model(tmp_path):
    """XE to a model that writes the right number of objects but mixes up later ones, then
    100 SCST steps of 16 images: train-split CIDEr (vlkd-train evaluate, greedy) rises."""
    torch.set_num_threads(1)
    w = make_world(tmp_path / "w")
    xe = tmp_path / "xe"
    invoke(["finetune", "--task", "caption", "--regions", w["student"], "--model", "tiny",
            *cli_args(w, xe, "--set", "task.label_smoothing=0", steps=800)])
    sc = tmp_path / "sc"
    invoke(["finetune", "--task", "caption", "--regions", w["student"], "--model",
            xe / "final", *cli_args(w, sc, "--scst", "--set", "scst.max_len=14",
                                    "--set", "data.batch_size=16", "--set",
                                    "train.log_every=10", steps=100), "--lr", "6e-4"])
    scores = {}
    for name, run in (("xe", xe), ("scst", sc)):
        out = tmp_path / f"eval-{name}"
        invoke(["evaluate", "--model", run / "final", "--regions", w["student"], "--captions",
                w["captions"], "--split", "train", "--greedy", "-o", out, "--set",
                "eval.spice=false", "--max-len", "14"])
        scores[name] = json.loads((out / "scores.json").read_text())["CIDEr"]
    rewards = [m["scst/greedy_cider"] for m in metrics(sc) if "loss" in m]
    assert scores["scst"] > scores["xe"] + 0.05, (scores, rewards)
