"""What every task shares: text and tag token ids, the per-batch layout, the device side, and
the contract of the task registry (:data:`TASKS`).

Sequence (Oscar/VinVL), in one of two text layouts (``data.text_layout``; a task declares its
own, :attr:`Task.layout`)::

    split (caption, pretrain):
    [CLS] text [SEP] | tag tokens [SEP] | region_1 .. region_R
    segment 0        | segment 1        | (regions: no segment)
    positions 0..    | max_text_len..   |

    pair (vqa):
    [CLS] question [SEP] tag tokens [SEP] | region_1 .. region_R
    segment 0 .......... 1 .............  |
    positions 0, 1, 2, ... (contiguous)   |

``split``: tag positions start at ``max_text_len`` whatever the text length, as in Oscar's
captioning (which pads the caption to that length): a caption being decoded one token at a time
sees its tags at the same positions as in training. ``pair``: Oscar's ``run_vqa.py`` input
(BERT's sentence pair, ``max_seq_length`` 128 tokens for both together, the longer side
truncated first by ``_truncate_seq_pair``; an image without tags gives ``[CLS] question
[SEP]``), so that imported Oscar VQA checkpoints see the positions they were trained with.

A task turns a streamed sample into model inputs: per sample in the loader workers
(:meth:`Task.transform`), per batch in collation (:meth:`Task.collate`), then on the device
(:func:`model_inputs`). Features keep their stored dtype (fp16) through :meth:`Task.collate`;
:func:`to_device` moves them and :func:`model_inputs` adds the box geometry and attention mask
on the device, where the model casts the features.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vlkd.common.config import ConfigError

from ..model import IGNORE_INDEX, box_geometry, caption_attention_mask, padding_mask
from ..registry import Registry
from ..stream import Record, Sample, pad_regions

if TYPE_CHECKING:
    from ..config import RunConfig, TaskConfig
    from ..distributed import DistEnv
    from ..stream import RegionStream

__all__ = ["TASKS", "TextEncoder", "Task", "task_names", "mask_tokens", "to_device",
           "model_inputs", "LAYOUTS", "truncate_seq_pair"]

#: Text layouts (see the module docstring).
LAYOUTS = ("split", "pair")


def truncate_seq_pair(tokens_a: list, tokens_b: list, max_length: int) -> None:
    """Oscar's (BERT's) ``_truncate_seq_pair``: pops the last token of the longer list (of
    ``tokens_b`` on a tie) until both fit in ``max_length``; in place."""
    while len(tokens_a) + len(tokens_b) > max_length:
        (tokens_a if len(tokens_a) > len(tokens_b) else tokens_b).pop()


class TextEncoder:
    """Token ids of texts and of tag sequences with one tokenizer.

    Args:
        tokenizer: A BERT WordPiece tokenizer (Hugging Face).
        class_names: The tag set's class names (index → name).
        max_text_len: Text tokens with [CLS] and [SEP] (``split`` layout).
        max_tag_len: Tag tokens with the closing [SEP] (``split`` layout).
        unique_tags: One tag per distinct class, in first-box order.
        max_seq_len: ``pair`` layout: all tokens of ``[CLS] text [SEP] tags [SEP]``.
        attribute_names: Names of the attribute ids of "attribute + object" tags (``red
            car``); empty: tags are object names only.
        tag_vocab: Class names that may become tags (e.g. the 80 COCO classes); others are
            left out. None: every class.
    """

    def __init__(self, tokenizer, class_names: Sequence[str], max_text_len: int = 40,
                 max_tag_len: int = 30, unique_tags: bool = False, max_seq_len: int = 128,
                 attribute_names: Sequence[str] = (), tag_vocab: Sequence[str] | None = None):
        if max_text_len < 3 or max_tag_len < 1 or max_seq_len < 4:
            raise ValueError(f"max_text_len must be >= 3, max_tag_len >= 1 and max_seq_len >= 4, "
                             f"got {max_text_len}, {max_tag_len}, {max_seq_len}")
        self.tokenizer = tokenizer
        self.max_text_len, self.max_tag_len = int(max_text_len), int(max_tag_len)
        self.max_seq_len = int(max_seq_len)
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
        self.attribute_tokens = [tokenizer(str(n).replace("_", " "),
                                           add_special_tokens=False)["input_ids"]
                                 for n in attribute_names]
        self.allowed: np.ndarray | None = None
        if tag_vocab is not None:
            keep = {str(n).strip().lower() for n in tag_vocab}
            self.allowed = np.array([str(n).replace("_", " ").strip().lower() in keep
                                     or str(n).strip().lower() in keep for n in class_names],
                                    dtype=bool)

    def text_ids(self, text: str) -> np.ndarray:
        """``[CLS] tokens [SEP]`` truncated to ``max_text_len``, int64."""
        toks = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_text_len - 2]
        return np.array([self.cls_id, *toks, self.sep_id], dtype=np.int64)

    def _tag_tokens(self, classes: np.ndarray, limit: int,
                    attrs: np.ndarray | None = None) -> list[int]:
        """The first ``limit`` tokens of the tag sentence of a box class sequence (with
        ``attrs``, each tag is its attribute then its object: "red car")."""
        seq = [int(c) for c in classes]
        at = [-1] * len(seq) if attrs is None or not self.attribute_tokens else \
            [int(a) for a in attrs]
        pairs = list(zip(seq, at))
        if self.unique_tags:  # the first box of each class, in box order
            seen: set[int] = set()
            pairs = [(c, a) for c, a in pairs if not (c in seen or seen.add(c))]
        ids: list[int] = []
        for c, a in pairs:
            if len(ids) >= limit:
                break
            if not 0 <= c < len(self.class_tokens):
                raise ValueError(f"box class {c} is outside the tag set's {len(self.class_tokens)} "
                                 "class names")
            if self.allowed is not None and not self.allowed[c]:
                continue
            if a >= 0:
                if a >= len(self.attribute_tokens):
                    raise ValueError(f"attribute id {a} is outside the tag set's "
                                     f"{len(self.attribute_tokens)} attribute names")
                ids.extend(self.attribute_tokens[a])
            ids.extend(self.class_tokens[c])
        return ids[:limit]

    def tag_ids(self, classes: np.ndarray, attrs: np.ndarray | None = None) -> np.ndarray:
        """Tag tokens of a box class sequence then ``[SEP]``, truncated to ``max_tag_len``."""
        ids = self._tag_tokens(classes, self.max_tag_len - 1, attrs)
        return np.array([*ids, self.sep_id], dtype=np.int64)

    def pair_ids(self, text: str, classes: np.ndarray,
                 attrs: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        """Oscar's VQA input ``[CLS] text [SEP] tags [SEP]`` in at most ``max_seq_len`` tokens.

        As ``run_vqa.py`` ``tensorize``: the text and tag tokens are truncated together to
        ``max_seq_len - 3`` by :func:`truncate_seq_pair`; without tags the input is
        ``[CLS] text [SEP]`` (text truncated to ``max_seq_len - 2``).

        Returns:
            (int64 ids, length of the first segment ``[CLS] text [SEP]``).
        """
        a = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        # capping the tags at max_seq_len tokens first truncates the pair as the whole tag
        # sentence would (tests/test_tasks.py compares with Oscar's code)
        b = self._tag_tokens(classes, self.max_seq_len, attrs)
        if b:
            truncate_seq_pair(a, b, self.max_seq_len - 3)
            ids = [self.cls_id, *a, self.sep_id, *b, self.sep_id]
        else:
            a = a[: self.max_seq_len - 2]
            ids = [self.cls_id, *a, self.sep_id]
        return np.array(ids, dtype=np.int64), len(a) + 2

    def random_tokens(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` random non-special token ids."""
        out = rng.integers(0, self.vocab_size, size=n)
        bad = np.isin(out, self.special_ids)
        while bad.any():
            out[bad] = rng.integers(0, self.vocab_size, size=int(bad.sum()))
            bad = np.isin(out, self.special_ids)
        return out


def mask_tokens(ids: np.ndarray, picked: np.ndarray, enc: TextEncoder,
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
    """Base of the tasks, and the contract of the task registry (:data:`TASKS`).

    A task is one module of :mod:`vlkd.train.tasks` holding a subclass registered with
    ``@TASKS.register()``. Its instances are the data side (per-sample :meth:`transform` in a
    loader worker, per-batch :meth:`collate`); its class attributes and class methods say what
    a run of the task needs, so that nothing else names the task:

    Attributes:
        name: Registry name: ``task.name`` in the config, a ``--task`` choice, and the ``task``
            argument of :meth:`~vlkd.train.model.VLModel.forward` (which runs :attr:`heads`).
        heads: Model heads the task runs (:attr:`~vlkd.train.model.VLConfig.heads` names); the
            first is the one the ``logits`` KD term distils.
        metric: Evaluation score that picks the best checkpoint (the ``eval.metric`` default);
            empty when the task has no evaluation (then ``vlkd-train evaluate`` refuses it).
        needs_answers: The task reads a VQA answer vocabulary (``answers`` below).
        layouts: The text layouts (:data:`LAYOUTS`) the task can use, its own first (what
            ``data.text_layout: auto`` picks).

    Class methods (``cfg`` is the run's :class:`~vlkd.train.config.RunConfig`):

    * :meth:`from_config` builds the data side from the config;
    * :meth:`default_losses` gives the task's loss terms (distillation adds its own);
    * :meth:`train_records` / :meth:`eval_records` read the annotation files into records
      (and evaluation references); :meth:`corpus_records` those of one corpus of a mixture
      (``data.corpora``), for the tasks that take one;
    * :meth:`itm_classes` says how many image-text matching outputs a new model needs;
    * :meth:`has_eval` says whether the config names an evaluation set (periodic evaluation);
    * :meth:`predict`, :meth:`score`, :meth:`result_rows` predict over an evaluation stream,
      score against the references, and lay predictions out in the results-file format.

    Args:
        encoder: The :class:`TextEncoder`.
        max_regions: Regions per image kept (the first ones, in stored order).
        layout: Text layout, one of :attr:`layouts` (default: the first).
    """

    name: str = ""
    heads: tuple[str, ...] = ()
    metric: str = ""
    needs_answers: bool = False
    layouts: tuple[str, ...] = ("split",)

    def __init__(self, encoder: TextEncoder, max_regions: int = 50, layout: str | None = None):
        self.enc, self.max_regions = encoder, int(max_regions)
        self.layout = layout or self.layouts[0]
        if self.layout not in self.layouts:
            raise ConfigError(f"task {self.name!r} takes the text layouts {list(self.layouts)}, "
                              f"not {self.layout!r} (data.text_layout)")

    # -- from the config (class methods: the registry's contract)
    @classmethod
    def from_config(cls, cfg: "RunConfig", encoder: TextEncoder, *, train: bool = True,
                    num_answers: int = 0) -> "Task":
        """The data side for ``cfg`` (``train=False``: evaluation samples)."""
        return cls(encoder, cfg.data.max_regions, layout=cls.layout_for(cfg))

    @classmethod
    def layout_for(cls, cfg: "RunConfig") -> str:
        """``data.text_layout``, or the task's own layout for ``auto``."""
        layout = cfg.data.text_layout
        if layout == "auto":
            return cls.layouts[0]
        if layout not in LAYOUTS:
            raise ConfigError(f"data.text_layout must be auto or one of {list(LAYOUTS)}, got "
                              f"{layout!r}")
        return layout

    @classmethod
    def default_losses(cls, task: "TaskConfig") -> dict:
        """Loss terms ``{name: {type, weight, params}}`` of the task (``losses:`` merges in)."""
        raise NotImplementedError(f"task {cls.name!r} declares no loss terms")

    @classmethod
    def train_records(cls, cfg: "RunConfig", answers: list[str] | None = None) -> list[Record]:
        """Training samples from the ``data`` annotation files."""
        raise NotImplementedError(f"task {cls.name!r} declares no training records")

    @classmethod
    def corpus_records(cls, cfg: "RunConfig", corpus, answers: list[str] | None = None
                       ) -> list[Record]:
        """Training samples of one corpus of ``data.corpora``
        (:class:`~vlkd.train.config.CorpusConfig`)."""
        raise ConfigError(f"task {cls.name!r} does not take data.corpora (mixed corpora are "
                          "for --task pretrain); use data.regions and the task's annotations")

    @classmethod
    def itm_classes(cls, cfg: "RunConfig") -> int | None:
        """Image-text matching outputs a new model needs (None: the model's own)."""
        return None

    @classmethod
    def has_eval(cls, cfg: "RunConfig") -> bool:
        """Whether ``cfg.eval`` names an evaluation set for this task."""
        return False

    @classmethod
    def eval_records(cls, cfg: "RunConfig", answers: list[str] | None = None
                     ) -> tuple[list[Record], Any]:
        """Evaluation samples and the references :meth:`score` compares with."""
        raise cls._no_eval()

    @classmethod
    def predict(cls, model, stream: "RegionStream", cfg: "RunConfig", *, tokenizer,
                answers: list[str] | None, device: torch.device, amp: torch.dtype | None,
                env: "DistEnv") -> dict:
        """Predictions over an evaluation stream, gathered over ranks: ``{key: prediction}``."""
        raise cls._no_eval()

    @classmethod
    def score(cls, predictions: dict, references: Any, cfg: "RunConfig") -> dict:
        """Scores of the predictions (``{}`` without references)."""
        raise cls._no_eval()

    @classmethod
    def result_rows(cls, predictions: dict) -> list[dict]:
        """The predictions as rows of the results file (an evaluation server's format)."""
        raise cls._no_eval()

    @classmethod
    def _no_eval(cls) -> ConfigError:
        return ConfigError(f"evaluate supports the tasks {task_names(evaluable=True)}, not "
                           f"{cls.name!r}")

    # -- per sample (in a loader worker)
    def _regions(self, sample: Sample) -> dict:
        n = min(sample.regions.num_regions, self.max_regions)
        out = {"features": sample.regions.features[:n],            # stored dtype, a view
               "boxes": np.asarray(sample.regions.boxes[:n], dtype=np.float32),
               "image_hw": np.asarray(sample.regions.image_hw, dtype=np.float32)}
        if self.layout == "split":
            out["tag_ids"] = self.enc.tag_ids(*sample.tags(n))
        if sample.teacher is not None:
            out["teacher_features"] = sample.teacher.features[:n]
        return out

    def transform(self, sample: Sample) -> dict:
        raise NotImplementedError

    # -- per batch (in a loader worker)
    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        """Pads text, tags and regions in the task's layout; features keep their stored dtype.

        ``split`` items carry ``text_ids`` and ``tag_ids`` (with ``text_labels`` /
        ``tag_labels`` when tokens are predicted); ``pair`` items carry the whole
        ``[CLS] text [SEP] tags [SEP]`` as ``text_ids`` and its first segment's length as
        ``first_len`` (:meth:`TextEncoder.pair_ids`).
        """
        bsz = len(items)
        if self.layout == "pair":
            t = max(len(it["text_ids"]) for it in items)
        else:
            ta = max(len(it["text_ids"]) for it in items)
            t = ta + max(len(it["tag_ids"]) for it in items)
        input_ids = np.full((bsz, t), self.enc.pad_id, dtype=np.int64)
        types = np.zeros((bsz, t), dtype=np.int64)
        positions = np.zeros((bsz, t), dtype=np.int64)
        text_mask = np.zeros((bsz, t), dtype=bool)
        caption_part = np.zeros((bsz, t), dtype=bool)
        labels = np.full((bsz, t), IGNORE_INDEX, dtype=np.int64)
        for k, it in enumerate(items):
            n = len(it["text_ids"])
            input_ids[k, :n] = it["text_ids"]
            positions[k, :n] = np.arange(n)
            text_mask[k, :n] = True
            if "text_labels" in it:
                labels[k, :n] = it["text_labels"]
            if self.layout == "pair":
                first = it["first_len"]
                types[k, first:n] = 1
                caption_part[k, :first] = True
                continue
            m = len(it["tag_ids"])
            input_ids[k, ta:ta + m] = it["tag_ids"]
            types[k, ta:ta + m] = 1
            positions[k, ta:ta + m] = self.enc.max_text_len + np.arange(m)
            text_mask[k, ta:ta + m] = True
            caption_part[k, :n] = True
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


TASKS: Registry[type[Task]] = Registry("task", Task.__doc__ or "")


def task_names(*, evaluable: bool = False) -> list[str]:
    """Registered task names (``evaluable``: only those with an evaluation metric)."""
    return [n for n in TASKS.names() if not evaluable or TASKS.get(n).metric]


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
