"""Evaluation: predictions over an evaluation stream (every rank predicts its share; the shares
are gathered) and their scores.

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

from vlkd.data.vqa import vqa_accuracy

from .decode import generate_captions
from .distributed import DistEnv
from .metrics import caption_scores
from .stream import RegionStream, make_loader
from .tasks import model_inputs, to_device

__all__ = ["predict_captions", "predict_vqa", "gather_dict", "score_predictions",
           "write_predictions", "make_eval_fn"]


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
    vocab = tokenizer.get_vocab()
    preds: dict[str, str] = {}
    stream.set_epoch(0)
    for batch in make_loader(stream):
        b = to_device(batch, device)
        with _autocast(device, amp):
            seqs = generate_captions(model, b, cls_id=vocab["[CLS]"], sep_id=vocab["[SEP]"],
                                     mask_id=vocab["[MASK]"], max_len=max_len,
                                     beam_size=beam_size, max_text_len=max_text_len)
        for iid, seq in zip(batch["image_ids"], seqs):
            preds[iid] = tokenizer.decode(seq, skip_special_tokens=True).strip()
    model.train(was_training)
    return gather_dict(preds, env) if env is not None else preds


@torch.no_grad()
def predict_vqa(model, stream: RegionStream, answers: list[str], *, device: torch.device,
                amp: torch.dtype | None = None, env: DistEnv | None = None) -> dict[int, str]:
    """The top answer for every question of ``stream`` → {question id: answer}."""
    was_training = model.training
    model.eval()
    preds: dict[int, str] = {}
    stream.set_epoch(0)
    for batch in make_loader(stream):
        b = to_device(batch, device)
        inputs = model_inputs(b, model.config.geometry_dim, seq2seq=False)
        with _autocast(device, amp):
            out = model(inputs, task="vqa", output_hidden_states=False, output_attentions=False)
        for key, idx in zip(batch["keys"], out.vqa_logits.argmax(-1).tolist()):
            preds[int(key)] = answers[idx]
    model.train(was_training)
    return gather_dict(preds, env) if env is not None else preds


def score_predictions(task: str, predictions: dict, references: Any, spice: str = "auto") -> dict:
    """Scores: caption → pycocoevalcap metrics; vqa → official accuracy ({} without answers)."""
    if task == "caption":
        flag = {"auto": None, "true": True, "false": False}.get(str(spice).lower())
        return caption_scores(references, predictions, spice=flag)
    if references is None:
        return {}
    return vqa_accuracy(predictions, references)


def _json_id(i: str) -> Any:
    return int(i) if str(i).isdigit() else i


def write_predictions(task: str, predictions: dict, path: str | Path) -> Path:
    """Writes predictions in the COCO caption / official VQA result format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if task == "caption":
        rows = [{"image_id": _json_id(k), "caption": v} for k, v in sorted(predictions.items())]
    else:
        rows = [{"question_id": int(k), "answer": v} for k, v in sorted(predictions.items())]
    path.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return path


def make_eval_fn(task: str, stream: RegionStream, references: Any, *, tokenizer, answers,
                 device: torch.device, amp: torch.dtype | None, env: DistEnv, beam_size: int,
                 max_len: int, max_text_len: int, spice: str = "auto"
                 ) -> Callable[[torch.nn.Module], dict]:
    """``model -> scores`` for periodic evaluation; rank 0 scores, every rank gets the result."""
    def evaluate(model) -> dict:
        if task == "caption":
            preds = predict_captions(model, stream, tokenizer, device=device, amp=amp,
                                     beam_size=beam_size, max_len=max_len,
                                     max_text_len=max_text_len, env=env)
        else:
            preds = predict_vqa(model, stream, answers, device=device, amp=amp, env=env)
        scores = score_predictions(task, preds, references, spice) if env.is_main else {}
        if env.distributed:
            box = [scores]
            dist.broadcast_object_list(box, src=0)
            scores = box[0]
        return {k: v for k, v in scores.items() if isinstance(v, (int, float))}
    return evaluate
