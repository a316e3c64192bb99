"""Every loss pinned against a plain numpy computation written here (loops, textbook formulas)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vlkd.train.kd_queue import TokenQueue
from vlkd.train.losses import (
    LOSSES,
    AttentionMSELoss,
    HiddenInfoNCELoss,
    HiddenMSELoss,
    ITMLoss,
    LogitKDLoss,
    LossCombiner,
    MaskedTokenLoss,
    VQABCELoss,
    build_loss,
    resolve_layer_map,
)
from vlkd.train.model import VLConfig, VLModel, padding_mask


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max()
    return z - math.log(np.exp(z).sum())


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


# ------------------------------------------------------------------------------- task losses

@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_masked_token_ce(eps):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[3, -100, 0, -100, 6], [-100, -100, 2, 2, -100]])
    got = MaskedTokenLoss(label_smoothing=eps)(logits, labels)
    total, n = 0.0, 0
    for b in range(2):
        for t in range(5):
            y = int(labels[b, t])
            if y == -100:
                continue
            logp = _log_softmax(_np(logits[b, t]))
            q = np.full(7, eps / 6)
            q[y] = 1 - eps
            total += -(q * logp).sum()
            n += 1
    assert got.item() == pytest.approx(total / n, rel=1e-6)


def test_masked_token_ce_with_nothing_to_predict_is_zero_with_a_graph():
    logits = torch.randn(1, 3, 5, requires_grad=True)
    loss = MaskedTokenLoss(0.1)(logits, torch.full((1, 3), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_vqa_bce_scaled_by_answer_count():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, generator=g)
    targets = torch.tensor([[1.0, 0.3, 0, 0], [0, 0, 0.6, 0.9], [0, 0, 0, 0]])
    z, y = _np(logits), _np(targets)
    p = _sigmoid(z)
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert VQABCELoss()(logits, targets).item() == pytest.approx(bce.mean() * 4, rel=1e-6)


def test_itm_ce():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.5], [-3.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    want = np.mean([-_log_softmax(_np(logits[i]))[int(labels[i])] for i in range(3)])
    assert ITMLoss()(logits, labels).item() == pytest.approx(want, rel=1e-6)


# ------------------------------------------------------------------------------- layer maps

def test_layer_maps():
    assert resolve_layer_map("uniform", 3, 6) == [(1, 2), (2, 4), (3, 6)]
    assert resolve_layer_map("uniform", 2, 2, include_embeddings=True) == [(0, 0), (1, 1), (2, 2)]
    assert resolve_layer_map("last", 3, 12) == [(3, 12)]
    assert resolve_layer_map([[1, 5], [3, 12]], 3, 12) == [(1, 5), (3, 12)]
    with pytest.raises(ValueError, match="divisible"):
        resolve_layer_map("uniform", 5, 12)
    with pytest.raises(ValueError, match="out of range"):
        resolve_layer_map([[4, 1]], 3, 12)
    with pytest.raises(ValueError, match="out of range"):
        resolve_layer_map([[0, 0]], 3, 12)


# ------------------------------------------------------------------------------- attention

def _attention_mse_reference(s_maps, t_maps, pairs, pair_mask, average):
    per_pair = []
    for s, t in pairs:
        a_s, a_t = _np(s_maps[s - 1]), _np(t_maps[t - 1])
        if average:
            a_s, a_t = a_s.mean(1, keepdims=True), a_t.mean(1, keepdims=True)
        num, den = 0.0, 0
        bsz, heads, length, _ = a_s.shape
        for b in range(bsz):
            for h in range(heads):
                for i in range(length):
                    for j in range(length):
                        if pair_mask[b][i][j]:
                            num += (a_s[b, h, i, j] - a_t[b, h, i, j]) ** 2
                            den += 1
        per_pair.append(num / den)
    return float(np.mean(per_pair))


def _maps(num_layers, heads, bsz=2, length=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.softmax(torch.randn(bsz, heads, length, length, generator=g), -1)
            for _ in range(num_layers)]


@pytest.mark.parametrize("layer_map,pairs", [("uniform", [(1, 2), (2, 4)]), ("last", [(2, 4)]),
                                             ([[1, 1], [2, 3]], [(1, 1), (2, 3)])])
def test_attention_mse_with_padding(layer_map, pairs):
    s_maps, t_maps = _maps(2, 3, seed=1), _maps(4, 3, seed=2)
    token_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    got = AttentionMSELoss(layer_map=layer_map)(s_maps, t_maps, token_mask)
    pm = [[[bool(token_mask[b, i] and token_mask[b, j]) for j in range(5)] for i in range(5)]
          for b in range(2)]
    assert got.item() == pytest.approx(_attention_mse_reference(s_maps, t_maps, pairs, pm, False),
                                       rel=1e-5)


def test_attention_mse_with_a_3d_mask_and_head_average():
    s_maps, t_maps = _maps(2, 2, seed=3), _maps(2, 4, seed=4)
    pm = torch.rand(2, 5, 5, generator=torch.Generator().manual_seed(5)) > 0.4
    with pytest.raises(ValueError, match="head_average"):
        AttentionMSELoss()(s_maps, t_maps, pm)
    got = AttentionMSELoss(head_average=True)(s_maps, t_maps, pm)
    want = _attention_mse_reference(s_maps, t_maps, [(1, 1), (2, 2)], pm.tolist(), True)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_attention_mse_gradient_reaches_only_the_student():
    s_maps = [m.requires_grad_() for m in _maps(1, 2, seed=6)]
    t_maps = [m.requires_grad_() for m in _maps(1, 2, seed=7)]
    AttentionMSELoss()(s_maps, t_maps, torch.ones(2, 5, dtype=torch.bool)).backward()
    assert s_maps[0].grad is not None and s_maps[0].grad.abs().sum() > 0
    assert t_maps[0].grad is None


# ------------------------------------------------------------------------------- InfoNCE

class _RefQueue:
    """Independent FIFO: a plain list of every key ever enqueued."""

    def __init__(self, size):
        self.size, self.history = size, []

    def negatives(self):  # the newest K (order irrelevant for the loss)
        return self.history[-self.size:]

    def ring(self, dim):
        """Where a ring buffer filled sequentially from slot 0 holds each surviving key."""
        ring = np.zeros((self.size, dim))
        for j, k in enumerate(self.history):
            ring[j % self.size] = k
        return ring


def _infonce_reference(q_rows, k_rows, negatives, tau):
    losses = []
    for q, k in zip(q_rows, k_rows):
        logits = [q @ k / tau] + [q @ u / tau for u in negatives]
        losses.append(-_log_softmax(np.array(logits))[0])
    return float(np.mean(losses))


def _normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_hidden_infonce_over_steps_with_wraparound():
    """Token-level InfoNCE over 4 steps with K = 7: losses, negatives and the ring after wrap."""
    torch.manual_seed(0)
    hs, ht, queue_size, tau = 6, 5, 7, 0.1
    loss = HiddenInfoNCELoss(hs, ht, num_student_layers=1, num_teacher_layers=2,
                             layer_map="uniform", queue_size=queue_size, temperature=tau).train()
    ref = _RefQueue(queue_size)
    w = _np(loss.student_proj[0].weight)
    bias = _np(loss.student_proj[0].bias)
    g = torch.Generator().manual_seed(3)
    masks = [torch.tensor([[1, 1, 0], [1, 0, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]),
             torch.tensor([[1, 0, 0], [0, 0, 0]]), torch.tensor([[1, 1, 1], [1, 1, 1]])]
    for step, mask in enumerate(masks):
        s_hidden = [torch.randn(2, 3, hs, generator=g) for _ in range(2)]
        t_hidden = [torch.randn(2, 3, ht, generator=g) for _ in range(3)]
        got = loss(s_hidden, t_hidden, mask.bool())
        q_rows, k_rows = [], []
        for b in range(2):
            for i in range(3):
                if mask[b, i]:
                    q_rows.append(_normalize(w @ _np(s_hidden[1][b, i]) + bias))
                    k_rows.append(_normalize(_np(t_hidden[2][b, i])))  # layer 1 ↔ layer 2
        want = _infonce_reference(q_rows, k_rows, ref.negatives(), tau)
        assert got.item() == pytest.approx(want, rel=1e-5), f"step {step}"
        ref.history.extend(k_rows)
        filled = min(len(ref.history), queue_size)
        assert int(loss.queue.filled) == filled
        assert int(loss.queue.ptr) == len(ref.history) % queue_size
        np.testing.assert_allclose(_np(loss.queue.keys[0, :filled]),
                                   ref.ring(ht)[:filled], rtol=1e-6, atol=1e-7)
    assert len(ref.history) > queue_size  # the ring did wrap


def test_hidden_infonce_two_pairs_linear_teacher_projection_and_grads():
    torch.manual_seed(1)
    loss = HiddenInfoNCELoss(4, 6, 2, 2, layer_map="uniform", proj_dim=3,
                             teacher_projection="linear", queue_size=16, temperature=0.2).train()
    g = torch.Generator().manual_seed(4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    step_inputs = [([torch.randn(2, 3, 4, generator=g) for _ in range(3)],
                    [torch.randn(2, 3, 6, generator=g) for _ in range(3)]) for _ in range(2)]
    refs = [_RefQueue(16), _RefQueue(16)]
    for step, (s_hidden, t_hidden) in enumerate(step_inputs):
        s_hidden = [h.requires_grad_() for h in s_hidden]
        t_hidden = [h.requires_grad_() for h in t_hidden]
        got = loss(s_hidden, t_hidden, mask)
        per_pair, new_keys = [], []
        for p, layer in enumerate([1, 2]):
            ws, bs = _np(loss.student_proj[p].weight), _np(loss.student_proj[p].bias)
            wt, bt = _np(loss.teacher_proj[p].weight), _np(loss.teacher_proj[p].bias)
            q_rows = [_normalize(ws @ _np(s_hidden[layer][b, i]) + bs)
                      for b in range(2) for i in range(3) if mask[b, i]]
            k_rows = [_normalize(wt @ _np(t_hidden[layer][b, i]) + bt)
                      for b in range(2) for i in range(3) if mask[b, i]]
            per_pair.append(_infonce_reference(q_rows, k_rows, refs[p].negatives(), 0.2))
            new_keys.append(k_rows)
        assert got.item() == pytest.approx(np.mean(per_pair), rel=1e-5)
        got.backward()
        assert all(h.grad is None for h in t_hidden)  # teacher network: no gradient
        if step == 0:  # empty queue: only the positive logit, so the loss is log 1 = 0
            assert got.item() == 0.0
        else:
            assert s_hidden[1].grad.abs().sum() > 0 and s_hidden[2].grad.abs().sum() > 0
            assert loss.teacher_proj[0].weight.grad.abs().sum() > 0  # P_t learns via k⁺
        for p in range(2):
            refs[p].history.extend(new_keys[p])
    for p in range(2):
        np.testing.assert_allclose(_np(loss.queue.keys[p, :10]), np.array(refs[p].history),
                                   rtol=1e-5, atol=1e-6)


def test_hidden_infonce_gradients_match_autograd_of_the_plain_formula():
    """The loss computes its gradient in forward; check it against autograd and finite differences."""
    from vlkd.train.losses import _QueueInfoNCE

    g = torch.Generator().manual_seed(12)
    q = torch.nn.functional.normalize(torch.randn(2, 5, 3, generator=g, dtype=torch.float64), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(2, 5, 3, generator=g, dtype=torch.float64), dim=-1)
    u = torch.nn.functional.normalize(torch.randn(2, 4, 3, generator=g, dtype=torch.float64), dim=-1)
    q.requires_grad_()
    k.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: _QueueInfoNCE.apply(a, b, u, 0.3), (q, k))

    # Through the module: student-hidden gradients equal autograd of a plain log-softmax formula.
    torch.manual_seed(4)
    loss = HiddenInfoNCELoss(4, 3, 1, 1, queue_size=8, temperature=0.2,
                             teacher_projection="linear").train()
    loss.queue.enqueue(torch.nn.functional.normalize(torch.randn(6, 1, 3, generator=g), dim=-1).float())
    negatives = loss.queue.valid()[0].clone()
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]]).bool()
    hs = [torch.randn(2, 3, 4, generator=g).float().requires_grad_() for _ in range(2)]
    ht = [torch.randn(2, 3, 3, generator=g).float() for _ in range(2)]
    loss(hs, ht, mask).backward()
    got_hs, got_wt = hs[1].grad.clone(), loss.teacher_proj[0].weight.grad.clone()

    hs_ref = hs[1].detach().clone().requires_grad_()
    wt = loss.teacher_proj[0].weight.detach().clone().requires_grad_()
    qr = torch.nn.functional.normalize(hs_ref[mask] @ loss.student_proj[0].weight.T
                                       + loss.student_proj[0].bias, dim=-1)
    kr = torch.nn.functional.normalize(ht[1][mask] @ wt.T + loss.teacher_proj[0].bias, dim=-1)
    logits = torch.cat([(qr * kr).sum(-1, keepdim=True), qr @ negatives.T], -1) / 0.2
    (-torch.log_softmax(logits, -1)[:, 0]).mean().backward()
    torch.testing.assert_close(got_hs, hs_ref.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_wt, wt.grad, rtol=1e-4, atol=1e-6)


def test_hidden_infonce_mean_pooling():
    torch.manual_seed(2)
    loss = HiddenInfoNCELoss(4, 4, 1, 1, pooling="mean", queue_size=8, temperature=0.5).train()
    g = torch.Generator().manual_seed(5)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]]).bool()
    w, bias = _np(loss.student_proj[0].weight), _np(loss.student_proj[0].bias)
    ref = _RefQueue(8)
    for _ in range(2):
        s_hidden = [torch.randn(3, 3, 4, generator=g) for _ in range(2)]
        t_hidden = [torch.randn(3, 3, 4, generator=g) for _ in range(2)]
        got = loss(s_hidden, t_hidden, mask)
        q_rows, k_rows = [], []
        for b in range(2):  # sample 2 has no valid token
            idx = [i for i in range(3) if mask[b, i]]
            q_rows.append(_normalize(w @ _np(s_hidden[1][b, idx]).mean(0) + bias))
            k_rows.append(_normalize(_np(t_hidden[1][b, idx]).mean(0)))
        assert got.item() == pytest.approx(_infonce_reference(q_rows, k_rows, ref.negatives(), 0.5),
                                           rel=1e-5)
        ref.history.extend(k_rows)
    assert int(loss.queue.filled) == 4


def test_hidden_infonce_eval_mode_does_not_enqueue_and_queue_is_checkpointed():
    loss = HiddenInfoNCELoss(4, 4, 1, 1, queue_size=8)
    h = [torch.randn(1, 2, 4) for _ in range(2)]
    loss.eval()(h, h, torch.ones(1, 2, dtype=torch.bool))
    assert int(loss.queue.filled) == 0
    loss.train()(h, h, torch.ones(1, 2, dtype=torch.bool))
    state = loss.state_dict()
    assert {"queue.keys", "queue.ptr", "queue.filled"} <= set(state)
    other = HiddenInfoNCELoss(4, 4, 1, 1, queue_size=8)
    other.load_state_dict(state)
    assert int(other.queue.filled) == 2 and torch.equal(other.queue.keys, loss.queue.keys)


def test_hidden_infonce_config_errors():
    with pytest.raises(ValueError, match="teacher_projection: linear"):
        HiddenInfoNCELoss(4, 8, 1, 1, proj_dim=3)
    with pytest.raises(ValueError, match="student and teacher model configs"):
        build_loss("hidden_infonce", {}, VLConfig.preset("tiny"), None)


def test_token_queue_longer_than_capacity_keeps_the_newest_in_ring_order():
    q = TokenQueue(size=4, dim=1)
    q.enqueue(torch.arange(3.0).view(3, 1, 1))  # slots 0..2, ptr 3
    q.enqueue(torch.arange(10.0, 16.0).view(6, 1, 1))  # 6 > K: keeps 12..15
    ref = _RefQueue(4)
    ref.history = [[0.0], [1.0], [2.0]] + [[v] for v in range(10, 16)]
    np.testing.assert_array_equal(_np(q.keys[0]), ref.ring(1))
    assert int(q.ptr) == 9 % 4 and int(q.filled) == 4
    with pytest.raises(ValueError, match=r"\(N, 1, 1\)"):
        q.enqueue(torch.zeros(2, 1))


# ------------------------------------------------------------------------------- MSE, logits

def test_hidden_mse_with_projection():
    torch.manual_seed(3)
    loss = HiddenMSELoss(3, 5, 2, 4, layer_map="uniform")
    g = torch.Generator().manual_seed(6)
    s_hidden = [torch.randn(2, 4, 3, generator=g) for _ in range(3)]
    t_hidden = [torch.randn(2, 4, 5, generator=g) for _ in range(5)]
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]).bool()
    per_pair = []
    for p, (s, t) in enumerate([(1, 2), (2, 4)]):
        w, bias = _np(loss.proj[p].weight), _np(loss.proj[p].bias)
        errs = [((w @ _np(s_hidden[s][b, i]) + bias - _np(t_hidden[t][b, i])) ** 2).sum()
                for b in range(2) for i in range(4) if mask[b, i]]
        per_pair.append(sum(errs) / (len(errs) * 5))
    assert loss(s_hidden, t_hidden, mask).item() == pytest.approx(np.mean(per_pair), rel=1e-5)


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_logit_kd_softmax(temp):
    g = torch.Generator().manual_seed(7)
    zs, zt = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    want = 0.0
    for n in range(4):
        lp_s, lp_t = _log_softmax(_np(zs[n]) / temp), _log_softmax(_np(zt[n]) / temp)
        want += (np.exp(lp_t) * (lp_t - lp_s)).sum()
    want = want / 4 * temp ** 2
    assert LogitKDLoss(temperature=temp)(zs, zt).item() == pytest.approx(want, rel=1e-5)


def test_logit_kd_softmax_with_positions_mask():
    g = torch.Generator().manual_seed(8)
    zs, zt = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]]).bool()
    rows = [(b, i) for b in range(2) for i in range(3) if mask[b, i]]
    want = np.mean([(np.exp(_log_softmax(_np(zt[b, i])))
                     * (_log_softmax(_np(zt[b, i])) - _log_softmax(_np(zs[b, i])))).sum()
                    for b, i in rows])
    assert LogitKDLoss()(zs, zt, mask).item() == pytest.approx(want, rel=1e-5)


def test_logit_kd_sigmoid_for_vqa():
    g = torch.Generator().manual_seed(9)
    zs, zt = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    temp = 2.0
    p_t, p_s = _sigmoid(_np(zt) / temp), _sigmoid(_np(zs) / temp)
    bce = -(p_t * np.log(p_s) + (1 - p_t) * np.log(1 - p_s))
    want = bce.mean() * 4 * temp ** 2
    assert LogitKDLoss(temperature=temp, head="vqa")(zs, zt).item() == pytest.approx(want, rel=1e-5)


# ------------------------------------------------------------------------------- combiner

def test_registry_lists_every_loss():
    assert {"masked_token_ce", "vqa_bce", "itm_ce", "attention_mse", "hidden_infonce",
            "hidden_mse", "logit_kd"} <= set(LOSSES)
    with pytest.raises(KeyError, match="registered"):
        build_loss("nope")
    from vlkd.train import losses, model
    assert losses.IGNORE_INDEX == model.IGNORE_INDEX == -100


def _tiny_pair():
    torch.manual_seed(0)
    s_cfg, t_cfg = VLConfig.preset("tiny"), VLConfig.preset("tiny-teacher")
    return VLModel(s_cfg), VLModel(t_cfg).eval()


def _caption_batch(cfg, bsz=2, t=6, r=3):
    g = torch.Generator().manual_seed(11)
    labels = torch.full((bsz, t), -100)
    labels[0, 2], labels[1, 1], labels[1, 3] = 1010, 1020, 1030
    return {
        "input_ids": torch.randint(1000, 2000, (bsz, t), generator=g),
        "region_features": torch.randn(bsz, r, cfg.region_dim, generator=g).half(),
        "region_geometry": torch.rand(bsz, r, cfg.geometry_dim, generator=g),
        "attention_mask": padding_mask(torch.tensor([[1] * t, [1] * (t - 2) + [0, 0]]),
                                       torch.tensor([[1, 1, 0], [1, 1, 1]])),
        "mlm_labels": labels,
    }


def test_combiner_sums_weighted_terms_from_config():
    student, teacher = _tiny_pair()
    cfg = {
        "task": {"type": "masked_token_ce", "weight": 1.0, "params": {"label_smoothing": 0.1}},
        "attention": {"type": "attention_mse", "weight": 2.0},
        "hidden": {"type": "hidden_infonce", "weight": 0.5, "params": {"queue_size": 32}},
        "logits": {"type": "logit_kd", "weight": 0.25, "params": {"temperature": 2.0}},
        "off": {"type": "hidden_mse", "weight": 0.0},
    }
    combiner = LossCombiner.from_config(cfg, student.config, teacher.config)
    assert combiner.needs_teacher
    flags = combiner.output_flags()
    assert flags == {"output_hidden_states": True, "output_attentions": True, "output_scores": False}
    batch = _caption_batch(student.config)
    s_out = student(batch, task="caption", **flags)
    with torch.no_grad():
        t_out = teacher(batch, task="caption", **flags)
    total, terms = combiner.train()(s_out, t_out, batch)
    assert set(terms) == {"task", "attention", "hidden", "logits"}
    assert total.item() == pytest.approx(terms["task"].item() + 2 * terms["attention"].item()
                                         + 0.5 * terms["hidden"].item()
                                         + 0.25 * terms["logits"].item(), rel=1e-6)
    # Each term equals its loss applied to the outputs directly.
    labels = batch["mlm_labels"][batch["mlm_labels"] != -100]
    assert terms["task"].item() == pytest.approx(
        MaskedTokenLoss(0.1)(s_out.mlm_logits, labels).item(), rel=1e-6)
    assert terms["attention"].item() == pytest.approx(
        AttentionMSELoss()(s_out.attentions, t_out.attentions, batch["attention_mask"]).item(), rel=1e-6)
    total.backward()
    assert student.region_embedding.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    assert int(combiner.terms["hidden"].queue.filled) == int(batch["attention_mask"].sum())


def test_combiner_task_only_without_teacher_and_scores_flag():
    student, _ = _tiny_pair()
    task_only = LossCombiner.from_config({"task": {"type": "masked_token_ce"}})
    assert not task_only.needs_teacher
    batch = _caption_batch(student.config)
    out = student(batch, task="mlm", **task_only.output_flags())
    assert out.attentions is None and out.hidden_states is None
    total, terms = task_only(out, None, batch)
    assert list(terms) == ["task"] and total.item() == terms["task"].item()
    scores = LossCombiner({"att": (AttentionMSELoss(target="scores"), 1.0)})
    assert scores.output_flags()["output_scores"]
    with pytest.raises(ValueError, match="teacher"):
        scores(out, None, batch)
    with pytest.raises(KeyError, match="type, weight, params"):
        LossCombiner.from_config({"x": {"type": "itm_ce", "wieght": 1}})


def test_switching_a_terms_type_drops_the_old_types_params():
    """`losses.hidden.type=hidden_mse` (the MSE ablation) must not inherit hidden_infonce's
    queue_size, temperature, proj_dim; the default weight stays; new params apply."""
    from vlkd.train.config import load_config, resolved_losses

    cfg = load_config(None, ["losses.hidden.type=hidden_mse"])
    terms = resolved_losses(cfg, distill=True)
    assert terms["hidden"] == {"type": "hidden_mse", "weight": 1.0}
    assert terms["attention"]["params"]["layer_map"] == "uniform"      # untouched
    cfg = load_config(None, ["losses.hidden.type=hidden_mse",
                             "losses.hidden.params.layer_map=last"])
    assert resolved_losses(cfg, distill=True)["hidden"]["params"] == {"layer_map": "last"}
    # same type: params merge over the defaults
    cfg = load_config(None, ["losses.hidden.params.queue_size=16"])
    p = resolved_losses(cfg, distill=True)["hidden"]["params"]
    assert p["queue_size"] == 16 and p["temperature"] == 0.07
    s, t = VLConfig.preset("tiny"), VLConfig.preset("tiny-teacher")
    comb = LossCombiner.from_config(resolved_losses(load_config(
        None, ["losses.hidden.type=hidden_mse"]), distill=True), s, t)
    assert isinstance(comb.terms["hidden"], HiddenMSELoss)


def test_unknown_loss_params_name_what_the_loss_takes():
    s, t = VLConfig.preset("tiny"), VLConfig.preset("tiny-teacher")
    with pytest.raises(ValueError, match=r"loss 'hidden_mse': unknown params \['queue_size'\]; "
                                         r"it takes \['include_embeddings', 'layer_map', "
                                         r"'projection'\]"):
        build_loss("hidden_mse", {"queue_size": 8}, s, t)
    with pytest.raises(ValueError, match="unknown params \\['student_dim'\\]"):
        build_loss("hidden_mse", {"student_dim": 8}, s, t)


def test_logit_kd_refuses_label_lists_that_differ_naming_the_first_difference():
    from vlkd.train.losses import LogitKDLoss

    vqa = LogitKDLoss(head="vqa")
    answers = ["yes", "no", "2", "red"]
    vqa.check_labels({"vqa": answers}, {"vqa": list(answers)})          # identical: accepted
    with pytest.raises(ValueError, match=r"index 1 is 'no' for the student and '2' for the "
                                         r"teacher"):
        vqa.check_labels({"vqa": answers}, {"vqa": ["yes", "2", "no", "red"]})
    with pytest.raises(ValueError, match=r"the student has 4 entries and the teacher 5 \(the "
                                         r"teacher's index 4 is 'blue'\)"):
        vqa.check_labels({"vqa": answers}, {"vqa": answers + ["blue"]})
    with pytest.raises(ValueError, match="teacher's answer list is unknown.*answers.txt"):
        vqa.check_labels({"vqa": answers}, {"vqa": None})
    mlm = LogitKDLoss(head="mlm")
    with pytest.raises(ValueError, match=r"vocabulary \(tokens by id\) differ.*index 2 is "
                                         r"'\[CLS\]' for the student and 'a' for the teacher"):
        mlm.check_labels({"mlm": ["[PAD]", "[UNK]", "[CLS]"]}, {"mlm": ["[PAD]", "[UNK]", "a"]})


def test_every_registered_loss_lists_its_params_and_defaults():
    import inspect

    from vlkd.train.losses import FROM_MODEL_CONFIGS, LOSSES, describe_losses, loss_params

    listed = {d["name"]: d for d in describe_losses()}
    assert list(listed) == LOSSES.names()
    for name in LOSSES.names():
        sig = inspect.signature(LOSSES.get(name).__init__).parameters
        want = {k: None if p.default is p.empty else p.default for k, p in sig.items()
                if k != "self" and k not in FROM_MODEL_CONFIGS
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        assert {p.name: p.default for p in loss_params(name)} == want, name
    hidden = {p.name: p for p in listed["hidden_infonce"]["params"]}
    assert hidden["queue_size"].default == 4096 and hidden["queue_size"].help == "K."
    assert hidden["temperature"].default == 0.07 and hidden["temperature"].help == "τ."
    assert listed["logit_kd"]["needs_teacher"] and not listed["vqa_bce"]["needs_teacher"]
