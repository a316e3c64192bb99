"""The KD queue's per-step subsampling (``enqueue_per_step``): which tokens of which steps and
ranks the queue holds, under real DDP (two gloo processes), checked against a table worked out
by hand, and resumed from a state dict mid-way."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlkd.train.kd_queue import TokenQueue, enqueue_quota

WORLD = 2
K, PER_STEP, SEED, DIM, BANKS = 12, 4, 7, 3, 2
# Tokens each rank has at each step (a step's quota is PER_STEP // WORLD = 2 per rank): rank 0
# has a single token at step 2, rank 1 none at step 1 and exactly its quota at step 5.
COUNTS = {0: [5, 3, 1, 6, 2, 4], 1: [4, 0, 7, 3, 5, 2]}
STEPS = len(COUNTS[0])
RESUME_AT = 3  # the second run loads the state dict written after step 2

# By hand: rows kept per (step, rank) = min(count, 2), i.e. 4, 2, 3, 4, 4, 4 rows per step. The
# ring of K = 12 fills up at step 3 (13 rows: step 0's first rank-0 row goes), step 4 evicts the
# rest of step 0 and one row of step 1, step 5 the rest of steps 1 and 2.
EXPECTED = [  # after step s: (filled, ptr, {(step, rank): rows in the queue})
    (4, 4, {(0, 0): 2, (0, 1): 2}),
    (6, 6, {(0, 0): 2, (0, 1): 2, (1, 0): 2}),
    (9, 9, {(0, 0): 2, (0, 1): 2, (1, 0): 2, (2, 0): 1, (2, 1): 2}),
    (12, 1, {(0, 0): 1, (0, 1): 2, (1, 0): 2, (2, 0): 1, (2, 1): 2, (3, 0): 2, (3, 1): 2}),
    (12, 5, {(1, 0): 1, (2, 0): 1, (2, 1): 2, (3, 0): 2, (3, 1): 2, (4, 0): 2, (4, 1): 2}),
    (12, 9, {(3, 0): 2, (3, 1): 2, (4, 0): 2, (4, 1): 2, (5, 0): 2, (5, 1): 2}),
]


def _rows(rank: int, step: int, n: int) -> torch.Tensor:
    """(n, BANKS, DIM) rows that name their origin: value rank·1000 + step·100 + row (+10·bank)."""
    base = rank * 1000 + step * 100 + torch.arange(n, dtype=torch.float32)
    return torch.stack([torch.stack([base + 10 * b] * DIM, -1) for b in range(BANKS)], 1)


def _origin(value: float) -> tuple[int, int, int]:
    v = int(round(value))
    return v // 1000, (v % 1000) // 100, v % 100  # rank, step, row


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        states, resumed = [], None
        queue = TokenQueue(K, DIM, BANKS, per_step=PER_STEP, seed=SEED)
        for step in range(STEPS):
            if step == RESUME_AT:  # a resumed run: a fresh queue loads the checkpointed state
                resumed = TokenQueue(K, DIM, BANKS, per_step=PER_STEP, seed=SEED)
                resumed.load_state_dict({k: v.clone() for k, v in queue.state_dict().items()})
            rows = _rows(rank, step, COUNTS[rank][step])
            queue.enqueue(rows)
            if resumed is not None:
                resumed.enqueue(rows)
            states.append({k: v.clone() for k, v in queue.state_dict().items()})
        torch.save({"states": states, "resumed": resumed.state_dict()},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("kdq")
    mp.spawn(_worker, args=(str(out / "pg_init"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_queue_holds_the_last_steps_of_every_rank(ddp_run):
    for step, (filled, ptr, table) in enumerate(EXPECTED):
        ref = ddp_run[0]["states"][step]
        for r in range(WORLD):  # every rank keeps the same queue
            st = ddp_run[r]["states"][step]
            assert all(torch.equal(st[k], ref[k]) for k in ref), (r, step)
        assert (int(ref["filled"]), int(ref["ptr"]), int(ref["enqueues"])) == (filled, ptr,
                                                                               step + 1)
        origins = [_origin(v) for v in ref["keys"][0, :filled, 0].tolist()]
        assert Counter((s, r) for r, s, _ in origins) == Counter(table), step
        # every bank holds the same tokens, row for row
        np.testing.assert_array_equal(ref["keys"][1, :filled], ref["keys"][0, :filled] + 10)


def test_draws_follow_the_documented_rule(ddp_run):
    """Within (step, rank): the first `quota` of default_rng([seed, step, rank]).permutation(N),
    sorted; all rows when N is within the quota. Slots are written in rank order, then ring order."""
    history = []
    for step in range(STEPS):
        for rank in range(WORLD):
            n, quota = COUNTS[rank][step], enqueue_quota(PER_STEP, WORLD, rank)
            rows = (range(n) if n <= quota else
                    np.sort(np.random.default_rng([SEED, step, rank]).permutation(n)[:quota]))
            history.extend(rank * 1000 + step * 100 + int(i) for i in rows)
    final = ddp_run[0]["states"][-1]
    ring = np.zeros(K)
    for j, v in enumerate(history):
        ring[j % K] = v
    np.testing.assert_array_equal(final["keys"][0, :, 0].numpy(), ring)
    assert int(final["ptr"]) == len(history) % K == 9


def test_a_resumed_queue_draws_the_same_tokens(ddp_run):
    for r in range(WORLD):
        final, resumed = ddp_run[r]["states"][-1], ddp_run[r]["resumed"]
        assert all(torch.equal(final[k], resumed[k]) for k in final)


def test_one_process_simulation_equals_the_ddp_run(ddp_run):
    """`enqueue_from_ranks` (what benchmarks/kd_queue_content.py uses) is the DDP queue."""
    q = TokenQueue(K, DIM, BANKS, per_step=PER_STEP, seed=SEED)
    for step in range(STEPS):
        q.enqueue_from_ranks([_rows(r, step, COUNTS[r][step]) for r in range(WORLD)])
    final = ddp_run[0]["states"][-1]
    assert all(torch.equal(q.state_dict()[k], final[k]) for k in final)


def test_without_subsampling_one_big_step_fills_the_queue_from_the_last_rank():
    """The behaviour before enqueue_per_step (per_step=None): a step of more than K rows leaves
    only its newest K, the last rows of the highest rank."""
    q = TokenQueue(K, DIM, BANKS)
    q.enqueue_from_ranks([_rows(0, 0, 9), _rows(1, 0, 9)])
    origins = [_origin(v) for v in q.keys[0, :, 0].tolist()]
    assert Counter(r for r, _, _ in origins) == {0: 3, 1: 9}
    sub = TokenQueue(K, DIM, BANKS, per_step=K, seed=SEED)
    sub.enqueue_from_ranks([_rows(0, 0, 9), _rows(1, 0, 9)])
    assert Counter(_origin(v)[0] for v in sub.keys[0, :, 0].tolist()) == {0: 6, 1: 6}


def test_quota_splits_evenly_and_caps_at_the_queue_size():
    assert [enqueue_quota(10, 4, r) for r in range(4)] == [3, 3, 2, 2]
    assert sum(enqueue_quota(4096, 3, r) for r in range(3)) == 4096
    q = TokenQueue(8, 1, per_step=256, seed=0)  # per_step > K: a step keeps K rows
    assert q.select(100, 0, 2).numel() == 4 and q.select(4, 1, 2) is None
    with pytest.raises(ValueError, match="per_step must be positive"):
        TokenQueue(8, 1, per_step=0)


def test_old_checkpoints_without_the_counter_still_load():
    q = TokenQueue(8, 2, per_step=4)
    state = {k: v for k, v in q.state_dict().items() if k != "enqueues"}
    other = TokenQueue(8, 2, per_step=4)
    other.load_state_dict(state)
    assert int(other.enqueues) == 0


def test_hidden_infonce_passes_its_params_to_the_queue():
    from vlkd.train.losses import HiddenInfoNCELoss

    torch.manual_seed(123)
    loss = HiddenInfoNCELoss(4, 4, 1, 1, queue_size=32, enqueue_per_step=5).train()
    assert (loss.queue.per_step, loss.queue.seed) == (5, 123)  # default seed: the run's seed
    mask = torch.ones(2, 6, dtype=torch.bool)
    hs = [torch.randn(2, 6, 4) for _ in range(2)]
    loss(hs, [h.clone() for h in hs], mask)
    assert int(loss.queue.filled) == 5 and int(loss.queue.enqueues) == 1
    assert "queue.enqueues" in loss.state_dict()
    every = HiddenInfoNCELoss(4, 4, 1, 1, queue_size=32, enqueue_per_step=None,
                              enqueue_seed=3).train()
    every(hs, [h.clone() for h in hs], mask)
    assert int(every.queue.filled) == 12 and every.queue.seed == 3
