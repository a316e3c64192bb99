"""`vlkd-demo`: the embedded default, the whole pipeline on a CPU."""
from __future__ import annotations

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--out", default="demo-out", type=click.Path(file_okay=False), help="output directory")
@click.option("--quick", is_flag=True, help="smallest run (CI)")
def main(out: str, quick: bool) -> None:
    """Run the embedded synthetic pipeline end to end."""
    raise click.ClickException("vlkd-demo is not implemented yet (issue E)")


if __name__ == "__main__":
    main()
