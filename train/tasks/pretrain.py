"""``pretrain``: masked tokens over text and tags (BERT's 80/10/10) and Oscar's contrastive tag
swap.

With probability ``tag_swap_prob`` a sample takes the next sample's tags in the batch and its
image-text matching label becomes 1; a matched sample's label is 0. These are Oscar's labels
(``BertImgForPreTraining``, ``oscar/datasets/oscar_tsv.py`` ``random_sent``: 0 = matched,
1 = text b from another image; Oscar's 3-class variant adds 2 = text a from another image,
which this task does not make), so imported ``cls.seq_relationship`` heads and vlkd's agree.
Loss terms: ``mlm``
(masked-token CE over text and tags) and ``itm`` (matching CE). Records: (image id, caption)
pairs from ``data.pairs`` (TSV or JSON), else ``data.captions``. No evaluation.
"""
from __future__ import annotations

import numpy as np
import torch

from vlkd.common.config import ConfigError
from vlkd.data.captions import load_pairs

from ..model import ITM_MATCHED, ITM_OTHER_TAGS
from ..stream import Sample
from .base import TASKS, Task, TextEncoder, mask_tokens
from .caption import caption_records

__all__ = ["PretrainTask"]


@TASKS.register()
class PretrainTask(Task):
    """Masked tokens over text and tags + contrastive tag swap (see the module docstring).

    Args:
        encoder, max_regions: See :class:`~vlkd.train.tasks.base.Task`.
        mask_prob: Per-token masking probability of text tokens.
        tag_mask_prob: Per-token masking probability of tag tokens.
        tag_swap_prob: Probability of taking the next sample's tags.
    """

    name = "pretrain"
    heads = ("mlm", "itm")

    def __init__(self, encoder: TextEncoder, max_regions: int = 50, mask_prob: float = 0.15,
                 tag_mask_prob: float = 0.15, tag_swap_prob: float = 0.5,
                 layout: str | None = None):
        super().__init__(encoder, max_regions, layout)
        self.mask_prob, self.tag_mask_prob = float(mask_prob), float(tag_mask_prob)
        self.tag_swap_prob = float(tag_swap_prob)

    def _mask(self, ids: np.ndarray, prob: float, rng: np.random.Generator, first: int):
        cand = np.arange(first, len(ids) - 1)  # not [CLS] nor the closing [SEP]
        picked = cand[rng.random(cand.size) < prob]
        return mask_tokens(ids, picked, self.enc, rng)

    def transform(self, sample: Sample) -> dict:
        out = self._regions(sample)
        ids = self.enc.text_ids(sample.record.text)
        out["text_ids"], out["text_labels"] = self._mask(ids, self.mask_prob, sample.rng, 1)
        out["clean_tag_ids"] = out["tag_ids"]
        out["tag_ids"], out["tag_labels"] = self._mask(out["tag_ids"], self.tag_mask_prob,
                                                       sample.rng, 0)
        out["swap"] = bool(sample.rng.random() < self.tag_swap_prob)
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
            swapped.append(it)
        batch = super().collate(swapped)
        batch["itm_labels"] = torch.from_numpy(itm)
        return batch

    # -- the registry's contract
    @classmethod
    def from_config(cls, cfg, encoder, *, train=True, num_answers=0):
        t = cfg.task
        return cls(encoder, cfg.data.max_regions, t.mask_prob, t.tag_mask_prob, t.tag_swap_prob,
                   layout=cls.layout_for(cfg))

    @classmethod
    def default_losses(cls, task):
        return {"mlm": {"type": "masked_token_ce", "weight": 1.0,
                        "params": {"label_smoothing": 0.0}},
                "itm": {"type": "itm_ce", "weight": 1.0, "params": {}}}

    @classmethod
    def train_records(cls, cfg, answers=None):
        src = cfg.data.pairs or cfg.data.captions
        if not src:
            raise ConfigError("the pretrain task needs data.pairs (or data.captions)")
        return caption_records(load_pairs(src))
