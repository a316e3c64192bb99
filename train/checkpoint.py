"""Checkpoint directories (pickle-free): what they hold, how they are written and read.

A checkpoint is ``<run_dir>/checkpoints/step-XXXXXXXX/``::

    model/                          a complete model directory (weights, tokenizer, metadata)
    losses.safetensors              the loss module's state (projections, the KD queue)
    optimizer.safetensors           AdamW's per-parameter tensors (exp_avg, exp_avg_sq, step)
    trainer_state.json              data position (step, epoch, batch_in_epoch), the data layout
                                    it is valid for, the optimizer's hyper-parameters and the
                                    metadata of its tensors, scheduler, AMP scaler, best, the
                                    metric sums of the unfinished logging interval, whether an
                                    evaluation of this step is still due, config
    rng-rank<r>.safetensors/.json   every rank's RNG states (torch, CUDA, NumPy, Python)

Tensors are safetensors, everything else JSON. A checkpoint is written to a temporary directory
and renamed when complete, so a kill during a save leaves the previous one intact.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from .distributed import DistEnv, barrier

__all__ = ["CHECKPOINT_DIR", "STATE_NAME", "ResumeError", "optimizer_to_files",
           "optimizer_from_files", "rng_to_files", "rng_from_files", "find_checkpoint",
           "latest_checkpoint", "write_checkpoint", "write_best", "read_state", "load_checkpoint",
           "restore_rng"]

CHECKPOINT_DIR = "checkpoints"
STATE_NAME = "trainer_state.json"


class ResumeError(RuntimeError):
    """A checkpoint cannot continue this run (missing, or different data layout)."""


# --------------------------------------------------------------------------------------------
# Optimizer and RNG state as safetensors + JSON
# --------------------------------------------------------------------------------------------

def optimizer_to_files(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state dict as (tensors ``"<param id>.<key>"``, JSON-ready metadata)."""
    sd = opt.state_dict()
    tensors, state_meta = {}, {}
    for pid, st in sd["state"].items():
        meta = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                meta[k] = v
        state_meta[str(pid)] = meta
    return tensors, {"param_groups": sd["param_groups"], "state_meta": state_meta,
                     "state_keys": {str(pid): sorted(st) for pid, st in sd["state"].items()}}


def optimizer_from_files(tensors: Mapping[str, torch.Tensor], meta: dict) -> dict:
    """The state dict :func:`optimizer_to_files` split (for ``optimizer.load_state_dict``)."""
    state = {}
    for pid, keys in meta["state_keys"].items():
        st = dict(meta["state_meta"].get(pid, {}))
        for k in keys:
            if f"{pid}.{k}" in tensors:
                st[k] = tensors[f"{pid}.{k}"]
        state[int(pid)] = st
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def rng_to_files(device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """This process's RNG states (torch CPU, CUDA on ``device``, NumPy, Python)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["torch_cuda"] = torch.cuda.get_rng_state(device)
    np_state = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    py = random.getstate()
    meta = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py[0], list(py[1]), py[2]]}
    return tensors, meta


def rng_from_files(tensors: Mapping[str, torch.Tensor], meta: dict, device: torch.device) -> None:
    """Restores what :func:`rng_to_files` saved."""
    torch.set_rng_state(tensors["torch_cpu"])
    if device.type == "cuda" and "torch_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["torch_cuda"], device)
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss,
                         cached))
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def write_checkpoint(run_dir: str | os.PathLike, step: int, env: DistEnv, *,
                     save_model: Callable[[Path], None], losses: Mapping[str, torch.Tensor],
                     optimizer: torch.optim.Optimizer, state: dict, keep: int = 2) -> Path:
    """Writes ``checkpoints/step-XXXXXXXX`` atomically (temp dir + rename); every rank calls it.

    Every rank writes its RNG state; rank 0 writes the rest and keeps the ``keep`` most recent
    checkpoints.

    Args:
        run_dir: The run directory.
        step: The optimizer step the checkpoint is taken after.
        env: Process placement.
        save_model: ``directory -> None`` writing a complete model directory.
        losses: The loss module's state dict.
        optimizer: Its tensors go to ``optimizer.safetensors``, the rest to the state file.
        state: The JSON-ready trainer state (``step``, ``epoch``, ``batch_in_epoch``, ``data``...).
        keep: Checkpoints kept, this one included.

    Returns:
        The checkpoint directory.
    """
    from safetensors.torch import save_file

    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(env)
    rng_t, rng_meta = rng_to_files(env.device)
    save_file(rng_t, str(tmp / f"rng-rank{env.rank}.safetensors"))
    (tmp / f"rng-rank{env.rank}.json").write_text(json.dumps(rng_meta))
    barrier(env)
    if env.is_main:
        save_model(tmp / "model")
        save_file({k: v.detach().cpu().contiguous() for k, v in losses.items()},
                  str(tmp / "losses.safetensors"))
        opt_t, opt_meta = optimizer_to_files(optimizer)
        save_file(opt_t, str(tmp / "optimizer.safetensors"))
        (tmp / STATE_NAME).write_text(json.dumps({**state, "optimizer": opt_meta}, indent=1))
        _replace_dir(tmp, final)
        olds = sorted(p for p in root.glob("step-*") if p != final)
        for old in olds[:max(0, len(olds) - (max(1, keep) - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(env)
    return final


def write_best(run_dir: str | os.PathLike, env: DistEnv, save_model: Callable[[Path], None],
               best: dict) -> None:
    """Replaces ``<run_dir>/best/`` with the current model and ``best.json`` (rank 0 writes)."""
    run_dir = Path(run_dir)
    if env.is_main:
        tmp = run_dir / ".tmp-best"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(tmp)
        (tmp / "best.json").write_text(json.dumps(best, indent=1) + "\n")
        _replace_dir(tmp, run_dir / "best")
    barrier(env)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory: ``path`` itself, or the latest one of a run directory."""
    path = Path(path)
    if (path / STATE_NAME).is_file():
        return path
    root = path / CHECKPOINT_DIR
    steps = sorted(root.glob("step-*")) if root.is_dir() else []
    steps = [s for s in steps if (s / STATE_NAME).is_file()]
    if not steps:
        raise ResumeError(f"no checkpoint to resume from in {path}: expected a checkpoint "
                          f"directory (with {STATE_NAME}) or a run directory with "
                          f"{CHECKPOINT_DIR}/step-*; start without --resume")
    return steps[-1]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The latest complete checkpoint of a run directory, or None when it has none yet (what
    ``--resume auto`` resumes from)."""
    try:
        return find_checkpoint(run_dir)
    except ResumeError:
        return None


def read_state(ckpt: str | os.PathLike) -> dict:
    """The checkpoint's ``trainer_state.json``."""
    return json.loads((Path(ckpt) / STATE_NAME).read_text())


def load_checkpoint(ckpt: str | os.PathLike, state: dict, device: torch.device
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(model weights, loss module state, optimizer state dict) of a checkpoint, on ``device``."""
    from safetensors.torch import load_file

    ckpt, dev = Path(ckpt), str(device)
    weights = load_file(str(ckpt / "model" / "model.safetensors"), device=dev)
    losses = load_file(str(ckpt / "losses.safetensors"), device=dev)
    opt = optimizer_from_files(load_file(str(ckpt / "optimizer.safetensors"), device=dev),
                               state["optimizer"])
    return weights, losses, opt


def restore_rng(ckpt: str | os.PathLike, env: DistEnv) -> None:
    """Restores this rank's RNG states from a checkpoint."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    rng_file = ckpt / f"rng-rank{env.rank}.safetensors"
    if not rng_file.is_file():
        raise ResumeError(f"{ckpt} has no RNG state for rank {env.rank}; resume with the "
                          "world size it was written with")
    rng_from_files(load_file(str(rng_file)),
                   json.loads((ckpt / f"rng-rank{env.rank}.json").read_text()), env.device)
