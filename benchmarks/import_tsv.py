"""import-tsv throughput against reading the same TSV rows alone, measured in the same run.

Synthetic VinVL files (``feature.tsv`` json rows of N x (2048 + 6) float32 with their
``label.tsv``, ``hw.tsv`` and ``.lineidx``, written by ``vlkd.data.tsv.OscarTsvWriter`` in
shuffled key order, so the import reads by key as it does on a real file) are

- read with a bare ``readline`` loop that decodes each row's base64 (``binascii``), no JSON,
  no labels: the floor of getting the features out of the file;
- read with ``vlkd.data.tsv.OscarTsv`` (features, label.tsv and hw.tsv paired by key, JSON
  labels, geometry cross-check): *the same rows read alone*, the baseline; and by key in
  sorted order, the import's access pattern;
- written by the region-set writer alone (``ShardWriter``) from rows decoded beforehand:
  what the import adds to reading;
- imported with ``vlkd-extract import-tsv`` (``run_import_tsv``: image list, vocabulary,
  rows by key through the line index, shard staging, commits, the final HDF5 shard with its
  content digest), cast to float16 (the default) in the job's process and with
  ``--num-workers 2``, and as float32 (the file's dtype, no cast).

Each is run ``--rounds`` times in turn, files warm in the page cache; the best wall time of
each is kept. Target: import-tsv images/s >= 0.8 x the OscarTsv reader's.

Run: ``python benchmarks/import_tsv.py`` (1,000 images, 554 MB of files), ``--quick`` (60
images, seconds). Exit status 1 when an import row misses the target.
"""
from __future__ import annotations

import argparse
import binascii
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vlkd.common.regionset import ShardWriter
from vlkd.data.tsv import OscarTsv, OscarTsvWriter
from vlkd.extract.import_tsv import run_import_tsv
from vlkd.extract.options import ImportTsvConfig
from vlkd.extract.progress import Progress

TARGET = 0.8


def make_files(folder: Path, num_images: int, dim: int, seed: int) -> dict:
    """VinVL-layout files of ``num_images`` images with 10-90 regions each."""
    rng = np.random.default_rng(seed)
    ids = [f"COCO_train2014_{i:012d}" for i in range(num_images)]
    order = rng.permutation(num_images)
    regions = 0
    with OscarTsvWriter(folder, prefix="train.") as w:
        for i in order:
            n = int(rng.integers(10, 91))
            h, wd = int(rng.integers(200, 1000)), int(rng.integers(200, 1000))
            xy = rng.uniform(0, 0.5, (n, 2)) * (wd, h)
            boxes = np.concatenate([xy, xy + 4 + rng.uniform(0, 0.5, (n, 2)) * (wd, h)], 1)
            feats = np.abs(rng.standard_normal((n, dim), dtype=np.float32))
            names = [f"obj{c}" for c in rng.integers(0, 1594, n)]
            w.write(ids[i], (h, wd), boxes.astype(np.float32), feats, names,
                    scores=rng.uniform(0.2, 1, n).astype(np.float32))
            regions += n
    paths = {k: folder / f"train.{k}.tsv" for k in ("feature", "label", "hw")}
    return {"paths": paths, "regions": regions,
            "bytes": sum(p.stat().st_size for p in paths.values())}


def read_plain(paths: dict) -> int:
    """readline + base64 decode of the feature field, nothing else."""
    n = 0
    with open(paths["feature"], "rb", buffering=1 << 20) as f:
        for line in f:
            s = line.index(b'"features": "') + 13
            raw = binascii.a2b_base64(line[s:line.index(b'"', s)])
            n += len(raw) > 0
    return n


def read_reader(paths: dict) -> int:
    """vlkd.data.tsv.OscarTsv over feature.tsv, label.tsv and hw.tsv, in file order."""
    n = 0
    for rec in OscarTsv(paths["feature"], paths["label"], paths["hw"]):
        assert rec.ok and rec.boxes_from == "labels", rec
        n += rec.features.shape[0] > 0
    return n


def read_by_key(paths: dict) -> int:
    """OscarTsv by image id in sorted order (the import's access pattern: the line index is
    loaded and checked, then one pread per feature, label and hw row)."""
    tsv = OscarTsv(paths["feature"], paths["label"], paths["hw"])
    n = 0
    for key in sorted(k for k in tsv.keys() if k):
        rec = tsv.get(key)
        assert rec.ok and rec.boxes_from == "labels", rec
        n += rec.features.shape[0] > 0
    return n


def decoded_rows(paths: dict) -> list:
    """Every image decoded as the import decodes it (float16), held in memory."""
    tsv = OscarTsv(paths["feature"], paths["label"], paths["hw"])
    out = []
    for rec in tsv:
        out.append((rec.image_id, rec.image_hw, np.asarray(rec.boxes), np.asarray(rec.scores),
                    np.zeros(rec.num_regions, np.int32),
                    np.ascontiguousarray(rec.features, np.float16)))
    return sorted(out, key=lambda r: r[0])


def write_alone(rows: list, out: Path) -> int:
    """The region-set writer alone on already decoded rows: staging, a commit per 128
    images, the final HDF5 shard with its content digest (the work import-tsv adds)."""
    if out.exists():
        shutil.rmtree(out)
    with ShardWriter(out, 0, 1, feature_dim=rows[0][5].shape[1], commit_every=128) as w:
        for r in rows:
            w.append(*r)
        w.finalize()
    return len(rows)


def run_import(paths: dict, out: Path, feature_dtype: str, workers: int) -> int:
    if out.exists():
        shutil.rmtree(out)
    cfg = ImportTsvConfig(features=str(paths["feature"]), labels=str(paths["label"]),
                          hw=str(paths["hw"]), out=str(out), shard_index="all",
                          feature_dtype=feature_dtype, num_workers=workers)
    res = run_import_tsv(cfg, Progress("json", enabled=False, stream=io.StringIO()))
    assert res.num_failures == 0
    return res.num_images


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="60 images (seconds)")
    ap.add_argument("--images", type=int, default=None, help="images (default 1000)")
    ap.add_argument("--dim", type=int, default=2048, help="region feature dim (+6 geometry)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 3, quick 2)")
    ap.add_argument("--workdir", default=None, help="where the files go (default: a temp dir)")
    args = ap.parse_args(argv)
    num = args.images or (60 if args.quick else 1000)
    rounds = args.rounds or (2 if args.quick else 3)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vlkd-import-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        data = make_files(work / "tsv", num, args.dim, seed=0)
        made = time.perf_counter() - t0
        paths = data["paths"]
        rows = decoded_rows(paths)
        cases = [("readline + base64 of the features only", lambda: read_plain(paths)),
                 ("OscarTsv iterating: features + label + hw (baseline)",
                  lambda: read_reader(paths)),
                 ("OscarTsv by key in sorted order", lambda: read_by_key(paths)),
                 ("region-set writer alone, float16 (no reading)",
                  lambda: write_alone(rows, work / "written")),
                 *[(f"import-tsv, {dt}, --num-workers {nw}",
                    lambda dt=dt, nw=nw: run_import(paths, work / f"set-{dt}-{nw}", dt, nw))
                   for dt, nw in (("float16", 0), ("float16", 2), ("float32", 0))]]
        best = {name: float("inf") for name, _ in cases}
        for _ in range(rounds):
            for name, fn in cases:
                t = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t)
        rows.clear()   # free the decoded rows before printing
        rate = {name: num / best[name] for name in best}
        base = rate[cases[1][0]]
        print(f"# {num} images, {data['regions']} regions ({data['regions'] / num:.1f}/image), "
              f"{args.dim}+6 float32 per region; files {data['bytes'] / 1e6:.0f} MB (made in "
              f"{made:.1f}s); best of {rounds} rounds, warm page cache; {os.cpu_count()} CPU "
              f"cores, load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after; "
              f"python {sys.version.split()[0]}")
        print(f"{'path':52s} {'img/s':>8s} {'MB/s':>7s} {'ratio':>6s}  target")
        print("-" * 88)
        ok = True
        for name, _ in cases:
            ratio = rate[name] / base
            target = ""
            if name.startswith("import-tsv"):
                passed = ratio >= TARGET
                ok &= passed
                target = f">= {TARGET} {'ok' if passed else 'MISSED'}"
            mbs = data["bytes"] / best[name] / 1e6
            print(f"{name:52s} {rate[name]:8.1f} {mbs:7.0f} {ratio:6.2f}  {target}")
        return 0 if ok else 1
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
