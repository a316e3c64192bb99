"""The options of the `vlkd-extract` jobs: one dataclass per command, the only place a default is
written.

Each dataclass is the schema of a command's configuration (``vlkd.common.config``): its
defaults, then a job file (``--job-config FILE``), then the command's options, then
``--set key=value``. The click options of ``proposals``, ``teacher-features`` and
``train-detector`` are generated from these fields, and their help text is the field's line in
the ``Attributes:`` section below, so a default or a description exists once.

The options that made a region set are saved beside it as ``config.yaml`` (written once, by
the job that creates the set, under the manifest lock), without the keys of
:data:`PER_JOB_KEYS`, which say how one job ran rather than what the set is; the options that
change the set's content are also in the manifest's ``options`` and compared when a job adds to
an existing set.

This module imports neither torch nor detectron2, so ``--help`` stays fast.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vlkd.data.images import DEFAULT_MAX_PIXELS

BACKENDS = ("hdf5", "zarr")
FEATURE_DTYPES = ("float16", "float32")
PRECISION_NAMES = ("fp32", "fp16", "bf16")
LOG_FORMATS = ("text", "json")
#: Keys that say how one job ran, not what the set holds: they may differ between the array
#: jobs that write one set and are left out of the set's ``config.yaml``.
PER_JOB_KEYS = ("shard_index", "batch_size", "num_workers", "device", "trust_pickle",
                "log_format", "progress")
#: The file beside a region set that records the options it was made with.
SET_CONFIG_FILE = "config.yaml"


@dataclass
class BoxSelection:
    """Which detections become an image's regions (``proposals``).

    Attributes:
        score_thresh: Keep (box, class) pairs scoring above this.
        nms_thresh: Per-class NMS IoU threshold.
        min_boxes: Top up to this many boxes with the best lower-scoring pairs that survive the
            same NMS (as VinVL lowers its threshold to reach a minimum).
        max_boxes: Keep at most this many boxes, best first.
        topup_pool: How many of the best sub-threshold pairs enter the top-up NMS at first
            (grown if NMS leaves too few).
    """

    score_thresh: float = 0.2
    nms_thresh: float = 0.5
    min_boxes: int = 10
    max_boxes: int = 100
    topup_pool: int = 1000

    def __post_init__(self):
        if not 0 <= self.min_boxes <= self.max_boxes:
            raise ValueError(f"need 0 <= --min-boxes <= --max-boxes, got min {self.min_boxes}"
                             f", max {self.max_boxes}")
        if not 0 < self.nms_thresh <= 1:
            raise ValueError(f"--nms-thresh must be in (0, 1], got {self.nms_thresh}")


#: The rules ``--box-selection`` names (:attr:`ProposalsConfig.box_selection`).
BOX_SELECTION_RULES = ("detectron2", "vinvl")


@dataclass
class AttributeOptions:
    """Per-box attributes from the detector's attribute head (``proposals``, ``teacher-features``).

    The rule is scene_graph_benchmark's ``AttributePostProcessor`` for the box's object class
    (``vlkd.extract.attributes``); the defaults are SGB's values for VinVL
    (``sgg_configs/vgattr/vinvl_x152c4.yaml``, ``scene_graph_benchmark/config/sg_defaults.py``).

    Attributes:
        enabled: Store each box's attributes as the optional arrays attr_ids / attr_scores
            (needs a detector with an attribute head, e.g. a converted VinVL).
        top_k: Attribute slots per box, best first (SGB's MAX_NUM_ATTR_PER_OBJ).
        score_thresh: Keep attributes scoring above this (SGB's
            POSTPROCESS_ATTRIBUTES_THRESHOLD); empty slots are -1 with score 0.
        max_per_image: SGB's MAX_NUM_ATTR_PER_IMG cap, applied as SGB's code does (0: none).
    """

    enabled: bool = False
    top_k: int = 16
    score_thresh: float = 0.05
    max_per_image: int = 100

    def __post_init__(self):
        if self.top_k < 1:
            raise ValueError(f"--attr-top-k must be >= 1, got {self.top_k}")
        if not 0 <= self.score_thresh < 1:
            raise ValueError(f"--attr-thresh must be in [0, 1), got {self.score_thresh}")
        if self.max_per_image < 0:
            raise ValueError(f"--attr-max-per-image must be >= 0, got {self.max_per_image}")


@dataclass(kw_only=True)
class JobOptions:
    """Options every extraction job shares (``proposals``, ``teacher-features``).

    Attributes:
        images: Image folder, list file (path[<TAB>id]), COCO JSON or Karpathy dataset_coco.json.
        image_root: Folder that relative paths in JSON/list sources are relative to.
        config: detectron2 YAML config (_BASE_ may be 'model_zoo:<name>').
        weights: Weights file: .pth/.pt/.safetensors (.pkl/.pyth only with --trust-pickle).
        out: Region-set directory (created; an existing set made with the same settings is
            resumed).
        shard_index: Shard to write, or 'all'; none: from SLURM_ARRAY_TASK_ID,
            JOB_COMPLETION_INDEX or AWS_BATCH_JOB_ARRAY_INDEX.
        batch_size: Images per forward pass (only images of the same padded size share one).
        num_workers: Decoding processes.
        device: cpu, cuda or cuda:N.
        precision: Autocast of the network: fp32, fp16 or bf16 (box arithmetic stays fp32).
        feature_dtype: Stored feature dtype: float16 or float32.
        max_pixels: Refuse images larger than this many pixels (decompression bombs).
        trust_pickle: Allow pickle weights (.pkl/.pyth): unpickling runs code from the file.
        log_format: Progress bar and messages (text), or JSON lines for cluster logs (json), on
            stderr.
        progress: Show a progress bar / progress lines (--no-progress: none).
        opts: detectron2 config overrides, KEY VALUE pairs in one list.
        window: Images per commit, which is also the window within which same-size images are
            batched (0: max(32, 8 x batch size)); a killed job resumes from the last commit.
        attributes: Per-box attributes (:class:`AttributeOptions`).
    """

    images: str
    config: str
    weights: str
    out: str
    image_root: str | None = None
    shard_index: str | None = None
    batch_size: int = 4
    num_workers: int = 2
    device: str = "cpu"
    precision: str = "fp32"
    feature_dtype: str = "float16"
    max_pixels: int = DEFAULT_MAX_PIXELS
    trust_pickle: bool = False
    log_format: str = "text"
    progress: bool = True
    opts: list[str] = field(default_factory=list)
    window: int = 0
    attributes: AttributeOptions = field(default_factory=AttributeOptions)

    def window_size(self) -> int:
        return self.window or max(32, 8 * self.batch_size)


@dataclass(kw_only=True)
class ProposalsConfig(JobOptions):
    """Options of ``vlkd-extract proposals``. Besides :class:`JobOptions`:

    Attributes:
        num_shards: Shards of the set.
        backend: Shard format: hdf5 or zarr.
        selection: Which detections become regions (:class:`BoxSelection`).
        box_selection: The rule applying it: detectron2 (class-specific regressed boxes,
            fast_rcnn_inference, top-up) or vinvl (VinVL's released features, SGB's
            NMS_FILTER 1 with TEST.IGNORE_BOX_REGRESSION: one region per proposal, its
            unregressed box, per-class NMS at SGB's fixed IoU 0.3, the best class; --nms-thresh
            and the top-up pool do not apply).
        max_failures: Exit non-zero (3) when more images fail to decode: a count (5), a
            fraction (0.01) or a percentage (1%).
    """

    num_shards: int = 1
    backend: str = "hdf5"
    selection: BoxSelection = field(default_factory=BoxSelection)
    box_selection: str = "detectron2"
    max_failures: str = "1%"

    def __post_init__(self):
        if self.box_selection not in BOX_SELECTION_RULES:
            raise ValueError(f"--box-selection {self.box_selection!r}: expected one of "
                             f"{', '.join(BOX_SELECTION_RULES)}")
        if self.box_selection == "vinvl" and self.selection.nms_thresh != \
                BoxSelection.nms_thresh:
            raise ValueError(f"--nms-thresh {self.selection.nms_thresh} does not apply to "
                             "--box-selection vinvl: SGB's filter_results_peter fixes its "
                             "per-class NMS IoU at 0.3; leave --nms-thresh out")


@dataclass(kw_only=True)
class TeacherConfig(JobOptions):
    """Options of ``vlkd-extract teacher-features``. Besides :class:`JobOptions`:

    Attributes:
        proposals: The proposals set (student boxes) to align with.
        images: Image folder, list file, COCO JSON or Karpathy JSON holding the images
            proposals read; may be another root (images are matched by id).
        config: The teacher's detectron2 YAML config.
        weights: The teacher's weights (.pth/.pt/.safetensors; .pkl/.pyth only with
            --trust-pickle).
        out: Teacher-features set directory (an existing one made from the same proposals and
            teacher is resumed).
        num_shards: Must equal the proposals' shard count (none: the proposals').
        backend: Shard format: hdf5 or zarr (none: the proposals').
        verify_images: Require each image's bytes to have the content hash proposals recorded.
    """

    proposals: str
    num_shards: int | None = None
    backend: str | None = None
    verify_images: bool = False


@dataclass(kw_only=True)
class TrainDetectorOptions:
    """Options of ``vlkd-extract train-detector``.

    Attributes:
        config: detectron2 YAML config (_BASE_ may be 'model_zoo:<name>'), e.g.
            configs/demo/student_detector.yaml.
        train_json: COCO instances JSON of the training images.
        image_root: Folder the training JSON's file_name entries are relative to.
        val_json: COCO instances JSON for box AP (none: no evaluation).
        val_image_root: Folder of the validation images (none: image_root).
        out: Output folder: model_final.pth, config.yaml, class_names.json, metrics.json,
            train_log.jsonl, train-detector.yaml.
        max_iter: Training iterations (none: the config's SOLVER.MAX_ITER).
        device: cpu, cuda or cuda:N.
        num_threads: CPU threads for torch (none: torch's choice). On a small CPU, two
            trainings with one thread each finish sooner than one after the other with two.
        opts: detectron2 config overrides, KEY VALUE pairs (SOLVER.BASE_LR 0.01).
    """

    config: str
    train_json: str
    image_root: str
    out: str
    device: str = "cpu"
    max_iter: int | None = None
    val_json: str | None = None
    val_image_root: str | None = None
    num_threads: int | None = None
    opts: list[str] = field(default_factory=list)


#: Where ``train-detector`` saves the options it ran with (beside the detectron2 config.yaml).
TRAIN_DETECTOR_CONFIG_FILE = "train-detector.yaml"

__all__ = ["BACKENDS", "FEATURE_DTYPES", "PRECISION_NAMES", "LOG_FORMATS", "PER_JOB_KEYS",
           "SET_CONFIG_FILE", "TRAIN_DETECTOR_CONFIG_FILE", "BOX_SELECTION_RULES", "BoxSelection",
           "AttributeOptions", "JobOptions",
           "ProposalsConfig", "TeacherConfig", "TrainDetectorOptions"]


# ------------------------------------------------------------------ import-tsv, export-tsv

#: The TSV layouts ``import-tsv --format`` reads (docs/EXTRACT.md, "Importing TSV features").
TSV_FORMATS = ("vinvl", "butd", "sgb")
#: What ``export-tsv --layout`` writes: Oscar's captioning files, its VQA files, or both.
EXPORT_LAYOUTS = ("captioning", "vqa", "both")


@dataclass(kw_only=True)
class ImportTsvConfig:
    """Options of ``vlkd-extract import-tsv``: Oscar/VinVL, BUTD/LXMERT or scene_graph_benchmark
    TSV feature files into a region set (role ``proposals``).

    Attributes:
        format: vinvl (feature.tsv with label.tsv and hw.tsv), butd (bottom-up-attention or
            LXMERT TSV, told apart by the field count) or sgb (scene_graph_benchmark's
            predictions.tsv with per-box features).
        features: The feature file: feature.tsv (vinvl), the BUTD/LXMERT .tsv (butd) or
            predictions.tsv (sgb). Its .lineidx is used when it agrees with the file.
        labels: label.tsv (vinvl): class, rect, conf and optional attributes per region.
        hw: hw.tsv with each image's height and width (vinvl, sgb).
        out: Region-set directory (created; an existing set made from the same files with the
            same options is resumed).
        labelmap: Class vocabulary: VinVL's VG-SGG-dicts-vgoi6-clipped.json (label_to_idx /
            idx_to_label, attribute_to_idx), a JSON list of names (class_names.json), or a
            text file with one name per line (BUTD's objects_vocab.txt). None: the sorted
            class names of the label rows.
        attribute_names: Attribute vocabulary when --labelmap has none: a JSON list or a
            text file (BUTD's attributes_vocab.txt). None: the labelmap's, else the sorted
            attribute names of the label rows.
        attributes: Keep up to this many attributes per box (best first) as the optional
            arrays attr_ids / attr_scores (0: none).
        feature_dim: Values per region in the file, geometry columns included (e.g. 2054).
            None: told from the first row (needs a known width or geometry columns).
        tsv_dtype: The file's values: auto (told from the byte count), float32 or float16.
        geometry: Geometry columns after the region features: auto, 0, 4 or 6.
        num_shards: Shards of the set.
        shard_index: Shard to write, or 'all'; none: from SLURM_ARRAY_TASK_ID,
            JOB_COMPLETION_INDEX or AWS_BATCH_JOB_ARRAY_INDEX.
        backend: Shard format: hdf5 or zarr.
        feature_dtype: Stored feature dtype: float16 or float32 (float32 keeps a float32
            file's values exactly).
        max_failures: Exit non-zero (3) when more rows fail: a count (5), a fraction (0.01)
            or a percentage (1%).
        num_workers: Processes decoding rows ahead of the writer, for machines with free
            cores (0: rows are decoded in the job's process).
        window: Rows per commit; a killed job resumes from the last commit.
        log_format: Progress bar and messages (text), or JSON lines (json), on stderr.
        progress: Show a progress bar / progress lines (--no-progress: none).
    """

    features: str
    out: str
    format: str = "vinvl"
    labels: str | None = None
    hw: str | None = None
    labelmap: str | None = None
    attribute_names: str | None = None
    attributes: int = 0
    feature_dim: int | None = None
    tsv_dtype: str = "auto"
    geometry: str = "auto"
    num_shards: int = 1
    shard_index: str | None = None
    backend: str = "hdf5"
    feature_dtype: str = "float16"
    max_failures: str = "1%"
    num_workers: int = 0
    window: int = 128
    log_format: str = "text"
    progress: bool = True

    def __post_init__(self):
        if self.format not in TSV_FORMATS:
            raise ValueError(f"--format {self.format!r}: expected one of {', '.join(TSV_FORMATS)}")
        if self.geometry not in ("auto", "0", "4", "6"):
            raise ValueError(f"--geometry {self.geometry!r}: expected auto, 0, 4 or 6")
        if self.format != "vinvl" and self.labels is not None:
            raise ValueError(f"--labels is a file of --format vinvl; --format {self.format} rows "
                             "carry their own boxes and classes")
        if self.format == "butd" and self.hw is not None:
            raise ValueError("--hw does not apply to --format butd: its rows hold the image size")
        if self.attributes < 0 or self.window < 1 or self.num_workers < 0 or \
                self.num_shards < 1:
            raise ValueError(f"need --attributes >= 0, --commit-every >= 1, --num-workers >= 0 "
                             f"and --num-shards >= 1, got {self.attributes}, {self.window}, "
                             f"{self.num_workers}, {self.num_shards}")
        if self.backend not in BACKENDS or self.feature_dtype not in FEATURE_DTYPES:
            raise ValueError(f"--backend {self.backend!r}, --feature-dtype "
                             f"{self.feature_dtype!r}: expected one of {', '.join(BACKENDS)} and "
                             f"one of {', '.join(FEATURE_DTYPES)}")


@dataclass(kw_only=True)
class ExportTsvConfig:
    """Options of ``vlkd-extract export-tsv``: a region set as Oscar/VinVL TSV files.

    Attributes:
        regions: The region set to export.
        out: Output folder.
        split: File name prefix and Oscar's split name: train gives train.feature.tsv,
            train.yaml, train_caption.json, train_img_frcnn_feats.tsv (none: feature.tsv,
            label.tsv, hw.tsv, dataset.yaml; the vqa layout needs a split).
        layout: captioning (feature.tsv, label.tsv, hw.tsv, the yaml run_captioning.py
            reads), vqa (run_vqa.py's {split}_img_frcnn_feats.tsv and offset map) or both.
        feature_dtype: Values written: float32 (what every Oscar reader decodes) or float16
            (half the size; only readers told so decode it).
        geometry: Geometry columns appended to each region's features: 6 (2054-d, VinVL), 4
            or 0.
        captions: COCO captions JSON or Karpathy dataset_coco.json: also write the caption
            files run_captioning.py trains and evaluates with.
        caption_split: Karpathy split of --captions to write (train, val, test; none: all).
    """

    regions: str
    out: str
    split: str | None = None
    layout: str = "captioning"
    feature_dtype: str = "float32"
    geometry: int = 6
    captions: str | None = None
    caption_split: str | None = None

    def __post_init__(self):
        if self.layout not in EXPORT_LAYOUTS:
            raise ValueError(f"--layout {self.layout!r}: expected one of "
                             f"{', '.join(EXPORT_LAYOUTS)}")
        if self.layout != "captioning" and not self.split:
            raise ValueError(f"--layout {self.layout} needs --split: run_vqa.py opens "
                             "{split}_img_frcnn_feats.tsv (train, val, train+val, test2015, "
                             "test-dev2015)")
        if self.geometry not in (0, 4, 6):
            raise ValueError(f"--geometry {self.geometry}: expected 0, 4 or 6")


__all__ += ["TSV_FORMATS", "EXPORT_LAYOUTS", "ImportTsvConfig", "ExportTsvConfig"]
