"""`vlkd-extract`: phase one of the pipeline (detectron2 boxes and features into region sets)."""
from __future__ import annotations

import click

from vlkd import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="vlkd-extract")
def main() -> None:
    """Phase one: run detectron2 detectors over images and write region sets.

    \b
    proposals         student detector -> boxes + student features
    teacher-features  teacher features pooled over the student's boxes (VTA)
    validate          check a region set (and its alignment with proposals)
    inspect           summarise a set, draw boxes on an image
    status            which shards are complete, running, partial or missing
    train-detector    train a detectron2 detector on COCO-format data (the demo's)
    """


def _options(*opts):
    """One decorator applying ``opts`` in order (options the extraction jobs share)."""
    def apply(f):
        for o in reversed(opts):
            f = o(f)
        return f
    return apply


# How a job computes, and how it runs: the same for proposals and teacher-features.
_compute_options = _options(
    click.option("--batch-size", default=4, type=click.IntRange(min=1), help="Images per "
                 "forward pass (only images of the same padded size share one)."),
    click.option("--num-workers", default=2, type=click.IntRange(min=0),
                 help="Decoding processes."),
    click.option("--device", default="cpu", help="cpu, cuda or cuda:N."),
    click.option("--precision", default="fp32", type=click.Choice(["fp32", "fp16", "bf16"])))
_run_options = _options(
    click.option("--trust-pickle", is_flag=True, help="Allow pickle weights (.pkl/.pyth): "
                 "unpickling runs code from the file."),
    click.option("--log-format", default="text", type=click.Choice(["text", "json"]),
                 help="Progress bar and messages, or JSON lines (cluster logs), on stderr."),
    click.option("--no-progress", is_flag=True, help="No progress bar / progress lines."))


@main.command("proposals")
@click.option("--images", required=True, help="Image folder, list file (path[<TAB>id]), COCO JSON "
              "or Karpathy dataset_coco.json.")
@click.option("--image-root", default=None, help="Folder that relative paths in JSON/list "
              "sources are relative to.")
@click.option("--config", "config", required=True, type=click.Path(exists=True, dir_okay=False),
              help="detectron2 YAML config (_BASE_ may be 'model_zoo:<name>').")
@click.option("--weights", required=True, help=".pth/.pt/.safetensors weights (.pkl/.pyth "
              "only with --trust-pickle).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Region-set "
              "directory (created; an existing set made with the same settings is resumed).")
@click.option("--num-shards", default=1, type=click.IntRange(min=1), help="Shards of the set.")
@click.option("--shard-index", default=None, help="Shard to write, or 'all'. Default: "
              "SLURM_ARRAY_TASK_ID, JOB_COMPLETION_INDEX or AWS_BATCH_JOB_ARRAY_INDEX.")
@click.option("--backend", default="hdf5", type=click.Choice(["hdf5", "zarr"]))
@_compute_options
@click.option("--score-thresh", default=0.2, type=float, help="Keep detections above this.")
@click.option("--nms-thresh", default=0.5, type=float, help="Per-class NMS IoU threshold.")
@click.option("--min-boxes", default=10, type=click.IntRange(min=0), help="Top up to this many "
              "boxes from lower-scoring detections.")
@click.option("--max-boxes", default=100, type=click.IntRange(min=0), help="At most this many.")
@click.option("--feature-dtype", default="float16", type=click.Choice(["float16", "float32"]))
@click.option("--max-failures", default="1%", help="Exit non-zero (3) when more images fail: a "
              "count (5), fraction (0.01) or percentage (1%).")
@click.option("--max-pixels", default=None, type=click.IntRange(min=1), help="Refuse images "
              "larger than this many pixels (decompression bombs). [default: 89478485]")
@_run_options
@click.option("--commit-every", default=0, type=click.IntRange(min=0), help="Images per "
              "commit, which is also the window within which same-size images are batched "
              "(0: max(32, 8 x batch size)). A killed job resumes from the last commit.")
def proposals_cmd(images, image_root, config, weights, out, num_shards, shard_index, backend,
                  batch_size, num_workers, device, precision, score_thresh, nms_thresh,
                  min_boxes, max_boxes, feature_dtype, max_failures, max_pixels, trust_pickle,
                  log_format, no_progress, commit_every) -> None:
    """Detect boxes and pool the detector's own features over them (phase one, step one).

    Exit status: 0 done; 1 refused or failed (the message says why); 3 more images failed
    to decode than --max-failures allows (the set is still written; failures are listed in
    its manifest).
    """
    from vlkd.extract.jobs import quiet_library_warnings
    quiet_library_warnings()
    from vlkd.common.regionset import RegionSetError
    from vlkd.data.images import DEFAULT_MAX_PIXELS, ImageSourceError
    from vlkd.extract.detector import DetectorError
    from vlkd.extract.proposals import ProposalsConfig, SetMismatchError, run_proposals

    cfg = ProposalsConfig(
        images=images, image_root=image_root, config=config, weights=weights, out=out,
        num_shards=num_shards, shard_index=shard_index, backend=backend,
        batch_size=batch_size, num_workers=num_workers, device=device, precision=precision,
        score_thresh=score_thresh, nms_thresh=nms_thresh, min_boxes=min_boxes,
        max_boxes=max_boxes, feature_dtype=feature_dtype, max_failures=max_failures,
        max_pixels=max_pixels or DEFAULT_MAX_PIXELS, trust_pickle=trust_pickle,
        log_format=log_format, progress=not no_progress, window=commit_every)
    try:
        result = run_proposals(cfg)
    except (DetectorError, ImageSourceError, SetMismatchError, RegionSetError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    if result.failures_exceeded:
        click.echo(f"vlkd-extract proposals: {result.num_failures} of {result.num_images} "
                   f"images failed, more than --max-failures {max_failures} allows "
                   f"({result.limit.allowed(result.num_images):.4g}); the reasons are in "
                   f"{out}/manifest.json 'failures'", err=True)
        raise SystemExit(3)



# --- train-detector (detector training for the demo; extract/detector_training.py) ----------

@main.command("train-detector")
@click.option("--config", "config", required=True, type=click.Path(exists=True, dir_okay=False),
              help="detectron2 YAML config (_BASE_ may be 'model_zoo:<name>'), e.g. "
              "configs/demo/student_detector.yaml.")
@click.option("--train-json", required=True, type=click.Path(exists=True, dir_okay=False),
              help="COCO instances JSON of the training images.")
@click.option("--image-root", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder the training JSON's file_name entries are relative to.")
@click.option("--val-json", default=None, type=click.Path(exists=True, dir_okay=False),
              help="COCO instances JSON for box AP (none: no evaluation).")
@click.option("--val-image-root", default=None, type=click.Path(exists=True, file_okay=False),
              help="Folder of the validation images [default: --image-root].")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder: "
              "model_final.pth, config.yaml, class_names.json, metrics.json, train_log.jsonl.")
@click.option("--max-iter", default=None, type=click.IntRange(min=1),
              help="Training iterations [default: the config's SOLVER.MAX_ITER].")
@click.option("--device", default="cpu", help="cpu, cuda or cuda:N.")
@click.option("--num-threads", default=None, type=click.IntRange(min=1), help="CPU threads "
              "for torch [default: torch's choice]. On a small CPU, two trainings with one "
              "thread each finish sooner than one after the other with two.")
@click.argument("opts", nargs=-1)
def train_detector_cmd(config, train_json, image_root, val_json, val_image_root, out, max_iter,
                       device, num_threads, opts) -> None:
    """Train a detector from scratch with detectron2's training loop and report its box AP.

    OPTS are detectron2 config overrides, KEY VALUE pairs (SOLVER.BASE_LR 0.01). Progress goes
    to stderr; the metrics JSON is printed on stdout at the end.
    """
    import json
    import logging
    import sys

    from vlkd.extract.jobs import quiet_library_warnings
    quiet_library_warnings()
    from vlkd.extract.detector import DetectorError
    from vlkd.extract.detector_training import train_detector

    if len(opts) % 2:
        raise click.UsageError(f"config overrides come in KEY VALUE pairs; got {len(opts)} "
                               f"words: {' '.join(opts)}")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if num_threads is not None:
        import torch
        torch.set_num_threads(num_threads)
    try:
        metrics = train_detector(config, train_json, image_root, out, val_json=val_json,
                                 val_image_root=val_image_root, max_iter=max_iter,
                                 device=device, opts=opts)
    except (DetectorError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(metrics, indent=1))


# --- teacher-features, validate, inspect (extract/teacher.py, alignment.py, inspect.py) ----

@main.command("teacher-features")
@click.option("--proposals", required=True, type=click.Path(exists=True, file_okay=False),
              help="The proposals set (student boxes) to align with.")
@click.option("--images", required=True, help="Image folder, list file, COCO JSON or Karpathy "
              "JSON holding the images proposals read; may be another root (matched by id).")
@click.option("--image-root", default=None, help="Folder that relative paths in JSON/list "
              "sources are relative to.")
@click.option("--config", "config", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The teacher's detectron2 YAML config.")
@click.option("--weights", required=True, help="The teacher's weights (.pth/.pt/.safetensors; "
              ".pkl/.pyth only with --trust-pickle).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Teacher-features "
              "set directory (an existing one made from the same proposals and teacher is "
              "resumed).")
@click.option("--num-shards", default=None, type=click.IntRange(min=1), help="Must equal the "
              "proposals' shard count. [default: the proposals']")
@click.option("--shard-index", default=None, help="Shard to write, or 'all'. Default: "
              "SLURM_ARRAY_TASK_ID, JOB_COMPLETION_INDEX or AWS_BATCH_JOB_ARRAY_INDEX.")
@click.option("--backend", default=None, type=click.Choice(["hdf5", "zarr"]),
              help="[default: the proposals']")
@_compute_options
@click.option("--feature-dtype", default="float16", type=click.Choice(["float16", "float32"]))
@click.option("--max-pixels", default=None, type=click.IntRange(min=1), help="Refuse images "
              "larger than this many pixels (decompression bombs). [default: 89478485]")
@click.option("--verify-images", is_flag=True, help="Require each image's bytes to have the "
              "content hash proposals recorded.")
@_run_options
@click.option("--commit-every", default=0, type=click.IntRange(min=0), help="Images per "
              "commit and batching window (0: max(32, 8 x batch size)).")
def teacher_features_cmd(proposals, images, image_root, config, weights, out, num_shards,
                         shard_index, backend, batch_size, num_workers, device, precision,
                         feature_dtype, max_pixels, verify_images, trust_pickle, log_format,
                         no_progress, commit_every) -> None:
    """Pool the teacher's features over the student's boxes (Visual Token Alignment).

    Output shard i holds the images of proposals shard i in the same order, the same boxes
    bit for bit, the teacher's features over them and the teacher's class and score per box.

    Exit status: 0 done; 1 refused or failed (the message says what differs and what to do).
    """
    from vlkd.extract.jobs import quiet_library_warnings
    quiet_library_warnings()
    from vlkd.common.regionset import RegionSetError
    from vlkd.data.images import DEFAULT_MAX_PIXELS, ImageSourceError
    from vlkd.common.alignment import AlignmentError
    from vlkd.extract.detector import DetectorError
    from vlkd.extract.teacher import TeacherConfig, TeacherImageError, run_teacher_features

    cfg = TeacherConfig(
        proposals=proposals, images=images, image_root=image_root, config=config,
        weights=weights, out=out, num_shards=num_shards, shard_index=shard_index,
        backend=backend, batch_size=batch_size, num_workers=num_workers, device=device,
        precision=precision, feature_dtype=feature_dtype,
        max_pixels=max_pixels or DEFAULT_MAX_PIXELS, verify_images=verify_images,
        trust_pickle=trust_pickle, log_format=log_format, progress=not no_progress,
        window=commit_every)
    try:
        run_teacher_features(cfg)
    except (AlignmentError, TeacherImageError, DetectorError, ImageSourceError,
            RegionSetError, ValueError) as e:
        raise click.ClickException(str(e)) from None


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
              "first (best) boxes.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect_cmd(set_dir, other, image_id, draw, images, image_root, max_boxes,
                as_json) -> None:
    """Summarise a region set; draw an image's boxes with their object tags.

    The summary: role, detector, images, regions per image (min/mean/max), feature dim and
    dtype, failures, size on disk. With --image-id and --draw, the image's boxes are drawn
    with class names; for a teacher set with its proposals, student and teacher tags side by
    side.
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
                              image_root=image_root, max_boxes=max_boxes)
            click.echo(note, err=True)
    except (InspectError, RegionSetError) as e:
        raise click.ClickException(str(e)) from None



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
