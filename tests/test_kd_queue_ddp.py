"""The InfoNCE queue under real DDP: two gloo processes with different token counts per rank."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
# Rows each rank enqueues at each step: unequal, and one rank has none at step 1.
COUNTS = {0: [3, 0, 4], 1: [5, 2, 1]}
K, DIM, BANKS = 6, 2, 2


def _rows(rank: int, step: int, n: int) -> torch.Tensor:
    """(n, BANKS, DIM) distinct values that name their origin: rank·1000 + step·100 + row."""
    base = rank * 1000 + step * 100 + torch.arange(n, dtype=torch.float32)
    return torch.stack([torch.stack([base + 10 * b, -base - 10 * b], -1) for b in range(BANKS)], 1)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from vlkd.train.kd_queue import TokenQueue, gather_variable_rows
        from vlkd.train.losses import HiddenInfoNCELoss

        result: dict[str, object] = {"gathered": [], "queue": []}
        queue = TokenQueue(K, DIM, BANKS)
        for step, n in enumerate(COUNTS[rank]):
            rows = _rows(rank, step, n)
            result["gathered"].append(gather_variable_rows(rows).clone())
            queue.enqueue(rows)
            result["queue"].append((queue.keys.clone(), int(queue.ptr), int(queue.filled)))

        # The loss enqueues its teacher keys the same way: 2 valid tokens on rank 0, 5 on rank 1.
        torch.manual_seed(0)  # same projections on both ranks, as DDP would broadcast them
        loss = HiddenInfoNCELoss(3, 3, 1, 1, queue_size=16).train()
        g = torch.Generator().manual_seed(10 + rank)
        mask = torch.zeros(2, 4, dtype=torch.bool)
        mask.view(-1)[: 2 if rank == 0 else 5] = True
        teacher = [torch.randn(2, 4, 3, generator=g) for _ in range(2)]
        student = [torch.randn(2, 4, 3, generator=g, requires_grad=True) for _ in range(2)]
        loss(student, teacher, mask).backward()
        result["loss_keys"] = torch.nn.functional.normalize(teacher[1][mask], dim=-1)
        result["loss_queue"] = (loss.queue.keys[0].clone(), int(loss.queue.filled))
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gathered_enqueue_with_different_token_counts(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "pg_init"), str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    history: list[np.ndarray] = []  # independent FIFO: every row ever gathered, in order
    for step in range(3):
        expected = torch.cat([_rows(r, step, COUNTS[r][step]) for r in range(WORLD)])
        for r in range(WORLD):
            assert torch.equal(res[r]["gathered"][step], expected), (r, step)
        history.extend(expected.numpy())
        ring = np.zeros((K, BANKS, DIM), dtype=np.float32)
        for j, row in enumerate(history):
            ring[j % K] = row
        filled = min(len(history), K)
        for r in range(WORLD):
            keys, ptr, got_filled = res[r]["queue"][step]
            assert (ptr, got_filled) == (len(history) % K, filled), (r, step)
            np.testing.assert_array_equal(keys.transpose(0, 1).numpy()[:filled], ring[:filled])
    assert len(history) == 15 > K  # wrapped twice

    # Inside the loss: both ranks hold rank 0's 2 keys then rank 1's 5 keys.
    want = torch.cat([res[0]["loss_keys"], res[1]["loss_keys"]])
    for r in range(WORLD):
        keys, filled = res[r]["loss_queue"]
        assert filled == 7
        torch.testing.assert_close(keys[:7], want)
