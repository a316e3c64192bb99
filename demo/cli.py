"""`vlkd-demo`: the embedded default, the whole pipeline on a CPU."""
from __future__ import annotations

import sys

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--out", default="demo-out", type=click.Path(file_okay=False),
              help="Output directory (finished stages there are skipped on a re-run).")
@click.option("--quick", is_flag=True, help="Smallest run (~3 min on 2 cores; CI runs it).")
@click.option("--clean", is_flag=True, help="Delete --out first and start over.")
def main(out: str, quick: bool, clean: bool) -> None:
    """Run the embedded synthetic pipeline end to end and write OUT/report.md.

    \b
    Generates a synthetic world (images, captions, VQA), trains a teacher and a student
    detector, extracts student proposals, teacher features over the student's boxes (VTA) and
    the teacher's own proposals, trains the teacher (own boxes, then adapted to the student's),
    the student without and with distillation, evaluates each, and writes the report.
    """
    from vlkd.demo.pipeline import run_demo

    try:
        report = run_demo(out, quick, clean)
    except RuntimeError as e:
        click.echo(f"vlkd-demo: {e}", err=True)
        sys.exit(1)
    click.echo(str(report))


if __name__ == "__main__":
    main()
