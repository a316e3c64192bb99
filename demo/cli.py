"""`vlkd-demo`: the embedded default, the whole pipeline on a CPU."""
from __future__ import annotations

import sys

import click

from vlkd.common.config import option, set_option, split_options

from .config import DemoConfig


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--out", default="demo-out", type=click.Path(file_okay=False),
              help="Output directory (finished stages there are skipped on a re-run; the "
                   "resolved config is saved there as config.yaml).")
@click.option("--quick", is_flag=True, help="Smallest run (~3 min on 2 cores; CI runs it).")
@click.option("--clean", is_flag=True, help="Delete --out first and start over.")
@click.option("--preload/--no-preload", default=True,
              help="Start each stage from one process that imported torch, transformers and "
                   "detectron2 once (saves ~7 s of imports per stage); --no-preload starts "
                   "each stage as a fresh interpreter.")
@option(DemoConfig, "jobs", "--jobs", type=click.IntRange(min=0))
@click.option("--config", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Demo config (sizes, steps, KD terms) [default: configs/demo/demo.yaml]. "
                   "For an ablation, copy it, change distill_losses and use another --out.")
@set_option("Config override, repeatable: --set key=value (value parsed as YAML), e.g. "
            "--set quick.steps.student=100, --set distill_losses.losses.attention.weight=0.")
def main(out: str, quick: bool, clean: bool, preload: bool, config: str | None, overrides: tuple[str, ...],
         **options) -> None:
    """Run the embedded synthetic pipeline end to end and write OUT/report.md.

    \b
    Generates a synthetic world (images, captions, VQA), trains a teacher and a student
    detector, extracts student proposals, teacher features over the student's boxes (VTA) and
    the teacher's own proposals, trains the teacher (own boxes, then adapted to the student's),
    the student without and with distillation, evaluates each, and writes the report.
    """
    from vlkd.demo.pipeline import run_demo

    keys, _ = split_options(options)
    try:
        report = run_demo(out, quick, clean, keys["jobs"], config, overrides,
                          preload=preload)
    except RuntimeError as e:
        click.echo(f"vlkd-demo: {e}", err=True)
        sys.exit(1)
    click.echo(str(report))


if __name__ == "__main__":
    main()
