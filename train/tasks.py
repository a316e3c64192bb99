"""Tasks: turn a streamed sample into model inputs (per sample in the loader workers, per batch in
collation, then on the device).

Sequence (Oscar/VinVL)::

    [CLS] text [SEP] | tag tokens [SEP] | region_1 .. region_R
    segment 0        | segment 1        | (regions: no segment)
    positions 0..    | max_text_len..   |

Tag positions start at ``max_text_len`` whatever the text length, as in Oscar (which pads the
text to that length): a caption being decoded one token at a time sees its tags at the same
positions as in training.

* ``caption`` -- Oscar's masked seq2seq: ``mask_prob`` of the caption tokens (and its closing
  [SEP], so that the model learns to stop), at least 1 and at most ``max_masked``, are chosen;
  each becomes [MASK] (80 %), a random token (10 %) or stays (10 %). Attention: caption tokens
  see earlier caption tokens and all tags and regions; tags and regions never see the caption.
* ``vqa`` -- question as text; targets are soft scores over the answer vocabulary.
* ``pretrain`` -- masked tokens over text and tags (BERT's 80/10/10) and Oscar's contrastive tag
  swap: with probability ``tag_swap_prob`` a sample takes the next sample's tags in the batch and
  its image-text matching label becomes 0 (1 = tags belong to the image).

Features keep their stored dtype (fp16) through :meth:`Task.collate`; :func:`to_device` moves
them and :func:`model_inputs` adds the box geometry and attention mask on the device, where the
model casts the features.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from vlkd.train.model import IGNORE_INDEX, box_geometry, caption_attention_mask, padding_mask

from .stream import Sample, pad_regions

__all__ = ["TextEncoder", "Task", "CaptionTask", "VQATask", "PretrainTask", "make_task",
           "to_device", "model_inputs", "TASK_NAMES"]

TASK_NAMES = ("caption", "vqa", "pretrain")


class TextEncoder:
    """Token ids of texts and of tag sequences with one tokenizer.

    Args:
        tokenizer: A BERT WordPiece tokenizer (Hugging Face).
        class_names: The tag set's class names (index → name).
        max_text_len: Text tokens with [CLS] and [SEP].
        max_tag_len: Tag tokens with the closing [SEP].
        unique_tags: One tag per distinct class, in first-box order.
    """

    def __init__(self, tokenizer, class_names: Sequence[str], max_text_len: int = 40,
                 max_tag_len: int = 30, unique_tags: bool = False):
        if max_text_len < 3 or max_tag_len < 1:
            raise ValueError(f"max_text_len must be >= 3 and max_tag_len >= 1, got "
                             f"{max_text_len}, {max_tag_len}")
        self.tokenizer = tokenizer
        self.max_text_len, self.max_tag_len = int(max_text_len), int(max_tag_len)
        self.unique_tags = bool(unique_tags)
        vocab = tokenizer.get_vocab()
        self.cls_id, self.sep_id = vocab["[CLS]"], vocab["[SEP]"]
        self.mask_id, self.pad_id = vocab["[MASK]"], vocab["[PAD]"]
        self.vocab_size = len(tokenizer)
        self.special_ids = np.array(sorted({vocab[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]",
                                                                "[MASK]")}))
        # A class name tokenises the same inside a tag sentence as alone (WordPiece splits on
        # whitespace first), so each name is tokenised once here.
        self.class_tokens = [tokenizer(str(n).replace("_", " "), add_special_tokens=False)["input_ids"]
                             for n in class_names]

    def text_ids(self, text: str) -> np.ndarray:
        """``[CLS] tokens [SEP]`` truncated to ``max_text_len``, int64."""
        toks = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_text_len - 2]
        return np.array([self.cls_id, *toks, self.sep_id], dtype=np.int64)

    def tag_ids(self, classes: np.ndarray) -> np.ndarray:
        """Tag tokens of a box class sequence then ``[SEP]``, truncated to ``max_tag_len``."""
        seq = [int(c) for c in classes]
        if self.unique_tags:
            seq = list(dict.fromkeys(seq))
        ids: list[int] = []
        for c in seq:
            if not 0 <= c < len(self.class_tokens):
                raise ValueError(f"box class {c} is outside the tag set's {len(self.class_tokens)} "
                                 "class names")
            ids.extend(self.class_tokens[c])
            if len(ids) >= self.max_tag_len - 1:
                break
        return np.array([*ids[: self.max_tag_len - 1], self.sep_id], dtype=np.int64)

    def random_tokens(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` random non-special token ids."""
        out = rng.integers(0, self.vocab_size, size=n)
        bad = np.isin(out, self.special_ids)
        while bad.any():
            out[bad] = rng.integers(0, self.vocab_size, size=int(bad.sum()))
            bad = np.isin(out, self.special_ids)
        return out


def _mask_tokens(ids: np.ndarray, candidates: np.ndarray, picked: np.ndarray, enc: TextEncoder,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """BERT's 80/10/10 corruption of ``ids`` at ``picked`` positions; labels elsewhere -100."""
    ids = ids.copy()
    labels = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
    if picked.size == 0:
        return ids, labels
    labels[picked] = ids[picked]
    u = rng.random(picked.size)
    ids[picked[u < 0.8]] = enc.mask_id
    rand = picked[(u >= 0.8) & (u < 0.9)]
    if rand.size:
        ids[rand] = enc.random_tokens(rng, rand.size)
    return ids, labels


class Task:
    """Base of the tasks: per-sample transform and batch collation shared by all of them.

    Args:
        encoder: The :class:`TextEncoder`.
        max_regions: Regions per image kept (the first ones, in stored order).
    """

    name = ""
    #: The ``task`` argument of :meth:`VLModel.forward`.
    model_task = ""

    def __init__(self, encoder: TextEncoder, max_regions: int = 50):
        self.enc, self.max_regions = encoder, int(max_regions)

    # -- per sample (in a loader worker)
    def _regions(self, sample: Sample) -> dict:
        n = min(sample.regions.num_regions, self.max_regions)
        out = {"features": sample.regions.features[:n],            # stored dtype, a view
               "boxes": np.asarray(sample.regions.boxes[:n], dtype=np.float32),
               "image_hw": np.asarray(sample.regions.image_hw, dtype=np.float32),
               "tag_ids": self.enc.tag_ids(sample.tag_classes[:n])}
        if sample.teacher is not None:
            out["teacher_features"] = sample.teacher.features[:n]
        return out

    def transform(self, sample: Sample) -> dict:
        raise NotImplementedError

    # -- per batch (in a loader worker)
    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        """Pads text, tags and regions; features stay in their stored dtype."""
        bsz = len(items)
        ta = max(len(it["text_ids"]) for it in items)
        tb = max(len(it["tag_ids"]) for it in items)
        t = ta + tb
        input_ids = np.full((bsz, t), self.enc.pad_id, dtype=np.int64)
        types = np.zeros((bsz, t), dtype=np.int64)
        positions = np.zeros((bsz, t), dtype=np.int64)
        text_mask = np.zeros((bsz, t), dtype=bool)
        caption_part = np.zeros((bsz, t), dtype=bool)
        labels = np.full((bsz, t), IGNORE_INDEX, dtype=np.int64)
        for k, it in enumerate(items):
            n, m = len(it["text_ids"]), len(it["tag_ids"])
            input_ids[k, :n], input_ids[k, ta:ta + m] = it["text_ids"], it["tag_ids"]
            types[k, ta:ta + m] = 1
            positions[k, :n] = np.arange(n)
            positions[k, ta:ta + m] = self.enc.max_text_len + np.arange(m)
            text_mask[k, :n], text_mask[k, ta:ta + m] = True, True
            caption_part[k, :n] = True
            if "text_labels" in it:
                labels[k, :n] = it["text_labels"]
            if "tag_labels" in it:
                labels[k, ta:ta + m] = it["tag_labels"]
        feats, region_mask = pad_regions([it["features"] for it in items])
        boxes, _ = pad_regions([it["boxes"] for it in items])
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "token_type_ids": torch.from_numpy(types),
            "position_ids": torch.from_numpy(positions),
            "text_mask": torch.from_numpy(text_mask),
            "caption_part": torch.from_numpy(caption_part),
            "region_features": torch.from_numpy(feats),
            "region_boxes": torch.from_numpy(boxes),
            "region_mask": torch.from_numpy(region_mask),
            "image_hw": torch.from_numpy(np.stack([it["image_hw"] for it in items])),
        }
        if "teacher_features" in items[0]:
            batch["teacher_region_features"] = torch.from_numpy(
                pad_regions([it["teacher_features"] for it in items])[0])
        if (labels != IGNORE_INDEX).any():
            batch["mlm_labels"] = torch.from_numpy(labels)
        return batch

    def seq2seq(self) -> bool:
        """Whether the attention mask is the captioning seq2seq mask."""
        return False


class CaptionTask(Task):
    """Oscar masked seq2seq captioning (see the module docstring).

    Args:
        encoder, max_regions: See :class:`Task`.
        mask_prob: Fraction of caption tokens (with the closing [SEP]) masked.
        max_masked: At most this many per caption.
        train: False for evaluation samples (no text, no masking).
    """

    name = model_task = "caption"

    def __init__(self, encoder: TextEncoder, max_regions: int = 50, mask_prob: float = 0.15,
                 max_masked: int = 3, train: bool = True):
        super().__init__(encoder, max_regions)
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
        out["text_ids"], out["text_labels"] = _mask_tokens(ids, candidates, picked, self.enc,
                                                           sample.rng)
        return out

    def seq2seq(self) -> bool:
        return True


class VQATask(Task):
    """VQA: question text, soft-score targets over ``num_answers`` answers.

    Args:
        encoder, max_regions: See :class:`Task`.
        num_answers: Size A of the answer vocabulary.
    """

    name = model_task = "vqa"

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


class PretrainTask(Task):
    """Masked tokens over text and tags + contrastive tag swap (see the module docstring).

    Args:
        encoder, max_regions: See :class:`Task`.
        mask_prob: Per-token masking probability of text tokens.
        tag_mask_prob: Per-token masking probability of tag tokens.
        tag_swap_prob: Probability of taking the next sample's tags.
    """

    name = "pretrain"
    model_task = "pretrain"

    def __init__(self, encoder: TextEncoder, max_regions: int = 50, mask_prob: float = 0.15,
                 tag_mask_prob: float = 0.15, tag_swap_prob: float = 0.5):
        super().__init__(encoder, max_regions)
        self.mask_prob, self.tag_mask_prob = float(mask_prob), float(tag_mask_prob)
        self.tag_swap_prob = float(tag_swap_prob)

    def _mask(self, ids: np.ndarray, prob: float, rng: np.random.Generator, first: int):
        cand = np.arange(first, len(ids) - 1)  # not [CLS] nor the closing [SEP]
        picked = cand[rng.random(cand.size) < prob]
        return _mask_tokens(ids, cand, picked, self.enc, rng)

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
        itm = np.ones(bsz, dtype=np.int64)
        for k, it in enumerate(items):
            donor = items[(k + 1) % bsz]
            if it["swap"] and bsz > 1 and not np.array_equal(donor["clean_tag_ids"],
                                                             it["clean_tag_ids"]):
                it = dict(it, tag_ids=donor["tag_ids"], tag_labels=donor["tag_labels"])
                itm[k] = 0
            swapped.append(it)
        batch = super().collate(swapped)
        batch["itm_labels"] = torch.from_numpy(itm)
        return batch


def make_task(name: str, encoder: TextEncoder, *, max_regions: int = 50, train: bool = True,
              mask_prob: float = 0.15, max_masked: int = 3, tag_mask_prob: float = 0.15,
              tag_swap_prob: float = 0.5, num_answers: int = 0) -> Task:
    """Builds a task by name (``caption``, ``vqa``, ``pretrain``)."""
    if name == "caption":
        return CaptionTask(encoder, max_regions, mask_prob, max_masked, train=train)
    if name == "vqa":
        if num_answers <= 0:
            raise ValueError("the vqa task needs the answer vocabulary size (num_answers > 0)")
        return VQATask(encoder, max_regions, num_answers)
    if name == "pretrain":
        return PretrainTask(encoder, max_regions, mask_prob, tag_mask_prob, tag_swap_prob)
    raise ValueError(f"unknown task {name!r}; choose from {TASK_NAMES}")


# --------------------------------------------------------------------------------------------
# On the device
# --------------------------------------------------------------------------------------------

def to_device(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Moves tensors (in their stored dtype, so fp16 features move at half the bytes)."""
    nb = torch.device(device).type == "cuda"
    return {k: (v.to(device, non_blocking=nb) if isinstance(v, torch.Tensor) else v)
            for k, v in batch.items()}


def model_inputs(batch: Mapping[str, Any], geometry_dim: int, *, seq2seq: bool,
                 teacher: bool = False) -> dict[str, Any]:
    """The batch dict :meth:`VLModel.forward` reads: box geometry and attention mask added.

    Args:
        batch: A collated batch (on the device).
        geometry_dim: The model's ``config.geometry_dim`` (0: none).
        seq2seq: Captioning mask (B, L, L) instead of the padding mask (B, L).
        teacher: Use the teacher's region features (same boxes, same tokens).

    Returns:
        A new dict; the input batch is not modified.
    """
    out = dict(batch)
    if teacher:
        if batch.get("teacher_region_features") is None:
            raise KeyError("the batch has no teacher_region_features; build the stream with "
                           "teacher_regions")
        out["region_features"] = batch["teacher_region_features"]
    if geometry_dim:
        out["region_geometry"] = box_geometry(batch["region_boxes"], batch["image_hw"], geometry_dim)
    text_mask, region_mask = batch["text_mask"], batch["region_mask"]
    if seq2seq:
        cap = torch.cat([batch["caption_part"] & text_mask, torch.zeros_like(region_mask)], dim=1)
        ctx = torch.cat([text_mask & ~batch["caption_part"], region_mask], dim=1)
        out["attention_mask"] = caption_attention_mask(cap, ctx)
    else:
        out["attention_mask"] = padding_mask(text_mask, region_mask)
    return out
