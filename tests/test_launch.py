"""`vlkd-extract launch`: a job's shards as local processes give the set one process gives;
shard failures are reported at the end without stopping the other shards."""
from __future__ import annotations

from extract_fixtures import (DETECTOR_CONFIGS, assert_same_shards, invoke_extract, make_images,
                              tiny_weights)  # noqa: F401
from vlkd.common.manifest import read_manifest, update_manifest

COMMON = ["--num-workers", "0", "--no-progress", "--commit-every", "2", "--batch-size", "2"]


def _proposals(imgs, weights, out):
    return ["proposals", "--images", str(imgs), "--config", str(DETECTOR_CONFIGS["fpn"]),
            "--weights", str(weights), "--out", str(out), "--num-shards", "4", *COMMON]


def test_cpu_workers_write_the_set_one_process_writes(tiny_weights, tmp_path):
    imgs = tmp_path / "imgs"
    make_images(imgs, 14)
    ref = tmp_path / "ref"
    invoke_extract([*_proposals(imgs, tiny_weights["fpn"], ref), "--shard-index", "all"])
    out = tmp_path / "launched"
    res = invoke_extract(["launch", "--gpus", "0", "--workers", "2", "--",
                          *_proposals(imgs, tiny_weights["fpn"], out)])
    assert "launch: 4 shard(s) done, 0 failed" in res.output, res.output
    assert_same_shards(ref, out)
    logs = sorted((tmp_path / "launched.logs").glob("shard-*.log"))
    assert [p.name for p in logs] == [f"shard-{i:05d}.log" for i in range(4)]
    assert "--shard-index 2" in logs[2].read_text().splitlines()[0]
    # a second launch finds every shard complete and starts nothing
    res = invoke_extract(["launch", "--workers", "2", "--",
                          *_proposals(imgs, tiny_weights["fpn"], out)])
    assert "4 of 4 shard(s) already complete" in res.output
    assert "launch: 0 shard(s) done, 0 failed" in res.output


def test_a_failing_shard_is_reported_and_the_others_finish(tiny_weights, tmp_path):
    imgs = tmp_path / "imgs"
    make_images(imgs, 12, seed=3)
    props = tmp_path / "props"
    invoke_extract([*_proposals(imgs, tiny_weights["fpn"], props), "--shard-index", "all"])
    # proposals shard 1 unfinished: teacher shard 1 must refuse, 0, 2, 3 go ahead
    entry = [e for e in read_manifest(props)["shards"] if e["index"] == 1][0]
    (props / entry["name"]).unlink()
    update_manifest(props, lambda m: m.update(shards=[e for e in m["shards"]
                                                      if e["index"] != 1]))
    out = tmp_path / "teacher"
    res = invoke_extract(["launch", "--workers", "2", "--", "teacher-features", "--proposals",
                          str(props), "--images", str(imgs), "--config",
                          str(DETECTOR_CONFIGS["c4"]), "--weights", str(tiny_weights["c4"]),
                          "--out", str(out), *COMMON], expect=1)
    assert "launch: 3 shard(s) done, 1 failed" in res.output, res.output
    assert "shard 1: exit 1" in res.output and "re-run: 1" in res.output
    assert "incomplete" in (tmp_path / "teacher.logs" / "shard-00001.log").read_text()
    assert sorted(e["index"] for e in read_manifest(out)["shards"]) == [0, 2, 3]


def test_refusals(tiny_weights, tmp_path):
    argv = _proposals(tmp_path, tiny_weights["fpn"], tmp_path / "o")
    res = invoke_extract(["launch", "--gpus", "2", "--", *argv], expect=1)
    assert "--gpus 2: this machine shows 0 CUDA device(s)" in res.output
    assert "--gpus 0 --workers N" in res.output
    res = invoke_extract(["launch", "--", *argv, "--shard-index", "1"], expect=2)
    assert "leave --shard-index out" in res.output
    res = invoke_extract(["launch", "--", "proposals", "--out", str(tmp_path / "o")], expect=2)
    assert "Missing option" in res.output
