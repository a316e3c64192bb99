"""``python -m vlkd.data.synthetic``: see :mod:`vlkd.data.synthetic.cli`."""
from .cli import main

main(prog_name="python -m vlkd.data.synthetic")
