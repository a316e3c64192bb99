"""FIFO queue of past teacher token vectors: the negatives of the hidden-state InfoNCE loss.

Like MoCo's queue (``facebookresearch/moco``, ``builder.py``): the state lives in registered
buffers, so it is saved with the loss module's ``state_dict`` and a resumed run continues with
the same negatives; the update is a ``@torch.no_grad()`` method. Unlike MoCo, every rank
contributes a *different* number of vectors per step (each sample has its own number of
valid tokens), so the DDP gather first exchanges the counts.

A queue holds ``num_banks`` parallel banks (one per distilled layer pair) that advance together:
every step enqueues the same tokens' vectors in every bank.

Per-step subsampling (``per_step``): a real step has far more tokens than K (64 samples × ~120
tokens × 4 ranks ≈ 30k against K = 4096), and writing all of them would leave only the newest K
rows of the last step in the queue, the last few samples of the highest rank. With ``per_step =
n`` every rank first draws its share of n rows (``n // world``, one more on the first ``n %
world`` ranks; all of its rows when it has fewer) uniformly without replacement, so the queue
holds the last ~K/n steps of every rank. The draw of rank r at the queue's enqueue number s is
the first ``quota`` entries, sorted, of ``numpy.random.default_rng([seed, s, r]).permutation(N_r)``:
a function of the seed and of the ``enqueues`` counter, which is a checkpointed buffer, so a
resumed run draws the same tokens, on any device.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = ["TokenQueue", "gather_variable_rows", "enqueue_quota"]


@torch.no_grad()
def gather_variable_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenates ``x`` from every rank, in rank order, when ranks hold different row counts.

    All ranks all-gather their row counts, pad their rows to the largest count, all-gather the
    padded tensors and drop the padding. Carries no gradient (the result is detached): it
    feeds only the queue of negatives. Outside an initialised process group it returns ``x``.

    Args:
        x: (N_rank, ...) rows of this rank; every rank must pass the same trailing shape and
            dtype (N_rank may be 0).

    Returns:
        (sum of N_rank, ...) the rows of rank 0, then rank 1, ...
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x.detach()
    world = dist.get_world_size()
    x = x.detach().contiguous()
    count = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    longest = max(sizes)
    if longest == 0:
        return x
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)], dim=0)


def enqueue_quota(total: int, world: int, rank: int) -> int:
    """Rows rank ``rank`` of ``world`` contributes to a step's ``total``: ``total // world``,
    one more on the first ``total % world`` ranks (the quotas sum to ``total``)."""
    return total // world + (1 if rank < total % world else 0)


class TokenQueue(nn.Module):
    """``num_banks`` FIFO queues of ``size`` vectors of width ``dim``.

    Buffers (checkpointed): ``keys`` (num_banks, size, dim) float32, ``ptr`` (next slot to
    write), ``filled`` (how many slots hold real vectors; slots ``0..filled-1`` are valid since
    writing starts at slot 0), ``enqueues`` (enqueue calls so far: the subsampling's step
    number, the same on every rank).

    Args:
        size: K, vectors per bank.
        dim: d, vector width.
        num_banks: P, parallel banks.
        per_step: n, rows kept per enqueue over all ranks (capped at K), drawn evenly from the
            ranks (see the module docstring); None keeps every row.
        seed: Seed of the subsampling draws.
    """

    def __init__(self, size: int, dim: int, num_banks: int = 1, per_step: int | None = None,
                 seed: int = 0):
        super().__init__()
        if size <= 0 or dim <= 0 or num_banks <= 0:
            raise ValueError(f"TokenQueue: size, dim and num_banks must be positive, got "
                             f"{size}, {dim}, {num_banks}")
        if per_step is not None and per_step <= 0:
            raise ValueError(f"TokenQueue: per_step must be positive or None (every row), got "
                             f"{per_step}")
        if seed < 0:
            raise ValueError(f"TokenQueue: seed must be >= 0, got {seed}")
        self.size, self.dim, self.num_banks = size, dim, num_banks
        self.per_step, self.seed = per_step, int(seed)
        self.register_buffer("keys", torch.zeros(num_banks, size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("enqueues", torch.zeros((), dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the counter existed resume with it at 0.
        state_dict.setdefault(prefix + "enqueues", torch.zeros((), dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def valid(self) -> torch.Tensor:
        """(num_banks, filled, dim) the vectors enqueued so far (at most K per bank)."""
        return self.keys[:, : int(self.filled)]

    def select(self, n: int, rank: int = 0, world: int = 1) -> torch.Tensor | None:
        """The rows of rank ``rank``'s ``n`` that the next enqueue keeps (sorted), or None for
        all of them (no ``per_step``, or ``n`` within the rank's quota). Draws nothing else."""
        if self.per_step is None:
            return None
        quota = enqueue_quota(min(self.per_step, self.size), world, rank)
        if n <= quota:
            return None
        perm = np.random.default_rng([self.seed, int(self.enqueues), rank]).permutation(n)
        return torch.from_numpy(np.sort(perm[:quota]))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, gather: bool = True) -> None:
        """Appends vectors (this rank's share of ``per_step`` of them), overwriting the oldest
        ones once the queue is full.

        Args:
            keys: (N, num_banks, dim) this rank's vectors, row n of every bank from the same
                token. Detached here; no gradient flows into the queue.
            gather: Gather the rows of every DDP rank first (rank order), so that all ranks
                keep identical queues; every rank must call it at every step.
        """
        self._check(keys)
        rank, world = 0, 1
        if gather and dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        idx = self.select(keys.shape[0], rank, world)
        if idx is not None:
            keys = keys[idx.to(keys.device)]
        if gather:
            keys = gather_variable_rows(keys)
        self._write(keys)

    @torch.no_grad()
    def enqueue_from_ranks(self, keys_per_rank: Sequence[torch.Tensor]) -> None:
        """What :meth:`enqueue` does on every rank of a world of ``len(keys_per_rank)``
        processes, in one process (benchmarks and tests of the queue's content).

        Args:
            keys_per_rank: (N_r, num_banks, dim) the vectors of rank r, in rank order.
        """
        world, kept = len(keys_per_rank), []
        for rank, keys in enumerate(keys_per_rank):
            self._check(keys)
            idx = self.select(keys.shape[0], rank, world)
            kept.append(keys if idx is None else keys[idx.to(keys.device)])
        self._write(torch.cat(kept))

    def _check(self, keys: torch.Tensor) -> None:
        if keys.dim() != 3 or keys.shape[1:] != (self.num_banks, self.dim):
            raise ValueError(f"TokenQueue.enqueue: keys must be (N, {self.num_banks}, "
                             f"{self.dim}), got {tuple(keys.shape)}")

    def _write(self, keys: torch.Tensor) -> None:
        self.enqueues.add_(1)
        keys = keys.detach().to(self.keys.dtype)
        n = keys.shape[0]
        if n == 0:
            return
        ptr = int(self.ptr)
        if n > self.size:
            # Only the newest K survive; writing them where a sequential write would have put
            # them keeps the ring order identical to enqueuing the N rows one by one.
            ptr = (ptr + n - self.size) % self.size
            keys, n = keys[-self.size:], self.size
        slots = (ptr + torch.arange(n, device=self.keys.device)) % self.size
        self.keys[:, slots] = keys.transpose(0, 1)
        self.ptr.fill_((ptr + n) % self.size)
        self.filled.fill_(min(int(self.filled) + n, self.size))

    def extra_repr(self) -> str:
        return (f"size={self.size}, dim={self.dim}, num_banks={self.num_banks}, "
                f"per_step={self.per_step}")
