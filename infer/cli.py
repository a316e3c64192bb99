"""`vlkd-infer`: images to captions or answers through a pipeline bundle (docs/INFER.md).

Every option sets one key of :class:`~vlkd.infer.config.InferConfig`; a run's config is the
defaults (the bundle's ``pipeline.yaml`` as the ``pipeline`` section) ← ``--config FILE`` ← the
options ← ``--set key=value``, saved beside the results as ``<out stem>.config.yaml``.

Exit status: 0 done (unusable images are listed and skipped); 1 refused (bad inputs, a bundle
that cannot be read; the message says why); 3 no image could be used at all.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from vlkd import __version__
from vlkd.common.config import ConfigError, option, option_flags, save, set_option, \
    split_options

from .config import DEVICES, PRECISIONS, InferConfig

log = logging.getLogger("vlkd.infer")

#: exit status when no image of the input could be used
EXIT_NO_IMAGES = 3


@click.group("vlkd-infer",
             context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="vlkd-infer")
def main() -> None:
    """Captions and answers for your own images, through a pipeline bundle (a detector and a
    VL model in one process; no region set is written unless --save-regions).

    \b
    caption   images -> COCO caption results JSON [{"image_id", "caption"}]
    answer    images + questions -> VQA results JSON [{"question_id", "answer"}]
    export    detector folder + model directory -> bundle (also `vlkd-train export`)
    """


def _key(key: str, *flags: str, **kwargs):
    return option(InferConfig, key, *flags, **kwargs)


_RUN_OPTIONS = [
    _key("bundle", "--bundle"),
    _key("images", "--images"),
    _key("image_root", "--image-root"),
    _key("out", "--out", "-o"),
    _key("save_regions", "--save-regions"),
    _key("device", "--device", metavar="|".join(DEVICES)),
    _key("precision", "--precision", type=click.Choice(PRECISIONS)),
    _key("batch_size", "--batch-size"),
    _key("num_workers", "--num-workers"),
    _key("threads", "--threads"),
    _key("max_pixels", "--max-pixels"),
    _key("pipeline.beam_size", "--beam-size", default_text="the bundle's"),
    _key("pipeline.max_len", "--max-len", default_text="the bundle's"),
    click.option("--config", "config_path", type=click.Path(dir_okay=False),
                 help="YAML file with any of the keys (below the options, above the defaults)."),
    set_option(),
]


def _run_options(f):
    for o in reversed(_RUN_OPTIONS):
        f = o(f)
    return f


def _prog() -> str:
    """The program's name (``vlkd-infer``, or ``vlkd-train`` when it runs ``export``)."""
    ctx = click.get_current_context(silent=True)
    return ctx.find_root().info_name if ctx is not None else "vlkd-infer"


def _fail(e: Exception, command: str) -> None:
    click.echo(f"{_prog()} {command}: error: {e}", err=True)
    sys.exit(1)


def _prepare() -> None:
    """Before a command loads a detector: quiet known library warnings, and import the plugins
    of VLKD_PLUGINS and the vlkd.plugins entry points (a bundle whose detector needs one)."""
    from vlkd.extract.cli import quiet_library_warnings
    from vlkd.extract.plugins import PluginError, load_plugins

    quiet_library_warnings()
    try:
        load_plugins(())
    except PluginError as e:
        raise click.ClickException(str(e)) from None


def _resolve(config_path, options: dict, overrides) -> InferConfig:
    """The run's config, its ``pipeline`` section starting from the bundle's pipeline.yaml."""
    from vlkd.common.config import load

    from .bundle import Bundle
    from .config import check_infer_config

    flags = option_flags(click.get_current_context().command)
    # the bundle (from any layer) first: its pipeline.yaml is the defaults of `pipeline`
    first = load(InferConfig, config_path, options=options, overrides=overrides,
                 option_names=flags)
    bundle = Bundle.open(first.bundle)
    cfg = load(InferConfig, config_path, options=options, overrides=overrides,
               base=InferConfig(pipeline=bundle.pipeline), option_names=flags)
    check_infer_config(cfg)
    return cfg


def _side(out: Path, what: str) -> Path:
    """``results.json`` -> ``results.<what>``: the files written beside the results."""
    return out.with_name(f"{out.stem}.{what}")


def _run(command: str, config_path, overrides, options: dict, extra: dict | None = None):
    """Load the bundle, run the images, write the results (caption and answer)."""
    _prepare()
    import torch

    from vlkd.data.images import ImageSourceError, open_image_source
    from vlkd.extract.detector import DetectorError
    from vlkd.train.evaluation import write_predictions

    from .bundle import BundleError
    from .inputs import InputError, load_questions, match_questions
    from .pipeline import Pipeline

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        cfg = _resolve(config_path, {**options, **(extra or {})}, overrides)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        source = open_image_source(cfg.images, cfg.image_root)
        records = list(source.records)
        questions = None
        if command == "answer":
            if not cfg.questions:
                raise InputError("answer needs --questions FILE")
            questions = load_questions(cfg.questions)
            match_questions(questions, [r.image_id for r in records], f"--images {cfg.images}")
            asked = {q.image_id for q in questions}
            records = [r for r in records if r.image_id in asked]
        pipe = Pipeline.from_pretrained(cfg.bundle, device=cfg.device, precision=cfg.precision,
                                        batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                        max_pixels=cfg.max_pixels, pipeline=cfg.pipeline)
        wanted = "vqa" if command == "answer" else "caption"
        if pipe.task != wanted:
            other = "answer" if pipe.task == "vqa" else "caption"
            raise InputError(f"bundle {cfg.bundle} holds a {pipe.task!r} model; use `vlkd-infer "
                             f"{other}`, or a bundle exported from a --task {wanted} model")
        if cfg.save_regions:
            rs = pipe.extract(cfg.images, cfg.save_regions, cfg.image_root)
            pairs = Pipeline.regions_from_set(rs, records)
        else:
            pairs = pipe.regions_of_records(records)
        out = Path(cfg.out)
        if command == "caption":
            results = pipe.captions(pairs)
            preds = {r.image_id: r.caption for r in results if r.error is None}
            failures = [{"image_id": r.image_id, "reason": r.error} for r in results
                        if r.error is not None]
            write_predictions("caption", preds, out)
            done = f"{len(preds)} of {len(records)} images captioned"
        else:
            results = pipe.answers(pairs, questions, top_k=max(1, cfg.top_k))
            preds = {r.question_id: r.answer for r in results if r.error is None}
            failures = _answer_failures(results)
            write_predictions("vqa", preds, out)
            if cfg.top_k:
                _write_json(_side(out, "topk.json"), [
                    {"question_id": r.question_id, "image_id": r.image_id,
                     "question": r.question, "tags": r.tags,
                     "answers": [{"answer": a, "score": round(s, 6)} for a, s in r.top_k]}
                    for r in results if r.error is None])
            done = f"{len(preds)} of {len(questions)} questions answered"
        _write_json(_side(out, "failures.json"), failures)
        save(cfg, out.parent, _side(out, "config.yaml").name)
    except (ConfigError, BundleError, InputError, ImageSourceError, DetectorError,
            FileNotFoundError, ValueError) as e:
        _fail(e, command)
    for f in failures:
        click.echo(f"skipped image {f['image_id']!r}: {f['reason']}", err=True)
    click.echo(f"vlkd-infer {command}: {done}" + (f", {len(failures)} image(s) skipped (listed in "
                                                  f"{_side(out, 'failures.json')})"
                                                  if failures else "") + f" -> {out}", err=True)
    if records and len(failures) == len(records):
        click.echo(f"vlkd-infer {command}: no image could be used", err=True)
        sys.exit(EXIT_NO_IMAGES)


def _answer_failures(results) -> list[dict]:
    """One entry per skipped image, with the questions about it."""
    by_image: dict[str, dict] = {}
    for r in results:
        if r.error is not None:
            e = by_image.setdefault(r.image_id, {"image_id": r.image_id, "reason": r.error,
                                                 "question_ids": []})
            e["question_ids"].append(r.question_id)
    return [by_image[k] for k in sorted(by_image)]


def _write_json(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


@main.command()
@_run_options
def caption(config_path, overrides, **options):
    """Caption images: COCO caption results JSON ([{"image_id", "caption"}], numeric ids as
    integers, as the COCO evaluation server takes them), one entry per usable image.

    Beside --out: <stem>.failures.json (the images skipped and why) and <stem>.config.yaml
    (the resolved config).
    """
    _run("caption", config_path, overrides, split_options(options)[0])


@main.command()
@_run_options
@_key("questions", "--questions", default_text="required")
@_key("top_k", "--top-k")
def answer(config_path, overrides, **options):
    """Answer questions about images: official VQA results JSON ([{"question_id", "answer"}]),
    one entry per question whose image is usable.

    Beside --out: <stem>.failures.json (images skipped, with their questions),
    <stem>.config.yaml, and with --top-k K <stem>.topk.json (the K best answers of each
    question with their probabilities, and the tags it was asked with).
    """
    _run("answer", config_path, overrides, split_options(options)[0])


@main.command()
@click.option("--detector", required=True,
              help="Detector folder: config.yaml, weights (model.safetensors, model_final.pth, "
                   "or the only .pth/.pt/.safetensors), class_names.json.")
@click.option("--model", required=True,
              help="vlkd model directory (final/, best/); its tokenizer and answers.txt go "
                   "with it.")
@click.option("--out", "-o", required=True, help="Bundle folder to create (new or empty).")
@click.option("--detector-weights", default=None,
              help="The weights file, when the detector folder holds several.")
@click.option("--regions", default=None,
              help="The proposals set the model was trained on: checked to come from this "
                   "detector; its box selection and feature dtype become the bundle's.")
@click.option("--latency-images", default=4, type=int,
              help="Images of the README card's latency measurement (0: not measured).")
@click.option("--latency-repeats", default=3, type=int,
              help="Passes over them; the fastest is reported.")
@click.option("--threads", default=0, type=int,
              help="CPU threads of the measurement (0: torch's default).")
@click.option("--device", default="cpu", help="Device the latency is measured on.")
@set_option("Bundle setting, repeatable: --set KEY=VALUE over pipeline.yaml's keys "
            "(selection.score_thresh, box_selection, feature_dtype, beam_size, max_len).")
def export(detector, model, out, detector_weights, regions, latency_images, latency_repeats,
           threads, device, overrides):
    """Write a pipeline bundle: detector, VL model, tokenizer, answer list, resolved configs
    and a README card (parameters, measured latency). Refuses a model whose tag classes or
    region width are not the detector's."""
    _prepare()
    from vlkd.common.regionset import RegionSetError
    from vlkd.extract.detector import DetectorError

    from .bundle import BundleError, export_bundle

    try:
        path = export_bundle(detector, model, out, detector_weights=detector_weights,
                             regions=regions, overrides=overrides, latency_images=latency_images,
                             latency_repeats=latency_repeats, threads=threads, device=device,
                             log=lambda s: click.echo(s, err=True))
    except (BundleError, ConfigError, DetectorError, RegionSetError, FileNotFoundError,
            ValueError) as e:
        _fail(e, "export")
    info = json.loads((path / "bundle.json").read_text())
    lat = info.get("latency")
    det_m, vl_m = (info[k]["num_parameters"] / 1e6 for k in ("detector", "model"))
    click.echo(f"wrote {path} ({info['task']}: detector {det_m:.2f} M + VL {vl_m:.2f} M parameters"
               + (f"; {lat['ms_per_image']} ms/image on {lat['device']}, {lat['threads']} "
                  "threads" if lat else "") + ")")


if __name__ == "__main__":
    main()
