"""Teacher-vs-student attention maps for one example (what the attention loss makes alike)."""
from __future__ import annotations

import json

from pathlib import Path

import torch

from . import build
from .config import load_config
from .tasks import build_task, model_inputs


@torch.no_grad()
def attention_figure(teacher_dir: str, student_dir: str, regions: str, teacher_regions: str,
                     captions: str, split: str, out_png: str | Path, *, index: int = 0,
                     seed: int = 0) -> dict:
    """Draw the last layer's head-averaged attention of teacher and student on one caption
    sample (Oscar's seq2seq mask: text rows see text causally, tags and regions) to a PNG.

    Args:
        teacher_dir, student_dir: model directories (``save_pretrained`` + vlkd_train.json).
        regions: the student's (proposals) set; teacher_regions: the aligned teacher set.
        captions, split: caption file and Karpathy split the example is taken from.
        out_png: output path.
        index: which caption record (sorted by image id) to show.
    Returns:
        ``{"image_id", "tokens", "mse"}``: the example and the attention-map MSE between the two.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = build.read_meta(student_dir)
    layout = [f"data.{k}={json.dumps(v)}" for k, v in meta.items() if k in build.LAYOUT_KEYS]
    cfg = load_config(None, [f"data.regions={regions}", f"data.teacher_regions={teacher_regions}",
                             f"data.captions={captions}", f"data.split={split}",
                             "task.name=caption", "data.num_workers=0", f"train.seed={seed}",
                             *layout])
    tokenizer = build.resolve_tokenizer(cfg, student_dir)
    encoder = build.make_encoder(cfg, tokenizer,
                                 build.tag_names(cfg, regions, vocab=meta.get("tag_vocab")))
    # train=False: the caption is shown as written, nothing masked
    task = build_task(cfg, encoder, train=False)
    records = build.train_records(cfg)
    if not records:
        raise ValueError(f"no caption records in {captions} split {split}")
    rec = records[min(index, len(records) - 1)]
    stream = build.make_stream(cfg, [rec], task, regions=regions, teacher_regions=teacher_regions,
                               shuffle=False, batch_size=1)
    batch = next(iter(stream))
    teacher = build.load_model_dir(teacher_dir).eval()
    student = build.load_model_dir(student_dir).eval()
    s_out = student(model_inputs(batch, student.config.geometry_dim, seq2seq=True),
                    task="none", output_attentions=True)
    t_out = teacher(model_inputs(batch, teacher.config.geometry_dim, seq2seq=True, teacher=True),
                    task="none", output_attentions=True)
    s_att = s_out.attentions[-1][0].mean(0)     # (L, L)
    t_att = t_out.attentions[-1][0].mean(0)
    ids = batch["input_ids"][0].tolist()
    n_text = len(ids)
    n_reg = int(batch.get("region_mask", torch.ones(1, s_att.shape[0] - n_text))[0].sum())
    valid = [i for i, t in enumerate(ids) if t != encoder.pad_id] + \
        [n_text + r for r in range(n_reg)]
    v = torch.tensor(valid)
    s_att, t_att = s_att[v][:, v], t_att[v][:, v]
    labels = tokenizer.convert_ids_to_tokens([ids[i] for i in valid if i < n_text]) + \
        [f"r{r}" for r in range(n_reg)]
    mse = float(((s_att - t_att) ** 2).mean())
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.2))
    vmax = float(max(s_att.max(), t_att.max()))
    for ax, att, name in ((axes[0], t_att, f"teacher ({teacher.config.num_layers} layers, "
                           f"{teacher.config.hidden_size}-d)"),
                          (axes[1], s_att, f"student ({student.config.num_layers} layers, "
                           f"{student.config.hidden_size}-d)")):
        im = ax.imshow(att.numpy(), cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(f"{name}: last layer, heads averaged", fontsize=9)
        step = max(1, len(labels) // 40)
        ax.set_xticks(range(0, len(labels), step))
        ax.set_xticklabels(labels[::step], rotation=90, fontsize=6)
        ax.set_yticks(range(0, len(labels), step))
        ax.set_yticklabels(labels[::step], fontsize=6)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    fig.colorbar(im, ax=axes, shrink=0.7)
    fig.suptitle(f"image {rec.image_id}: \"{rec.text}\"  (attention MSE {mse:.2e})", fontsize=10)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return {"image_id": rec.image_id, "tokens": labels, "mse": mse}
