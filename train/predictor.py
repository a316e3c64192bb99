"""A trained model directory applied to regions held in memory: captions and VQA answers of
images whose regions were never written to a region set.

This is phase two's half of ``vlkd-infer`` (:mod:`vlkd.infer`), which gets the regions from a
detector in the same process. The model sees exactly what ``vlkd-train evaluate`` gives it for
the same regions read from a set: the task's own evaluation transform and collation (its text
layout and lengths from the directory's ``vlkd_train.json``), object tags from each box's class
(the detector's classes are the model's tag set), beam search or the VQA head::

    predictor = VLPredictor("runs/student/final", device="cpu")
    captions = predictor.captions(regions)                 # regions: list of ImageRegions
    probs = predictor.answer_scores(regions, questions)    # (N, A), one row per question
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from vlkd.common.config import ConfigError
from vlkd.common.regionset import ImageRegions
from vlkd.data.vqa import load_answer_vocab

from . import build
from .config import DataConfig, load_config
from .evaluation import caption_batch, vqa_logits
from .stream import Record, Sample
from .tasks import build_task
from .tokenizer import load_tokenizer

__all__ = ["VLPredictor", "model_layout"]

#: ``vlkd_train.json`` keys that are not ``data.*`` layout keys although named like one.
_NOT_LAYOUT = ("tag_vocab",)


def model_layout(meta: dict) -> dict[str, object]:
    """The ``data.*`` options of a model directory's input layout (``vlkd_train.json``): the
    keys it records that are :class:`~vlkd.train.config.DataConfig` fields; a directory written
    before text layouts existed was trained with ``split``."""
    fields = {f.name for f in dataclasses.fields(DataConfig)} - set(_NOT_LAYOUT)
    layout = {f"data.{k}": v for k, v in meta.items() if k in fields}
    if meta and "text_layout" not in meta:
        layout["data.text_layout"] = "split"
    return layout


class VLPredictor:
    """A model directory ready to caption or answer from in-memory regions.

    Args:
        model_dir: A vlkd model directory (``final/``, ``best/``, a bundle's ``model/``) with
            its tokenizer, ``vlkd_train.json`` and, for VQA, ``answers.txt``.
        device: Where the model runs.
        amp: Autocast dtype on CUDA (None: full precision).
        beam_size: Captioning beam width (1 = greedy).
        max_len: Longest caption, tokens with [SEP].
        batch_size: Images (captions) or questions (VQA) per forward pass.

    Attributes:
        meta: the directory's ``vlkd_train.json``.
        task: the task the model was trained for (``caption``, ``vqa``).
        class_names: the tag set's class names (the detector classes the model's tags are).
        answers: the answer vocabulary (None for a model without ``answers.txt``).
        region_dim: D of a region feature the model takes.

    Raises:
        ConfigError: the directory lacks what inference needs, or its tags cannot be made
            from one detector's boxes.
    """

    def __init__(self, model_dir: str | Path, *, device: str | torch.device = "cpu",
                 amp: torch.dtype | None = None, beam_size: int = 5, max_len: int = 20,
                 batch_size: int = 8):
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise ConfigError(f"{self.model_dir} is not a model directory (no config.json); "
                              "pass a vlkd-train run's final/ or best/ directory")
        self.meta = build.read_meta(self.model_dir)
        if not self.meta.get("task") or not self.meta.get("class_names"):
            raise ConfigError(
                f"{self.model_dir} has no {build.META_NAME} with the task and the tag class names "
                "the model was trained with (an imported checkpoint that was never fine-tuned?); "
                "fine-tune it with `vlkd-train finetune` on regions of the detector you deploy")
        self._refuse_other_tags()
        self.task = str(self.meta["task"])
        self.device = torch.device(device)
        self.amp, self.beam_size, self.max_len = amp, int(beam_size), int(max_len)
        self.batch_size = int(batch_size)
        self.cfg = load_config(options={"task.name": self.task, **model_layout(self.meta)})
        self.tokenizer = load_tokenizer(self.model_dir)
        answers = self.model_dir / build.ANSWERS_NAME
        self.answers = load_answer_vocab(answers) if answers.is_file() else None
        self.class_names = [str(n) for n in self.meta["class_names"]]
        self.encoder = build.make_encoder(self.cfg, self.tokenizer, self.class_names)
        self.model = build.load_model_dir(self.model_dir).to(self.device).eval()
        self.region_dim = int(self.model.config.region_dim)
        self._tasks: dict[str, object] = {}

    def _refuse_other_tags(self) -> None:
        m = self.meta
        other = [what for what, used in (
            ("tags from another detector's boxes (data.tag_source=image)",
             m.get("tag_source", "boxes") != "boxes"),
            ("attribute + object tags (data.tag_attributes)", bool(m.get("tag_attributes"))),
            ("a restricted tag vocabulary (data.tag_vocab)", bool(m.get("tag_vocab"))))
            if used]
        if other:
            raise ConfigError(f"{self.model_dir} was trained with {' and '.join(other)}; a bundle "
                              "makes the tags from its one detector's box classes only. Deploy a "
                              "model trained with box tags (the default)")

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def _task(self, name: str):
        if name not in self._tasks:
            cfg = self.cfg if name == self.task else load_config(
                options={"task.name": name, **model_layout(self.meta)})
            self._tasks[name] = build_task(cfg, self.encoder, train=False,
                                           num_answers=len(self.answers or []))
        return self._tasks[name]

    def _batches(self, task, records: Sequence[Record], regions: Sequence[ImageRegions]):
        """Collated batches of ``batch_size`` samples (and their records), in order."""
        for a in range(0, len(records), self.batch_size):
            recs, regs = records[a:a + self.batch_size], regions[a:a + self.batch_size]
            items = [task.transform(Sample(rec, reg, None, np.asarray(reg.classes), [0]))
                     for rec, reg in zip(recs, regs)]
            yield task.collate(items)

    def tags(self, batch: dict) -> list[str]:
        """The object tags each sample of a collated batch gave the model, as text."""
        tag = batch["text_mask"] & (batch["token_type_ids"] == 1) \
            & (batch["input_ids"] != self.encoder.sep_id)
        return [self.tokenizer.decode(ids[m].tolist()).strip()
                for ids, m in zip(batch["input_ids"], tag)]

    @torch.no_grad()
    def captions(self, regions: Sequence[ImageRegions]) -> list[tuple[str, str]]:
        """``(caption, tags)`` of every image, in order (the model must be a caption model)."""
        if self.task != "caption":
            raise ConfigError(f"{self.model_dir} is a {self.task!r} model: it does not caption; "
                              "use a model trained with --task caption")
        task = self._task("caption")
        out: list[tuple[str, str]] = []
        records = [Record(r.image_id, r.image_id) for r in regions]
        for batch in self._batches(task, records, regions):
            texts = caption_batch(self.model, batch, self.tokenizer, device=self.device,
                                  amp=self.amp, beam_size=self.beam_size, max_len=self.max_len,
                                  max_text_len=self.cfg.data.max_text_len)
            out.extend(zip(texts, self.tags(batch)))
        return out

    @torch.no_grad()
    def answer_scores(self, regions: Sequence[ImageRegions], questions: Sequence[str]
                      ) -> tuple[torch.Tensor, list[str]]:
        """Answer probabilities (the sigmoid of the VQA head, which soft-score BCE trains) of
        each question about the image whose regions are at the same position.

        Returns:
            ``(N, A)`` float32 on the CPU, and the tags each question was asked with.
        """
        if self.task != "vqa" or self.answers is None:
            raise ConfigError(f"{self.model_dir} is a {self.task!r} model without an answer "
                              f"list ({build.ANSWERS_NAME}): it does not answer questions; use a "
                              "model trained with --task vqa")
        if len(regions) != len(questions):
            raise ValueError(f"{len(questions)} questions for {len(regions)} images' regions: "
                             "pass one image's regions per question")
        task = self._task("vqa")
        records = [Record(str(k), r.image_id, q) for k, (r, q) in enumerate(zip(regions,
                                                                               questions))]
        scores, tags = [], []
        for batch in self._batches(task, records, regions):
            scores.append(torch.sigmoid(vqa_logits(self.model, batch, device=self.device,
                                                   amp=self.amp)).cpu())
            tags.extend(self.tags(batch))
        if not scores:
            return torch.zeros((0, len(self.answers))), []
        return torch.cat(scores), tags

