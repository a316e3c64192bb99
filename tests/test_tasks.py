"""Task transforms and collation: Oscar masking, tag sequences, positions, masks, targets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from train_data import scenes, write_captions
from vlkd.common.regionset import ImageRegions
from vlkd.train.model import IGNORE_INDEX
from vlkd.train.stream import Record, Sample
from vlkd.train.tasks import TextEncoder, model_inputs
from vlkd.train.tasks.caption import CaptionTask
from vlkd.train.tasks.pretrain import PretrainTask
from vlkd.train.tasks.vqa import VQATask
from vlkd.train.tokenizer import build_vocab

CLASSES = ["circle", "square", "traffic light", "star"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    caps = write_captions(d / "c.json", scenes(30))
    return build_vocab([caps], d / "tok", vocab_size=200, min_frequency=1,
                       extra_words=CLASSES + ["what colour is it"])


def _regions(n, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    boxes = np.array([[10 * i, 5, 10 * i + 20, 40] for i in range(n)], np.float32)
    return ImageRegions(image_id=f"im{seed}", image_hw=(100, 200), boxes=boxes,
                        scores=np.ones(n, np.float32),
                        classes=rng.integers(0, len(CLASSES), n).astype(np.int32),
                        features=rng.standard_normal((n, dim)).astype(np.float16),
                        box_digest=b"\0" * 16, image_digest=b"\0" * 16)


def _sample(text, n=3, seed=0, answers=()):
    r = _regions(n, seed=seed)
    return Sample(Record(f"k{seed}", r.image_id, text, answers), r, None, r.classes,
                  np.random.default_rng(seed))


def test_tag_ids_are_the_tokenised_class_sentence(tok):
    enc = TextEncoder(tok, CLASSES, max_text_len=12, max_tag_len=6)
    classes = np.array([2, 0, 2, 3])
    sentence = " ".join(CLASSES[c] for c in classes)  # "traffic light circle traffic light star"
    ref = tok(sentence, add_special_tokens=False)["input_ids"]
    sep = tok.get_vocab()["[SEP]"]
    assert list(enc.tag_ids(classes)) == ref[:5] + [sep]
    enc_all = TextEncoder(tok, CLASSES, max_tag_len=30)
    assert list(enc_all.tag_ids(classes)) == ref + [sep]
    uniq = TextEncoder(tok, CLASSES, max_tag_len=30, unique_tags=True)
    assert list(uniq.tag_ids(classes)) == tok("traffic light circle star",
                                              add_special_tokens=False)["input_ids"] + [sep]


def test_caption_masking_follows_oscar(tok):
    enc = TextEncoder(tok, CLASSES, max_text_len=40)
    vocab = tok.get_vocab()
    task = CaptionTask(enc, max_regions=50, mask_prob=0.15, max_masked=3)
    text = "a red circle and a blue square with a green star and a yellow circle"
    clean = np.array(tok(text)["input_ids"])
    n_cand = len(clean) - 1  # every token after [CLS], the closing [SEP] included
    want = min(max(round(0.15 * n_cand), 1), 3)
    kinds = {"mask": 0, "same": 0, "random": 0}
    sep_picked = 0
    for seed in range(600):
        out = task.transform(_sample(text, seed=seed))
        ids, labels = out["text_ids"], out["text_labels"]
        picked = np.nonzero(labels != IGNORE_INDEX)[0]
        assert len(picked) == want and 0 not in picked
        np.testing.assert_array_equal(labels[picked], clean[picked])
        untouched = np.setdiff1d(np.arange(len(clean)), picked)
        np.testing.assert_array_equal(ids[untouched], clean[untouched])
        for p in picked:
            kinds["mask" if ids[p] == vocab["[MASK]"] else
                  "same" if ids[p] == clean[p] else "random"] += 1
        sep_picked += int(len(clean) - 1 in picked)
    total = sum(kinds.values())
    assert abs(kinds["mask"] / total - 0.8) < 0.04
    assert abs(kinds["random"] / total - 0.1) < 0.03
    assert sep_picked > 0  # the model learns to end captions


def test_collate_layout_and_seq2seq_mask(tok):
    enc = TextEncoder(tok, CLASSES, max_text_len=10, max_tag_len=8)
    task = CaptionTask(enc)
    items = [task.transform(_sample("a red circle", n=2, seed=1)),
             task.transform(_sample("a blue square and a star", n=4, seed=2))]
    b = task.collate(items)
    ta = max(len(it["text_ids"]) for it in items)
    tb = max(len(it["tag_ids"]) for it in items)
    assert b["input_ids"].shape == (2, ta + tb)
    assert b["region_features"].dtype == torch.float16
    assert b["region_features"].shape == (2, 4, 8)
    np.testing.assert_array_equal(b["region_features"][0, :2].numpy(), items[0]["features"])
    assert b["region_mask"].tolist() == [[True, True, False, False], [True] * 4]
    for k, it in enumerate(items):
        m = len(it["tag_ids"])
        # tags start at position max_text_len whatever the text length (Oscar's layout)
        assert b["position_ids"][k, ta:ta + m].tolist() == list(range(10, 10 + m))
        assert b["token_type_ids"][k, ta:ta + m].tolist() == [1] * m
        assert b["input_ids"][k, ta:ta + m].tolist() == list(it["tag_ids"])

    inputs = model_inputs(b, geometry_dim=6, seq2seq=True)
    mask = inputs["attention_mask"]
    L = ta + tb + 4
    assert mask.shape == (2, L, L)
    # expected mask built position by position
    for k, it in enumerate(items):
        n, m, r = len(it["text_ids"]), len(it["tag_ids"]), len(it["features"])
        cap = set(range(n))
        ctx = set(range(ta, ta + m)) | set(range(ta + tb, ta + tb + r))
        for i in range(L):
            for j in range(L):
                want = (i in cap and j in cap and j <= i) or (i in cap and j in ctx) or \
                       (i in ctx and j in ctx)
                assert bool(mask[k, i, j]) == want, (k, i, j)
    # geometry: x1/W, y1/H, x2/W, y2/H, w/W, h/H
    box = items[1]["boxes"][3]
    h, w = 100.0, 200.0
    want = [box[0] / w, box[1] / h, box[2] / w, box[3] / h, (box[2] - box[0]) / w,
            (box[3] - box[1]) / h]
    np.testing.assert_allclose(inputs["region_geometry"][1, 3].numpy(), want, rtol=1e-6)


def test_vqa_targets_are_dense_soft_scores(tok):
    enc = TextEncoder(tok, CLASSES)
    task = VQATask(enc, num_answers=5)
    items = [task.transform(_sample("what colour is it", seed=3, answers=((1, 1.0), (4, 1 / 3)))),
             task.transform(_sample("what colour is it", seed=4, answers=()))]
    b = task.collate(items)
    np.testing.assert_allclose(b["vqa_targets"].numpy(),
                               [[0, 1, 0, 0, 1 / 3], [0, 0, 0, 0, 0]], rtol=1e-6)
    assert "mlm_labels" not in b
    assert model_inputs(b, 6, seq2seq=False)["attention_mask"].shape == (2, b["input_ids"].shape[1] + 3)


def test_pretrain_swaps_tags_and_labels_matching(tok):
    enc = TextEncoder(tok, CLASSES)
    task = PretrainTask(enc, mask_prob=0.15, tag_mask_prob=0.15, tag_swap_prob=0.5)
    swaps = 0
    for seed in range(0, 40, 4):
        items = [task.transform(_sample("a red circle and a star", n=3, seed=seed + j))
                 for j in range(4)]
        b = task.collate([dict(it) for it in items])
        ta = max(len(it["text_ids"]) for it in items)
        for k, it in enumerate(items):
            donor = items[(k + 1) % 4]
            swapped = it["swap"] and not np.array_equal(donor["clean_tag_ids"], it["clean_tag_ids"])
            # Oscar's labels: 0 = matched, 1 = the tags come from another image
            assert int(b["itm_labels"][k]) == (1 if swapped else 0)
            src = donor if swapped else it
            m = len(src["tag_ids"])
            assert b["input_ids"][k, ta:ta + m].tolist() == list(src["tag_ids"])
            assert b["mlm_labels"][k, ta:ta + m].tolist() == list(src["tag_labels"])
            swaps += swapped
    assert 0 < swaps < 40


def _oscar_vqa_tensorize(tokenizer, text_a: str, text_b: str, max_seq_length: int):
    """microsoft/Oscar oscar/run_vqa.py VQADataset.tensorize for one example (bert: no token
    at the end, no left padding, cls/sep segment 0, text b segment 1), transcribed; the model
    gets no position_ids, so BERT's embeddings use 0..max_seq_length-1."""
    cls_token, sep_token, pad_token = "[CLS]", "[SEP]", 0
    sequence_a_segment_id, sequence_b_segment_id = 0, 1
    cls_token_segment_id, pad_token_segment_id = 0, 0

    def _truncate_seq_pair(tokens_a, tokens_b, max_length):
        while True:
            total_length = len(tokens_a) + len(tokens_b)
            if total_length <= max_length:
                break
            if len(tokens_a) > len(tokens_b):
                tokens_a.pop()
            else:
                tokens_b.pop()

    tokens_a = tokenizer.tokenize(text_a)
    tokens_b = None
    if text_b:
        tokens_b = tokenizer.tokenize(text_b)
        _truncate_seq_pair(tokens_a, tokens_b, max_seq_length - 3)
    else:
        if len(tokens_a) > max_seq_length - 2:
            tokens_a = tokens_a[:(max_seq_length - 2)]
    tokens = tokens_a + [sep_token]
    segment_ids = [sequence_a_segment_id] * len(tokens)
    if tokens_b:
        tokens += tokens_b + [sep_token]
        segment_ids += [sequence_b_segment_id] * (len(tokens_b) + 1)
    tokens = [cls_token] + tokens
    segment_ids = [cls_token_segment_id] + segment_ids
    input_ids = tokenizer.convert_tokens_to_ids(tokens)
    input_mask = [1] * len(input_ids)
    padding_length = max_seq_length - len(input_ids)
    input_ids = input_ids + ([pad_token] * padding_length)
    input_mask = input_mask + ([0] * padding_length)
    segment_ids = segment_ids + ([pad_token_segment_id] * padding_length)
    return input_ids, input_mask, segment_ids


@pytest.mark.parametrize("max_seq_len", [128, 12, 7])
def test_vqa_input_is_oscars_sentence_pair(tok, max_seq_len):
    enc = TextEncoder(tok, CLASSES, max_text_len=6, max_tag_len=3, max_seq_len=max_seq_len)
    task = VQATask(enc, num_answers=5)
    assert task.layout == "pair"
    questions = ["what colour is it", "what colour is the traffic light circle star square",
                 "is it"]
    samples = [_sample(q, n=n, seed=10 + k) for k, (q, n) in enumerate(zip(questions, [3, 6, 2]))]
    s = samples[2]                                  # no tags: Oscar's text_b is ""
    samples[2] = Sample(s.record, s.regions, None, s.tag_classes[:0], s.rng)
    items = [task.transform(s) for s in samples]
    b = task.collate(items)
    for k, s in enumerate(samples):
        tags = " ".join(CLASSES[c] for c in s.tag_classes)       # Oscar's text_b: the tags
        ids, mask, seg = _oscar_vqa_tensorize(tok, s.record.text, tags, max_seq_len)
        n = sum(mask)
        assert b["input_ids"][k, :n].tolist() == ids[:n]
        assert b["token_type_ids"][k, :n].tolist() == seg[:n]
        assert b["position_ids"][k, :n].tolist() == list(range(n))   # contiguous, from 0
        assert b["text_mask"][k].tolist() == [True] * n + [False] * (b["input_ids"].shape[1] - n)
    assert b["input_ids"].shape[1] <= max_seq_len
    # max_text_len / max_tag_len do not apply to this layout; split keeps them (and the tags at
    # positions max_text_len + j), for models trained with it
    split = VQATask(enc, num_answers=5, layout="split").collate(
        [VQATask(enc, num_answers=5, layout="split").transform(samples[0])])
    assert split["position_ids"][0].tolist()[-3:] == [6, 7, 8]
    with pytest.raises(Exception, match="text layouts \\['split'\\]"):
        CaptionTask(enc, layout="pair")
