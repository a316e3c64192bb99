"""The container entrypoint runs a tiny extraction outside Docker, with the array index set the
way SLURM, Kubernetes Indexed Jobs and AWS Batch set it: each scheduler's task writes its shard,
and together they equal one `--shard-index all` run."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from extract_fixtures import DETECTOR_CONFIGS, make_images, read_shards, tiny_weights  # noqa: F401
from vlkd.common.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]
ENTRY = ROOT / "scripts" / "docker-entrypoint.sh"


def _entry(args, env_extra, tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX", "AWS_BATCH_JOB_ARRAY_INDEX")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env.update(env_extra)
    return subprocess.run(["bash", str(ENTRY), *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)


def test_entrypoint_array_indices_per_scheduler(tiny_weights, tmp_path):
    make_images(tmp_path / "imgs", 7)
    common = ["proposals", "--images", str(tmp_path / "imgs"), "--config",
              str(DETECTOR_CONFIGS["fpn"]), "--weights", str(tiny_weights["fpn"]),
              "--num-shards", "3", "--num-workers", "0", "--no-progress"]
    out = tmp_path / "sched"
    for var, idx in (("SLURM_ARRAY_TASK_ID", "0"), ("JOB_COMPLETION_INDEX", "1"),
                     ("AWS_BATCH_JOB_ARRAY_INDEX", "2")):
        r = _entry(["extract", *common, "--out", str(out)], {var: idx}, tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        assert (out / f"shard-0000{idx}-of-00003.h5").exists(), (var, sorted(os.listdir(out)))
    r = _entry(["extract", *common, "--out", str(tmp_path / "all"), "--shard-index", "all"], {},
               tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = read_shards(out), read_shards(tmp_path / "all")
    assert sorted(a) == sorted(b) and len(a) == 3
    for name in a:
        for key in a[name]:
            np.testing.assert_array_equal(a[name][key], b[name][key], err_msg=f"{name}/{key}")
    assert [s["digest"] for s in read_manifest(out)["shards"]] == \
        [s["digest"] for s in read_manifest(tmp_path / "all")["shards"]]
    # no index anywhere: a clear refusal, nothing written
    r = _entry(["extract", *common, "--out", str(tmp_path / "none")], {}, tmp_path)
    assert r.returncode != 0 and "--shard-index" in r.stderr
    # status through the entrypoint
    r = _entry(["extract", "status", str(out)], {}, tmp_path)
    assert r.returncode == 0 and "3 complete" in r.stdout


def test_entrypoint_help_and_passthrough(tmp_path):
    r = _entry(["--help"], {}, tmp_path)
    assert r.returncode == 0 and "extract <vlkd-extract args>" in r.stdout
    r = _entry(["train", "--help"], {}, tmp_path)
    assert r.returncode == 0 and "distill" in r.stdout
    r = _entry(["echo", "hello"], {}, tmp_path)
    assert r.stdout.strip() == "hello"
