"""Users' own detectron2 parts in vlkd-extract: plugin modules (--plugin, VLKD_PLUGINS, the
vlkd.plugins entry points) that register a backbone, its config keys, or ROI heads with their
pooler family."""
from __future__ import annotations

import importlib.metadata
import sys
import textwrap
import uuid

import numpy as np
import pytest
import torch

from extract_fixtures import DETECTOR_CONFIGS, make_images, read_shards, tiny_weights  # noqa: F401
from extract_fixtures import invoke_extract as invoke


@pytest.fixture(autouse=True)
def _forget_loaded_plugins():
    """A plugin imported by one test must not reach the configs of later tests (its
    add_config hook adds keys to every detector config built in the process)."""
    from vlkd.extract import plugins

    before = dict(plugins._loaded)
    yield
    plugins._loaded.clear()
    plugins._loaded.update(before)
from vlkd.common.manifest import read_manifest
from vlkd.common.regionset import RegionSet
from vlkd.common.validate import validate_region_set
from vlkd.extract import plugins

torch.set_num_threads(1)


def write_module(folder, text: str) -> str:
    """A uniquely named module in ``folder`` (registries are per process: names must not
    repeat between tests)."""
    name = f"vlkd_test_plugin_{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.py").write_text(textwrap.dedent(text).replace("NAME", name))
    return name


def proposals(config, weights, images, out, *args, expect=0, env=None):
    return invoke([*args, "proposals", "--images", images, "--config", config, "--weights",
                   weights, "--out", out, "--shard-index", "all", "--no-progress",
                   "--num-workers", 0, "--feature-dtype", "float32"], expect=expect, env=env)


BACKBONE_PLUGIN = """
    from detectron2.config import CfgNode
    from detectron2.modeling import BACKBONE_REGISTRY
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    BUILT = []

    def add_config(cfg):
        cfg.MODEL.NAME = CfgNode({"TAG": "none"})

    @BACKBONE_REGISTRY.register()
    def build_NAME_backbone(cfg, input_shape):
        BUILT.append(cfg.MODEL.NAME.TAG)
        return build_resnet_backbone(cfg, input_shape)
"""


def test_plugin_backbone_with_its_own_config_keys_runs_proposals(tiny_weights, tmp_path,
                                                                 monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    name = write_module(tmp_path, BACKBONE_PLUGIN)
    cfg = tmp_path / "plugin-c4.yaml"
    cfg.write_text(f'_BASE_: "{DETECTOR_CONFIGS["c4"]}"\nMODEL:\n  BACKBONE:\n'
                   f'    NAME: build_{name}_backbone\n  {name}:\n    TAG: tiny\n')
    make_images(tmp_path / "imgs", 3)
    w = tiny_weights["c4"]
    # Without the plugin, detectron2 knows neither the config key nor the backbone.
    res = proposals(cfg, w, tmp_path / "imgs", tmp_path / "none", expect=1)
    assert "not a detectron2 config key" in res.output and "--plugin MODULE" in res.output
    nokey = tmp_path / "nokey.yaml"
    nokey.write_text(f'_BASE_: "{DETECTOR_CONFIGS["c4"]}"\nMODEL:\n  BACKBONE:\n'
                     f'    NAME: build_{name}_backbone\n')
    res = proposals(nokey, w, tmp_path / "imgs", tmp_path / "none", expect=1)
    assert f"No object named 'build_{name}_backbone' found in 'BACKBONE' registry" in res.output
    assert "--plugin MODULE" in res.output
    res = proposals(cfg, w, tmp_path / "imgs", tmp_path / "none", "--plugin", "no_such_mod_x",
                    expect=1)
    assert "--plugin no_such_mod_x: no module named 'no_such_mod_x'" in res.output

    out = tmp_path / "set"
    proposals(cfg, w, tmp_path / "imgs", out, "--plugin", name)
    assert sys.modules[name].BUILT == ["tiny"]
    assert [f for f in validate_region_set(out) if f.level == "error"] == []
    assert name in plugins.loaded_plugins()
    # The plugin backbone is a ResNet under another name: the same weights give the same set.
    ref = tmp_path / "ref"
    proposals(DETECTOR_CONFIGS["c4"], w, tmp_path / "imgs", ref)
    a, b = read_shards(out), read_shards(ref)
    for key in ("image_ids", "offsets", "boxes", "classes", "features"):
        np.testing.assert_array_equal(a["shard-00000-of-00001.h5"][key],
                                      b["shard-00000-of-00001.h5"][key], err_msg=key)


def test_plugins_from_the_environment_and_entry_points(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    env_mod = write_module(tmp_path, "LOADED = True\n")
    ep_mod = write_module(tmp_path, """
        CALLS = []

        def register():
            CALLS.append("register")
    """)
    eps = [importlib.metadata.EntryPoint("mine", f"{ep_mod}:register", plugins.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(plugins, "_entry_points", lambda: eps)
    loaded = plugins.load_plugins(environ={plugins.ENV_VAR: f" {env_mod}, "})
    assert env_mod in loaded and f"mine = {ep_mod}:register" in loaded
    assert sys.modules[env_mod].LOADED and sys.modules[ep_mod].CALLS == ["register"]
    plugins.load_plugins(environ={plugins.ENV_VAR: env_mod})  # once per process
    assert sys.modules[ep_mod].CALLS == ["register"]
    # Errors name the plugin, where it was named and what to do.
    with pytest.raises(plugins.PluginError, match=r"VLKD_PLUGINS no_such_mod_y: no module named"):
        plugins.load_plugins(environ={plugins.ENV_VAR: "no_such_mod_y"}, entry_points=False)
    with pytest.raises(plugins.PluginError, match="expected a Python module name"):
        plugins.load_plugins(["plugins/mine.py"], entry_points=False)
    broken = write_module(tmp_path, "raise RuntimeError('needs a GPU')\n")
    eps.append(importlib.metadata.EntryPoint("broken", broken, plugins.ENTRY_POINT_GROUP))
    with pytest.raises(plugins.PluginError, match=r"entry point 'broken = .*' \(group "
                                                  r"vlkd.plugins\) cannot be loaded: "
                                                  r"RuntimeError: needs a GPU"):
        plugins.load_plugins(environ={})


POOLER_PLUGIN = """
    from detectron2.modeling import ROI_HEADS_REGISTRY
    from detectron2.modeling.roi_heads import Res5ROIHeads

    from vlkd.extract.pooling import POOLERS, C4Family

    @ROI_HEADS_REGISTRY.register()
    class NAMEHeads(Res5ROIHeads):
        pass

    @POOLERS.register()
    class NAMEFamily(C4Family):
        kind, description, heads = "C4-max", "res5 + max pool", (NAMEHeads,)

        def pool(self, features, boxes):
            rh = self.roi_heads
            return rh._shared_roi_transform([features[f] for f in rh.in_features],
                                            boxes).amax(dim=[2, 3])
"""


def test_plugin_pooler_family_for_its_own_roi_heads(tiny_weights, tmp_path, monkeypatch):
    from detectron2.structures import Boxes

    from vlkd.extract.detector import Detector
    from vlkd.extract.pooling import POOLERS, boxes_to_resized

    monkeypatch.syspath_prepend(str(tmp_path))
    name = write_module(tmp_path, POOLER_PLUGIN)
    cfg = tmp_path / "max-c4.yaml"
    cfg.write_text(f'_BASE_: "{DETECTOR_CONFIGS["c4"]}"\nMODEL:\n  ROI_HEADS:\n'
                   f'    NAME: {name}Heads\n')
    images = make_images(tmp_path / "imgs", 3)
    out = tmp_path / "set"
    try:
        proposals(cfg, tiny_weights["c4"], tmp_path / "imgs", out,
                  env={plugins.ENV_VAR: name})
        m = read_manifest(out)
        # The family, not a C4/FPN switch, names the pooling in the manifest.
        assert m["detector"]["kind"] == "C4-max" and m["detector"]["roi_heads"] == f"{name}Heads"
        assert m["options"]["features"] == "pooled over the stored boxes (C4-max: res5 + max pool)"
        # The stored features are the res5 output max-pooled over the stored boxes.
        det = Detector.load(cfg, tiny_weights["c4"])
        assert det.kind == "C4-max" and det.pooler.description == "res5 + max pool"
        rs = RegionSet(out)
        for iid, path in images.items():
            from vlkd.data.images import read_image

            r, dec = rs.get(iid), read_image(path)
            image_list, feats = det.backbone_features([det.preprocessing(dec.rgb)])
            b = boxes_to_resized(r.boxes, dec.hw, tuple(image_list.image_sizes[0]))
            rh = det.roi_heads
            with torch.no_grad():
                want = rh._shared_roi_transform([feats[f] for f in rh.in_features],
                                                [Boxes(b)]).amax(dim=[2, 3]).numpy()
            np.testing.assert_allclose(r.features, want, rtol=1e-5,
                                       atol=1e-5 * np.abs(want).max())
    finally:
        POOLERS._obj_map.pop(f"{name}Family", None)  # registries are per process
