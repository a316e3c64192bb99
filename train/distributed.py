"""Where a process runs: ``torchrun`` (DDP) setup and teardown, barriers, seeding, AMP dtype,
and how every rank stops together on SIGTERM / SIGINT.

Under ``torchrun`` (env://) the process group is nccl on GPUs and gloo on CPU; without it a run
is one process of world size 1 and every collective here is a no-op.

Stopping (preemption): :class:`TrainStopSignals` turns SIGTERM / SIGINT into a request that
only sets a flag (:mod:`vlkd.common.preemption`). A batch system may signal one node, or one
rank, before the others, so the trainer never acts on its own flag: once per optimizer step it
calls :func:`agree_stop`, one all-reduce (MAX) of the local signal number, and every rank stops
at the same step boundary with the same signal. :func:`quiet_children` keeps the processes
forked meanwhile (DataLoader workers, which receive the batch system's signal too when it goes
to the whole process group) from dying before the trainer has shut them down.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from vlkd.common.preemption import StopSignals

log = logging.getLogger(__name__)

__all__ = ["DistEnv", "setup_distributed", "teardown_distributed", "barrier", "seed_everything",
           "amp_dtype", "TrainStopSignals", "agree_stop", "quiet_children", "under_torchrun"]


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


# --------------------------------------------------------------------------------------------
# Stopping on SIGTERM / SIGINT
# --------------------------------------------------------------------------------------------

def under_torchrun() -> bool:
    """Whether this process is a worker started by ``torchrun`` (its elastic agent)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


class TrainStopSignals(StopSignals):
    """:class:`~vlkd.common.preemption.StopSignals` for training.

    Under ``torchrun`` a second SIGINT is not an "exit now": torchrun forwards the signals it
    gets to every rank, so a Ctrl-C in the terminal reaches a rank twice (from the terminal's
    process group, then from torchrun) within milliseconds. There, repeated signals only keep
    the first request; elsewhere a second Ctrl-C raises ``KeyboardInterrupt`` at once.
    """

    def __init__(self, keep_on_exit: bool = False):
        super().__init__(second_sigint_stops_now=lambda: not under_torchrun(),
                         keep_on_exit=keep_on_exit)


def agree_stop(local_signum: int | None, env: DistEnv) -> int:
    """The stop signal all ranks agree on at this step boundary (0: go on); a collective.

    One all-reduce (MAX) of each rank's signal number (0 when it got none), so a signal that
    reached any rank stops every rank at the same step, and every rank exits with the same
    status (SIGTERM, 15, wins over SIGINT, 2).
    """
    value = int(local_signum or 0)
    if not env.distributed:
        return value
    flag = torch.tensor([value], dtype=torch.int64, device=env.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
_quiet = threading.local()  # .depth: nested quiet_children; .saved: masks to restore after fork


def _block_before_fork() -> None:
    if getattr(_quiet, "depth", 0):
        _quiet.saved = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)


def _restore_after_fork() -> None:
    saved = getattr(_quiet, "saved", None)
    if saved is not None:
        _quiet.saved = None
        signal.pthread_sigmask(signal.SIG_SETMASK, saved)


def _child_after_fork() -> None:
    _quiet.saved, _quiet.depth = None, 0  # the child keeps the blocked mask


os.register_at_fork(before=_block_before_fork, after_in_parent=_restore_after_fork,
                    after_in_child=_child_after_fork)


@contextlib.contextmanager
def quiet_children() -> Iterator[None]:
    """Processes forked inside start with SIGTERM and SIGINT blocked.

    SLURM signals every process of a job step, and Ctrl-C every process of the terminal's
    process group: DataLoader workers too. PyTorch's worker handler then kills a worker
    (``DataLoader worker (pid …) is killed by signal: Terminated`` in the main process) before
    the trainer reaches its step boundary. The mask is inherited through ``fork`` (set around
    each ``os.fork`` by an ``os.register_at_fork`` hook, restored in the parent at once), so
    there is no window before a worker could install a handler; the workers stay until the
    trainer shuts its loader down (or, if the main process is killed, until PyTorch's watchdog
    sees it gone, within 5 s). Processes started by ``subprocess`` are not affected.
    """
    _quiet.depth = getattr(_quiet, "depth", 0) + 1
    try:
        yield
    finally:
        _quiet.depth -= 1
