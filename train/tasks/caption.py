"""``caption``: Oscar's masked seq2seq captioning, decoded by beam search, scored by
pycocoevalcap.

Training samples: ``mask_prob`` of the caption tokens (and its closing [SEP], so that the model
learns to stop), at least 1 and at most ``max_masked``, are chosen; each becomes [MASK] (80 %),
a random token (10 %) or stays (10 %). Attention: caption tokens see earlier caption tokens and
all tags and regions; tags and regions never see the caption.

Records: one per caption of ``data.captions`` (Karpathy ``dataset_coco.json`` filtered by
``data.split``, or a COCO ``captions_*.json``). Evaluation: one record per image of
``eval.split``, references = its captions; predictions by beam search
(:func:`vlkd.train.evaluation.predict_captions`), BLEU-1..4, METEOR, ROUGE-L, CIDEr (the best
checkpoint's metric) and SPICE when available; results in the COCO caption results format.
Without a caption file, every image of the evaluated set is captioned and nothing is scored.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from vlkd.common.config import ConfigError
from vlkd.common.regionset import RegionSet
from vlkd.data.captions import AnnotationError, captions_by_image, load_captions

from ..stream import Record, Sample
from .base import TASKS, Task, TextEncoder, mask_tokens

__all__ = ["CaptionTask", "caption_records"]


@TASKS.register()
class CaptionTask(Task):
    """Oscar masked seq2seq captioning (see the module docstring).

    Args:
        encoder, max_regions: See :class:`~vlkd.train.tasks.base.Task`.
        mask_prob: Fraction of caption tokens (with the closing [SEP]) masked.
        max_masked: At most this many per caption.
        train: False for evaluation samples (no text, no masking).
    """

    name = "caption"
    heads = ("mlm",)
    metric = "CIDEr"

    def __init__(self, encoder: TextEncoder, max_regions: int = 50, mask_prob: float = 0.15,
                 max_masked: int = 3, train: bool = True, layout: str | None = None):
        super().__init__(encoder, max_regions, layout)
        self.mask_prob, self.max_masked, self.train = float(mask_prob), int(max_masked), train

    def transform(self, sample: Sample) -> dict:
        out = self._regions(sample)
        if not self.train:
            out["text_ids"] = np.array([self.enc.cls_id], dtype=np.int64)  # decoding starts here
            return out
        ids = self.enc.text_ids(sample.record.text)
        candidates = np.arange(1, len(ids))  # caption tokens and the closing [SEP]
        num = min(max(int(round(self.mask_prob * candidates.size)), 1), self.max_masked,
                  candidates.size)
        picked = np.sort(sample.rng.choice(candidates, size=num, replace=False))
        out["text_ids"], out["text_labels"] = mask_tokens(ids, picked, self.enc, sample.rng)
        return out

    def seq2seq(self) -> bool:
        return True

    # -- the registry's contract
    @classmethod
    def from_config(cls, cfg, encoder, *, train=True, num_answers=0):
        t = cfg.task
        return cls(encoder, cfg.data.max_regions, t.mask_prob, t.max_masked, train=train,
                   layout=cls.layout_for(cfg))

    @classmethod
    def default_losses(cls, task):
        params = {"label_smoothing": task.label_smoothing}
        if task.drop_worst_ratio > 0:  # VinVL's recipe knob (off: the params stay as they were)
            params.update(drop_worst_ratio=task.drop_worst_ratio,
                          drop_worst_after=task.drop_worst_after)
        return {"task": {"type": "masked_token_ce", "weight": 1.0, "params": params}}

    @classmethod
    def train_records(cls, cfg, answers=None):
        d = cfg.data
        if not d.captions:
            raise ConfigError("the caption task needs data.captions (--captions FILE)")
        return caption_records(_load_caption_split(d.captions, d.split))

    @classmethod
    def has_eval(cls, cfg):
        return bool(cfg.eval.captions)

    @classmethod
    def eval_records(cls, cfg, answers=None):
        """One record per image and ``{image id: reference captions}``; without a caption file,
        every image of the evaluated set and None (predictions only: nocaps, test splits)."""
        e = cfg.eval
        path = e.captions or cfg.data.captions
        if not path:
            regions = e.regions or cfg.data.regions
            if not regions:
                raise ConfigError("caption evaluation needs eval.captions (--captions FILE) or, "
                                  "for predictions only, eval.regions (--regions SET)")
            ids = sorted(i for shard in RegionSet(regions).shards for i in shard.image_ids)
            ids = ids[:e.max_samples] if e.max_samples else ids
            return [Record(i, i) for i in ids], None
        refs = captions_by_image(_load_caption_split(path, e.split))
        ids = sorted(refs)[:e.max_samples] if e.max_samples else sorted(refs)
        return [Record(i, i) for i in ids], {i: refs[i] for i in ids}

    @classmethod
    def predict(cls, model, stream, cfg, *, tokenizer, answers, device, amp, env):
        from ..evaluation import predict_captions

        return predict_captions(model, stream, tokenizer, device=device, amp=amp,
                                beam_size=cfg.eval.beam_size, max_len=cfg.eval.max_len,
                                max_text_len=cfg.data.max_text_len, env=env)

    @classmethod
    def score(cls, predictions, references, cfg):
        if references is None:
            return {}
        from ..metrics import caption_scores

        flag = {"auto": None, "true": True, "false": False}.get(str(cfg.eval.spice).lower())
        return caption_scores(references, predictions, spice=flag)

    @classmethod
    def result_rows(cls, predictions):
        return [{"image_id": _json_id(k), "caption": v} for k, v in sorted(predictions.items())]


def caption_records(captions) -> list[Record]:
    """One training record per caption, keyed ``<image id>:<caption id or index>``."""
    return [Record(f"{c.image_id}:{c.caption_id or k}", c.image_id, c.text)
            for k, c in enumerate(captions)]


def _load_caption_split(path: str, split: str) -> list:
    """Karpathy files are filtered by ``split``; a COCO captions file is one split already."""
    try:
        return load_captions(path, split or None)
    except AnnotationError as e:
        if split and "applies to Karpathy files only" in str(e):
            return load_captions(path)
        raise


def _json_id(i: str) -> Any:
    return int(i) if str(i).isdigit() else i
