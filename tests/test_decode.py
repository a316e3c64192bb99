"""Caption decoding against step-by-step computations written here (own input construction)."""
from __future__ import annotations

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

