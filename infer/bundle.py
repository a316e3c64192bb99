"""Pipeline bundles: one folder holding a detector and the VL model that reads its regions.

``vlkd-train export --detector DIR --model DIR --out BUNDLE`` (:func:`export_bundle`) writes::

    BUNDLE/
      README.md            the card: parts and their parameters, the latency measured at export
      bundle.json          format version, task, where each part came from (digests), params,
                           the measured latency (machine-readable)
      pipeline.yaml        the settings vlkd-infer runs with (infer.config.PipelineConfig): box
                           selection, feature dtype, beam
      detector/
        config.yaml        the resolved detectron2 config (no _BASE_ chain left)
        model.safetensors  the detector's weights
        class_names.json   its K class names (the model's object tags)
        attribute_names.json   when it has an attribute head
      model/               a complete vlkd model directory: config.json, model.safetensors,
                           the tokenizer (vocab.txt, tokenizer*.json), answers.txt (VQA),
                           vlkd_train.json (task, input layout, tag class names)

``model/`` stays a model directory (``vlkd-train evaluate --model BUNDLE/model`` works) and
``detector/`` a detector folder (``vlkd-extract proposals --config BUNDLE/detector/config.yaml
--weights BUNDLE/detector/model.safetensors`` works). Export refuses a detector and a model
that do not belong together: the model's tag class names (``vlkd_train.json``) must be the
detector's class names, in order, and its region feature width the detector's pooled width.
With ``--regions SET`` (the proposals set the model was trained on) the set must have been made
by this detector (config and weights digests), and its box selection becomes the bundle's.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

from vlkd import __version__
from vlkd.common.config import ConfigError, load as load_config_file, save as save_config
from vlkd.common.digest import file_digest
from vlkd.common.regionset import RegionSet
from vlkd.extract.detector import ATTRIBUTE_NAMES_FILE, CLASS_NAMES_FILE, Detector
from vlkd.extract.options import BoxSelection
from vlkd.train.predictor import VLPredictor

from .config import PipelineConfig

__all__ = ["Bundle", "BundleError", "export_bundle", "check_compatible", "find_detector_files",
           "pipeline_from_regions", "BUNDLE_FILE", "PIPELINE_FILE", "CARD_FILE"]

BUNDLE_FORMAT = "vlkd-bundle"
BUNDLE_FORMAT_VERSION = 1
BUNDLE_FILE = "bundle.json"
PIPELINE_FILE = "pipeline.yaml"
CARD_FILE = "README.md"
DETECTOR_DIR, MODEL_DIR = "detector", "model"
DETECTOR_CONFIG, DETECTOR_WEIGHTS = "config.yaml", "model.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")


class BundleError(ValueError):
    """A bundle that cannot be written or read, or parts that do not belong together."""


# ------------------------------------------------------------------------------------- reading

@dataclass
class Bundle:
    """An exported bundle folder (see the module docstring).

    Attributes:
        path: the folder.
        info: its ``bundle.json``.
        pipeline: its ``pipeline.yaml``.
    """

    path: Path
    info: dict
    pipeline: PipelineConfig

    @property
    def detector_config(self) -> Path:
        return self.path / DETECTOR_DIR / DETECTOR_CONFIG

    @property
    def detector_weights(self) -> Path:
        return self.path / DETECTOR_DIR / DETECTOR_WEIGHTS

    @property
    def model_dir(self) -> Path:
        return self.path / MODEL_DIR

    @property
    def task(self) -> str:
        return str(self.info.get("task", ""))

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Bundle":
        """Open a bundle folder, checking that its files are there.

        Raises:
            BundleError: not a bundle, another format version, or a part missing.
        """
        p = Path(path)
        if not p.is_dir():
            raise BundleError(f"--bundle {path}: no such folder; write one with `vlkd-train "
                              "export --detector DIR --model DIR --out BUNDLE`")
        if not (p / BUNDLE_FILE).is_file():
            raise BundleError(f"{p} is not a pipeline bundle (no {BUNDLE_FILE}); write one with "
                              "`vlkd-train export --detector DIR --model DIR --out BUNDLE`")
        try:
            info = json.loads((p / BUNDLE_FILE).read_text(encoding="utf-8"))
        except ValueError as e:
            raise BundleError(f"{p / BUNDLE_FILE} is not valid JSON ({e}); export the bundle "
                              "again") from None
        if info.get("format") != BUNDLE_FORMAT or \
                info.get("format_version") != BUNDLE_FORMAT_VERSION:
            raise BundleError(f"{p}: {BUNDLE_FILE} says format {info.get('format')!r} version "
                              f"{info.get('format_version')!r}; this vlkd reads "
                              f"{BUNDLE_FORMAT!r} version {BUNDLE_FORMAT_VERSION}: export it again")
        missing = [str(f.relative_to(p)) for f in (
            p / PIPELINE_FILE, p / DETECTOR_DIR / DETECTOR_CONFIG,
            p / DETECTOR_DIR / DETECTOR_WEIGHTS, p / MODEL_DIR / "config.json",
            p / MODEL_DIR / "model.safetensors") if not f.is_file()]
        if missing:
            raise BundleError(f"bundle {p} lacks {', '.join(missing)}; export it again")
        try:
            pipeline = load_config_file(PipelineConfig, p / PIPELINE_FILE)
        except (ConfigError, ValueError) as e:
            raise BundleError(f"bundle {p}: {e}") from None
        return cls(p, info, pipeline)

    def check_parts(self, detector: Detector, predictor: VLPredictor) -> None:
        """Refuse a detector and model that do not belong together (:func:`check_compatible`)."""
        check_compatible(detector, predictor, str(self.path / DETECTOR_DIR), str(self.model_dir))


# ------------------------------------------------------------------------------------- checks

def check_compatible(detector: Detector, predictor: VLPredictor, detector_name: str,
                     model_name: str) -> None:
    """The model must read this detector's regions: its tags are the detector's classes, in
    order, and its region features the detector's pooled width.

    Raises:
        BundleError: saying which differs, where, and what to do.
    """
    det_names, tag_names = list(detector.class_names), list(predictor.class_names)
    if det_names != tag_names:
        if len(det_names) != len(tag_names):
            how = (f"{len(tag_names)} tag class names, the detector {len(det_names)} classes "
                   f"(e.g. {tag_names[:3]} vs {det_names[:3]})")
        else:
            k = next(i for i, (a, b) in enumerate(zip(tag_names, det_names)) if a != b)
            how = (f"class names that differ from the detector's at index {k} ({tag_names[k]!r} "
                   f"in the model, {det_names[k]!r} in the detector)")
        raise BundleError(
            f"model {model_name} does not fit detector {detector_name}: its vlkd_train.json has "
            f"{how}. The model's object tags are the classes of the detector whose regions it "
            "was trained on: export it with that detector, or fine-tune the model on regions of "
            "this one (vlkd-extract proposals with it, then vlkd-train finetune)")
    if predictor.region_dim != detector.feature_dim:
        raise BundleError(
            f"model {model_name} does not fit detector {detector_name}: the model takes "
            f"{predictor.region_dim}-d region features, the detector ({detector.kind}) pools "
            f"{detector.feature_dim}-d ones. A teacher model reads a teacher detector's features "
            "and a student model its student detector's: export the model with the detector whose "
            "features it was trained on")


def find_detector_files(detector: str | os.PathLike, weights: str | os.PathLike | None = None
                        ) -> tuple[Path, Path]:
    """A detector folder's config and weights: ``config.yaml`` and the one weights file
    (``model.safetensors``, ``model_final.pth``, or the only ``.safetensors``/``.pth``/``.pt``).

    Raises:
        BundleError: no config, no weights, or several candidate weights without ``weights``.
    """
    d = Path(detector)
    if not d.is_dir():
        raise BundleError(f"--detector {detector}: no such folder; expected a detector folder "
                          "(config.yaml + weights + class_names.json, as vlkd-extract "
                          "train-detector or convert-detector write)")
    config = d / DETECTOR_CONFIG
    if not config.is_file():
        raise BundleError(f"--detector {d} has no {DETECTOR_CONFIG} (the detectron2 config)")
    if weights is not None:
        w = Path(weights)
        if not w.is_file():
            raise BundleError(f"--detector-weights {weights}: no such file")
        return config, w
    for name in (DETECTOR_WEIGHTS, "model_final.pth"):
        if (d / name).is_file():
            return config, d / name
    found = sorted(p for p in d.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if len(found) == 1:
        return config, found[0]
    if not found:
        raise BundleError(f"--detector {d} holds no weights file ({', '.join(_WEIGHT_SUFFIXES)})")
    raise BundleError(f"--detector {d} holds several weights files "
                      f"({', '.join(p.name for p in found)}); pick one with --detector-weights")


def pipeline_from_regions(regions: str | os.PathLike, detector: Detector,
                          predictor: VLPredictor) -> PipelineConfig:
    """The settings of the proposals set a model was trained on (its box selection and feature
    dtype), after checking that ``detector`` made it and the model reads it.

    Raises:
        BundleError: not a proposals set, made by another detector, of another width.
    """
    rs = RegionSet(regions)
    m = rs.manifest
    if m.get("role") != "proposals":
        raise BundleError(f"--regions {regions} is a {m.get('role')!r} set; pass the proposals "
                          "set the model was trained on (its boxes are the detector's)")
    made = m.get("detector", {})
    for key, what in (("config_digest", "config"), ("weights_digest", "weights")):
        if made.get(key) != getattr(detector, key):
            raise BundleError(f"--regions {regions} was made by another detector: its "
                              f"{what} digest {str(made.get(key))[:12]}… differs from the "
                              f"exported detector's {getattr(detector, key)[:12]}…; pass the "
                              "detector folder that made the set, or leave --regions out")
    if rs.feature_dim != predictor.region_dim:
        raise BundleError(f"--regions {regions} has {rs.feature_dim}-d features, the model "
                          f"takes {predictor.region_dim}-d ones: it is not the model's set")
    opts = m.get("options", {})
    names = {f.name for f in fields(BoxSelection)}
    return PipelineConfig(selection=BoxSelection(**{k: v for k, v in opts.items() if k in names}),
                          box_selection=opts.get("box_selection", "detectron2"),
                          feature_dtype=str(m.get("feature_dtype", "float16")))


# ------------------------------------------------------------------------------------- export

def _num_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _write_detector(det: Detector, out: Path) -> dict:
    """detector/: resolved config, safetensors weights, class (and attribute) names."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    cfg = det.cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = DETECTOR_WEIGHTS
    cfg.MODEL.DEVICE = "cpu"
    (out / DETECTOR_CONFIG).write_text(cfg.dump(), encoding="utf-8")
    # copies: safetensors refuses tensors that share storage
    state = {k: v.detach().cpu().contiguous().clone() for k, v in det.model.state_dict().items()}
    save_file(state, str(out / DETECTOR_WEIGHTS))
    (out / CLASS_NAMES_FILE).write_text(json.dumps(det.class_names) + "\n", encoding="utf-8")
    if det.attribute_names:
        (out / ATTRIBUTE_NAMES_FILE).write_text(json.dumps(det.attribute_names) + "\n",
                                                encoding="utf-8")
    return {"dir": DETECTOR_DIR, "name": det.name, "kind": det.kind,
            "feature_dim": det.feature_dim, "num_classes": len(det.class_names),
            "num_attributes": len(det.attribute_names),
            "num_parameters": _num_parameters(det.model),
            "input": {"min_size": det.preprocessing.min_size,
                      "max_size": det.preprocessing.max_size,
                      "format": det.preprocessing.input_format},
            "config_digest": det.config_digest,
            "source_weights_digest": det.weights_digest,
            "weights_digest": file_digest(out / DETECTOR_WEIGHTS).hex()}


def _write_model(vl: VLPredictor, out: Path) -> dict:
    """model/: the model directory's files, as they are."""
    out.mkdir(parents=True)
    for f in sorted(vl.model_dir.iterdir()):
        if f.is_file():
            shutil.copy2(f, out / f.name)
    c = vl.model.config
    return {"dir": MODEL_DIR, "task": vl.task, "region_dim": vl.region_dim,
            "num_layers": c.num_layers, "hidden_size": c.hidden_size,
            "num_parameters": vl.num_parameters,
            "num_answers": len(vl.answers) if vl.answers is not None else 0,
            "tokenizer_digest": vl.meta.get("tokenizer_digest", ""),
            "weights_digest": file_digest(out / "model.safetensors").hex()}


def export_bundle(detector: str | os.PathLike, model: str | os.PathLike,
                  out: str | os.PathLike, *, detector_weights: str | os.PathLike | None = None,
                  regions: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                  latency_images: int = 4, latency_repeats: int = 3, threads: int = 0,
                  device: str = "cpu", log: Callable[[str], None] = lambda s: None) -> Path:
    """Write a bundle (module docstring), checked and with its README card.

    Args:
        detector: detector folder (config.yaml, weights, class_names.json).
        model: vlkd model directory (its tokenizer and answers.txt go with it).
        out: the bundle folder to create (must not exist, or be empty).
        detector_weights: the weights file when the folder holds several.
        regions: the proposals set the model was trained on: its box selection and feature
            dtype become the bundle's, after checking this detector made it.
        overrides: ``key=value`` over :class:`~vlkd.infer.config.PipelineConfig`.
        latency_images, latency_repeats: the card's latency measurement (0 images: none).
        threads: CPU threads for the measurement (0: torch's default).
        device: where the latency is measured.
        log: progress messages.

    Returns:
        The bundle folder.

    Raises:
        BundleError: bad inputs, or a detector and model that do not belong together.
    """
    from .card import measure_latency, write_card

    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise BundleError(f"--out {out} exists and is not an empty folder; pick a new one")
    config, weights = find_detector_files(detector, detector_weights)
    log(f"export: loading detector {config.parent} and model {model}")
    det = Detector.load(config, weights, device="cpu")
    vl = VLPredictor(model, device="cpu")
    check_compatible(det, vl, str(Path(detector)), str(model))
    base = pipeline_from_regions(regions, det, vl) if regions else PipelineConfig()
    try:
        pipeline = load_config_file(PipelineConfig, None, overrides=overrides, base=base)
    except ConfigError as e:
        raise BundleError(f"--set: {e}") from None
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        info = {"format": BUNDLE_FORMAT, "format_version": BUNDLE_FORMAT_VERSION,
                "tool_version": __version__, "task": vl.task,
                "detector": {**_write_detector(det, tmp / DETECTOR_DIR),
                             "source": str(Path(detector).resolve())},
                "model": {**_write_model(vl, tmp / MODEL_DIR),
                          "source": str(Path(model).resolve())},
                "pipeline": asdict(pipeline),
                "regions": str(Path(regions).resolve()) if regions else None}
        save_config(pipeline, tmp, PIPELINE_FILE)
        _write_info(tmp, info)
        if latency_images > 0:
            log(f"export: measuring latency ({latency_images} images, best of "
                f"{latency_repeats}) on {device}")
            info["latency"] = measure_latency(tmp, images=latency_images,
                                              repeats=latency_repeats, threads=threads,
                                              device=device)
        else:
            info["latency"] = None
        _write_info(tmp, info)
        write_card(tmp, info)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_info(folder: Path, info: dict) -> None:
    (folder / BUNDLE_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
