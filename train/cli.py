"""`vlkd-train`: phase two (finetune, distill, evaluate VL transformers on region sets).

Every training command reads a YAML config (``--config``), then its options, then ``--set
section.key=value`` overrides, in that order; the resolved config is saved as
``<output-dir>/config.yaml``. See docs/TRAIN.md.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import click

from vlkd import __version__
from vlkd.common.config import option, option_flags, save, set_option, split_options
from vlkd.data.vqa import VQA_METRICS

from .config import RunConfig

log = logging.getLogger("vlkd.train")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="vlkd-train")
def main() -> None:
    """Phase two: train and evaluate OSCAR-style VL transformers on region sets.

    \b
    finetune     one model, one task, no teacher (teacher adaptation, student baseline)
    distill      student trained with task loss + attention / hidden-state KD from a teacher
    evaluate     captioning (pycocoevalcap) and VQA (official accuracy)
    export       detector + model -> pipeline bundle for vlkd-infer
    build-vocab  train a BERT WordPiece vocabulary from annotation files
    losses       the loss types, their params and defaults, each task's default terms
    """
    # DataLoader workers fork after the fast tokenizer ran: its thread pool must not be used
    # across the fork (the tokenizers library would warn and fall back anyway).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", force=True)


# ------------------------------------------------------------------------------------ options
def _key(key: str, *flags: str, **kwargs):
    """An option setting config ``key``: help and shown default from :class:`RunConfig`."""
    return option(RunConfig, key, *flags, **kwargs)


class _TaskChoice(click.Choice):
    """The registered task names (:data:`vlkd.train.tasks.TASKS`), read when first needed, so
    that importing the command line does not import the model.

    Args:
        evaluable: Only tasks with an evaluation.
    """

    def __init__(self, evaluable: bool = False):
        self._evaluable = evaluable
        super().__init__(())

    @property
    def choices(self):
        from .tasks import task_names

        return tuple(task_names(evaluable=self._evaluable))

    @choices.setter
    def choices(self, value) -> None:  # click.Choice.__init__ assigns; the registry decides
        pass


_config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False),
    help="YAML config (sections model/data/task/optim/train/distill/eval/losses).")

_COMMON_OPTIONS = [
    _config_option,
    _key("train.output_dir", "--output-dir", "-o"),
    _key("task.name", "--task", type=_TaskChoice()),
    _key("data.captions", "--captions"),
    _key("data.split", "--split"),
    _key("data.vqa_questions", "--vqa-questions"),
    _key("data.vqa_annotations", "--vqa-annotations"),
    _key("data.answer_vocab", "--answer-vocab"),
    _key("eval.vqa_metric", "--vqa-metric", type=click.Choice(list(VQA_METRICS))),
    _key("data.pairs", "--pairs"),
    _key("data.tokenizer", "--tokenizer"),
    _key("data.tag_regions", "--tag-regions"),
    _key("eval.captions", "--eval-captions"),
    _key("eval.split", "--eval-split"),
    _key("eval.vqa_questions", "--eval-vqa-questions"),
    _key("eval.vqa_annotations", "--eval-vqa-annotations"),
    _key("train.max_steps", "--max-steps"),
    _key("train.epochs", "--epochs"),
    _key("data.batch_size", "--batch-size"),
    _key("optim.lr", "--lr"),
    _key("train.seed", "--seed"),
    _key("scst.enabled", "--scst"),
    click.option("--resume", metavar="DIR|auto",
                 help="Continue from a checkpoint directory, or the latest in a run directory. "
                      "'auto': the latest checkpoint of --output-dir when it has one, else start "
                      "at step 0 (the rule for requeued jobs: the same command every time)."),
    set_option(),
]


def _common_options(f):
    for o in reversed(_COMMON_OPTIONS):
        f = o(f)
    return f


def _resolve_config(config_path, options: dict, overrides):
    """The run's config: YAML file ← options ← ``--set`` (errors name the option's flag)."""
    from .config import load_config

    flags = option_flags(click.get_current_context().command)
    return load_config(config_path, overrides, options=options, option_names=flags)


def _fail(e: Exception) -> None:
    click.echo(f"vlkd-train: error: {e}", err=True)
    sys.exit(2)


# ---------------------------------------------------------------------------------- training
def _train(command: str, cfg, resume: str | None) -> None:
    from vlkd.common.regionset import RegionSet

    from . import build
    from .build import RunInputs
    from .config import ConfigError
    from .evaluation import make_eval_fn
    from .tasks import TASKS, build_task
    from .distributed import amp_dtype, seed_everything, setup_distributed, teardown_distributed
    from .trainer import Trainer, TrainModule

    env = setup_distributed(cfg.train.device)
    _setup_logging(env.rank)
    try:
        distill = command == "distill"
        prim = build.primary_view(cfg)  # with data.corpora: the first corpus's sets
        if not prim.data.regions:
            raise ConfigError("no region set: pass --regions (finetune) or --student-regions "
                              "(distill) [data.regions], or data.corpora")
        if distill and not (cfg.distill.teacher and prim.data.teacher_regions):
            raise ConfigError("distill needs --teacher DIR and --teacher-regions DIR" + (
                " (with data.corpora: every corpus's teacher_regions)" if cfg.data.corpora
                else ""))
        if cfg.scst.enabled and (cfg.task.name != "caption" or cfg.data.corpora):
            raise ConfigError("--scst optimises captions: --task caption over data.regions")
        run_dir = Path(cfg.train.output_dir)
        if env.is_main:
            save(cfg, run_dir)
        seed_everything(cfg.train.seed)
        model_dir = cfg.model.model if build._is_model_dir(cfg.model.model) else ""
        spec = TASKS.get(cfg.task.name)
        tokenizer = build.resolve_tokenizer(cfg, model_dir)
        answers = build.load_answers(cfg, model_dir) if spec.needs_answers else None
        regions = RegionSet(prim.data.regions)
        tags = build.tag_names(prim, prim.data.regions)
        class_names = tags.class_names
        encoder = build.make_encoder(cfg, tokenizer, tags)
        # SCST samples the captions: its samples are the evaluation task's (text = [CLS])
        task = build_task(cfg, encoder, train=not cfg.scst.enabled,
                          num_answers=len(answers or []))
        records, scst_refs = build.scst_records(cfg) if cfg.scst.enabled else (None, None)
        stream = build.train_stream(cfg, task, distill=distill, answers=answers,
                                    records=records, rank=env.rank, world_size=env.world_size)
        model = build.build_model(cfg.model, region_dim=regions.feature_dim,
                                  vocab_size=len(tokenizer),
                                  num_answers=len(answers) if answers else None,
                                  num_itm_classes=spec.itm_classes(cfg))
        if cfg.optim.freeze_embedding:
            build.freeze_word_embeddings(model)
        teacher = None
        if distill:
            teacher = build.load_model_dir(cfg.distill.teacher)
            _check_teacher(prim, teacher, tokenizer, model)
        combiner = build.build_combiner(cfg, model, teacher, tokenizer=tokenizer,
                                        answers=answers)
        teacher_task = spec.name if any(
            m.registry_name == "logit_kd" and combiner.weights[n]
            for n, m in combiner.terms.items()) else "none"
        if cfg.scst.enabled:  # the module runs the teacher itself, on the sampled captions
            module = build.scst_module(cfg, model, combiner, tokenizer=tokenizer,
                                       references=scst_refs, teacher=teacher,
                                       teacher_task=teacher_task, env=env)
            teacher = None
        else:
            module = TrainModule(model, combiner, spec.name, task.seq2seq())
        meta = build.run_meta(cfg, tokenizer, tags)
        inputs = RunInputs(tokenizer, encoder, task, answers, class_names, meta)

        def save_model(directory: Path) -> None:
            build.save_model_dir(model, directory, tokenizer, inputs.meta, answers)

        evaluate, metric = None, ""
        amp = amp_dtype(cfg.train.amp, env.device)
        if spec.has_eval(cfg):
            ev_task = build_task(cfg, encoder, train=False, num_answers=len(answers or []))
            ev_records, refs = build.eval_records(cfg, answers)
            ev_stream = build.make_stream(cfg, ev_records, ev_task,
                                          regions=cfg.eval.regions or cfg.data.regions,
                                          shuffle=False, batch_size=cfg.eval.batch_size,
                                          rank=env.rank, world_size=env.world_size)
            evaluate = make_eval_fn(spec.name, ev_stream, refs, cfg, tokenizer=tokenizer,
                                    answers=answers, device=env.device, amp=amp, env=env)
            metric = cfg.eval.metric or spec.metric
        trainer = Trainer(cfg, module, stream, run_dir, env, save_model, teacher=teacher,
                          teacher_task=teacher_task, evaluate=evaluate, eval_metric=metric,
                          name=command)
        if resume == "auto":
            trainer.resume_latest()
        elif resume:
            trainer.resume(resume)
        log.info("%s: %d samples (%d batches/epoch/rank), %d steps, %d-d regions%s, terms %s",
                 command, stream.num_samples, len(stream), trainer.total_steps,
                 regions.feature_dim, f", teacher {cfg.distill.teacher}" if distill else "",
                 sorted(n for n in combiner.terms if combiner.weights[n]))
        # in its own process, a signal after the last step waits for final/ and the exit
        trainer.keep_signal_handlers = _OWN_PROCESS
        trainer.train()
        if env.is_main:
            final = run_dir / "final"
            save_model(final)
            log.info("done: model in %s%s", final,
                     f", best ({trainer.best['metric']} {trainer.best['value']:.4f} at step "
                     f"{trainer.best['step']}) in {run_dir / 'best'}" if trainer.best else "")
        late = trainer.last_signals
        if late is not None and late.requested is not None:
            log.warning("%s came after the last step: the run is complete, nothing to resume",
                        signal.Signals(late.requested).name)
    finally:
        teardown_distributed(env)


def _check_teacher(cfg, teacher, tokenizer, student) -> None:
    from vlkd.common.regionset import RegionSet

    from .build import LAYOUT_KEYS, read_meta
    from .config import ConfigError
    from .tasks import TASKS
    from .tokenizer import vocab_digest

    tset = RegionSet(cfg.data.teacher_regions)
    if teacher.config.region_dim != tset.feature_dim:
        raise ConfigError(f"teacher {cfg.distill.teacher} takes {teacher.config.region_dim}-d "
                          f"features but teacher set {tset.path} has {tset.feature_dim}-d ones")
    meta = read_meta(cfg.distill.teacher)
    digest = meta.get("tokenizer_digest")
    if digest and digest != vocab_digest(tokenizer):
        raise ConfigError(f"teacher {cfg.distill.teacher} was trained with another tokenizer "
                          f"(digest {digest} ≠ {vocab_digest(tokenizer)}); teacher and student "
                          "must read the same token ids: pass the teacher's directory as "
                          "--tokenizer")
    d = cfg.data
    ours = {k: getattr(d, k) for k in LAYOUT_KEYS}
    ours["text_layout"] = TASKS.get(cfg.task.name).layout_for(cfg)
    for key, value in ours.items():
        if key in meta and meta[key] != value:
            log.warning("teacher was trained with data.%s=%s, this run uses %s", key, meta[key],
                        value)
    if teacher.config.vocab_size != student.config.vocab_size:
        log.warning("teacher has %d token embeddings, student %d: logit KD over tokens is "
                    "impossible", teacher.config.vocab_size, student.config.vocab_size)


@main.command()
@_key("data.regions", "--regions")
@_key("model.model", "--model")
@_common_options
def finetune(config_path, overrides, resume, **options):
    """Train one model on one task, without a teacher.

    Used for Visual Token Alignment (adapt a teacher to the student's boxes: --model TEACHER_DIR
    --regions TEACHER_FEATURES_SET) and for the non-distilled student baseline.
    """
    try:
        cfg = _resolve_config(config_path, split_options(options)[0], overrides)
    except ValueError as e:
        _fail(e)
    _run_guarded("finetune", cfg, resume)


# ------------------------------------------------------------------------------- loss terms
def _yaml_value(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def _format_losses(formatter: click.HelpFormatter, *, describe: bool) -> None:
    """Every registered loss (:data:`vlkd.train.losses.LOSSES`) with its params and defaults,
    read from the registry (constructor signatures and ``Args:`` docstrings)."""
    from .losses import describe_losses

    with formatter.section("Loss types (losses.TERM.type) and their params (defaults)"):
        rows = []
        for d in describe_losses():
            teacher = " [needs the teacher]" if d["needs_teacher"] else ""
            if not describe:
                params = ", ".join(f"{p.name}={_yaml_value(p.default)}" for p in d["params"])
                rows.append((d["name"], (params or "no params") + teacher))
                continue
            formatter.write_text(f"{d['name']}: {d['summary']}{teacher}")
            with formatter.indentation():
                formatter.write_dl([(f"{p.name}: {_yaml_value(p.default)}", p.help)
                                    for p in d["params"]] or [("no params", "")])
            formatter.write_paragraph()
        if rows:
            formatter.write_dl(rows)
    formatter.write_paragraph()
    formatter.write_text("Set a param with --set losses.TERM.params.KEY=VALUE, a weight with "
                         "--set losses.TERM.weight=W, another type with --set "
                         "losses.TERM.type=TYPE (TERM: a default term, or a new name).")


def _format_default_terms(formatter: click.HelpFormatter, tasks: list[str],
                          commands: tuple[str, ...]) -> None:
    """The terms ``default_losses`` gives each task and command (before ``losses:``)."""
    from .config import TaskConfig, default_losses

    for name in tasks:
        for command in commands:
            terms = default_losses(TaskConfig(name=name), distill=command == "distill")
            with formatter.section(f"Default terms: {command} --task {name}"):
                formatter.write_dl([
                    (term, f"{t['type']}, weight {_yaml_value(t['weight'])}" + (
                        ", params " + ", ".join(f"{k}={_yaml_value(v)}"
                                                for k, v in t["params"].items())
                        if t.get("params") else ""))
                    for term, t in terms.items()])


class _DistillCommand(click.Command):
    """``distill``: its help ends with the registered losses and their params, generated from
    the registry when the help is shown (so that importing the command line stays light)."""

    def format_epilog(self, ctx, formatter) -> None:
        _format_default_terms(formatter, ["caption"], ("distill",))
        _format_losses(formatter, describe=False)
        formatter.write_paragraph()
        formatter.write_text("`vlkd-train losses [--task T]` says what each param means and "
                             "lists every task's default terms.")
        super().format_epilog(ctx, formatter)


@main.command("losses")
@click.option("--task", type=_TaskChoice(), default=None,
              help="Show the default terms of this task only (default: every task).")
def losses_cmd(task):
    """List the registered loss types with their params and defaults, and the default loss
    terms of each task for finetune and distill (all generated from the registries)."""
    from .tasks import task_names

    formatter = click.HelpFormatter(max_width=100)
    _format_losses(formatter, describe=True)
    _format_default_terms(formatter, [task] if task else task_names(), ("finetune", "distill"))
    click.echo(formatter.getvalue().rstrip())


@main.command(cls=_DistillCommand)
@_key("distill.teacher", "--teacher")
@_key("model.model", "--student")
@_key("data.regions", "--student-regions")
@_key("data.teacher_regions", "--teacher-regions")
@_common_options
def distill(config_path, overrides, resume, **options):
    """Train a student with the task loss plus KD terms from a frozen teacher.

    Default terms: attention-distribution MSE and token-wise hidden-state InfoNCE; weights and
    options from the config's losses section or --set losses.NAME.weight=W.
    """
    try:
        cfg = _resolve_config(config_path, split_options(options)[0], overrides)
    except ValueError as e:
        _fail(e)
    _run_guarded("distill", cfg, resume)


def _run_guarded(command: str, cfg, resume) -> None:
    from vlkd.common.preemption import Stopped

    from .stream import AlignmentError
    from .checkpoint import ResumeError
    from .trainer import NonFiniteLossError

    try:
        _train(command, cfg, resume)
    except NonFiniteLossError as e:
        click.echo(f"vlkd-train {command}: {e}", err=True)
        sys.exit(3)
    except Stopped as e:  # SIGTERM / SIGINT: checkpoint written, every rank stopped together
        click.echo(f"vlkd-train {command}: {e}", err=True)
        sys.exit(e.exit_code)  # 143 / 130
    except (AlignmentError, ResumeError, ValueError, FileNotFoundError, KeyError) as e:
        _fail(e)


# -------------------------------------------------------------------------------- evaluation
@main.command()
@_key("model.model", "--model", required=True, help="Model directory.")
@_key("eval.regions", "--regions", required=True)
@_key("task.name", "--task", type=_TaskChoice(evaluable=True),
      default_text="the model's task")
@_key("eval.captions", "--captions")
@_key("eval.split", "--split")
@_key("eval.vqa_questions", "--vqa-questions")
@_key("eval.vqa_annotations", "--vqa-annotations")
@_key("data.tag_regions", "--tag-regions")
@click.option("--output-dir", "-o", required=True,
              help="Where predictions, scores.json and the resolved config.yaml go.")
@_key("eval.beam_size", "--beam-size")
@click.option("--greedy", is_flag=True, help="Greedy decoding (beam size 1).")
@_key("eval.max_len", "--max-len")
@_key("eval.batch_size", "--batch-size")
@_key("eval.vqa_metric", "--vqa-metric", type=click.Choice(list(VQA_METRICS)))
@_config_option
@set_option()
def evaluate(greedy, output_dir, config_path, overrides, **options):
    """Predict and score: captions (beam search → pycocoevalcap) or VQA (official accuracy).

    Writes predictions (COCO caption results / official VQA results format), scores.json and
    the resolved config.yaml. Without references (no --captions: every image of --regions; no
    --vqa-annotations) it writes the predictions only, e.g. for nocaps or VQA test-dev.
    """
    from .stream import AlignmentError

    try:
        _evaluate(greedy, output_dir, config_path, overrides, split_options(options)[0])
    except (AlignmentError, ValueError, FileNotFoundError, KeyError) as e:
        _fail(e)


def _prepare_evaluation(model_dir: str, regions: str, options: dict, config_path, overrides,
                        greedy: bool = False):
    """What ``evaluate`` scores and ``latency`` times: the resolved config of ``model_dir``
    over ``regions`` (the model's input layout wins over the file and options, ``--set`` over
    it), its tokenizer, answers, model and evaluation stream.

    Returns:
        A namespace with ``task``, ``cfg``, ``spec``, ``env``, ``tokenizer``, ``answers``,
        ``model``, ``stream``, ``refs`` and ``amp``; the caller tears ``env`` down.
    """
    from types import SimpleNamespace

    from vlkd.common.regionset import RegionSet

    from . import build
    from .distributed import amp_dtype, setup_distributed, teardown_distributed
    from .tasks import TASKS, build_task, task_names

    meta = build.read_meta(model_dir)
    task = options.get("task.name") or meta.get("task")
    if task not in task_names(evaluable=True):
        raise ValueError(f"pass --task {'|'.join(task_names(evaluable=True))} (the model "
                         f"directory {model_dir} records task {meta.get('task')!r})")
    spec = TASKS.get(task)
    layout = {f"data.{k}": meta[k] for k in ("text_layout", *build.LAYOUT_KEYS) if k in meta}
    if meta and "text_layout" not in meta:  # written before layouts existed: all were split
        layout["data.text_layout"] = "split"
    cfg = _resolve_config(config_path, {**options, "task.name": task, "data.regions": regions,
                                        **layout}, overrides)
    if greedy:
        cfg.eval.beam_size = 1
    env = setup_distributed(cfg.train.device)
    _setup_logging(env.rank)
    try:
        tokenizer = build.resolve_tokenizer(cfg, model_dir)
        answers = build.load_answers(cfg, model_dir) if spec.needs_answers else None
        tags = build.tag_names(cfg, regions, vocab=None if cfg.data.tag_vocab
                               else meta.get("tag_vocab"))
        class_names = tags.class_names
        if meta.get("class_names") and meta["class_names"] != class_names:
            # Legitimate in ablations (a teacher evaluated with the student's tags), so a note.
            log.warning("the tags of %s come from %d class names that differ from the %d the "
                        "model was trained with", regions, len(class_names),
                        len(meta["class_names"]))
        model = build.load_model_dir(model_dir).to(env.device)
        if model.config.region_dim != RegionSet(regions).feature_dim:
            raise ValueError(f"model takes {model.config.region_dim}-d features, {regions} has "
                             f"{RegionSet(regions).feature_dim}-d ones")
        encoder = build.make_encoder(cfg, tokenizer, tags)
        ev_task = build_task(cfg, encoder, train=False, num_answers=len(answers or []))
        records, refs = build.eval_records(cfg, answers)
        stream = build.make_stream(cfg, records, ev_task, regions=regions, shuffle=False,
                                   batch_size=cfg.eval.batch_size, rank=env.rank,
                                   world_size=env.world_size)
    except BaseException:
        teardown_distributed(env)
        raise
    return SimpleNamespace(task=task, cfg=cfg, spec=spec, env=env, tokenizer=tokenizer,
                           answers=answers, model=model, stream=stream, refs=refs,
                           amp=amp_dtype(cfg.train.amp, env.device))


def _evaluate(greedy, output_dir, config_path, overrides, options):
    from .distributed import teardown_distributed
    from .evaluation import score_predictions, write_predictions

    model_dir, regions = options["model.model"], options["eval.regions"]
    ev = _prepare_evaluation(model_dir, regions, options, config_path, overrides, greedy)
    cfg, env, spec, model, answers = ev.cfg, ev.env, ev.spec, ev.model, ev.answers
    task, tokenizer, stream, refs, amp = ev.task, ev.tokenizer, ev.stream, ev.refs, ev.amp
    try:
        t_predict = time.perf_counter()
        preds = spec.predict(model, stream, cfg, tokenizer=tokenizer, answers=answers,
                             device=env.device, amp=amp, env=env)
        t_predict = time.perf_counter() - t_predict
        if env.is_main:
            out = Path(output_dir)
            save(cfg, out)
            pred_path = write_predictions(task, preds, out / f"predictions_{task}.json")
            scores = score_predictions(task, preds, refs, cfg)
            if refs is None:  # nocaps, test-dev: the results file is what there is to submit
                scores.setdefault("notes", []).append(
                    f"predictions only: no references given (--captions / --vqa-annotations); "
                    f"{pred_path.name} is in the evaluation server's results format")
            scores = {"task": task, "model": str(model_dir), "regions": str(regions),
                      "num_predictions": len(preds), "beam_size": cfg.eval.beam_size,
                      # inference cost: parameters, and wall time per sample (reading,
                      # forward, decoding) on this process's device
                      "num_parameters": sum(p.numel() for p in model.parameters()),
                      "seconds_per_sample": t_predict * env.world_size / max(len(preds), 1),
                      "device": str(env.device),
                      **scores}
            (out / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")
            for k, v in scores.items():
                if isinstance(v, float):
                    click.echo(f"{k:>10s}: {v:.4f}")
            if "vqa_metric" in scores:
                click.echo(f"{'vqa_metric':>10s}: {scores['vqa_metric']} "
                           f"({scores['vqa_metric_ref']})")
            for note in scores.get("notes", []):
                click.echo(f"note: {note}")
            click.echo(f"predictions: {pred_path}\nscores: {out / 'scores.json'}")
    finally:
        teardown_distributed(env)


# ----------------------------------------------------------------------------------- latency
@main.command()
@click.option("--run", "runs", nargs=4, multiple=True, required=True,
              metavar="TASK NAME MODEL REGIONS",
              help="A model to time (repeatable): its task, a label, its directory and the "
                   "region set it reads (as evaluate's --task, --model, --regions).")
@_key("eval.captions", "--captions")
@_key("eval.split", "--split")
@_key("eval.vqa_questions", "--vqa-questions")
@_key("eval.vqa_annotations", "--vqa-annotations")
@_key("eval.max_samples", "--samples")
@_key("eval.batch_size", "--batch-size")
@_key("eval.beam_size", "--beam-size")
@_key("eval.max_len", "--max-len")
@click.option("--repeats", type=click.IntRange(min=1), default=5,
              help="Passes per model, interleaved; the fastest counts.")
@click.option("--threads", type=click.IntRange(min=1), default=1, help="torch CPU threads.")
@click.option("--output-dir", "-o", required=True, help="Where latency.json / latency.md go.")
@_config_option
@set_option()
def latency(runs, repeats, threads, output_dir, config_path, overrides, **options):
    """Time each model's predictions as evaluate makes them, alone, best of --repeats passes.

    Every model predicts the first --samples samples of its evaluation stream with the same
    batch size, beam and threads; writes latency.json and latency.md (vlkd.train.latency).
    """
    import torch

    from .distributed import teardown_distributed
    from .latency import LatencyRow, latency_table, time_passes, write_latency
    from .stream import AlignmentError

    torch.set_num_threads(threads)
    keys = split_options(options)[0]
    rows, passes, envs = [], [], []
    try:
        for task, name, model_dir, regions in runs:
            ev = _prepare_evaluation(model_dir, regions, {**keys, "task.name": task},
                                     config_path, overrides)
            envs.append(ev.env)
            rows.append(LatencyRow(task, name, model_dir, regions, num_parameters=sum(
                p.numel() for p in ev.model.parameters())))
            passes.append(lambda ev=ev: len(ev.spec.predict(
                ev.model, ev.stream, ev.cfg, tokenizer=ev.tokenizer, answers=ev.answers,
                device=ev.env.device, amp=ev.amp, env=ev.env)))
        time_passes(rows, passes, repeats)
    except (AlignmentError, ValueError, FileNotFoundError, KeyError) as e:
        _fail(e)
    finally:
        for env in envs:
            teardown_distributed(env)
    cfg = ev.cfg
    path = write_latency(rows, output_dir, threads=torch.get_num_threads(),
                         batch_size=cfg.eval.batch_size, beam_size=cfg.eval.beam_size,
                         repeats=repeats, device=str(ev.env.device))
    click.echo(latency_table(json.loads(path.read_text())))
    click.echo(f"latency: {path}")

# ------------------------------------------------------------------------------------- vocab
@main.command("build-vocab")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, help="Output tokenizer directory.")
@click.option("--vocab-size", type=int, default=30522, help="Upper bound of the vocabulary.")
@click.option("--min-frequency", type=int, default=2, help="Minimum count of a piece.")
@click.option("--regions", "region_sets", multiple=True,
              help="Region set(s) whose class names (the object tags) must be whole tokens.")
@click.option("--cased", is_flag=True, help="Keep case (default: uncased).")
def build_vocab_cmd(files, out, vocab_size, min_frequency, region_sets, cased):
    """Train a BERT WordPiece vocabulary on annotation files (captions, VQA, pairs, text)."""
    from vlkd.common.regionset import RegionSet

    from .tokenizer import TokenizerError, build_vocab

    extra: list[str] = []
    try:
        for r in region_sets:
            extra.extend(n.replace("_", " ") for n in RegionSet(r).class_names)
        tok = build_vocab(list(files), out, vocab_size=vocab_size, min_frequency=min_frequency,
                          extra_words=extra, lowercase=not cased)
    except (TokenizerError, ValueError) as e:
        _fail(e)
    click.echo(f"wrote {out}: {len(tok)} tokens")



# --------------------------------------------------------------------------------- attention
@main.command("show-attention")
@click.option("--teacher", required=True, help="Teacher model directory.")
@click.option("--student", required=True, help="Student model directory.")
@click.option("--student-regions", required=True, help="Student (proposals) region set.")
@click.option("--teacher-regions", required=True, help="Teacher set aligned to it.")
@click.option("--captions", required=True, help="Caption file the example is taken from.")
@click.option("--split", default="test", help="Karpathy split.")
@click.option("--index", default=0, type=int, help="Which caption (sorted by image id).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output PNG.")
def show_attention(teacher, student, student_regions, teacher_regions, captions, split, index,
                   out):
    """Draw teacher and student attention maps (last layer) for one caption example."""
    from .visualize import attention_figure

    try:
        info = attention_figure(teacher, student, student_regions, teacher_regions, captions,
                                split, out, index=index)
    except (ValueError, FileNotFoundError, KeyError) as e:
        _fail(e)
    click.echo(f"image {info['image_id']}: attention MSE {info['mse']:.3e} -> {out}")


# ------------------------------------------------------------------------------------ export
@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
              add_help_option=False)
@click.pass_context
def export(ctx):
    """Write a pipeline bundle (detector + VL model + tokenizer + answers + README card) for
    vlkd-infer: --detector DIR --model DIR --out BUNDLE (--help for every option).

    It runs `vlkd-infer export` with the same arguments in a child process: the bundle is the
    one place both phases' models meet, and phase two never imports phase one
    (docs/ARCHITECTURE.md).
    """
    import subprocess

    child = ("import sys; from vlkd.infer.cli import main; "
             "main(['export', *sys.argv[1:]], prog_name='vlkd-train')")
    res = subprocess.run([sys.executable, "-c", child, *ctx.args], capture_output=True,
                         text=True)
    click.echo(res.stdout, nl=False)
    click.echo(res.stderr, nl=False, err=True)
    sys.exit(res.returncode)


#: Whether this interpreter is the vlkd-train process itself (the console script, or
#: ``python -m vlkd.train.cli`` as torchrun starts it), which exits right after its command;
#: not a call from Python such as click's CliRunner, whose signal handlers must be restored.
_OWN_PROCESS = False


def run() -> None:
    """The ``vlkd-train`` console script: :func:`main` in a process of its own."""
    global _OWN_PROCESS
    _OWN_PROCESS = True
    main()


if __name__ == "__main__":
    run()
