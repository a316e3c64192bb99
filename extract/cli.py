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
    """


if __name__ == "__main__":
    main()
