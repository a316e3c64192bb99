"""Pre-training data: Oscar's corpus layout (tests/fixtures/oscar_pretrain, the keys of
microsoft/Oscar oscar/datasets/oscar_tsv.py), pre-training records, and the pretrain task's
2-way and 3-way (Oscar+) contrastive labels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from train_data import scenes, write_captions
from vlkd.common.config import ConfigError
from vlkd.common.regionset import ImageRegions
from vlkd.data.captions import AnnotationError
from vlkd.data.pretrain_corpus import is_oscar_corpus, read_oscar_corpus, read_qa_labels
from vlkd.train.model import ITM_MATCHED, ITM_OTHER_CAPTION, ITM_OTHER_TAGS
from vlkd.train.stream import Record, Sample
from vlkd.train.tasks import TextEncoder
from vlkd.train.tasks.pretrain import PretrainTask, pretrain_records
from vlkd.train.tokenizer import build_vocab

FIX = Path(__file__).parent / "fixtures" / "oscar_pretrain"
CORPUS = FIX / "coco_flickr30k_gqa_googlecc.tsv"
QA = FIX / "gqa" / "QA_fileB.tsv"
CLASSES = ["circle", "square", "star", "triangle"]


def test_oscar_corpus_rows_are_read_as_oscar_reads_them():
    assert is_oscar_corpus(CORPUS)
    rows = read_oscar_corpus(CORPUS, qa_labels=QA)
    got = [(r.line, r.dataset, r.image, r.chunk, r.text_b, r.qa_id) for r in rows]
    assert got == [(1, "coco", "391895", "", "", ""),
                   (2, "flickr30k", "1000092795", "", "", ""),
                   (3, "gqa", "2354786", "", "yes", "02930152"),
                   (4, "gqa", "2354786", "", "pipe pipes", "07333408"),
                   (5, "googlecc", "1000127", "3", "", ""),
                   (6, "googlecc", "1000128", "3", "", "")]     # "cc" is googlecc
    assert rows[2].text_a == "Is the sky dark?"
    assert rows[5].text_a == "a dog runs on the beach"           # fields stripped, as TSVFile
    assert rows[2].img_key == "gqa_2354786" and rows[2].label_key == "gqa_qa_2354786_02930152"
    # a dataset filter keeps its rows (and the caption datasets need no QA file)
    assert [r.line for r in read_oscar_corpus(CORPUS, datasets=["coco", "cc"])] == [1, 5, 6]
    assert read_qa_labels(QA) == {"02930152": ["yes"], "07333408": ["pipe", "pipes"]}


def test_oscar_corpus_refusals(tmp_path):
    with pytest.raises(AnnotationError, match="QA row .* no QA_fileB.tsv"):
        read_oscar_corpus(CORPUS)
    bad = tmp_path / "bad.tsv"
    for row, why in [("coco_1\tflickr30k_1\ta cat", "different datasets"),
                     ("coco_1\tcoco_2\ta cat", "names image '2'"),
                     ("gqa_1\tgqa_qa_2_05\tis it?", "names image '2'"),
                     ("coco_1\tcoco_1\t", "text a is empty"),
                     ("googlecc_1\tgooglecc_1\tx", "no image id field and chunk field")]:
        bad.write_text(row + "\n")
        with pytest.raises(AnnotationError, match=why):
            read_oscar_corpus(bad, qa_labels=QA)
    bad.write_text("gqa_1\tgqa_qa_1_99\tis it?\n")
    with pytest.raises(AnnotationError, match="QA id '99' is not in"):
        read_oscar_corpus(bad, qa_labels=QA)


def test_pretrain_records_from_every_format(tmp_path):
    recs = pretrain_records(str(CORPUS), datasets=["gqa"], qa_labels=str(QA))
    assert recs == [Record("3", "2354786", "Is the sky dark?", text_b="yes"),
                    Record("4", "2354786", "What is on the white wall?", text_b="pipe pipes")]
    keyed = pretrain_records(str(CORPUS), datasets=["coco"], image_ids="key")
    assert [r.image_id for r in keyed] == ["coco_391895"]
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("7\ta red star\n8\ta blue circle\n")
    assert not is_oscar_corpus(pairs)
    assert [(r.image_id, r.text, r.text_b) for r in pretrain_records(str(pairs))] == [
        ("7", "a red star", ""), ("8", "a blue circle", "")]
    karpathy = write_captions(tmp_path / "k.json", scenes(4), {"1003": "val"}, per_image=1)
    assert [r.image_id for r in pretrain_records(str(karpathy), split="val")] == ["1003"]
    assert len(pretrain_records(str(karpathy))) == 4
    with pytest.raises(ConfigError, match="format must be one of"):
        pretrain_records(str(pairs), fmt="parquet")
    with pytest.raises(ConfigError, match="QA row"):
        pretrain_records(str(CORPUS))


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    caps = write_captions(d / "c.json", scenes(30))
    tok = build_vocab([caps], d / "tok", vocab_size=200, min_frequency=1,
                      extra_words=CLASSES + ["is it red yes no"])
    return TextEncoder(tok, CLASSES)


def _sample(text, seed, text_b="", n=3):
    rng = np.random.default_rng(seed)
    boxes = np.array([[10 * i, 5, 10 * i + 20, 40] for i in range(n)], np.float32)
    r = ImageRegions(image_id=f"im{seed}", image_hw=(100, 200), boxes=boxes,
                     scores=np.ones(n, np.float32),
                     classes=rng.integers(0, len(CLASSES), n).astype(np.int32),
                     features=rng.standard_normal((n, 8)).astype(np.float16),
                     box_digest=b"\0" * 16, image_digest=b"\0" * 16)
    return Sample(Record(f"k{seed}", r.image_id, text, text_b=text_b), r, None, r.classes,
                  np.random.default_rng(seed))


@pytest.mark.parametrize("classes", [2, 3])
def test_contrastive_labels_follow_oscar(enc, classes):
    """u < tag_swap: the next sample's tags (label 1); tag_swap <= u < tag_swap + caption_swap:
    its caption (label classes - 1: Oscar's num_contrast_classes - 1); else matched (0)."""
    task = PretrainTask(enc, tag_swap_prob=0.25, caption_swap_prob=0.25,
                        contrast_classes=classes)
    texts = ["a red circle", "a blue star and a green square", "a yellow triangle",
             "a red star with a red star"]
    seen = {ITM_MATCHED: 0, ITM_OTHER_TAGS: 0, classes - 1: 0}
    for seed in range(0, 120, 4):
        items = [dict(task.transform(_sample(texts[j], seed + j)), image_id=f"im{seed + j}")
                 for j in range(4)]
        b = task.collate([dict(it) for it in items])
        swaps = []
        for k, it in enumerate(items):
            donor = items[(k + 1) % 4]
            tags = it["swap"] and not np.array_equal(donor["clean_tag_ids"], it["clean_tag_ids"])
            caption = (not tags and it["caption_swap"]
                       and not np.array_equal(donor["clean_text_ids"], it["clean_text_ids"]))
            swaps.append((tags, caption))
        ta = max(len((items[(k + 1) % 4] if cap else it)["text_ids"])
                 for k, (it, (_, cap)) in enumerate(zip(items, swaps)))
        for k, it in enumerate(items):
            donor = items[(k + 1) % 4]
            tags, caption = swaps[k]
            want = ITM_OTHER_TAGS if tags else (classes - 1 if caption else ITM_MATCHED)
            assert int(b["itm_labels"][k]) == want
            seen[want] += 1
            text = donor if caption else it
            n = len(text["text_ids"])
            assert b["input_ids"][k, :n].tolist() == list(text["text_ids"])
            assert b["mlm_labels"][k, :n].tolist() == list(text["text_labels"])
            tag_src = donor if tags else it
            m = len(tag_src["tag_ids"])
            assert b["input_ids"][k, ta:ta + m].tolist() == list(tag_src["tag_ids"])
    assert all(v > 10 for v in seen.values()), seen  # each label ~ its share of 120
    assert (classes - 1 == ITM_OTHER_CAPTION) == (classes == 3)  # Oscar+: 2; Oscar: 1


def test_a_qa_rows_answer_takes_the_tags_place(enc):
    task = PretrainTask(enc, tag_mask_prob=0.0, tag_swap_prob=0.0)
    out = task.transform(_sample("is it red", 0, text_b="yes"))
    ids = enc.tokenizer("yes", add_special_tokens=False)["input_ids"]
    assert list(out["tag_ids"]) == [*ids, enc.sep_id]
    tags = task.transform(_sample("is it red", 0))["tag_ids"]
    assert list(tags) == list(enc.tag_ids(_sample("", 0).tag_classes))


def test_contrastive_options_are_checked(enc):
    with pytest.raises(ConfigError, match="sum to at most 1"):
        PretrainTask(enc, tag_swap_prob=0.8, caption_swap_prob=0.3)
    with pytest.raises(ConfigError, match="2 \\(Oscar\\) or 3"):
        PretrainTask(enc, contrast_classes=4)
    with pytest.raises(ConfigError, match="caption_swap_prob is 0"):
        PretrainTask(enc, contrast_classes=3)
