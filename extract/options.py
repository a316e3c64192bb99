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

    def window_size(self) -> int:
        return self.window or max(32, 8 * self.batch_size)


@dataclass(kw_only=True)
class ProposalsConfig(JobOptions):
    """Options of ``vlkd-extract proposals``. Besides :class:`JobOptions`:

    Attributes:
        num_shards: Shards of the set.
        backend: Shard format: hdf5 or zarr.
        selection: Which detections become regions (:class:`BoxSelection`).
        max_failures: Exit non-zero (3) when more images fail to decode: a count (5), a
            fraction (0.01) or a percentage (1%).
    """

    num_shards: int = 1
    backend: str = "hdf5"
    selection: BoxSelection = field(default_factory=BoxSelection)
    max_failures: str = "1%"


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
           "SET_CONFIG_FILE", "TRAIN_DETECTOR_CONFIG_FILE", "BoxSelection", "JobOptions",
           "ProposalsConfig", "TeacherConfig", "TrainDetectorOptions"]
