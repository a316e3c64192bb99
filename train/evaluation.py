"""Evaluation: predictions over an evaluation stream (every rank predicts its share; the shares
are gathered) and their scores. Which prediction, score and results format a task uses is its
registry entry's (:mod:`vlkd.train.tasks`); the prediction loops are here.

Captioning: beam search (or greedy) → ``{image id: caption}`` → COCO result format
``[{"image_id", "caption"}]`` and pycocoevalcap scores (:func:`vlkd.train.metrics.caption_scores`).
VQA: argmax over the answer vocabulary → official result format ``[{"question_id", "answer"}]``
and the official accuracy (:func:`vlkd.data.vqa.vqa_accuracy`).
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .decode import generate_captions
from .distributed import DistEnv
from .stream import RegionStream, make_loader
from .tasks import TASKS, model_inputs, to_device

__all__ = ["predict_captions", "predict_vqa", "caption_batch", "vqa_logits", "gather_dict",
           "score_predictions", "write_predictions", "make_eval_fn"]


def gather_dict(d: dict, env: DistEnv) -> dict:
    """Merges every rank's dict (all ranks receive the union)."""
    if not env.distributed:
        return d
    parts: list = [None] * env.world_size
    dist.all_gather_object(parts, d)
    out: dict = {}
    for p in parts:
        out.update(p)
    return out


def _autocast(device: torch.device, amp: torch.dtype | None):
    return (torch.autocast(device.type, dtype=amp) if amp is not None
            else contextlib.nullcontext())


@torch.no_grad()
def predict_captions(model, stream: RegionStream, tokenizer, *, device: torch.device,
                     amp: torch.dtype | None = None, beam_size: int = 5, max_len: int = 20,
                     max_text_len: int = 40, env: DistEnv | None = None) -> dict[str, str]:
    """Captions of every image of ``stream`` (a ``CaptionTask(train=False)`` stream).

    Returns:
        {image id: caption text}, gathered over ranks.
    """
    was_training = model.training
    model.eval()
    preds: dict[str, str] = {}
    stream.set_epoch(0)
    for batch in make_loader(stream):
        texts = caption_batch(model, batch, tokenizer, device=device, amp=amp,
                              beam_size=beam_size, max_len=max_len, max_text_len=max_text_len)
        preds.update(zip(batch["image_ids"], texts))
    model.train(was_training)
    return gather_dict(preds, env) if env is not None else preds


@torch.no_grad()
def caption_batch(model, batch: dict, tokenizer, *, device: torch.device,
                  amp: torch.dtype | None = None, beam_size: int = 5, max_len: int = 20,
                  max_text_len: int = 40) -> list[str]:
    """The captions of one collated ``CaptionTask(train=False)`` batch (model in eval mode),
    in batch order: beam search (:func:`~vlkd.train.decode.generate_captions`), decoded
    without special tokens."""
    vocab = tokenizer.get_vocab()
    b = to_device(batch, device)
    with _autocast(device, amp):
        seqs = generate_captions(model, b, cls_id=vocab["[CLS]"], sep_id=vocab["[SEP]"],
                                 mask_id=vocab["[MASK]"], max_len=max_len,
                                 beam_size=beam_size, max_text_len=max_text_len)
    return [tokenizer.decode(seq, skip_special_tokens=True).strip() for seq in seqs]


@torch.no_grad()
def predict_vqa(model, stream: RegionStream, answers: list[str], *, device: torch.device,
                amp: torch.dtype | None = None, env: DistEnv | None = None) -> dict[int, str]:
    """The top answer for every question of ``stream`` → {question id: answer}."""
    was_training = model.training
    model.eval()
    preds: dict[int, str] = {}
    stream.set_epoch(0)
    for batch in make_loader(stream):
        logits = vqa_logits(model, batch, device=device, amp=amp)
        for key, idx in zip(batch["keys"], logits.argmax(-1).tolist()):
            preds[int(key)] = answers[idx]
    model.train(was_training)
    return gather_dict(preds, env) if env is not None else preds


@torch.no_grad()
def vqa_logits(model, batch: dict, *, device: torch.device,
               amp: torch.dtype | None = None) -> torch.Tensor:
    """``(B, A)`` answer logits of one collated VQA batch (model in eval mode), float32."""
    b = to_device(batch, device)
    inputs = model_inputs(b, model.config.geometry_dim, seq2seq=False)
    with _autocast(device, amp):
        out = model(inputs, task="vqa", output_hidden_states=False, output_attentions=False)
    return out.vqa_logits.float()


def score_predictions(task: str, predictions: dict, references: Any, cfg) -> dict:
    """Scores of a task's predictions (the task's :meth:`~vlkd.train.tasks.base.Task.score`)."""
    return TASKS.get(task).score(predictions, references, cfg)


def write_predictions(task: str, predictions: dict, path: str | Path) -> Path:
    """Writes predictions in the task's results format (COCO captions, official VQA)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = TASKS.get(task).result_rows(predictions)
    path.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return path


def make_eval_fn(task: str, stream: RegionStream, references: Any, cfg, *, tokenizer, answers,
                 device: torch.device, amp: torch.dtype | None, env: DistEnv
                 ) -> Callable[[torch.nn.Module], dict]:
    """``model -> scores`` for periodic evaluation; rank 0 scores, every rank gets the result.

    Args:
        task: A registered task with an evaluation.
        stream: Its evaluation stream.
        references: What :meth:`~vlkd.train.tasks.base.Task.eval_records` returned with it.
        cfg: The run's config (``eval`` and the data layout).
    """
    spec = TASKS.get(task)

    def evaluate(model) -> dict:
        preds = spec.predict(model, stream, cfg, tokenizer=tokenizer, answers=answers,
                             device=device, amp=amp, env=env)
        scores = spec.score(preds, references, cfg) if env.is_main else {}
        if env.distributed:
            box = [scores]
            dist.broadcast_object_list(box, src=0)
            scores = box[0]
        return {k: v for k, v in scores.items() if isinstance(v, (int, float))}
    return evaluate
