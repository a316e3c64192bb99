"""The phase-one job scaffold (vlkd.extract.job) and the one batching rule (vlkd.extract.batching),
without a detector: a job that imports precomputed regions (as `import-tsv` will) plugs into the
same writer / resume / commit-per-window / finalize as proposals and teacher-features."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from extract_fixtures import read_shards
from vlkd.common.config import load
from vlkd.common.manifest import read_manifest
from vlkd.common.regionset import RegionSet
from vlkd.common.validate import validate_region_set
from vlkd.extract.batching import WindowBatcher
from vlkd.extract.decoding import DecodedItem
from vlkd.extract.job import Failure, Shard, ShardJob, image_regions, run_job
from vlkd.extract.options import SET_CONFIG_FILE
from vlkd.extract.progress import Progress


# ------------------------------------------------------------------------------- batching

def _item(k: int, hw: tuple[int, int]) -> DecodedItem:
    return DecodedItem(k, 0, f"img{k}", torch.zeros((3, *hw), dtype=torch.uint8), hw,
                       b"\0" * 16)


def test_window_batcher_batches_by_padded_size_in_arrival_order():
    sizes = [(8, 8), (8, 16), (8, 8), (7, 8), (8, 16), (8, 8), (8, 8), (8, 16), (8, 8)]
    runs = []

    def run(items, payloads):
        runs.append([it.position for it in items])
        return [(it.position, p) for it, p in zip(items, payloads)]

    # (7, 8) pads to (8, 8) alone: it shares batches with the (8, 8) images.
    batcher = WindowBatcher(run, lambda h, w: (-(-h // 4) * 4, -(-w // 4) * 4), batch_size=2)
    for k, hw in enumerate(sizes[:6]):
        batcher.add(_item(k, hw), payload=f"p{k}")
    assert runs == [[0, 2], [1, 4], [3, 5]]  # full batches run as soon as they fill
    for k, hw in enumerate(sizes[6:], start=6):
        batcher.add(_item(k, hw), payload=f"p{k}")
    out = batcher.finish()
    # the remainders, by size in order of first appearance
    assert runs == [[0, 2], [1, 4], [3, 5], [6, 8], [7]]
    assert out == [(k, f"p{k}") for k in range(9)]  # results in the order images were added
    # the same rule as the job used to apply to a whole window at once (chunks per size)
    groups: dict = {}
    for k, (h, w) in enumerate(sizes):
        groups.setdefault((-(-h // 4) * 4, -(-w // 4) * 4), []).append(k)
    chunks = [g[i:i + 2] for g in groups.values() for i in range(0, len(g), 2)]
    assert sorted(chunks) == sorted(runs)
    # finish() starts a new window
    batcher.add(_item(9, (8, 8)))
    assert batcher.finish() == [(9, None)] and runs[-1] == [9]


# ------------------------------------------------------------------------- a toy import job

@dataclass(kw_only=True)
class ToyOptions:
    """Options of the toy import job.

    Attributes:
        out: the set.
        num_shards: shards of the set.
        window: rows per commit window.
        tag: a content-changing option, compared on resume.
        shard_index: per-job (not saved).
    """

    out: str
    num_shards: int = 2
    window: int = 3
    tag: str = "a"
    shard_index: str | None = None


class Stop(RuntimeError):
    pass


def _rows(n: int) -> dict[str, dict | None]:
    """Precomputed regions per image id, as a TSV reader would give them (None: a bad row)."""
    rs = np.random.RandomState(0)
    rows = {}
    for i in range(n):
        k = i % 3
        if i == 4:
            rows[f"r{i:02d}"] = None
            continue
        boxes = np.sort(rs.uniform(0, 50, (k, 4)).astype(np.float32).reshape(k, 2, 2),
                        axis=1).reshape(k, 4)
        rows[f"r{i:02d}"] = dict(boxes=boxes, feats=rs.randn(k, 6).astype(np.float32))
    return rows


class ToyImportJob(ShardJob):
    name = role = "proposals"
    mismatch_error = ValueError

    def __init__(self, options: ToyOptions, rows: dict, stop_at_window: int | None = None):
        self.options, self.rows = options, rows
        self.out = Path(options.out)
        self.num_shards, self.backend, self.window = options.num_shards, "hdf5", options.window
        self.feature_dim, self.feature_dtype = 6, "float32"
        self.stop_at_window = stop_at_window
        ids = sorted(rows)
        per = -(-len(ids) // self.num_shards)
        self.shards = [ids[i * per:(i + 1) * per] for i in range(self.num_shards)]

    def header(self) -> dict:
        return {"schema_version": 1, "role": self.role, "detector": {"name": "toy-tsv"},
                "feature_dim": 6, "feature_dtype": "float32", "backend": "hdf5",
                "num_shards": self.num_shards, "options": {"tag": self.options.tag}}

    def compare(self, existing: dict, header: dict) -> None:
        if existing["options"] != header["options"]:
            raise ValueError(f"made with another tag {existing['options']}")

    def start_event(self, indices):
        return f"toy: {indices}", {"shards": indices}

    def shard(self, index: int) -> Shard:
        return ToyShard(self, index, self.shards[index])


@dataclass
class Row:
    image_id: str
    group: int


class ToyShard(Shard):
    job: ToyImportJob

    def items(self, todo, groups):
        for p, g in zip(todo, groups):
            yield [Row(self.image_ids[p], g)]

    def add(self, item):
        self.__dict__.setdefault("_window", []).append(item)

    def end_window(self):
        window, self._window = self._window, []
        if self.job.stop_at_window is not None and window[0].group >= self.job.stop_at_window:
            raise Stop("killed")
        out = []
        for it in window:
            row = self.job.rows[it.image_id]
            if row is None:
                out.append(Failure(it.image_id, "corrupt: bad TSV row"))
                continue
            n = len(row["boxes"])
            out.append(image_regions(it.image_id, (60, 80), row["boxes"], np.ones(n, "f4"),
                                     np.zeros(n, "i4"), row["feats"], b"\1" * 16))
        return out


def _run(job, indices=(0, 1)):
    stream = io.StringIO()
    runs = run_job(job, list(indices), Progress("json", stream=stream))
    return runs, [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_job_without_images_runs_on_the_scaffold_and_resumes(tmp_path):
    rows = _rows(11)
    ref = tmp_path / "ref"
    runs, events = _run(ToyImportJob(ToyOptions(out=str(ref)), rows))
    assert [e["event"] for e in events] == ["start", "shard_done", "shard_done"]
    assert [e for e in validate_region_set(ref) if e.level == "error"] == []
    rs = RegionSet(ref)
    assert len(rs) == 10 and rs.get("r07").features.tolist() == rows["r07"]["feats"].tolist()
    m = read_manifest(ref)
    assert [f["image_id"] for f in m["failures"]] == ["r04"]
    assert runs[0].info["num_images"] == 5 and len(runs[0].info["failures"]) == 1
    # The options that made the set are beside it, without the per-job keys.
    saved = (ref / SET_CONFIG_FILE).read_text()
    assert "shard_index" not in saved
    assert load(ToyOptions, ref / SET_CONFIG_FILE) == ToyOptions(out=str(ref))

    # Killed in shard 1's second window: its first window is committed, a re-run resumes.
    out = tmp_path / "killed"
    with pytest.raises(Stop):
        _run(ToyImportJob(ToyOptions(out=str(out)), rows, stop_at_window=1), indices=[1])
    _, events = _run(ToyImportJob(ToyOptions(out=str(out)), rows))
    resumed = [e for e in events if e["event"] == "resume"]
    assert [(e["shard"], e["committed"]) for e in resumed] == [(1, 3)]
    a, b = read_shards(ref), read_shards(out)
    assert sorted(a) == sorted(b)
    for name in a:
        for key, value in a[name].items():
            np.testing.assert_array_equal(value, b[name][key], err_msg=f"{name}/{key}")
    assert read_manifest(ref)["shards"] == read_manifest(out)["shards"]
    # Complete shards are re-recorded, not rewritten; another content option is refused.
    _, events = _run(ToyImportJob(ToyOptions(out=str(out)), rows))
    assert [e.get("resumed") for e in events if e["event"] == "shard_done"] == [True, True]
    with pytest.raises(ValueError, match="another tag"):
        _run(ToyImportJob(ToyOptions(out=str(out), tag="b"), rows))
