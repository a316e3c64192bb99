"""Preemption of the extraction jobs: SIGTERM / SIGINT at a random moment stops the job at a
window boundary with everything committed (exit 143 / 130); the re-run with the same arguments
gives exactly the set an uninterrupted run gives, array by array."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from extract_fixtures import (DETECTOR_CONFIGS, assert_same_shards, committed_images,
                              invoke_extract, make_images, tiny_weights)  # noqa: F401
from vlkd.common.validate import validate_region_set

COMMON = ["--commit-every", "2", "--batch-size", "2", "--num-workers", "0", "--no-progress",
          "--shard-index", "all"]


def _proposals_argv(imgs, weights, out):
    return ["proposals", "--images", str(imgs), "--config", str(DETECTOR_CONFIGS["fpn"]),
            "--weights", str(weights), "--out", str(out), "--num-shards", "2", *COMMON]


def _teacher_argv(props, imgs, weights, out):
    return ["teacher-features", "--proposals", str(props), "--images", str(imgs), "--config",
            str(DETECTOR_CONFIGS["c4"]), "--weights", str(weights), "--out", str(out), *COMMON]


def signal_mid_job(argv: list[str], commit_json, sig: int, max_delay: float, seed: int
                   ) -> tuple[int, float, str]:
    """Run ``vlkd-extract ARGV`` in a subprocess, send ``sig`` at a random point after its
    first shard committed images, and measure the time from the signal to the exit.

    Returns:
        (return code, seconds from the signal to the exit, stderr tail).
    """
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "vlkd.extract.cli", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        t0 = time.monotonic()
        while not committed_images(commit_json) and proc.poll() is None \
                and time.monotonic() - t0 < 180:
            time.sleep(0.01)
        time.sleep(random.Random(seed).uniform(0.0, max_delay))
        sent = time.monotonic()
        proc.send_signal(sig)
        proc.wait(timeout=120)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, took, proc.stderr.read().decode()[-3000:]


def _report(what: str, seed: int, rc: int, took: float) -> None:
    # -s shows it; the times are also in the assertion messages
    print(f"\n{what}: seed {seed}, exit {rc}, {took:.2f} s from the signal to the exit")


@pytest.mark.parametrize("sig,seed", [(signal.SIGTERM, 11), (signal.SIGTERM, 23),
                                      (signal.SIGINT, 5)])
def test_signal_then_rerun_gives_the_same_set(tiny_weights, tmp_path, sig, seed):
    imgs = tmp_path / "imgs"
    make_images(imgs, 24)
    ref = tmp_path / "ref"
    invoke_extract(_proposals_argv(imgs, tiny_weights["fpn"], ref))

    out = tmp_path / "stopped"
    commit = out / "shard-00000-of-00002.h5.partial" / "commit.json"
    rc, took, err = signal_mid_job(_proposals_argv(imgs, tiny_weights["fpn"], out), commit, sig,
                                   max_delay=0.5, seed=seed)
    _report(f"proposals {signal.Signals(sig).name}", seed, rc, took)
    # Stopped at a window boundary (or, rarely, already done when the signal came).
    assert rc in (128 + sig, 0), (seed, rc, err)
    if rc:
        assert "stopped by " + signal.Signals(sig).name in err and "run the same command" in err
        assert "Traceback" not in err, err
        # nothing beyond the partial shards and their committed windows; locks released
        assert not list(out.glob("shard-*.lock")), list(out.iterdir())
    assert took < 30, (seed, took)
    invoke_extract(_proposals_argv(imgs, tiny_weights["fpn"], out))  # the re-run resumes
    assert [f for f in validate_region_set(out) if f.level == "error"] == []
    assert_same_shards(ref, out, f"seed={seed}")


def test_teacher_features_sigterm_then_rerun_gives_the_same_set(tiny_weights, tmp_path):
    imgs = tmp_path / "imgs"
    make_images(imgs, 16, seed=2)
    props = tmp_path / "props"
    invoke_extract(_proposals_argv(imgs, tiny_weights["fpn"], props))
    ref = tmp_path / "ref"
    invoke_extract(_teacher_argv(props, imgs, tiny_weights["c4"], ref))

    out = tmp_path / "stopped"
    seed = 7
    commit = out / "shard-00000-of-00002.h5.partial" / "commit.json"
    rc, took, err = signal_mid_job(_teacher_argv(props, imgs, tiny_weights["c4"], out), commit,
                                   signal.SIGTERM, max_delay=0.3, seed=seed)
    _report("teacher-features SIGTERM", seed, rc, took)
    assert rc in (143, 0), (rc, err)
    assert took < 30, took
    invoke_extract(_teacher_argv(props, imgs, tiny_weights["c4"], out))
    assert [f for f in validate_region_set(out, against=str(props)) if f.level == "error"] == []
    assert_same_shards(ref, out)


def test_stop_signals_turn_into_a_request_and_restore_the_handlers():
    from vlkd.common.preemption import StopSignals, Stopped

    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        stop.check("nothing yet")
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == signal.SIGTERM
        with pytest.raises(Stopped, match=r"stopped by SIGTERM at step 3 \(") as e:
            stop.check("at step 3")
        assert e.value.exit_code == 143
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM: still graceful
        assert stop.requested == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C twice: at once
            os.kill(os.getpid(), signal.SIGINT)


# ---------------------------------------------------------------------- cluster templates
def test_slurm_extract_template_forwards_sigterm_and_requeues_the_task(tmp_path):
    """The array-task script asks for SIGTERM before the time limit on the batch shell
    (``B:``), passes it to srun and requeues the task once the job stopped (exit 143): run
    with a fake srun (a job that exits 143 on SIGTERM, like vlkd-extract) and scontrol."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = root / "scripts" / "cluster" / "slurm_extract.sh"
    text = script.read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:TERM@120" in text
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "srun").write_text("#!/usr/bin/env bash\necho \"srun $*\" >> \"$LOG\"\n"
                               "trap 'echo srun-got-TERM >> \"$LOG\"; exit 143' TERM\n"
                               "while true; do sleep 0.05; done\n")
    (bin_ / "scontrol").write_text("#!/usr/bin/env bash\necho \"scontrol $*\" >> \"$LOG\"\n")
    for f in bin_.iterdir():
        f.chmod(0o755)
    log = tmp_path / "log.txt"
    env = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}", LOG=str(log), IMAGES="/i",
               DET_CONFIG="/c", DET_WEIGHTS="/w", OUT="/o", SLURM_ARRAY_TASK_ID="7",
               SLURM_ARRAY_JOB_ID="1234", SLURM_JOB_ID="1241", VLKD_IMAGE="")
    proc = subprocess.Popen(["bash", str(script), "proposals"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    while not (log.exists() and "srun" in log.read_text()) and time.monotonic() - t0 < 20:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=30)[0].decode()
    lines = log.read_text().splitlines()
    assert proc.returncode == 143, out
    assert lines[0].startswith("srun vlkd-extract proposals ") and "--shard-index 7" in lines[0]
    assert lines[1:] == ["srun-got-TERM", "scontrol requeue 1234_7"], (lines, out)


def test_k8s_extract_template_grace_period_and_disruption_retries():
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    job = yaml.safe_load((root / "scripts/cluster/k8s_extract_indexed_job.yaml").read_text())
    spec = job["spec"]
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] >= 30
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    rule = spec["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "Ignore" and rule["onPodConditions"] == [{"type": "DisruptionTarget"}]
