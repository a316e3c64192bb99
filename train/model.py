"""OSCAR-style vision-language transformer built on transformers' ``BertModel``.

Sequence layout (Oscar / VinVL)::

    [CLS] text [SEP] tags [SEP] | region_1 ... region_R
    <---- T word tokens ------>   <-- R region tokens -->
    segment 0 ....... | 1 ...     (regions take no segment / position embedding)

Word tokens go through BERT's embeddings (word + position + segment, LayerNorm, dropout). A
region token is ``Linear(feature ‖ box geometry) → LayerNorm → dropout`` (Oscar's
``img_embedding`` and ``LayerNorm``). The joint sequence of length ``L = T + R`` runs through
BERT's layers with an eager attention that also hands back the attention probabilities
(before dropout) and, on request, the pre-softmax scores, which is what distillation needs.

Heads: a masked-token head tied to the word embeddings (MLM, captioning), a VQA classifier on
the pooled [CLS] and an image-text matching classifier on the pooled [CLS].

A trainer drives it with a batch dict::

    out = model(batch, task="caption")       # out.mlm_logits, out.hidden_states, out.attentions

Batch keys (all tensors; extra keys are ignored):

=================== ============ ===============================================================
``input_ids``       (B, T) long  text + tag token ids
``token_type_ids``  (B, T) long  0 for text, 1 for tags (default: zeros)
``position_ids``    (B, T) long  optional (default: 0..T-1)
``region_features`` (B, R, D)    any float dtype (fp16 from disk is fine: cast on the device)
``region_geometry`` (B, R, G)    from :func:`box_geometry`; G = ``config.geometry_dim``
``attention_mask``  (B, L) or    1 = attend. 2-D: padding mask over text then regions
                    (B, L, L)    (:func:`padding_mask`); 3-D: per-query mask, e.g.
                                 :func:`caption_attention_mask`. Default: all ones.
``masked_positions`` (B, T) bool where the masked-token head predicts (default: where
                                 ``mlm_labels != -100``, else every text position)
``mlm_labels``      (B, T) long  target ids, -100 where nothing is predicted (used by the losses)
=================== ============ ===============================================================
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, BertConfig, BertModel
from transformers.activations import ACT2FN

__all__ = [
    "VLConfig",
    "VLModel",
    "VLOutput",
    "box_geometry",
    "padding_mask",
    "caption_attention_mask",
    "prediction_positions",
    "IGNORE_INDEX",
    "VQA_HEADS",
    "ITM_MATCHED",
    "ITM_OTHER_TAGS",
    "ITM_OTHER_CAPTION",
    "HEAD_TASKS",
    "task_heads",
]

#: Label value meaning "no prediction here" (as torch's cross-entropy default).
IGNORE_INDEX = -100

#: ``VLConfig.vqa_head`` values (see :class:`VQAHead`).
VQA_HEADS = ("mlp", "linear", "oscar_mlp")

#: Image-text matching labels of a matched pair, of tags from another image, and (3 classes,
#: Oscar+) of a caption from another image (Oscar's ``BertImgForPreTraining`` labels,
#: microsoft/Oscar ``oscar/datasets/oscar_tsv.py`` ``random_sent``: 0 = matched, 1 = text b
#: replaced, ``num_contrast_classes - 1`` = text a replaced).
ITM_MATCHED, ITM_OTHER_TAGS, ITM_OTHER_CAPTION = 0, 1, 2

#: ``task`` values of the forward that run one head (or none) by its name. A registered task
#: (:data:`vlkd.train.tasks.TASKS`: ``caption``, ``vqa``, ``pretrain``) names its own heads.
HEAD_TASKS: dict[str, tuple[str, ...]] = {
    "none": (),
    "mlm": ("mlm",),
    "vqa": ("vqa",),
    "itm": ("itm",),
}

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_ATTN_IMPL = "vlkd_eager"


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

_PRESETS: dict[str, dict[str, Any]] = {
    # BERT-base with VinVL's 2048-d detector features (Oscar/VinVL checkpoints fit it).
    "teacher": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                    region_dim=2048),
    # MiniLM-L12-H384-like student; region_dim is the student detector's feature size.
    "student": dict(hidden_size=384, num_layers=12, num_heads=12, intermediate_size=1536,
                    region_dim=2048),
    # Tests and the demo: seconds on a CPU.
    "tiny": dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                 region_dim=64, num_answers=32),
    # A tiny teacher for the tiny student: twice the layers and width, same head count, so the
    # uniform layer map (k = 2) and the attention loss work without options.
    "tiny-teacher": dict(hidden_size=64, num_layers=4, num_heads=2, intermediate_size=128,
                         region_dim=64, num_answers=32),
}


@dataclass
class VLConfig:
    """Architecture of a :class:`VLModel`.

    Build one from a preset (``VLConfig.preset("student", region_dim=1024)``), from a dict
    or YAML mapping (:meth:`from_dict`, which also understands a ``preset:`` key) or directly.
    The text part has BERT's field meanings; the rest:

    Attributes:
        region_dim: Size D of a region feature (the detector's pooled feature).
        geometry_dim: Size G of the box geometry appended to each feature: 0 (none), 4
            (x1, y1, x2, y2 normalised by the image size), 6 (+ width, height: VinVL's 2054 =
            2048 + 6), or 7 (+ normalised area). See :func:`box_geometry`.
        region_layer_norm: LayerNorm after the region projection (Oscar's
            ``use_img_layernorm``).
        num_answers: VQA answer vocabulary size (VQA v2: 3129).
        vqa_head: The VQA classifier on the pooled [CLS] (:data:`VQA_HEADS`): ``mlp``
            (Linear(H, sH) → GELU → LayerNorm → Linear(sH, A), no dropout: LXMERT's answer
            head; the default, which every model carries and initialises from the seeded RNG,
            so changing it would move every run), ``linear`` (dropout → Linear: Oscar's
            ``--classifier linear``, its VQA recipe, what configs/train/*.yaml use) or
            ``oscar_mlp`` (dropout → Linear(H, sH) → ReLU → Linear(sH, A): Oscar's
            ``--classifier mlp``). The dropout is ``hidden_dropout``, as Oscar's (its VQA
            recipe sets both with ``--drop_out 0.3``).
        vqa_hidden_scale: s of the two MLP heads (Oscar's ``cls_hidden_scale``, default 2).
        num_itm_classes: Image-text matching classes (Oscar: ``num_contrast_classes``, 2 or 3).
            Labels are Oscar's: 0 = the text and tags belong to the image, 1 = the tags (text
            b) come from another image, 2 (3 classes) = the caption (text a) does.
        heads: Which heads to build; leaving out unused ones keeps DDP free of unused
            parameters.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    region_dim: int = 2048
    geometry_dim: int = 6
    region_layer_norm: bool = True
    region_layer_norm_eps: float = 1e-12
    num_answers: int = 3129
    vqa_head: str = "mlp"
    vqa_hidden_scale: int = 2
    num_itm_classes: int = 2
    heads: tuple[str, ...] = ("mlm", "vqa", "itm")

    def __post_init__(self) -> None:
        self.heads = tuple(self.heads)
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"VLConfig: hidden_size {self.hidden_size} is not a multiple of num_heads "
                f"{self.num_heads}; pick a head count that divides it")
        if self.geometry_dim not in (0, 4, 6, 7):
            raise ValueError(f"VLConfig: geometry_dim must be 0, 4, 6 or 7, got {self.geometry_dim}")
        if self.vqa_head not in VQA_HEADS:
            raise ValueError(f"VLConfig: vqa_head must be one of {list(VQA_HEADS)}, got "
                             f"{self.vqa_head!r}")
        if self.vqa_hidden_scale < 1:
            raise ValueError(f"VLConfig: vqa_hidden_scale must be >= 1, got {self.vqa_hidden_scale}")
        unknown = set(self.heads) - {"mlm", "vqa", "itm"}
        if unknown:
            raise ValueError(f"VLConfig: unknown heads {sorted(unknown)}; choose from mlm, vqa, itm")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "VLConfig":
        """Returns a preset (``teacher``, ``student``, ``tiny``, ``tiny-teacher``) with overrides."""
        if name not in _PRESETS:
            raise KeyError(f"VLConfig: unknown preset {name!r}; choose from {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VLConfig":
        """Builds a config from a mapping; a ``preset`` key starts from that preset."""
        d = dict(d)
        name = d.pop("preset", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise KeyError(f"VLConfig: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls.preset(name, **d) if name else cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["heads"] = list(self.heads)
        return d

    @property
    def region_input_dim(self) -> int:
        """Width of the region projection's input: feature ‖ geometry."""
        return self.region_dim + self.geometry_dim

    def bert_config(self) -> BertConfig:
        """The ``BertConfig`` of the text transformer, with vlkd's eager attention."""
        return BertConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            intermediate_size=self.intermediate_size, hidden_act=self.hidden_act,
            hidden_dropout_prob=self.hidden_dropout,
            attention_probs_dropout_prob=self.attention_dropout,
            max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=self.type_vocab_size, layer_norm_eps=self.layer_norm_eps,
            initializer_range=self.initializer_range, pad_token_id=self.pad_token_id,
            attn_implementation=_ATTN_IMPL,
        )


# --------------------------------------------------------------------------------------------
# Input helpers
# --------------------------------------------------------------------------------------------

def box_geometry(boxes: torch.Tensor, image_hw: torch.Tensor, dim: int = 6) -> torch.Tensor:
    """Normalised box geometry appended to each region feature.

    Columns: ``x1/W, y1/H, x2/W, y2/H`` (dim 4), then ``(x2-x1)/W, (y2-y1)/H`` (dim 6, VinVL's
    convention: 2048-d feature + 6 = 2054), then the normalised area
    ``(x2-x1)(y2-y1)/(W·H)`` (dim 7). Boxes are not clipped.

    Args:
        boxes: (..., R, 4) x1, y1, x2, y2 in original-image pixels.
        image_hw: (..., 2) image height and width, one row per image (broadcast over R).
        dim: 4, 6 or 7.

    Returns:
        (..., R, dim) float32 geometry.
    """
    if dim not in (4, 6, 7):
        raise ValueError(f"box_geometry: dim must be 4, 6 or 7, got {dim}")
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    hw = torch.as_tensor(image_hw, dtype=torch.float32)
    if boxes.shape[-1] != 4:
        raise ValueError(f"box_geometry: boxes must end in 4 (x1, y1, x2, y2), got {tuple(boxes.shape)}")
    if hw.dim() == boxes.dim() - 1:
        hw = hw.unsqueeze(-2)  # one (H, W) per image, broadcast over its R boxes
    h, w = hw[..., 0:1], hw[..., 1:2]
    x1, y1, x2, y2 = boxes.unbind(-1)
    x1, y1, x2, y2 = (t.unsqueeze(-1) for t in (x1, y1, x2, y2))
    cols = [x1 / w, y1 / h, x2 / w, y2 / h]
    if dim >= 6:
        cols += [(x2 - x1) / w, (y2 - y1) / h]
    if dim == 7:
        cols.append((x2 - x1) * (y2 - y1) / (w * h))
    return torch.cat(cols, dim=-1)


def padding_mask(text_mask: torch.Tensor, region_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The 2-D attention mask of the joint sequence: text padding then region padding.

    Args:
        text_mask: (B, T) 1 for real text/tag tokens.
        region_mask: (B, R) 1 for real regions, or None for a text-only batch.

    Returns:
        (B, T + R) bool.
    """
    parts = [text_mask.bool()] + ([region_mask.bool()] if region_mask is not None else [])
    return torch.cat(parts, dim=1)


def caption_attention_mask(caption_mask: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
    """Oscar's seq2seq captioning mask.

    Caption tokens see earlier-or-same caption tokens (causal, in sequence order) and every
    context token; context tokens (tags and regions) see context only, never the caption.
    Padding rows and columns are all False.

    Args:
        caption_mask: (B, L) True at caption positions ([CLS] caption [SEP]).
        context_mask: (B, L) True at real tag and region positions.

    Returns:
        (B, L, L) bool, ``[b, i, j]`` True when query i may attend to key j.
    """
    cap = caption_mask.bool()
    ctx = context_mask.bool()
    if (cap & ctx).any():
        raise ValueError("caption_attention_mask: a position is marked both caption and context")
    length = cap.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=cap.device).tril()
    cap_q, cap_k = cap.unsqueeze(2), cap.unsqueeze(1)
    ctx_q, ctx_k = ctx.unsqueeze(2), ctx.unsqueeze(1)
    return (cap_q & cap_k & causal) | (cap_q & ctx_k) | (ctx_q & ctx_k)


def prediction_positions(batch: Mapping[str, Any]) -> torch.Tensor | None:
    """Where the masked-token head predicts: ``masked_positions``, else ``mlm_labels != -100``.

    Returns:
        (B, T) bool, or None to predict at every text position.
    """
    if batch.get("masked_positions") is not None:
        return batch["masked_positions"].bool()
    if batch.get("mlm_labels") is not None:
        return batch["mlm_labels"] != IGNORE_INDEX
    return None


def task_heads(task: str) -> tuple[str, ...]:
    """The heads the forward runs for ``task``: a registered task's ``heads``, else
    :data:`HEAD_TASKS`."""
    from .tasks import TASKS  # the tasks import this module: looked up at call time

    if task in TASKS:
        return TASKS.get(task).heads
    if task in HEAD_TASKS:
        return HEAD_TASKS[task]
    raise ValueError(f"VLModel: unknown task {task!r}; choose from "
                     f"{sorted(set(HEAD_TASKS) | set(TASKS))}")


# --------------------------------------------------------------------------------------------
# Attention with maps
# --------------------------------------------------------------------------------------------

def _vl_eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, attention_mask: torch.Tensor | None,
                        scaling: float | None = None, dropout: float = 0.0, **kwargs: Any):
    """BERT's eager attention, returning probabilities *before* dropout (and scores on request).

    transformers' own eager attention returns the maps after attention dropout, which would
    make the distillation targets noisy in training mode.
    """
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, L, L)
    logits = scores + attention_mask if attention_mask is not None else scores
    probs = logits.softmax(dim=-1)
    dropped = F.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(dropped, value).transpose(1, 2).contiguous()  # (B, L, H, dh)
    if kwargs.get("vlkd_return_scores"):
        return out, (probs, scores)
    return out, probs


# Registered under its own name: transformers' documented way to plug in an attention function.
AttentionInterface.register(_ATTN_IMPL, _vl_eager_attention)


# --------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------

class MaskedTokenHead(nn.Module):
    """BERT's LM head (dense → act → LayerNorm → decoder) with the decoder tied to the word
    embeddings: only the transform and the output bias are parameters of their own."""

    def __init__(self, config: VLConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.act = ACT2FN[config.hidden_act]
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        # A plain attribute, not a submodule: the embedding is owned (and saved) by the encoder.
        self._word_embeddings = [word_embeddings]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) → (..., V) logits."""
        x = self.transform.LayerNorm(self.act(self.transform.dense(hidden)))
        return F.linear(x, self._word_embeddings[0].weight, self.bias)


class VQAHead(nn.Module):
    """VQA classifier on the pooled [CLS] (``config.vqa_head``; A answers, s =
    ``vqa_hidden_scale``):

    * ``linear``: dropout → Linear(H, A) (``fc``): Oscar's ``--classifier linear``
      (``ImageBertForSequenceClassification``: ``self.dropout`` then ``self.classifier``);
    * ``oscar_mlp``: dropout → Linear(H, sH) → ReLU → Linear(sH, A) (``classifier.0`` /
      ``classifier.2``, Oscar's names): Oscar's ``--classifier mlp``;
    * ``mlp``: Linear(H, sH) → GELU → LayerNorm → Linear(sH, A), no dropout (``fc1``,
      ``norm``, ``fc2``).
    """

    def __init__(self, config: VLConfig):
        super().__init__()
        self.kind = config.vqa_head
        h, wide = config.hidden_size, config.hidden_size * config.vqa_hidden_scale
        if self.kind == "mlp":
            self.fc1 = nn.Linear(h, wide)
            self.norm = nn.LayerNorm(wide, eps=config.layer_norm_eps)
            self.fc2 = nn.Linear(wide, config.num_answers)
        elif self.kind == "oscar_mlp":
            self.dropout = nn.Dropout(config.hidden_dropout)
            self.classifier = nn.Sequential(nn.Linear(h, wide), nn.ReLU(),
                                            nn.Linear(wide, config.num_answers))
        else:
            self.dropout = nn.Dropout(config.hidden_dropout)
            self.fc = nn.Linear(h, config.num_answers)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, H) → (B, A) logits."""
        if self.kind == "mlp":
            return self.fc2(self.norm(F.gelu(self.fc1(pooled))))
        if self.kind == "oscar_mlp":
            return self.classifier(self.dropout(pooled))
        return self.fc(self.dropout(pooled))


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

@dataclass
class VLOutput:
    """What one forward returns.

    Attributes:
        last_hidden_state: (B, L, H).
        pooled: (B, H) BERT pooler output (dense + tanh on [CLS]).
        token_mask: (B, L) bool, True at real tokens (rows of a 3-D mask with any key allowed).
        attention_mask: the mask used, bool, (B, L) or (B, L, L).
        num_text_tokens: T; region tokens are positions T..L-1.
        hidden_states: num_layers + 1 tensors (B, L, H): embeddings, then every layer.
        attentions: num_layers tensors (B, heads, L, L): attention probabilities (pre-dropout).
        attention_scores: num_layers tensors (B, heads, L, L): q·k/√d before mask and softmax,
            when ``output_scores=True``.
        mlm_logits: (N, V) at the prediction positions (row-major), or (B, T, V).
        vqa_logits: (B, A).
        itm_logits: (B, C).
    """

    last_hidden_state: torch.Tensor
    pooled: torch.Tensor
    token_mask: torch.Tensor
    attention_mask: torch.Tensor
    num_text_tokens: int
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    attention_scores: tuple[torch.Tensor, ...] | None = None
    mlm_logits: torch.Tensor | None = None
    vqa_logits: torch.Tensor | None = None
    itm_logits: torch.Tensor | None = None

    @property
    def logits(self) -> torch.Tensor | None:
        """The first head that ran: masked-token, then VQA, then ITM."""
        for t in (self.mlm_logits, self.vqa_logits, self.itm_logits):
            if t is not None:
                return t
        return None

    def pair_mask(self) -> torch.Tensor:
        """(B, L, L) bool: query i may attend to key j and both are real tokens."""
        m = self.attention_mask
        if m.dim() == 2:
            return m.unsqueeze(2) & m.unsqueeze(1)
        return m & self.token_mask.unsqueeze(2) & self.token_mask.unsqueeze(1)


class VLModel(nn.Module):
    """OSCAR-style VL transformer: BERT text embeddings, region tokens, BERT layers, heads.

    Args:
        config: The architecture.

    Submodules (their names are the checkpoint keys): ``bert`` (a transformers ``BertModel``:
    ``embeddings``, ``encoder``, ``pooler``), ``region_embedding``, ``region_layer_norm``,
    ``mlm_head``, ``vqa_head``, ``itm_head``.
    """

    def __init__(self, config: VLConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config.bert_config(), add_pooling_layer=True)
        self.region_embedding = nn.Linear(config.region_input_dim, config.hidden_size)
        self.region_layer_norm = (nn.LayerNorm(config.hidden_size, eps=config.region_layer_norm_eps)
                                  if config.region_layer_norm else nn.Identity())
        self.region_dropout = nn.Dropout(config.hidden_dropout)
        self.mlm_head = (MaskedTokenHead(config, self.bert.embeddings.word_embeddings)
                         if "mlm" in config.heads else None)
        self.vqa_head = VQAHead(config) if "vqa" in config.heads else None
        self.itm_head = (nn.Linear(config.hidden_size, config.num_itm_classes)
                         if "itm" in config.heads else None)
        for name, module in self.named_children():
            if name != "bert":  # BertModel initialised itself in post_init
                module.apply(self._init_module)

    def _init_module(self, module: nn.Module) -> None:
        # BERT's initialisation, for the modules that BertModel does not own.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ---------------------------------------------------------------------------------------
    def forward(self, batch: Mapping[str, Any] | None = None, *, task: str = "none",
                output_hidden_states: bool = True, output_attentions: bool = True,
                output_scores: bool = False, **inputs: Any) -> VLOutput:
        """Runs the model on a batch dict and/or keyword tensors (keywords win).

        Args:
            batch: Mapping with the keys in the module docstring; extra keys are ignored.
            task: A registered task (``caption``, ``vqa``, ``pretrain``: its heads) or a head
                name of :data:`HEAD_TASKS` (``none``, ``mlm``, ``vqa``, ``itm``); picks the
                heads that run (:func:`task_heads`).
            output_hidden_states: Return all hidden states (embeddings + every layer).
            output_attentions: Return every layer's attention probabilities.
            output_scores: Also return the pre-softmax scores (TinyBERT-style distillation).
            **inputs: Same keys as ``batch``.

        Returns:
            A :class:`VLOutput`.
        """
        b = {**(batch or {}), **inputs}
        heads = task_heads(task)
        for head in heads:
            if getattr(self, f"{head}_head") is None:
                raise ValueError(f"VLModel: task {task!r} needs the {head!r} head, but this "
                                 f"model was built with heads={list(self.config.heads)}")
        if b.get("input_ids") is None:
            raise KeyError("VLModel: the batch has no 'input_ids' (B, T)")
        input_ids = b["input_ids"]
        device = self.region_embedding.weight.device
        dtype = self.region_embedding.weight.dtype
        input_ids = input_ids.to(device)
        bsz, num_text = input_ids.shape

        def _opt(key: str) -> torch.Tensor | None:
            t = b.get(key)
            return None if t is None else t.to(device)

        emb = self.bert.embeddings(input_ids=input_ids, token_type_ids=_opt("token_type_ids"),
                                   position_ids=_opt("position_ids"))  # (B, T, H)
        regions = b.get("region_features")
        if regions is not None:
            emb = torch.cat([emb, self._embed_regions(regions, b.get("region_geometry"),
                                                      bsz, device, dtype)], dim=1)
        length = emb.shape[1]

        mask = b.get("attention_mask")
        mask = (torch.ones(bsz, length, dtype=torch.bool, device=device) if mask is None
                else mask.to(device).bool())
        additive, token_mask = self._additive_mask(mask, bsz, num_text, length, emb.dtype)

        hidden = emb
        all_hidden = [hidden] if output_hidden_states else None
        all_probs = [] if output_attentions else None
        all_scores = [] if output_scores else None
        for layer in self.bert.encoder.layer:
            # BertLayer.forward drops the attention maps; run its two halves to keep them.
            attn_out, maps = layer.attention(hidden, additive, vlkd_return_scores=output_scores)
            hidden = layer.feed_forward_chunk(attn_out)
            if output_scores:
                probs, scores = maps
                all_scores.append(scores)
            else:
                probs = maps
            if output_attentions:
                all_probs.append(probs)
            if output_hidden_states:
                all_hidden.append(hidden)

        pooled = self.bert.pooler(hidden)
        out = VLOutput(
            last_hidden_state=hidden, pooled=pooled, token_mask=token_mask, attention_mask=mask,
            num_text_tokens=num_text,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_probs) if output_attentions else None,
            attention_scores=tuple(all_scores) if output_scores else None,
        )
        if "mlm" in heads:
            text = hidden[:, :num_text]
            where = prediction_positions(b)
            out.mlm_logits = self.mlm_head(text if where is None else text[where.to(device)])
        if "vqa" in heads:
            out.vqa_logits = self.vqa_head(pooled)
        if "itm" in heads:
            out.itm_logits = self.itm_head(pooled)
        return out

    def _embed_regions(self, features: torch.Tensor, geometry: torch.Tensor | None, bsz: int,
                       device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        cfg = self.config
        if features.dim() != 3 or features.shape[0] != bsz or features.shape[2] != cfg.region_dim:
            raise ValueError(
                f"VLModel: region_features must be (B={bsz}, R, D={cfg.region_dim}), got "
                f"{tuple(features.shape)}; check the region set's feature dim against the "
                f"model config's region_dim")
        # Move in the stored dtype (fp16 halves the transfer), then cast on the device.
        parts = [features.to(device, non_blocking=True).to(dtype)]
        if cfg.geometry_dim:
            if geometry is None:
                raise KeyError(f"VLModel: config.geometry_dim={cfg.geometry_dim} but the batch "
                               f"has no 'region_geometry'; build it with box_geometry()")
            if tuple(geometry.shape) != (bsz, features.shape[1], cfg.geometry_dim):
                raise ValueError(
                    f"VLModel: region_geometry must be (B, R, G) = "
                    f"{(bsz, features.shape[1], cfg.geometry_dim)}, got {tuple(geometry.shape)}")
            parts.append(geometry.to(device, non_blocking=True).to(dtype))
        x = self.region_embedding(torch.cat(parts, dim=-1))
        return self.region_dropout(self.region_layer_norm(x))

    @staticmethod
    def _additive_mask(mask: torch.Tensor, bsz: int, num_text: int, length: int,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Bool mask → additive (B, 1, 1|L, L) mask and (B, L) token mask."""
        if mask.dim() == 2:
            if tuple(mask.shape) != (bsz, length):
                raise ValueError(
                    f"VLModel: attention_mask (B, L) must be {(bsz, length)} = text {num_text} + "
                    f"regions {length - num_text}, got {tuple(mask.shape)}; build it with "
                    f"padding_mask(text_mask, region_mask)")
            token_mask, keep = mask, mask[:, None, None, :]
        elif mask.dim() == 3:
            if tuple(mask.shape) != (bsz, length, length):
                raise ValueError(
                    f"VLModel: attention_mask (B, L, L) must be {(bsz, length, length)}, got "
                    f"{tuple(mask.shape)}")
            token_mask, keep = mask.any(dim=-1), mask[:, None]
        else:
            raise ValueError(f"VLModel: attention_mask must be 2-D or 3-D, got {mask.dim()}-D")
        additive = torch.zeros(keep.shape, dtype=dtype, device=mask.device)
        return additive.masked_fill(~keep, torch.finfo(dtype).min), token_mask

    # ---------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Writes ``config.json`` and ``model.safetensors`` into ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(
            json.dumps({"model_type": "vlkd-vl", **self.config.to_dict()}, indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu",
                        **config_overrides: Any) -> "VLModel":
        """Loads a model written by :meth:`save_pretrained` (safetensors only).

        Args:
            directory: Folder with ``config.json`` and ``model.safetensors``.
            map_location: Device for the weights.
            **config_overrides: Config fields to change that do not alter shapes
                (e.g. ``hidden_dropout=0.0``).
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise FileNotFoundError(
                    f"VLModel.from_pretrained: {p} not found; expected a folder written by "
                    f"save_pretrained (config.json + model.safetensors)")
        raw = json.loads(cfg_path.read_text())
        raw.pop("model_type", None)
        model = cls(VLConfig.from_dict({**raw, **config_overrides}))
        state = load_file(str(w_path), device=str(map_location))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"VLModel.from_pretrained: {w_path} does not fit its config: missing "
                f"{sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}")
        return model.to(map_location)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

