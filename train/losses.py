"""Task and distillation losses, a registry of them by name, and a weighted combiner.

Every loss is a small ``nn.Module`` with two entry points:

* ``forward(...)`` on plain tensors (what the tests pin), and
* ``compute(student, teacher, batch)`` on :class:`~vlkd.train.model.VLOutput` objects and the
  batch dict (what :class:`LossCombiner` calls).

A training recipe declares its terms in YAML, torchdistill style; each term has a ``type``
(a registry name), a ``weight`` and ``params`` for the constructor::

    losses:
      task:      {type: masked_token_ce, weight: 1.0, params: {label_smoothing: 0.1}}
      attention: {type: attention_mse,   weight: 1.0, params: {layer_map: uniform}}
      hidden:    {type: hidden_infonce,  weight: 1.0, params: {queue_size: 4096, temperature: 0.07}}
      logits:    {type: logit_kd,        weight: 0.0, params: {temperature: 2.0}}

    combiner = LossCombiner.from_config(cfg["losses"], student_cfg, teacher_cfg)
    s_out = student(batch, task="caption", **combiner.output_flags())
    with torch.no_grad():
        t_out = teacher(batch, task="caption", **combiner.output_flags())
    total, terms = combiner(s_out, t_out, batch)   # terms: {"task": ..., "attention": ...}

Some losses own parameters (the InfoNCE and MSE projections) and state (the InfoNCE queue of
negatives): give ``combiner.parameters()`` to the optimizer and save ``combiner.state_dict()``
in checkpoints.

Layer maps (``layer_map``) pair a student layer s with a teacher layer t, numbered from 1
(layer outputs / attention of layer s); for hidden states 0 is the embedding output.
``uniform``: (s, s·k) with k = L_T / L_S (must divide); ``last``: (L_S, L_T); or an explicit list
``[[s, t], ...]``.
"""
from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Registry

if TYPE_CHECKING:  # the model module pulls in transformers; the losses work on tensors alone
    from .model import VLConfig, VLOutput

#: Label meaning "no prediction here" (torch's cross-entropy default; model.IGNORE_INDEX).
IGNORE_INDEX = -100

__all__ = [
    "KDLoss",
    "LOSSES",
    "register_loss",
    "build_loss",
    "resolve_layer_map",
    "MaskedTokenLoss",
    "VQABCELoss",
    "ITMLoss",
    "SCSTLoss",
    "AttentionMSELoss",
    "HiddenInfoNCELoss",
    "HiddenMSELoss",
    "LogitKDLoss",
    "first_difference",
    "LossCombiner",
    "FROM_MODEL_CONFIGS",
    "LossParam",
    "loss_params",
    "describe_losses",
]

LayerMapSpec = str | Sequence[Sequence[int]]


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

#: Loss classes by registry name (the ``type`` of a ``losses:`` term).
LOSSES: Registry[type["KDLoss"]] = Registry("loss", """Loss classes by registry name.

Contract: a subclass of :class:`KDLoss`, added with ``@register_loss(name)``, whose
``from_config(params, student_config, teacher_config)`` builds it from a YAML ``params``
mapping (its constructor's keyword arguments) and whose ``compute(student, teacher, batch)``
returns a scalar tensor; ``needs_teacher`` and ``output_flags()`` say what it reads.
""")


def register_loss(name: str) -> Callable[[type["KDLoss"]], type["KDLoss"]]:
    """Class decorator adding a loss to :data:`LOSSES` under ``name``."""
    def deco(cls: type["KDLoss"]) -> type["KDLoss"]:
        LOSSES.register(name)(cls)
        cls.registry_name = name
        return cls
    return deco


def build_loss(type_name: str, params: Mapping[str, Any] | None = None,
               student_config: VLConfig | None = None,
               teacher_config: VLConfig | None = None) -> "KDLoss":
    """Builds a registered loss from its name and YAML params."""
    cls = LOSSES.get(type_name)
    params = dict(params or {})
    sig = inspect.signature(cls.__init__)
    if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        known = [n for n in sig.parameters if n != "self"]
        unknown = sorted(k for k in params if k not in known or k in FROM_MODEL_CONFIGS)
        if unknown:
            raise ValueError(f"loss {type_name!r}: unknown params {unknown}; it takes "
                             f"{sorted(k for k in known if k not in FROM_MODEL_CONFIGS)}")
    return cls.from_config(params, student_config, teacher_config)


#: Constructor arguments that ``from_config`` fills from the model configs (not YAML params).
FROM_MODEL_CONFIGS = frozenset({"student_dim", "teacher_dim", "num_student_layers",
                                "num_teacher_layers"})


@dataclass(frozen=True)
class LossParam:
    """One YAML param of a registered loss: its name, default and help (from ``Args:``)."""

    name: str
    default: Any
    help: str


def loss_params(type_name: str) -> list[LossParam]:
    """The YAML ``params`` a registered loss takes, read from its constructor and docstring:
    names and defaults from the signature, help from the class's ``Args:`` section."""
    from vlkd.common.config import field_help, plain_text

    cls = LOSSES.get(type_name)
    # The Args: section has the syntax of an Attributes: one, which field_help reads.
    doc = re.sub(r"^(\s*)Args:\s*$", r"\1Attributes:", cls.__doc__ or "", flags=re.M)
    helps = field_help(type("_LossDoc", (), {"__doc__": doc}))
    out = []
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or name in FROM_MODEL_CONFIGS or p.kind in (p.VAR_POSITIONAL,
                                                                     p.VAR_KEYWORD):
            continue
        default = None if p.default is inspect.Parameter.empty else p.default
        out.append(LossParam(name, default, plain_text(helps.get(name, ""))))
    return out


def describe_losses() -> list[dict[str, Any]]:
    """Every registered loss, in registration order: ``{"name", "summary", "needs_teacher",
    "params": [LossParam, ...]}`` (what ``vlkd-train losses`` and ``distill --help`` print)."""
    from vlkd.common.config import plain_text

    out = []
    for name in LOSSES.names():
        cls = LOSSES.get(name)
        first = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        summary = re.match(r"(.*?)(?:[.:](?:\s|$)|$)", first).group(1)  # the first sentence
        out.append({"name": name, "summary": plain_text(summary),
                    "needs_teacher": bool(cls.needs_teacher), "params": loss_params(name)})
    return out


class KDLoss(nn.Module):
    """Base of the registered losses."""

    registry_name: str = ""
    #: Whether ``compute`` reads the teacher's output.
    needs_teacher: bool = False

    @classmethod
    def from_config(cls, params: dict[str, Any], student_config: VLConfig | None,
                    teacher_config: VLConfig | None) -> "KDLoss":
        return cls(**params)

    def compute(self, student: VLOutput, teacher: VLOutput | None,
                batch: Mapping[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def output_flags(self) -> dict[str, bool]:
        """Model outputs this loss reads (ORed by :meth:`LossCombiner.output_flags`)."""
        return {}


def _batch_tensor(batch: Mapping[str, Any], key: str, loss: str, device: torch.device) -> torch.Tensor:
    if batch.get(key) is None:
        raise KeyError(f"{loss}: the batch has no {key!r}; the task's collator must provide it")
    return batch[key].to(device)


def _require_teacher(teacher: VLOutput | None, loss: str) -> VLOutput:
    if teacher is None:
        raise ValueError(f"{loss} needs the teacher's output; pass a teacher (vlkd-train "
                         f"distill) or drop this term from the loss config")
    return teacher


def resolve_layer_map(spec: LayerMapSpec, num_student: int, num_teacher: int,
                      include_embeddings: bool = False) -> list[tuple[int, int]]:
    """Turns a layer-map spec into (student layer, teacher layer) pairs, numbered from 1.

    Args:
        spec: ``"uniform"``, ``"last"`` or explicit ``[[s, t], ...]``.
        num_student: L_S.
        num_teacher: L_T.
        include_embeddings: Allow layer 0 (the embedding output; hidden states only) and, for
            ``uniform``, prepend the pair (0, 0).

    Returns:
        The pairs, in order.
    """
    low = 0 if include_embeddings else 1
    if isinstance(spec, str):
        if spec == "uniform":
            if num_teacher % num_student:
                raise ValueError(
                    f"layer_map 'uniform' needs L_T divisible by L_S, got teacher {num_teacher} "
                    f"and student {num_student} layers; give explicit pairs [[s, t], ...]")
            k = num_teacher // num_student
            pairs = [(s, s * k) for s in range(1, num_student + 1)]
            return ([(0, 0)] if include_embeddings else []) + pairs
        if spec == "last":
            return [(num_student, num_teacher)]
        raise ValueError(f"layer_map must be 'uniform', 'last' or [[s, t], ...], got {spec!r}")
    pairs = [(int(s), int(t)) for s, t in spec]
    if not pairs:
        raise ValueError("layer_map: the explicit pair list is empty")
    for s, t in pairs:
        if not (low <= s <= num_student and low <= t <= num_teacher):
            raise ValueError(
                f"layer_map pair {[s, t]} is out of range: student layers {low}..{num_student}, "
                f"teacher layers {low}..{num_teacher} (0 is the embedding output, hidden states "
                f"only, with include_embeddings: true)")
    return pairs


def _pair_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) token mask or (B, L, L) pair mask → (B, L, L) bool pair mask."""
    mask = mask.bool()
    return mask.unsqueeze(2) & mask.unsqueeze(1) if mask.dim() == 2 else mask


# --------------------------------------------------------------------------------------------
# Task losses
# --------------------------------------------------------------------------------------------

@register_loss("masked_token_ce")
class MaskedTokenLoss(KDLoss):
    r"""Masked-token cross-entropy with label smoothing, over predicted positions only.

    For every position n with a label (``!= -100``) and vocabulary size V, with the target
    distribution :math:`q_v = 1-\varepsilon` at the label and :math:`\varepsilon/(V-1)`
    elsewhere (Oscar's captioning smoothing):

    .. math:: \mathcal{L} = \frac{1}{N}\sum_n \sum_v -q_{n,v}\,\log \mathrm{softmax}(z_n)_v

    (Oscar writes it as the KL divergence, which differs by the constant entropy of q.)
    Used for masked LM over text and tags (pre-training) and for captioning.

    ``drop_worst_ratio`` r > 0 (VinVL's captioning recipe, Oscar ``BertCaptioningLoss``): once
    more than ``drop_worst_after`` training forwards have run, the mean is over the
    ``max(1, int(N (1 - r)))`` positions of the batch with the smallest loss, so the worst
    r of the masked tokens (likely label noise) give no gradient. The forward count is a
    buffer (``iteration``), checkpointed with the loss; evaluation forwards do not count.

    Example config::

        task: {type: masked_token_ce, weight: 1.0, params: {label_smoothing: 0.1}}
        task: {type: masked_token_ce, weight: 1.0,          # VinVL's captioning recipe
               params: {label_smoothing: 0.1, drop_worst_ratio: 0.2, drop_worst_after: 20000}}

    Args:
        label_smoothing: ε in [0, 1).
        drop_worst_ratio: r in [0, 1): fraction of the positions with the highest loss left
            out; 0: none.
        drop_worst_after: Training forwards before positions are dropped (Oscar's
            ``self.iter > drop_worst_after``).
    """

    def __init__(self, label_smoothing: float = 0.0, drop_worst_ratio: float = 0.0,
                 drop_worst_after: int = 0):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"masked_token_ce: label_smoothing must be in [0, 1), got {label_smoothing}")
        if not 0.0 <= drop_worst_ratio < 1.0 or drop_worst_after < 0:
            raise ValueError(f"masked_token_ce: drop_worst_ratio must be in [0, 1) and "
                             f"drop_worst_after >= 0, got {drop_worst_ratio}, {drop_worst_after}")
        self.label_smoothing = float(label_smoothing)
        self.drop_worst_ratio, self.drop_worst_after = float(drop_worst_ratio), int(drop_worst_after)
        if self.drop_worst_ratio > 0:  # only then: other runs keep their checkpoint keys
            self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """
        Args:
            logits: (..., V).
            labels: (...) long, -100 where nothing is predicted.

        Returns:
            Scalar loss (0 with a graph when nothing is predicted).
        """
        vocab = logits.shape[-1]
        logits, labels = logits.reshape(-1, vocab), labels.reshape(-1).to(logits.device)
        keep = labels != IGNORE_INDEX
        logits, labels = logits[keep], labels[keep]
        drop = self.drop_worst_ratio > 0 and self.training
        if drop:
            self.iteration += 1
        if labels.numel() == 0:
            return logits.sum() * 0.0
        logp = F.log_softmax(logits.float(), dim=-1)
        nll = -logp.gather(1, labels[:, None]).squeeze(1)
        if self.label_smoothing == 0.0:
            per_token = nll
        else:
            eps = self.label_smoothing
            others = -(logp.sum(dim=1)) - nll  # Σ_{v≠y} -log p_v
            per_token = (1.0 - eps) * nll + eps / (vocab - 1) * others
        if drop and int(self.iteration) > self.drop_worst_after:
            keep = max(1, int(per_token.shape[0] * (1.0 - self.drop_worst_ratio)))
            per_token = torch.topk(per_token, keep, largest=False).values
        return per_token.mean()

    def compute(self, student, teacher, batch):
        if student.mlm_logits is None:
            raise ValueError("masked_token_ce: the model output has no mlm_logits; run the "
                             "model with task='mlm', 'caption' or 'pretrain'")
        labels = _batch_tensor(batch, "mlm_labels", "masked_token_ce", student.mlm_logits.device)
        if student.mlm_logits.dim() == 2:  # logits only at the prediction positions
            from .model import prediction_positions
            labels = labels[prediction_positions(batch).to(labels.device)]
        return self(student.mlm_logits, labels)


@register_loss("vqa_bce")
class VQABCELoss(KDLoss):
    r"""VQA binary cross-entropy over soft answer scores, scaled by the answer count (Oscar's
    ``instance_bce_with_logits``). For logits z (B, A) and soft scores y (B, A) in [0, 1]:

    .. math:: \mathcal{L} = A \cdot \frac{1}{BA}\sum_{b,a}
              -\big[y_{ba}\log\sigma(z_{ba}) + (1-y_{ba})\log(1-\sigma(z_{ba}))\big]

    Example config::

        task: {type: vqa_bce, weight: 1.0}
    """

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """logits (B, A), targets (B, A) → scalar."""
        targets = targets.to(device=logits.device, dtype=torch.float32)
        bce = F.binary_cross_entropy_with_logits(logits.float(), targets)
        return bce * logits.shape[-1]

    def compute(self, student, teacher, batch):
        if student.vqa_logits is None:
            raise ValueError("vqa_bce: the model output has no vqa_logits; run it with task='vqa'")
        return self(student.vqa_logits, _batch_tensor(batch, "vqa_targets", "vqa_bce",
                                                      student.vqa_logits.device))


@register_loss("itm_ce")
class ITMLoss(KDLoss):
    r"""Image-text matching cross-entropy on the pooled [CLS] (Oscar's contrastive tag swap):
    :math:`\mathcal{L} = \frac{1}{B}\sum_b -\log\mathrm{softmax}(z_b)_{y_b}`.

    Example config::

        itm: {type: itm_ce, weight: 1.0}
    """

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """logits (B, C), labels (B,) → scalar."""
        return F.cross_entropy(logits.float(), labels.to(logits.device))

    def compute(self, student, teacher, batch):
        if student.itm_logits is None:
            raise ValueError("itm_ce: the model output has no itm_logits; run it with task='itm' "
                             "or 'pretrain'")
        return self(student.itm_logits, _batch_tensor(batch, "itm_labels", "itm_ce",
                                                      student.itm_logits.device))


@register_loss("scst")
class SCSTLoss(KDLoss):
    r"""Self-critical policy gradient of sampled captions (Oscar ``ScstRewardCriterion``).

    For sampled caption s with tokens :math:`w_1..w_{m_s}` (its [SEP] included), advantage
    :math:`a_s` = CIDEr-D(s) − baseline (the greedy caption's, or the mean of the image's other
    samples) and the model's log-probabilities of its tokens:

    .. math:: \mathcal{L} = -\frac{1}{S}\sum_s a_s\,\frac{1}{m_s}\sum_{t=1}^{m_s}
              \log p(w_t \mid w_{<t}, \text{image})

    (Oscar averages the log-probabilities over the caption's steps, then multiplies by the
    reward.) The batch comes from :class:`~vlkd.train.scst.SCSTModule`, which samples, scores
    and lays the captions out: the ``mlm_logits`` rows at its query positions, their tokens
    ``scst_targets`` (N,), the caption of each ``scst_seq`` (N,) and ``scst_advantage`` (S,).
    ``vlkd-train finetune|distill --scst`` makes it the ``task`` term.

    Example config::

        task: {type: scst, weight: 1.0}
    """

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, seq: torch.Tensor,
                advantage: torch.Tensor) -> torch.Tensor:
        """
        Args:
            logits: (N, V) at the sampled tokens' positions.
            targets: (N,) the sampled tokens.
            seq: (N,) index of the caption each row belongs to, in 0..S-1.
            advantage: (S,) reward minus baseline per caption.

        Returns:
            Scalar loss.
        """
        logp = F.log_softmax(logits.float(), dim=-1)
        tok = logp.gather(1, targets.to(logits.device)[:, None]).squeeze(1)  # (N,)
        seq = seq.to(logits.device)
        num = advantage.shape[0]
        total = tok.new_zeros(num).index_add(0, seq, tok)
        count = tok.new_zeros(num).index_add(0, seq, torch.ones_like(tok)).clamp(min=1.0)
        return -(advantage.to(tok) * total / count).mean()

    def compute(self, student, teacher, batch):
        if student.mlm_logits is None or batch.get("scst_targets") is None:
            raise ValueError("scst: needs the batch of vlkd.train.scst.SCSTModule (sampled "
                             "captions, their tokens and advantages); run with --scst")
        return self(student.mlm_logits, batch["scst_targets"], batch["scst_seq"],
                    batch["scst_advantage"])


# --------------------------------------------------------------------------------------------
# Combiner
# --------------------------------------------------------------------------------------------

class LossCombiner(nn.Module):
    """A weighted sum of named loss terms.

    Terms with weight 0 are not computed (their queues, if any, do not advance).

    Example config (one entry per term; ``params`` go to the loss constructor)::

        losses:
          task:      {type: masked_token_ce, weight: 1.0, params: {label_smoothing: 0.1}}
          attention: {type: attention_mse,   weight: 1.0}
          hidden:    {type: hidden_infonce,  weight: 1.0, params: {queue_size: 4096}}

    Args:
        terms: name → (loss module, weight).
    """

    def __init__(self, terms: Mapping[str, tuple[KDLoss, float]]):
        super().__init__()
        if not terms:
            raise ValueError("LossCombiner: no loss terms given")
        self.terms = nn.ModuleDict({name: loss for name, (loss, _) in terms.items()})
        self.weights = {name: float(w) for name, (_, w) in terms.items()}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Mapping[str, Any]], student_config: VLConfig | None = None,
                    teacher_config: VLConfig | None = None) -> "LossCombiner":
        """Builds the combiner from ``{name: {type, weight, params}}``."""
        terms = {}
        for name, spec in cfg.items():
            unknown = sorted(set(spec) - {"type", "weight", "params"})
            if "type" not in spec or unknown:
                raise KeyError(f"loss term {name!r}: expected keys type, weight, params; got "
                               f"{sorted(spec)}")
            loss = build_loss(spec["type"], spec.get("params"), student_config, teacher_config)
            terms[name] = (loss, spec.get("weight", 1.0))
        return cls(terms)

    @property
    def needs_teacher(self) -> bool:
        return any(self.weights[n] != 0 and m.needs_teacher for n, m in self.terms.items())

    def output_flags(self) -> dict[str, bool]:
        """Keyword flags for :meth:`VLModel.forward`: only the outputs some term reads."""
        flags = {"output_hidden_states": False, "output_attentions": False, "output_scores": False}
        for name, loss in self.terms.items():
            if self.weights[name] != 0:
                for k, v in loss.output_flags().items():
                    flags[k] = flags[k] or v
        return flags

    def forward(self, student: VLOutput, teacher: VLOutput | None,
                batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """
        Returns:
            (total, {name: detached value}) where total = Σ weight · value.
        """
        total: torch.Tensor | None = None
        values: dict[str, torch.Tensor] = {}
        for name, loss in self.terms.items():
            w = self.weights[name]
            if w == 0:
                continue
            v = loss.compute(student, teacher, batch)
            values[name] = v.detach()
            total = w * v if total is None else total + w * v
        if total is None:
            raise ValueError("LossCombiner: every term has weight 0")
        return total, values


# The distillation terms register themselves on import; they are importable from here too.
from .kd_losses import (AttentionMSELoss, HiddenInfoNCELoss, HiddenMSELoss,  # noqa: E402
                        LogitKDLoss, _QueueInfoNCE, first_difference)  # noqa: F401
