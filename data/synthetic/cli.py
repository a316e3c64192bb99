"""``python -m vlkd.data.synthetic``: generate the synthetic world from the command line.

Prints the paths :func:`~vlkd.data.synthetic.generate` returns, as JSON, on stdout; progress
goes to stderr. Invalid sizes or counts are a usage error (exit status 2).
"""
from __future__ import annotations

import inspect
import json
import logging
import sys

import click

from .writers import generate

_GENERATE = inspect.signature(generate).parameters


def _default(name: str):
    """The default of one of :func:`generate`'s parameters: declared there, once."""
    return _GENERATE[name].default


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder (created; files already there are overwritten).")
@click.option("--num-train", default=800, type=int, help="Images in the train split.")
@click.option("--num-val", default=200, type=int, help="Images in the val split.")
@click.option("--num-test", default=200, type=int,
              help="Images in the test split (a split with 0 images is not written).")
@click.option("--seed", default=_default("seed"), type=int,
              help="The world's seed: the same arguments give byte-identical files.")
@click.option("--min-size", default=_default("min_size"), type=int,
              help="Smallest image side, pixels (width and height are drawn independently).")
@click.option("--max-size", default=_default("max_size"), type=int,
              help="Largest image side, pixels.")
def main(out: str, num_train: int, num_val: int, num_test: int, seed: int, min_size: int,
         max_size: int) -> None:
    """Generate the synthetic VL world (images, COCO instances and captions, Karpathy split,
    VQA v2) under --out; docs/SYNTHETIC.md describes every file."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    try:
        paths = generate(out, num_train=num_train, num_val=num_val, num_test=num_test,
                         seed=seed, min_size=min_size, max_size=max_size)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    click.echo(json.dumps(paths, indent=1))


if __name__ == "__main__":
    main()
