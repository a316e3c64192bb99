"""The import rules of docs/ARCHITECTURE.md, checked on the source (every import statement,
top level or inside a function): the phases meet only through the region-set format."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"common": "vlkd.common", "data": "vlkd.data", "extract": "vlkd.extract",
            "train": "vlkd.train", "infer": "vlkd.infer", "demo": "vlkd.demo"}
STDLIB = set(sys.stdlib_module_names)
#: package -> the vlkd packages it may import, and the third-party distributions it may use.
RULES = {
    "vlkd.common": ({"vlkd.common"}, {"numpy", "h5py", "zarr", "omegaconf", "click",
                                      "google_crc32c", "yaml"}),
    "vlkd.data": ({"vlkd.common", "vlkd.data"}, {"numpy", "PIL", "click", "yaml"}),
    "vlkd.demo": ({"vlkd.common", "vlkd.data", "vlkd.demo"}, {"numpy", "click", "yaml",
                                                              "matplotlib", "PIL", "omegaconf"}),
    "vlkd.extract": ({"vlkd.common", "vlkd.data", "vlkd.extract"}, None),
    "vlkd.train": ({"vlkd.common", "vlkd.data", "vlkd.train"}, None),
    # the one package that runs both phases' models together (through their public APIs)
    "vlkd.infer": ({"vlkd.common", "vlkd.data", "vlkd.extract", "vlkd.train", "vlkd.infer"},
                   None),
}


def _imports(source: str, module: str) -> set[str]:
    """Absolute module names imported by the source of ``module`` (dotted name; a package's
    ``__init__`` is the package itself), relative imports resolved."""
    tree = ast.parse(source)
    here = module.split(".")
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level]
                out.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                out.add(node.module)
    return out


def _module_name(package: str, folder: str, path: Path) -> str:
    rel = path.relative_to(ROOT / folder).with_suffix("").parts
    # a package's __init__ imports relative to the package itself: name it one level deeper
    return ".".join([package, *rel])


def _sources():
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield folder, package, path


@pytest.mark.parametrize("folder", list(PACKAGES))
def test_import_rules(folder):
    package = PACKAGES[folder]
    allowed_vlkd, allowed_third = RULES[package]
    bad = []
    for f, pkg, path in _sources():
        if f != folder:
            continue
        for name in sorted(_imports(path.read_text(encoding="utf-8"),
                                    _module_name(pkg, f, path))):
            top = name.split(".")[0]
            if name == "vlkd" or top == "vlkd" and name.count(".") == 0:
                continue  # the version
            if top == "vlkd":
                sub = ".".join(name.split(".")[:2])
                if sub not in allowed_vlkd:
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
            elif allowed_third is not None and top not in STDLIB and top not in allowed_third \
                    and top != "__future__":
                bad.append(f"{path.relative_to(ROOT)} imports {name} (third party)")
    assert not bad, "\n".join(bad)


def test_the_rules_can_fail():
    """The checker sees imports inside functions and resolves relative ones."""
    names = _imports("def f():\n    from ..train import model\n    import vlkd.extract.cli\n"
                     "from . import report\n", "vlkd.demo.pipeline")
    assert names == {"vlkd.train", "vlkd.extract.cli", "vlkd.demo"}
    assert _imports("from .tasks import base\n", "vlkd.train.__init__") == {"vlkd.train.tasks"}
