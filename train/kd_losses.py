"""The distillation terms of :mod:`vlkd.train.losses`: attention maps (``attention_mse``),
hidden states (``hidden_infonce`` with its queue of teacher tokens, ``hidden_mse``) and
logits (``logit_kd``). They register themselves in :data:`~vlkd.train.losses.LOSSES` and are
importable from :mod:`vlkd.train.losses`, which imports this module; the registry, the base
class, layer maps and the task terms live there.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .kd_queue import TokenQueue
from .losses import (KDLoss, LayerMapSpec, _pair_mask, _require_teacher, register_loss,
                     resolve_layer_map)

__all__ = ["AttentionMSELoss", "HiddenInfoNCELoss", "HiddenMSELoss", "LogitKDLoss",
           "first_difference"]


@register_loss("attention_mse")
class AttentionMSELoss(KDLoss):
    r"""MSE between student and teacher attention maps of mapped layers.

    For each pair (s, t) of the layer map, maps :math:`A^S_s, A^T_t` (B, H, L, L) and the pair
    mask M (query i and key j both real tokens and i allowed to attend to j):

    .. math:: \mathcal{L} = \frac{1}{|P|}\sum_{(s,t)\in P}
              \frac{\sum_{b,h,i,j} M_{bij}\,(A^S_{s,bhij}-A^T_{t,bhij})^2}{H\sum_{b,i,j}M_{bij}}

    ``target: probs`` compares attention probabilities (the paper's "attention distribution");
    ``target: scores`` compares pre-softmax scores q·k/√d (TinyBERT's variant; run the models
    with ``output_scores=True``, which :meth:`LossCombiner.output_flags` requests). With
    different head counts the loss raises unless ``head_average: true``, which averages each
    map over its heads first (H = 1 above). The teacher side is detached.

    Example config::

        attention: {type: attention_mse, weight: 1.0,
                    params: {layer_map: uniform, target: probs, head_average: false}}

    Args:
        layer_map: ``uniform``, ``last`` or ``[[s, t], ...]``.
        target: ``probs`` or ``scores``.
        head_average: Average over heads before comparing.
    """

    needs_teacher = True

    def __init__(self, layer_map: LayerMapSpec = "uniform", target: str = "probs",
                 head_average: bool = False):
        super().__init__()
        if target not in ("probs", "scores"):
            raise ValueError(f"attention_mse: target must be 'probs' or 'scores', got {target!r}")
        self.layer_map, self.target, self.head_average = layer_map, target, bool(head_average)

    def forward(self, student_maps: Sequence[torch.Tensor], teacher_maps: Sequence[torch.Tensor],
                mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student_maps: L_S tensors (B, H_S, L, L).
            teacher_maps: L_T tensors (B, H_T, L, L).
            mask: (B, L) token mask or (B, L, L) pair mask.

        Returns:
            Scalar loss.
        """
        pairs = resolve_layer_map(self.layer_map, len(student_maps), len(teacher_maps))
        pm = _pair_mask(mask.to(student_maps[0].device))
        pm_f = pm.unsqueeze(1).to(student_maps[0].dtype)  # (B, 1, L, L)
        count = pm_f.sum()
        total = student_maps[0].new_zeros(())
        for s, t in pairs:
            a_s, a_t = student_maps[s - 1], teacher_maps[t - 1].detach().to(student_maps[s - 1].dtype)
            if a_s.shape[1] != a_t.shape[1] and not self.head_average:
                raise ValueError(
                    f"attention_mse: student layer {s} has {a_s.shape[1]} heads, teacher layer {t} "
                    f"has {a_t.shape[1]}; set head_average: true to compare head-averaged maps")
            if self.head_average:
                a_s, a_t = a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True)
            sq = (a_s - a_t).square() * pm_f
            total = total + sq.sum() / (count * a_s.shape[1]).clamp(min=1.0)
        return total / len(pairs)

    def compute(self, student, teacher, batch):
        teacher = _require_teacher(teacher, "attention_mse")
        field = "attentions" if self.target == "probs" else "attention_scores"
        s_maps, t_maps = getattr(student, field), getattr(teacher, field)
        if s_maps is None or t_maps is None:
            raise ValueError(f"attention_mse (target {self.target}) needs {field} from both "
                             f"models; run them with **combiner.output_flags()")
        return self(s_maps, t_maps, student.pair_mask())

    def output_flags(self):
        return {"output_attentions": True, "output_scores": self.target == "scores"}


class _HiddenLayerLoss(KDLoss):
    """Shared construction of the hidden-state losses (layer pairs from the two configs)."""

    needs_teacher = True

    @classmethod
    def from_config(cls, params, student_config, teacher_config):
        if student_config is None or teacher_config is None:
            raise ValueError(f"{cls.registry_name}: needs the student and teacher model configs "
                             f"(hidden sizes and layer counts) to build its projections")
        return cls(student_dim=student_config.hidden_size, teacher_dim=teacher_config.hidden_size,
                   num_student_layers=student_config.num_layers,
                   num_teacher_layers=teacher_config.num_layers, **params)

    def compute(self, student, teacher, batch):
        name = self.registry_name
        teacher = _require_teacher(teacher, name)
        if student.hidden_states is None or teacher.hidden_states is None:
            raise ValueError(f"{name} needs hidden_states from both models; run them with "
                             "**combiner.output_flags()")
        return self(student.hidden_states, teacher.hidden_states, student.token_mask)

    def output_flags(self):
        return {"output_hidden_states": True}


class _QueueInfoNCE(torch.autograd.Function):
    """Mean InfoNCE of queries against their positives and a queue, gradient computed in forward.

    Autograd's version would save the (P, N, K+1) logits and the queue itself; the queue is
    then overwritten in place by the enqueue that follows, which autograd forbids (so it would
    need a copy of the whole queue every step). Here forward also computes dL/dq and dL/dk,
    whose size is that of q and k, and backward only scales them: no queue copy, memory
    (P, N, d) instead of (P, N, K), and few passes over the (P, n, K) block, which is processed
    in row chunks to bound its size.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float):
        # q, k: (P, N, d); queue: (P, K', d), no gradient. Float32 at least (float64 stays).
        dtype = torch.promote_types(q.dtype, torch.float32)
        q32, k32, u = q.to(dtype), k.to(dtype), queue.to(dtype)
        num_pairs, n, _ = q32.shape
        count = num_pairs * n
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        total = q32.new_zeros(())
        grad_q = torch.zeros_like(q32) if want_grad else None
        grad_k = torch.zeros_like(k32) if want_grad else None
        if u.shape[1] == 0:  # no negatives yet: softmax over one logit, loss and gradient are 0
            if want_grad:
                ctx.save_for_backward(grad_q.to(q.dtype), grad_k.to(k.dtype))
            return total.to(q.dtype)
        scale = 1.0 / (count * temperature)
        chunk = max(1, (1 << 24) // (num_pairs * u.shape[1]))
        for lo in range(0, n, chunk):
            qc, kc = q32[:, lo:lo + chunk], k32[:, lo:lo + chunk]
            qt = qc / temperature
            pos = (qt * kc).sum(-1, keepdim=True)  # (P, n, 1) logit of k⁺
            neg = torch.bmm(qt, u.transpose(1, 2))  # (P, n, K') logits of the queue
            top = torch.maximum(neg.amax(-1, keepdim=True), pos)
            neg.sub_(top).exp_()  # in place: exp(logit - top)
            denom = neg.sum(-1, keepdim=True) + torch.exp(pos - top)
            lse = top + denom.log()
            total = total + (lse - pos).sum()
            if want_grad:
                # dL/dlogit = (softmax - onehot_0) / count; d logit / dq = k/τ or u/τ.
                d_pos = torch.exp(pos - lse) - 1.0  # (P, n, 1)
                grad_q[:, lo:lo + chunk] = (d_pos * kc + torch.bmm(neg, u) / denom) * scale
                grad_k[:, lo:lo + chunk] = d_pos * qc * scale
        if want_grad:
            ctx.save_for_backward(grad_q.to(q.dtype), grad_k.to(k.dtype))
        return (total / count).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_q, grad_k = ctx.saved_tensors
        return grad_out * grad_q, grad_out * grad_k, None, None


@register_loss("hidden_infonce")
class HiddenInfoNCELoss(_HiddenLayerLoss):
    r"""Token-wise InfoNCE on hidden states against a queue of past teacher tokens.

    For each layer pair (s, t) and every valid token i (``pooling: token``) or every sample's
    mean over its valid tokens (``pooling: mean``, an ablation):

    .. math::
        q_i = \frac{P_s h^S_{s,i}}{\lVert P_s h^S_{s,i}\rVert},\quad
        k_i = \frac{P_t\,\mathrm{sg}(h^T_{t,i})}{\lVert\cdot\rVert},\quad
        \mathcal{L} = \frac{1}{|P|\,N}\sum_{(s,t)}\sum_i
        -\log\frac{e^{q_i\cdot k_i/\tau}}{e^{q_i\cdot k_i/\tau} + \sum_{m=1}^{K'} e^{q_i\cdot u_m/\tau}}

    where :math:`u_1..u_{K'}` are the pair's queued teacher vectors (:math:`K' \le K`; the
    queue starts empty, so the first step has no negatives). P_s is a learned linear map to d;
    P_t is the identity (d = teacher hidden size) or a learned linear map to d. The teacher
    network gets no gradient (sg); a linear P_t learns through k_i in the positive term, queued
    vectors carry none. In training mode, after computing the loss, this step's k vectors of
    every pair are enqueued, gathered from all DDP ranks (each rank has its own token count),
    overwriting the oldest once K are stored (:class:`~vlkd.train.kd_queue.TokenQueue`, a
    registered buffer: checkpointed with the loss). Every rank must call it in every step.
    Only ``enqueue_per_step`` rows of a step are enqueued, drawn evenly from the ranks and at
    random within each (seeded by ``enqueue_seed`` and the queue's enqueue counter, so a resumed
    run draws the same), so the queue holds the last ~K / ``enqueue_per_step`` steps of every
    rank rather than the newest K tokens of the last step.

    Example config::

        hidden: {type: hidden_infonce, weight: 1.0,
                 params: {layer_map: uniform, queue_size: 4096, temperature: 0.07,
                          teacher_projection: identity, proj_dim: null, pooling: token,
                          enqueue_per_step: 256}}

    Args:
        student_dim, teacher_dim: Hidden sizes (from the model configs).
        num_student_layers, num_teacher_layers: Layer counts (from the model configs).
        layer_map: ``uniform``, ``last`` or ``[[s, t], ...]`` over hidden states.
        include_embeddings: Also distil the embedding output (pair (0, 0)).
        proj_dim: d; default the teacher hidden size.
        teacher_projection: ``identity`` (needs d = teacher hidden size) or ``linear``.
        queue_size: K.
        temperature: τ.
        pooling: ``token`` or ``mean``.
        enqueue_per_step: Rows enqueued per training forward over all ranks (capped at K;
            null: every row). The default 256 makes K = 4096 span the last 16 steps.
        enqueue_seed: Seed of the enqueue draws; null: ``torch.initial_seed()`` when the loss
            is built, which ``vlkd-train`` has set to ``train.seed``.
    """

    def __init__(self, student_dim: int, teacher_dim: int, num_student_layers: int,
                 num_teacher_layers: int, layer_map: LayerMapSpec = "uniform",
                 include_embeddings: bool = False, proj_dim: int | None = None,
                 teacher_projection: str = "identity", queue_size: int = 4096,
                 temperature: float = 0.07, pooling: str = "token",
                 enqueue_per_step: int | None = 256, enqueue_seed: int | None = None):
        super().__init__()
        self.pairs = resolve_layer_map(layer_map, num_student_layers, num_teacher_layers,
                                       include_embeddings)
        d = int(proj_dim or teacher_dim)
        if teacher_projection not in ("identity", "linear"):
            raise ValueError(f"hidden_infonce: teacher_projection must be 'identity' or 'linear', "
                             f"got {teacher_projection!r}")
        if teacher_projection == "identity" and d != teacher_dim:
            raise ValueError(f"hidden_infonce: teacher_projection 'identity' keeps the teacher's "
                             f"{teacher_dim} dims, but proj_dim is {d}; use "
                             f"teacher_projection: linear or drop proj_dim")
        if pooling not in ("token", "mean"):
            raise ValueError(f"hidden_infonce: pooling must be 'token' or 'mean', got {pooling!r}")
        if temperature <= 0:
            raise ValueError(f"hidden_infonce: temperature must be > 0, got {temperature}")
        self.temperature, self.pooling = float(temperature), pooling
        self.student_proj = nn.ModuleList(nn.Linear(student_dim, d) for _ in self.pairs)
        self.teacher_proj = nn.ModuleList(
            (nn.Identity() if teacher_projection == "identity" else nn.Linear(teacher_dim, d))
            for _ in self.pairs)
        seed = torch.initial_seed() if enqueue_seed is None else int(enqueue_seed)
        self.queue = TokenQueue(queue_size, d, num_banks=len(self.pairs),
                                per_step=enqueue_per_step, seed=seed)

    def _select(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "token":
            return hidden[mask]  # (N, H), row-major over (b, i)
        w = mask.to(hidden.dtype)
        return (hidden * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp(min=1.0)

    def forward(self, student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student_hidden: L_S + 1 tensors (B, L, H_S): embeddings, then every layer.
            teacher_hidden: L_T + 1 tensors (B, L, H_T).
            mask: (B, L) bool, True at valid tokens.

        Returns:
            Scalar loss. In training mode the queue is updated afterwards.
        """
        mask = mask.to(student_hidden[0].device).bool()
        if self.pooling == "mean":
            mask_rows = mask.any(dim=1)  # samples with no valid token contribute nothing
        qs, ks = [], []
        for i, (s, t) in enumerate(self.pairs):
            hs = self._select(student_hidden[s], mask)
            ht = self._select(teacher_hidden[t].detach(), mask).to(hs.dtype)
            if self.pooling == "mean":
                hs, ht = hs[mask_rows], ht[mask_rows]
            qs.append(F.normalize(self.student_proj[i](hs), dim=-1))
            ks.append(F.normalize(self.teacher_proj[i](ht), dim=-1))
        q, k = torch.stack(qs), torch.stack(ks)  # (P, N, d)
        if q.shape[1] == 0:
            loss = q.sum() * 0.0
        else:
            loss = _QueueInfoNCE.apply(q, k, self.queue.valid(), self.temperature)
        if self.training:
            self.queue.enqueue(k.detach().transpose(0, 1))  # (N, P, d), gathered over ranks
        return loss


@register_loss("hidden_mse")
class HiddenMSELoss(_HiddenLayerLoss):
    r"""Hidden-state MSE with a learned projection (TinyBERT's hidden loss; an ablation).

    For each layer pair (s, t), over the N valid tokens, with W_s a linear map H_S → H_T
    (identity when ``projection: identity`` and the sizes match):

    .. math:: \mathcal{L} = \frac{1}{|P|}\sum_{(s,t)} \frac{1}{N H_T}\sum_i
              \lVert W_s h^S_{s,i} - \mathrm{sg}(h^T_{t,i})\rVert^2

    Example config::

        hidden: {type: hidden_mse, weight: 1.0, params: {layer_map: uniform}}
    """

    def __init__(self, student_dim: int, teacher_dim: int, num_student_layers: int,
                 num_teacher_layers: int, layer_map: LayerMapSpec = "uniform",
                 include_embeddings: bool = False, projection: str = "linear"):
        super().__init__()
        self.pairs = resolve_layer_map(layer_map, num_student_layers, num_teacher_layers,
                                       include_embeddings)
        if projection == "identity" and student_dim != teacher_dim:
            raise ValueError(f"hidden_mse: projection 'identity' needs equal hidden sizes, got "
                             f"student {student_dim} and teacher {teacher_dim}; use 'linear'")
        if projection not in ("identity", "linear"):
            raise ValueError(f"hidden_mse: projection must be 'identity' or 'linear', got {projection!r}")
        self.proj = nn.ModuleList(
            (nn.Identity() if projection == "identity" else nn.Linear(student_dim, teacher_dim))
            for _ in self.pairs)

    def forward(self, student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                mask: torch.Tensor) -> torch.Tensor:
        """Same arguments as :meth:`HiddenInfoNCELoss.forward`; returns a scalar."""
        mask = mask.to(student_hidden[0].device).bool()
        total = student_hidden[0].new_zeros(())
        for i, (s, t) in enumerate(self.pairs):
            hs = self.proj[i](student_hidden[s][mask])
            ht = teacher_hidden[t][mask].detach().to(hs.dtype)
            total = total + F.mse_loss(hs, ht, reduction="sum") / max(ht.numel(), 1)
        return total / len(self.pairs)


@register_loss("logit_kd")
class LogitKDLoss(KDLoss):
    r"""Logit distillation at temperature T.

    ``kind: softmax`` (masked-token / caption predictions, the default for ``head: mlm``), over
    the N predicted positions:

    .. math:: \mathcal{L} = \frac{T^2}{N}\sum_n \mathrm{KL}\big(\mathrm{softmax}(z^T_n/T)\,
              \Vert\,\mathrm{softmax}(z^S_n/T)\big)

    ``kind: sigmoid`` (VQA, the default for ``head: vqa``): binary cross-entropy against the
    teacher's sigmoid outputs, scaled like :class:`VQABCELoss`:

    .. math:: \mathcal{L} = T^2 \cdot A \cdot \frac{1}{BA}\sum_{b,a}
              \mathrm{BCE}\big(\sigma(z^S_{ba}/T),\ \sigma(z^T_{ba}/T)\big)

    The teacher side is detached.

    Example config::

        logits: {type: logit_kd, weight: 1.0, params: {temperature: 2.0, head: mlm}}

    Args:
        temperature: T > 0.
        head: ``mlm`` (reads ``mlm_logits``) or ``vqa`` (reads ``vqa_logits``).
        kind: ``softmax`` or ``sigmoid``; default by head.
    """

    needs_teacher = True

    def __init__(self, temperature: float = 1.0, head: str = "mlm", kind: str | None = None):
        super().__init__()
        if head not in ("mlm", "vqa"):
            raise ValueError(f"logit_kd: head must be 'mlm' or 'vqa', got {head!r}")
        kind = kind or ("softmax" if head == "mlm" else "sigmoid")
        if kind not in ("softmax", "sigmoid"):
            raise ValueError(f"logit_kd: kind must be 'softmax' or 'sigmoid', got {kind!r}")
        if temperature <= 0:
            raise ValueError(f"logit_kd: temperature must be > 0, got {temperature}")
        self.temperature, self.head, self.kind = float(temperature), head, kind

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            student_logits: (N, V) or (B, T, V); (B, A) for sigmoid.
            teacher_logits: Same shape.
            mask: Optional (B, T) bool selecting positions of 3-D logits.

        Returns:
            Scalar loss.
        """
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(f"logit_kd: student logits {tuple(student_logits.shape)} and teacher "
                             f"logits {tuple(teacher_logits.shape)} differ; both models need the "
                             f"same vocabulary / answer list and prediction positions")
        zt = teacher_logits.detach().float()
        zs = student_logits.float()
        if mask is not None:
            zs, zt = zs[mask.bool()], zt[mask.bool()]
        temp = self.temperature
        if self.kind == "softmax":
            zs, zt = zs.reshape(-1, zs.shape[-1]), zt.reshape(-1, zt.shape[-1])
            if zs.shape[0] == 0:
                return zs.sum() * 0.0
            kl = F.kl_div(F.log_softmax(zs / temp, -1), F.log_softmax(zt / temp, -1),
                          reduction="batchmean", log_target=True)
            return kl * temp * temp
        bce = F.binary_cross_entropy_with_logits(zs / temp, torch.sigmoid(zt / temp))
        return bce * zs.shape[-1] * temp * temp

    #: What the logits of each head are over (the keys of :meth:`check_labels`'s mappings).
    LABEL_SPACES = {"mlm": "vocabulary (tokens by id)", "vqa": "answer list"}

    def check_labels(self, student_labels: Mapping[str, Sequence[str]],
                     teacher_labels: Mapping[str, Sequence[str] | None]) -> None:
        """Refuses teacher and student logits that are over different label lists.

        Logit i must mean the same for both: the same answer (``head: vqa``) or the same token
        (``head: mlm``). Equal shapes are not enough: two answer lists in another order pass
        every shape check and make the KD target wrong for every question.

        Args:
            student_labels, teacher_labels: ``{head: labels by logit index}`` (the answer list
                for ``vqa``, the tokens by id for ``mlm``); None when a side's list is unknown.

        Raises:
            ValueError: naming the first index where the lists differ (or the missing list).
        """
        what = self.LABEL_SPACES[self.head]
        s, t = student_labels.get(self.head), teacher_labels.get(self.head)
        for side, labels in (("student", s), ("teacher", t)):
            if labels is None:
                raise ValueError(f"logit_kd (head {self.head}): the {side}'s {what} is unknown, so "
                                 f"its logits cannot be matched with the other model's; "
                                 + ("give the teacher directory its answers.txt (one answer per "
                                    "line, in classifier order)" if self.head == "vqa" else
                                    "give the teacher directory its tokenizer (vocab.txt)"))
        diff = first_difference(list(s), list(t))
        if diff:
            raise ValueError(f"logit_kd (head {self.head}): the teacher's and the student's "
                             f"{what} differ, so their logits mean different things: {diff}; "
                             "distil between models with identical lists (train the student "
                             "with the teacher's " + ("answers.txt as data.answer_vocab)"
                                                      if self.head == "vqa" else
                                                      "tokenizer, --tokenizer TEACHER_DIR)")
                             + " or set losses.logits.weight=0")

    def compute(self, student, teacher, batch):
        teacher = _require_teacher(teacher, "logit_kd")
        field = f"{self.head}_logits"
        zs, zt = getattr(student, field), getattr(teacher, field)
        if zs is None or zt is None:
            raise ValueError(f"logit_kd: both outputs need {field}; run both models with the "
                             f"task that uses the {self.head} head")
        return self(zs, zt)


def first_difference(student: Sequence[str], teacher: Sequence[str]) -> str | None:
    """Where two label lists first differ, in words (None when they are identical)."""
    for i, (a, b) in enumerate(zip(student, teacher)):
        if a != b:
            return f"index {i} is {a!r} for the student and {b!r} for the teacher"
    if len(student) != len(teacher):
        longer, side = ((student, "student") if len(student) > len(teacher)
                        else (teacher, "teacher"))
        n = min(len(student), len(teacher))
        return (f"the student has {len(student)} entries and the teacher {len(teacher)} (the "
                f"{side}'s index {n} is {longer[n]!r})")
    return None
