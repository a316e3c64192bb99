"""The demo's config: a dataclass schema that ``configs/demo/demo.yaml`` fills in.

Loaded like every vlkd config (:mod:`vlkd.common.config`): the schema's defaults, then the
YAML file, then the command's options (``--jobs``), then ``--set key=value``. Unknown keys
and values of the wrong type are refused with the valid keys. The sizes, tasks and models have
no default: a demo config names every one of them, and a file that leaves some out is refused
with the list of what is missing. The resolved config is saved as ``<out>/config.yaml``.

``train`` and ``distill_losses`` are ``vlkd-train`` config keys passed through as ``--set``
overrides; ``vlkd-train`` checks them (the demo imports neither phase). They are kept as
dotted keys (``optim.lr``), so ``--set train.optim.lr=2e-3`` and a nested YAML section mean
the same as ``optim.lr: 2.0e-3`` under ``train``.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from omegaconf import MISSING

from vlkd.common import config

__all__ = ["TASKS", "DataSize", "DetectorIters", "Steps", "Latency", "Size", "Models",
           "DemoConfig", "load_config"]

#: The tasks the demo can run.
TASKS = ("caption", "vqa")


@dataclass
class DataSize:
    """The synthetic world (``python -m vlkd.data.synthetic``).

    Attributes:
        num_train, num_val, num_test: images per split.
        seed: the world's seed, also the seed of every training run.
    """

    num_train: int = MISSING
    num_val: int = MISSING
    num_test: int = MISSING
    seed: int = MISSING


@dataclass
class DetectorIters:
    """Training iterations of the two detectors (``vlkd-extract train-detector --max-iter``).

    Attributes:
        teacher: the teacher detector's.
        student: the student detector's.
    """

    teacher: int = MISSING
    student: int = MISSING


@dataclass
class Steps:
    """Training steps of the VL models (``vlkd-train --max-steps``), per task.

    Attributes:
        teacher: the teacher fine-tuned on its own boxes.
        teacher_adapt: that teacher adapted to the student's boxes (VTA), and the control:
            the same teacher trained as many steps more on its own boxes.
        student: each student, without and with KD.
    """

    teacher: int = MISSING
    teacher_adapt: int = MISSING
    student: int = MISSING


@dataclass
class Latency:
    """The latency stage (``vlkd-train latency``): every model alone, the same settings.

    Attributes:
        samples: test samples of one pass (images for captioning, questions for VQA).
        batch_size: samples per batch (1: one image at a time, as a deployed model sees them).
        repeats: passes per model, interleaved; the fastest counts.
        pipeline_images: images of the end-to-end pipeline latency (detector + VL model from
            the image file; ``vlkd-train export``'s card), the student's and the teacher's.
    """

    samples: int = 50
    batch_size: int = 1
    repeats: int = 5
    pipeline_images: int = 8


@dataclass
class Size:
    """One size of the demo (``full``, or ``quick`` with ``--quick``).

    Attributes:
        data: the synthetic world.
        detector_iters: detector training iterations.
        steps: VL training steps.
        batch_size: VL training batch size.
        eval_max_samples: test samples each evaluation scores (0: the whole test split).
        latency: the latency stage's samples, batch and repeats.
    """

    data: DataSize = field(default_factory=DataSize)
    detector_iters: DetectorIters = field(default_factory=DetectorIters)
    steps: Steps = field(default_factory=Steps)
    batch_size: int = MISSING
    eval_max_samples: int = MISSING
    latency: Latency = field(default_factory=Latency)


@dataclass
class Models:
    """The VL models (``vlkd.train.model.VLConfig`` presets or model folders).

    Attributes:
        teacher: the teacher's preset.
        student: the student's preset.
    """

    teacher: str = MISSING
    student: str = MISSING


@dataclass
class DemoConfig:
    """What ``vlkd-demo`` runs (``configs/demo/demo.yaml``).

    Attributes:
        full: the full size (``make demo``).
        quick: the quick size (``--quick``, CI).
        tasks: a non-empty subset of caption, vqa.
        models: the teacher and student presets.
        train: ``vlkd-train`` config keys (dotted) set on every training run (its
            ``eval.beam_size`` on every evaluation too).
        distill_losses: ``vlkd-train`` config keys (dotted) set on distillation runs only (the
            KD terms; ablations change these).
        jobs: stages run at the same time, sharing the cores (0: one per core, at most 4).
        threads: CPU threads of every stage, whatever ``jobs`` is: a stage's results depend
            on its thread count (float sums in another order), so fixing it keeps every score
            the same for any ``--jobs`` on one machine. The latency stage uses it too.
        picture_boxes: boxes per panel in boxes.png (the best by score).
    """

    full: Size = field(default_factory=Size)
    quick: Size = field(default_factory=Size)
    tasks: list[str] = MISSING
    models: Models = field(default_factory=Models)
    train: dict[str, Any] = field(default_factory=dict)
    distill_losses: dict[str, Any] = field(default_factory=dict)
    jobs: int = 0
    threads: int = 1
    picture_boxes: int = 6

    def size(self, quick: bool) -> Size:
        """The size section a run uses."""
        return self.quick if quick else self.full


def _dotted(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}, "task.mask_prob": 0.4}`` → ``{"optim.lr": 1,
    "task.mask_prob": 0.4}``; a key given twice keeps its first place and its last value."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _missing(path: str | os.PathLike, overrides: Sequence[str]) -> list[str]:
    """The required keys that neither the file nor ``--set`` gives, shallow before deep, in
    schema order; a section none of whose required keys is given is named alone (``quick``).
    [] when the file and overrides do not even merge (that error is the one to report)."""
    from omegaconf import OmegaConf

    try:
        cfg = config.merge_values(OmegaConf.structured(DemoConfig), OmegaConf.load(path), "")
        for item in overrides:
            cfg = config.merge_values(cfg, OmegaConf.from_dotlist([item]), "")
        missing = OmegaConf.missing_keys(cfg)
    except Exception:  # noqa: BLE001 - config.load's own error says what is wrong
        return []
    # the required leaves (a section whose keys all have defaults is never missing)
    required = OmegaConf.missing_keys(OmegaConf.structured(DemoConfig))
    leaves = [leaf for leaf in config.schema_keys(DemoConfig) if leaf in required]
    keys = list(dict.fromkeys(".".join(leaf.split(".")[:i + 1]) for leaf in leaves
                              for i in range(leaf.count(".") + 1)))   # sections and leaves
    named: list[str] = []
    for key in sorted(keys, key=lambda k: k.count(".")):             # stable: schema order
        under = [leaf for leaf in leaves if leaf == key or leaf.startswith(key + ".")]
        if all(leaf in missing for leaf in under) and not any(
                key.startswith(n + ".") for n in named):
            named.append(key)
    return named


def load_config(path: str | os.PathLike, overrides: Sequence[str] = (),
                jobs: int | None = None) -> DemoConfig:
    """The demo config of ``path`` with ``--jobs`` and ``--set`` overrides applied.

    Raises:
        RuntimeError: the file is unreadable or not YAML, a key is unknown, a value has the
            wrong type, a required key is missing (all of them are named), or ``tasks`` is not
            a non-empty subset of caption, vqa.
    """
    try:
        cfg = config.load(DemoConfig, path, options={"jobs": jobs}, overrides=overrides,
                          option_names={"jobs": "--jobs"})
    except config.ConfigError as e:
        missing = _missing(path, overrides)
        if missing:
            raise RuntimeError(f"demo config {path}: missing {', '.join(missing)}; start from "
                               "a copy of configs/demo/demo.yaml") from None
        raise RuntimeError(f"demo config: {e}") from None
    if not cfg.tasks or any(t not in TASKS for t in cfg.tasks):
        raise RuntimeError(f"demo config {path}: tasks must be a non-empty subset of "
                           f"[{', '.join(TASKS)}], found {cfg.tasks}")
    if cfg.jobs < 0:
        raise RuntimeError(f"demo config {path}: jobs must be >= 0, found {cfg.jobs}")
    if cfg.threads < 1 or cfg.picture_boxes < 1:
        raise RuntimeError(f"demo config {path}: threads and picture_boxes must be >= 1, found "
                           f"{cfg.threads} and {cfg.picture_boxes}")
    return dataclasses.replace(cfg, train=_dotted(cfg.train),
                               distill_losses=_dotted(cfg.distill_losses))
