"""A detectron2 detector for extraction: config, safe weight loading, preprocessing, detection.

:class:`Detector` wraps a GeneralizedRCNN built from any detectron2 YAML config (``_BASE_``
chains included; ``_BASE_: "model_zoo:COCO-Detection/faster_rcnn_R_50_C4_3x.yaml"`` names a
config shipped inside detectron2). It exposes the steps of one inference separately so that a
job can pool features over boxes from the *same* backbone pass that produced them:

    images = [detector.preprocessing(rgb) for rgb in decoded]     # DataLoader workers
    image_list, features = detector.backbone_features(images)     # one backbone pass
    detections = detector.detect(image_list, features, selection) # RPN + box head + selection
    pooled = pool_box_features(detector.roi_heads, features, boxes_in_resized_frame)

Preprocessing is exactly detectron2's ``DefaultPredictor``: the model's ``INPUT.FORMAT``
channel order, ``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)`` (PIL bilinear on uint8),
then the model's own normalisation and padding (``preprocess_image``).

Weights: ``.pth``/``.pt`` through ``torch.load(weights_only=True)`` (tensors only, no code
runs), ``.safetensors`` through safetensors, and pickles (``.pkl``, ``.pyth``: detectron2 /
Detectron1 / pycls model zoo formats) only when the caller trusts them, because unpickling
runs arbitrary code. Every model parameter must receive a weight: a checkpoint that leaves
parameters at their random init is refused (a silently half-loaded detector makes plausible
but wrong features).
"""
from __future__ import annotations

import contextlib
import logging
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import yaml
from PIL import Image
from detectron2 import model_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.layers import batched_nms
from detectron2.modeling import build_model
from detectron2.structures import Boxes, ImageList

from vlkd.common.digest import bytes_digest, file_digest

from .options import PRECISION_NAMES, BoxSelection
from .plugins import config_hooks
from .pooling import UnsupportedROIHeadsError, pool_box_features, pooler_for

logger = logging.getLogger(__name__)

MODEL_ZOO_PREFIX = "model_zoo:"
PICKLE_SUFFIXES = (".pkl", ".pyth")
TENSOR_SUFFIXES = (".pth", ".pt", ".safetensors")


CLASS_NAMES_FILE = "class_names.json"  # beside a detector config: its class names, in order
ATTRIBUTE_NAMES_FILE = "attribute_names.json"  # ... and its attribute names (attribute heads)
RESIZE_RULES = ("detectron2", "maskrcnn_benchmark")  # INPUT.RESIZE_RULE (Preprocessing)


class DetectorError(ValueError):
    """A detector cannot be built or loaded (message says what was found and what to do)."""


class WeightsError(DetectorError):
    """Weights refused or incompatible with the model."""


# ----------------------------------------------------------------------------------- config

def _merge(a: dict, b: dict) -> None:
    """Merge dict ``a`` into ``b`` (``a`` wins), as fvcore's ``load_yaml_with_base`` does."""
    for k, v in a.items():
        if isinstance(v, dict) and isinstance(b.get(k), dict):
            _merge(v, b[k])
        else:
            b[k] = v


def _load_yaml_with_base(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise DetectorError(f"detector config {path} does not exist; pass a detectron2 YAML "
                            "config (e.g. configs/detectors/tiny-c4.yaml)") from None
    if not isinstance(data, dict):
        raise DetectorError(f"{path}: expected a YAML mapping, found {type(data).__name__}")
    base = data.pop("_BASE_", None)
    merged: dict = {}
    for b in ([] if base is None else base if isinstance(base, list) else [base]):
        b = str(b)
        if b.startswith(MODEL_ZOO_PREFIX):
            name = b[len(MODEL_ZOO_PREFIX):]
            try:
                zoo_path = model_zoo.get_config_file(name)
            except RuntimeError as e:
                raise DetectorError(f"{path}: _BASE_ {b!r} is not a detectron2 model-zoo "
                                    f"config ({e}); see detectron2/model_zoo/configs") from None
            # Model-zoo files chain with relative _BASE_ paths, which fvcore resolves.
            base_dict = CfgNode.load_yaml_with_base(zoo_path, allow_unsafe=False)
        else:
            bp = Path(os.path.expanduser(b))
            base_dict = _load_yaml_with_base(bp if bp.is_absolute() else path.parent / bp)
        _merge(base_dict, merged)
    _merge(data, merged)
    return merged


#: vlkd's own detector parts whose configs carry keys of their own: ``{module: (keys)}``. A module
#: is imported (registering its classes) and its ``add_config`` applied when a config sets one
#: of its keys, so other configs resolve, and digest, as before it existed.
CONFIG_KEY_MODULES = {"vlkd.extract.vinvl": ("MODEL.VINVL", "INPUT.RESIZE_RULE"),
                      "vlkd.extract.tee": ("MODEL.EFFICIENTNET", "MODEL.BIFPN")}


def _own_config_hooks(merged: dict) -> list:
    """The ``add_config`` of each :data:`CONFIG_KEY_MODULES` module whose keys ``merged`` sets."""
    import importlib

    def has(key: str) -> bool:
        d = merged
        for part in key.split("."):
            if not isinstance(d, dict) or part not in d:
                return False
            d = d[part]
        return True

    return [importlib.import_module(m).add_config for m, keys in CONFIG_KEY_MODULES.items()
            if any(has(k) for k in keys)]


def load_detector_config(path: str | os.PathLike, opts: Sequence[str] = ()) -> CfgNode:
    """Load a detectron2 config: defaults, the ``_BASE_`` chain, the file, then ``opts``.

    Args:
        path: YAML file. ``_BASE_`` may be relative to the file, absolute, or
            ``model_zoo:<name>`` for a config shipped with detectron2.
        opts: ``KEY VALUE`` pairs (detectron2's ``merge_from_list``).

    Returns:
        The resolved config (frozen).
    """
    merged = _load_yaml_with_base(Path(path))
    cfg = get_cfg()
    # config keys of vlkd's own parts the config uses, then of plugins' backbones / heads
    for add_config in _own_config_hooks(merged) + config_hooks():
        add_config(cfg)
    # merge_from_file also upgrades configs written for older detectron2 versions.
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(merged, f)
        tmp = f.name
    try:
        cfg.merge_from_file(tmp)
    except KeyError as e:
        raise DetectorError(f"{path}: {e}; the key is not a detectron2 config key (a typo, or "
                            "a config for a detectron2 project that is not imported: load the "
                            "module that declares its keys with `vlkd-extract --plugin MODULE`"
                            ")") from None
    finally:
        os.unlink(tmp)
    if opts:
        cfg.merge_from_list(list(opts))
    cfg.freeze()
    return cfg


def config_digest(cfg: CfgNode) -> str:
    """Hex digest of the resolved config, ignoring what does not change the outputs' meaning
    (where weights come from, which device runs, the output folder)."""
    c = cfg.clone()
    c.defrost()
    c.MODEL.WEIGHTS = ""
    c.MODEL.DEVICE = ""
    c.OUTPUT_DIR = ""
    return bytes_digest(c.dump().encode("utf-8")).hex()


# ---------------------------------------------------------------------------------- weights

class _SafeCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer whose file reading never unpickles untrusted data.

    fvcore's ``_load_file`` calls ``torch.load`` without ``weights_only``; here every
    non-pickle file goes through ``torch.load(weights_only=True)`` (or safetensors), and the
    pickle formats are only read when ``trust_pickle`` is set.
    """

    def __init__(self, model, *, trust_pickle: bool):
        super().__init__(model, save_dir="")
        self.trust_pickle = trust_pickle
        self.incompatible = None

    def _load_file(self, filename: str):
        if filename.endswith(PICKLE_SUFFIXES):
            if not self.trust_pickle:
                raise WeightsError(
                    f"refusing to load {filename}: {Path(filename).suffix} weights are Python "
                    "pickles, and unpickling runs whatever code the file contains. Pass "
                    "--trust-pickle only if you trust where the file comes from, or convert "
                    "it once to a .pth state dict (torch.save(model.state_dict(), 'w.pth')).")
            return super()._load_file(filename)
        if filename.endswith(".safetensors"):
            from safetensors.torch import load_file
            return {"model": load_file(filename, device="cpu")}
        return super()._load_file(filename)  # -> _torch_load for .pth/.pt (+ URL query checks)

    def _torch_load(self, f):
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises UnpicklingError with its own explanation
            raise WeightsError(
                f"{f} cannot be loaded with torch.load(weights_only=True): {e}\nIt holds "
                "Python objects beyond tensors. Re-save it as a plain state dict, or, if "
                "you trust its origin, rename it .pkl and pass --trust-pickle.") from None

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


def load_weights(model: torch.nn.Module, path: str | os.PathLike, *,
                 trust_pickle: bool = False) -> None:
    """Load detector weights into ``model``, refusing unsafe or incomplete checkpoints.

    Args:
        model: a detectron2 model.
        path: local ``.pth``/``.pt``/``.safetensors`` file (or ``.pkl``/``.pyth`` with
            ``trust_pickle``). A dict with a ``"model"`` entry or a bare state dict.
        trust_pickle: allow pickle formats.

    Raises:
        WeightsError: missing file, pickle without trust, non-tensor content, or model
            parameters the checkpoint does not provide (or provides with another shape).
    """
    path = str(path)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path} does not exist (vlkd loads local files only; "
                           "download model-zoo weights first)")
    if not path.endswith(PICKLE_SUFFIXES + TENSOR_SUFFIXES):
        raise WeightsError(f"weights {path}: unknown extension; expected one of "
                           f"{', '.join(TENSOR_SUFFIXES + PICKLE_SUFFIXES)}")
    ckpt = _SafeCheckpointer(model, trust_pickle=trust_pickle)
    ckpt.load(path, checkpointables=[])
    inc = ckpt.incompatible
    missing = list(inc.missing_keys) if inc is not None else []
    bad_shapes = list(inc.incorrect_shapes) if inc is not None else []
    if missing or bad_shapes:
        shown = ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else "")
        shapes = "; ".join(f"{k}: file {a} vs model {b}" for k, a, b in bad_shapes[:4])
        raise WeightsError(
            f"{path} does not fit the model built from the config: {len(missing)} "
            f"parameter(s) missing ({shown})" + (f"; shape mismatches: {shapes}" if shapes
                                                 else "")
            + ". Check that config and weights belong together (NUM_CLASSES, depth, widths).")


def _names_beside(config, filename: str, count: int, what: str) -> list[str] | None:
    """The names listed in ``filename`` beside the config (None: no such file)."""
    path = Path(config).with_name(filename)
    if not path.is_file():
        return None
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DetectorError(f"{path} is not valid JSON ({e}); expected a list of names") \
            from None
    if not (isinstance(names, list) and len(names) == count):
        raise DetectorError(f"{path} should list the model's {count} {what}, found "
                            f"{len(names) if isinstance(names, list) else names!r}; fix or "
                            "delete it")
    return [str(n) for n in names]


# ---------------------------------------------------------------------------- preprocessing

@dataclass(frozen=True)
class Preprocessing:
    """DefaultPredictor's preprocessing, as a small picklable callable for DataLoader workers.

    Attributes:
        min_size: ``INPUT.MIN_SIZE_TEST`` (0: no resize).
        max_size: ``INPUT.MAX_SIZE_TEST``.
        input_format: ``"BGR"`` or ``"RGB"``, the channel order the model expects.
        pixel_mean, pixel_std: the model's normalisation (applied on the device, recorded in
            the manifest).
        resize_rule: how the resized size is computed (``INPUT.RESIZE_RULE``): ``detectron2``
            (``ResizeShortestEdge``, rounding) or ``maskrcnn_benchmark`` (SGB's
            ``Resize.get_size``, truncation: :func:`maskrcnn_benchmark_size`); both resize with
            PIL bilinear.
    """

    min_size: int
    max_size: int
    input_format: str
    pixel_mean: tuple[float, ...] = field(default=())
    pixel_std: tuple[float, ...] = field(default=())
    resize_rule: str = "detectron2"

    @classmethod
    def from_config(cls, cfg: CfgNode) -> "Preprocessing":
        fmt = cfg.INPUT.FORMAT
        if fmt not in ("RGB", "BGR"):
            raise DetectorError(f"INPUT.FORMAT {fmt!r} is not supported; expected RGB or BGR "
                                "(as detectron2's DefaultPredictor)")
        rule = cfg.INPUT.get("RESIZE_RULE", "detectron2")
        if rule not in RESIZE_RULES:
            raise DetectorError(f"INPUT.RESIZE_RULE {rule!r} is not supported; expected one of "
                                f"{', '.join(RESIZE_RULES)}")
        return cls(int(cfg.INPUT.MIN_SIZE_TEST), int(cfg.INPUT.MAX_SIZE_TEST), fmt,
                   tuple(float(x) for x in cfg.MODEL.PIXEL_MEAN),
                   tuple(float(x) for x in cfg.MODEL.PIXEL_STD), rule)

    def resized_hw(self, h: int, w: int) -> tuple[int, int]:
        """The network-input (height, width) of an (h, w) image."""
        if self.min_size == 0:
            return h, w
        if self.resize_rule == "maskrcnn_benchmark":
            return maskrcnn_benchmark_size(h, w, self.min_size, self.max_size)
        return T.ResizeShortestEdge.get_output_shape(h, w, self.min_size, self.max_size)

    def __call__(self, rgb: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> (3, h, w) uint8 tensor in the model's channel order, resized
        exactly as ``DefaultPredictor`` does (its ``astype(float32)`` happens on the device)."""
        img = rgb if self.input_format == "RGB" else rgb[:, :, ::-1]
        img = np.ascontiguousarray(img)
        if self.min_size and self.resize_rule == "maskrcnn_benchmark":
            h, w = img.shape[:2]
            nh, nw = self.resized_hw(h, w)
            if (nh, nw) != (h, w):  # torchvision's F.resize of a PIL image: PIL bilinear
                img = T.ResizeTransform(h, w, nh, nw, Image.BILINEAR).apply_image(img)
        elif self.min_size:
            img = T.ResizeShortestEdge(self.min_size, self.max_size).get_transform(img) \
                .apply_image(img)
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))

    def manifest_info(self) -> dict:
        d = asdict(self)
        d["pixel_mean"], d["pixel_std"] = list(self.pixel_mean), list(self.pixel_std)
        if self.resize_rule == "maskrcnn_benchmark":
            d["resize"] = ("maskrcnn-benchmark Resize.get_size (PIL bilinear), as "
                           "scene_graph_benchmark's test transforms")
        else:  # the manifests of detectron2 models keep the entry they always had
            del d["resize_rule"]
            d["resize"] = "ResizeShortestEdge (PIL bilinear), as detectron2 DefaultPredictor"
        return d


def maskrcnn_benchmark_size(h: int, w: int, min_size: int, max_size: int) -> tuple[int, int]:
    """The (height, width) maskrcnn-benchmark resizes an (h, w) image to at test time.

    ``Resize.get_size`` of ``maskrcnn_benchmark/data/transforms/transforms.py`` (SGB): the short
    side becomes ``min_size`` unless the long side would exceed ``max_size``, in which case the
    short side is ``round(max_size * short / long)``; the long side is then truncated
    (``int(size * long / short)``), where detectron2's ``ResizeShortestEdge`` rounds.
    """
    size = min_size
    lo, hi = float(min(w, h)), float(max(w, h))
    if max_size is not None and hi / lo * size > max_size:
        size = int(round(max_size * lo / hi))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


# --------------------------------------------------------------------------- box selection

@dataclass
class Detections:
    """One image's selected detections in the resized frame, best first.

    Attributes:
        boxes: (n, 4) float32, x1 y1 x2 y2, clipped to the resized image.
        scores: (n,) float32, probability of ``classes``.
        classes: (n,) int64 in 0..K-1.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor


def select_boxes(pred_boxes: torch.Tensor, probs: torch.Tensor, image_hw: tuple[int, int],
                 sel: BoxSelection) -> Detections:
    """Threshold, per-class NMS, max/min boxes: detectron2's ``fast_rcnn_inference_single_image``
    plus the top-up to ``min_boxes``.

    Args:
        pred_boxes: (R, K*4) class-specific (or (R, 4) class-agnostic) regressed boxes.
        probs: (R, K+1) class probabilities, background last.
        image_hw: resized image (height, width), boxes are clipped to it.
        sel: the selection rule.

    Returns:
        At most ``max_boxes`` detections, sorted by score; at least ``min_boxes`` when the
        image has that many non-empty candidate pairs.
    """
    R, K = probs.shape[0], probs.shape[1] - 1
    boxes = Boxes(pred_boxes.float().reshape(-1, 4))
    boxes.clip(image_hw)
    boxes = boxes.tensor.view(R, -1, 4)
    if boxes.shape[1] == 1:  # class-agnostic regression: one box for every class
        boxes = boxes.expand(R, K, 4)
    scores = probs[:, :K].float()
    usable = (torch.isfinite(boxes).all(dim=2) & torch.isfinite(scores)
              & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1]))
    # Unusable pairs get -1 so that no threshold (>= 0) or top-k ever picks them.
    scores = torch.where(usable, scores, torch.full_like(scores, -1.0))
    flat_scores = scores.reshape(-1)
    flat_boxes = boxes.reshape(-1, 4)
    flat_classes = torch.arange(K, device=probs.device).repeat(R)

    def nms(idx: torch.Tensor) -> torch.Tensor:
        keep = batched_nms(flat_boxes[idx], flat_scores[idx], flat_classes[idx], sel.nms_thresh)
        return idx[keep]  # sorted by score, descending

    above = torch.nonzero(flat_scores > sel.score_thresh).squeeze(1)
    keep = nms(above)
    if keep.numel() < sel.min_boxes:
        # Greedy NMS never lets a lower score suppress a higher one, so running it over the
        # above-threshold pairs plus the best pairs below keeps every box kept above and
        # appends the best surviving lower-scoring ones: a lowered threshold.
        n_usable = int(usable.sum())
        pool = above.numel() + sel.topup_pool
        while True:
            k = min(pool, n_usable)
            idx = torch.topk(flat_scores, k).indices if k else above[:0]
            keep = nms(idx)
            if keep.numel() >= sel.min_boxes or k >= n_usable:
                break
            pool *= 4
        keep = keep[:sel.min_boxes]
    keep = keep[:sel.max_boxes]
    return Detections(flat_boxes[keep], flat_scores[keep], flat_classes[keep])


#: SGB's per-class NMS IoU in ``filter_results_peter`` (hard-coded there).
VINVL_NMS_IOU = 0.3


def select_boxes_vinvl(proposal_boxes: torch.Tensor, probs: torch.Tensor,
                       image_hw: tuple[int, int], sel: BoxSelection) -> Detections:
    """VinVL's released-feature rule: one region per proposal, its unregressed box, its best class.

    scene_graph_benchmark's ``PostProcessor.filter_results_peter`` with
    ``TEST.IGNORE_BOX_REGRESSION True`` (``maskrcnn_benchmark/modeling/roi_heads/box_head/
    inference.py``; VinVL's feature extraction runs it with ``MODEL.ROI_HEADS.NMS_FILTER 1``):

    1. every class's boxes are the proposals, clipped to ``(w - 1, h - 1)``
       (``clip_to_image(remove_empty=False)``);
    2. for each foreground class, NMS at IoU 0.3 over all proposals by that class's score
       (``torchvision.ops.nms``, which SGB's ``layers/nms.py`` uses); a proposal keeps the
       classes it survived for;
    3. each proposal takes its best surviving class and that score; proposals with none (score
       0) go;
    4. sorted by score: those scoring at least ``sel.score_thresh``, but at least
       ``sel.min_boxes`` (the best of all) and at most ``sel.max_boxes``.

    Args:
        proposal_boxes: (R, 4) the RPN's proposals in the resized frame.
        probs: (R, K+1) class probabilities, background last.
        image_hw: resized image (height, width).
        sel: ``score_thresh``, ``min_boxes``, ``max_boxes`` (the NMS IoU is SGB's 0.3).

    Returns:
        The selected regions, best first; no proposal appears twice.
    """
    from torchvision.ops import nms

    from .vinvl import clip_legacy

    K = probs.shape[1] - 1
    boxes = clip_legacy(proposal_boxes.float(), image_hw)
    scores = probs[:, :K].float()
    mask = torch.zeros_like(scores)
    for j in range(K):
        mask[nms(boxes, scores[:, j], VINVL_NMS_IOU), j] = 1
    # SGB's layout, background column first (always 0), so that ties pick as its max(1) does.
    dists = torch.cat([torch.zeros_like(scores[:, :1]), mask * scores], dim=1)
    best, labels = dists.max(dim=1)
    keep = torch.nonzero(best).squeeze(1)
    best, labels, boxes = best[keep], labels[keep] - 1, boxes[keep]
    _, order = torch.sort(best, dim=0, descending=True)
    n = int((best >= sel.score_thresh).sum())
    if n < sel.min_boxes:
        order = order[:sel.min_boxes]
    elif n > sel.max_boxes:
        order = order[:sel.max_boxes]
    else:
        order = order[:n]
    return Detections(boxes[order], best[order], labels[order])


# --------------------------------------------------------------------------------- detector

PRECISIONS = dict(zip(PRECISION_NAMES, (None, torch.float16, torch.bfloat16)))


class Detector:
    """A detectron2 GeneralizedRCNN ready for extraction (eval mode, weights loaded).

    Attributes:
        cfg: resolved config.
        model: the GeneralizedRCNN.
        pooler: the ROI-head family that pools over given boxes (``vlkd.extract.pooling``).
        kind: the family's kind, ``"C4"``, ``"FPN"`` or a registered family's.
        feature_dim: D of a pooled region feature.
        class_names: K names (``thing_classes`` of ``DATASETS.TEST[0]`` when its length is K,
            else ``class_0..``).
        preprocessing: the picklable preprocessing callable.
        config_digest, weights_digest: hex digests recorded in the manifest.
    """

    def __init__(self, cfg: CfgNode, model: torch.nn.Module, *, name: str,
                 weights_digest: str, precision: str = "fp32",
                 require_proposal_generator: bool = True):
        if precision not in PRECISIONS:
            raise DetectorError(f"--precision {precision!r}: expected one of "
                                f"{', '.join(PRECISIONS)}")
        self.cfg = cfg
        self.model = model.eval()
        self.name = name
        try:
            self.pooler = pooler_for(model.roi_heads)
        except UnsupportedROIHeadsError as e:
            raise DetectorError(str(e)) from None
        self.kind = self.pooler.kind
        self.feature_dim = self.pooler.feature_dim
        self.preprocessing = Preprocessing.from_config(cfg)
        self.config_digest = config_digest(cfg)
        self.weights_digest = weights_digest
        self.precision = precision
        self.device = torch.device(cfg.MODEL.DEVICE)
        self.class_names = self._class_names(cfg)
        #: names of the attribute head's A attributes (empty: no attribute head)
        self.attribute_names = [f"attribute_{i}" for i in range(self.pooler.num_attributes)]
        # teacher-features pools over given boxes and never runs the RPN, so it passes False.
        if require_proposal_generator and model.proposal_generator is None:
            raise DetectorError("the model has no proposal generator (MODEL.PROPOSAL_GENERATOR"
                                " PrecomputedProposals); proposals needs an RPN model")

    @staticmethod
    def _class_names(cfg: CfgNode) -> list[str]:
        k = int(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
        if len(cfg.DATASETS.TEST):
            names = MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_classes", None)
            if names is not None and len(names) == k:
                return [str(n) for n in names]
        return [f"class_{i}" for i in range(k)]

    @classmethod
    def load(cls, config: str | os.PathLike, weights: str | os.PathLike, *, device: str = "cpu",
             precision: str = "fp32", trust_pickle: bool = False,
             opts: Sequence[str] = (), require_proposal_generator: bool = True) -> "Detector":
        """Build the model from ``config`` and load ``weights`` (see :func:`load_weights`).

        Args:
            config: detectron2 YAML.
            weights: weights file.
            device: ``cpu``, ``cuda`` or ``cuda:N``.
            precision: ``fp32``, ``fp16`` or ``bf16`` (autocast for the network; box
                arithmetic stays float32).
            trust_pickle: allow pickle weight formats.
            opts: config overrides, ``KEY VALUE`` pairs.
            require_proposal_generator: refuse a model without an RPN (only ``detect`` needs
                one; ``teacher-features`` passes False).
        """
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise DetectorError(f"--device {device}: CUDA is not available on this machine; "
                                "use --device cpu")
        cfg = load_detector_config(config, opts).clone()
        cfg.defrost()
        cfg.MODEL.DEVICE = str(device)
        cfg.freeze()
        try:
            model = build_model(cfg)
        except KeyError as e:
            if "registry" not in str(e):
                raise
            raise DetectorError(
                f"{config}: {e.args[0] if e.args else e} detectron2 knows only the backbones, "
                "meta-architectures and heads that were imported; if this one is your own (or "
                "a detectron2 project's), load the module that registers it with "
                "`vlkd-extract --plugin MODULE`, the VLKD_PLUGINS variable or a "
                "'vlkd.plugins' entry point") from None
        load_weights(model, weights, trust_pickle=trust_pickle)
        # a trained detector's folder (detectors/student/config.yaml) names it better than "config"
        name = Path(config).stem
        if name == "config" and Path(config).resolve().parent.name:
            name = Path(config).resolve().parent.name
        det = cls(cfg, model, name=name,
                  weights_digest=file_digest(weights).hex(), precision=precision,
                  require_proposal_generator=require_proposal_generator)
        # Class names: the registered dataset's metadata exists only in the process that
        # trained; `vlkd-extract train-detector` writes them next to its config.yaml.
        names = _names_beside(config, CLASS_NAMES_FILE, int(cfg.MODEL.ROI_HEADS.NUM_CLASSES),
                              "class names (MODEL.ROI_HEADS.NUM_CLASSES)")
        if names is not None:
            det.class_names = names
        names = _names_beside(config, ATTRIBUTE_NAMES_FILE, len(det.attribute_names),
                              "attribute names (its attribute head's)")
        if names is not None:
            det.attribute_names = names
        return det

    @property
    def roi_heads(self) -> torch.nn.Module:
        return self.model.roi_heads

    def manifest_info(self) -> dict:
        """The ``detector`` entry of a region-set manifest."""
        return {"name": self.name, "config_digest": self.config_digest,
                "weights_digest": self.weights_digest,
                "meta_architecture": self.cfg.MODEL.META_ARCHITECTURE,
                "roi_heads": self.cfg.MODEL.ROI_HEADS.NAME, "kind": self.kind,
                "num_classes": len(self.class_names)}

    def padded_hw(self, h: int, w: int) -> tuple[int, int]:
        """The (height, width) ``ImageList`` pads a resized (h, w) image to when it is alone
        in its batch. Images with equal padded sizes can share a batch without changing each
        other's results (see ``extract.proposals``)."""
        bb = self.model.backbone
        div = bb.size_divisibility
        pc = getattr(bb, "padding_constraints", None) or {}
        if pc.get("square_size", 0) > 0:
            h = w = pc["square_size"]
        div = pc.get("size_divisibility", div)
        if div > 1:
            h, w = -(-h // div) * div, -(-w // div) * div
        return h, w

    def autocast(self):
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @torch.no_grad()
    def backbone_features(self, images: Sequence[torch.Tensor]
                          ) -> tuple[ImageList, dict[str, torch.Tensor]]:
        """Normalise, pad and batch preprocessed images, and run the backbone once.

        Args:
            images: B tensors (3, h_i, w_i), uint8 or float, from :attr:`preprocessing`.

        Returns:
            The padded batch (its ``image_sizes`` are the resized sizes) and the backbone
            features ``{name: (B, C, H', W')}``.
        """
        batched = [{"image": im.to(self.device, non_blocking=True).float()} for im in images]
        image_list = self.model.preprocess_image(batched)
        with self.autocast():
            features = self.model.backbone(image_list.tensor)
        return image_list, features

    @torch.no_grad()
    def detect(self, image_list: ImageList, features: dict[str, torch.Tensor],
               sel: BoxSelection, rule: str = "detectron2") -> list[Detections]:
        """RPN proposals, box-head predictions on them, then :func:`select_boxes` (``rule``
        ``detectron2``) or :func:`select_boxes_vinvl` (``vinvl``).

        With ``detectron2`` the returned boxes are the *regressed* boxes; features for them must
        be pooled again (:func:`~vlkd.extract.pooling.pool_box_features`), not taken from the
        proposals. With ``vinvl`` they are proposals, unregressed.
        """
        with self.autocast():  # proposals are scored with the same pooling stored features use
            proposals, _ = self.model.proposal_generator(image_list, features, None)
            x = pool_box_features(self.roi_heads, features,
                                  [p.proposal_boxes.tensor for p in proposals])
            predictions = self.roi_heads.box_predictor(x)
        predictions = tuple(p.float() for p in predictions)
        probs = self.roi_heads.box_predictor.predict_probs(predictions, proposals)
        if rule == "vinvl":
            return [select_boxes_vinvl(prop.proposal_boxes.tensor, p, tuple(prop.image_size),
                                       sel) for p, prop in zip(probs, proposals)]
        pred_boxes = self.roi_heads.box_predictor.predict_boxes(predictions, proposals)
        return [select_boxes(b, p, tuple(prop.image_size), sel)
                for b, p, prop in zip(pred_boxes, probs, proposals)]
