"""Where a process runs: ``torchrun`` (DDP) setup and teardown, barriers, seeding, AMP dtype.

Under ``torchrun`` (env://) the process group is nccl on GPUs and gloo on CPU; without it a run
is one process of world size 1 and every collective here is a no-op.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

__all__ = ["DistEnv", "setup_distributed", "teardown_distributed", "barrier", "seed_everything",
           "amp_dtype"]


@dataclass
class DistEnv:
    """Where this process runs."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> DistEnv:
    """Initialises torch.distributed under ``torchrun`` (env://): nccl with CUDA, else gloo.

    Args:
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available; use train.device=cpu")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank, world, local, dev, owns)


def teardown_distributed(env: DistEnv) -> None:
    """Destroys the process group if :func:`setup_distributed` created it."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    """Waits for every rank (a no-op in a single process)."""
    if env.distributed:
        dist.barrier()


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` on ``device`` (None: full precision)."""
    if device.type != "cuda" or amp == "none":
        if amp in ("bf16", "fp16") and device.type != "cuda":
            log.warning("train.amp=%s ignored on %s: AMP runs on CUDA only", amp, device)
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp not in ("bf16", "fp16"):
        raise ValueError(f"train.amp must be auto, bf16, fp16 or none, got {amp!r}")
    return torch.bfloat16 if amp == "bf16" else torch.float16
