"""Building a run from its config: tokenizer, answer vocabulary, annotation records, models,
streams, loss terms. The commands in :mod:`vlkd.train.cli` are thin layers over this.

A trained model directory holds everything ``evaluate`` and ``distill --teacher`` need::

    config.json, model.safetensors     the model (VLModel.save_pretrained)
    vocab.txt, tokenizer*.json         its tokenizer
    answers.txt                        VQA answer vocabulary (vqa models)
    vlkd_train.json                    task and input layout: text_layout, max_text_len,
                                       max_tag_len, max_seq_len, max_regions, unique_tags, tag
                                       class names, tokenizer digest
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlkd.common.regionset import RegionSet
from vlkd.data.captions import AnnotationError
from vlkd.data.vqa import build_answer_vocab, load_answer_vocab, multiple_choice_answers

from .config import ConfigError, ModelSpec, RunConfig, resolved_losses
from .model import VLConfig, VLModel
from .stream import Record, RegionStream, resolve_tag_set
from .tasks import TASKS, Task, TextEncoder
from .tokenizer import TokenizerError, load_tokenizer, vocab_digest

log = logging.getLogger(__name__)

__all__ = ["META_NAME", "ANSWERS_NAME", "read_meta", "resolve_tokenizer", "load_answers",
           "train_records", "eval_records", "build_model", "load_model_dir", "save_model_dir",
           "make_encoder", "make_stream", "build_combiner", "RunInputs"]

META_NAME = "vlkd_train.json"
ANSWERS_NAME = "answers.txt"


def read_meta(model_dir: str | Path) -> dict:
    """The ``vlkd_train.json`` of a model directory ({} when absent)."""
    p = Path(model_dir) / META_NAME
    return json.loads(p.read_text()) if p.is_file() else {}


def _is_model_dir(path: str) -> bool:
    return bool(path) and (Path(path) / "config.json").is_file()


# --------------------------------------------------------------------------------------------
# Tokenizer and answers
# --------------------------------------------------------------------------------------------

def resolve_tokenizer(cfg: RunConfig, model_dir: str = ""):
    """``data.tokenizer``, else the model directory's, else ``model.init_text``'s."""
    for cand in (cfg.data.tokenizer, model_dir, cfg.model.init_text):
        if cand and ((Path(cand) / "vocab.txt").is_file() or (Path(cand) / "tokenizer.json").is_file()):
            return load_tokenizer(cand)
    if cfg.data.tokenizer:
        return load_tokenizer(cfg.data.tokenizer)  # raises with the reason
    raise TokenizerError(
        "no tokenizer: set data.tokenizer (--tokenizer DIR) to a BERT/MiniLM directory with "
        "vocab.txt, or build one from the annotations with `vlkd-train build-vocab --out DIR "
        "ANNOTATION_FILES...`")


def load_answers(cfg: RunConfig, model_dir: str = "") -> list[str]:
    """The VQA answer vocabulary, by classifier index: ``data.answer_vocab`` (one answer per
    line, or Oscar's ``trainval_ans2label.pkl`` / ``trainval_label2ans.pkl``), the model
    directory's answers.txt, or built as bottom-up-attention-vqa's ``filter_answers`` does from
    the multiple-choice answers of ``data.answer_vocab_annotations`` (default: the training and
    the evaluation annotations: train + val)."""
    for cand in (cfg.data.answer_vocab, str(Path(model_dir) / ANSWERS_NAME) if model_dir else ""):
        if cand and Path(cand).is_file():
            try:
                return load_answer_vocab(cand)
            except AnnotationError as e:
                raise ConfigError(str(e)) from None
    if cfg.data.answer_vocab:
        raise ConfigError(f"data.answer_vocab {cfg.data.answer_vocab} does not exist")
    sources = list(cfg.data.answer_vocab_annotations) or [
        p for p in (cfg.data.vqa_annotations, cfg.eval.vqa_annotations) if p]
    if not sources:
        raise ConfigError("the vqa task needs an answer vocabulary: data.answer_vocab, a model "
                          "directory with answers.txt, or VQA annotations (--vqa-annotations, "
                          "data.answer_vocab_annotations) to build it from")
    answers = build_answer_vocab(multiple_choice_answers(dict.fromkeys(sources)),
                                 cfg.data.answer_min_count)
    log.info("answer vocabulary: %d answers that are the multiple-choice answer of >= %d "
             "questions of %s", len(answers), cfg.data.answer_min_count, ", ".join(sources))
    return answers


# --------------------------------------------------------------------------------------------
# Records (each task reads its own annotation files: vlkd.train.tasks)
# --------------------------------------------------------------------------------------------

def train_records(cfg: RunConfig, answers: list[str] | None = None) -> list[Record]:
    """Training samples of ``cfg.task.name`` from the ``data`` annotation files."""
    return TASKS.get(cfg.task.name).train_records(cfg, answers)


def eval_records(cfg: RunConfig, answers: list[str] | None = None) -> tuple[list[Record], Any]:
    """Evaluation samples of ``cfg.task.name`` and the references they are scored against."""
    return TASKS.get(cfg.task.name).eval_records(cfg, answers)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

_SHAPE_FREE = {"hidden_dropout", "attention_dropout", "layer_norm_eps", "region_layer_norm_eps",
               "initializer_range"}


def _same(saved: Any, given: Any) -> bool:
    return (list(saved) == list(given) if isinstance(saved, (list, tuple))
            and isinstance(given, (list, tuple)) else saved == given)


def load_model_dir(path: str | Path, overrides: dict | None = None) -> VLModel:
    """A model from a directory: vlkd (``save_pretrained``), Oscar/VinVL or Hugging Face BERT."""
    from . import weights

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    overrides = dict(overrides or {})
    if raw.get("model_type") == "vlkd-vl":
        # a key that restates the model's own value changes nothing (a shared config file may
        # name the VQA head for new models and trained ones alike)
        bad = sorted(k for k, v in overrides.items()
                     if k not in _SHAPE_FREE and not (k in raw and _same(raw[k], v)))
        if bad:
            raise ConfigError(f"model.config {bad} cannot change a trained model's shapes ({path}: "
                              + ", ".join(f"{k}={raw.get(k)!r}" for k in bad)
                              + f"); only {sorted(_SHAPE_FREE)} may be overridden")
        return VLModel.from_pretrained(path, **overrides)
    if "img_feature_dim" in raw:  # Oscar / VinVL
        model = VLModel(weights.config_from_oscar(raw, **overrides))
        report = weights.load_oscar_checkpoint(model, path)
        log.info("imported Oscar checkpoint %s: %s", path, report)
        return model
    raise ConfigError(f"{path} is not a vlkd model directory (config.json without model_type "
                      "'vlkd-vl') nor an Oscar/VinVL checkpoint (no img_feature_dim); for a "
                      "Hugging Face BERT pass it as model.init_text with a preset model")


def build_model(spec: ModelSpec, *, region_dim: int, vocab_size: int,
                num_answers: int | None = None) -> VLModel:
    """The model of ``spec`` (preset, config file or directory), checked against the data.

    Args:
        spec: The ``model`` config section.
        region_dim: The region set's feature width (a new model takes it).
        vocab_size: The tokenizer's size (a new model takes it unless initialised from BERT).
        num_answers: VQA answer count (a new model takes it).
    """
    from . import weights

    if _is_model_dir(spec.model):
        model = load_model_dir(spec.model, spec.config)
    else:
        base: dict[str, Any] = {}
        if spec.model.endswith((".yaml", ".yml", ".json")):
            import yaml
            p = Path(spec.model)
            if not p.is_file():
                raise ConfigError(f"model config file {p} does not exist")
            base = yaml.safe_load(p.read_text()) or {}
        else:
            base = {"preset": spec.model}
        new = {"region_dim": region_dim, "vocab_size": vocab_size}
        if num_answers:
            new["num_answers"] = num_answers
        if spec.init_text:
            hf = json.loads((Path(spec.init_text) / "config.json").read_text())
            new["vocab_size"] = hf["vocab_size"]
        try:
            cfg = VLConfig.from_dict({**new, **base, **spec.config})
        except KeyError as e:
            raise ConfigError(f"model {spec.model!r}: {e}") from None
        model = VLModel(cfg)
        if spec.init_text:
            report = weights.init_text_from_hf(model, spec.init_text)
            log.info("text part initialised from %s: %s", spec.init_text, report)
    if spec.init_oscar:
        report = weights.load_oscar_checkpoint(model, spec.init_oscar)
        log.info("imported %s: %s", spec.init_oscar, report)
    c = model.config
    if c.region_dim != region_dim:
        raise ConfigError(f"model {spec.model!r} takes {c.region_dim}-d region features but the "
                          f"region set has {region_dim}-d ones; use the set extracted for this "
                          "model (student vs teacher features) or another model")
    if vocab_size > c.vocab_size:
        raise ConfigError(f"the tokenizer has {vocab_size} tokens but model {spec.model!r} only "
                          f"{c.vocab_size} embeddings; use the model's own tokenizer")
    if num_answers and "vqa" in c.heads and c.num_answers != num_answers:
        raise ConfigError(f"model {spec.model!r} predicts {c.num_answers} answers but the answer "
                          f"vocabulary has {num_answers}; pass the model's answers.txt as "
                          "data.answer_vocab")
    return model


def save_model_dir(model: VLModel, directory: Path, tokenizer, meta: dict,
                   answers: list[str] | None = None) -> Path:
    """Writes a complete model directory (see the module docstring)."""
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(str(directory))
    if not (directory / "vocab.txt").is_file():  # transformers 5 writes tokenizer.json only
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        (directory / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab),
                                             encoding="utf-8")
    if answers:
        (directory / ANSWERS_NAME).write_text("\n".join(answers) + "\n", encoding="utf-8")
    (directory / META_NAME).write_text(json.dumps(meta, indent=1) + "\n")
    return directory


# --------------------------------------------------------------------------------------------
# Streams and losses
# --------------------------------------------------------------------------------------------

#: ``data.*`` keys that fix a model's input layout: recorded in ``vlkd_train.json``; a model is
#: evaluated with its own, and a teacher's are compared with its student's.
LAYOUT_KEYS = ("max_text_len", "max_tag_len", "max_seq_len", "max_regions", "unique_tags",
               "tag_source", "tag_attributes")


@dataclass
class TagNames:
    """What the object tags are made of: the tag set's class names, its attribute names
    ("attribute + object" tags; empty when off) and the class names allowed as tags (None:
    all)."""

    class_names: list[str]
    attribute_names: list[str]
    vocab: list[str] | None


def read_tag_vocab(path: str) -> list[str] | None:
    """The class names of a ``data.tag_vocab`` file (one per line, ``#`` comments), or None."""
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"data.tag_vocab {path} does not exist; give a file of class names, "
                          "one per line (e.g. configs/tags/coco80.txt)")
    names = [ln.split("#", 1)[0].strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n]
    if not names:
        raise ConfigError(f"data.tag_vocab {path} lists no class names")
    return names


def tag_names(cfg: RunConfig, regions: str, vocab: list[str] | None = None) -> TagNames:
    """The tag vocabulary of a run over ``regions`` (``data.tag_regions``, ``tag_source``,
    ``tag_attributes``, ``tag_vocab``; ``vocab`` overrides the file: a model's own list)."""
    from .stream import tag_attribute_names

    d = cfg.data
    if d.tag_source == "image":
        if not d.tag_regions:
            raise ConfigError("data.tag_source=image takes the tags from another set by image "
                              "id: pass data.tag_regions=SET (--tag-regions)")
        tags = RegionSet(d.tag_regions)
    else:
        tags = resolve_tag_set(RegionSet(regions), d.tag_regions or None)
    attrs = tag_attribute_names(tags) if d.tag_attributes else []
    allowed = vocab if vocab is not None else read_tag_vocab(d.tag_vocab)
    if allowed is not None:
        unknown = sorted({n.lower() for n in allowed}
                         - {str(c).lower() for c in tags.class_names}
                         - {str(c).replace("_", " ").lower() for c in tags.class_names})
        if len(unknown) == len({n.lower() for n in allowed}):
            raise ConfigError(f"none of the data.tag_vocab class names is a class of the tag "
                              f"set {tags.path} (e.g. {unknown[:3]}); its classes are e.g. "
                              f"{list(tags.class_names)[:5]}")
        if unknown:
            log.warning("%d data.tag_vocab names are not classes of %s (e.g. %s)", len(unknown),
                        tags.path, unknown[:3])
    return TagNames(list(tags.class_names), attrs, allowed)


def make_encoder(cfg: RunConfig, tokenizer, tags: TagNames | list[str]) -> TextEncoder:
    d = cfg.data
    if not isinstance(tags, TagNames):  # plain class names: object tags, every class
        tags = TagNames(list(tags), [], None)
    return TextEncoder(tokenizer, tags.class_names, d.max_text_len, d.max_tag_len, d.unique_tags,
                       d.max_seq_len, attribute_names=tags.attribute_names, tag_vocab=tags.vocab)


def make_stream(cfg: RunConfig, records: list[Record], task: Task, *, regions: str,
                teacher_regions: str | None = None, shuffle: bool = True,
                batch_size: int | None = None, rank: int = 0, world_size: int = 1) -> RegionStream:
    d = cfg.data
    return RegionStream(regions, records, transform=task.transform, collate=task.collate,
                        batch_size=batch_size or d.batch_size, teacher_regions=teacher_regions,
                        tag_regions=d.tag_regions or None, tag_source=d.tag_source,
                        tag_attributes=d.tag_attributes, shuffle=shuffle, seed=cfg.train.seed,
                        chunk_size=d.chunk_size, shuffle_buffer=d.shuffle_buffer,
                        num_workers=d.num_workers, rank=rank, world_size=world_size)


def build_combiner(cfg: RunConfig, student: VLModel, teacher: VLModel | None, *,
                   tokenizer=None, answers: list[str] | None = None):
    """The loss terms of the run (defaults for the task and command, merged with ``losses``).

    With a teacher, every ``logit_kd`` term in use is checked against the label lists of both
    models (:meth:`~vlkd.train.losses.LogitKDLoss.check_labels`): the run's ``tokenizer`` and
    ``answers`` against the teacher directory's (``distill.teacher``).
    """
    from .losses import LossCombiner

    terms = resolved_losses(cfg, distill=teacher is not None)
    combiner = LossCombiner.from_config(terms, student.config,
                                        teacher.config if teacher is not None else None)
    if teacher is None and combiner.needs_teacher:
        need = [n for n, m in combiner.terms.items() if m.needs_teacher and combiner.weights[n]]
        raise ConfigError(f"loss terms {need} need a teacher; use `vlkd-train distill` or set "
                          f"their weight to 0")
    kd = [m for n, m in combiner.terms.items()
          if m.registry_name == "logit_kd" and combiner.weights[n]]
    if teacher is not None and kd:
        mine = label_lists(tokenizer, answers)
        theirs = model_dir_label_lists(cfg.distill.teacher)
        for loss in kd:
            try:
                loss.check_labels(mine, theirs)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            if loss.head == "mlm" and student.config.vocab_size != teacher.config.vocab_size:
                raise ConfigError(f"logit_kd (head mlm): the student has "
                                  f"{student.config.vocab_size} token logits and the teacher "
                                  f"{teacher.config.vocab_size}; they need the same vocabulary")
    return combiner


def label_lists(tokenizer, answers: list[str] | None) -> dict[str, list[str] | None]:
    """What a model's logits are over, per head: ``mlm`` the tokens by id, ``vqa`` the answers."""
    tokens = None
    if tokenizer is not None:
        tokens = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    return {"mlm": tokens, "vqa": list(answers) if answers is not None else None}


def model_dir_label_lists(model_dir: str | Path) -> dict[str, list[str] | None]:
    """:func:`label_lists` of a model directory (its tokenizer and answers.txt; None for what
    it lacks)."""
    d = Path(model_dir)
    tokenizer = None
    if (d / "vocab.txt").is_file() or (d / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(d)
    answers = load_answer_vocab(d / ANSWERS_NAME) if (d / ANSWERS_NAME).is_file() else None
    return label_lists(tokenizer, answers)


@dataclass
class RunInputs:
    """What a training command assembled (kept together for the trainer and evaluation)."""

    tokenizer: Any
    encoder: TextEncoder
    task: Task
    answers: list[str] | None
    class_names: list[str]
    meta: dict


def run_meta(cfg: RunConfig, tokenizer, class_names: "TagNames | list[str]") -> dict:
    """The input layout a model was trained with (written as ``vlkd_train.json``)."""
    from vlkd import __version__

    d = cfg.data
    tags = class_names if isinstance(class_names, TagNames) else TagNames(list(class_names), [],
                                                                          None)
    return {"task": cfg.task.name, "text_layout": TASKS.get(cfg.task.name).layout_for(cfg),
            **{k: getattr(d, k) for k in LAYOUT_KEYS},
            "class_names": tags.class_names, "attribute_names": tags.attribute_names,
            "tag_vocab": tags.vocab,
            "tokenizer_digest": vocab_digest(tokenizer), "tool_version": __version__}


def tag_class_names(regions: str, tag_regions: str = "") -> list[str]:
    """Class names of the set that gives the box tags for ``regions``."""
    return list(resolve_tag_set(RegionSet(regions), tag_regions or None).class_names)
