"""Caption decoding for the masked-token head: greedy and beam search, Oscar style.

At step t the text is ``[CLS] w_1 .. w_{t-1} [MASK]`` followed by the image's tags and regions
under the seq2seq mask; the head's prediction at the [MASK] position is the next token. A
hypothesis ends when it predicts [SEP] or reaches ``max_len`` tokens. By default the steps run
incrementally (:class:`~vlkd.train.incremental.IncrementalCaptioner`: the tags' and regions'
keys and values computed once per image, each known caption token's kept, only the newest token
and the [MASK] run through the layers); ``cache=False`` re-runs the whole sequence every step
(:func:`caption_step_logprobs`), the plain-BERT reference the cached steps are tested against.

Beam search keeps ``beam_size`` (k) running hypotheses per image. Each step extends every
running hypothesis by every token and walks the extensions in order of summed log-probability:
an extension by [SEP] becomes a finished hypothesis, ranked by ``sum log p / length **
length_penalty`` (the length counts the [SEP]), any other becomes a running one, until k running
ones are found. The k best finished hypotheses are kept, and an image is done once it has k of
them and the worst scores at least the best running one's ``sum log p / step **
length_penalty``: no running hypothesis is expected to beat them (Hugging Face's rule for
``early_stopping=False``; a heuristic, since a longer hypothesis can still gain under length
normalisation). At ``max_len`` the running hypotheses count as finished (length ``max_len``,
no [SEP]). ``tests/test_decode.py`` checks these rules against a plain implementation and an
exhaustive search.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .tasks import model_inputs

__all__ = ["generate_captions", "caption_step_logprobs"]


def _text_len_check(batch: Mapping[str, Any], max_len: int, max_text_len: int) -> None:
    if max_len + 2 > max_text_len:
        raise ValueError(f"decoding up to {max_len} tokens needs max_text_len >= {max_len + 2} "
                         f"(tags start at position max_text_len = {max_text_len}); lower "
                         "eval.max_len or train with a larger data.max_text_len")
    if batch["caption_part"].sum(1).max() != 1:
        raise ValueError("decoding expects evaluation batches whose text is just [CLS] "
                         "(CaptionTask(train=False))")


def _expand(t: torch.Tensor, k: int) -> torch.Tensor:
    return t.repeat_interleave(k, dim=0) if k > 1 else t


@torch.no_grad()
def caption_step_logprobs(model, context: Mapping[str, Any], prefix: torch.Tensor,
                          mask_id: int) -> torch.Tensor:
    """Log-probabilities of the next token after each prefix.

    Args:
        model: A :class:`~vlkd.train.model.VLModel` with the masked-token head.
        context: The image side of an evaluation batch (on the device), one row per prefix:
            ``input_ids`` etc. whose first text column is [CLS] and the rest tags.
        prefix: (N, t) token ids starting with [CLS].
        mask_id: Id of [MASK].

    Returns:
        (N, V) float32 log-probabilities.
    """
    n, t = prefix.shape
    dev = prefix.device
    text = torch.cat([prefix, torch.full((n, 1), mask_id, dtype=prefix.dtype, device=dev)], 1)
    tags = context["input_ids"][:, 1:]
    tag_mask = context["text_mask"][:, 1:]
    b = dict(context)
    b["input_ids"] = torch.cat([text, tags], 1)
    b["token_type_ids"] = torch.cat([torch.zeros_like(text), context["token_type_ids"][:, 1:]], 1)
    b["position_ids"] = torch.cat([torch.arange(t + 1, device=dev).expand(n, -1),
                                   context["position_ids"][:, 1:]], 1)
    ones = torch.ones_like(text, dtype=torch.bool)
    b["text_mask"] = torch.cat([ones, tag_mask], 1)
    b["caption_part"] = torch.cat([ones, torch.zeros_like(tag_mask)], 1)
    where = torch.zeros_like(b["input_ids"], dtype=torch.bool)
    where[:, t] = True
    b["masked_positions"] = where
    b.pop("mlm_labels", None)
    inputs = model_inputs(b, model.config.geometry_dim, seq2seq=True)
    out = model(inputs, task="caption", output_hidden_states=False, output_attentions=False)
    return torch.log_softmax(out.mlm_logits.float(), dim=-1)  # (N, V): one position per row


def _step_function(model, batch: Mapping[str, Any], k: int, mask_id: int, max_len: int,
                   cache: bool):
    """``step(prefix, parents) -> (N, V) log-probs`` over ``k`` rows per image."""
    if cache:
        from .incremental import IncrementalCaptioner

        return IncrementalCaptioner(model, batch, mask_id=mask_id, beams=k,
                                    max_len=max_len).step
    keys = ("input_ids", "token_type_ids", "position_ids", "text_mask", "caption_part",
            "region_features", "region_boxes", "region_mask", "image_hw")
    context = {key: _expand(batch[key], k) for key in keys}
    # Looked up at each call (tests script it); every step re-runs the whole sequence.
    return lambda prefix, parents: caption_step_logprobs(model, context, prefix, mask_id)


@torch.no_grad()
def generate_captions(model, batch: Mapping[str, Any], *, cls_id: int, sep_id: int,
                      mask_id: int, max_len: int = 20, beam_size: int = 5,
                      length_penalty: float = 1.0, max_text_len: int = 40,
                      cache: bool = True, return_scores: bool = False
                      ) -> list[list[int]] | list[tuple[list[int], float]]:
    """Generates one caption per image of an evaluation batch.

    Args:
        model: The captioning model (put in eval mode by the caller).
        batch: A collated ``CaptionTask(train=False)`` batch on the model's device.
        cls_id, sep_id, mask_id: Special token ids.
        max_len: Most tokens generated per caption ([SEP] included).
        beam_size: 1 = greedy.
        length_penalty: Exponent of the length normalisation of finished beams.
        max_text_len: The training ``data.max_text_len`` (tags sit after it).
        cache: Decode incrementally with cached keys and values
            (:class:`~vlkd.train.incremental.IncrementalCaptioner`); False re-runs the whole
            sequence at every step (:func:`caption_step_logprobs`). Same captions and scores
            up to float rounding.
        return_scores: Also return each caption's score: ``sum log p / length **
            length_penalty``, the length counting the [SEP] (``max_len`` for a caption cut
            there), the beam search's ranking score; for greedy the same formula.

    Returns:
        Token ids per image, without [CLS] and [SEP]; with ``return_scores``, (ids, score)
        pairs.
    """
    _text_len_check(batch, max_len, max_text_len)
    bsz = batch["input_ids"].shape[0]
    dev = batch["input_ids"].device
    k = max(1, int(beam_size))
    step_logprobs = _step_function(model, batch, k, mask_id, max_len, cache)
    prefix = torch.full((bsz * k, 1), cls_id, dtype=torch.long, device=dev)

    if k == 1:
        done = torch.zeros(bsz, dtype=torch.bool, device=dev)
        out: list[list[int]] = [[] for _ in range(bsz)]
        total = [0.0] * bsz
        for _ in range(max_len):
            logp = step_logprobs(prefix, None)
            nxt = logp.argmax(-1)
            chosen = logp.gather(1, nxt[:, None])[:, 0].tolist()
            for i in range(bsz):
                if not done[i]:
                    total[i] += chosen[i]
                    if int(nxt[i]) == sep_id:
                        done[i] = True
                    else:
                        out[i].append(int(nxt[i]))
            if bool(done.all()):
                break
            prefix = torch.cat([prefix, nxt[:, None]], 1)
        if not return_scores:
            return out
        return [(seq, total[i] / ((len(seq) + bool(done[i])) ** length_penalty))
                for i, seq in enumerate(out)]

    beam_scores = torch.zeros(bsz, k, device=dev)
    beam_scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(bsz)]
    done = [False] * bsz
    parents: list[int] = []  # the row of the previous step each row extends
    for step in range(1, max_len + 1):
        logp = step_logprobs(prefix, parents if step > 1 else None)  # (B*K, V)
        vocab = logp.shape[-1]
        cand = (beam_scores.view(-1, 1) + logp).view(bsz, k * vocab)
        top_scores, top_idx = cand.topk(2 * k, dim=1)
        new_prefix, new_scores, parents = [], [], []
        for i in range(bsz):
            row_prefix, row_scores, row_parents = [], [], []
            if not done[i]:
                for score, idx in zip(top_scores[i].tolist(), top_idx[i].tolist()):
                    if score == float("-inf"):
                        break
                    src, tok = divmod(idx, vocab)
                    seq = prefix[i * k + src, 1:].tolist()
                    if tok == sep_id:
                        finished[i].append((score / (step ** length_penalty), seq))
                    else:
                        row_prefix.append(seq + [tok])
                        row_scores.append(score)
                        row_parents.append(i * k + src)
                    if len(row_prefix) == k:
                        break
                finished[i].sort(key=lambda x: -x[0])
                del finished[i][k:]
                if len(finished[i]) == k:
                    best_running = max(row_scores, default=float("-inf")) / (step ** length_penalty)
                    if finished[i][-1][0] >= best_running:
                        done[i] = True
            if done[i] or not row_prefix:
                done[i] = True
                row_prefix = [[sep_id] * step] * k  # placeholders; never read again
                row_scores = [float("-inf")] * k
                row_parents = [i * k] * k
            while len(row_prefix) < k:
                row_prefix.append(row_prefix[-1])
                row_scores.append(float("-inf"))
                row_parents.append(row_parents[-1])
            new_prefix.extend(row_prefix)
            new_scores.append(row_scores)
            parents.extend(row_parents)
        if all(done):
            break
        prefix = torch.tensor([[cls_id] + p for p in new_prefix], dtype=torch.long, device=dev)
        beam_scores = torch.tensor(new_scores, device=dev)
    best: list[tuple[float, list[int]]] = []
    for i in range(bsz):
        if not done[i]:  # max_len reached: running beams count as finished (no [SEP])
            for j in range(k):
                s = float(beam_scores[i, j])
                if s > float("-inf"):
                    finished[i].append((s / (max_len ** length_penalty),
                                        prefix[i * k + j, 1:].tolist()))
        finished[i].sort(key=lambda x: -x[0])
        best.append(finished[i][0] if finished[i] else (float("-inf"), []))
    if return_scores:
        return [(seq, score) for score, seq in best]
    return [seq for _, seq in best]
