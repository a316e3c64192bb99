"""FIFO queue of past teacher token vectors: the negatives of the hidden-state InfoNCE loss.

Like MoCo's queue (``facebookresearch/moco``, ``builder.py``): the state lives in registered
buffers, so it is saved with the loss module's ``state_dict`` and a resumed run continues with
the same negatives; the update is a ``@torch.no_grad()`` method. Unlike MoCo, every rank
contributes a *different* number of vectors per step (each sample has its own number of
valid tokens), so the DDP gather first exchanges the counts.

A queue holds ``num_banks`` parallel banks (one per distilled layer pair) that advance together:
every step enqueues the same tokens' vectors in every bank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["TokenQueue", "gather_variable_rows"]


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


class TokenQueue(nn.Module):
    """``num_banks`` FIFO queues of ``size`` vectors of width ``dim``.

    Buffers (checkpointed): ``keys`` (num_banks, size, dim) float32, ``ptr`` (next slot to
    write), ``filled`` (how many slots hold real vectors; slots ``0..filled-1`` are valid since
    writing starts at slot 0).

    Args:
        size: K, vectors per bank.
        dim: d, vector width.
        num_banks: P, parallel banks.
    """

    def __init__(self, size: int, dim: int, num_banks: int = 1):
        super().__init__()
        if size <= 0 or dim <= 0 or num_banks <= 0:
            raise ValueError(f"TokenQueue: size, dim and num_banks must be positive, got "
                             f"{size}, {dim}, {num_banks}")
        self.size, self.dim, self.num_banks = size, dim, num_banks
        self.register_buffer("keys", torch.zeros(num_banks, size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def valid(self) -> torch.Tensor:
        """(num_banks, filled, dim) the vectors enqueued so far (at most K per bank)."""
        return self.keys[:, : int(self.filled)]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, gather: bool = True) -> None:
        """Appends vectors, overwriting the oldest ones once the queue is full.

        Args:
            keys: (N, num_banks, dim) this rank's vectors, row n of every bank from the same
                token. Detached here; no gradient flows into the queue.
            gather: Gather the rows of every DDP rank first (rank order), so that all ranks
                keep identical queues.
        """
        if keys.dim() != 3 or keys.shape[1:] != (self.num_banks, self.dim):
            raise ValueError(f"TokenQueue.enqueue: keys must be (N, {self.num_banks}, "
                             f"{self.dim}), got {tuple(keys.shape)}")
        if gather:
            keys = gather_variable_rows(keys)
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
        return f"size={self.size}, dim={self.dim}, num_banks={self.num_banks}"
