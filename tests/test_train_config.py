"""`vlkd-train` configuration: one system (vlkd.common.config) for the YAML file, the generated
command-line options and --set overrides."""
from __future__ import annotations

import dataclasses

import pytest

from vlkd.common import config as common_config
from vlkd.train import cli
from vlkd.train.config import ConfigError, RunConfig, load_config


def test_file_then_options_then_set(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim: {lr: 0.5, eps: 1.0e-6}\ntrain: {max_steps: 3, seed: 1}\n"
                    "losses: {hidden: {weight: 2.0}}\n")
    cfg = load_config(path, ["optim.lr=0.25", "losses.hidden.params.queue_size=8"],
                      options={"optim.lr": 0.3, "train.max_steps": 7, "data.batch_size": None})
    assert cfg.optim.lr == 0.25                      # --set beats the option and the file
    assert cfg.train.max_steps == 7                  # the option beats the file
    assert (cfg.optim.eps, cfg.train.seed) == (1e-6, 1)          # the file beats the defaults
    assert cfg.data.batch_size == RunConfig().data.batch_size    # None: option not given
    assert cfg.losses == {"hidden": {"weight": 2.0, "params": {"queue_size": 8}}}


def test_unknown_keys_are_refused_with_the_valid_ones(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: {max_step: 3}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.max_step'.*'max_steps'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer'"):
        load_config(None, ["optimizer.lr=1"])
    with pytest.raises(ConfigError, match="option --max-steps"):
        load_config(None, options={"train.max_steps": "many"},
                    option_names={"train.max_steps": "--max-steps"})
    assert issubclass(ConfigError, common_config.ConfigError)


def _field_default(key: str):
    node = RunConfig()
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _shown(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "none" if value == "" else str(value)


@pytest.mark.parametrize("command", ["finetune", "distill", "evaluate"])
def test_options_show_the_dataclass_default_and_set_its_key(command):
    """Every option that sets a config key is generated from the schema: its help names the key
    and shows the field's default, and it defaults to "not given"."""
    cmd = cli.main.commands[command]
    keys = {}
    for p in cmd.params:
        if p.name and p.name.startswith("cfg__"):
            key = p.name[len("cfg__"):].replace("__", ".")
            keys[key] = p
            assert p.default is None, p.opts
            assert f"[{key}; default: " in p.help, (p.opts, p.help)
            if (command, key) != ("evaluate", "task.name"):  # shown as "the model's task"
                assert f"default: {_shown(_field_default(key))}]" in p.help, (p.opts, p.help)
    assert "model.model" in keys and "--set" in {o for p in cmd.params for o in p.opts}
    if command != "evaluate":
        assert {"train.output_dir", "optim.lr", "data.regions", "task.name"} <= set(keys)


def test_saved_config_loads_back(tmp_path):
    cfg = load_config(None, ["losses.hidden.params.proj_dim=null", "optim.betas=[0.8, 0.9]",
                             "model.config.hidden_dropout=0.0", "data.captions=/a/b:c.json"])
    common_config.save(cfg, tmp_path)
    again = load_config(tmp_path / "config.yaml")
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
