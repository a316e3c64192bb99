"""Caption decoding against step-by-step computations written here (own input construction)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from train_data import scenes, write_captions
from vlkd.common.regionset import ImageRegions
from vlkd.train.decode import generate_captions
from vlkd.train.model import VLConfig, VLModel, box_geometry
from vlkd.train.stream import Record, Sample
from vlkd.train.tasks import TextEncoder
from vlkd.train.tasks.caption import CaptionTask
from vlkd.train.tokenizer import build_vocab

CLASSES = ["circle", "square", "star"]
MAX_TEXT = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("dec")
    tok = build_vocab([write_captions(d / "c.json", scenes(6))], d / "tok", vocab_size=30,
                      min_frequency=1)
    model = VLModel(VLConfig.preset("tiny", vocab_size=len(tok), region_dim=8,
                                    hidden_dropout=0.0, attention_dropout=0.0)).eval()
    enc = TextEncoder(tok, CLASSES, max_text_len=MAX_TEXT, max_tag_len=5)
    task = CaptionTask(enc, train=False)
    rng = np.random.default_rng(1)
    items = []
    for i, n in enumerate([2, 3]):
        r = ImageRegions(image_id=str(i), image_hw=(50, 60),
                         boxes=np.array([[1 + k, 2, 20 + k, 30] for k in range(n)], np.float32),
                         scores=np.ones(n, np.float32),
                         classes=rng.integers(0, 3, n).astype(np.int32),
                         features=rng.standard_normal((n, 8)).astype(np.float16),
                         box_digest=b"\0" * 16, image_digest=b"\0" * 16)
        items.append(task.transform(Sample(Record(str(i), str(i)), r, None, r.classes, rng)))
    return tok, model, enc, items, task.collate(items)


@torch.no_grad()
def _next_logprobs(model, enc, item, prefix):
    """log p(next | prefix) for one image, inputs built by hand."""
    tags = list(item["tag_ids"])
    text = list(prefix) + [enc.mask_id]
    ids = torch.tensor([text + tags])
    t, m = len(text), len(tags)
    pos = torch.tensor([list(range(t)) + [MAX_TEXT + j for j in range(m)]])
    types = torch.tensor([[0] * t + [1] * m])
    feats = torch.from_numpy(item["features"].astype(np.float32))[None]
    r = feats.shape[1]
    geom = box_geometry(torch.from_numpy(item["boxes"])[None], torch.tensor([[50.0, 60.0]]), 6)
    L = t + m + r
    mask = torch.zeros(1, L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(L):
            i_cap, j_cap = i < t, j < t
            mask[0, i, j] = (i_cap and j_cap and j <= i) or (i_cap and not j_cap) or \
                            (not i_cap and not j_cap)
    where = torch.zeros(1, t + m, dtype=torch.bool)
    where[0, t - 1] = True
    out = model(input_ids=ids, position_ids=pos, token_type_ids=types, region_features=feats,
                region_geometry=geom, attention_mask=mask, masked_positions=where, task="caption",
                output_hidden_states=False, output_attentions=False)
    return torch.log_softmax(out.mlm_logits[0].float(), -1)


def test_greedy_is_stepwise_argmax(setup):
    tok, model, enc, items, batch = setup
    got = generate_captions(model, batch, cls_id=enc.cls_id, sep_id=enc.sep_id,
                            mask_id=enc.mask_id, max_len=5, beam_size=1, max_text_len=MAX_TEXT)
    for item, seq in zip(items, got):
        prefix, want = [enc.cls_id], []
        for _ in range(5):
            nxt = int(_next_logprobs(model, enc, item, prefix).argmax())
            if nxt == enc.sep_id:
                break
            want.append(nxt)
            prefix.append(nxt)
        assert seq == want
    assert any(got)  # not the trivial "[SEP] first" everywhere


def test_beam_search_with_full_width_is_exhaustive(setup):
    tok, model, enc, items, batch = setup
    V = len(tok)
    got = generate_captions(model, batch, cls_id=enc.cls_id, sep_id=enc.sep_id,
                            mask_id=enc.mask_id, max_len=2, beam_size=V, max_text_len=MAX_TEXT)
    for item, seq in zip(items, got):
        first = _next_logprobs(model, enc, item, [enc.cls_id])
        best, best_seq = float(first[enc.sep_id]) / 1, []  # "[SEP]" right away: length 1
        for a in range(V):
            if a == enc.sep_id:
                continue
            second = _next_logprobs(model, enc, item, [enc.cls_id, a])
            for b in range(V):
                # [a, SEP] ends at length 2; [a, b] is cut at max_len 2: also length 2
                score = (float(first[a]) + float(second[b])) / 2
                cand = [a] if b == enc.sep_id else [a, b]
                if score > best + 1e-6:
                    best, best_seq = score, cand
        assert seq == best_seq and len(best_seq) == 2


def test_decoding_refuses_overlapping_positions(setup):
    tok, model, enc, items, batch = setup
    with pytest.raises(ValueError, match="max_text_len >= 9"):
        generate_captions(model, batch, cls_id=enc.cls_id, sep_id=enc.sep_id,
                          mask_id=enc.mask_id, max_len=7, beam_size=1, max_text_len=MAX_TEXT)


# --------------------------------------------------------------------------- beam search rules
# A scripted scoring model over a tiny vocabulary: generate_captions(cache=False) asks
# caption_step_logprobs for log p(next | prefix); here that is a table per image, so the beams
# can be followed by hand and every sequence enumerated.
CLS, MASK, SEP, A, B, C = range(6)
WORDS = (SEP, A, B, C)  # CLS and MASK get probability 0


def _dist(sep, a, b, c):
    logp = np.full(6, -np.inf)
    logp[list(WORDS)] = np.log(np.array([sep, a, b, c]) / (sep + a + b + c))
    return logp


class Scripted:
    """``caption_step_logprobs`` stand-in: ``tables[image](prefix words) -> log-probs``."""

    def __init__(self, tables):
        self.tables, self.calls = tables, 0

    def __call__(self, model, context, prefix, mask_id):
        self.calls += 1
        rows = [self.tables[int(context["image_hw"][n, 0])](tuple(prefix[n, 1:].tolist()))
                for n in range(prefix.shape[0])]
        return torch.tensor(np.stack(rows), dtype=torch.float32)


def _batch(num_images):
    """An evaluation batch whose text is just [CLS]; image_hw[:, 0] is the image's index."""
    b = num_images
    return {"input_ids": torch.full((b, 1), CLS), "token_type_ids": torch.zeros(b, 1).long(),
            "position_ids": torch.zeros(b, 1).long(), "text_mask": torch.ones(b, 1).bool(),
            "caption_part": torch.ones(b, 1).bool(), "region_features": torch.zeros(b, 1, 8),
            "region_boxes": torch.zeros(b, 1, 4), "region_mask": torch.ones(b, 1).bool(),
            "image_hw": torch.tensor([[float(i), 1.0] for i in range(b)])}


def _beam(monkeypatch, tables, k, max_len, length_penalty=1.0):
    from vlkd.train import decode

    scripted = Scripted(tables)
    monkeypatch.setattr(decode, "caption_step_logprobs", scripted)
    out = generate_captions(None, _batch(len(tables)), cls_id=CLS, sep_id=SEP, mask_id=MASK,
                            max_len=max_len, beam_size=k, length_penalty=length_penalty,
                            max_text_len=max_len + 2, cache=False)  # the scripted scorer
    return out, scripted.calls


def _score(table, words, max_len, lp=1.0):
    """Length-normalised score of a caption: with its [SEP] when shorter than max_len."""
    seq = list(words) + ([SEP] if len(words) < max_len else [])
    total = sum(table(tuple(seq[:i]))[tok] for i, tok in enumerate(seq))
    return total / len(seq) ** lp


def _brute_force(table, max_len, lp=1.0):
    """The best caption over every sequence of the vocabulary (exhaustive)."""
    best, best_words = -np.inf, None
    for n in range(max_len + 1):
        for words in itertools.product([A, B, C], repeat=n):
            s = _score(table, words, max_len, lp)
            if s > best:
                best, best_words = s, list(words)
    return best_words


def _reference_beam(table, k, max_len, lp=1.0):
    """Beam search as decode.py documents it, written out plainly.

    Each step extends every running hypothesis by every token and walks the extensions by
    summed log-probability: a [SEP] extension becomes a finished hypothesis scored
    ``sum / length ** lp`` (the length counts the [SEP]), any other a running one, until
    ``k`` running ones are found. The ``k`` best finished are kept; the search stops once
    there are ``k`` of them and the worst is at least the best running one's ``sum /
    step ** lp``. At ``max_len`` the running hypotheses count as finished.
    """
    running, finished = [((), 0.0)], []
    for step in range(1, max_len + 1):
        ext = sorted(((s + table(seq)[tok], seq, tok) for seq, s in running for tok in WORDS),
                     key=lambda e: -e[0])
        running = []
        for s, seq, tok in ext:
            if tok == SEP:
                finished.append((s / step ** lp, list(seq)))
            else:
                running.append((seq + (tok,), s))
                if len(running) == k:
                    break
        finished = sorted(finished, key=lambda f: -f[0])[:k]
        if not running or (len(finished) == k and
                           finished[-1][0] >= max(s for _, s in running) / step ** lp):
            return max(finished, key=lambda f: f[0])[1]
    finished += [(s / max_len ** lp, list(seq)) for seq, s in running]
    return max(finished, key=lambda f: f[0])[1]


def _table(entries, default=(0.25, 0.25, 0.25, 0.25)):
    dists = {k: _dist(*v) for k, v in entries.items()}
    fallback = _dist(*default)
    return lambda prefix: dists.get(prefix, fallback)


def test_beam_search_prunes_to_its_width(monkeypatch):
    """Width 2 drops "c" after step 1 (third of a .40, b .35, c .20, [SEP] .05) although
    "c [SEP]" (.20 × .90 = .18, score ln .18 / 2 = -0.857) is the best caption. At step 2
    (= max_len) the extensions by probability are a-b .14, b-c .1225, a-a .12, ...: the two
    running ones are cut at max_len and a-b (ln .14 / 2 = -0.983) beats b-c (-1.050)."""
    table = _table({(): (0.05, 0.40, 0.35, 0.20),
                    (A,): (0.10, 0.30, 0.35, 0.25),
                    (B,): (0.10, 0.25, 0.30, 0.35),
                    (C,): (0.90, 0.04, 0.03, 0.03)})
    assert _brute_force(table, 2) == [C]
    got, _ = _beam(monkeypatch, [table], k=2, max_len=2)
    assert got == [[A, B]] == [_reference_beam(table, 2, 2)]
    got, _ = _beam(monkeypatch, [table], k=3, max_len=2)  # wide enough to keep "c"
    assert got == [[C]] == [_reference_beam(table, 3, 2)]


def test_beam_search_stops_early_by_its_rule(monkeypatch):
    """Step 1: [SEP] .5 finishes "" (ln .5 = -0.693); a .3 and b .15 run. Step 2: a-[SEP] .18
    finishes "a" (-0.857), b-[SEP] .075 finishes "b" (-1.295), a-a .06 and b-a .045 run. The
    2 best finished ("", "a") are at least the best running one (ln .06 / 2 = -1.407): the
    search stops after 2 model calls and returns "". An exhaustive search finds
    "a a a a a" (ln(.3 × .2 × .999⁴) / 6 = -0.470), which the rule gives up: the rule bounds a
    running hypothesis by its score so far, as Hugging Face's early_stopping=False does."""
    table = _table({(): (0.50, 0.30, 0.15, 0.05),
                    (A,): (0.60, 0.20, 0.10, 0.10),
                    (B,): (0.50, 0.30, 0.10, 0.10),
                    (A, A): (0.001, 0.999, 1e-6, 1e-6),
                    (A, A, A): (0.001, 0.999, 1e-6, 1e-6),
                    (A, A, A, A): (0.001, 0.999, 1e-6, 1e-6),
                    (A, A, A, A, A): (0.999, 0.001, 1e-6, 1e-6)})
    got, calls = _beam(monkeypatch, [table], k=2, max_len=6)
    assert got == [[]] == [_reference_beam(table, 2, 6)]
    assert calls == 2
    assert _brute_force(table, 6) == [A] * 5
    assert _score(table, [A] * 5, 6) > _score(table, [], 6)


@pytest.mark.parametrize("k, max_len, lp", [(2, 3, 1.0), (3, 4, 1.0), (2, 4, 0.5), (3, 3, 2.0)])
def test_beam_search_matches_the_reference_on_random_tables(monkeypatch, k, max_len, lp):
    """Two images per batch (one may finish while the other runs), 20 random tables each."""
    for seed in range(20):
        tables = []
        for image in range(2):
            def table(prefix, image=image):
                g = np.random.default_rng([seed, image, len(prefix), *prefix])
                return _dist(*g.dirichlet([1.0, 1.0, 1.0, 1.0]))
            tables.append(table)
        got, _ = _beam(monkeypatch, tables, k=k, max_len=max_len, length_penalty=lp)
        for table, words in zip(tables, got):
            assert words == _reference_beam(table, k, max_len, lp), (seed, k, max_len, lp)
            best = _brute_force(table, max_len, lp)
            assert _score(table, words, max_len, lp) <= _score(table, best, max_len, lp) + 1e-9
