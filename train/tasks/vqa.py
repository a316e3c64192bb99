"""``vqa``: question as text, soft-score BCE over an answer vocabulary, official accuracy.

Records: one per question of ``data.vqa_questions`` with its targets, the soft scores
min(#humans / 3, 1) of the (normalised) human answers that are in the answer vocabulary.
Evaluation: one record per question of ``eval.vqa_questions``; predictions are the top answer
(:func:`vlkd.train.evaluation.predict_vqa`), scored by the official VQA v2 accuracy
(:func:`vlkd.data.vqa.vqa_accuracy`, the best checkpoint's metric) when
``eval.vqa_annotations`` is given; results in the official VQA results format.
"""
from __future__ import annotations

import numpy as np
import torch

from vlkd.common.config import ConfigError
from vlkd.data.vqa import load_vqa, soft_scores, vqa_accuracy

from ..stream import Record, Sample
from .base import TASKS, Task, TextEncoder

__all__ = ["VQATask"]


@TASKS.register()
class VQATask(Task):
    """VQA: question text, soft-score targets over ``num_answers`` answers.

    Args:
        encoder, max_regions: See :class:`~vlkd.train.tasks.base.Task`.
        num_answers: Size A of the answer vocabulary.
    """

    name = "vqa"
    heads = ("vqa",)
    metric = "accuracy"
    needs_answers = True

    def __init__(self, encoder: TextEncoder, max_regions: int = 50, num_answers: int = 3129):
        super().__init__(encoder, max_regions)
        self.num_answers = int(num_answers)

    def transform(self, sample: Sample) -> dict:
        out = self._regions(sample)
        out["text_ids"] = self.enc.text_ids(sample.record.text)
        out["answers"] = sample.record.answers
        return out

    def collate(self, items):
        batch = super().collate(items)
        targets = np.zeros((len(items), self.num_answers), dtype=np.float32)
        for k, it in enumerate(items):
            for idx, score in it["answers"]:
                targets[k, int(idx)] = float(score)
        batch["vqa_targets"] = torch.from_numpy(targets)
        return batch

    # -- the registry's contract
    @classmethod
    def from_config(cls, cfg, encoder, *, train=True, num_answers=0):
        if num_answers <= 0:
            raise ValueError("the vqa task needs the answer vocabulary size (num_answers > 0)")
        return cls(encoder, cfg.data.max_regions, num_answers)

    @classmethod
    def default_losses(cls, task):
        return {"task": {"type": "vqa_bce", "weight": 1.0, "params": {}}}

    @classmethod
    def train_records(cls, cfg, answers=None):
        d = cfg.data
        if not (d.vqa_questions and d.vqa_annotations):
            raise ConfigError("the vqa task needs data.vqa_questions and data.vqa_annotations")
        return _vqa_records(d.vqa_questions, d.vqa_annotations, answers or [])[0]

    @classmethod
    def has_eval(cls, cfg):
        return bool(cfg.eval.vqa_questions and cfg.eval.vqa_annotations)

    @classmethod
    def eval_records(cls, cfg, answers=None):
        """One record per question and the questions with their human answers (None without
        ``eval.vqa_annotations``: predictions only)."""
        e = cfg.eval
        if not e.vqa_questions:
            raise ConfigError("VQA evaluation needs eval.vqa_questions (--vqa-questions FILE)")
        records, qs = _vqa_records(e.vqa_questions, e.vqa_annotations, answers or [])
        if e.max_samples:
            records, qs = records[:e.max_samples], qs[:e.max_samples]
        return records, (qs if e.vqa_annotations else None)

    @classmethod
    def predict(cls, model, stream, cfg, *, tokenizer, answers, device, amp, env):
        from ..evaluation import predict_vqa

        return predict_vqa(model, stream, answers, device=device, amp=amp, env=env)

    @classmethod
    def score(cls, predictions, references, cfg):
        return {} if references is None else vqa_accuracy(predictions, references)

    @classmethod
    def result_rows(cls, predictions):
        return [{"question_id": int(k), "answer": v} for k, v in sorted(predictions.items())]


def _vqa_records(questions_path: str, annotations_path: str, answers: list[str]) -> tuple:
    qs = load_vqa(questions_path, annotations_path or None)
    index = {a: i for i, a in enumerate(answers)}
    records = []
    for q in qs:
        targets = tuple(sorted((index[a], s) for a, s in soft_scores(q.answers).items()
                               if a in index))
        records.append(Record(str(q.question_id), q.image_id, q.question, targets))
    return records, qs
