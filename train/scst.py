"""Self-critical sequence training (SCST): CIDEr optimisation after cross-entropy training, as
Oscar offers it (microsoft/Oscar ``oscar/run_captioning.py`` ``scst_train_iter``,
``oscar/utils/caption_evaluate.py`` ``ScstRewardCriterion``; Rennie et al. 2017).

One step, for a batch of B training images (:class:`SCSTModule`):

1. **Baseline.** The greedy caption of every image, the model in eval mode, no gradient
   (``scst.baseline: greedy``; ``sample`` uses the mean reward of the image's other samples,
   Oscar's other baseline).
2. **Samples.** ``scst.samples`` = n captions per image drawn token by token from the model's
   softmax (temperature 1, no top-k / top-p: Oscar's defaults), the model in train mode
   (dropout on, as Oscar samples), no gradient, up to ``scst.max_len`` tokens with [SEP].
3. **Reward.** CIDEr-D of every caption against the image's training references
   (:class:`CiderReward`): pycocoevalcap's ``CiderScorer`` (CIDEr-D: clipped tf-idf n-gram
   cosine, n = 1..4, Gaussian length penalty σ = 6, ×10) with the document frequencies of
   the whole training reference set, not of the batch: built once, cached in a file, reused
   while the references stay the same. Texts are compared as words: a caption and its
   references pass through the run's tokenizer alike (lower case, punctuation split off),
   pycocoevalcap's PTB punctuation is dropped, and `` <eos>`` is appended (Oscar's
   ``_wrap_sentence``, so that ending a caption well counts).
4. **Loss.** Advantage a = reward − baseline; the log-probability of every sampled token is
   recomputed *with* gradient in one teacher-forced forward (:func:`scoring_inputs`):
   the sampled caption, then one [MASK] query per token at that token's position, each query
   seeing the caption tokens before it, tags and regions, exactly as decoding saw them at that
   step, so the logits equal the sampling-time ones up to dropout (``tests/test_scst.py``
   checks this in eval mode). Loss = −mean over captions of a × (mean log-probability of its
   tokens) (:class:`~vlkd.train.losses.SCSTLoss`, the ``task`` term).

Distillation during SCST (``distill --scst``): the KD terms are computed on that same scoring
forward. The frozen teacher reads the same sequence (the student's sampled captions, the
queries, tags and boxes; its own region features), so attention-map MSE and hidden-state
InfoNCE keep the student's representations close to the teacher's on the captions the
student now writes, and ``logit_kd`` (off by default) would match next-token distributions on
them. Their weights are the run's ``losses``; the reward term replaces the masked-token CE.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .decode import caption_step_logprobs, generate_captions
from .model import box_geometry
from .trainer import TrainModule

log = logging.getLogger(__name__)

__all__ = ["CiderReward", "reward_text", "caption_words", "reference_texts", "sample_captions",
           "scoring_inputs", "SCSTModule", "BASELINES", "references_digest"]

#: ``scst.baseline`` values.
BASELINES = ("greedy", "sample")

_CACHE_FORMAT = "vlkd-cider-df/1"


def _punctuation() -> frozenset[str]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    return frozenset(PUNCTUATIONS)


def reward_text(words: str, punctuation: frozenset[str] | None = None) -> str:
    """A caption as CIDEr-D compares it: its words without PTB punctuation, then ``<eos>``
    (Oscar's ``_wrap_sentence``: strip, drop a final period, append ``' <eos>'``)."""
    punct = _punctuation() if punctuation is None else punctuation
    return " ".join([w for w in words.split() if w not in punct] + ["<eos>"])


def caption_words(tokenizer, ids: Sequence[int]) -> str:
    """A caption's token ids as space-separated words and punctuation: WordPiece pieces joined
    (``##`` continuations onto the piece before), special tokens dropped. (The tokenizer's own
    decoding would glue punctuation to the word before it.)"""
    special = set(tokenizer.all_special_ids)
    words: list[str] = []
    for tok in tokenizer.convert_ids_to_tokens([int(i) for i in ids if int(i) not in special]):
        if tok.startswith("##") and words:
            words[-1] += tok[2:]
        else:
            words.append(tok)
    return " ".join(words)


def reference_texts(tokenizer, references: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Reference captions as the reward compares them: through the tokenizer and back (as a
    sampled caption comes out of it: lower case, punctuation split off, unknown words gone),
    then :func:`reward_text`."""
    keys = sorted(references)
    flat = [t for k in keys for t in references[k]]
    ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    punct = _punctuation()
    out, i = {}, 0
    for k in keys:
        n = len(references[k])
        out[k] = [reward_text(caption_words(tokenizer, x), punct) for x in ids[i:i + n]]
        i += n
    return out


class _Frequencies(dict):
    """Document frequencies: an n-gram never seen in the references has 0 (without being
    added, so scoring does not grow the table)."""

    def __missing__(self, key):
        return 0.0


class _CorpusSized(list):
    """The references of the captions being scored, reporting the size of the whole
    reference set: ``CiderScorer.compute_cider`` takes ``log(len(crefs))`` as log N, the
    number of documents the frequencies were counted over (it iterates the real entries)."""

    def __init__(self, items, size: int):
        super().__init__(items)
        self._size = int(size)

    def __len__(self) -> int:
        return self._size


class CiderReward:
    """CIDEr-D of captions against their references, with the document frequencies of a fixed
    reference set (pycocoevalcap's ``CiderScorer``).

    Args:
        frequencies: n-gram (tuple of words) → number of images whose references contain it.
        num_documents: Images the frequencies were counted over.
        n, sigma: CIDEr-D's n-gram order and length-penalty σ (pycocoevalcap's 4, 6).
    """

    def __init__(self, frequencies: Mapping[tuple, float], num_documents: int, n: int = 4,
                 sigma: float = 6.0):
        self.frequencies = _Frequencies(frequencies)
        self.num_documents, self.n, self.sigma = int(num_documents), int(n), float(sigma)

    @classmethod
    def from_references(cls, references: Iterable[Sequence[str]], n: int = 4,
                        sigma: float = 6.0) -> "CiderReward":
        """Frequencies counted over reference sets (one per image), as ``CiderScorer`` counts
        them for a corpus (``compute_doc_freq``)."""
        from pycocoevalcap.cider.cider_scorer import CiderScorer

        scorer = CiderScorer(n=n, sigma=sigma)
        for refs in references:
            scorer.cook_append(None, list(refs))
        scorer.compute_doc_freq()
        return cls(dict(scorer.document_frequency), len(scorer.crefs), n, sigma)

    def scores(self, captions: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
        """(len(captions),) CIDEr-D of caption i against ``references[i]``."""
        from pycocoevalcap.cider.cider_scorer import CiderScorer

        if len(captions) != len(references):
            raise ValueError(f"{len(captions)} captions and {len(references)} reference sets")
        if not captions:
            return np.zeros(0)
        scorer = CiderScorer(n=self.n, sigma=self.sigma)
        for cap, refs in zip(captions, references):
            scorer.cook_append(cap, list(refs))
        scorer.document_frequency = self.frequencies
        scorer.crefs = _CorpusSized(scorer.crefs, self.num_documents)
        return np.asarray(scorer.compute_cider(), dtype=np.float64)

    # ---- the cache
    def save(self, path: str | os.PathLike, digest: str) -> Path:
        """Writes the frequencies (gzipped JSON, atomically) with the references' digest."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"format": _CACHE_FORMAT, "references_digest": digest, "n": self.n,
                "sigma": self.sigma, "num_documents": self.num_documents,
                "frequencies": sorted([" ".join(k), v] for k, v in self.frequencies.items())}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
                f.write(json.dumps(data).encode())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> tuple["CiderReward", str]:
        """(reward, references digest) of a cache file written by :meth:`save`."""
        with gzip.open(path, "rb") as f:
            data = json.loads(f.read())
        if data.get("format") != _CACHE_FORMAT:
            raise ValueError(f"{path} is not a vlkd CIDEr-D frequency cache ({_CACHE_FORMAT})")
        freq = {tuple(k.split(" ")): float(v) for k, v in data["frequencies"]}
        return cls(freq, data["num_documents"], data["n"], data["sigma"]), data["references_digest"]

    @classmethod
    def cached(cls, path: str | os.PathLike, references: Mapping[str, Sequence[str]], *,
               write: bool = True) -> "CiderReward":
        """The frequencies of ``references`` ({image id: texts as :func:`reward_text` makes
        them}) from the cache file when it holds these references' (same digest), else
        counted and, with ``write``, saved there (rank 0 writes; the others read after)."""
        digest = references_digest(references)
        path = Path(path)
        if path.is_file():
            reward, have = cls.load(path)
            if have == digest:
                log.info("CIDEr-D document frequencies from %s (%d images)", path,
                         reward.num_documents)
                return reward
            log.warning("%s holds the frequencies of other references (digest %s, these are "
                        "%s); counting them again", path, have[:12], digest[:12])
        reward = cls.from_references(references[k] for k in sorted(references))
        if write:
            reward.save(path, digest)
            log.info("CIDEr-D document frequencies of %d images written to %s",
                     reward.num_documents, path)
        return reward


def references_digest(references: Mapping[str, Sequence[str]]) -> str:
    """sha256 of the reference texts by image (sorted): what a frequency cache was made from."""
    h = hashlib.sha256()
    for k in sorted(references):
        h.update(json.dumps([k, list(references[k])]).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Sampling and the scoring forward
# --------------------------------------------------------------------------------------------

_CONTEXT_KEYS = ("input_ids", "token_type_ids", "position_ids", "text_mask", "caption_part",
                 "region_features", "region_boxes", "region_mask", "image_hw",
                 "teacher_region_features")


def expand(batch: Mapping[str, Any], n: int) -> dict[str, Any]:
    """Every image row of an evaluation-style batch repeated n times (rows i·n .. i·n+n-1)."""
    return {k: batch[k].repeat_interleave(n, dim=0) for k in _CONTEXT_KEYS
            if isinstance(batch.get(k), torch.Tensor)}


@torch.no_grad()
def sample_captions(model, context: Mapping[str, Any], *, cls_id: int, sep_id: int,
                    mask_id: int, max_len: int) -> list[list[int]]:
    """One caption per row of ``context`` sampled from the model's next-token softmax (the
    global torch generator: a resumed run draws the same). Tokens end with [SEP] when the model
    wrote it within ``max_len`` tokens."""
    rows = context["input_ids"].shape[0]
    dev = context["input_ids"].device
    prefix = torch.full((rows, 1), cls_id, dtype=torch.long, device=dev)
    out: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    for _ in range(max_len):
        probs = caption_step_logprobs(model, context, prefix, mask_id).exp()
        nxt = torch.multinomial(probs, 1).squeeze(1)
        for i, tok in enumerate(nxt.tolist()):
            if not done[i]:
                out[i].append(tok)
                done[i] = tok == sep_id
        if all(done):
            break
        prefix = torch.cat([prefix, nxt[:, None]], 1)
    return out


def scoring_inputs(context: Mapping[str, Any], captions: Sequence[Sequence[int]], *,
                   cls_id: int, mask_id: int, pad_id: int, geometry_dim: int,
                   teacher: bool = False, teacher_geometry_dim: int | None = None
                   ) -> dict[str, Any]:
    """One forward's inputs that give the log-probability of every token of every caption.

    Row r, caption w_1..w_m: text ``[CLS] w_1 .. w_{m-1}`` at positions 0..m-1, then m [MASK]
    queries at positions 1..m, then the row's tags. Caption token i sees caption tokens <= i,
    tags and regions; query j (predicting w_j) sees caption tokens < j, itself, tags and
    regions; tags and regions see tags and regions. That is each decoding step's view, so the
    masked-token head at query j gives the logits decoding had for w_j.

    Args:
        context: Evaluation-style rows (text = [CLS] + tags), one per caption, on the device.
        captions: Token ids per row (each non-empty).
        cls_id, mask_id, pad_id: Special token ids.
        geometry_dim: The model's ``config.geometry_dim``.
        teacher: Use the rows' ``teacher_region_features`` (same boxes).
        teacher_geometry_dim: The teacher's geometry width (default ``geometry_dim``).

    Returns:
        Model inputs with ``masked_positions`` at the queries, ``attention_mask`` (N, L, L),
        ``scst_targets`` (the tokens, row-major) and ``scst_seq`` (their rows).
    """
    dev = context["input_ids"].device
    rows = len(captions)
    lens = [len(c) for c in captions]
    if rows != context["input_ids"].shape[0] or min(lens, default=0) < 1:
        raise ValueError("scoring_inputs: one non-empty caption per context row")
    width = max(lens)
    tags = context["input_ids"][:, 1:]
    tag_mask = context["text_mask"][:, 1:].bool()
    ntag = tags.shape[1]
    text_len = 2 * width + ntag
    ids = torch.full((rows, text_len), pad_id, dtype=torch.long, device=dev)
    pos = torch.zeros((rows, text_len), dtype=torch.long, device=dev)
    types = torch.zeros((rows, text_len), dtype=torch.long, device=dev)
    real = torch.zeros((rows, text_len), dtype=torch.bool, device=dev)
    for r, cap in enumerate(captions):
        m = len(cap)
        ids[r, :m] = torch.tensor([cls_id, *cap[:-1]], device=dev)
        ids[r, width:width + m] = mask_id
        pos[r, :m] = torch.arange(m, device=dev)
        pos[r, width:width + m] = torch.arange(1, m + 1, device=dev)
        real[r, :m] = True
        real[r, width:width + m] = True
    ids[:, 2 * width:] = tags
    pos[:, 2 * width:] = context["position_ids"][:, 1:]
    types[:, 2 * width:] = context["token_type_ids"][:, 1:]
    real[:, 2 * width:] = tag_mask
    region_mask = context["region_mask"].bool()
    length = text_len + region_mask.shape[1]
    col = torch.arange(width, device=dev)
    ctx_keys = torch.cat([torch.zeros((rows, 2 * width), dtype=torch.bool, device=dev),
                          tag_mask, region_mask], 1)                       # (N, L)
    mask = torch.zeros((rows, length, length), dtype=torch.bool, device=dev)
    cap_real = real[:, :width]
    qry_real = real[:, width:2 * width]
    causal = col[None, :] <= col[:, None]                    # (W, W): key column <= row index
    # caption rows: caption keys <= i, context keys
    mask[:, :width, :width] = causal[None] & cap_real[:, None, :] & cap_real[:, :, None]
    mask[:, :width, :] |= ctx_keys[:, None, :] & cap_real[:, :, None]
    # query j (predicting w_{j+1}, position j+1): caption keys 0..j ([CLS] w_1..w_j), itself,
    # context keys
    mask[:, width:2 * width, :width] = causal[None] & cap_real[:, None, :] & qry_real[:, :, None]
    eye = torch.eye(width, dtype=torch.bool, device=dev)
    mask[:, width:2 * width, width:2 * width] = eye[None] & qry_real[:, :, None]
    mask[:, width:2 * width, :] |= ctx_keys[:, None, :] & qry_real[:, :, None]
    # tags and regions: context keys
    ctx_rows = ctx_keys[:, 2 * width:]
    mask[:, 2 * width:, :] = ctx_rows[:, :, None] & ctx_keys[:, None, :]
    where = torch.zeros((rows, text_len), dtype=torch.bool, device=dev)
    where[:, width:2 * width] = qry_real
    targets = torch.tensor([t for cap in captions for t in cap], dtype=torch.long, device=dev)
    seq = torch.tensor([r for r, cap in enumerate(captions) for _ in cap], dtype=torch.long,
                       device=dev)
    feats = context["teacher_region_features"] if teacher else context["region_features"]
    gdim = (teacher_geometry_dim if teacher and teacher_geometry_dim is not None
            else geometry_dim)
    out = {"input_ids": ids, "token_type_ids": types, "position_ids": pos, "text_mask": real,
           "region_features": feats, "region_boxes": context["region_boxes"],
           "region_mask": region_mask, "image_hw": context["image_hw"],
           "attention_mask": mask, "masked_positions": where, "scst_targets": targets,
           "scst_seq": seq}
    if gdim:
        out["region_geometry"] = box_geometry(context["region_boxes"], context["image_hw"], gdim)
    return out


# --------------------------------------------------------------------------------------------
# The module the trainer runs
# --------------------------------------------------------------------------------------------

class SCSTModule(TrainModule):
    """One SCST step as the trainer's module (see the module docstring): takes an
    evaluation-style batch of training images, returns ``(total loss, {term: value})`` with
    the rewards beside the loss terms (``extra_metrics``: logged, not optimised).

    Args:
        model: The captioning model.
        combiner: Its loss terms (``task`` = ``scst``, plus the KD terms for distillation).
        references: {image id: reference texts as :func:`reward_text` makes them}.
        reward: The :class:`CiderReward` of those references.
        tokenizer: The run's tokenizer (decodes the captions).
        samples, baseline, max_len: ``scst.*``.
        max_text_len: ``data.max_text_len`` (tags sit after it).
        teacher: The frozen teacher (``distill --scst``), kept outside the module's
            parameters: it reads the scoring forward's sequence.
        teacher_task: The teacher forward's task (``caption`` when a logit term needs its
            logits, else ``none``).
    """

    def __init__(self, model, combiner, *, references: Mapping[str, Sequence[str]],
                 reward: CiderReward, tokenizer, samples: int = 5, baseline: str = "greedy",
                 max_len: int = 20, max_text_len: int = 40, teacher=None,
                 teacher_task: str = "none"):
        super().__init__(model, combiner, "caption", seq2seq=True)
        if baseline not in BASELINES:
            raise ValueError(f"scst.baseline must be one of {BASELINES}, got {baseline!r}")
        if samples < 1 or (baseline == "sample" and samples < 2):
            raise ValueError(f"scst.samples must be >= 1 (>= 2 with baseline 'sample'), got "
                             f"{samples}")
        if max_len + 2 > max_text_len:
            raise ValueError(f"scst.max_len {max_len} needs data.max_text_len >= {max_len + 2}")
        self.references, self.reward = references, reward
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        self.cls_id, self.sep_id = vocab["[CLS]"], vocab["[SEP]"]
        self.mask_id, self.pad_id = vocab["[MASK]"], vocab["[PAD]"]
        self.samples, self.baseline = int(samples), baseline
        self.max_len, self.max_text_len = int(max_len), int(max_text_len)
        self._punct = _punctuation()
        # not a submodule: frozen, outside DDP, the optimizer and the checkpoint
        object.__setattr__(self, "teacher", teacher)
        self.teacher_task = teacher_task
        self.extra_metrics = ("scst/sample_cider",) + (
            ("scst/greedy_cider",) if baseline == "greedy" else ())

    def _text(self, tokens: Sequence[int]) -> str:
        return reward_text(caption_words(self.tokenizer, tokens), self._punct)

    def forward(self, batch: Mapping[str, Any], teacher_out=None):
        model, n = self.model, self.samples
        images = list(batch["image_ids"])
        try:
            refs = [self.references[i] for i in images]
        except KeyError as e:
            raise KeyError(f"scst: image {e.args[0]!r} has no training references") from None
        ids = dict(cls_id=self.cls_id, sep_id=self.sep_id, mask_id=self.mask_id)
        greedy_texts: list[str] = []
        if self.baseline == "greedy":
            was = model.training
            model.eval()
            greedy = generate_captions(model, batch, **ids, max_len=self.max_len, beam_size=1,
                                       max_text_len=self.max_text_len)
            model.train(was)
            greedy_texts = [self._text(g) for g in greedy]
        context = expand(batch, n)
        sampled = sample_captions(model, context, **ids, max_len=self.max_len)
        texts = [self._text(s) for s in sampled]
        scores = self.reward.scores(texts + greedy_texts,
                                    [r for r in refs for _ in range(n)]
                                    + (refs if greedy_texts else []))
        sample_r = scores[:len(texts)].reshape(len(images), n)
        if self.baseline == "greedy":
            base = scores[len(texts):][:, None]
        else:
            base = (sample_r.sum(1, keepdims=True) - sample_r) / (n - 1)
        advantage = torch.as_tensor((sample_r - base).reshape(-1), dtype=torch.float32,
                                    device=context["input_ids"].device)
        geometry = self.model.config.geometry_dim
        inputs = scoring_inputs(context, sampled, cls_id=self.cls_id, mask_id=self.mask_id,
                                pad_id=self.pad_id, geometry_dim=geometry)
        inputs["scst_advantage"] = advantage
        flags = self.combiner.output_flags()
        out = model(inputs, task="caption", **flags)
        t_out = None
        if self.teacher is not None and self.combiner.needs_teacher:
            t_in = scoring_inputs(context, sampled, cls_id=self.cls_id, mask_id=self.mask_id,
                                  pad_id=self.pad_id, geometry_dim=geometry, teacher=True,
                                  teacher_geometry_dim=self.teacher.config.geometry_dim)
            with torch.no_grad():
                t_out = self.teacher(t_in, task=self.teacher_task, **flags)
        total, terms = self.combiner(out, t_out, inputs)
        terms = dict(terms)
        terms["scst/sample_cider"] = torch.tensor(float(sample_r.mean()))
        if self.baseline == "greedy":
            terms["scst/greedy_cider"] = torch.tensor(float(base.mean()))
        return total, terms
