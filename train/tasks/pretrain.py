"""``pretrain``: masked tokens over text and tags (BERT's 80/10/10) and Oscar's contrastive loss,
in its 2-way form (Oscar) or the 3-way form of Oscar+ (VinVL).

Each sample draws one u ~ U(0, 1) (after its masks): u < ``tag_swap_prob`` takes the next
sample's tags in the batch (text b polluted, label 1); ``tag_swap_prob`` <= u <
``tag_swap_prob + caption_swap_prob`` takes the next sample's caption (text a polluted,
label ``contrast_classes - 1``: 2 in the 3-way classifier, 1 in the 2-way one); otherwise the
sample is matched (label 0). A swap that would change nothing (a one-sample batch, a donor with
the same tags, or with the same image or caption) leaves the sample matched. The masked-token
loss covers the swapped text too (Oscar's ``mask_loss_for_unmatched`` default 1). These are
Oscar's labels (``BertImgForPreTraining``; ``oscar/datasets/oscar_tsv.py`` ``random_sent``: 0 =
matched, 1 = text b from another image, ``num_contrast_classes - 1`` = text a from another
image), so imported ``cls.seq_relationship`` heads and vlkd's agree. Oscar's defaults are
``tag_swap_prob: 0.5``; VinVL's Oscar+ recipe (``--texta_false_prob 0.25``, 3 classes) is
``tag_swap_prob: 0.25, caption_swap_prob: 0.25, contrast_classes: 3``. Oscar draws the polluting
text from a random row of the corpus; vlkd takes the next sample of the batch, which the shuffle
made a random one.

Text b is the image's object tags, except for an Oscar+ QA row (a question whose text b is its
answer, :mod:`vlkd.data.pretrain_corpus`): ``Record.text_b`` then takes the tags' place.

Loss terms: ``mlm`` (masked-token CE over text and tags) and ``itm`` (matching CE). Records:
(image id, caption) pairs from ``data.pairs`` (vlkd's pair TSV / JSON, a caption file, or an
Oscar corpus TSV), else ``data.captions`` (a Karpathy file: its ``data.split``); with
``data.corpora``, each corpus's own
(:meth:`PretrainTask.corpus_records`). No evaluation.
"""
from __future__ import annotations

import numpy as np
import torch

from vlkd.common.config import ConfigError
from vlkd.data.captions import AnnotationError, load_pairs
from vlkd.data.pretrain_corpus import is_oscar_corpus, read_oscar_corpus

from ..model import ITM_MATCHED, ITM_OTHER_TAGS
from ..stream import Record, Sample
from .base import TASKS, Task, TextEncoder, mask_tokens
from .caption import _load_caption_split, caption_records

__all__ = ["PretrainTask", "pretrain_records", "CORPUS_FORMATS"]

#: ``format`` of a pre-training text file (``data.corpora[].format``).
CORPUS_FORMATS = ("auto", "pairs", "oscar")


@TASKS.register()
class PretrainTask(Task):
    """Masked tokens over text and tags + the contrastive loss (see the module docstring).

    Args:
        encoder, max_regions: See :class:`~vlkd.train.tasks.base.Task`.
        mask_prob: Per-token masking probability of text tokens.
        tag_mask_prob: Per-token masking probability of tag tokens.
        tag_swap_prob: Probability of taking the next sample's tags.
        caption_swap_prob: Probability of taking the next sample's caption.
        contrast_classes: 2 (Oscar) or 3 (Oscar+): the image-text matching classes.
    """

    name = "pretrain"
    heads = ("mlm", "itm")

    def __init__(self, encoder: TextEncoder, max_regions: int = 50, mask_prob: float = 0.15,
                 tag_mask_prob: float = 0.15, tag_swap_prob: float = 0.5,
                 layout: str | None = None, caption_swap_prob: float = 0.0,
                 contrast_classes: int = 2):
        super().__init__(encoder, max_regions, layout)
        self.mask_prob, self.tag_mask_prob = float(mask_prob), float(tag_mask_prob)
        self.tag_swap_prob, self.caption_swap_prob = float(tag_swap_prob), float(caption_swap_prob)
        self.contrast_classes = int(contrast_classes)
        if (min(self.tag_swap_prob, self.caption_swap_prob) < 0
                or self.tag_swap_prob + self.caption_swap_prob > 1):
            raise ConfigError(f"task.tag_swap_prob ({tag_swap_prob}) and task.caption_swap_prob "
                              f"({caption_swap_prob}) must be >= 0 and sum to at most 1")
        if self.contrast_classes not in (2, 3):
            raise ConfigError(f"task.contrast_classes must be 2 (Oscar) or 3 (Oscar+), got "
                              f"{contrast_classes}")
        if self.contrast_classes == 3 and self.caption_swap_prob == 0:
            raise ConfigError("task.contrast_classes: 3 labels polluted captions 2, but "
                              "task.caption_swap_prob is 0 (VinVL's recipe: 0.25, with "
                              "tag_swap_prob 0.25)")

    def _mask(self, ids: np.ndarray, prob: float, rng: np.random.Generator, first: int):
        cand = np.arange(first, len(ids) - 1)  # not [CLS] nor the closing [SEP]
        picked = cand[rng.random(cand.size) < prob]
        return mask_tokens(ids, picked, self.enc, rng)

    def _text_b_ids(self, text: str) -> np.ndarray:
        """A second text in the tags' place: its tokens then [SEP], ``max_tag_len`` at most."""
        toks = self.enc.tokenizer(text, add_special_tokens=False)["input_ids"]
        return np.array([*toks[: self.enc.max_tag_len - 1], self.enc.sep_id], dtype=np.int64)

    def transform(self, sample: Sample) -> dict:
        out = self._regions(sample)
        ids = self.enc.text_ids(sample.record.text)
        out["clean_text_ids"] = ids
        out["text_ids"], out["text_labels"] = self._mask(ids, self.mask_prob, sample.rng, 1)
        if sample.record.text_b:
            out["tag_ids"] = self._text_b_ids(sample.record.text_b)
        out["clean_tag_ids"] = out["tag_ids"]
        out["tag_ids"], out["tag_labels"] = self._mask(out["tag_ids"], self.tag_mask_prob,
                                                       sample.rng, 0)
        u = sample.rng.random()
        out["swap"] = bool(u < self.tag_swap_prob)
        out["caption_swap"] = bool(not out["swap"]
                                   and u < self.tag_swap_prob + self.caption_swap_prob)
        return out

    def collate(self, items):
        bsz = len(items)
        swapped = []
        itm = np.full(bsz, ITM_MATCHED, dtype=np.int64)
        for k, it in enumerate(items):
            donor = items[(k + 1) % bsz]
            if it["swap"] and bsz > 1 and not np.array_equal(donor["clean_tag_ids"],
                                                             it["clean_tag_ids"]):
                it = dict(it, tag_ids=donor["tag_ids"], tag_labels=donor["tag_labels"])
                itm[k] = ITM_OTHER_TAGS
            elif (it.get("caption_swap") and bsz > 1
                  and not ("image_id" in it and it["image_id"] == donor.get("image_id"))
                  and not np.array_equal(donor["clean_text_ids"], it["clean_text_ids"])):
                it = dict(it, text_ids=donor["text_ids"], text_labels=donor["text_labels"])
                itm[k] = self.contrast_classes - 1
            swapped.append(it)
        batch = super().collate(swapped)
        batch["itm_labels"] = torch.from_numpy(itm)
        return batch

    # -- the registry's contract
    @classmethod
    def from_config(cls, cfg, encoder, *, train=True, num_answers=0):
        t = cfg.task
        return cls(encoder, cfg.data.max_regions, t.mask_prob, t.tag_mask_prob, t.tag_swap_prob,
                   layout=cls.layout_for(cfg), caption_swap_prob=t.caption_swap_prob,
                   contrast_classes=t.contrast_classes)

    @classmethod
    def default_losses(cls, task):
        return {"mlm": {"type": "masked_token_ce", "weight": 1.0,
                        "params": {"label_smoothing": 0.0}},
                "itm": {"type": "itm_ce", "weight": 1.0, "params": {}}}

    @classmethod
    def itm_classes(cls, cfg) -> int:
        """Outputs of the ITM head a run of this task needs (a new model is built with them)."""
        return int(cfg.task.contrast_classes)

    @classmethod
    def train_records(cls, cfg, answers=None):
        d = cfg.data
        if d.pairs:
            return pretrain_records(d.pairs)
        if not d.captions:
            raise ConfigError("the pretrain task needs data.pairs (or data.captions)")
        return pretrain_records(d.captions, split=d.split)  # a Karpathy file: its split only

    @classmethod
    def corpus_records(cls, cfg, corpus, answers=None):
        if not corpus.pairs:
            raise ConfigError(f"data.corpora {corpus.name!r}: no pairs file (its text: "
                              "pairs=FILE)")
        return pretrain_records(corpus.pairs, fmt=corpus.format, split=corpus.split,
                                datasets=corpus.oscar_datasets, qa_labels=corpus.qa_labels,
                                image_ids=corpus.image_ids)


def pretrain_records(path: str, *, fmt: str = "auto", split: str = "", datasets=(),
                     qa_labels: str = "", image_ids: str = "last") -> list[Record]:
    """Pre-training records of a text file: vlkd's pair formats (``load_pairs``; a Karpathy
    file filtered by ``split``) or an Oscar corpus TSV (``fmt: oscar``, or three columns with
    ``auto``), whose rows become records keyed by line number, with a QA row's answer as
    ``text_b`` and the image id its ``img_key``'s last field (``image_ids: last``) or the whole
    key (``key``).

    Raises:
        ConfigError: an unknown format or ``image_ids`` rule, or an unreadable file.
    """
    if fmt not in CORPUS_FORMATS:
        raise ConfigError(f"corpus format must be one of {list(CORPUS_FORMATS)}, got {fmt!r}")
    if image_ids not in ("last", "key"):
        raise ConfigError(f"corpus image_ids must be 'last' or 'key', got {image_ids!r}")
    try:
        if fmt == "oscar" or (fmt == "auto" and is_oscar_corpus(path)):
            rows = read_oscar_corpus(path, datasets=datasets, qa_labels=qa_labels or None)
            return [Record(str(r.line), r.image if image_ids == "last" else r.img_key, r.text_a,
                           text_b=r.text_b) for r in rows]
        caps = _load_caption_split(path, split) if split else load_pairs(path)
    except AnnotationError as e:
        raise ConfigError(str(e)) from None
    return caption_records(caps)
