"""A real 2-process `torchrun` (gloo, CPU) epoch: every sample trained on exactly once."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from train_data import make_world, scenes, write_captions, write_sets

TORCHRUN = Path(sys.executable).with_name("torchrun")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside python")
def test_two_process_epoch_covers_the_dataset_once(tmp_path):
    # 17 samples, batch 4, 2 ranks × 2 workers: rank 0 gets 8 samples (2 batches), rank 1 gets
    # 9 (4 + 5 → 1 + 2 = 3 batches), so rank 0 must pad the epoch's third step.
    sc = scenes(17, seed=4)
    student, _ = write_sets(tmp_path, sc, num_shards=3, teacher=False)
    caps = write_captions(tmp_path / "caps.json", sc, per_image=1)
    tok = make_world(tmp_path / "w", num_images=10, num_val=2)["tok"]
    run = tmp_path / "run"
    cmd = [str(TORCHRUN), "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "vlkd.train.cli", "finetune",
           "--task", "caption", "--regions", str(student), "--model", "tiny",
           "--captions", str(caps), "--tokenizer", str(tok), "-o", str(run), "--epochs", "1",
           "--batch-size", "4", "--set", "data.num_workers=2", "--set", "train.log_samples=true",
           "--set", "train.progress=false", "--set", "data.chunk_size=2",
           "--set", "data.shuffle_buffer=3", "--set", "train.log_every=1",
           "--set", "train.checkpoint_every=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    seen = {}
    steps = {}
    for rank in (0, 1):
        lines = [json.loads(x) for x in (run / "samples" / f"rank{rank}.jsonl").read_text().splitlines()]
        steps[rank] = [x["step"] for x in lines]
        seen[rank] = [k for x in lines for k in x["keys"]]
    assert steps[0] == steps[1] == [1, 2, 3]
    assert (len(seen[0]), len(seen[1])) == (8, 9)
    all_keys = seen[0] + seen[1]
    assert sorted(all_keys) == sorted(f"{im['image_id']}:{k * 10}" for k, im in enumerate(sc))
    # rank 0's third step repeats a batch with zero weight: it trains on nothing new
    last0 = json.loads((run / "samples" / "rank0.jsonl").read_text().splitlines()[-1])
    assert last0["keys"] == []
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert sum(r["samples"] for r in rows) == 17
    # every rank wrote its RNG state into the shared checkpoint
    ck = run / "checkpoints" / "step-00000003"
    assert (ck / "rng-rank0.safetensors").is_file() and (ck / "rng-rank1.safetensors").is_file()
    assert (run / "final" / "model.safetensors").is_file()
