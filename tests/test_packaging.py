"""setup.cfg lists every package of the tree (a wheel or non-editable install ships only what it
lists: a subpackage missing there imports in the checkout and fails in the Docker image)."""
from __future__ import annotations

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def test_every_package_directory_is_listed_in_setup_cfg():
    cfg = _setup_cfg()
    listed = {p.strip() for p in cfg["options"]["packages"].split() if p.strip()}
    dirs = {}
    for line in cfg["options"]["package_dir"].strip().splitlines():
        name, _, folder = (x.strip() for x in line.partition("="))
        dirs[name] = folder
    found = set()
    for pkg, folder in dirs.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            if any(part.startswith((".", "__")) for part in rel.parts):
                continue
            found.add(".".join([pkg, *rel.parts]))
    missing = sorted(found - listed)
    assert not missing, f"add to setup.cfg [options] packages: {missing}"
    stale = sorted(listed - found)
    assert not stale, f"setup.cfg lists packages without an __init__.py: {stale}"
