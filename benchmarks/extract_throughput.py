"""Extraction throughput: `vlkd-extract proposals` end to end against the model alone.

For each model, on the same synthetic 480x640 JPEG images (COCO's most common size):

- ``forward``: the network only, on pre-decoded, pre-resized tensors held in memory: backbone,
  RPN, box head, box selection and pooling over the final boxes (``run_window``, the exact
  computation the job does), no reading, no writing;
- ``end-to-end``: ``run_proposals`` on the image files: decoding in a DataLoader worker,
  batched inference, the shard written by the background thread, the shard finalised.

The ratio end-to-end / forward (images/s) says how much of the device time the pipeline wastes;
target >= 0.90 for an R50-C4-sized model at 600/1000 (VinVL's test size). Both are measured
in separate runs (best of the repeats), so on a shared machine load changes between them move
the ratio; ``in-run model share`` is measured inside the end-to-end run itself (seconds in
``run_window`` ÷ its wall time) and is immune to that: 1 - share is the pipeline's own cost. Models are random
init with the RPN's box deltas zeroed, so the RPN proposes its full 1000 (anchor) boxes as a
trained RPN does; a raw random-init RPN collapses to one proposal and would time nothing.

Peak RSS of a whole ``proposals`` process (main + decode worker) for N and 10N images with the
tiny model: memory must not grow with the number of images (target ratio <= 1.1).

teacher-features (extract/teacher.py), same model, same kind of images, same boxes per image
(``--teacher-boxes``): its seconds per image ÷ full detection's (``proposals`` with the
teacher, end to end; target <= 0.70 for R50-C4), and its end-to-end ÷ forward-only images/s
(target >= 0.90). ``--teacher-only`` runs just these rows.

Models (``--models``, default R50-C4): R50-C4, R101-C4 and R50-FPN are detectron2 model-zoo
Faster R-CNNs at 600/1000 (``configs/detectors/{r50-c4,r101-c4,r50-fpn}-600.yaml``), gated by
the targets; tiny-C4 (always run: the reference row, and the detector whose boxes
teacher-features pools over) and tiny-FPN are reported only. ``--sizes 600/1000 800/1333`` runs
every ``--models`` detector at those test sizes instead of its config's. ``--precision``,
``--batch-size`` and ``--workers`` (decode workers) take one value per run; the GPU suite
(``gpu_suite.py``) sweeps them. Issue L's device target, >= 30 img/s end to end for R101-C4
teacher-features in fp16 at 600/1000 on an H100-class card, is checked when that row runs on
such a card. On CUDA the timings are wall clock between ``torch.cuda.synchronize()`` calls and
every row also gets the GPU's mean utilisation during its forward-only and end-to-end runs
(``nvidia-smi`` polled every 100 ms, ``gpu_util.py``). Exit status 1 when a gated target is
missed.

Run: ``python benchmarks/extract_throughput.py`` (R50-C4 on 3 images: ~30 s per image per
mode on a laptop CPU, minutes in all), ``--quick`` (fewer images), ``--device cuda
--precision fp16 --workers 8 --models R101-C4,R50-FPN`` on a GPU node.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "detectors"
TARGET_RATIO = 0.90
TARGET_RSS = 1.10

# name: (config under configs/detectors, whether the targets gate its rows). The tiny models'
# rows are dominated by the job's fixed cost on a few images: reported, not gated.
MODELS = {
    "R50-C4": ("r50-c4-600.yaml", True),
    "R101-C4": ("r101-c4-600.yaml", True),
    "R50-FPN": ("r50-fpn-600.yaml", True),
    "tiny-C4": ("tiny-c4.yaml", False),
    "tiny-FPN": ("tiny-fpn.yaml", False),
}
REFERENCE = "tiny-C4"  # always run; its boxes are what teacher-features pools over


def model_config(name: str, size: tuple[int, int] | None, work: Path) -> Path:
    """The config of model ``name``; at test size ``size`` (min, max), a config in ``work``
    whose ``_BASE_`` is the model's, so the job sees an ordinary detectron2 file."""
    config = CONFIGS / MODELS[name][0]
    if size is None:
        return config
    derived = work / f"{config.stem}-{size[0]}x{size[1]}.yaml"
    derived.write_text(f'_BASE_: "{config}"\nINPUT:\n  MIN_SIZE_TEST: {size[0]}\n'
                       f"  MAX_SIZE_TEST: {size[1]}\n")
    return derived


def _timed(fn, sync, spans: list | None = None):
    """(wall seconds of ``fn()`` between device synchronisations, its result); appends the
    run's (start, end) unix times to ``spans`` (for the GPU utilisation of the phase)."""
    sync()
    t0, w0 = time.perf_counter(), time.time()
    out = fn()
    sync()
    if spans is not None:
        spans.append((w0, time.time()))
    return time.perf_counter() - t0, out


def _util(args, *phases: list) -> str | None:
    """Mean GPU utilisation % of each phase's spans, ``"fwd / e2e"``; None without a sampler."""
    if args.sampler is None:
        return None
    means = [args.sampler.over(spans).get("util_mean") for spans in phases]
    return " / ".join("-" if m is None else f"{m:.0f}" for m in means)


def make_images(folder: Path, n: int, seed: int = 0, hw=(480, 640)) -> Path:
    """``n`` JPEGs of blocky noise (decoding costs what a photo's does)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rs = np.random.RandomState(seed)
    h, w = hw
    for i in range(n):
        small = rs.randint(0, 256, (h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
        img = np.kron(small, np.ones((16, 16, 1), np.uint8))[:h, :w]
        Image.fromarray(img).save(folder / f"{i:06d}.jpg", quality=90)
    return folder


def make_weights(config: Path, path: Path, device: str) -> Path:
    """Random-init weights with the RPN's anchor deltas zeroed (proposals = anchors)."""
    import torch
    from detectron2.modeling import build_model

    from vlkd.extract.detector import load_detector_config

    cfg = load_detector_config(config, ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        d = model.proposal_generator.rpn_head.anchor_deltas
        d.weight.zero_()
        d.bias.zero_()
    torch.save(model.state_dict(), path)
    return path


def bench_proposals(name: str, config: Path, n: int, repeat: int, work: Path, args) -> dict:
    """Forward-only and end-to-end images/s of one model (``config``) on ``n`` images (best of
    ``repeat`` alternating runs: the machine may be shared)."""
    import io

    import torch

    from vlkd.data.images import open_image_source, read_image
    from vlkd.extract.detector import BoxSelection, Detector
    from vlkd.extract.decoding import DecodedItem
    from vlkd.extract.progress import Progress
    from vlkd.extract.proposals import ProposalsConfig, run_proposals, run_window

    tag = config.stem
    images = make_images(work / f"images-{tag}-{n}", n + 1)
    weights = make_weights(config, work / f"{tag}.pth", args.device)
    det = Detector.load(config, weights, device=args.device, precision=args.precision)
    src = open_image_source(images)
    sel = BoxSelection()
    # Pre-decoded inputs; image 0 is the warm-up (allocator, first-call costs), not timed.
    items = []
    for i, r in enumerate(src.records):
        dec = read_image(r.path)
        items.append(DecodedItem(i, 0, r.image_id, det.preprocessing(dec.rgb), dec.hw,
                                 dec.digest))
    run_window(det, items[:1], sel, args.batch_size, "float16")
    sync = torch.cuda.synchronize if det.device.type == "cuda" else (lambda: None)
    # End to end on the same files minus the warm-up image (a list source of images 1..n).
    lst = work / f"list-{tag}-{n}.txt"
    lst.write_text("".join(f"{r.path}\t{r.image_id}\n" for r in src.records[1:]))
    t_fwd, t_e2e, in_run, s_fwd, s_e2e = [], [], [], [], []
    for k in range(repeat):
        t, _ = _timed(lambda: run_window(det, items[1:], sel, args.batch_size, "float16"), sync,
                      s_fwd)
        t_fwd.append(t)
        cfg = ProposalsConfig(images=str(lst), config=str(config), weights=str(weights),
                              out=str(work / f"set-{tag}-{n}-{k}"), shard_index="all",
                              batch_size=args.batch_size, num_workers=args.workers,
                              device=args.device, precision=args.precision, progress=False)
        t, result = _timed(lambda: run_proposals(
            cfg, progress=Progress(enabled=False, stream=io.StringIO()), detector=det), sync,
            s_e2e)
        t_e2e.append(t)
        in_run.append(result.compute_s / t_e2e[-1])
        assert result.num_failures == 0 and result.num_images == n
    fwd, e2e = n / min(t_fwd), n / min(t_e2e)
    return {"model": name, "input": f"{det.preprocessing.min_size}/"
            f"{det.preprocessing.max_size}", "images": n, "forward": fwd, "e2e": e2e,
            "ratio": e2e / fwd, "in_run": in_run[t_e2e.index(min(t_e2e))],
            "gated": MODELS[name][1], "util": _util(args, s_fwd, s_e2e)}


def rss_child(images: Path, out: Path, workers: int) -> None:
    """Run proposals (tiny C4) in this process; print the peak RSS of this process and the
    peak unique memory (USS) of its decode workers.

    Workers are forked: their RSS counts the pages they share with this process, and
    ``getrusage(RUSAGE_CHILDREN)`` is polluted by any subprocess; USS counts what each worker
    owns.
    """
    import io
    import threading

    import psutil
    import torch

    torch.set_num_threads(1)
    from vlkd.extract.progress import Progress
    from vlkd.extract.proposals import ProposalsConfig, run_proposals

    weights = make_weights(CONFIGS / "tiny-c4.yaml", out.with_suffix(".pth"), "cpu")
    cfg = ProposalsConfig(images=str(images), config=str(CONFIGS / "tiny-c4.yaml"),
                          weights=str(weights), out=str(out), shard_index="all",
                          num_workers=workers, progress=False)
    me, peak_workers, done = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            total = 0
            for c in me.children():
                try:
                    total += c.memory_full_info().uss
                except psutil.Error:
                    pass
            peak_workers[0] = max(peak_workers[0], total)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    run_proposals(cfg, progress=Progress(enabled=False, stream=io.StringIO()))
    done.set()
    t.join()
    print(json.dumps({"main_kb": _peak_rss_kb(), "workers_uss_kb": peak_workers[0] // 1024}))


def _peak_rss_kb() -> int:
    """This process's peak RSS. Linux: VmHWM of its own address space; ru_maxrss would also
    count the parent's pages the child shared between fork and exec (GBs when the parent is
    holding an R50)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def bench_rss(n: int, work: Path, args) -> dict:
    make_images(work / "rss-images", 10 * n, seed=1)
    out = {}
    for count in (n, 10 * n):
        folder = work / f"rss-{count}"
        folder.mkdir()
        for p in sorted((work / "rss-images").iterdir())[:count]:
            os.symlink(p, folder / p.name)
        res = subprocess.run([sys.executable, __file__, "--rss-child", str(folder),
                              str(work / f"rss-set-{count}"), "--workers", str(args.workers)],
                             capture_output=True, text=True, check=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
        out[count] = json.loads(res.stdout.strip().splitlines()[-1])
    a, b = out[n], out[10 * n]
    return {"n": n, "main": (a["main_kb"] / 1024, b["main_kb"] / 1024),
            "workers": (a["workers_uss_kb"] / 1024, b["workers_uss_kb"] / 1024)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer images (a few minutes on CPU)")
    ap.add_argument("--models", nargs="+", default=None, metavar="NAME[,NAME]",
                    type=lambda v: v.split(","), help="detectors to time beside the tiny-C4 "
                    f"reference row: {', '.join(MODELS)} (default R50-C4)")
    ap.add_argument("--sizes", nargs="+", default=None, metavar="MIN/MAX",
                    help="test sizes of the --models detectors, e.g. 600/1000 800/1333 "
                    "(default: each config's, 600/1000)")
    ap.add_argument("--n-r50", type=int, default=None, help="images for each --models "
                    "detector (default 3, quick 2)")
    ap.add_argument("--n-tiny", type=int, default=None, help="images for the tiny model "
                    "(default 64, quick 24)")
    ap.add_argument("--rss-n", type=int, default=None, help="N of the RSS check (default 30, "
                    "quick 12)")
    ap.add_argument("--skip-r50", action="store_true", help="no --models detector: only the "
                    "tiny-C4 reference model and RSS")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=1, help="decode workers (end-to-end)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--rss-child", nargs=2, metavar=("IMAGES", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--teacher-only", action="store_true", help="only the teacher-features "
                    "rows")
    ap.add_argument("--skip-teacher", action="store_true", help="no teacher-features rows")
    ap.add_argument("--teacher-boxes", type=int, default=50, help="boxes per image that "
                    "teacher-features pools over (detection keeps exactly this many)")
    ap.add_argument("--teacher-rounds", type=int, default=None, help="alternating rounds of "
                    "teacher-features forward-only / end-to-end, best of each (default 3, "
                    "quick 2)")
    ap.add_argument("--teacher-n", type=int, default=None, help="images for teacher-features "
                    "(default 12, quick 6; at least the detection images)")
    args = ap.parse_args()
    if args.rss_child:
        rss_child(Path(args.rss_child[0]), Path(args.rss_child[1]), args.workers)
        return 0
    args.models = list(dict.fromkeys(m for group in args.models or [["R50-C4"]] for m in group
                                     if m))
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        ap.error(f"--models {','.join(unknown)}: expected names from {', '.join(MODELS)}")
    if args.skip_r50:
        args.models = []
    try:
        args.sizes = ([None] if not args.sizes else
                      [tuple(int(x) for x in v.split("/")) for v in args.sizes])
        assert all(len(sz) == 2 for sz in args.sizes if sz)
    except (ValueError, AssertionError):
        ap.error(f"--sizes {' '.join(args.sizes)}: expected MIN/MAX pairs such as 600/1000")

    import torch

    from vlkd.extract.cli import quiet_library_warnings
    quiet_library_warnings()
    torch.set_num_threads(args.threads)
    args.card = ""
    if args.device.startswith("cuda"):
        dev = torch.device(args.device)
        args.card = (f" ({torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
                     f"CUDA {torch.version.cuda})")
    with _sampler(args):
        return _main(args)


def _sampler(args):
    """GPU utilisation sampling for the whole run when on CUDA (``args.sampler``; else None)."""
    import contextlib

    args.sampler = None
    if not args.device.startswith("cuda"):
        return contextlib.nullcontext()
    from gpu_util import UtilSampler, nvidia_smi_id

    import torch
    sampler = UtilSampler(interval_ms=100, gpu=nvidia_smi_id(torch.device(args.device).index or 0),
                          gpu_only=True)
    args.sampler = sampler if sampler.source else None
    return sampler


def _runs(args, work: Path):
    """(name, config) of every --models detector at every --sizes, then the reference."""
    runs = [(m, model_config(m, sz, work)) for m in args.models if m != REFERENCE
            for sz in args.sizes]
    return runs + [(REFERENCE, CONFIGS / MODELS[REFERENCE][0])]


def _main(args) -> int:
    n_r50 = args.n_r50 or (2 if args.quick else 3)
    n_tiny = args.n_tiny or (24 if args.quick else 64)
    rss_n = args.rss_n or (12 if args.quick else 30)
    if args.teacher_only:
        return teacher_main(args, n_r50, n_tiny)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vlkd-bench-extract-") as tmp:
        work = Path(tmp)
        for name, config in _runs(args, work):
            if name == REFERENCE:
                rows.append(bench_proposals(name, config, n_tiny, 3, work, args))
            else:
                rows.append(bench_proposals(name, config, n_r50, 1 if args.quick else 2, work,
                                            args))
        rss = bench_rss(rss_n, work, args)

    print(f"extract_throughput: proposals, device {args.device}{args.card}, {args.precision}, "
          f"batch {args.batch_size}, {args.workers} decode worker(s), {args.threads} torch "
          f"thread(s)")
    print()
    util = args.sampler is not None
    print("| model | input | images | forward-only img/s | end-to-end img/s | ratio | target "
          "| in-run model share |" + (" GPU util fwd / e2e % |" if util else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if util else ""))
    ok = True
    for r in rows:
        target = f">= {TARGET_RATIO:.2f}" if r["gated"] else "report"
        if r["gated"]:
            ok &= r["ratio"] >= TARGET_RATIO
        print(f"| {r['model']} | {r['input']} | {r['images']} | {r['forward']:.3f} | "
              f"{r['e2e']:.3f} | {r['ratio']:.3f} | {target} | {r['in_run']:.3f} |"
              + (f" {r['util']} |" if util else ""))
    print()
    print("| peak memory, tiny-C4 proposals | N | 10N | 10N / N | target |")
    print("|---|---|---|---|---|")
    print(f"| images | {rss['n']} | {10 * rss['n']} | | |")
    total = tuple(m + w for m, w in zip(rss["main"], rss["workers"]))
    for label, (a, b), target in (("main process RSS, MiB", rss["main"], "part"),
                                  ("decode worker USS, MiB", rss["workers"], "part"),
                                  ("total, MiB", total, f"<= {TARGET_RSS:.2f}")):
        ratio = b / a if a else float("nan")
        print(f"| {label} | {a:.0f} | {b:.0f} | {ratio:.3f} | {target} |")
    ok &= total[1] / total[0] <= TARGET_RSS
    print()
    print("targets met" if ok else "TARGET MISSED")
    if not args.skip_teacher:
        print()
        ok &= teacher_main(args, n_r50, n_tiny) == 0
    return 0 if ok else 1


def teacher_main(args, n_r50: int, n_tiny: int) -> int:
    """The teacher-features rows (the --models detectors, then the tiny reference model);
    1 when a target is missed."""
    args.teacher_rounds = args.teacher_rounds or (2 if args.quick else 3)
    args.teacher_n = args.teacher_n or (6 if args.quick else 12)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vlkd-bench-teacher-") as tmp:
        work = Path(tmp)
        for name, config in _runs(args, work):
            rows.append(bench_teacher(name, config, n_tiny if name == REFERENCE else n_r50,
                                      work, args))
    ok = print_teacher_rows(rows, args)
    print("teacher-features targets met" if ok else "teacher-features TARGET MISSED")
    return 0 if ok else 1


# --------------------------------------------------------------------- teacher-features
# (Visual Token Alignment, extract/teacher.py; this section, teacher_main and the --teacher-*
# options belong to the teacher-features job.) The teacher's features over given boxes cost one
# backbone pass plus the ROI head on those boxes; full detection with the same teacher also
# runs the RPN and the ROI head on every proposal (1000 for R50-C4, where the res5 head
# dominates). Both are timed per image, on the same images, with the same model and the same
# number of final boxes per image (--teacher-boxes). teacher-features runs on more images
# (--teacher-n, the detection images first) because it is an order of magnitude cheaper and
# a 3-image job would mostly time the job's fixed costs (worker start-up, manifest, shard
# finalisation) rather than its steady state; its boxes come from the tiny detector (which
# boxes are pooled over does not change the cost; full R50 detection on all of them would
# take many minutes on a CPU).
TARGET_TEACHER_VS_DETECTION = 0.70   # C4 models: detection runs the res5 head on 1000 boxes
TARGET_TEACHER_E2E = 0.90
# Issue L: R101-C4 teacher-features, fp16, 600/1000, end to end, on an H100-class card.
TARGET_TEACHER_IMG_S = 30.0
H100_CLASS = re.compile(r"\b(H100|H200|H800|GH200)\b")


def bench_teacher(name: str, config: Path, n_det: int, work: Path, args) -> dict:
    """Seconds per image of full detection (``proposals`` with the teacher, ``n_det`` images)
    and of ``teacher-features`` (``max(n_det, --teacher-n)`` images), forward-only and end to
    end."""
    import io

    import torch

    from vlkd.common.regionset import RegionSet
    from vlkd.data.images import open_image_source, read_image
    from vlkd.extract.detector import BoxSelection, Detector
    from vlkd.extract.decoding import DecodedItem
    from vlkd.extract.progress import Progress
    from vlkd.extract.proposals import ProposalsConfig, run_proposals, run_window
    from vlkd.extract.teacher import TeacherConfig, run_teacher_features, teacher_window

    n_tf = max(n_det, args.teacher_n)
    tag = config.stem
    images = make_images(work / f"t-images-{tag}", n_tf + 1, seed=3)
    weights = make_weights(config, work / f"t-{tag}.pth", args.device)
    det = Detector.load(config, weights, device=args.device, precision=args.precision)
    src = open_image_source(images)
    k = args.teacher_boxes
    sel = BoxSelection(min_boxes=k, max_boxes=k)
    items = []  # pre-decoded; image 0 is the warm-up
    for i, r in enumerate(src.records):
        dec = read_image(r.path)
        items.append(DecodedItem(i, 0, r.image_id, det.preprocessing(dec.rgb), dec.hw,
                                 dec.digest))
    sync = torch.cuda.synchronize if det.device.type == "cuda" else (lambda: None)
    spans = {"det_fwd": [], "det_e2e": [], "tf_fwd": [], "tf_e2e": []}

    def timed(fn, phase):
        return _timed(fn, sync, spans[phase])

    def quiet():
        return Progress(enabled=False, stream=io.StringIO())

    def image_list(a: int, b: int) -> str:
        p = work / f"t-list-{tag}-{a}-{b}.txt"
        p.write_text("".join(f"{r.path}\t{r.image_id}\n" for r in src.records[a:b]))
        return str(p)

    # Full detection on images 1..n_det: the baseline.
    run_window(det, items[:1], sel, args.batch_size, "float16")
    det_fwd, _ = timed(lambda: run_window(det, items[1:n_det + 1], sel, args.batch_size,
                                          "float16"), "det_fwd")
    pcfg = ProposalsConfig(images=image_list(1, n_det + 1), config=str(config),
                           weights=str(weights), out=str(work / f"t-det-{tag}"),
                           shard_index="all", batch_size=args.batch_size,
                           num_workers=args.workers, device=args.device,
                           precision=args.precision, selection=sel, progress=False)
    det_e2e, _ = timed(lambda: run_proposals(pcfg, progress=quiet(), detector=det), "det_e2e")

    # The boxes teacher-features pools over: k per image on images 1..n_tf.
    tiny_cfg = CONFIGS / "tiny-c4.yaml"
    tiny_w = make_weights(tiny_cfg, work / "t-boxes.pth", args.device)
    props = work / f"t-props-{tag}"
    run_proposals(ProposalsConfig(images=image_list(1, n_tf + 1), config=str(tiny_cfg),
                                  weights=str(tiny_w), out=str(props), shard_index="all",
                                  num_workers=args.workers, device=args.device,
                                  selection=sel, progress=False), progress=quiet())
    rs = RegionSet(props)
    boxes = [np.asarray(rs.get(it.image_id).boxes) for it in items[1:]]
    assert sum(len(b) for b in boxes) == k * n_tf

    # teacher-features, model only and end to end, in alternating rounds: a shared machine's
    # load moves single wall timings by +-30 %, so the ratio is taken per round (the two runs
    # of a round see about the same load) and its median reported. Main-process CPU time is
    # recorded too: it shows whether the job's own work grows beyond the model's.
    teacher_window(det, items[:1], boxes[:1], args.batch_size, "float16")  # warm-up
    tf_fwd, tf_e2e, cpu_fwd, cpu_e2e = [], [], [], []
    for r in range(args.teacher_rounds):
        c0 = time.process_time()
        t, _ = timed(lambda: teacher_window(det, items[1:], boxes, args.batch_size, "float16"),
                     "tf_fwd")
        cpu_fwd.append(time.process_time() - c0)
        tf_fwd.append(t)
        out = work / f"t-out-{tag}-{r}"  # a new set each round: a full run, not a resume
        tcfg = TeacherConfig(proposals=str(props), images=image_list(1, n_tf + 1),
                             config=str(config), weights=str(weights), out=str(out),
                             shard_index="all", batch_size=args.batch_size,
                             num_workers=args.workers, device=args.device,
                             precision=args.precision, progress=False)
        c0 = time.process_time()
        t, result = timed(lambda: run_teacher_features(tcfg, progress=quiet(), detector=det),
                          "tf_e2e")
        cpu_e2e.append(time.process_time() - c0)
        assert result.num_images == n_tf
        tf_e2e.append(t)
    return {"model": name, "input": f"{det.preprocessing.min_size}/"
            f"{det.preprocessing.max_size}", "n_det": n_det, "n_tf": n_tf, "boxes": k,
            "det_fwd": det_fwd / n_det, "det_e2e": det_e2e / n_det,
            "tf_fwd": min(tf_fwd) / n_tf, "tf_e2e": min(tf_e2e) / n_tf,
            "e2e_ratio": float(np.median([f / e for f, e in zip(tf_fwd, tf_e2e)])),
            "cpu_ratio": float(np.median([f / e for f, e in zip(cpu_fwd, cpu_e2e)])),
            "gated": MODELS[name][1], "kind": det.kind,
            "det_util": _util(args, spans["det_fwd"], spans["det_e2e"]),
            "tf_util": _util(args, spans["tf_fwd"], spans["tf_e2e"])}


def print_teacher_rows(rows: list[dict], args) -> bool:
    """Print the teacher-features tables; returns whether the targets were met."""
    print(f"extract_throughput: teacher-features, device {args.device}{args.card}, "
          f"{args.precision}, "
          f"batch {args.batch_size}, {args.workers} decode worker(s), {args.threads} torch "
          f"thread(s); teacher-features: {args.teacher_rounds} rounds, detection: one run; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print()
    util = args.sampler is not None
    print("| model | input | boxes/img | detection s/img, fwd / e2e (images) | "
          "teacher-features s/img, fwd / e2e (images) | e2e ratio tf ÷ det | target | "
          "fwd ratio |" + (" detection GPU util fwd / e2e % |" if util else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if util else ""))
    ok = True
    for r in rows:
        ratio = r["tf_e2e"] / r["det_e2e"]
        # an FPN's box head is two small fc layers: detection is mostly the backbone there
        gate = r["gated"] and r["kind"] == "C4"
        ok &= (ratio <= TARGET_TEACHER_VS_DETECTION) or not gate
        target = f"<= {TARGET_TEACHER_VS_DETECTION:.2f}" if gate else "report"
        print(f"| {r['model']} | {r['input']} | {r['boxes']} | {r['det_fwd']:.3f} / "
              f"{r['det_e2e']:.3f} ({r['n_det']}) | {r['tf_fwd']:.3f} / {r['tf_e2e']:.3f} "
              f"({r['n_tf']}) | {ratio:.3f} | {target} | {r['tf_fwd'] / r['det_fwd']:.3f} |"
              + (f" {r['det_util']} |" if util else ""))
    print()
    print("| model | teacher-features forward-only img/s (best) | end-to-end img/s (best) | "
          "ratio (median per round) | target | main-process CPU ratio |"
          + (" GPU util fwd / e2e % |" if util else ""))
    print("|---|---|---|---|---|---|" + ("---|" if util else ""))
    for r in rows:
        gate = r["gated"]
        ok &= (r["e2e_ratio"] >= TARGET_TEACHER_E2E) or not gate
        target = f">= {TARGET_TEACHER_E2E:.2f}" if gate else "report"
        print(f"| {r['model']} | {1 / r['tf_fwd']:.3f} | {1 / r['tf_e2e']:.3f} | "
              f"{r['e2e_ratio']:.3f} | {target} | {r['cpu_ratio']:.3f} |"
              + (f" {r['tf_util']} |" if util else ""))
    print()
    for r in rows:
        if (r["model"] == "R101-C4" and r["input"] == "600/1000" and args.precision == "fp16"
                and args.device.startswith("cuda")):
            card = args.card.strip(" ()").split(",")[0]
            got = 1 / r["tf_e2e"]
            if H100_CLASS.search(card):
                verdict = "ok" if got >= TARGET_TEACHER_IMG_S else "MISSED"
                ok &= got >= TARGET_TEACHER_IMG_S
            else:
                verdict = "report (not an H100-class card)"
            print(f"R101-C4 teacher-features, fp16, 600/1000, {card}: {got:.1f} img/s end to "
                  f"end (forward-only {1 / r['tf_fwd']:.1f}); target >= {TARGET_TEACHER_IMG_S:.0f}"
                  f" on an H100-class card: {verdict}")
            print()
    return ok


if __name__ == "__main__":
    sys.exit(main())
