"""Hooks: how the training loop is extended (detectron2's ``HookBase`` pattern).

:class:`~vlkd.train.trainer.Trainer` calls ``before_train`` once, ``after_step`` after every
optimizer step and ``after_train`` at the end (also after ``train.stop_after``; then
``trainer.finished`` is False). Hooks run in list order: metrics, evaluation, checkpoint,
progress, so that a checkpoint knows the best model of its own step.

When the run stops on a signal (``trainer.stop_signal`` set), ``after_train`` still runs: the
checkpoint hook writes the stopping step's checkpoint (if that step has none), the evaluation
hook does not evaluate, the others close what they hold.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from .trainer import Trainer

log = logging.getLogger(__name__)

__all__ = ["Hook", "MetricsHook", "CheckpointHook", "EvalHook", "ProgressHook"]


class Hook:
    """Extension point of :class:`~vlkd.train.trainer.Trainer`; override what you need."""

    def before_train(self, trainer: "Trainer") -> None: ...

    def after_step(self, trainer: "Trainer") -> None: ...

    def after_train(self, trainer: "Trainer") -> None: ...


def _periodic(every: int, trainer: "Trainer") -> bool:
    """Every ``every`` steps, except the last one (``after_train`` handles that)."""
    return bool(every) and trainer.step % every == 0 and trainer.step != trainer.total_steps


class MetricsHook(Hook):
    """Every ``log_every`` steps: mean loss and terms over the interval (all ranks), lr,
    throughput → ``metrics.jsonl`` and TensorBoard (rank 0)."""

    def __init__(self, every: int, tensorboard: bool):
        self.every, self.tensorboard = max(1, every), tensorboard
        self.writer = None

    def before_train(self, trainer):
        if trainer.env.is_main and self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(trainer.run_dir / "tb"), purge_step=trainer.step + 1)
            except ImportError:  # tensorboard is an install requirement; degrade, don't die
                log.warning("tensorboard is not installed: no TensorBoard events")
        self._t0, self._s0 = time.perf_counter(), trainer.step

    def after_step(self, trainer):
        if trainer.step % self.every and trainer.step != trainer.total_steps:
            return
        rec = trainer.pop_interval_metrics()
        now = time.perf_counter()
        rec["steps_per_s"] = (trainer.step - self._s0) / max(now - self._t0, 1e-9)
        self._t0, self._s0 = now, trainer.step
        trainer.write_metrics(rec)

    def after_train(self, trainer):
        if self.writer is not None:
            self.writer.close()


class CheckpointHook(Hook):
    """A checkpoint every ``every`` steps and at the end; keeps the ``keep`` most recent."""

    def __init__(self, every: int, keep: int):
        self.every, self.keep = every, max(1, keep)

    def after_step(self, trainer):
        if _periodic(self.every, trainer):
            trainer.save_checkpoint(keep=self.keep)

    def after_train(self, trainer):
        if trainer.stop_signal is not None:
            if trainer.step > trainer.checkpoint_step:  # the stopping step has no checkpoint yet
                trainer.save_checkpoint(keep=self.keep)
        elif trainer.finished:
            trainer.save_checkpoint(keep=self.keep)


class EvalHook(Hook):
    """Evaluates every ``every`` steps and at the end; keeps the best model in ``best/``.

    An evaluation falls due at a step where the run stops on a signal (checked just before it,
    so a signal during the step already counts) is not run then: the checkpoint records it as
    pending, and the resumed run evaluates that step's model first, so it writes the same
    ``eval/*`` line and keeps the same best model as an uninterrupted run.

    Args:
        evaluate: ``model -> {metric: value}`` (runs on every rank, returns the same dict).
        metric: The key compared (higher is better).
        every: Steps between evaluations (0: only at the end).
    """

    def __init__(self, evaluate: Callable[[nn.Module], dict], metric: str, every: int):
        self.evaluate, self.metric, self.every = evaluate, metric, every

    def _run(self, trainer):
        model = trainer.model
        model.eval()
        try:
            scores = self.evaluate(model)
        finally:
            model.train()
        trainer.write_metrics({f"eval/{k}": v for k, v in scores.items()
                               if isinstance(v, (int, float))})
        value = scores.get(self.metric)
        if value is None:
            raise KeyError(f"evaluation returned no {self.metric!r} (got {sorted(scores)}); set "
                           "eval.metric to one of them")
        if trainer.best is None or value > trainer.best["value"]:
            trainer.best = {"metric": self.metric, "value": float(value), "step": trainer.step}
            trainer.save_best()

    def before_train(self, trainer):
        if trainer.pending_eval:  # left by a run stopped at this step
            trainer.pending_eval = False
            self._run(trainer)

    def after_step(self, trainer):
        if _periodic(self.every, trainer):
            if trainer.stop_requested():
                trainer.pending_eval = True
            else:
                self._run(trainer)

    def after_train(self, trainer):
        if trainer.finished and trainer.stop_signal is None:
            self._run(trainer)


class ProgressHook(Hook):
    """A tqdm bar on rank 0 showing the step and the last loss."""

    def before_train(self, trainer):
        self.bar = None
        if trainer.env.is_main:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=trainer.total_steps, initial=trainer.step, unit="step",
                            dynamic_ncols=True, desc=trainer.name)

    def after_step(self, trainer):
        if self.bar is not None:
            self.bar.update(trainer.step - self.bar.n)
            if trainer.last_loss is not None:
                self.bar.set_postfix(loss=f"{trainer.last_loss:.4f}", epoch=trainer.epoch)

    def after_train(self, trainer):
        if self.bar is not None:
            self.bar.close()
