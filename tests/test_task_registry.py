"""The task registry: every task declares what a run of it needs in its one module, and the
model, the config defaults, the run builder and the command line read it from there."""
from __future__ import annotations

import pytest

from vlkd.common.config import ConfigError
from vlkd.train import build, cli
from vlkd.train.config import RunConfig, TaskConfig, default_losses, load_config
from vlkd.train.losses import LOSSES
from vlkd.train.model import task_heads
from vlkd.train.registry import Registry, RegistryError
from vlkd.train.tasks import TASKS, Task, task_names
from vlkd.train.tasks.caption import CaptionTask

DISTILL_TERMS = {
    "attention": {"type": "attention_mse", "weight": 1.0,
                  "params": {"layer_map": "uniform", "target": "probs"}},
    "hidden": {"type": "hidden_infonce", "weight": 1.0,
               "params": {"layer_map": "uniform", "queue_size": 4096, "temperature": 0.07,
                          "proj_dim": 128, "teacher_projection": "linear"}},
}


def test_the_three_tasks_keep_their_heads_losses_and_metrics():
    """What model.py, config.py and cli.py said about each task before the registry."""
    assert set(TASKS) == {"caption", "vqa", "pretrain"} <= set(task_names())
    assert task_names(evaluable=True) == ["caption", "vqa"]
    want = {
        "caption": (("mlm",), "CIDEr", {"task": {"type": "masked_token_ce", "weight": 1.0,
                                                 "params": {"label_smoothing": 0.2}}}),
        "vqa": (("vqa",), "accuracy", {"task": {"type": "vqa_bce", "weight": 1.0,
                                                "params": {}}}),
        "pretrain": (("mlm", "itm"), "", {
            "mlm": {"type": "masked_token_ce", "weight": 1.0, "params": {"label_smoothing": 0.0}},
            "itm": {"type": "itm_ce", "weight": 1.0, "params": {}}}),
    }
    for name, (heads, metric, terms) in want.items():
        spec = TASKS.get(name)
        assert (spec.name, spec.heads, spec.metric, task_heads(name)) == (name, heads, metric,
                                                                          heads)
        assert spec.needs_answers == (name == "vqa")
        task = TaskConfig(name=name, label_smoothing=0.2)
        assert default_losses(task, distill=False) == terms
        logits = {"type": "logit_kd", "weight": 0.0,
                  "params": {"temperature": 1.0, "head": "vqa" if name == "vqa" else "mlm"}}
        assert default_losses(task, distill=True) == {**terms, **DISTILL_TERMS, "logits": logits}
    # the model's own head names still work as forward tasks
    assert [task_heads(t) for t in ("none", "mlm", "vqa", "itm")] == [(), ("mlm",), ("vqa",),
                                                                      ("itm",)]
    with pytest.raises(ValueError, match="unknown task 'segmentation'"):
        task_heads("segmentation")


def test_every_task_meets_the_contract():
    for name in TASKS:
        spec = TASKS.get(name)
        assert issubclass(spec, Task) and spec.name == name
        assert spec.heads and set(spec.heads) <= {"mlm", "vqa", "itm"}
        for term in spec.default_losses(TaskConfig(name=name)).values():
            assert term["type"] in LOSSES
        evaluable = bool(spec.metric)
        for hook in ("eval_records", "predict", "score", "result_rows"):
            assert (getattr(spec, hook).__func__ is not getattr(Task, hook).__func__) == evaluable


def test_registry_names_what_is_registered():
    reg = Registry("widget", "Widgets: objects with a name.")
    assert reg.__doc__ == "Widgets: objects with a name."

    @reg.register()
    class A:
        name = "a"

    reg.register("b")(int)
    assert reg.names() == ["a", "b"] and reg.get("a") is A and reg["b"] is int and "a" in reg
    with pytest.raises(RegistryError, match=r"^unknown widget 'c'; registered: \['a', 'b'\]$"):
        reg.get("c")
    with pytest.raises(RegistryError, match="'a' is already registered"):
        reg.register("a")(str)
    with pytest.raises(RegistryError, match="has no name"):
        reg.register()(object())


def test_a_task_without_evaluation_is_refused_by_evaluate():
    cfg = load_config(None, ["task.name=pretrain"])
    with pytest.raises(ConfigError, match=r"evaluate supports the tasks \['caption', 'vqa'\], "
                                          r"not 'pretrain'"):
        build.eval_records(cfg)
    assert not TASKS.get("pretrain").has_eval(cfg)


def test_a_new_task_plugs_in_with_one_registration(monkeypatch, tmp_path):
    """Registering a class is all it takes: --task offers it, the model runs its heads, the
    loss defaults and the records come from it."""
    class ShortCaptionTask(CaptionTask):
        name = "short-caption"
        heads = ("mlm",)
        metric = ""

        @classmethod
        def default_losses(cls, task):
            return {"task": {"type": "masked_token_ce", "weight": 2.0, "params": {}}}

        @classmethod
        def train_records(cls, cfg, answers=None):
            return super().train_records(cfg, answers)[:1]

    monkeypatch.setitem(TASKS._objects, ShortCaptionTask.name, ShortCaptionTask)
    finetune_task = next(p for p in cli.finetune.params if "--task" in p.opts)
    evaluate_task = next(p for p in cli.evaluate.params if "--task" in p.opts)
    assert "short-caption" in finetune_task.type.choices
    assert "short-caption" not in evaluate_task.type.choices
    assert task_heads("short-caption") == ("mlm",)
    cfg = load_config(None, ["task.name=short-caption"])
    terms = default_losses(cfg.task, distill=True)
    assert terms["task"]["weight"] == 2.0 and terms["logits"]["params"]["head"] == "mlm"
    caps = tmp_path / "c.json"
    caps.write_text('{"images": [{"id": 1}, {"id": 2}], "annotations": ['
                    '{"image_id": 1, "id": 5, "caption": "a red square"},'
                    ' {"image_id": 2, "id": 6, "caption": "a blue star"}]}')
    cfg = load_config(None, ["task.name=short-caption", f"data.captions={caps}",
                             "data.split=''"])
    assert [(r.key, r.text) for r in build.train_records(cfg)] == [("1:5", "a red square")]
    assert isinstance(RunConfig().task, TaskConfig)
