"""Tasks and their registry: caption, vqa, pretrain, one module each.

:data:`TASKS` maps ``task.name`` to a :class:`~vlkd.train.tasks.base.Task` subclass, which is
the whole of the task: its data side (per-sample transform, batch collation), the model heads
it runs, its default loss terms, how its training and evaluation records are read from the
annotation files, and, when it has an evaluation, how predictions are made, scored and written,
and which score picks the best checkpoint. The model, the config defaults, the run builder and
the command line ask the registry; none of them names a task.

To add a task, write one module here, ``train/tasks/<name>.py``, with a ``Task`` subclass
decorated with ``@TASKS.register()`` that sets ``name`` and ``heads`` and implements
``transform`` (and ``collate`` when the batch needs more than the shared layout),
``from_config``, ``default_losses`` and ``train_records`` (plus ``metric``, ``has_eval``,
``eval_records``, ``predict``, ``score`` and ``result_rows`` for evaluation). Every module of
this package is imported below, so nothing else changes: ``--task`` offers the new name.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import TASKS, Task, TextEncoder, mask_tokens, model_inputs, task_names, to_device

__all__ = ["TASKS", "Task", "TextEncoder", "mask_tokens", "model_inputs", "to_device",
           "task_names", "build_task"]

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def build_task(cfg, encoder: TextEncoder, *, train: bool = True, num_answers: int = 0) -> Task:
    """The data side of ``cfg.task.name`` (``train=False``: evaluation samples)."""
    return TASKS.get(cfg.task.name).from_config(cfg, encoder, train=train,
                                                num_answers=num_answers)
