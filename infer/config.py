"""The options of ``vlkd-infer``: what a bundle fixes (:class:`PipelineConfig`, saved in the
bundle as ``pipeline.yaml``) and what one run chooses (:class:`InferConfig`).

A run's configuration follows the rule of every vlkd command (``vlkd.common.config``): the
dataclass defaults, with the bundle's ``pipeline.yaml`` as the ``pipeline`` section, then a YAML
file (``--config``), the command's options, then ``--set key=value``. The resolved config is
written beside the results (``results.config.yaml`` for ``--out results.json``).

This module imports neither torch nor detectron2, so ``--help`` stays fast.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vlkd.data.images import DEFAULT_MAX_PIXELS
from vlkd.extract.options import BOX_SELECTION_RULES, FEATURE_DTYPES, BoxSelection

__all__ = ["PipelineConfig", "InferConfig", "PRECISIONS", "DEVICES", "check_infer_config"]

#: ``--precision`` values: ``auto`` is fp16 on CUDA and fp32 on the CPU.
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class PipelineConfig:
    """How a bundle turns an image into regions and regions into text; ``vlkd-train export``
    writes it as BUNDLE/pipeline.yaml, and --set pipeline.KEY=VALUE changes it for one run.

    Attributes:
        selection: Which detections become regions: the box selection of the proposals set
            the model was trained on (export --regions), else vlkd-extract proposals' defaults.
        box_selection: The rule applying it: detectron2 or vinvl (as vlkd-extract proposals
            --box-selection).
        feature_dtype: Region features are rounded to this dtype before the VL model reads
            them: float16, as a region set stores them (what the model was trained on), or
            float32.
        beam_size: Captioning beam width (1 = greedy).
        max_len: Longest caption, in tokens ([SEP] included).
    """

    selection: BoxSelection = field(default_factory=BoxSelection)
    box_selection: str = "detectron2"
    feature_dtype: str = "float16"
    beam_size: int = 5
    max_len: int = 20


@dataclass
class InferConfig:
    """Options of ``vlkd-infer caption`` and ``vlkd-infer answer``.

    Attributes:
        bundle: The pipeline bundle (written by vlkd-train export).
        images: Image folder, list file (path[<TAB>id]), COCO JSON or Karpathy dataset_coco.json;
            the image ids follow vlkd-extract's rules (a folder's file names without extension).
        image_root: Folder that relative paths in JSON/list sources are relative to.
        questions: answer: VQA v2 questions JSON or JSON lines of {question_id, image_id,
            question}; a question's image_id is matched as a string against the image ids.
        out: Results JSON (COCO caption results / official VQA results format).
        save_regions: Also write the images' regions as a region set in this folder (off: none
            is written).
        device: auto (cuda when available, else cpu), cpu or cuda.
        precision: auto (fp16 on CUDA, fp32 on the CPU), fp32, fp16 or bf16 (CUDA only):
            autocast of the detector and the VL model.
        batch_size: Images per detector pass (same padded size only) and samples per VL pass.
        num_workers: Decoding processes (0: decode in this process).
        threads: CPU threads of torch (0: torch's default).
        top_k: answer: also write the K best answers of each question with their
            probabilities and the tags it was asked with, to <out stem>.topk.json (0: none).
        max_pixels: Refuse images larger than this many pixels (decompression bombs).
        pipeline: The bundle's settings (:class:`PipelineConfig`, from its pipeline.yaml).
    """

    bundle: str = "???"
    images: str = "???"
    out: str = "???"
    image_root: str | None = None
    questions: str = ""
    save_regions: str = ""
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 8
    num_workers: int = 0
    threads: int = 0
    top_k: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


def check_infer_config(cfg: InferConfig) -> None:
    """Refuse values outside their choices (the message names the option)."""
    p = cfg.pipeline
    for flag, value, choices in (("--device", cfg.device.split(":")[0], DEVICES),
                                 ("--precision", cfg.precision, PRECISIONS),
                                 ("pipeline.box_selection", p.box_selection, BOX_SELECTION_RULES),
                                 ("pipeline.feature_dtype", p.feature_dtype, FEATURE_DTYPES)):
        if value not in choices:
            raise ValueError(f"{flag} {value!r}: expected one of {', '.join(choices)}")
    for flag, value, low in (("--batch-size", cfg.batch_size, 1), ("--num-workers",
                                                                   cfg.num_workers, 0),
                             ("--threads", cfg.threads, 0), ("--top-k", cfg.top_k, 0),
                             ("pipeline.beam_size", p.beam_size, 1),
                             ("pipeline.max_len", p.max_len, 1)):
        if value < low:
            raise ValueError(f"{flag} {value}: must be >= {low}")
