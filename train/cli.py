"""`vlkd-train`: phase two (finetune, distill, evaluate VL transformers on region sets)."""
from __future__ import annotations

import click

from vlkd import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="vlkd-train")
def main() -> None:
    """Phase two: train and evaluate OSCAR-style VL transformers on region sets.

    \b
    finetune   one model, one task, no teacher (teacher adaptation, student baseline)
    distill    student trained with task loss + attention / hidden-state KD from a teacher
    evaluate   captioning (pycocoevalcap) and VQA (official accuracy)
    """


if __name__ == "__main__":
    main()
