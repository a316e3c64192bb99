"""A bundle's README card: what its parts are and what one image costs on the exporting machine.

The latency is measured end to end, as a user runs the bundle: ``images`` synthetic scenes
(``vlkd.data.synthetic``, fixed seed, 320-640 px sides) written as PNG files, each read,
decoded, detected, pooled and captioned (or asked one question) by :class:`Pipeline` with
batch size 1. The whole pass is repeated ``repeats`` times and the fastest pass is reported
(the others absorb warm-up and interference), with its split between decoding, the detector
and the VL model, the device, the CPU threads and the precision.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from vlkd.common.machine import cpu_name
from vlkd.data.synthetic.writers import make_scene

__all__ = ["measure_latency", "write_card", "machine_name"]

#: The question a VQA bundle's latency is measured with (one per image).
LATENCY_QUESTION = "what is in the picture?"
_SIZES = (320, 640)


def machine_name(device: torch.device) -> str:
    """The CPU's model name (or the GPU's, on CUDA) as the system reports it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def measure_latency(bundle: str | os.PathLike, *, images: int = 4, repeats: int = 3,
                    threads: int = 0, device: str = "cpu", precision: str = "auto") -> dict:
    """Per-image latency of a bundle (module docstring).

    Returns:
        ``{"ms_per_image", "decode_ms", "detector_ms", "vl_ms", "images", "image_sizes",
        "repeats", "batch_size", "threads", "device", "machine", "precision", "beam_size",
        "max_len"}``; times in milliseconds per image, of the fastest pass.
    """
    from .pipeline import Pipeline

    saved = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        pipe = Pipeline.from_pretrained(bundle, device=device, precision=precision,
                                        batch_size=1)
        with tempfile.TemporaryDirectory(prefix="vlkd-latency-") as tmp:
            sizes = []
            for i in range(images):
                rgb, _ = make_scene(0, "test", i, *_SIZES)
                Image.fromarray(rgb).save(Path(tmp) / f"{i:03d}.png")
                sizes.append(list(rgb.shape[:2]))
            questions = [{"question_id": i, "image_id": f"{i:03d}",
                          "question": LATENCY_QUESTION} for i in range(images)]
            best = None
            for _ in range(max(1, repeats)):
                pipe.timings = dict.fromkeys(pipe.timings, 0.0)
                t0 = time.perf_counter()
                if pipe.task == "vqa":
                    pipe.answer(tmp, questions)
                else:
                    pipe(tmp)
                if pipe.detector.device.type == "cuda":
                    torch.cuda.synchronize()
                total = time.perf_counter() - t0
                if best is None or total < best[0]:
                    best = (total, dict(pipe.timings))
        total, t = best
        ms = lambda s: round(1000.0 * s / images, 2)  # noqa: E731
        return {"ms_per_image": ms(total), "decode_ms": ms(t["decode"]),
                "detector_ms": ms(t["detector"]), "vl_ms": ms(t["vl"]), "images": images,
                "image_sizes": sizes, "repeats": max(1, repeats), "batch_size": 1,
                "threads": torch.get_num_threads(), "device": str(pipe.detector.device),
                "machine": machine_name(pipe.detector.device),
                "precision": pipe.detector.precision, "beam_size": pipe.config.beam_size,
                "max_len": pipe.config.max_len}
    finally:
        torch.set_num_threads(saved)


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def write_card(bundle: str | os.PathLike, info: dict) -> Path:
    """Write ``README.md`` of a bundle from its ``bundle.json`` content."""
    det, vl, pipe = info["detector"], info["model"], info["pipeline"]
    sel = pipe["selection"]
    task = info["task"]
    what = "captions images" if task == "caption" else "answers questions about images"
    lines = [
        "# vlkd pipeline bundle",
        "",
        f"A detector and a VL model in one folder: it {what} (task `{task}`). Written by "
        f"`vlkd-train export` (vlkd {info['tool_version']}).",
        "",
        "| part | what | parameters | from |",
        "|---|---|---|---|",
        f"| detector | {det['name']}: {det['kind']} family, {det['num_classes']} classes, "
        f"{det['feature_dim']}-d region features, input {det['input']['min_size']}/"
        f"{det['input']['max_size']} {det['input']['format']} | "
        f"{_millions(det['num_parameters'])} | `{det['source']}` |",
        f"| VL model | {vl['num_layers']} layers x {vl['hidden_size']}, reads "
        f"{vl['region_dim']}-d regions" + (f", {vl['num_answers']} answers"
                                           if vl["num_answers"] else "")
        + f" | {_millions(vl['num_parameters'])} | `{vl['source']}` |",
        f"| total | | {_millions(det['num_parameters'] + vl['num_parameters'])} | |",
        "",
        f"Regions: {pipe['box_selection']} box selection (score > {sel['score_thresh']}, NMS "
        f"{sel['nms_thresh']}, {sel['min_boxes']}-{sel['max_boxes']} boxes), features as "
        f"{pipe['feature_dtype']}" + (f", as the training set `{info['regions']}`"
                                      if info.get("regions") else
                                      " (vlkd-extract proposals' defaults)") + "."
        + (f" Captions: beam {pipe['beam_size']}, at most {pipe['max_len']} tokens."
           if task == "caption" else ""),
        "",
        "## Latency on the exporting machine",
        "",
    ]
    lat = info.get("latency")
    if lat:
        vl_what = f"beam {lat['beam_size']}" if task == "caption" else "one question"
        sizes = ", ".join(f"{h}x{w}" for h, w in lat["image_sizes"])
        lines += [
            "| stage | ms / image |",
            "|---|---|",
            f"| read + decode | {lat['decode_ms']} |",
            f"| detector (backbone, RPN, box head, pooling) | {lat['detector_ms']} |",
            f"| VL model ({vl_what}) | {lat['vl_ms']} |",
            f"| **end to end** | **{lat['ms_per_image']}** |",
            "",
            f"{lat['images']} synthetic images ({sizes} px), batch size {lat['batch_size']}, "
            f"fastest of {lat['repeats']} passes; "
            f"{lat['device']} ({lat['machine']}), {lat['threads']} CPU "
            f"thread{'' if lat['threads'] == 1 else 's'}, {lat['precision']}.",
        ]
    else:
        lines += ["Not measured (exported with `--latency-images 0`)."]
    cmd = ("vlkd-infer caption --bundle BUNDLE --images IMAGES --out results.json"
           if task == "caption" else
           "vlkd-infer answer --bundle BUNDLE --images IMAGES --questions Q.json --out "
           "results.json")
    call = ('pipe("photos/")  # [CaptionResult(image_id, caption, tags, error)]'
            if task == "caption" else
            'pipe.answer("photos/", "questions.json")  # [AnswerResult(...)]')
    lines += [
        "",
        "## Use",
        "",
        "```bash",
        cmd,
        "```",
        "",
        "```python",
        "import vlkd",
        "pipe = vlkd.Pipeline.from_pretrained(\"BUNDLE\")",
        call,
        "```",
        "",
        "## Files",
        "",
        "| file | holds |",
        "|---|---|",
        "| `bundle.json` | format version, task, the parts' sources, digests and sizes, this "
        "latency |",
        "| `pipeline.yaml` | box selection, feature dtype, beam (vlkd-infer `--set "
        "pipeline.KEY=VALUE` changes them for a run) |",
        "| `detector/` | `config.yaml` (resolved detectron2 config), `model.safetensors`, "
        "`class_names.json` |",
        "| `model/` | a vlkd model directory: `config.json`, `model.safetensors`, the tokenizer, "
        "`vlkd_train.json`" + (", `answers.txt`" if vl["num_answers"] else "") + " |",
        "",
    ]
    path = Path(bundle) / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
