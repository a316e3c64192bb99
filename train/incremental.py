"""Incremental caption decoding: per-layer keys and values cached across decoding steps.

Under the captioning seq2seq mask (:func:`~vlkd.train.model.caption_attention_mask`) the tags
and regions never attend to the caption, so their keys and values in every layer are the same
at every step: they are computed once per image (one forward of the context alone under the
same mask) and shared by the image's beams. Caption token j attends to [CLS], the tokens up to
j and the context, so its keys and values do not change once the token is known. Step t of
:func:`~vlkd.train.decode.generate_captions` feeds ``[CLS] w_1 .. w_{t-1} [MASK]``; here only
its last two tokens run through the layers, as in Oscar's ``BertForImageCaptioning``
(``prepare_inputs_for_generation``: ``[last token, [MASK]]`` at positions t-1 and t, the
[MASK]'s entry dropped after the step, since a known token replaces it): ``w_{t-1}``, which was
the [MASK] of the previous step, and the new [MASK]. Oscar keeps each layer's input hidden
states and recomputes the keys of the whole history each step; this keeps the keys and values.
When the beams are reordered, the caption caches follow them (``parents``).

The layers run through their own submodules (``attention.self.query/key/value``, the registered
attention function, ``attention.output``, ``feed_forward_chunk``), the tokens through the
model's own embeddings and head, so the arithmetic is the uncached forward's restricted to the
new rows; ``tests/test_incremental.py`` checks that the log-probabilities and the decoded
captions equal :func:`~vlkd.train.decode.caption_step_logprobs`' (``generate_captions(...,
cache=False)``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .tasks import model_inputs

__all__ = ["IncrementalCaptioner"]

_CONTEXT_KEYS = ("region_features", "region_boxes", "region_mask", "image_hw")


class IncrementalCaptioner:
    """Next-token log-probabilities of ``beams`` running captions per image, with a cache.

    Rows are image-major: row ``i * beams + j`` is beam j of image i, as in
    :func:`~vlkd.train.decode.generate_captions`. Call :meth:`step` once per decoding step,
    with the prefixes of that step (one more token each time) and, from the second step on,
    the row of the previous step that each row extends.

    Args:
        model: A :class:`~vlkd.train.model.VLModel` with the masked-token head (eval mode).
        batch: A collated ``CaptionTask(train=False)`` batch on the model's device: text
            ``[CLS]`` then the tags, and the regions.
        mask_id: Id of [MASK].
        beams: Rows per image.
        max_len: Most decoding steps (caption positions 0 .. ``max_len`` are kept).
    """

    def __init__(self, model, batch: Mapping[str, Any], *, mask_id: int, beams: int = 1,
                 max_len: int = 20):
        self.model, self.mask_id, self.beams = model, int(mask_id), int(beams)
        self.layers = list(model.bert.encoder.layer)
        self.capacity = int(max_len) + 1
        self.steps = 0
        keys, values, ctx_valid = self._encode_context(batch)
        k = self.beams
        n = ctx_valid.shape[0] * k
        self.ctx_len = ctx_valid.shape[1]
        # One buffer per layer: the context's keys (the same for an image's beams), then the
        # caption's, slot C + j holding position j. (N, heads, C + capacity, head dim)
        self.keys = [self._buffer(x.repeat_interleave(k, 0)) for x in keys]
        self.values = [self._buffer(x.repeat_interleave(k, 0)) for x in values]
        # Which keys the two new queries may see: padded tags and regions closed.
        keep = torch.ones(n, 1, 2, self.ctx_len + self.capacity, dtype=torch.bool,
                          device=ctx_valid.device)
        keep[:, 0, :, :self.ctx_len] = ctx_valid.repeat_interleave(k, 0)[:, None, :]
        self._keep = keep  # (N, 1, 2, C + capacity)

    # ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _encode_context(self, batch: Mapping[str, Any]
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Per-layer keys and values (B, heads, C, head dim) of the tags and regions, and
        which of the C context tokens are real (B, C)."""
        model = self.model
        text_mask = batch["text_mask"][:, 1:].bool()
        region_mask = batch["region_mask"].bool()
        ctx_valid = torch.cat([text_mask, region_mask], 1)  # (B, C): tags then regions
        bsz, c = ctx_valid.shape
        sa = self.layers[0].attention.self
        if c == 0:
            empty = batch["input_ids"].new_zeros((bsz, sa.num_attention_heads, 0,
                                                  sa.attention_head_size), dtype=torch.float32)
            return [empty] * len(self.layers), [empty] * len(self.layers), ctx_valid
        ctx = {key: batch[key] for key in _CONTEXT_KEYS}
        for key in ("input_ids", "token_type_ids", "position_ids"):
            ctx[key] = batch[key][:, 1:]
        ctx["text_mask"] = text_mask
        ctx["caption_part"] = torch.zeros_like(text_mask)
        # The captioning mask with no caption: each tag and region sees the real context.
        inputs = model_inputs(ctx, model.config.geometry_dim, seq2seq=True)
        out = model(inputs, task="none", output_hidden_states=True, output_attentions=False)
        keys, values = [], []
        for layer, hidden in zip(self.layers, out.hidden_states):  # the input of each layer
            sa = layer.attention.self
            keys.append(self._heads(sa, sa.key(hidden)))
            values.append(self._heads(sa, sa.value(hidden)))
        return keys, values, ctx_valid

    @staticmethod
    def _heads(sa, x: torch.Tensor) -> torch.Tensor:
        """(N, L, H) → (N, heads, L, head dim), as ``BertSelfAttention`` lays them out."""
        return x.view(*x.shape[:2], -1, sa.attention_head_size).transpose(1, 2)

    def _buffer(self, ctx: torch.Tensor) -> torch.Tensor:
        n, h, c, d = ctx.shape
        buf = ctx.new_zeros(n, h, c + self.capacity, d)
        buf[:, :, :c] = ctx
        return buf

    # ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, prefix: torch.Tensor, parents: Sequence[int] | torch.Tensor | None = None
             ) -> torch.Tensor:
        """Log-probabilities of the token after each prefix.

        Args:
            prefix: (N, t) token ids starting with [CLS]; t = the number of earlier calls + 1.
                Only its last column is read: the earlier ones are in the cache.
            parents: (N,) the row of the previous call whose prefix each row extends (rows of
                the same image only: an image's beams share its context); None keeps the rows.

        Returns:
            (N, V) float32 log-probabilities, as
            :func:`~vlkd.train.decode.caption_step_logprobs`.
        """
        n, t = prefix.shape
        c = self.ctx_len
        if t != self.steps + 1:
            raise ValueError(f"IncrementalCaptioner: step {self.steps + 1} expects prefixes of "
                             f"{self.steps + 1} tokens, got {t}; call step once per token")
        if t >= self.capacity:  # step t writes caption slots t - 1 and t
            raise ValueError(f"IncrementalCaptioner: built for max_len {self.capacity - 1}, "
                             f"asked for step {t}")
        if n != self.keys[0].shape[0]:
            raise ValueError(f"IncrementalCaptioner: built for {self.keys[0].shape[0]} rows "
                             f"(images x beams), got {n}")
        dev = prefix.device
        if parents is not None and t > 1:
            src = torch.as_tensor(parents, dtype=torch.long).cpu()
            if tuple(src.shape) != (n,) or bool((src // self.beams != torch.arange(n) //
                                                 self.beams).any()):
                raise ValueError("IncrementalCaptioner: parents must name one row of the same "
                                 "image for every row")
            src = src.to(dev)
            for buf in (*self.keys, *self.values):  # the caption part follows its beam
                buf[:, :, c:c + t - 1] = buf[src, :, c:c + t - 1]
        self.steps = t

        # Position t-1 (the last known token, [CLS] at the first step) and t (the [MASK]).
        ids = torch.stack([prefix[:, -1], torch.full_like(prefix[:, -1], self.mask_id)], 1)
        pos = torch.arange(t - 1, t + 1, device=dev).expand(n, -1)
        hidden = self.model.bert.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids),
                                            position_ids=pos)  # (N, 2, H)
        length = c + t + 1
        keep = self._keep[..., :length].clone()
        keep[:, 0, 0, length - 1] = False  # w_{t-1} does not see the [MASK] after it
        additive = torch.zeros(keep.shape, dtype=hidden.dtype, device=dev)
        additive = additive.masked_fill(~keep, torch.finfo(hidden.dtype).min)  # (N, 1, 2, Lk)

        for layer, kbuf, vbuf in zip(self.layers, self.keys, self.values):
            sa = layer.attention.self
            query = self._heads(sa, sa.query(hidden))
            kbuf[:, :, c + t - 1:length] = self._heads(sa, sa.key(hidden)).to(kbuf.dtype)
            vbuf[:, :, c + t - 1:length] = self._heads(sa, sa.value(hidden)).to(vbuf.dtype)
            attend = ALL_ATTENTION_FUNCTIONS.get_interface(sa.config._attn_implementation, None)
            out, _ = attend(sa, query, kbuf[:, :, :length], vbuf[:, :, :length], additive,
                            dropout=0.0 if not sa.training else sa.dropout.p,
                            scaling=sa.scaling)
            out = out.reshape(n, 2, -1).contiguous()
            hidden = layer.feed_forward_chunk(layer.attention.output(out, hidden))
        # Slot c + t (the [MASK]) is overwritten by w_t at the next step.
        logits = self.model.mlm_head(hidden[:, 1])
        return torch.log_softmax(logits.float(), dim=-1)  # (N, V)
