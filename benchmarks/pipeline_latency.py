"""What deployment costs: per-image latency and parameters of the student pipeline against the
teacher's, end to end: decode -> detector -> VL model -> decoded caption.

Pipelines (random weights; the same images, the same sizes and settings for both):

- student: the TEE-like detector (``configs/detectors/tee-b0.yaml``: EfficientNet-B0 + BiFPN,
  2-fc box head, 512-d region features) + the ``student`` VL preset (12 layers, 384 wide:
  MiniVLM's MiniLM shape);
- teacher: a VinVL-shaped X152-C4 detector (``configs/detectors/x152-c4-vinvl-shape.yaml``:
  ResNeXt-152 32x8d C4, 2048-d features) + the ``teacher`` VL preset (12 layers, 768 wide:
  Oscar/VinVL-base).

Per image, as ``vlkd-extract proposals`` and ``vlkd-train evaluate`` do it, in one process:

1. ``decode``: read and decode the file (``vlkd.data.images.read_image``), the detector's
   preprocessing (``ResizeShortestEdge(600, 1000)``, its channel order);
2. ``detector``: one backbone pass, RPN (300 proposals), box head and box selection, features
   pooled over the final boxes (``Detector.detect`` + ``pool_box_features``);
3. ``VL``: the regions and their object tags as a caption batch (``CaptionTask(train=False)``),
   beam search (``generate_captions``) and the caption text (``tokenizer.decode``).

Beside it, ``VL 1 pass``: one forward of the VL model over the same batch ([CLS], tags,
regions), the cost of a task answered in one pass (VQA, retrieval) rather than decoded token by
token; "total, 1 pass" is decode + detector + that. The beam search decodes incrementally
(``vlkd.train.incremental``): the tags and regions go through the model once, then each step
runs only the newest token and the [MASK] of each beam against cached keys and values.
``--no-cache`` re-runs the whole sequence at every step instead (``generate_captions(...,
cache=False)``, what vlkd did before), about ``max_len`` full passes of ``beam_size``
sequences.

Random weights would make the work differ from a trained model's, so two things are fixed, the
same for both pipelines: the RPN's box deltas are zeroed (proposals are anchors, so the RPN
keeps its full 300 proposals after NMS, as a trained RPN does; a raw random-init RPN collapses
to a handful and its box head would time nothing), and every image keeps exactly
``--regions`` boxes (50: MiniVLM's and a typical VinVL count; ``BoxSelection(min_boxes =
max_boxes)``). Captions are decoded with the same beam settings (Oscar's: beam 5, at most 20
tokens); random models rarely predict [SEP], so both run all 20 steps (the table shows the
tokens generated). The vocabulary has BERT's 30,522 tokens, so the masked-token head costs what
it does in Oscar/VinVL; the tags are the detector's class names (``class_<k>``).

Times are wall-clock (``time.perf_counter``; ``torch.cuda.synchronize`` around each stage on a
GPU), per image, the best of ``--repeats`` passes over the images; the student's and the
teacher's passes alternate, so load on a shared machine hits both alike. The ratio student ÷
teacher is against the teacher measured in the same run. Target: <= 0.10 on CPU (MiniVLM
reports 0.06: 94 % less inference time).

Run: ``python benchmarks/pipeline_latency.py`` (minutes on a small CPU), ``--quick`` (tiny
models and images, seconds), ``--device cuda``.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from extract_throughput import make_images  # JPEGs of blocky noise (benchmarks/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
DETECTORS = ROOT / "configs" / "detectors"
TARGET = 0.10
BERT_VOCAB = 30522
STAGES = ("decode", "detector", "VL", "VL-1")
CAPTION = ("decode", "detector", "VL")      # the captioning pipeline; VL-1 is reported beside


@dataclass
class Setup:
    """One pipeline: a detector config and a VL preset."""

    name: str
    detector: Path
    vl_preset: str
    label: str


FULL = (Setup("student", DETECTORS / "tee-b0.yaml", "student", "TEE-B0 + 12L/384"),
        Setup("teacher", DETECTORS / "x152-c4-vinvl-shape.yaml", "teacher", "X152-C4 + 12L/768"))
QUICK = (Setup("student", DETECTORS / "tiny-tee.yaml", "tiny", "tiny TEE + tiny"),
         Setup("teacher", DETECTORS / "tiny-c4.yaml", "tiny-teacher", "tiny C4 + tiny-teacher"))


@dataclass
class Pipeline:
    setup: Setup
    det: object
    vl: torch.nn.Module
    task: object
    det_params: int
    vl_params: int
    times: dict = field(default_factory=dict)    # stage -> best-pass seconds per image
    proposals: int = 0
    regions: list = field(default_factory=list)
    tokens: list = field(default_factory=list)
    captions: list = field(default_factory=list)


def make_tokenizer(folder: Path, class_names: list[str], size: int):
    """A BERT-sized WordPiece vocabulary: the special tokens, the words of the class names,
    then filler words up to ``size``."""
    from vlkd.train.tokenizer import SPECIAL_TOKENS, load_tokenizer

    words = list(dict.fromkeys(w for n in class_names for w in n.replace("_", " ").split()))
    vocab = SPECIAL_TOKENS + words
    vocab += [f"w{i}" for i in range(size - len(vocab))]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return load_tokenizer(folder)


def build(setup: Setup, device: str, work: Path):
    from detectron2.modeling import build_model

    from vlkd.extract.detector import Detector, load_detector_config
    from vlkd.train.model import VLConfig, VLModel
    from vlkd.train.tasks.base import TextEncoder
    from vlkd.train.tasks.caption import CaptionTask

    cfg = load_detector_config(setup.detector, ["MODEL.DEVICE", device])
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # proposals = anchors: the RPN keeps its full count after NMS
        deltas = model.proposal_generator.rpn_head.anchor_deltas
        deltas.weight.zero_()
        deltas.bias.zero_()
    det = Detector(cfg, model, name=setup.detector.stem, weights_digest="random-init")
    tok = make_tokenizer(work / f"vocab-{setup.name}", det.class_names, BERT_VOCAB)
    vl = VLModel(VLConfig.preset(setup.vl_preset, region_dim=det.feature_dim,
                                 vocab_size=len(tok), heads=("mlm",))).to(device).eval()
    task = CaptionTask(TextEncoder(tok, det.class_names), max_regions=10 ** 6, train=False)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return Pipeline(setup, det, vl, task, count(det.model), count(vl))


class Clock:
    """Wall seconds per stage, synchronising the GPU at each boundary."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.t = {s: 0.0 for s in STAGES}
        self.last = 0.0

    def start(self) -> None:
        self._sync()
        self.last = time.perf_counter()

    def lap(self, stage: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.t[stage] += now - self.last
        self.last = now

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


@torch.no_grad()
def caption_image(p: Pipeline, path: Path, sel, args, clock: Clock) -> tuple[str, int, int]:
    """One image through the pipeline; returns (caption, regions, tokens generated)."""
    from vlkd.common.regionset import ImageRegions
    from vlkd.data.images import read_image
    from vlkd.extract.pooling import boxes_to_original, pool_box_features
    from vlkd.train.decode import generate_captions
    from vlkd.train.stream import Record, Sample
    from vlkd.train.tasks.base import model_inputs, to_device

    det, enc = p.det, p.task.enc
    clock.start()
    rgb = read_image(path).rgb
    x = det.preprocessing(rgb)
    clock.lap("decode")
    image_list, feats = det.backbone_features([x])
    d = det.detect(image_list, feats, sel)[0]
    with det.autocast():
        pooled = pool_box_features(det.roi_heads, feats, [d.boxes])
    resized = tuple(image_list.image_sizes[0])
    boxes = boxes_to_original(d.boxes, rgb.shape[:2], resized)
    classes = d.classes.cpu().numpy().astype(np.int32)
    features = pooled.float().cpu().numpy()
    clock.lap("detector")
    regions = ImageRegions(path.stem, rgb.shape[:2], boxes, d.scores.cpu().numpy(), classes,
                           features, bytes(16), bytes(16))
    item = p.task.transform(Sample(Record(path.stem, path.stem), regions, None, classes, [0]))
    batch = to_device(p.task.collate([item]), args.device)
    seq = generate_captions(p.vl, batch, cls_id=enc.cls_id, sep_id=enc.sep_id,
                            mask_id=enc.mask_id, max_len=args.max_len,
                            beam_size=args.beam_size, max_text_len=enc.max_text_len,
                            cache=not args.no_cache)[0]
    caption = enc.tokenizer.decode(seq, skip_special_tokens=True)
    clock.lap("VL")
    p.vl(model_inputs(batch, p.vl.config.geometry_dim, seq2seq=False), task="none",
         output_hidden_states=False, output_attentions=False)
    clock.lap("VL-1")
    return caption, len(boxes), len(seq)


def run_pass(p: Pipeline, images: list[Path], sel, args) -> dict:
    clock = Clock(args.device)
    out = [caption_image(p, path, sel, args, clock) for path in images]
    p.captions = [o[0] for o in out]
    p.regions = [o[1] for o in out]
    p.tokens = [o[2] for o in out]
    return {s: t / len(images) for s, t in clock.t.items()}


@torch.no_grad()
def count_proposals(p: Pipeline, path: Path) -> int:
    """Proposals the RPN hands the box head for one image (outside the timed passes)."""
    from vlkd.data.images import read_image

    image_list, feats = p.det.backbone_features([p.det.preprocessing(read_image(path).rgb)])
    proposals, _ = p.det.model.proposal_generator(image_list, feats, None)
    return len(proposals[0])


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f} M"


def report(pipes: list[Pipeline], args, images: list[Path], load: tuple) -> str:
    s, t = pipes
    lines = [
        f"pipeline latency: {len(images)} image(s) {args.image_hw[0]}x{args.image_hw[1]} JPEG, "
        f"detector test size {s.det.preprocessing.min_size}/{s.det.preprocessing.max_size}, "
        f"{args.regions} regions/image, beam {args.beam_size}, max {args.max_len} tokens "
        f"({'no cache: every step re-runs the sequence' if args.no_cache else 'key/value cache'}); "
        f"device {args.device}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
        f"random weights; wall ms/image, best of {args.repeats} alternating passes "
        "(the first one cold)",
        f"machine: {platform.machine()} {os.cpu_count()} logical cores; load average "
        f"{load[0][0]:.2f} at start, {load[1][0]:.2f} at end",
        "",
        "| pipeline | params: detector + VL | decode ms | detector ms | VL (caption) ms | "
        "total ms | detector : VL | VL 1 pass ms | total, 1 pass ms | "
        "proposals / regions / tokens |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in pipes:
        tt = {k: v * 1e3 for k, v in p.times.items()}
        total = sum(tt[k] for k in CAPTION)
        lines.append(
            f"| {p.setup.name} ({p.setup.label}) | {fmt_params(p.det_params)} + "
            f"{fmt_params(p.vl_params)} = {fmt_params(p.det_params + p.vl_params)} | "
            f"{tt['decode']:.0f} | {tt['detector']:.0f} | {tt['VL']:.0f} | {total:.0f} | "
            f"{tt['detector'] / total:.0%} : {tt['VL'] / total:.0%} | {tt['VL-1']:.0f} | "
            f"{tt['decode'] + tt['detector'] + tt['VL-1']:.0f} | "
            f"{p.proposals} / {np.mean(p.regions):.0f} / {np.mean(p.tokens):.0f} |")
    r = {k: s.times[k] / t.times[k] for k in STAGES}
    total = sum(s.times[k] for k in CAPTION) / sum(t.times[k] for k in CAPTION)
    one = sum(s.times[k] for k in ("decode", "detector", "VL-1")) / \
        sum(t.times[k] for k in ("decode", "detector", "VL-1"))
    params = (s.det_params + s.vl_params) / (t.det_params + t.vl_params)
    lines.append(
        f"| student ÷ teacher | {s.det_params / t.det_params:.2f} + "
        f"{s.vl_params / t.vl_params:.2f} = {params:.2f} | {r['decode']:.2f} | "
        f"{r['detector']:.2f} | {r['VL']:.2f} | **{total:.3f}** | | {r['VL-1']:.2f} | "
        f"{one:.3f} | |")
    verdict = "ok" if total <= TARGET else "missed"
    lines += ["", f"student ÷ teacher time, captioning: {total:.3f} (target <= {TARGET:.2f} on "
              f"CPU, MiniVLM 0.06): {verdict}; with one VL pass instead of decoding: {one:.3f}"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="tiny detectors and VL models on small images (seconds)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--images", type=int, default=None, help="images per pass (full: 1)")
    ap.add_argument("--repeats", type=int, default=None, help="passes per pipeline (full: 3)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: one per core)")
    ap.add_argument("--regions", type=int, default=50, help="boxes kept per image")
    ap.add_argument("--beam-size", type=int, default=5)
    ap.add_argument("--max-len", type=int, default=20)
    ap.add_argument("--no-cache", action="store_true",
                    help="decode without the key/value cache (every step re-runs the sequence)")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available on this machine")
    setups = QUICK if args.quick else FULL
    args.images = args.images or (2 if args.quick else 1)
    args.repeats = args.repeats or 3
    args.image_hw = (120, 160) if args.quick else (480, 640)   # COCO's most common size
    torch.set_num_threads(args.threads or os.cpu_count() or 1)

    from vlkd.extract.options import BoxSelection

    sel = BoxSelection(score_thresh=0.2, nms_thresh=0.5, min_boxes=args.regions,
                       max_boxes=args.regions)
    with tempfile.TemporaryDirectory(prefix="vlkd-latency-") as tmp:
        work = Path(tmp)
        images = sorted(make_images(work / "images", args.images, hw=args.image_hw).glob("*.jpg"))
        pipes = [build(s, args.device, work) for s in setups]
        load = [os.getloadavg()]
        for _ in range(args.repeats):
            for p in pipes:
                times = run_pass(p, images, sel, args)
                if not p.times or sum(times.values()) < sum(p.times.values()):
                    p.times = times
        load.append(os.getloadavg())
        for p in pipes:
            p.proposals = count_proposals(p, images[0])
    print(report(pipes, args, images, load))
    print(f"\nfirst caption, student: {pipes[0].captions[0][:60]!r}")


if __name__ == "__main__":
    main()
