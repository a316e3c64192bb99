"""vlkd.common.config: one config system for every command (schema = dataclass, OmegaConf merge)."""
from __future__ import annotations

from dataclasses import dataclass, field

import click
import pytest
from click.testing import CliRunner

from vlkd.common.config import (ConfigError, field_default, field_help, load, option,
                                schema_keys, set_option, split_options, to_yaml)


@dataclass
class Inner:
    """An inner section.

    Attributes:
        lr: Peak learning rate.
        steps: Optimizer steps; continued
            on a second line.
        name, tag: Two fields, one entry.
        flag: A switch.
    """

    lr: float = 1e-4
    steps: int = 10
    name: str = "a"
    tag: str = ""
    flag: bool = True


@dataclass
class Outer:
    """The run.

    Attributes:
        inner: The inner section.
        losses: Free-form terms.
        out: Output folder.
    """

    inner: Inner = field(default_factory=Inner)
    losses: dict = field(default_factory=dict)
    out: str = "runs"


def test_field_help_reads_the_attributes_section():
    h = field_help(Inner)
    assert h["lr"] == "Peak learning rate."
    assert h["steps"] == "Optimizer steps; continued on a second line."
    assert h["name"] == h["tag"] == "Two fields, one entry."
    assert field_help(Outer)["out"] == "Output folder."


def test_precedence_defaults_file_options_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("inner: {lr: 0.5, steps: 3}\nlosses: {hidden: {weight: 2.0, params: {q: 7}}}\n")
    c = load(Outer, f)
    assert (c.inner.lr, c.inner.steps, c.inner.name) == (0.5, 3, "a")
    c = load(Outer, f, options={"inner.steps": 4, "inner.name": None})
    assert (c.inner.steps, c.inner.name) == (4, "a")  # None = option not given
    c = load(Outer, f, options={"inner.steps": 4}, overrides=["inner.steps=5", "inner.lr=3e-5",
                                                              "losses.hidden.weight=1"])
    assert (c.inner.steps, c.inner.lr) == (5, 3e-5)
    # mappings merge key by key: the file's params survive a --set of the weight
    assert c.losses == {"hidden": {"weight": 1, "params": {"q": 7}}}
    assert isinstance(c, Outer) and isinstance(c.inner, Inner)


def test_unknown_keys_and_bad_types_are_refused_with_the_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"--set inner\.lrr=1: unknown key 'inner\.lrr'; valid "
                                          r"keys in 'inner': \['flag', 'lr', 'name', 'steps', "
                                          r"'tag'\]"):
        load(Outer, overrides=["inner.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'innr'; valid keys: \['inner', "
                                          r"'losses', 'out'\]"):
        load(Outer, overrides=["innr.lr=1"])
    with pytest.raises(ConfigError, match=r"--set inner\.steps=many: inner\.steps: Value 'many'"):
        load(Outer, overrides=["inner.steps=many"])
    f = tmp_path / "bad.yaml"
    f.write_text("inner: {stepz: 3}\n")
    with pytest.raises(ConfigError, match=rf"{f}: unknown key 'inner\.stepz'"):
        load(Outer, f)
    with pytest.raises(ConfigError, match="does not exist"):
        load(Outer, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="expected key=value"):
        load(Outer, overrides=["inner.steps"])
    with pytest.raises(ConfigError, match=r"option --steps: inner\.steps"):
        load(Outer, options={"inner.steps": "x"}, option_names={"inner.steps": "--steps"})


def test_yaml_round_trip(tmp_path):
    c = load(Outer, overrides=["inner.lr=0.25", "losses.a.weight=3"])
    f = tmp_path / "saved.yaml"
    f.write_text(to_yaml(c))
    assert load(Outer, f) == c


def test_schema_keys_and_defaults():
    assert schema_keys(Outer) == ["inner.lr", "inner.steps", "inner.name", "inner.tag",
                                  "inner.flag", "losses", "out"]
    assert field_default(Outer, "inner.steps") == 10 and field_default(Outer, "losses") == {}
    with pytest.raises(ConfigError, match="is not a key of Inner"):
        field_default(Outer, "inner.nope")


def test_generated_options_take_help_and_default_from_the_schema():
    @click.command()
    @option(Outer, "inner.steps", "--steps")
    @option(Outer, "inner.flag", "--flag/--no-flag")
    @option(Outer, "out", "--out", "-o")
    @set_option()
    def cmd(overrides, **kwargs):
        opts, rest = split_options(kwargs)
        c = load(Outer, options=opts, overrides=overrides)
        click.echo(f"{c.inner.steps} {c.inner.flag} {c.out} {rest}")

    r = CliRunner()
    res = r.invoke(cmd, ["--help"])
    text = " ".join(res.output.split())
    assert "Optimizer steps; continued on a second line. [inner.steps; default: 10]" in text
    assert "[out; default: runs]" in text
    assert r.invoke(cmd, []).output.strip() == "10 True runs {}"
    assert r.invoke(cmd, ["--steps", "3", "--no-flag", "-o", "x"]).output.strip() == \
        "3 False x {}"
    assert r.invoke(cmd, ["--steps", "3", "--set", "inner.steps=4"]).output.strip() == \
        "4 True runs {}"


def test_empty_set_value_is_an_empty_string_and_help_markup_is_plain():
    from vlkd.common.config import plain_text

    c = load(Outer, overrides=["inner.name=", "out="])
    assert (c.inner.name, c.out) == ("", "")
    assert plain_text("the ``data.split`` of :class:`~vlkd.train.model.VLConfig`") == \
        "the data.split of vlkd.train.model.VLConfig"
