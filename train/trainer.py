"""The training loop: small, extended through hooks (:mod:`vlkd.train.hooks`).

One optimizer step = ``grad_accum`` micro-batches. Each micro-batch: (frozen teacher forward,
no grad) → :class:`TrainModule` forward (student + loss combiner) → backward. Then: NaN/Inf check
on every rank, unscale/clip, AdamW step, linear warm-up/decay step, hooks (metrics, evaluation,
checkpoint, progress).

Determinism and exact resume: a checkpoint (:mod:`vlkd.train.checkpoint`) holds the model, the
loss module's state (projections, the KD queue), AdamW's state, the scheduler and AMP scaler
state, every rank's RNG states and the data position (epoch, batches consumed). The stream
derives its order from (seed, epoch) and skips to the position without reading features; its
DataLoader has its own generator so worker seeding does not draw on the global RNG. A resumed
run then reproduces the uninterrupted run's losses.

DDP (``torchrun``, :mod:`vlkd.train.distributed`): the epoch's samples are split between ranks
to within one sample; when a rank has one batch fewer than another (the last, partial batch), it
repeats its previous batch with the loss scaled by 0 so that gradient all-reduces and the KD
queue's gather stay matched, and the real ranks' losses are scaled by world / #real so that the
averaged gradient is the mean over real batches.

Stopping on SIGTERM / SIGINT (preemption): during :meth:`Trainer.train` the two signals only
set a flag. Before every optimizer step (and once after the last) all ranks agree on the flags
with one all-reduce; when any rank got a signal, every rank stops at that step boundary: the
steps so far are complete (never half-accumulated), a checkpoint of the last one is written,
the DataLoader workers (started with the two signals blocked) are shut down, and
:class:`~vlkd.common.preemption.Stopped` is raised; ``vlkd-train`` exits with 128 + the signal.
An evaluation that falls on the stopping step is left for the resumed run, which runs it first.
``vlkd-train``, in its own process, keeps the handlers after the last step
(``keep_signal_handlers``): a signal that comes while it writes the final model and exits is
logged and the run ends complete (exit 0), rather than the default action killing it half-way
through the final files.
Time from the signal to the exit: at most the rest of one step plus the hooks of that step
(docs/TRAIN.md, "Resuming, stopping").
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vlkd.common.config import to_dict
from vlkd.common.preemption import Stopped

from .checkpoint import (CHECKPOINT_DIR, ResumeError, find_checkpoint, latest_checkpoint,
                         load_checkpoint, read_state, restore_rng, write_best, write_checkpoint)
from .config import RunConfig
from .distributed import (DistEnv, TrainStopSignals, agree_stop, amp_dtype, barrier,
                          quiet_children)
from .hooks import CheckpointHook, EvalHook, Hook, MetricsHook, ProgressHook
from .stream import RegionStream, make_loader
from .tasks import model_inputs, to_device

log = logging.getLogger(__name__)

__all__ = ["Trainer", "TrainModule", "NonFiniteLossError", "build_optimizer", "linear_schedule"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the run stopped before the optimizer step."""


# --------------------------------------------------------------------------------------------
# Optimizer and schedule
# --------------------------------------------------------------------------------------------

def build_optimizer(module: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999),
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases, LayerNorm weights and other 1-d parameters."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas), eps=eps)


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over ``warmup`` steps, then linear decay to 0 at ``total``."""
    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------------------
# The module DDP wraps
# --------------------------------------------------------------------------------------------

class TrainModule(nn.Module):
    """Student model + loss combiner: everything trainable, called as one module so that DDP
    sees every parameter (the combiner's projections too).

    Args:
        model: The trained :class:`~vlkd.train.model.VLModel`.
        combiner: A :class:`~vlkd.train.losses.LossCombiner`.
        model_task: The ``task`` argument of the model's forward (a registered task's name).
        seq2seq: Captioning attention mask.
    """

    def __init__(self, model: nn.Module, combiner: nn.Module, model_task: str, seq2seq: bool):
        super().__init__()
        self.model, self.combiner = model, combiner
        self.model_task, self.seq2seq = model_task, seq2seq

    def forward(self, batch: Mapping[str, Any], teacher_out=None):
        """Returns ``(total loss, {term: value})``."""
        inputs = model_inputs(batch, self.model.config.geometry_dim, seq2seq=self.seq2seq)
        out = self.model(inputs, task=self.model_task, **self.combiner.output_flags())
        return self.combiner(out, teacher_out, inputs)


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------

class Trainer:
    """Runs the optimisation of a :class:`TrainModule` over a :class:`RegionStream`.

    Args:
        cfg: The run's config (``optim`` and ``train`` sections are read).
        module: The trainable :class:`TrainModule`.
        stream: The training stream (its DataLoader is made here).
        run_dir: Output directory.
        env: Process placement (:func:`~vlkd.train.distributed.setup_distributed`).
        save_model: ``directory -> None`` writing a complete model directory (weights,
            tokenizer, answers, metadata) of the trained model.
        teacher: A frozen teacher model for distillation, or None.
        teacher_task: The ``task`` argument of the teacher's forward.
        evaluate: ``model -> {metric: value}``, or None for no evaluation.
        eval_metric: The key that picks the best model.
        name: Shown on the progress bar.
    """

    def __init__(self, cfg: RunConfig, module: TrainModule, stream: RegionStream, run_dir: str | Path,
                 env: DistEnv, save_model: Callable[[Path], None], *, teacher: nn.Module | None = None,
                 teacher_task: str = "none", evaluate: Callable[[nn.Module], dict] | None = None,
                 eval_metric: str = "", name: str = "train"):
        self.cfg, self.module, self.stream, self.env = cfg, module, stream, env
        self.run_dir = Path(run_dir)
        self.save_model_fn, self.name = save_model, name
        self.model = module.model
        self.module.to(env.device)
        self.teacher, self.teacher_task = teacher, teacher_task
        if teacher is not None:
            teacher.to(env.device).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        o, t = cfg.optim, cfg.train
        if o.grad_accum < 1:
            raise ValueError(f"optim.grad_accum must be >= 1, got {o.grad_accum}")
        self.accum = o.grad_accum
        self.optimizer = build_optimizer(module, o.lr, o.weight_decay, o.betas, o.eps)
        self.batches_per_epoch = max(stream.batches_per_rank())
        if t.max_steps > 0:
            self.total_steps = t.max_steps
            self.total_micro = None
        else:
            self.total_micro = t.epochs * self.batches_per_epoch
            self.total_steps = math.ceil(self.total_micro / self.accum)
        if self.total_steps <= 0:
            raise ValueError("nothing to train: train.epochs and train.max_steps are both 0")
        warmup = o.warmup_steps if o.warmup_steps > 0 else int(o.warmup_ratio * self.total_steps)
        self.scheduler = linear_schedule(self.optimizer, warmup, self.total_steps)
        self.amp = amp_dtype(t.amp, env.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)
        self.ddp = None
        if env.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP
            # Heads a task does not use (and BERT's pooler for captioning) get no gradient.
            self.ddp = DDP(module, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                           find_unused_parameters=True, broadcast_buffers=False)
        self.loader = make_loader(stream, pin_memory=env.device.type == "cuda")
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.best: dict | None = None
        self.finished = False
        self.last_loss: float | None = None
        # Stopping: the agreed signal (None: none yet), the step of the latest checkpoint, and
        # whether the evaluation of this step was left for the resumed run.
        self.stop_signal: int | None = None
        self.checkpoint_step = 0
        self.pending_eval = False
        self._signals: TrainStopSignals | None = None
        self._stop_seen: float | None = None
        # A command (vlkd-train) sets this: the handlers stay installed after train(), so a
        # signal that comes after the last step, while the final model is written and the
        # process exits, is recorded (last_signals.requested) instead of killing it.
        self.keep_signal_handlers = False
        self.last_signals: TrainStopSignals | None = None  # those of the last train()
        # Fixed keys: every rank all-reduces the same vector, even one with no real batch.
        self._terms = [n for n, w in module.combiner.weights.items() if w != 0]
        # Values a module reports beside its loss terms (SCST's rewards), logged by their names.
        self._extra = list(getattr(module, "extra_metrics", ()))
        self._interval: dict[str, float] = {}
        self._reset_interval()
        # Evaluation before the checkpoint of the same step, so the checkpoint knows the best.
        self.hooks: list[Hook] = [MetricsHook(t.log_every, t.tensorboard)]
        if evaluate is not None:
            self.hooks.append(EvalHook(evaluate, eval_metric, t.eval_every))
        self.hooks.append(CheckpointHook(t.checkpoint_every, t.keep_checkpoints))
        if t.progress:
            self.hooks.append(ProgressHook())

    # ---- data
    def _batches(self) -> Iterator[tuple[dict, bool, int]]:
        """(batch, real, #ranks with a real batch) forever, advancing the data position."""
        while True:
            self.stream.set_epoch(self.epoch, self.batch_in_epoch)
            per_rank = self.stream.batches_per_rank()
            n, own = max(per_rank), per_rank[self.env.rank]
            it = iter(self.loader) if self.batch_in_epoch < own else None
            last = None
            for k in range(self.batch_in_epoch, n):
                real = k < own
                if real:
                    batch = next(it)
                else:
                    if last is None:  # resumed past this rank's last batch: any batch will do
                        self.stream.set_epoch(self.epoch, 0)
                        last = next(iter(self.loader))
                    batch = last
                num_real = sum(k < c for c in per_rank)
                if k + 1 == n:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                else:
                    self.batch_in_epoch = k + 1
                yield batch, real, num_real
                last = batch
            it = None

    # ---- one micro-batch
    def _forward_backward(self, batch: dict, scale: float, sync: bool) -> tuple[torch.Tensor, dict]:
        batch = to_device(batch, self.env.device)
        ctx = (torch.autocast(self.env.device.type, dtype=self.amp) if self.amp is not None
               else contextlib.nullcontext())
        no_sync = (self.ddp.no_sync() if self.ddp is not None and not sync
                   else contextlib.nullcontext())
        with no_sync:
            with ctx:
                teacher_out = None
                if self.teacher is not None:
                    with torch.no_grad():
                        flags = self.module.combiner.output_flags()
                        t_in = model_inputs(batch, self.teacher.config.geometry_dim,
                                            seq2seq=self.module.seq2seq, teacher=True)
                        teacher_out = self.teacher(t_in, task=self.teacher_task, **flags)
                total, terms = (self.ddp or self.module)(batch, teacher_out)
            self.scaler.scale(total * scale).backward()
        return total.detach(), terms

    def _all_finite(self, value: torch.Tensor) -> bool:
        ok = torch.tensor([1.0 if bool(torch.isfinite(value)) else 0.0], device=self.env.device)
        if self.env.distributed:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item() > 0)

    def _group_size(self) -> int:
        """Micro-batches in the current optimizer step (the run's last step may be short)."""
        if self.total_micro is None:
            return self.accum
        return min(self.accum, self.total_micro - self.step * self.accum)

    # ---- the loop
    def train(self) -> None:
        """Runs until ``total_steps`` (or ``train.stop_after``).

        Raises:
            Stopped: A rank got SIGTERM or SIGINT; every rank stopped at the same step boundary
                after writing a checkpoint of that step (see the module docstring).
        """
        self.module.train()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.finished = self.step >= self.total_steps  # resumed from the last checkpoint
        stop_after = self.cfg.train.stop_after
        received_at = None
        with TrainStopSignals(keep_on_exit=self.keep_signal_handlers) as self._signals, \
                quiet_children():
            self.last_signals = self._signals
            for h in self.hooks:
                h.before_train(self)
            batches = self._batches()
            try:
                while not self.stop_requested() and self.step < self.total_steps:
                    self._optimizer_step(batches)
                    for h in self.hooks:
                        h.after_step(self)
                    if stop_after and self.step >= stop_after and not self.finished:
                        log.warning("train.stop_after=%d reached: stopping without a final "
                                    "checkpoint", stop_after)
                        break
            finally:
                batches.close()  # shuts the DataLoader workers down
            for h in self.hooks:
                h.after_train(self)
            received_at = self._signals.received_at
        self._signals = None
        if self.stop_signal is not None:
            raise self._stopped(received_at)

    def _optimizer_step(self, batches: Iterator[tuple[dict, bool, int]]) -> None:
        """One optimizer step: its micro-batches, the NaN/Inf check, clipping, AdamW, schedule."""
        group = self._group_size()
        finite = True
        bad_terms: dict = {}
        step_keys: list[str] = []
        for j in range(group):
            batch, real, num_real = next(batches)
            scale = (self.env.world_size / num_real if real else 0.0) / group
            total, terms = self._forward_backward(batch, scale, sync=j == group - 1)
            if real:
                finite = finite and bool(torch.isfinite(total))
                if not bool(torch.isfinite(total)):
                    bad_terms = {k: float(v) for k, v in terms.items()}
                self._accumulate(total, terms, len(batch["keys"]))
                step_keys.extend(batch["keys"])
        if not self._all_finite(torch.tensor(0.0 if finite else float("nan"))):
            self._stop_non_finite(bad_terms)
        if self.cfg.optim.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.optim.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.finished = self.step >= self.total_steps
        if self.cfg.train.log_samples:
            self._log_samples(step_keys)

    # ---- stopping
    def stop_requested(self) -> bool:
        """Whether every rank stops at this step boundary (a collective: every rank calls it at
        the same points; one all-reduce until it first returns True, then no more).

        True once any rank got SIGTERM or SIGINT inside :meth:`train`; ``stop_signal`` is then
        the agreed signal on every rank.
        """
        if self.stop_signal is None:
            local = self._signals.requested if self._signals is not None else None
            agreed = agree_stop(local, self.env)
            if agreed:
                self.stop_signal, self._stop_seen = agreed, time.monotonic()
                if self.env.is_main:
                    log.warning("%s%s: stopping after step %d (checkpoint, then exit %d)",
                                signal.Signals(agreed).name,
                                "" if local else " on another rank", self.step, 128 + agreed)
        return self.stop_signal is not None

    def _stopped(self, received_at: float | None) -> Stopped:
        seconds = time.monotonic() - (received_at or self._stop_seen or time.monotonic())
        ckpt = (f"checkpoint {self.run_dir / CHECKPOINT_DIR / f'step-{self.step:08d}'}"
                if self.step else "no step was trained")
        where = (f"after step {self.step} of {self.total_steps} ({ckpt}; resume with --resume "
                 f"auto or --resume {self.run_dir})")
        if self.env.is_main:
            log.warning("stopped %.2f s after the signal: %s", seconds, ckpt)
        return Stopped(self.stop_signal, where, seconds)

    def _stop_non_finite(self, terms: dict) -> None:
        last = None
        with contextlib.suppress(ResumeError):
            last = find_checkpoint(self.run_dir)
        fixes = "a lower optim.lr, optim.max_grad_norm=1.0 or train.amp=none"
        where = (f"The last good checkpoint is {last}: resume from it (--resume {last}) with "
                 f"{fixes}, or check the data of this step" if last else
                 f"No checkpoint was written yet: restart with {fixes}, or check the data")
        msg = (f"loss is not finite at step {self.step + 1} (epoch {self.epoch}; terms: "
               f"{terms or 'on another rank'}); stopped before the optimizer step. {where}.")
        if self.env.is_main:
            self.write_metrics({"error": msg})
        raise NonFiniteLossError(msg)

    # ---- metrics
    def _reset_interval(self) -> None:
        self._interval = {k: 0.0 for k in ["loss"] + [f"loss/{n}" for n in self._terms]
                          + self._extra}
        self._interval_n = self._interval_samples = 0

    def _accumulate(self, total: torch.Tensor, terms: dict, samples: int) -> None:
        self._interval["loss"] += float(total)
        for k, v in terms.items():
            self._interval[k if k in self._extra else f"loss/{k}"] += float(v)
        self._interval_n += 1
        self._interval_samples += samples
        self.last_loss = float(total)

    def _interval_totals(self) -> dict:
        """The interval's sums over all ranks (a collective): ``{"sums", "n", "samples"}``."""
        keys = sorted(self._interval)
        vals = torch.tensor([self._interval[k] for k in keys] + [self._interval_n,
                                                                 self._interval_samples],
                            dtype=torch.float64)
        if self.env.distributed:
            vals = vals.to(self.env.device)
            dist.all_reduce(vals)
            vals = vals.cpu()
        return {"sums": {k: float(vals[i]) for i, k in enumerate(keys)}, "n": int(vals[-2]),
                "samples": int(vals[-1])}

    def pop_interval_metrics(self) -> dict:
        """Mean loss and terms per micro-batch since the last call, over all ranks."""
        tot = self._interval_totals()
        n = tot["n"]
        rec = {k: v / n for k, v in tot["sums"].items()} if n else {}
        rec["samples"] = tot["samples"]
        rec["lr"] = float(self.scheduler.get_last_lr()[0])
        self._reset_interval()
        return rec

    def write_metrics(self, rec: dict) -> None:
        """Appends a line to ``metrics.jsonl`` and TensorBoard scalars (rank 0)."""
        if not self.env.is_main:
            return
        line = {"step": self.step, "epoch": self.epoch, **rec, "time": time.time()}
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        writer = next((h.writer for h in self.hooks if isinstance(h, MetricsHook)), None)
        if writer is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "time":
                    writer.add_scalar(k, v, self.step)

    # ---- checkpoints
    def _data_layout(self) -> dict:
        """What the data order depends on: a checkpoint continues exactly only with the same."""
        s = self.stream
        return {"world_size": self.env.world_size, "num_workers": s.num_workers,
                "batch_size": s.batch_size, "seed": s.seed, "num_samples": s.num_samples,
                "chunk_size": s.chunk_size, "shuffle_buffer": s.shuffle_buffer,
                **(s.layout() if callable(getattr(s, "layout", None)) else {})}  # MixedStream

    def save_checkpoint(self, keep: int = 2) -> Path:
        """Writes ``checkpoints/step-XXXXXXXX`` (:func:`~vlkd.train.checkpoint.write_checkpoint`)."""
        # The unfinished logging interval travels too, so that a checkpoint between two metric
        # lines (a stop on SIGTERM) resumes to the same next line.
        state = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                 "data": self._data_layout(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(), "best": self.best,
                 "interval": self._interval_totals(), "pending_eval": self.pending_eval,
                 "config": to_dict(self.cfg)}
        path = write_checkpoint(self.run_dir, self.step, self.env, save_model=self.save_model_fn,
                                losses=self.module.combiner.state_dict(),
                                optimizer=self.optimizer, state=state, keep=keep)
        self.checkpoint_step = self.step
        return path

    def save_best(self) -> None:
        """Replaces ``best/`` with the current model (rank 0)."""
        write_best(self.run_dir, self.env, self.save_model_fn, self.best)

    def resume(self, path: str | os.PathLike) -> Path:
        """Loads a checkpoint (directory, or the latest in a run directory) into this trainer."""
        ckpt = find_checkpoint(path)
        state = read_state(ckpt)
        data, here = state["data"], self._data_layout()
        diff = {k: (data.get(k), v) for k, v in here.items() if data.get(k) != v}
        if diff:
            pretty = ", ".join(f"{k}: checkpoint {a} vs now {b}" for k, (a, b) in diff.items())
            raise ResumeError(f"{ckpt} cannot continue exactly with this data layout ({pretty}); "
                              "resume with the same world size, data.num_workers, "
                              "data.batch_size, train.seed, annotations and region sets")
        weights, losses, opt = load_checkpoint(ckpt, state, self.env.device)
        self.model.load_state_dict(weights)
        self.module.combiner.load_state_dict(losses)
        self.optimizer.load_state_dict(opt)
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        restore_rng(ckpt, self.env)
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.best = state.get("best")
        self.checkpoint_step, self.pending_eval = self.step, bool(state.get("pending_eval"))
        interval = state.get("interval")
        if interval and self.env.is_main:  # the other ranks' shares are in rank 0's sums
            self._interval.update({k: v for k, v in interval["sums"].items()
                                   if k in self._interval})
            self._interval_n, self._interval_samples = interval["n"], interval["samples"]
        self._truncate_logs()
        barrier(self.env)
        log.info("resumed from %s (step %d, epoch %d, batch %d)", ckpt, self.step, self.epoch,
                 self.batch_in_epoch)
        return ckpt

    def resume_latest(self) -> Path | None:
        """``--resume auto``: :meth:`resume` from the latest checkpoint of the run directory, or,
        when it has none yet, start at step 0 and drop the lines an earlier attempt logged."""
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is not None:
            return self.resume(ckpt)
        self._truncate_logs()
        barrier(self.env)
        log.info("no checkpoint in %s yet: starting at step 0", self.run_dir)
        return None

    def _samples_path(self) -> Path:
        return self.run_dir / "samples" / f"rank{self.env.rank}.jsonl"

    def _log_samples(self, keys: list[str]) -> None:
        path = self._samples_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": self.step, "epoch": self.epoch, "keys": keys}) + "\n")

    def _truncate_logs(self) -> None:
        # Lines after the checkpoint are written again by the resumed run.
        paths = [self._samples_path()] + ([self.run_dir / "metrics.jsonl"] if self.env.is_main
                                          else [])
        for path in paths:
            if not path.is_file():
                continue
            keep = [ln for ln in path.read_text(encoding="utf-8").splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
            path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
