"""Training configuration: dataclasses with defaults (the schema), loaded by
:mod:`vlkd.common.config` (OmegaConf structured configs) and saved resolved next to every run.

A run's config is, in this order (later wins): the defaults below, a YAML file (``--config``),
the command's options (``--lr`` is ``optim.lr``; the options are generated from these fields,
see :mod:`vlkd.train.cli`), then ``--set key=value`` overrides (the value parsed as YAML). Types
are checked and unknown keys refused with the list of valid ones. A config file mirrors
:class:`RunConfig`'s sections::

    model: {model: student, init_text: /models/MiniLM-L12-H384-uncased}
    data:  {regions: /data/coco-student, captions: /data/dataset_coco.json, batch_size: 64}
    optim: {lr: 1.0e-4, warmup_ratio: 0.05}
    train: {epochs: 30, checkpoint_every: 2000, eval_every: 2000}
    distill: {teacher: runs/teacher-vta/best}
    losses:                       # merged over the defaults of the task (and distill)
      hidden: {weight: 2.0, params: {queue_size: 8192}}

Mapping-valued fields (``losses``, ``model.config``) merge key by key, so a file or
``--set losses.hidden.weight=2`` changes one loss weight without restating the term. Every
field is documented in docs/TRAIN.md.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vlkd.common import config as common_config
from vlkd.common.config import ConfigError

__all__ = ["ModelSpec", "CorpusConfig", "DataConfig", "TaskConfig", "OptimConfig",
           "TrainConfig", "DistillConfig", "EvalConfig", "SCSTConfig", "RunConfig",
           "load_config", "ConfigError", "default_losses", "resolved_losses"]


@dataclass
class ModelSpec:
    """Which model to train (or evaluate).

    Attributes:
        model: A preset name (``tiny``, ``tiny-teacher``, ``student``, ``teacher``), a YAML/JSON
            file with :class:`~vlkd.train.model.VLConfig` fields (``preset:`` allowed), or a
            directory written by ``save_pretrained`` (a checkpoint's ``model/`` or a run's
            ``best/``).
        config: VLConfig fields overriding the preset/file (ignored for a model directory,
            except fields that do not change shapes, e.g. dropout). ``region_dim`` defaults to
            the region set's feature width.
        init_text: A Hugging Face BERT/MiniLM directory initialising the text part.
        init_oscar: An Oscar/VinVL ``pytorch_model.bin`` (or its directory) to import.
    """

    model: str = "tiny"
    config: dict = field(default_factory=dict)
    init_text: str = ""
    init_oscar: str = ""


@dataclass
class CorpusConfig:
    """One corpus of a pre-training mixture (an entry of ``data.corpora``).

    Attributes:
        name: Its name in logs and sample keys (``<name>/<key>``); default ``corpus<i>``.
        regions: The trained model's region set of this corpus's images (the student's for
            ``distill``).
        teacher_regions: ``distill``: the teacher-features set aligned to ``regions``.
        tag_regions: The tag set (as ``data.tag_regions``; default from ``regions``).
        pairs: The corpus's text: a TSV ``image_id<TAB>caption``, a JSON
            ``[{image_id, caption}]``, any caption file (COCO / Karpathy), or an Oscar / VinVL
            pre-training corpus TSV (``img_key<TAB>label_key<TAB>text_a``; detected by its
            three columns, or ``format: oscar``).
        split: Karpathy split read from a Karpathy ``pairs`` file (empty: every image).
        format: ``auto``, ``pairs`` (the vlkd pair formats above) or ``oscar``.
        oscar_datasets: Oscar corpus: the datasets whose rows are read (the ``img_key``
            prefixes: ``coco``, ``flickr30k``, ``gqa``, ``googlecc`` (``cc``), ``sbu``, ``oi``,
            ...); empty: every row.
        qa_labels: Oscar corpus: ``QA_fileB.tsv`` of the QA rows' dataset (``qa_id<TAB>{"labels":
            [...]}``), whose labels are the QA rows' text b (the answer, in place of the tags).
            QA rows are refused without it.
        image_ids: Oscar corpus: how an ``img_key`` names an image of ``regions``: ``last``
            (its last ``_`` field, as ``OscarTSVDataset.get_img_feature`` looks features up:
            ``coco_391895`` is image ``391895``) or ``key`` (the whole ``img_key``).
        weight: Sampling weight: the corpus's share of every epoch's samples is
            weight / (sum of the weights), whatever its size (a smaller corpus is cycled, a
            larger one partly read each epoch; give the sizes as weights to mix in proportion).
    """

    name: str = ""
    regions: str = ""
    teacher_regions: str = ""
    tag_regions: str = ""
    pairs: str = ""
    split: str = ""
    format: str = "auto"
    oscar_datasets: list = field(default_factory=list)
    qa_labels: str = ""
    image_ids: str = "last"
    weight: float = 1.0


@dataclass
class DataConfig:
    """Region sets, annotations, tokenisation and the streaming loader.

    Attributes:
        regions: The trained model's region set (the student set for ``distill``; for teacher
            adaptation, the teacher-features set pooled over the student's boxes).
        teacher_regions: ``distill``: the teacher-features set aligned to ``regions``.
        tag_regions: The set whose box classes and class names give the object tags. Default:
            ``regions`` when it is a proposals set, else the proposals set a teacher-features
            set records in ``aligned_to`` (tags are the student detector's classes, so the
            teacher and the student read the same tag sequence).
        captions: Karpathy ``dataset_coco.json`` or COCO ``captions_*.json`` (caption task).
        split: Karpathy split to train on (``train`` includes ``restval``); empty for COCO files.
        vqa_questions: VQA v2 questions JSON (vqa task).
        vqa_annotations: VQA v2 annotations JSON (vqa task).
        answer_vocab: Answer vocabulary: one answer per line, or Oscar's / bottom-up's
            ``trainval_ans2label.pkl`` (Oscar's classifier order) or ``trainval_label2ans.pkl``
            (read with a restricted unpickler). Default: the model directory's
            ``answers.txt``, else built from ``answer_vocab_annotations``.
        answer_vocab_annotations: VQA annotation files whose ``multiple_choice_answer`` build
            the vocabulary (bottom-up-attention-vqa's ``filter_answers``). Default:
            ``data.vqa_annotations`` plus ``eval.vqa_annotations`` when set (train + val, as
            bottom-up's ``trainval`` list).
        answer_min_count: A built vocabulary keeps the (preprocessed) multiple-choice answers
            of at least this many questions (bottom-up: 9 over VQA v2 train + val, 3,129).
        soft_score: VQA targets: ``butd`` (0, 0.3, 0.6, 0.9, 1 for 0, 1, 2, 3, >= 4 humans:
            bottom-up-attention-vqa's ``get_score``, Oscar's data) or ``linear`` (min(n/3, 1)).
        target_answers: Which form of the human answers the targets count: ``raw`` (as
            written in the annotations, as bottom-up's ``compute_target`` counts them) or
            ``preprocessed`` (``preprocess_answer`` first, so "two" counts for "2").
        pairs: (image id, caption) pairs for the pretrain task (TSV or JSON), or an Oscar /
            VinVL pre-training corpus TSV (caption rows; see :class:`CorpusConfig`).
        corpora: pretrain: several corpora mixed in one run, each with its region sets, text
            and sampling weight (:class:`CorpusConfig`); replaces ``regions``,
            ``teacher_regions``, ``tag_regions`` and ``pairs``. Streamed by
            :class:`~vlkd.train.mixture.MixedStream`: per epoch each corpus contributes its
            weight's share of the samples exactly, in a seeded order that resumes exactly.
        tokenizer: Directory with a BERT WordPiece ``vocab.txt``. Default: the model
            directory's tokenizer.
        max_text_len: Caption tokens, [CLS] and [SEP] included (``split`` layout).
        max_tag_len: Tag tokens, the closing [SEP] included (``split`` layout).
        max_seq_len: ``pair`` layout: ``[CLS] question [SEP] tags [SEP]`` tokens at most; the
            longer of question and tags loses its last token until they fit (Oscar
            ``run_vqa.py`` ``max_seq_length`` 128 and ``_truncate_seq_pair``).
        text_layout: ``auto`` (the task's: ``pair`` for vqa, ``split`` for caption and
            pretrain), ``pair`` (Oscar's VQA input: text then tags at contiguous positions,
            limited jointly by ``max_seq_len``) or ``split`` (text padded to ``max_text_len``
            positions, tags at positions ``max_text_len + j``: Oscar's captioning input).
        max_regions: Regions per image (the first ones, in stored order).
        unique_tags: One tag per distinct class instead of one per box.
        tag_source: ``boxes``: one tag per region, the tag set's class of that box (the tag
            set is aligned with ``regions``); ``image``: the classes of ``tag_regions``' own
            boxes of each image, matched by image id, box-independent (any set over the same
            images, e.g. a COCO-trained detector's proposals, as Oscar's VQA recipe does).
        tag_vocab: A file of class names, one per line, that may become tags (e.g.
            ``configs/tags/coco80.txt``, the 80 COCO classes); empty: every class.
        tag_attributes: "Attribute + object" tags (``red car``) from the tag set's stored
            attributes (``attr_ids``, ``attribute_names``: extracted with ``--attributes``).
        batch_size: Samples per batch and process.
        num_workers: DataLoader worker processes per process.
        chunk_size: Consecutive images read at once from a shard.
        shuffle_buffer: Samples in the shuffle buffer (0: no buffer shuffle).
    """

    regions: str = ""
    teacher_regions: str = ""
    tag_regions: str = ""
    captions: str = ""
    split: str = "train"
    vqa_questions: str = ""
    vqa_annotations: str = ""
    answer_vocab: str = ""
    answer_vocab_annotations: list = field(default_factory=list)
    answer_min_count: int = 9
    soft_score: str = "butd"
    target_answers: str = "raw"
    pairs: str = ""
    corpora: list[CorpusConfig] = field(default_factory=list)
    tokenizer: str = ""
    max_text_len: int = 40
    max_tag_len: int = 30
    max_seq_len: int = 128
    text_layout: str = "auto"
    max_regions: int = 50
    unique_tags: bool = False
    tag_source: str = "boxes"
    tag_vocab: str = ""
    tag_attributes: bool = False
    batch_size: int = 32
    num_workers: int = 2
    chunk_size: int = 64
    shuffle_buffer: int = 1024


@dataclass
class TaskConfig:
    """What is learnt.

    Attributes:
        name: A task of the registry (:mod:`vlkd.train.tasks`): ``caption`` (Oscar masked
            seq2seq), ``vqa`` (soft-score BCE), ``pretrain`` (masked tokens over text and tags
            + contrastive tag swap).
        mask_prob: Fraction of caption (text) tokens masked.
        max_masked: At most this many masked text tokens per sample (Oscar: 3).
        tag_mask_prob: pretrain: fraction of tag tokens masked.
        tag_swap_prob: pretrain: probability that a sample's tags are replaced by another
            sample's (image-text matching label 1; matched pairs are 0, as Oscar's).
        caption_swap_prob: pretrain: probability that a sample's caption (text a) is replaced
            by another image's (Oscar's ``texta_false_prob``; label 2 with
            ``contrast_classes: 3``, else 1). 0: Oscar's contrastive loss; VinVL's Oscar+
            recipe is 0.25 with ``tag_swap_prob: 0.25`` and ``contrast_classes: 3``.
        contrast_classes: pretrain: image-text matching classes (Oscar's
            ``num_contrast_classes``): 2 (matched / not) or 3 (Oscar+: matched / polluted tags
            / polluted caption). A new model's ITM head gets this many outputs.
        label_smoothing: Masked-token cross-entropy label smoothing.
        drop_worst_ratio: caption: fraction of the masked tokens with the highest loss left
            out of each batch's loss (VinVL's recipe: 0.2), once ``drop_worst_after`` training
            forwards have run (Oscar ``BertCaptioningLoss``); 0: off.
        drop_worst_after: caption: training forwards (micro-batches) before the worst tokens
            are dropped (VinVL's recipe: 20000).
    """

    name: str = "caption"
    mask_prob: float = 0.15
    max_masked: int = 3
    tag_mask_prob: float = 0.15
    tag_swap_prob: float = 0.5
    caption_swap_prob: float = 0.0
    contrast_classes: int = 2
    label_smoothing: float = 0.1
    drop_worst_ratio: float = 0.0
    drop_worst_after: int = 0


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then linear decay to zero.

    Attributes:
        lr: Peak learning rate.
        weight_decay: AdamW decay (not applied to biases and LayerNorm weights).
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: Warm-up optimizer steps (wins over ``warmup_ratio`` when > 0).
        warmup_ratio: Warm-up as a fraction of all optimizer steps.
        max_grad_norm: Gradient clipping norm (0: no clipping).
        grad_accum: Micro-batches per optimizer step.
        freeze_embedding: Keep the word embeddings fixed (Oscar's ``--freeze_embedding``,
            VinVL's captioning recipe); the masked-token head's decoder is tied to them, so it
            stays fixed too.
    """

    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    freeze_embedding: bool = False


@dataclass
class TrainConfig:
    """The loop.

    Attributes:
        output_dir: Run directory (config, metrics.jsonl, TensorBoard, checkpoints, best/).
        seed: Seeds the model init, the data order, masking and dropout.
        epochs: Passes over the data (when ``max_steps`` is 0).
        max_steps: Optimizer steps to run (0: ``epochs`` worth).
        log_every: Optimizer steps between metric lines.
        checkpoint_every: Optimizer steps between checkpoints (0: only at the end).
        keep_checkpoints: Most recent checkpoints kept (the best one is kept apart).
        eval_every: Optimizer steps between evaluations (0: only at the end, when an eval
            set is configured).
        amp: ``auto`` (bf16 on a CUDA device that supports it, else fp16; none on CPU),
            ``bf16``, ``fp16`` or ``none``.
        device: ``auto``, ``cpu``, ``cuda`` (under torchrun each rank takes its local GPU).
        progress: Show a progress bar (rank 0).
        tensorboard: Write TensorBoard events under ``<output_dir>/tb``.
        stop_after: Stop (as if killed, without a final checkpoint) after this optimizer step;
            0 never. For exercising ``--resume``.
        log_samples: Write the keys of the samples every rank trained on, per step, to
            ``<output_dir>/samples/rank<r>.jsonl`` (an audit of the data order).
    """

    output_dir: str = "runs/train"
    seed: int = 42
    epochs: int = 1
    max_steps: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    eval_every: int = 0
    amp: str = "auto"
    device: str = "auto"
    progress: bool = True
    tensorboard: bool = True
    stop_after: int = 0
    log_samples: bool = False


@dataclass
class DistillConfig:
    """``distill`` only.

    Attributes:
        teacher: Teacher model directory (``save_pretrained`` format), frozen in eval mode.
    """

    teacher: str = ""


@dataclass
class EvalConfig:
    """Evaluation (``evaluate``, and periodic evaluation during training).

    Attributes:
        regions: Region set of the evaluated images (default: ``data.regions``).
        captions: Caption references (default: ``data.captions``).
        split: Karpathy split evaluated (``val`` during training, ``test`` for reports).
        vqa_questions: VQA questions of the evaluated split.
        vqa_annotations: Their annotations (none: predictions only, no accuracy).
        beam_size: Captioning beam width (1 = greedy).
        max_len: Longest generated caption, in tokens.
        batch_size: Images (or questions) per batch.
        max_samples: Evaluate only the first N images / questions (0: all); periodic
            evaluation on a subset keeps it cheap.
        metric: The score that picks the best checkpoint (default: ``CIDEr`` for captions,
            ``accuracy`` for VQA).
        spice: ``auto`` (when its Java models are present), ``true`` or ``false``.
        vqa_metric: Version of the official VQA accuracy: ``current`` (GT-Vision-Lab/VQA
            ``vqaEval.py`` since a013f00, 2021-03-11) or ``legacy`` (before it, as papers
            scored before 2021); scores.json names the one used.
    """

    regions: str = ""
    captions: str = ""
    split: str = "val"
    vqa_questions: str = ""
    vqa_annotations: str = ""
    beam_size: int = 5
    max_len: int = 20
    batch_size: int = 32
    max_samples: int = 0
    metric: str = ""
    spice: str = "auto"
    vqa_metric: str = "current"


@dataclass
class SCSTConfig:
    """Self-critical sequence training (``--scst``), Oscar's CIDEr optimisation after
    cross-entropy training (:mod:`vlkd.train.scst`).

    Attributes:
        enabled: Train captioning by SCST: for every training image, ``samples`` captions are
            sampled and scored by CIDEr-D against the image's training references; the loss is
            -(reward - baseline) x the mean log-probability of each sampled caption (Oscar
            ``ScstRewardCriterion``). The task term becomes ``scst``.
        samples: Captions sampled per image (Oscar ``--sc_train_sample_n``).
        baseline: ``greedy`` (the CIDEr-D of the greedy caption, in eval mode: self-critical)
            or ``sample`` (the mean reward of the image's other samples).
        max_len: Longest sampled or greedy caption, in tokens with the closing [SEP] (Oscar
            ``--max_gen_length``).
        cider_df: The CIDEr-D document-frequency cache (JSON, built once from the training
            references and reused while they stay the same); default
            ``<output_dir>/cider-df.json.gz``.
    """

    enabled: bool = False
    samples: int = 5
    baseline: str = "greedy"
    max_len: int = 20
    cider_df: str = ""


@dataclass
class RunConfig:
    """Everything a ``vlkd-train`` run needs; its resolved form is ``<output_dir>/config.yaml``.

    Attributes:
        losses: Loss terms ``{name: {type, weight, params}}``
            (:class:`vlkd.train.losses.LossCombiner`), merged key by key over the defaults of
            the task and command (see :func:`default_losses`).
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scst: SCSTConfig = field(default_factory=SCSTConfig)
    losses: dict = field(default_factory=dict)


def default_losses(task: TaskConfig, distill: bool) -> dict:
    """The loss terms a run starts from, before ``losses:`` from the config is merged in.

    The task's own terms come from its registry entry
    (:meth:`vlkd.train.tasks.base.Task.default_losses`): caption ``task`` = masked-token CE
    (label smoothing); vqa ``task`` = soft-score BCE; pretrain ``mlm`` = masked-token CE over
    text and tags + ``itm`` = tag-swap matching CE. distill adds the paper's terms:
    ``attention`` (attention-distribution MSE, uniform layer map) and ``hidden`` (token-wise
    InfoNCE against a queue of 4096 teacher tokens, τ = 0.07, 128-d linear projections of
    student and teacher tokens), and a ``logits`` term (logit KD over the task's first head,
    weight 0 = off).
    """
    from .tasks import TASKS

    spec = TASKS.get(task.name)
    terms = spec.default_losses(task)
    if distill:
        terms["attention"] = {"type": "attention_mse", "weight": 1.0,
                              "params": {"layer_map": "uniform", "target": "probs"}}
        terms["hidden"] = {"type": "hidden_infonce", "weight": 1.0,
                           "params": {"layer_map": "uniform", "queue_size": 4096,
                                      "temperature": 0.07,
                                      # CRD/MoCo-style 128-d embeddings on both sides: the
                                      # q·queue products then cost d_T/128 less (with the
                                      # identity P_t a distill step is 1.27x the baseline at
                                      # student/teacher size, 1.08x with this; see
                                      # benchmarks/distill_step.py). Set proj_dim: null,
                                      # teacher_projection: identity for the identity variant.
                                      "proj_dim": 128, "teacher_projection": "linear"}}
        terms["logits"] = {"type": "logit_kd", "weight": 0.0,
                           "params": {"temperature": 1.0, "head": spec.heads[0]}}
    return terms


def resolved_losses(cfg: "RunConfig", distill: bool) -> dict:
    """Default loss terms for the run's task and command with ``cfg.losses`` merged in.

    A term whose ``type`` the config changes (``hidden: {type: hidden_mse}``) keeps the
    default's weight but not its ``params``, which belong to the other loss. With
    ``scst.enabled`` the ``task`` term is ``scst`` (:class:`~vlkd.train.losses.SCSTLoss`)."""
    base = default_losses(cfg.task, distill)
    if cfg.scst.enabled:  # the task term is the policy gradient (the KD terms stay)
        base["task"] = {"type": "scst", "weight": 1.0, "params": {}}
    for name, term in (cfg.losses or {}).items():
        old = base.get(name)
        if (isinstance(term, dict) and isinstance(old, dict) and "type" in term
                and term["type"] != old.get("type")):
            base[name] = {k: v for k, v in old.items() if k != "params"}
    return _deep_merge(base, cfg.losses or {})


def _deep_merge(base: dict, update: dict) -> dict:
    """A copy of ``base`` with ``update`` merged in, mapping by mapping."""
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else v
    return out


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                base: RunConfig | None = None, *, options: Mapping[str, Any] | None = None,
                option_names: Mapping[str, str] | None = None) -> RunConfig:
    """A :class:`RunConfig`: defaults (or ``base``) ← YAML file ← options ← ``--set`` overrides.

    Args:
        path: YAML file, or None for the defaults.
        overrides: ``section.key=value`` strings (value parsed as YAML).
        base: Defaults to start from (default: ``RunConfig()``).
        options: Dotted key -> value of the command-line options given (None: not given).
        option_names: Dotted key -> option flag, for error messages.

    Raises:
        ConfigError: unknown key, wrongly typed value, unreadable file.
    """
    return common_config.load(RunConfig, path, options=options, overrides=overrides, base=base,
                              option_names=option_names)
