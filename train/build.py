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
from .model import VLConfig, VLModel, VQAHead
from .stream import Record, RegionStream, resolve_tag_set
from .tasks import TASKS, Task, TextEncoder
from .tokenizer import TokenizerError, load_tokenizer, vocab_digest

log = logging.getLogger(__name__)

__all__ = ["META_NAME", "ANSWERS_NAME", "read_meta", "resolve_tokenizer", "load_answers",
           "train_records", "eval_records", "build_model", "load_model_dir", "save_model_dir",
           "make_encoder", "make_stream", "build_combiner", "RunInputs", "corpus_views",
           "primary_view", "train_stream", "scst_records", "scst_module", "freeze_word_embeddings"]

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


def _trained_for_other_task(model: str) -> str | None:
    """The task a vlkd model directory was trained for (its ``vlkd_train.json``) when that is
    not vqa and it has no answer vocabulary of its own: its VQA head never trained; else None."""
    if not _is_model_dir(model) or (Path(model) / ANSWERS_NAME).is_file():
        return None
    task = read_meta(model).get("task")
    return task if task not in (None, "vqa") else None


def build_model(spec: ModelSpec, *, region_dim: int, vocab_size: int,
                num_answers: int | None = None, num_itm_classes: int | None = None) -> VLModel:
    """The model of ``spec`` (preset, config file or directory), checked against the data.

    Args:
        spec: The ``model`` config section.
        region_dim: The region set's feature width (a new model takes it).
        vocab_size: The tokenizer's size (a new model takes it unless initialised from BERT).
        num_answers: VQA answer count (a new model takes it, and so does the VQA head of a
            model directory trained for another task, initialised anew; a VQA model with
            another count is refused).
        num_itm_classes: Image-text matching outputs the task needs (a new model takes it; a
            trained model with another count is refused).
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
        if num_itm_classes:
            new["num_itm_classes"] = num_itm_classes
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
        other = _trained_for_other_task(spec.model)
        if other is None:
            raise ConfigError(f"model {spec.model!r} predicts {c.num_answers} answers but the "
                              f"answer vocabulary has {num_answers}; pass the model's "
                              "answers.txt as data.answer_vocab")
        # A model trained for another task (pre-training, captioning) carries the VQA head of
        # its initialisation, never trained: start it anew for this vocabulary, as Oscar's
        # run_vqa.py does with the classifier a pre-training checkpoint lacks.
        log.info("model %s was trained for %r, not vqa: its VQA head (%d answers, never "
                 "trained) is initialised anew for %d answers", spec.model, other,
                 c.num_answers, num_answers)
        c.num_answers = num_answers
        model.vqa_head = VQAHead(c)
        model.vqa_head.apply(model._init_module)
    if num_itm_classes and "itm" in c.heads and c.num_itm_classes != num_itm_classes:
        raise ConfigError(f"model {spec.model!r} has {c.num_itm_classes} image-text matching "
                          f"outputs but task.contrast_classes is {num_itm_classes}; start the "
                          f"{num_itm_classes}-way contrastive loss from a new model or one "
                          "trained with it")
    return model


def freeze_word_embeddings(model: VLModel) -> None:
    """``optim.freeze_embedding``: the word embeddings (and the masked-token decoder tied to
    them) get no gradient and no optimizer state (Oscar's ``--freeze_embedding``)."""
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)


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


def corpus_views(cfg: RunConfig) -> list[tuple[str, RunConfig, Any]]:
    """``data.corpora`` as (name, the run's config seen from the corpus, the corpus): the
    view's ``data.regions`` / ``teacher_regions`` / ``tag_regions`` / ``pairs`` are the
    corpus's and its ``train.seed`` is :func:`~vlkd.train.mixture.corpus_seed` of its index
    (the first corpus keeps the run's seed)."""
    import dataclasses

    from .mixture import corpus_seed

    out = []
    for i, c in enumerate(cfg.data.corpora):
        name = c.name or f"corpus{i}"
        if not c.regions:
            raise ConfigError(f"data.corpora[{i}] ({name}): no region set (regions=SET)")
        data = dataclasses.replace(cfg.data, regions=c.regions, teacher_regions=c.teacher_regions,
                                   tag_regions=c.tag_regions, pairs=c.pairs, corpora=[])
        train = dataclasses.replace(cfg.train, seed=corpus_seed(cfg.train.seed, i))
        out.append((name, dataclasses.replace(cfg, data=data, train=train), c))
    return out


def primary_view(cfg: RunConfig) -> RunConfig:
    """The config whose ``data`` sets fix the model's inputs (feature widths, tag names, the
    teacher set checked): ``cfg`` itself, or with ``data.corpora`` the first corpus's view
    (every other corpus must give the same inputs; :func:`train_stream` checks)."""
    import dataclasses

    if not cfg.data.corpora:
        return cfg
    if cfg.data.regions or cfg.data.pairs or cfg.data.teacher_regions:
        raise ConfigError("data.corpora replaces data.regions, data.teacher_regions and "
                          "data.pairs (--regions / --student-regions / --teacher-regions / "
                          "--pairs); give each corpus its own")
    view = corpus_views(cfg)[0][1]
    return dataclasses.replace(view, train=cfg.train)


def train_stream(cfg: RunConfig, task: Task, *, distill: bool, answers: list[str] | None = None,
                 records: list[Record] | None = None, rank: int = 0, world_size: int = 1):
    """The training stream: a :class:`~vlkd.train.stream.RegionStream` over ``data.regions``
    (the task's records, or ``records``), or, with ``data.corpora``, a
    :class:`~vlkd.train.mixture.MixedStream` of one stream per corpus (the task's
    :meth:`~vlkd.train.tasks.base.Task.corpus_records`), checked to give the model the same
    inputs (feature widths, tag class names)."""
    d = cfg.data
    if not d.corpora:
        return make_stream(cfg, records if records is not None else train_records(cfg, answers),
                           task, regions=d.regions,
                           teacher_regions=d.teacher_regions if distill else None,
                           rank=rank, world_size=world_size)
    from .mixture import MixedStream

    spec = TASKS.get(cfg.task.name)
    streams, names = [], []
    for i, (name, view, corpus) in enumerate(corpus_views(cfg)):
        if distill and not corpus.teacher_regions:
            raise ConfigError(f"data.corpora[{i}] ({name}): distill needs its teacher_regions "
                              "(the teacher-features set aligned to its regions)")
        recs = spec.corpus_records(cfg, _named(corpus, name), answers)
        s = make_stream(view, recs, task, regions=corpus.regions,
                        teacher_regions=corpus.teacher_regions if distill else None,
                        rank=rank, world_size=world_size)
        if streams:
            first, what = streams[0], f"data.corpora[{i}] ({name}) and [0] ({names[0]})"
            if s.regions.feature_dim != first.regions.feature_dim:
                raise ConfigError(f"{what} have {s.regions.feature_dim}-d and "
                                  f"{first.regions.feature_dim}-d region features; one model "
                                  "reads them all, so they need the same detector's features")
            if distill and s.teacher.feature_dim != first.teacher.feature_dim:
                raise ConfigError(f"{what} have {s.teacher.feature_dim}-d and "
                                  f"{first.teacher.feature_dim}-d teacher features")
            if (s.class_names, s.attribute_names) != (first.class_names, first.attribute_names):
                raise ConfigError(f"{what} have different tag class names (their tag sets "
                                  f"{s.tags.path} and {first.tags.path}); the tags of every "
                                  "corpus must come from the same detector's classes")
        streams.append(s)
        names.append(name)
    return MixedStream(streams, [c.weight for c in d.corpora], names, collate=task.collate,
                       seed=cfg.train.seed)


def _named(corpus, name: str):
    """The corpus with its default name filled in (``corpus<i>``)."""
    import dataclasses

    return corpus if corpus.name else dataclasses.replace(corpus, name=name)


def scst_records(cfg: RunConfig) -> tuple[list[Record], dict[str, list[str]]]:
    """SCST's training samples: one record per training image of ``data.captions`` /
    ``data.split`` (its text empty: the caption is sampled), and the image's reference
    captions, which the reward scores the samples against."""
    from vlkd.data.captions import captions_by_image

    from .tasks.caption import _load_caption_split

    if not cfg.data.captions:
        raise ConfigError("--scst needs data.captions (--captions FILE): the training references")
    refs = captions_by_image(_load_caption_split(cfg.data.captions, cfg.data.split))
    return [Record(i, i) for i in sorted(refs)], refs


def scst_module(cfg: RunConfig, model: VLModel, combiner, *, tokenizer,
                references: dict[str, list[str]], teacher: VLModel | None = None,
                teacher_task: str = "none", env=None):
    """The :class:`~vlkd.train.scst.SCSTModule` of a ``--scst`` run: the references as the
    reward compares them, CIDEr-D document frequencies from ``scst.cider_df`` (default
    ``<output_dir>/cider-df.json.gz``; counted once by rank 0 and saved, read by the others),
    and the frozen teacher (on the device) for ``distill --scst``."""
    from .distributed import barrier
    from .scst import CiderReward, SCSTModule, reference_texts

    s = cfg.scst
    refs = reference_texts(tokenizer, references)
    path = s.cider_df or str(Path(cfg.train.output_dir) / "cider-df.json.gz")
    main = env is None or env.is_main
    reward = CiderReward.cached(path, refs) if main else None
    if env is not None:
        barrier(env)
    if reward is None:
        reward = CiderReward.cached(path, refs, write=False)
    if teacher is not None:
        teacher.to(env.device if env is not None else "cpu").eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    return SCSTModule(model, combiner, references=refs, reward=reward, tokenizer=tokenizer,
                      samples=s.samples, baseline=s.baseline, max_len=s.max_len,
                      max_text_len=cfg.data.max_text_len, teacher=teacher,
                      teacher_task=teacher_task)


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
