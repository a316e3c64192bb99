"""Training-loader throughput and memory: the streaming region-set dataset vs the formats
VL training code usually reads.

Each loader yields the same thing -- batches of ``--batch`` images, each image's first
``--max-regions`` fp16 feature rows and boxes padded into ``(B, R, D)`` / ``(B, R, 4)`` tensors
(features stay fp16; :mod:`vlkd.train.tasks` does the same) -- over one pass of the data:

* ``stream (0 workers)`` / ``stream (2 workers)`` (``--workers``, default 0 2; e.g. ``--workers
  0 4 8`` on a GPU node): :class:`vlkd.train.stream.RegionStream` over a 4-shard HDF5 region
  set, shards and chunks shuffled, a 1024-sample shuffle buffer, per-sample generators, batches
  collated in the (worker) process.
* ``memmap``: one ``.npy`` of all fp16 feature rows read through ``np.load(mmap_mode="r")`` plus
  in-memory offsets and boxes, images in a shuffled order: the floor for reading those bytes.
* ``tsv``: Oscar/VinVL style, one line per image ``id \\t {"num_boxes", "boxes",
  "features": base64(fp32)}`` with a ``.lineidx`` of byte offsets; seek, readline, JSON,
  base64, fp32→fp16 per image, shuffled order.
* ``npz``: one uncompressed ``.npz`` per image (fp16 features + boxes), shuffled order.

Files are read once before timing, so all of them are in the page cache (a training job
re-reading its set) and the numbers compare decoding and copying, not the disk.

Peak RSS: a fresh process iterates a full epoch of a set of N and of 10N images (with the
fewest and the most ``--workers``: 0 and 2 by default), shards of 250 images (a 10× larger set
has 10× the shards); the target is a peak for 10N within 1.1× of N (the stream holds one
shard's small arrays and mapped pages, the images with samples in the buffer and the buffer,
not the dataset). Reported both as the process peak and as the growth over the process's RSS
after imports.

The last line, ``best stream (workers > 0): ...``, names the stream loader with workers that
has the most steady samples/s (a training job loads in workers, beside its GPU step):
``benchmarks/gpu_suite.py`` checks it against the distillation step's samples/s (issue L: the
loader must deliver at least 3x what the step consumes).

    python benchmarks/loader_throughput.py --quick     # ~1 min, 1,000 images × 768-d
    python benchmarks/loader_throughput.py             # ~5 min, 3,000 images × 2048-d
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vlkd.common.manifest import update_manifest
from vlkd.common.regionset import ShardWriter
from vlkd.train.stream import Record, RegionStream, make_loader, pad_regions


# ----------------------------------------------------------------------------------- data
def make_images(n: int, dim: int, seed: int, max_boxes: int = 50):
    """n images with 10..max_boxes boxes, fp16 features (post-ReLU-like)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        r = int(rng.integers(10, max_boxes + 1))
        xy = rng.uniform(0, 400, (r, 2)).astype(np.float32)
        boxes = np.concatenate([xy, xy + rng.uniform(10, 200, (r, 2)).astype(np.float32)], 1)
        feats = np.maximum(rng.standard_normal((r, dim), dtype=np.float32), 0).astype(np.float16)
        yield f"{i:08d}", boxes, rng.integers(0, 1600, r).astype(np.int32), feats


def write_region_set(out: Path, n: int, dim: int, seed: int, shards: int = 4) -> Path:
    bounds = np.linspace(0, n, shards + 1).astype(int)
    images = make_images(n, dim, seed)
    for s in range(shards):
        with ShardWriter(out, s, shards, feature_dim=dim, commit_every=256, durable=False) as w:
            for _ in range(bounds[s], bounds[s + 1]):
                iid, boxes, cls, feats = next(images)
                w.append(iid, (600, 800), boxes, np.ones(len(boxes), np.float32), cls, feats)
            w.finalize()
    update_manifest(out, lambda m: m.update(role="proposals",
                                            class_names=[f"c{i}" for i in range(1600)]))
    return out


def write_baselines(out: Path, n: int, dim: int, seed: int) -> dict:
    """memmap (.npy + offsets), TSV (+ lineidx) and npz-per-image of the same images."""
    out.mkdir(parents=True, exist_ok=True)
    feats_all, boxes_all, offsets, ids = [], [], [0], []
    tsv, lineidx = open(out / "features.tsv", "wb"), []
    (out / "npz").mkdir()
    for iid, boxes, cls, feats in make_images(n, dim, seed):
        ids.append(iid)
        feats_all.append(feats)
        boxes_all.append(boxes)
        offsets.append(offsets[-1] + len(feats))
        lineidx.append(tsv.tell())
        row = {"num_boxes": len(feats), "boxes": boxes.tolist(),
               "features": base64.b64encode(feats.astype(np.float32).tobytes()).decode()}
        tsv.write(f"{iid}\t{json.dumps(row)}\n".encode())
        np.savez(out / "npz" / f"{iid}.npz", features=feats, boxes=boxes)
    tsv.close()
    np.save(out / "features.npy", np.concatenate(feats_all))
    np.save(out / "boxes.npy", np.concatenate(boxes_all))
    np.save(out / "offsets.npy", np.array(offsets, np.int64))
    (out / "features.lineidx").write_text("\n".join(map(str, lineidx)) + "\n")
    return {"dir": out, "ids": ids}


# --------------------------------------------------------------------------------- loaders
def _transform(max_regions):
    def f(sample):
        n = min(sample.regions.num_regions, max_regions)
        return {"features": sample.regions.features[:n], "boxes": sample.regions.boxes[:n]}
    return f


def _collate(items):
    feats, mask = pad_regions([it["features"] for it in items])
    boxes, _ = pad_regions([it["boxes"] for it in items])
    return {"region_features": torch.from_numpy(feats), "region_boxes": torch.from_numpy(boxes),
            "region_mask": torch.from_numpy(mask)}


def stream_loader(set_dir, ids, batch, workers, max_regions):
    records = [Record(i, i) for i in ids]
    s = RegionStream(set_dir, records, transform=_transform(max_regions), collate=_collate,
                     batch_size=batch, num_workers=workers, seed=0, rank=0, world_size=1)
    return make_loader(s)


def _batches(read_one, order, batch, max_regions):
    items = []
    for i in order:
        feats, boxes = read_one(i)
        items.append({"features": feats[:max_regions], "boxes": boxes[:max_regions]})
        if len(items) == batch:
            yield _collate(items)
            items = []
    if items:
        yield _collate(items)


def memmap_loader(base, order, batch, max_regions):
    feats = np.load(base["dir"] / "features.npy", mmap_mode="r")
    boxes = np.load(base["dir"] / "boxes.npy")
    off = np.load(base["dir"] / "offsets.npy")
    view = np.asarray(feats)  # a plain ndarray view of the map (no memmap subclass overhead)
    return _batches(lambda i: (view[off[i]:off[i + 1]].copy(), boxes[off[i]:off[i + 1]]),
                    order, batch, max_regions)


def tsv_loader(base, order, batch, max_regions):
    idx = [int(x) for x in (base["dir"] / "features.lineidx").read_text().split()]
    f = open(base["dir"] / "features.tsv", "rb")

    def read(i):
        f.seek(idx[i])
        _, payload = f.readline().split(b"\t", 1)
        row = json.loads(payload)
        feats = np.frombuffer(base64.b64decode(row["features"]), np.float32)
        return (feats.reshape(row["num_boxes"], -1).astype(np.float16),
                np.array(row["boxes"], np.float32))
    return _batches(read, order, batch, max_regions)


def npz_loader(base, order, batch, max_regions):
    ids = base["ids"]

    def read(i):
        with np.load(base["dir"] / "npz" / f"{ids[i]}.npz") as z:
            return z["features"], z["boxes"]
    return _batches(read, order, batch, max_regions)


def run_epoch(loader) -> tuple[int, float, float]:
    """(samples, seconds for the epoch, samples/s after the first batch)."""
    t0 = time.perf_counter()
    n, first, t1 = 0, 0, None
    for b in loader:
        assert b["region_features"].dtype == torch.float16
        n += b["region_features"].shape[0]
        if t1 is None:  # worker start-up and the first reads end here
            t1, first = time.perf_counter(), n
    end = time.perf_counter()
    return n, end - t0, (n - first) / max(end - t1, 1e-9)


# ------------------------------------------------------------------------------------- RSS
_RSS_CHILD = r"""
import json, sys, threading, time
import psutil, torch
torch.set_num_threads(1)
from benchmarks.loader_throughput import stream_loader
from vlkd.common.regionset import RegionSet
set_dir, workers = sys.argv[1], int(sys.argv[2])
me = psutil.Process()
ids = [i for s in RegionSet(set_dir).shards for i in s.image_ids]
# ru_maxrss would carry the parent's peak over fork + exec: poll this process and its workers
peak = {"main": 0, "worker": 0}
done = threading.Event()
def poll():
    while not done.is_set():
        peak["main"] = max(peak["main"], me.memory_info().rss)
        for c in me.children():
            try:
                peak["worker"] = max(peak["worker"], c.memory_info().rss)
            except psutil.Error:
                pass
        time.sleep(0.005)
base = me.memory_info().rss
t = threading.Thread(target=poll, daemon=True)
t.start()
n = 0
for b in stream_loader(set_dir, ids, 32, workers, 50):
    n += b["region_features"].shape[0]
done.set(); t.join()
with open("/proc/self/status") as f:
    hwm = next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) * 1024
mib = 2 ** 20
print(json.dumps({"n": n, "base": base / mib, "peak": max(peak["main"], hwm) / mib,
                  "child_peak": peak["worker"] / mib}))
"""


def measure_rss(set_dir: Path, workers: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(set_dir), str(workers)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (~1 min)")
    ap.add_argument("--images", type=int, help="images for the throughput runs")
    ap.add_argument("--dim", type=int, help="feature width")
    ap.add_argument("--rss-images", type=int, help="N of the RSS runs (10N is the second)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-regions", type=int, default=50)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], metavar="N",
                    help="DataLoader workers of the stream loader, one row each (default 0 2); "
                    "the RSS runs use the fewest and the most")
    ap.add_argument("--out", help="work directory (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    workers_list = sorted(set(args.workers))
    if workers_list[0] < 0:
        ap.error(f"--workers: a DataLoader has 0 or more workers, got {workers_list[0]}")
    rss_workers = sorted({workers_list[0], workers_list[-1]})
    n = args.images or (1000 if args.quick else 3000)
    dim = args.dim or (768 if args.quick else 2048)
    rss_n = args.rss_images or (1000 if args.quick else 3000)
    torch.set_num_threads(1)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="vlkd-loader-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        rset = write_region_set(work / "set", n, dim, seed=0)
        base = write_baselines(work / "base", n, dim, seed=0)
        made = time.perf_counter() - t0
        order = np.random.default_rng(1).permutation(n)
        loaders = {
            f"stream ({w} workers)": (lambda w=w: stream_loader(rset, base["ids"], args.batch,
                                                                w, args.max_regions))
            for w in workers_list}
        loaders.update({
            "memmap": lambda: memmap_loader(base, order, args.batch, args.max_regions),
            "tsv": lambda: tsv_loader(base, order, args.batch, args.max_regions),
            "npz": lambda: npz_loader(base, order, args.batch, args.max_regions),
        })
        for make in loaders.values():  # warm the page cache; every loader must see n images
            assert run_epoch(make())[0] == n
        rates, steady = {}, {}
        for name, make in loaders.items():
            runs = [run_epoch(make()) for _ in range(3)]
            rates[name] = n / min(r[1] for r in runs)
            steady[name] = max(r[2] for r in runs)

        rss = {}
        for k, count in (("N", rss_n), ("10N", 10 * rss_n)):
            # fixed shard size (250 images): a 10× larger set has 10× the shards, as when each
            # array job of the extraction writes one shard
            d = write_region_set(work / f"rss{k}", count, 256, seed=1, shards=count // 250)
            for workers in rss_workers:
                rss[(k, workers)] = measure_rss(d, workers)
            shutil.rmtree(d)
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)

    print(f"# {n} images × 10-50 regions × {dim}-d fp16 in 4 shards, batches of {args.batch} "
          f"padded to {args.max_regions} regions, page cache warm, 1 torch thread, best of 3 "
          f"epochs (data made in {made:.1f}s); {os.cpu_count()} CPUs, torch {torch.__version__}")
    print("# epoch: samples / epoch wall time (worker start-up included); steady: after the "
          "first batch")
    print()
    # the two reference columns: the fewest workers by epoch rate, the most by steady rate
    lo, hi = workers_list[0], workers_list[-1]
    print(f"| loader | epoch samples/s | steady samples/s | stream {lo} w ÷ it (epoch) | "
          f"stream {hi} w ÷ it (steady) |")
    print("|---|---:|---:|---:|---:|")
    s0, s2 = rates[f"stream ({lo} workers)"], steady[f"stream ({hi} workers)"]
    for name in rates:
        print(f"| {name} | {rates[name]:,.0f} | {steady[name]:,.0f} | {s0 / rates[name]:.2f}x | "
              f"{s2 / steady[name]:.2f}x |")
    print()
    print(f"# peak RSS over one epoch, 256-d sets of N = {rss_n} and 10N = {10 * rss_n} images "
          f"in shards of 250 images (MiB; growth = peak − RSS after imports; polled every 5 ms)")
    print()
    print("| workers | process | N peak | 10N peak | ratio | N growth | 10N growth | target |")
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    ok = True
    for workers in rss_workers:
        a, b = rss[("N", workers)], rss[("10N", workers)]
        rows = [("main", a["peak"], b["peak"], a["peak"] - a["base"], b["peak"] - b["base"])]
        if workers:
            rows.append(("worker (max)", a["child_peak"], b["child_peak"], float("nan"),
                         float("nan")))
        for proc, pa, pb, ga, gb in rows:
            ratio = pb / pa
            good = ratio <= 1.1
            ok &= good
            grow = "" if np.isnan(ga) else f"{ga:.0f} | {gb:.0f}"
            grow = grow if grow else "- | -"
            print(f"| {workers} | {proc} | {pa:.0f} | {pb:.0f} | {ratio:.3f} | {grow} | "
                  f"≤ 1.1 {'ok' if good else 'MISSED'} |")
    print()
    print("target: " + ("met" if ok else "MISSED"))
    # A training job loads in workers, beside the GPU step; 0 workers would block the step.
    fed = [w for w in workers_list if w > 0] or workers_list
    best = max(fed, key=lambda w: steady[f"stream ({w} workers)"])
    print(f"best stream{' (workers > 0)' if fed[0] > 0 else ''}: {best} workers, "
          f"{steady[f'stream ({best} workers)']:.0f} steady samples/s, "
          f"{rates[f'stream ({best} workers)']:.0f} epoch samples/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
