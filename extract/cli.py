"""`vlkd-extract`: phase one of the pipeline (detectron2 boxes and features into region sets).

The options of ``proposals``, ``teacher-features`` and ``train-detector`` are generated from their
dataclasses in ``vlkd.extract.options`` (help text and defaults live there, once). Each of these
commands also reads a job file (``--job-config FILE``, YAML with the same keys) and ``--set
key=value`` overrides: defaults, then the file, then the options, then ``--set``. Unknown keys
are refused with the valid ones. ``--plugin MODULE`` (before the command) imports a module that
registers custom detectron2 parts (``vlkd.extract.plugins``).
"""
from __future__ import annotations

import logging
import warnings

import click

from vlkd import __version__
from vlkd.common.config import ConfigError, load, option, option_flags, set_option, split_options
from vlkd.common.preemption import Stopped

from .options import (BACKENDS, BOX_SELECTION_RULES, FEATURE_DTYPES, LOG_FORMATS,
                      PRECISION_NAMES, TRAIN_DETECTOR_CONFIG_FILE, ProposalsConfig,
                      TeacherConfig, TrainDetectorOptions)

from .options import EXPORT_LAYOUTS, TSV_FORMATS, ExportTsvConfig, ImportTsvConfig

@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--plugin", "plugins", multiple=True, metavar="MODULE",
              help="Import MODULE before a command that builds a detector (proposals, "
              "teacher-features, train-detector): it registers custom detectron2 backbones, "
              "meta-architectures, ROI heads or pooler families. Repeatable; also read from "
              "VLKD_PLUGINS (comma-separated) and the 'vlkd.plugins' entry points.")
@click.version_option(__version__, prog_name="vlkd-extract")
def main(plugins) -> None:
    """Phase one: run detectron2 detectors over images and write region sets.

    \b
    proposals         student detector -> boxes + student features
    teacher-features  teacher features pooled over the student's boxes (VTA)
    import-tsv        Oscar/VinVL, BUTD or SGB TSV features -> a region set
    export-tsv        a region set -> Oscar/VinVL TSV files (run_captioning.py, run_vqa.py)
    validate          check a region set (and its alignment with proposals)
    inspect           summarise a set, draw boxes on an image
    status            which shards are complete, running, partial or missing
    train-detector    train a detectron2 detector on COCO-format data (the demo's)
    convert-detector  another project's detector (VinVL's) as a detectron2 model
    launch            run a job's shards as local processes (one per GPU, or CPU workers)
    """


def quiet_library_warnings() -> None:
    """Silence known, harmless third-party warnings so that stderr carries only the job's own
    messages (one JSON object per line with ``--log-format json``). Called by the commands
    only: importing vlkd changes no warning filter."""
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated",
                            category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"torch\.meshgrid: in an upcoming release",
                            category=UserWarning)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


def _prepare() -> None:
    """Before a command builds a detector: quiet warnings, import the plugins."""
    from .plugins import PluginError, load_plugins

    quiet_library_warnings()
    try:
        load_plugins(click.get_current_context().find_root().params.get("plugins") or ())
    except PluginError as e:
        raise click.ClickException(str(e)) from None


# ------------------------------------------------------------------------ generated options

def _options(*opts):
    """One decorator applying ``opts`` in order."""
    def apply(f):
        for o in reversed(opts):
            f = o(f)
        return f
    return apply


_job_config_option = click.option(
    "--job-config", "job_config", default=None, type=click.Path(exists=True, dir_okay=False),
    metavar="FILE", help="YAML file of this command's options (keys as in the [key] of each "
    "option, e.g. a set's config.yaml); the command line overrides it.")


def _job_options(schema, first=(), specific=()):
    """The options of an extraction job over ``schema`` (``ProposalsConfig`` or
    ``TeacherConfig``): ``first``, where the images and the detector are, ``specific`` ones,
    how it computes and runs, the job file and ``--set``. ``first`` and ``specific`` are
    ``(key, flag, click kwargs)``."""
    def o(key, *flags, **kw):
        return option(schema, key, *flags, **kw)
    return _options(
        *[o(key, flag, **kw) for key, flag, kw in first],
        o("images", "--images"),
        o("image_root", "--image-root"),
        o("config", "--config", type=click.Path(exists=True, dir_okay=False)),
        o("weights", "--weights"),
        o("out", "--out", type=click.Path(file_okay=False)),
        o("num_shards", "--num-shards", type=click.IntRange(min=1)),
        o("shard_index", "--shard-index"),
        o("backend", "--backend", type=click.Choice(BACKENDS)),
        o("batch_size", "--batch-size", type=click.IntRange(min=1)),
        o("num_workers", "--num-workers", type=click.IntRange(min=0)),
        o("device", "--device"),
        o("precision", "--precision", type=click.Choice(PRECISION_NAMES)),
        *[o(key, flag, **kw) for key, flag, kw in specific],
        o("attributes.enabled", "--attributes"),
        o("attributes.top_k", "--attr-top-k", type=click.IntRange(min=1)),
        o("attributes.score_thresh", "--attr-thresh", type=float),
        o("attributes.max_per_image", "--attr-max-per-image", type=click.IntRange(min=0)),
        o("feature_dtype", "--feature-dtype", type=click.Choice(FEATURE_DTYPES)),
        o("max_pixels", "--max-pixels", type=click.IntRange(min=1)),
        o("trust_pickle", "--trust-pickle"),
        o("log_format", "--log-format", type=click.Choice(LOG_FORMATS)),
        o("progress", "--no-progress"),
        o("window", "--commit-every", type=click.IntRange(min=0)),
        _job_config_option,
        set_option())


def _load(schema, job_config, overrides, kwargs, extra=None):
    """The command's resolved options: defaults <- --job-config <- options <- --set."""
    ctx = click.get_current_context()
    opts, _ = split_options(kwargs)
    opts.update(extra or {})
    flags = option_flags(ctx.command)
    try:
        return load(schema, job_config, options=opts, overrides=overrides, option_names=flags)
    except ConfigError as e:
        if e.missing:
            key = e.key
            raise click.UsageError(
                f"Missing option '{flags.get(key, key)}' (or '{key}:' in --job-config, or "
                f"--set {key}=...)") from None
        raise click.UsageError(str(e)) from None
    except ValueError as e:  # a dataclass's own check (e.g. --min-boxes > --max-boxes)
        raise click.UsageError(str(e)) from None


def _stopped(command: str, e: Exception) -> None:
    """A job stopped by SIGTERM / SIGINT at a safe point: say so, exit 128 + signal."""
    click.echo(f"vlkd-extract {command}: {e}", err=True)
    raise SystemExit(e.exit_code)


def _failures_exceeded(command: str, result, max_failures: str, out: str, what: str) -> None:
    """More images (rows) failed than --max-failures allows: say so, exit 3 (the set is
    written; the reasons are in its manifest)."""
    click.echo(f"vlkd-extract {command}: {result.num_failures} of {result.num_images} {what} "
               f"failed, more than --max-failures {max_failures} allows "
               f"({result.limit.allowed(result.num_images):.4g}); the reasons are in "
               f"{out}/manifest.json 'failures'", err=True)
    raise SystemExit(3)


# ---------------------------------------------------------------------------------- proposals

@main.command("proposals")
@_job_options(ProposalsConfig, specific=[
    ("selection.score_thresh", "--score-thresh", dict(type=float)),
    ("selection.nms_thresh", "--nms-thresh", dict(type=float)),
    ("selection.min_boxes", "--min-boxes", dict(type=click.IntRange(min=0))),
    ("selection.max_boxes", "--max-boxes", dict(type=click.IntRange(min=0))),
    ("box_selection", "--box-selection", dict(type=click.Choice(BOX_SELECTION_RULES))),
    ("max_failures", "--max-failures", {})])
def proposals_cmd(job_config, overrides, **kwargs) -> None:
    """Detect boxes and pool the detector's own features over them (phase one, step one).

    Exit status: 0 done; 1 refused or failed (the message says why); 3 more images failed
    to decode than --max-failures allows (the set is still written; failures are listed in
    its manifest); 143 / 130 stopped by SIGTERM / SIGINT at a window boundary (re-run the
    same command to resume).
    """
    cfg = _load(ProposalsConfig, job_config, overrides, kwargs)
    _prepare()
    from vlkd.common.regionset import RegionSetError
    from vlkd.data.images import ImageSourceError
    from vlkd.extract.detector import DetectorError
    from vlkd.extract.proposals import SetMismatchError, run_proposals

    try:
        result = run_proposals(cfg)
    except (DetectorError, ImageSourceError, SetMismatchError, RegionSetError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    except Stopped as e:
        _stopped("proposals", e)
    if result.failures_exceeded:
        _failures_exceeded("proposals", result, cfg.max_failures, cfg.out, "images")


# --------------------------------------------------------------------------- teacher-features

@main.command("teacher-features")
@_job_options(TeacherConfig,
              first=[("proposals", "--proposals", dict(type=click.Path(exists=True,
                                                                        file_okay=False)))],
              specific=[("verify_images", "--verify-images", {})])
def teacher_features_cmd(job_config, overrides, **kwargs) -> None:
    """Pool the teacher's features over the student's boxes (Visual Token Alignment).

    Output shard i holds the images of proposals shard i in the same order, the same boxes
    bit for bit, the teacher's features over them and the teacher's class and score per box.

    Exit status: 0 done; 1 refused or failed (the message says what differs and what to do);
    143 / 130 stopped by SIGTERM / SIGINT at a window boundary (re-run to resume).
    """
    cfg = _load(TeacherConfig, job_config, overrides, kwargs)
    _prepare()
    from vlkd.common.alignment import AlignmentError
    from vlkd.common.regionset import RegionSetError
    from vlkd.data.images import ImageSourceError
    from vlkd.extract.detector import DetectorError
    from vlkd.extract.teacher import TeacherImageError, run_teacher_features

    try:
        run_teacher_features(cfg)
    except (AlignmentError, TeacherImageError, DetectorError, ImageSourceError,
            RegionSetError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    except Stopped as e:
        _stopped("teacher-features", e)


# --------------------------------------------------------------------- import-tsv, export-tsv

def _it(key, *flags, **kw):
    return option(ImportTsvConfig, key, *flags, **kw)


@main.command("import-tsv")
@_it("format", "--format", type=click.Choice(TSV_FORMATS))
@_it("features", "--features", type=click.Path(exists=True, dir_okay=False))
@_it("labels", "--labels", type=click.Path(exists=True, dir_okay=False))
@_it("hw", "--hw", type=click.Path(exists=True, dir_okay=False))
@_it("out", "--out", type=click.Path(file_okay=False))
@_it("labelmap", "--labelmap", type=click.Path(exists=True, dir_okay=False))
@_it("attribute_names", "--attribute-names", type=click.Path(exists=True, dir_okay=False))
@_it("attributes", "--attributes", type=click.IntRange(min=0))
@_it("feature_dim", "--feature-dim", type=click.IntRange(min=1))
@_it("tsv_dtype", "--tsv-dtype", type=click.Choice(("auto", *FEATURE_DTYPES)))
@_it("geometry", "--geometry", type=click.Choice(("auto", "0", "4", "6")))
@_it("num_shards", "--num-shards", type=click.IntRange(min=1))
@_it("shard_index", "--shard-index")
@_it("backend", "--backend", type=click.Choice(BACKENDS))
@_it("feature_dtype", "--feature-dtype", type=click.Choice(FEATURE_DTYPES))
@_it("max_failures", "--max-failures")
@_it("num_workers", "--num-workers", type=click.IntRange(min=0))
@_it("window", "--commit-every", type=click.IntRange(min=1))
@_it("log_format", "--log-format", type=click.Choice(LOG_FORMATS))
@_it("progress", "--no-progress")
@_job_config_option
@set_option()
def import_tsv_cmd(job_config, overrides, **kwargs) -> None:
    """Import Oscar/VinVL, BUTD/LXMERT or scene_graph_benchmark TSV features as a region set.

    \b
    vinvl: --features feature.tsv --labels label.tsv [--hw hw.tsv]
    butd:  --features trainval.tsv (BUTD or LXMERT fields)
    sgb:   --features predictions.tsv --hw hw.tsv

    The set has role proposals: vlkd-train streams it, teacher-features pools over its boxes.
    Rows that cannot be used are failures in the manifest; what was found and done beyond the
    plain case is in SET/import-warnings/. Exit status: 0 done; 1 refused (the message says
    why); 3 more rows failed than --max-failures allows (the set is still written); 143 / 130
    stopped by SIGTERM / SIGINT at a window boundary (re-run the same command to resume).
    """
    cfg = _load(ImportTsvConfig, job_config, overrides, kwargs)
    from vlkd.common.regionset import RegionSetError
    from vlkd.extract.import_tsv import ImportTsvError, run_import_tsv

    try:
        result = run_import_tsv(cfg)
    except (ImportTsvError, RegionSetError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    except Stopped as e:
        _stopped("import-tsv", e)
    if result.failures_exceeded:
        _failures_exceeded("import-tsv", result, cfg.max_failures, cfg.out, "rows")


def _et(key, *flags, **kw):
    return option(ExportTsvConfig, key, *flags, **kw)


@main.command("export-tsv")
@click.argument("set_dir", type=click.Path(exists=True, file_okay=False))
@_et("out", "--out", type=click.Path(file_okay=False))
@_et("split", "--split")
@_et("layout", "--layout", type=click.Choice(EXPORT_LAYOUTS))
@_et("feature_dtype", "--feature-dtype", type=click.Choice(FEATURE_DTYPES))
@_et("geometry", "--geometry", type=click.Choice(("0", "4", "6")))
@_et("captions", "--captions", type=click.Path(exists=True, dir_okay=False))
@_et("caption_split", "--caption-split")
@_job_config_option
@set_option()
def export_tsv_cmd(set_dir, job_config, overrides, **kwargs) -> None:
    """Write a region set as Oscar/VinVL TSV files that Oscar's run_captioning.py (with the
    yaml written beside them) and run_vqa.py read unchanged.

    Images without regions are left out of the captioning files (Oscar cannot read them) and
    named in OUT/export.json with every other image left out. Exit status: 0 written; 1
    refused (the message says why).
    """
    cfg = _load(ExportTsvConfig, job_config, overrides, kwargs, extra={"regions": set_dir})
    from vlkd.data.captions import AnnotationError
    from vlkd.extract.export_tsv import ExportTsvError, run_export_tsv

    try:
        report = run_export_tsv(cfg)
    except (ExportTsvError, AnnotationError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(report.summary(), err=True)


# ----------------------------------------------------------------------------- train-detector

def _td(key, *flags, **kw):
    return option(TrainDetectorOptions, key, *flags, **kw)


@main.command("train-detector")
@_td("config", "--config", type=click.Path(exists=True, dir_okay=False))
@_td("train_json", "--train-json", type=click.Path(exists=True, dir_okay=False))
@_td("image_root", "--image-root", type=click.Path(exists=True, file_okay=False))
@_td("val_json", "--val-json", type=click.Path(exists=True, dir_okay=False))
@_td("val_image_root", "--val-image-root", type=click.Path(exists=True, file_okay=False))
@_td("out", "--out", type=click.Path(file_okay=False))
@_td("max_iter", "--max-iter", type=click.IntRange(min=1))
@_td("device", "--device")
@_td("num_threads", "--num-threads", type=click.IntRange(min=1))
@_job_config_option
@set_option()
@click.argument("opts", nargs=-1)
def train_detector_cmd(job_config, overrides, opts, **kwargs) -> None:
    """Train a detector from scratch with detectron2's training loop and report its box AP.

    OPTS are detectron2 config overrides, KEY VALUE pairs (SOLVER.BASE_LR 0.01). Progress goes
    to stderr; the metrics JSON is printed on stdout at the end. The resolved options are
    saved as train-detector.yaml in --out.
    """
    import json
    import sys

    cfg = _load(TrainDetectorOptions, job_config, overrides, kwargs,
                extra={"opts": list(opts) or None})
    if len(cfg.opts) % 2:
        raise click.UsageError(f"config overrides come in KEY VALUE pairs; got "
                               f"{len(cfg.opts)} words: {' '.join(cfg.opts)}")
    _prepare()
    from vlkd.common.config import save
    from vlkd.extract.detector import DetectorError
    from vlkd.extract.detector_training import train_detector

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if cfg.num_threads is not None:
        import torch
        torch.set_num_threads(cfg.num_threads)
    try:
        metrics = train_detector(cfg.config, cfg.train_json, cfg.image_root, cfg.out,
                                 val_json=cfg.val_json, val_image_root=cfg.val_image_root,
                                 max_iter=cfg.max_iter, device=cfg.device, opts=cfg.opts)
    except (DetectorError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    save(cfg, cfg.out, TRAIN_DETECTOR_CONFIG_FILE)
    click.echo(json.dumps(metrics, indent=1))


# --------------------------------------------------------------------------- convert-detector

@main.command("convert-detector")
@click.option("--from", "source", required=True, type=click.Choice(["vinvl"]),
              help="The source project: vinvl (microsoft/scene_graph_benchmark, "
              "maskrcnn-benchmark checkpoints such as vinvl_vg_x152c4.pth).")
@click.option("--config", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The source project's config (sgg_configs/vgattr/vinvl_x152c4.yaml).")
@click.option("--weights", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Its checkpoint: SGB's trainer dict or a state dict (.pth).")
@click.option("--labelmap", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Its labelmap (VG-SGG-dicts-vgoi6-clipped.json).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="New folder for config.yaml, model.safetensors, class_names.json, "
              "attribute_names.json and conversion.json.")
@click.option("--trust-pickle", is_flag=True, help="Allow a checkpoint that "
              "torch.load(weights_only=True) refuses: unpickling runs code from the file.")
@click.argument("opts", nargs=-1)
def convert_detector_cmd(source, config, weights, labelmap, out, trust_pickle, opts) -> None:
    """Convert a detector of another project into a detectron2 model vlkd extracts with.

    OPTS are the source config's overrides, KEY VALUE pairs as on SGB's command line
    (MODEL.ROI_HEADS.NMS_FILTER 1 TEST.IGNORE_BOX_REGRESSION True). The output folder is what
    proposals and teacher-features take: --config OUT/config.yaml --weights
    OUT/model.safetensors. Every key is translated by an explicit table; anything the table
    does not cover, or that would change the numbers, is refused with the key named. The
    summary lists the extraction options that reproduce the source's post-processing.

    Exit status: 0 converted; 1 refused (the message says what and why).
    """
    quiet_library_warnings()
    from vlkd.extract.convert_vinvl import ConversionError, convert

    try:
        report = convert(config, weights, labelmap, out, opts=list(opts),
                         trust_pickle=trust_pickle)
    except ConversionError as e:
        raise click.ClickException(str(e)) from None
    click.echo(report.summary())


# ------------------------------------------- validate, inspect, status (extract/inspect.py, ...)

@main.command("validate")
@click.argument("set_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--against", default=None, type=click.Path(exists=True, file_okay=False),
              help="The proposals set a teacher-features set must be aligned with. [default: "
              "the set's aligned_to.path when it exists]")
@click.option("--no-features", is_flag=True, help="Skip streaming the features (NaN/Inf, "
              "content digests): only the small arrays.")
def validate_cmd(set_dir, against, no_features) -> None:
    """Check a region set: format, counts, digests, NaN/Inf, and alignment with proposals.

    Prints a table of findings. Exit status: 0 clean; 1 errors; 2 warnings only (e.g.
    unfinished shards).
    """
    from vlkd.extract.inspect import validate_report

    text, status = validate_report(set_dir, against=against,
                                   check_features=not no_features)
    click.echo(text)
    raise SystemExit(status)


@main.command("inspect")
@click.argument("set_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--with", "other", default=None, type=click.Path(exists=True, file_okay=False),
              help="A second set over the same boxes, drawn side by side (default for a "
              "teacher set: its proposals, when aligned_to.path exists).")
@click.option("--image-id", default=None, help="Image to draw (with --draw).")
@click.option("--draw", "draw", default=None, type=click.Path(dir_okay=False),
              help="Write the image with its boxes and class names to this PNG.")
@click.option("--images", default=None, help="Image source holding the image [default: the "
              "set's image_source].")
@click.option("--image-root", default=None, help="Root for relative paths of JSON/list sources.")
@click.option("--max-boxes", default=None, type=click.IntRange(min=1), help="Draw only the "
              "best boxes by score.")
@click.option("--unaligned", default=None, type=click.Path(exists=True, file_okay=False),
              help="A set with its own boxes for the image (the teacher's own proposals), "
              "drawn as a last panel over the first set's boxes in grey: what a teacher reads "
              "without Visual Token Alignment.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect_cmd(set_dir, other, image_id, draw, images, image_root, max_boxes, unaligned,
                as_json) -> None:
    """Summarise a region set; draw an image's boxes with their object tags.

    The summary: role, detector, images, regions per image (min/mean/max), feature dim and
    dtype, failures, size on disk. With --image-id and --draw, the image's best boxes are
    drawn numbered, with a legend of their class names and scores; for a teacher set with its
    proposals, student and teacher tags side by side; with --unaligned, the teacher's own boxes
    too.
    """
    import json

    from vlkd.common.regionset import RegionSetError
    from vlkd.extract.inspect import (InspectError, draw_image, format_summary,
                                      summarize_set)

    if (image_id is None) != (draw is None):
        raise click.UsageError("--image-id and --draw go together")
    try:
        summary = summarize_set(set_dir)
        click.echo(json.dumps(summary, indent=1) if as_json else format_summary(summary))
        if draw is not None:
            note = draw_image(set_dir, image_id, draw, other=other, images=images,
                              image_root=image_root, max_boxes=max_boxes, unaligned=unaligned)
            click.echo(note, err=True)
    except (InspectError, RegionSetError) as e:
        raise click.ClickException(str(e)) from None



# ------------------------------------------------------------------------------------ launch

@main.command("launch", context_settings={"ignore_unknown_options": True})
@click.option("--gpus", default=0, type=click.IntRange(min=0), help="One process per GPU "
              "(CUDA_VISIBLE_DEVICES pins it; --device cuda), GPUs 0..N-1. 0: CPU processes.")
@click.option("--workers", default=1, type=click.IntRange(min=1), help="CPU processes when "
              "--gpus is 0 (each with cores // N threads).")
@click.option("--log-dir", default=None, type=click.Path(file_okay=False), help="One log per "
              "shard. [default: <out>.logs beside the set]")
@click.argument("job", type=click.Choice(["proposals", "teacher-features", "import-tsv"]))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def launch_cmd(gpus, workers, log_dir, job, args) -> None:
    """Run a job's shards as local processes: vlkd-extract launch --gpus 4 -- proposals ARGS
    (or teacher-features, import-tsv).

    Each process takes the next shard not yet done and runs it as `vlkd-extract JOB ARGS
    --shard-index i`, exactly what an array job runs, until every shard is done; complete
    shards are skipped. For machines without a batch system (docs/CLUSTER.md).

    Exit status: 0 every shard done; 1 a shard failed (each failure is listed with its log);
    3 a shard exceeded --max-failures; 143 / 130 stopped by SIGTERM / SIGINT (passed on to the
    shard processes, which stop at a window boundary; re-run to resume).
    """
    from .launch import LaunchError, launch

    ctx = click.get_current_context()
    cmd = main.get_command(ctx, job)
    try:
        sub = cmd.make_context(job, list(args), parent=ctx)
    except click.UsageError as e:
        raise click.UsageError(f"{job} {' '.join(args)}: {e.format_message()}") from None
    with sub:
        kwargs = dict(sub.params)
        schema = {"proposals": ProposalsConfig, "teacher-features": TeacherConfig,
                  "import-tsv": ImportTsvConfig}[job]
        cfg = _load(schema, kwargs.pop("job_config"), kwargs.pop("overrides"), kwargs)
    if cfg.shard_index is not None:
        raise click.UsageError("leave --shard-index out: launch gives each process its shards")
    if job in ("proposals", "import-tsv"):
        num_shards = cfg.num_shards
    else:
        from vlkd.common.manifest import ManifestError, read_manifest
        try:
            num_shards = int(read_manifest(cfg.proposals)["num_shards"])
        except (ManifestError, KeyError) as e:
            raise click.ClickException(f"--proposals {cfg.proposals}: {e}") from None
    plugins = ctx.find_root().params.get("plugins") or ()
    try:
        res = launch(job, args, num_shards=num_shards, out=cfg.out, gpus=gpus, workers=workers,
                     plugins=plugins, log_dir=log_dir,
                     say=lambda m: click.echo(m, err=True))
    except LaunchError as e:
        raise click.ClickException(str(e)) from None
    ok = len(res.outcomes) - len(res.failed)
    click.echo(f"launch: {ok} shard(s) done, {len(res.failed)} failed"
               + (f", stopped by {signal_name(res.stopped_by)}" if res.stopped_by else ""),
               err=True)
    for o in res.failed:
        click.echo(f"  shard {o.index}: exit {o.returncode} ({o.slot}); log {o.log}", err=True)
    if res.failed and not res.stopped_by:
        from vlkd.extract.status import array_spec
        click.echo(f"re-run: {array_spec([o.index for o in res.failed])} (vlkd-extract launch "
                   "with the same arguments re-runs what is not complete)", err=True)
    raise SystemExit(res.exit_status)


def signal_name(signum: int) -> str:
    import signal
    return signal.Signals(signum).name


# --- status -----------------------------------------------------------------------------------
@main.command("status")
@click.argument("set_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--num-shards", default=None, type=click.IntRange(min=1),
              help="Expected shard count (read from the manifest or shard names when omitted).")
@click.option("--array-spec", "array_only", is_flag=True,
              help="Print only the array spec of shards to (re-)run, e.g. 3,7,12-15 "
                   "(for sbatch --array=...).")
def status_cmd(set_dir, num_shards, array_only):
    """List complete, running, partial and missing shards of SET_DIR.

    A shard is *complete* when it is finalised and in the manifest, *running* while a live
    writer holds its lock, *partial* when a writer died before finalising (re-running resumes
    it), *missing* when no job has started it. The last line is the array spec of the partial
    and missing shards: re-run exactly those. Exit status 0 when every shard is complete, 1
    otherwise.
    """
    from vlkd.extract.status import array_spec, set_status

    try:
        st = set_status(set_dir, num_shards)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    if array_only:
        click.echo(array_spec(st.todo))
        raise SystemExit(0 if not st.todo and not st.indices("running") else 1)
    counts = {s: len(st.indices(s)) for s in ("complete", "running", "partial", "missing")}
    click.echo(f"{st.path}: {st.num_shards} shards — " +
               ", ".join(f"{n} {s}" for s, n in counts.items()))
    for s in st.shards:
        if s.state == "complete":
            detail = f"{s.num_images} images" + (f", {s.num_failures} failed images"
                                                 if s.num_failures else "")
        elif s.state == "running":
            detail = f"writer {s.holder}"
        elif s.state == "partial":
            detail = "writer gone before finalize: re-run resumes it"
        else:
            detail = ""
        click.echo(f"  {s.index:5d}  {s.state:8s}  {s.name or '-':28s}  {detail}")
    todo = array_spec(st.todo)
    click.echo(f"re-run: {todo}" if todo else "nothing to re-run")
    raise SystemExit(0 if counts["complete"] == st.num_shards else 1)


if __name__ == "__main__":
    main()
