"""``vqa``: question and tags as Oscar's sentence pair, soft-score BCE over an answer
vocabulary, official accuracy.

Input (``pair`` layout, Oscar ``run_vqa.py``): ``[CLS] question [SEP] tags [SEP]`` at
contiguous positions, at most ``data.max_seq_len`` (128) tokens, then the regions.
Records: one per question of ``data.vqa_questions`` with its targets: for every distinct human
answer that is in the answer vocabulary, its soft score (``data.soft_score``: bottom-up's
0/0.3/0.6/0.9/1, or min(n/3, 1)) counted over the answers as written (``data.target_answers:
raw``, as bottom-up's ``compute_target``) or preprocessed. Evaluation: one record per question
of ``eval.vqa_questions``; predictions are the top answer
(:func:`vlkd.train.evaluation.predict_vqa`), scored by the official VQA v2 accuracy in the
version ``eval.vqa_metric`` (:func:`vlkd.data.vqa.vqa_accuracy`, the best checkpoint's metric)
when ``eval.vqa_annotations`` is given; results in the official VQA results format.
"""
from __future__ import annotations

import numpy as np
import torch

from vlkd.common.config import ConfigError
from vlkd.data.vqa import SOFT_SCORES, VQA_METRICS, load_vqa, soft_scores, vqa_accuracy

from ..stream import Record, Sample
from .base import TASKS, Task, TextEncoder

__all__ = ["VQATask", "TARGET_ANSWERS"]

#: ``data.target_answers`` values: count the human answers as written, or preprocessed.
TARGET_ANSWERS = ("raw", "preprocessed")


@TASKS.register()
class VQATask(Task):
    """VQA: question text, soft-score targets over ``num_answers`` answers.

    Args:
        encoder, max_regions, layout: See :class:`~vlkd.train.tasks.base.Task` (``pair``:
            Oscar's input, the default; ``split``: tags at ``max_text_len + j``, the layout of
            vlkd VQA models trained before it).
        num_answers: Size A of the answer vocabulary.
    """

    name = "vqa"
    heads = ("vqa",)
    metric = "accuracy"
    needs_answers = True
    layouts = ("pair", "split")

    def __init__(self, encoder: TextEncoder, max_regions: int = 50, num_answers: int = 3129,
                 layout: str | None = None):
        super().__init__(encoder, max_regions, layout)
        self.num_answers = int(num_answers)

    def transform(self, sample: Sample) -> dict:
        out = self._regions(sample)
        if self.layout == "pair":
            n = len(out["boxes"])
            out["text_ids"], out["first_len"] = self.enc.pair_ids(sample.record.text,
                                                                  *sample.tags(n))
        else:
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
        _check_choices(cfg)
        return cls(encoder, cfg.data.max_regions, num_answers, layout=cls.layout_for(cfg))

    @classmethod
    def default_losses(cls, task):
        return {"task": {"type": "vqa_bce", "weight": 1.0, "params": {}}}

    @classmethod
    def train_records(cls, cfg, answers=None):
        d = cfg.data
        if not (d.vqa_questions and d.vqa_annotations):
            raise ConfigError("the vqa task needs data.vqa_questions and data.vqa_annotations")
        _check_choices(cfg)
        return _vqa_records(d.vqa_questions, d.vqa_annotations, answers or [], cfg)[0]

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
        records, qs = _vqa_records(e.vqa_questions, e.vqa_annotations, answers or [], cfg)
        if e.max_samples:
            records, qs = records[:e.max_samples], qs[:e.max_samples]
        return records, (qs if e.vqa_annotations else None)

    @classmethod
    def predict(cls, model, stream, cfg, *, tokenizer, answers, device, amp, env):
        from ..evaluation import predict_vqa

        return predict_vqa(model, stream, answers, device=device, amp=amp, env=env)

    @classmethod
    def score(cls, predictions, references, cfg):
        if references is None:
            return {}
        return vqa_accuracy(predictions, references, metric=cfg.eval.vqa_metric)

    @classmethod
    def result_rows(cls, predictions):
        return [{"question_id": int(k), "answer": v} for k, v in sorted(predictions.items())]


def _check_choices(cfg) -> None:
    d = cfg.data
    for key, value, choices in (("data.soft_score", d.soft_score, SOFT_SCORES),
                                ("data.target_answers", d.target_answers, TARGET_ANSWERS),
                                ("eval.vqa_metric", cfg.eval.vqa_metric, tuple(VQA_METRICS))):
        if value not in choices:
            raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")


def _vqa_records(questions_path: str, annotations_path: str, answers: list[str], cfg) -> tuple:
    qs = load_vqa(questions_path, annotations_path or None)
    index = {a: i for i, a in enumerate(answers)}
    scheme, preprocess = cfg.data.soft_score, cfg.data.target_answers == "preprocessed"
    records = []
    for q in qs:
        scores = soft_scores(q.answers, scheme=scheme, preprocess=preprocess)
        targets = tuple(sorted((index[a], s) for a, s in scores.items() if a in index))
        records.append(Record(str(q.question_id), q.image_id, q.question, targets))
    return records, qs
