"""Configs of every command: a dataclass is the schema, OmegaConf merges into it.

One rule for ``vlkd-extract``, ``vlkd-train`` and ``vlkd-demo``: a run's configuration is a
dataclass instance built from, in this order (later wins),

1. the dataclass defaults,
2. a YAML file (``--config``),
3. the command's options (``--batch-size 8`` is the key ``data.batch_size``),
4. ``--set key=value`` overrides (the value is parsed as YAML).

OmegaConf structured configs do the merging and the type checks (``OmegaConf.structured``,
``OmegaConf.merge``, ``OmegaConf.from_dotlist``); an unknown key or a value of the wrong type
is a :class:`ConfigError` that names the key, where it came from and the valid keys. The
resolved configuration is what :func:`save` writes beside every output.

Command-line options are generated from the schema (:func:`option`): their help text comes
from the dataclass docstring's ``Attributes:`` section and their default is shown from the
field, and the option itself defaults to "not given", so a default exists in one place only.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

__all__ = ["ConfigError", "load", "merge_values", "to_dict", "to_yaml", "save", "field_help",
           "field_default", "option", "set_option", "split_options", "schema_keys", "plain_text",
           "option_flags"]

T = TypeVar("T")
#: Prefix of the click parameter names :func:`option` makes (``cfg__data__batch_size``).
_PREFIX = "cfg__"


class ConfigError(ValueError):
    """A config file, option or override does not fit the schema (the message says which key,
    what was found and what is valid).

    Attributes:
        key: the dotted key concerned, when there is one.
        missing: True when the key is required and nobody gave it a value.
    """

    def __init__(self, message: str, *, key: str = "", missing: bool = False):
        super().__init__(message)
        self.key = key
        self.missing = missing


# ------------------------------------------------------------------------------ the schema

def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(typ):
    if typing.get_origin(typ) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return typ, False


def _resolve(schema: type, key: str) -> tuple[type, dataclasses.Field, Any]:
    """(dataclass holding the field, the field, its annotation) of a dotted key."""
    cls = schema
    parts = key.split(".")
    for depth, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            raise ConfigError(f"{key}: {'.'.join(parts[:depth + 1])!r} is not a key of "
                              f"{cls.__name__}; valid keys: {sorted(fields)}")
        typ = _hints(cls)[part]
        if depth == len(parts) - 1:
            return cls, fields[part], typ
        inner, _ = _unwrap_optional(typ)
        if not dataclasses.is_dataclass(inner):
            raise ConfigError(f"{key}: {'.'.join(parts[:depth + 1])!r} is a value, not a section")
        cls = inner
    raise AssertionError("unreachable")


def schema_keys(schema: type, prefix: str = "") -> list[str]:
    """Every leaf key of ``schema`` (sections expanded), dotted."""
    out = []
    hints = _hints(schema)
    for f in dataclasses.fields(schema):
        inner, _ = _unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(inner):
            out.extend(schema_keys(inner, f"{prefix}{f.name}."))
        else:
            out.append(prefix + f.name)
    return out


_ATTR_LINE = re.compile(r"^(\s*)([A-Za-z_][A-Za-z0-9_, ]*?)\s*(?:\(([^)]*)\))?:\s*(.*)$")


def field_help(cls: type) -> dict[str, str]:
    """Help text per field, from the Google-style ``Attributes:`` sections of ``cls`` and its
    dataclass bases (``name: text`` entries, continuation lines indented further; one entry may
    document several fields: ``score_thresh, nms_thresh: box selection``)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        doc = klass.__dict__.get("__doc__") or ""
        lines = doc.expandtabs().splitlines()
        try:
            start = next(i for i, ln in enumerate(lines) if ln.strip() == "Attributes:")
        except StopIteration:
            continue
        base_indent = None
        current: list[str] = []
        text: list[str] = []

        def flush():
            joined = " ".join(t.strip() for t in text).strip()
            for name in current:
                out[name] = joined
        for ln in lines[start + 1:]:
            if not ln.strip():
                continue  # blank lines may separate entries; a dedent ends the section
            indent = len(ln) - len(ln.lstrip())
            m = _ATTR_LINE.match(ln)
            if base_indent is None:
                if not m:
                    break
                base_indent = indent
            if indent == base_indent and m:
                flush()
                current = [n.strip() for n in m.group(2).split(",") if n.strip()]
                text = [m.group(4)]
            elif indent > base_indent:
                text.append(ln)
            else:
                break
        flush()
    return out


_ROLE = re.compile(r":[a-z]+:`~?([^`<]+?)(?:\s*<[^>]*>)?`")
_LITERAL = re.compile(r"``([^`]+)``")


def plain_text(text: str) -> str:
    """Docstring markup made readable in a terminal (``x`` -> x, :class:`~a.B` -> a.B)."""
    return _LITERAL.sub(r"\1", _ROLE.sub(r"\1", text))


def _required(f: dataclasses.Field) -> bool:
    """A field with no default (dataclass MISSING or OmegaConf's ``"???"``)."""
    return ((f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)  # type: ignore[misc]
            or f.default == "???")


def field_default(schema: type, key: str) -> Any:
    """The default value of a dotted key (``MISSING`` fields give ``None``)."""
    _, f, _ = _resolve(schema, key)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


# ------------------------------------------------------------------------------ loading

def _nest(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = list(value) if isinstance(value, tuple) else value
    return out


def _explain(e: Exception, where: str, schema_node) -> ConfigError:
    """A ConfigError naming the key, the layer it came from and the valid keys."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, MissingMandatoryValue

    full_key = getattr(e, "full_key", None) or ""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, MissingMandatoryValue):
        return ConfigError(f"{where}: {full_key or 'a key'} is required and has no value; give "
                           f"it in the config file, as an option or with --set "
                           f"{full_key or 'key'}=...", key=full_key, missing=True)
    if isinstance(e, ConfigKeyError):
        parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
        node = schema_node
        try:
            if parent:
                node = OmegaConf.select(schema_node, parent)
            valid = sorted(node.keys()) if node is not None and hasattr(node, "keys") else []
        except Exception:  # noqa: BLE001 - the message is still useful without the list
            valid = []
        return ConfigError(f"{where}: unknown key {full_key!r}"
                           + (f"; valid keys{' in ' + repr(parent) if parent else ''}: {valid}"
                              if valid else ""), key=full_key)
    return ConfigError(f"{where}: {full_key or 'value'}: {msg}", key=full_key)


def merge_values(cfg, values: Mapping[str, Any] | Any, where: str):
    """``cfg`` (a structured DictConfig) with ``values`` merged in (a nested mapping or a
    DictConfig); errors name ``where`` (the file, ``option --x`` or ``--set k=v``)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.merge(cfg, values)
    except OmegaConfBaseException as e:
        raise _explain(e, where, cfg) from None


def load(schema: type[T], path: str | os.PathLike | None = None, *,
         options: Mapping[str, Any] | None = None, overrides: Sequence[str] = (),
         base: T | None = None, option_names: Mapping[str, str] | None = None) -> T:
    """Build a ``schema`` instance: defaults (or ``base``) ← YAML file ← options ← ``--set``.

    Args:
        schema: the dataclass.
        path: a YAML file with (a subset of) the schema's keys, or None.
        options: dotted key -> value of the options given on the command line (None values
            are "not given" and skipped).
        overrides: ``key=value`` strings; the value is parsed as YAML.
        base: start from this instance instead of the defaults.
        option_names: dotted key -> option flag, for messages (``data.batch_size`` ->
            ``--batch-size``).

    Returns:
        A plain dataclass instance (``OmegaConf.to_object``).

    Raises:
        ConfigError: unknown key, wrong type, unreadable file.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cfg = OmegaConf.structured(base if base is not None else schema)
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            raw = OmegaConf.load(p)
        except Exception as e:  # yaml errors
            raise ConfigError(f"{p} is not valid YAML: {e}") from None
        if not isinstance(raw, type(cfg)) and raw is not None and not hasattr(raw, "keys"):
            raise ConfigError(f"{p}: expected a mapping of config keys, found a list")
        if raw:
            cfg = merge_values(cfg, raw, str(p))
    for key, value in (options or {}).items():
        if value is None:
            continue
        flag = (option_names or {}).get(key, key)
        cfg = merge_values(cfg, _nest({key: value}), f"option {flag}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. optim.lr=3e-5")
        key = item.split("=", 1)[0].strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"--set {item!r}: empty key component")
        if not item.split("=", 1)[1].strip():  # "key=" sets an empty string, not null
            dot = _nest({key: ""})
        else:
            try:
                dot = OmegaConf.from_dotlist([item])
            except OmegaConfBaseException as e:
                raise ConfigError(f"--set {item!r}: {e}") from None
        cfg = merge_values(cfg, dot, f"--set {item}")
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _explain(e, "config", cfg) from None


def to_dict(cfg: Any) -> dict:
    """A plain (YAML/JSON-ready) dict of a config dataclass."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (loadable again with :func:`load`)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg), sort_keys=False)


def save(cfg: Any, directory: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved config beside an output, atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / name
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(to_yaml(cfg))
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out


# ------------------------------------------------------------------------------ click options

def _show(value: Any) -> str:
    if value is None or value == "":
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def option(schema: type, key: str, *param_decls: str, help: str | None = None,
           show_key: bool = True, default_text: str | None = None, **click_kwargs) -> Callable:
    """A click option that sets ``key`` of ``schema`` when given.

    The option defaults to None ("not given"); the default shown in ``--help`` is the schema
    field's, so the two cannot differ. A ``bool`` field becomes a ``--x/--no-x`` pair unless
    ``param_decls`` says otherwise (``"--no-progress"`` alone makes a flag that sets False).

    Args:
        schema: the dataclass.
        key: dotted key (``data.batch_size``).
        param_decls: the flag(s), e.g. ``"--batch-size"``.
        help: help text (default: the field's docstring entry).
        show_key: append ``[key]`` to the help.
        default_text: what to show as the default (default: the field's default).
        click_kwargs: passed to ``click.option`` (``type=click.Choice(...)``, ``metavar``...).
    """
    import click

    _, f, typ = _resolve(schema, key)
    inner, _optional = _unwrap_optional(typ)
    text = help if help is not None else plain_text(
        field_help(_resolve(schema, key)[0]).get(f.name, ""))
    if default_text is None and _required(f):
        default_text = "required"
    shown = default_text if default_text is not None else _show(field_default(schema, key))
    suffix = f"[{key}; default: {shown}]" if show_key else f"[default: {shown}]"
    kwargs: dict[str, Any] = dict(default=None, show_default=False,
                                  help=(text + " " + suffix).strip())
    decls = list(param_decls)
    if inner is bool:
        if len(decls) == 1 and decls[0].startswith("--no-"):
            kwargs.update(flag_value=False, is_flag=True)
        elif len(decls) == 1 and "/" not in decls[0]:
            kwargs.update(flag_value=True, is_flag=True)
    elif "type" not in click_kwargs and inner in (int, float, str):
        kwargs["type"] = inner
    kwargs.update(click_kwargs)
    name = _PREFIX + key.replace(".", "__")
    return click.option(*decls, name, **kwargs)


def set_option(help: str = "Config override, repeatable: --set key=value (value parsed as "
               "YAML).") -> Callable:
    """The ``--set KEY=VALUE`` option (collected into the ``overrides`` parameter)."""
    import click

    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=help)


def split_options(kwargs: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate the parameters :func:`option` made (-> ``{dotted key: value}``) from the
    command's other parameters."""
    opts, rest = {}, {}
    for name, value in kwargs.items():
        if name.startswith(_PREFIX):
            key = name[len(_PREFIX):].replace("__", ".")
            if isinstance(value, tuple):
                value = list(value) if value else None
            opts[key] = value
        else:
            rest[name] = value
    return opts, rest


def option_flags(command) -> dict[str, str]:
    """dotted key -> first flag of a click command's generated options (for messages)."""
    out = {}
    for p in getattr(command, "params", []):
        if p.name and p.name.startswith(_PREFIX):
            out[p.name[len(_PREFIX):].replace("__", ".")] = p.opts[0]
    return out
