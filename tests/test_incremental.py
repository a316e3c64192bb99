"""Cached (incremental) caption decoding equals the uncached one: the same next-token
log-probabilities along any beam path, the same captions and scores from greedy and beam
search, and the same ``vlkd-train evaluate`` results."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from train_data import cli_args, invoke, make_world, scenes, write_captions
from vlkd.common.regionset import ImageRegions
from vlkd.train import decode, evaluation
from vlkd.train.decode import caption_step_logprobs, generate_captions
from vlkd.train.incremental import IncrementalCaptioner
from vlkd.train.model import VLConfig, VLModel
from vlkd.train.stream import Record, Sample
from vlkd.train.tasks import TextEncoder
from vlkd.train.tasks.caption import CaptionTask
from vlkd.train.tokenizer import build_vocab

# Two-word names make some tags two tokens long; max_tag_len 6 cuts the longer tag sentences.
CLASSES = ["circle", "square", "star", "red circle", "blue"]
MAX_TEXT = 12
# Regions per image of each test batch: padded tags and regions, an image without regions.
LAYOUTS = {0: [1, 3, 0, 6, 2], 1: [4, 1, 5], 2: [2, 2, 6, 1, 3, 0]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("inc")
    tok = build_vocab([write_captions(d / "c.json", scenes(12))], d / "tok", vocab_size=60,
                      min_frequency=1)
    enc = TextEncoder(tok, CLASSES, max_text_len=MAX_TEXT, max_tag_len=6)
    return tok, enc, CaptionTask(enc, train=False)


def _batch(task, seed):
    rng = np.random.default_rng(seed)
    items = []
    for i, n in enumerate(LAYOUTS[seed]):
        r = ImageRegions(image_id=str(i), image_hw=(50 + 7 * i, 60),
                         boxes=np.array([[1 + k, 2, 20 + 3 * k, 30 + k] for k in range(n)],
                                        np.float32).reshape(n, 4),
                         scores=np.ones(n, np.float32),
                         classes=rng.integers(0, len(CLASSES), n).astype(np.int32),
                         features=rng.standard_normal((n, 8)).astype(np.float16),
                         box_digest=b"\0" * 16, image_digest=b"\0" * 16)
        items.append(task.transform(Sample(Record(str(i), str(i)), r, None, r.classes, rng)))
    return task.collate(items)


def _model(tok, enc, preset):
    """A random model whose captions depend on the image and end at different steps: weights
    drawn wider than BERT's (a random model at 0.02 gives every image the same flat
    distribution) and the [SEP] logit raised."""
    init, sep_bias = {"tiny": (0.2, 1.0), "student": (0.1, 2.0)}[preset]
    torch.manual_seed(0)
    model = VLModel(VLConfig.preset(preset, vocab_size=len(tok), region_dim=8,
                                    hidden_dropout=0.0, attention_dropout=0.0,
                                    initializer_range=init)).eval()
    with torch.no_grad():
        model.mlm_head.bias[enc.sep_id] += sep_bias
    return model


@pytest.fixture(scope="module")
def models(setup):
    tok, enc, _ = setup
    return {p: _model(tok, enc, p) for p in ("tiny", "student")}


def _decode(model, enc, batch, **kw):
    return generate_captions(model, batch, cls_id=enc.cls_id, sep_id=enc.sep_id,
                             mask_id=enc.mask_id, max_text_len=MAX_TEXT, return_scores=True,
                             **kw)


@pytest.mark.parametrize("preset", ["tiny", "student"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_steps_equal_the_uncached_logprobs_along_reordered_beams(setup, models, preset, dtype):
    """Random beam paths (each row extends a random row of its image, random tokens): every
    step's log-probabilities equal a full forward of the whole sequence. In float64 the two
    agree to the float32 rounding of the returned log-probabilities (the same arithmetic); in
    float32 to 1e-5 relative (the 12-layer student's log-probabilities reach -13, its largest
    difference is ~3e-5)."""
    tok, enc, task = setup
    model, k = models[preset], 3
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=2e-6)
    if dtype != torch.float32:
        model = copy.deepcopy(model).to(dtype)  # .to() would change the shared fixture
    for seed in LAYOUTS:
        batch = {key: v.to(dtype) if v.is_floating_point() else v
                 for key, v in _batch(task, seed).items() if isinstance(v, torch.Tensor)}
        bsz = batch["input_ids"].shape[0]
        context = {key: v.repeat_interleave(k, 0) for key, v in batch.items()}
        g = torch.Generator().manual_seed(seed)
        cached = IncrementalCaptioner(model, batch, mask_id=enc.mask_id, beams=k, max_len=7)
        prefix = torch.full((bsz * k, 1), enc.cls_id)
        parents = None
        for _ in range(7):
            got = cached.step(prefix, parents)
            want = caption_step_logprobs(model, context, prefix, enc.mask_id)
            assert got.shape == want.shape == (bsz * k, len(tok))
            torch.testing.assert_close(got, want, **tol)
            parents = (torch.arange(bsz * k) // k * k
                       + torch.randint(0, k, (bsz * k,), generator=g))
            nxt = torch.randint(5, len(tok), (bsz * k, 1), generator=g)
            prefix = torch.cat([prefix[parents], nxt], 1)


@pytest.mark.parametrize("preset, seeds", [("tiny", (0, 1, 2)), ("student", (0, 1))])
@pytest.mark.parametrize("beam, max_len", [(1, 3), (1, 9), (3, 3), (3, 9), (5, 6)])
def test_cached_decoding_gives_the_same_captions_and_scores(setup, models, preset, seeds,
                                                            beam, max_len):
    tok, enc, task = setup
    model = models[preset]
    lengths = []
    for seed in seeds:
        batch = _batch(task, seed)
        got = _decode(model, enc, batch, beam_size=beam, max_len=max_len)
        want = _decode(model, enc, batch, beam_size=beam, max_len=max_len, cache=False)
        assert [s for s, _ in got] == [s for s, _ in want], (seed, beam, max_len)
        for (_, a), (_, b) in zip(got, want):
            assert a == pytest.approx(b, abs=1e-5, rel=0)
        assert all(np.isfinite(a) for _, a in got)
        lengths += [len(s) for s, _ in got]
    # Both kinds of ending are exercised: a [SEP] (or early stop) and the max_len cut.
    assert min(lengths) < max_len and max(lengths) == max_len, lengths


def test_tiny_model_stops_at_several_steps(setup, models):
    """The tiny model's captions end at different steps within a batch, so images finish
    (and their rows become placeholders) while others run."""
    tok, enc, task = setup
    got = _decode(models["tiny"], enc, _batch(task, 0), beam_size=3, max_len=9)
    assert len({len(s) for s, _ in got}) >= 3


def test_context_without_tags_or_regions(setup, models):
    """Text [CLS] only and no regions at all: the caption attends to itself alone."""
    tok, enc, task = setup
    model = models["tiny"]
    b = 2
    batch = {"input_ids": torch.full((b, 1), enc.cls_id), "token_type_ids": torch.zeros(b, 1).long(),
             "position_ids": torch.zeros(b, 1).long(), "text_mask": torch.ones(b, 1).bool(),
             "caption_part": torch.ones(b, 1).bool(), "region_features": torch.zeros(b, 0, 8),
             "region_boxes": torch.zeros(b, 0, 4), "region_mask": torch.zeros(b, 0).bool(),
             "image_hw": torch.tensor([[50.0, 60.0]] * b)}
    cached = IncrementalCaptioner(model, batch, mask_id=enc.mask_id, beams=1, max_len=3)
    prefix = torch.full((b, 1), enc.cls_id)
    for tok_id in (7, 9, 11):
        torch.testing.assert_close(cached.step(prefix),
                                   caption_step_logprobs(model, batch, prefix, enc.mask_id),
                                   rtol=0, atol=1e-5)
        prefix = torch.cat([prefix, torch.full((b, 1), tok_id)], 1)


def test_misuse_is_refused(setup, models):
    tok, enc, task = setup
    batch = _batch(task, 1)
    cached = IncrementalCaptioner(models["tiny"], batch, mask_id=enc.mask_id, beams=2, max_len=2)
    prefix = torch.full((6, 1), enc.cls_id)
    with pytest.raises(ValueError, match="expects prefixes of 1 tokens"):
        cached.step(torch.cat([prefix, prefix], 1))
    cached.step(prefix)
    with pytest.raises(ValueError, match="same image"):
        cached.step(torch.cat([prefix, prefix], 1), [2, 2, 0, 0, 4, 4])
    cached.step(torch.cat([prefix, prefix], 1), [1, 1, 3, 2, 4, 4])
    with pytest.raises(ValueError, match="max_len 2"):
        cached.step(torch.cat([prefix] * 3, 1), list(range(6)))


# --------------------------------------------------------------------------- vlkd-train evaluate
@pytest.mark.slow
def test_evaluate_results_are_unchanged(tmp_path_factory, monkeypatch):
    """A tiny captioning run evaluated with and without the cache: the same predictions file,
    byte for byte, and the same scores."""
    torch.set_num_threads(1)
    world = make_world(tmp_path_factory.mktemp("inc-eval"))
    run = world["root"] / "cap"
    invoke(["finetune", "--task", "caption", "--regions", world["student"], "--model", "tiny",
            *cli_args(world, run, "--set", "optim.lr=5e-3", steps=150)])

    def evaluate(out):
        invoke(["evaluate", "--model", run / "final", "--regions", world["student"],
                "--captions", world["captions"], "--split", "val", "-o", out,
                "--beam-size", "3", "--set", "eval.spice=false"])
        return ((out / "predictions_caption.json").read_bytes(),
                json.loads((out / "scores.json").read_text()))

    cached_preds, cached_scores = evaluate(world["root"] / "eval-cached")
    calls = []

    def uncached(*args, **kw):
        calls.append(1)
        return decode.generate_captions(*args, **kw, cache=False)

    monkeypatch.setattr(evaluation, "generate_captions", uncached)
    plain_preds, plain_scores = evaluate(world["root"] / "eval-uncached")
    assert calls
    assert cached_preds == plain_preds
    preds = json.loads(cached_preds)
    assert len(preds) == len(world["val_ids"]) and len({p["caption"] for p in preds}) > 1
    for key in ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr"):
        assert cached_scores[key] == plain_scores[key]
