"""Users' own detector parts for the `vlkd-extract` commands: plugin modules imported first.

detectron2 builds a model from names in its config (``MODEL.META_ARCHITECTURE``,
``MODEL.BACKBONE.NAME``, ``MODEL.ROI_HEADS.NAME``, ...) looked up in its registries, which know
only the classes that were imported. A *plugin* is a Python module whose import registers such
classes (``@BACKBONE_REGISTRY.register()``, ``@META_ARCH_REGISTRY.register()``,
``@ROI_HEADS_REGISTRY.register()``) and, for ROI heads vlkd does not know yet, their pooler
family (``@vlkd.extract.pooling.POOLERS.register()``). A plugin module may also define
``add_config(cfg)``: it is called on detectron2's default config before a detector config is
merged, to declare the config keys its classes read (as detectron2 projects'
``add_*_config`` functions do).

Plugins are loaded, in this order, from

1. ``vlkd-extract --plugin MODULE`` (repeatable; before the command name),
2. the ``VLKD_PLUGINS`` environment variable (module names separated by commas or spaces:
   convenient in cluster job templates),
3. the ``vlkd.plugins`` entry-point group of installed packages (in ``setup.cfg``:
   ``[options.entry_points] vlkd.plugins = mydet = mypackage.vlkd_plugin``); an entry point
   that names a function (``mypackage.plugin:register``) has it called after the import.

A module is imported once per process, however often it is named.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Callable, Iterable

ENV_VAR = "VLKD_PLUGINS"
ENTRY_POINT_GROUP = "vlkd.plugins"

_loaded: dict[str, object] = {}  # name -> imported module (or entry point object)


class PluginError(ImportError):
    """A plugin cannot be imported (the message names it, where it was named and why)."""


def _import(name: str, where: str):
    if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", name):
        raise PluginError(f"{where} {name!r}: expected a Python module name such as "
                          "mypackage.vlkd_plugin (not a file path)")
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and name.startswith(e.name):
            raise PluginError(
                f"{where} {name}: no module named {e.name!r} in this environment "
                f"({sys.executable}); install its package, or put the folder holding it on "
                "PYTHONPATH") from None
        raise PluginError(f"{where} {name}: importing it failed: {type(e).__name__}: {e}") \
            from e
    except Exception as e:  # noqa: BLE001 - any error in the user's module
        raise PluginError(f"{where} {name}: importing it failed: {type(e).__name__}: {e}") \
            from e


def _entry_points():
    from importlib.metadata import entry_points

    return list(entry_points(group=ENTRY_POINT_GROUP))


def env_plugins(environ: dict | None = None) -> list[str]:
    """The module names in ``VLKD_PLUGINS``."""
    text = (os.environ if environ is None else environ).get(ENV_VAR, "")
    return [n for n in re.split(r"[,\s]+", text) if n]


def load_plugins(names: Iterable[str] = (), *, environ: dict | None = None,
                 entry_points: bool = True) -> list[str]:
    """Import the plugin modules (module docstring: ``--plugin``, ``VLKD_PLUGINS``, entry
    points).

    Args:
        names: module names given on the command line.
        environ: environment to read ``VLKD_PLUGINS`` from (default ``os.environ``).
        entry_points: also load the ``vlkd.plugins`` entry points.

    Returns:
        Every plugin loaded in this process so far, in load order.

    Raises:
        PluginError: a plugin cannot be imported.
    """
    for name in names:
        if name not in _loaded:
            _loaded[name] = _import(name, "--plugin")
    for name in env_plugins(environ):
        if name not in _loaded:
            _loaded[name] = _import(name, ENV_VAR)
    if entry_points:
        for ep in _entry_points():
            key = f"{ep.name} = {ep.value}"
            if key in _loaded:
                continue
            try:
                obj = ep.load()
            except Exception as e:  # noqa: BLE001
                dist = getattr(getattr(ep, "dist", None), "name", None)
                raise PluginError(
                    f"entry point {key!r} (group {ENTRY_POINT_GROUP}"
                    f"{', package ' + dist if dist else ''}) cannot be loaded: "
                    f"{type(e).__name__}: {e}; fix or uninstall that package") from e
            if callable(obj) and not isinstance(obj, type) and ":" in ep.value:
                obj()
            _loaded[key] = obj
    return list(_loaded)


def loaded_plugins() -> list[str]:
    """The plugins loaded in this process, in load order."""
    return list(_loaded)


def config_hooks() -> list[Callable]:
    """The ``add_config(cfg)`` functions of the loaded plugin modules."""
    hooks = []
    for obj in _loaded.values():
        fn = getattr(obj, "add_config", None)
        if callable(fn) and fn not in hooks:
            hooks.append(fn)
    return hooks


__all__ = ["ENV_VAR", "ENTRY_POINT_GROUP", "PluginError", "env_plugins", "load_plugins",
           "loaded_plugins", "config_hooks"]
