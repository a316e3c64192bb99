"""Importing foreign weights into a :class:`~vlkd.train.model.VLModel`.

* Hugging Face BERT / MiniLM directories (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``) initialise the text part: embeddings, layers, pooler, and the LM head
  when the checkpoint has one (``BertForMaskedLM`` / ``BertForPreTraining``).
* Oscar / VinVL checkpoints (``pytorch_model.bin`` of ``BertForImageCaptioning``,
  ``BertImgForPreTraining`` or ``ImageBertForSequenceClassification``) initialise everything.

Key names are translated, never guessed: anything that does not translate is listed in the
returned :class:`ImportReport` (``unmatched``), as is every model tensor left at its
initialisation (``missing``). Pickled checkpoints load with ``torch.load(weights_only=True)``.

Oscar key → vlkd key::

    bert.embeddings.* / bert.encoder.* / bert.pooler.*  → bert.*            (same names)
    bert.img_embedding.{weight,bias}                     → region_embedding.*
    bert.LayerNorm.{weight,bias}  (use_img_layernorm)    → region_layer_norm.*
    cls.predictions.transform.*                          → mlm_head.transform.*
    cls.predictions.bias (and decoder.bias, same values) → mlm_head.bias
    cls.predictions.decoder.weight                       → tied to bert.embeddings.word_embeddings
    cls.seq_relationship.*                               → itm_head.*   (same labels, below)
    classifier.{weight,bias}  (--classifier linear)      → vqa_head.fc.*  (vqa_head: linear)
    classifier.{0,2}.{weight,bias}  (--classifier mlp)   → vqa_head.classifier.{0,2}.*
                                                           (vqa_head: oscar_mlp)

The image-text matching head needs no change: vlkd's labels are Oscar's
(``BertImgForPreTraining``'s ``next_sentence_label`` from ``oscar/datasets/oscar_tsv.py``
``random_sent``: 0 = matched, 1 = text b (tags) from another image, 2 = text a from another
image), so an imported ``cls.seq_relationship`` predicts what it predicted in Oscar.

A VQA classifier's output i is the answer that Oscar's ``run_vqa.py`` maps it to: the i-th key
of the ``trainval_ans2label.pkl`` it was trained with (``data.answer_vocab``; see
:func:`vlkd.data.vqa.load_answer_vocab`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .model import VLConfig, VLModel

__all__ = [
    "ImportReport",
    "load_state_dict_file",
    "translate_state_dict",
    "import_state_dict",
    "init_text_from_hf",
    "load_oscar_checkpoint",
    "config_from_hf",
    "config_from_oscar",
]

# Buffers some checkpoints carry that the model rebuilds itself.
_IGNORED = re.compile(r"(^|\.)(position_ids|token_type_ids)$")


@dataclass
class ImportReport:
    """What an import did.

    Attributes:
        loaded: Model keys that received a tensor.
        unmatched: Checkpoint keys with no place in the model (with the reason).
        missing: Model keys that the checkpoint did not provide (left at initialisation).
        ignored: Checkpoint buffers the model rebuilds (``position_ids``, ...).
    """

    loaded: list[str] = field(default_factory=list)
    unmatched: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors, {len(self.unmatched)} unmatched, "
                 f"{len(self.missing)} missing, {len(self.ignored)} ignored buffers"]
        lines += [f"  unmatched {k}: {why}" for k, why in sorted(self.unmatched.items())]
        lines += [f"  missing   {k}" for k in sorted(self.missing)]
        return "\n".join(lines)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a ``.safetensors`` file, or a pickled state dict with ``weights_only=True``.

    A folder is searched for ``model.safetensors`` then ``pytorch_model.bin``.
    """
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin in this folder")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # training checkpoints that wrap the state dict
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict (name → tensor), found {type(state).__name__}")
    return state


def _translate_key(key: str, config: VLConfig) -> tuple[str | None, str]:
    """One foreign key → (vlkd key or None, reason when None)."""
    key = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))  # pre-2019 BERT names
    if key.startswith("bert."):
        rest = key[len("bert."):]
        if rest.startswith(("embeddings.", "encoder.", "pooler.")):
            return "bert." + rest, ""
        if rest.startswith("img_embedding."):
            return "region_embedding." + rest[len("img_embedding."):], ""
        if rest.startswith("LayerNorm."):
            if not config.region_layer_norm:
                return None, "region LayerNorm present but config.region_layer_norm is False"
            return "region_layer_norm." + rest[len("LayerNorm."):], ""
        return None, "no vlkd counterpart (Oscar variant not supported)"
    if key.startswith(("embeddings.", "encoder.", "pooler.")):  # bare BertModel checkpoints
        return "bert." + key, ""
    if key.startswith("cls.predictions.transform."):
        return "mlm_head." + key[len("cls.predictions."):], ""
    if key in ("cls.predictions.bias", "cls.predictions.decoder.bias"):
        return "mlm_head.bias", ""
    if key.startswith("cls.seq_relationship."):
        return "itm_head." + key[len("cls.seq_relationship."):], ""
    if key in ("classifier.weight", "classifier.bias"):
        if config.vqa_head != "linear":
            return None, ("Oscar's linear VQA classifier (--classifier linear); build the model "
                          "with vqa_head='linear' to import it")
        return "vqa_head.fc." + key.split(".")[-1], ""
    m = re.fullmatch(r"classifier\.([02])\.(weight|bias)", key)
    if m:
        if config.vqa_head != "oscar_mlp":
            return None, ("Oscar's mlp VQA classifier (--classifier mlp: Linear-ReLU-Linear); "
                          "build the model with vqa_head='oscar_mlp' to import it")
        return f"vqa_head.classifier.{m[1]}.{m[2]}", ""
    return None, "no vlkd counterpart"


def translate_state_dict(state: dict[str, torch.Tensor], model: VLModel,
                         ) -> tuple[dict[str, torch.Tensor], ImportReport]:
    """Renames an Oscar / HF BERT state dict to vlkd keys and checks shapes.

    Returns:
        (translated state dict, report). Tensors whose shape differs from the model's are
        left out and reported as unmatched.
    """
    report = ImportReport()
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if _IGNORED.search(key):
            report.ignored.append(key)
            continue
        if key == "cls.predictions.decoder.weight":
            # The head is tied to the word embeddings: accept the decoder only when it is them.
            src = state.get("bert.embeddings.word_embeddings.weight",
                            state.get("embeddings.word_embeddings.weight"))
            if src is None or not torch.equal(src, tensor):
                report.unmatched[key] = ("untied decoder; vlkd ties the LM head to the word "
                                         "embeddings, which are loaded instead")
            continue
        target, why = _translate_key(key, model.config)
        if target is None:
            report.unmatched[key] = why
            continue
        if target not in own:
            report.unmatched[key] = f"maps to {target}, which this model does not have"
            continue
        if tuple(own[target].shape) != tuple(tensor.shape):
            report.unmatched[key] = (f"shape {tuple(tensor.shape)} ≠ model {target} "
                                     f"{tuple(own[target].shape)}")
            continue
        if target in out and key.endswith("decoder.bias"):
            continue  # same tensor as cls.predictions.bias in newer transformers checkpoints
        out[target] = tensor
    report.loaded = sorted(out)
    report.missing = sorted(k for k in own if k not in out)
    return out, report


def import_state_dict(model: VLModel, state: dict[str, torch.Tensor], strict: bool = False,
                      ) -> ImportReport:
    """Translates and loads a foreign state dict into ``model`` in place.

    Args:
        model: Target model.
        state: Oscar / HF BERT keys.
        strict: Raise if anything is unmatched or missing.

    Returns:
        The :class:`ImportReport`.
    """
    out, report = translate_state_dict(state, model)
    if strict and (report.unmatched or report.missing):
        raise ValueError(f"import_state_dict: not a complete match\n{report}")
    with torch.no_grad():
        own = model.state_dict()
        for k, v in out.items():
            own[k].copy_(v.to(own[k].dtype))
    return report


def config_from_hf(directory: str | Path, **overrides: Any) -> VLConfig:
    """A :class:`VLConfig` whose text part matches a Hugging Face BERT ``config.json``."""
    raw = json.loads((Path(directory) / "config.json").read_text())
    return VLConfig(**{
        "vocab_size": raw["vocab_size"], "hidden_size": raw["hidden_size"],
        "num_layers": raw["num_hidden_layers"], "num_heads": raw["num_attention_heads"],
        "intermediate_size": raw["intermediate_size"], "hidden_act": raw.get("hidden_act", "gelu"),
        "max_position_embeddings": raw.get("max_position_embeddings", 512),
        "type_vocab_size": raw.get("type_vocab_size", 2),
        "layer_norm_eps": raw.get("layer_norm_eps", 1e-12),
        "pad_token_id": raw.get("pad_token_id", 0),
        **overrides,
    })


def init_text_from_hf(model: VLModel, directory: str | Path) -> ImportReport:
    """Initialises the text part of ``model`` from a Hugging Face BERT-family folder.

    The region projection, the VQA / ITM heads (and the LM-head transform, when the checkpoint
    has none) stay at their initialisation and are listed as ``missing``.

    Raises:
        ValueError: When the checkpoint's architecture does not fit the model's text part.
    """
    directory = Path(directory)
    raw = json.loads((directory / "config.json").read_text())
    cfg = model.config
    want = {"hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size,
            "vocab_size": cfg.vocab_size}
    diff = {k: (raw.get(k), v) for k, v in want.items() if raw.get(k) != v}
    if diff:
        pretty = ", ".join(f"{k}: checkpoint {a} vs model {b}" for k, (a, b) in diff.items())
        raise ValueError(
            f"init_text_from_hf: {directory} does not fit the model ({pretty}); build the model "
            f"with config_from_hf({str(directory)!r}, region_dim=...) or matching preset overrides")
    return import_state_dict(model, load_state_dict_file(directory))


def config_from_oscar(config_json: str | Path | dict[str, Any], geometry_dim: int = 6,
                      **overrides: Any) -> VLConfig:
    """A :class:`VLConfig` from an Oscar / VinVL ``config.json``.

    Oscar's ``img_feature_dim`` is feature + geometry (VinVL: 2054 = 2048 + 6). The VQA head
    follows ``ImageBertForSequenceClassification``: ``classifier: mlp`` is ``oscar_mlp`` with
    ``cls_hidden_scale`` (default 2), ``linear`` or no ``classifier`` key is ``linear``; its
    dropout is ``hidden_dropout_prob`` (0.3 in a checkpoint of Oscar's VQA recipe).
    """
    raw = (config_json if isinstance(config_json, dict)
           else json.loads(Path(config_json).read_text()))
    img_dim = int(raw.get("img_feature_dim", 2054))
    if img_dim <= geometry_dim:
        raise ValueError(f"config_from_oscar: img_feature_dim {img_dim} leaves no feature after "
                         f"{geometry_dim} geometry dims")
    vals: dict[str, Any] = {
        "vocab_size": raw["vocab_size"], "hidden_size": raw["hidden_size"],
        "num_layers": raw["num_hidden_layers"], "num_heads": raw["num_attention_heads"],
        "intermediate_size": raw["intermediate_size"],
        "max_position_embeddings": raw.get("max_position_embeddings", 512),
        "type_vocab_size": raw.get("type_vocab_size", 2),
        "layer_norm_eps": raw.get("layer_norm_eps", 1e-12),
        "region_dim": img_dim - geometry_dim, "geometry_dim": geometry_dim,
        "region_layer_norm": bool(raw.get("use_img_layernorm", False)),
        "region_layer_norm_eps": raw.get("img_layer_norm_eps", 1e-12),
        "num_itm_classes": raw.get("num_contrast_classes", 2),
        "hidden_dropout": raw.get("hidden_dropout_prob", 0.1),
        "attention_dropout": raw.get("attention_probs_dropout_prob", 0.1),
        "vqa_head": "oscar_mlp" if raw.get("classifier") == "mlp" else "linear",
        "vqa_hidden_scale": int(raw.get("cls_hidden_scale", 2)),
    }
    if "num_labels" in raw and raw["num_labels"] > 2:
        vals["num_answers"] = raw["num_labels"]
    return VLConfig(**{**vals, **overrides})


def load_oscar_checkpoint(model: VLModel, path: str | Path, strict: bool = False) -> ImportReport:
    """Loads an Oscar / VinVL checkpoint (folder or ``pytorch_model.bin``) into ``model``."""
    return import_state_dict(model, load_state_dict_file(path), strict=strict)
