"""VLModel: shapes for every preset, masks, attention maps, geometry, save/load."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from vlkd.train.model import (
    VLConfig,
    VLModel,
    box_geometry,
    caption_attention_mask,
    padding_mask,
)

REPO = Path(__file__).resolve().parents[1]


def _batch(cfg: VLConfig, bsz: int = 2, num_text: int = 6, num_regions: int = 4, seed: int = 0,
           feature_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1000, 2000, (bsz, num_text), generator=g),
        "token_type_ids": torch.cat([torch.zeros(bsz, num_text // 2, dtype=torch.long),
                                     torch.ones(bsz, num_text - num_text // 2, dtype=torch.long)], 1),
        "region_features": torch.randn(bsz, num_regions, cfg.region_dim, generator=g).to(feature_dtype),
        "region_geometry": torch.rand(bsz, num_regions, cfg.geometry_dim, generator=g),
    }


@pytest.fixture(scope="module")
def tiny() -> VLModel:
    torch.manual_seed(0)
    return VLModel(VLConfig.preset("tiny")).eval()


@pytest.mark.parametrize("preset,bsz", [("tiny", 2), ("student", 2), ("teacher", 1)])
def test_forward_shapes(preset, bsz):
    torch.manual_seed(0)
    cfg = VLConfig.preset(preset)
    model = VLModel(cfg).eval()
    t, r = 5, 3
    batch = _batch(cfg, bsz=bsz, num_text=t, num_regions=r)
    batch["itm_labels"] = torch.zeros(bsz, dtype=torch.long)
    with torch.no_grad():
        out = model(batch, task="pretrain", output_scores=True)
        vqa = model(batch, task="vqa", output_attentions=False, output_hidden_states=False)
    length = t + r
    assert out.last_hidden_state.shape == (bsz, length, cfg.hidden_size)
    assert out.pooled.shape == (bsz, cfg.hidden_size)
    assert len(out.hidden_states) == cfg.num_layers + 1
    assert all(h.shape == (bsz, length, cfg.hidden_size) for h in out.hidden_states)
    assert len(out.attentions) == len(out.attention_scores) == cfg.num_layers
    assert all(a.shape == (bsz, cfg.num_heads, length, length) for a in out.attentions)
    assert out.mlm_logits.shape == (bsz, t, cfg.vocab_size)
    assert out.itm_logits.shape == (bsz, cfg.num_itm_classes)
    assert vqa.vqa_logits.shape == (bsz, cfg.num_answers)
    assert vqa.attentions is None and vqa.hidden_states is None
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)


def test_presets_and_overrides():
    teacher, student = VLConfig.preset("teacher"), VLConfig.preset("student", region_dim=1024)
    assert (teacher.num_layers, teacher.hidden_size, teacher.num_heads, teacher.region_dim) == (12, 768, 12, 2048)
    assert (student.num_layers, student.hidden_size, student.num_heads, student.region_dim) == (12, 384, 12, 1024)
    assert VLConfig.from_dict({"preset": "student", "num_layers": 6}).num_layers == 6
    with pytest.raises(KeyError, match="unknown keys"):
        VLConfig.from_dict({"preset": "tiny", "hiden_size": 3})
    with pytest.raises(ValueError, match="multiple of num_heads"):
        VLConfig(hidden_size=30, num_heads=4)


def test_model_yaml_configs_load():
    found = {}
    for path in sorted((REPO / "configs" / "models").glob("*.yaml")):
        found[path.stem] = VLConfig.from_dict(yaml.safe_load(path.read_text()))
    assert {"tiny", "tiny-teacher", "student", "teacher"} <= set(found)
    assert found["teacher"].hidden_size == 768 and found["student"].hidden_size == 384


def test_attention_maps_match_a_manual_first_layer(tiny):
    """Layer 0's scores and probabilities recomputed with plain matmuls from its weights."""
    cfg = tiny.config
    batch = _batch(cfg, bsz=2, num_text=5, num_regions=3)
    mask = padding_mask(torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
                        torch.tensor([[1, 1, 0], [1, 0, 0]]))
    with torch.no_grad():
        out = tiny(batch, attention_mask=mask, output_scores=True)
    x = out.hidden_states[0]
    att = tiny.bert.encoder.layer[0].attention.self
    heads, dh = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    for b in range(2):
        for h in range(heads):
            sl = slice(h * dh, (h + 1) * dh)
            q = x[b] @ att.query.weight[sl].T + att.query.bias[sl]
            k = x[b] @ att.key.weight[sl].T + att.key.bias[sl]
            scores = q @ k.T / math.sqrt(dh)
            torch.testing.assert_close(out.attention_scores[0][b, h], scores, rtol=1e-5, atol=1e-5)
            keep = mask[b].bool()
            probs = torch.zeros_like(scores)
            probs[:, keep] = torch.softmax(scores[:, keep], dim=-1)
            torch.testing.assert_close(out.attentions[0][b, h], probs, rtol=1e-5, atol=1e-6)


def test_attention_probs_are_returned_before_dropout():
    torch.manual_seed(0)
    model = VLModel(VLConfig.preset("tiny", attention_dropout=0.5)).train()
    out = model(_batch(model.config))
    for a in out.attentions:  # dropout would zero entries and rescale rows away from 1
        torch.testing.assert_close(a.sum(-1), torch.ones_like(a.sum(-1)))


def test_padding_does_not_change_real_tokens(tiny):
    cfg = tiny.config
    batch = _batch(cfg, bsz=2, num_text=6, num_regions=4)
    text_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    region_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    mask = padding_mask(text_mask, region_mask)
    other = {k: v.clone() for k, v in batch.items()}
    other["input_ids"][0, 4:] = 7
    other["region_features"][0, 2:] = 100.0
    other["region_features"][1, 3] = -50.0
    other["region_geometry"][0, 2:] = 0.5
    with torch.no_grad():
        a = tiny(batch, attention_mask=mask, task="vqa")
        b = tiny(other, attention_mask=mask, task="vqa")
    real = mask.bool()
    torch.testing.assert_close(a.last_hidden_state[real], b.last_hidden_state[real])
    torch.testing.assert_close(a.vqa_logits, b.vqa_logits)
    assert torch.equal(a.token_mask, real)
    # And the perturbation is visible when it is not masked.
    with torch.no_grad():
        c = tiny(other, task="vqa")
    assert not torch.allclose(c.last_hidden_state[0, 0], a.last_hidden_state[0, 0])


def test_caption_mask_matches_oscar_rules():
    caption = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0, 0]]).bool()
    context = torch.tensor([[0, 0, 0, 0, 1, 1, 0, 1, 1]]).bool()  # position 6 is padding
    m = caption_attention_mask(caption, context)[0]
    cap_pos, ctx_pos = [0, 1, 2, 3], [4, 5, 7, 8]
    for i in range(9):
        for j in range(9):
            if i in cap_pos:
                want = (j in cap_pos and j <= i) or j in ctx_pos
            elif i in ctx_pos:
                want = j in ctx_pos
            else:
                want = False
            assert bool(m[i, j]) == want, (i, j)


def test_caption_mask_by_perturbation(tiny):
    """A later caption token never changes an earlier one; the caption never changes context."""
    cfg = tiny.config
    # [CLS] c1 c2 c3 [SEP] | tag tag [SEP] | r r r
    t, r = 8, 3
    batch = _batch(cfg, bsz=1, num_text=t, num_regions=r)
    caption = torch.zeros(1, t + r, dtype=torch.bool)
    caption[0, :5] = True
    context = ~caption
    mask = caption_attention_mask(caption, context)
    with torch.no_grad():
        base = tiny(batch, attention_mask=mask).last_hidden_state
        later = {**batch, "input_ids": batch["input_ids"].clone()}
        later["input_ids"][0, 3] += 1
        moved = tiny(later, attention_mask=mask).last_hidden_state
        new_caption = {**batch, "input_ids": batch["input_ids"].clone()}
        new_caption["input_ids"][0, 1:4] = torch.tensor([11, 12, 13])
        recap = tiny(new_caption, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(moved[0, :3], base[0, :3])
    assert not torch.allclose(moved[0, 3], base[0, 3])
    assert not torch.allclose(moved[0, 4], base[0, 4])
    torch.testing.assert_close(recap[0, 5:], base[0, 5:])  # tags and regions
    assert not torch.allclose(recap[0, 1], base[0, 1])


def test_masked_positions_select_rows_of_the_full_logits(tiny):
    cfg = tiny.config
    batch = _batch(cfg, bsz=2, num_text=6)
    labels = torch.full((2, 6), -100)
    labels[0, 2], labels[1, 0], labels[1, 5] = 5, 6, 7
    with torch.no_grad():
        full = tiny(batch, task="mlm").mlm_logits
        picked = tiny(batch, task="mlm", mlm_labels=labels).mlm_logits
    assert picked.shape == (3, cfg.vocab_size)
    torch.testing.assert_close(picked, torch.stack([full[0, 2], full[1, 0], full[1, 5]]))
    # The head is tied: logits = LN(act(W h)) · E^T + b.
    head = tiny.mlm_head
    h = tiny(batch).last_hidden_state[0, 2]
    x = torch.nn.functional.gelu(h @ head.transform.dense.weight.T + head.transform.dense.bias)
    x = torch.nn.functional.layer_norm(x, (cfg.hidden_size,), head.transform.LayerNorm.weight,
                                       head.transform.LayerNorm.bias, eps=cfg.layer_norm_eps)
    want = x @ tiny.bert.embeddings.word_embeddings.weight.T + head.bias
    torch.testing.assert_close(full[0, 2], want.detach(), rtol=1e-4, atol=1e-5)


def test_fp16_region_features_are_cast(tiny):
    cfg = tiny.config
    b16 = _batch(cfg, feature_dtype=torch.float16)
    b32 = {**b16, "region_features": b16["region_features"].float()}
    with torch.no_grad():
        torch.testing.assert_close(tiny(b16).last_hidden_state, tiny(b32).last_hidden_state)


def test_box_geometry_numbers():
    boxes = torch.tensor([[[10.0, 20.0, 50.0, 100.0], [0.0, 0.0, 200.0, 100.0]]])  # (1, 2, 4)
    hw = torch.tensor([[100.0, 200.0]])  # H=100, W=200
    g7 = box_geometry(boxes, hw, dim=7)
    want = torch.tensor([[[0.05, 0.2, 0.25, 1.0, 0.2, 0.8, 0.16],
                          [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]]])
    torch.testing.assert_close(g7, want)
    torch.testing.assert_close(box_geometry(boxes, hw, dim=6), want[..., :6])
    torch.testing.assert_close(box_geometry(boxes, hw, dim=4), want[..., :4])
    with pytest.raises(ValueError, match="4, 6 or 7"):
        box_geometry(boxes, hw, dim=5)


def test_input_errors_say_what_to_do(tiny):
    cfg = tiny.config
    batch = _batch(cfg, num_text=5, num_regions=3)
    with pytest.raises(ValueError, match="padding_mask"):
        tiny(batch, attention_mask=torch.ones(2, 7))
    with pytest.raises(ValueError, match="region_dim"):
        tiny({**batch, "region_features": torch.randn(2, 3, cfg.region_dim + 1)})
    with pytest.raises(KeyError, match="box_geometry"):
        tiny({k: v for k, v in batch.items() if k != "region_geometry"})
    with pytest.raises(ValueError, match="unknown task"):
        tiny(batch, task="segmentation")
    itm_only = VLModel(VLConfig.preset("tiny", heads=("itm",)))
    with pytest.raises(ValueError, match="heads="):
        itm_only(batch, task="vqa")


def test_save_load_gives_equal_outputs(tmp_path, tiny):
    tiny.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = VLModel.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == tiny.config
    batch = _batch(tiny.config)
    with torch.no_grad():
        a, b = tiny(batch, task="pretrain"), loaded(batch, task="pretrain")
    torch.testing.assert_close(a.mlm_logits, b.mlm_logits, rtol=0, atol=0)
    torch.testing.assert_close(a.itm_logits, b.itm_logits, rtol=0, atol=0)
    # Tying survives the round trip: the head reads the loaded embeddings.
    assert loaded.mlm_head._word_embeddings[0] is loaded.bert.embeddings.word_embeddings


def test_from_pretrained_rejects_mismatched_weights(tmp_path, tiny):
    tiny.save_pretrained(tmp_path / "m")
    cfg = (tmp_path / "m" / "config.json")
    cfg.write_text(cfg.read_text().replace('"num_layers": 2', '"num_layers": 3'))
    with pytest.raises(ValueError, match="does not fit its config"):
        VLModel.from_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        VLModel.from_pretrained(tmp_path / "nothing")
