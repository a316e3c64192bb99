"""Training stops cleanly on SIGTERM / SIGINT (issue N, training side).

- In process, with the signal sent at a chosen micro-batch: the step in progress completes (never
  half-accumulated), a checkpoint of it is written, the command exits 143 / 130, and `--resume
  auto` continues to the uninterrupted run's metrics (to 1e-6), an evaluation due at the
  stopping step included.
- A real `vlkd-train` process with DataLoader workers, signalled as a batch system does (the
  whole process group) at seeded random moments: clean exit, time from the signal to the exit
  measured and bounded, same loss sequence after resuming.
- DDP, two gloo processes: a signal that reaches one rank stops both at the same step.
- The SLURM and Kubernetes training templates ask for the signal, a grace period and requeueing.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from train_data import cli_args, invoke, make_world, metrics, train_teacher

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
VLKD_TRAIN, TORCHRUN = BIN / "vlkd-train", BIN / "torchrun"
# Signal to exit of a tiny CPU run: about 0.05 s to the checkpoint, then the loader's shutdown
# and ~1 s of interpreter teardown on a 2-core machine. The bound leaves room for a loaded CI.
EXIT_BOUND_S = 20.0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    w = make_world(tmp_path_factory.mktemp("preempt"))
    w["teacher_model"] = train_teacher(w, w["root"] / "teacher-run")
    return w


def _distill_args(world, out, *extra, steps=10, workers=0):
    return ["distill", "--task", "caption", "--teacher", world["teacher_model"], "--student",
            "tiny", "--student-regions", world["student"], "--teacher-regions", world["teacher"],
            *cli_args(world, out, "--batch-size", "5", "--set", "optim.grad_accum=2",
                      "--set", "train.log_every=2", "--set", "data.shuffle_buffer=7",
                      "--set", "losses.hidden.params.queue_size=50",
                      "--set", "losses.hidden.params.enqueue_per_step=16", *extra,
                      steps=steps, workers=workers)]


def _lines(run: Path) -> dict[tuple[int, str], dict]:
    """metrics.jsonl by (step, kind) without the timings."""
    out = {}
    for m in metrics(run):
        kind = "eval" if any(k.startswith("eval/") for k in m) else "train"
        assert (m["step"], kind) not in out, f"{run}: step {m['step']} {kind} logged twice"
        out[m["step"], kind] = {k: v for k, v in m.items() if k not in ("time", "steps_per_s")}
    return out


def _assert_same_run(ref: Path, run: Path) -> None:
    a, b = _lines(ref), _lines(run)
    assert sorted(a) == sorted(b)
    for key, want in a.items():
        got = b[key]
        assert sorted(got) == sorted(want), key
        for k, v in want.items():
            if isinstance(v, float):
                assert abs(got[k] - v) <= 1e-6, (key, k, v, got[k])
            else:
                assert got[k] == v, (key, k)
    wa = load_file(str(ref / "final" / "model.safetensors"))
    wb = load_file(str(run / "final" / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def _signal_at(monkeypatch, micro_batch: int, sig: int) -> None:
    """Sends ``sig`` to this process during the ``micro_batch``-th forward (1-based)."""
    from vlkd.train.trainer import Trainer

    original, calls = Trainer._forward_backward, [0]

    def forward_backward(self, batch, scale, sync):
        calls[0] += 1
        if calls[0] == micro_batch:
            os.kill(os.getpid(), sig)
        return original(self, batch, scale, sync)

    monkeypatch.setattr(Trainer, "_forward_backward", forward_backward)


def _invoke_code(args) -> tuple[int, str]:
    from vlkd.train.cli import main

    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


# ----------------------------------------------------------------------- in process, exact steps
def test_signal_mid_accumulation_finishes_the_step_and_resumes_exactly(world, tmp_path,
                                                                       monkeypatch):
    """SIGTERM in the first micro-batch of step 3 (grad_accum 2): step 3 completes, checkpoint
    step 3 (between two metric lines: log_every 2), exit 143. Resumed with --resume auto, SIGINT
    in step 5's second micro-batch: checkpoint 5, exit 130. Resumed again: the same metric lines
    and weights as a run never stopped."""
    invoke(_distill_args(world, tmp_path / "ref"))
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _signal_at(m, 5, signal.SIGTERM)
        code, out = _invoke_code(_distill_args(world, run, "--resume", "auto"))
    assert code == 143, out
    assert "stopped by SIGTERM after step 3 of 10" in out and "--resume auto" in out
    ck = run / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000003"]
    state = json.loads((ck / "step-00000003" / "trainer_state.json").read_text())
    assert state["scheduler"]["last_epoch"] == 3  # three whole optimizer steps
    assert state["interval"]["n"] == 2  # step 3's two micro-batches wait for the line at step 4
    assert [m["step"] for m in metrics(run)] == [2]
    assert not (run / "final").exists()

    with monkeypatch.context() as m:
        _signal_at(m, 4, signal.SIGINT)
        code, out = _invoke_code(_distill_args(world, run, "--resume", "auto"))
    assert code == 130, out
    assert "stopped by SIGINT after step 5 of 10" in out
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000003", "step-00000005"]

    invoke(_distill_args(world, run, "--resume", "auto"))
    _assert_same_run(tmp_path / "ref", run)


def test_resume_auto_without_a_checkpoint_starts_over(world, tmp_path, monkeypatch):
    """A signal before the first step: no checkpoint, exit 143; `--resume auto` then starts at
    step 0 and drops what the earlier attempt logged."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 7, "loss": 1.0}) + "\n")
    with monkeypatch.context() as m:
        from vlkd.train.hooks import MetricsHook

        original = MetricsHook.before_train

        def before_train(self, trainer):  # inside train(): the handlers are in place
            os.kill(os.getpid(), signal.SIGTERM)
            return original(self, trainer)

        m.setattr(MetricsHook, "before_train", before_train)
        code, out = _invoke_code(_distill_args(world, run, "--resume", "auto", steps=4))
    assert code == 143 and "no step was trained" in out, out
    assert not (run / "checkpoints").exists()
    invoke(_distill_args(world, run, "--resume", "auto", steps=4))
    assert [m["step"] for m in metrics(run)] == [2, 4]


def test_evaluation_due_at_the_stopping_step_runs_on_resume(world, tmp_path, monkeypatch):
    """SIGTERM during step 4 with eval_every 4: no evaluation then (it would delay the exit); the
    checkpoint records it as pending and the resumed run evaluates step 4's model first."""
    q, a = world["vqa"]
    eq, ea = world["vqa_val"]

    def args(out, *extra):
        return ["finetune", "--task", "vqa", "--regions", world["student"], "--model", "tiny",
                "--vqa-questions", q, "--vqa-annotations", a, "--eval-vqa-questions", eq,
                "--eval-vqa-annotations", ea, "--set", "data.answer_min_count=1",
                *cli_args(world, out, "--set", "train.eval_every=4", *extra, steps=8)]

    invoke(args(tmp_path / "ref"))
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _signal_at(m, 4, signal.SIGTERM)
        code, out = _invoke_code(args(run, "--resume", "auto"))
    assert code == 143, out
    state = json.loads((run / "checkpoints/step-00000004/trainer_state.json").read_text())
    assert state["pending_eval"] is True
    assert not any("eval/accuracy" in m for m in metrics(run))
    invoke(args(run, "--resume", "auto"))
    _assert_same_run(tmp_path / "ref", run)
    assert ((run / "best" / "best.json").read_text()
            == (tmp_path / "ref" / "best" / "best.json").read_text())


# ------------------------------------------------------------------- a real process, random times
def _last_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    try:
        return max((json.loads(x)["step"] for x in path.read_text().splitlines() if x.strip()),
                   default=0)
    except (OSError, ValueError):  # not there yet, or a line half written
        return 0


def _wait_for_training(run: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until a metric line newer than the earlier attempts' (training is under way: the
    handlers are in place) or the process ended."""
    before, end = _last_step(run), time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if _last_step(run) > before:
            return
        time.sleep(0.01)


def _signal_run(args, run: Path, sig: int | None, delay: float, *, group: bool = True,
                target=None) -> tuple[int, float | None, str]:
    """Starts ``args``, sends ``sig`` ``delay`` s into training, and waits. Returns (exit
    status, seconds from the signal to the exit, stderr)."""
    proc = subprocess.Popen([str(a) for a in args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    sent = None
    try:
        if sig is not None:
            _wait_for_training(run, proc)
            time.sleep(delay)
            if proc.poll() is None:
                sent = time.monotonic()
                if target is not None:
                    os.kill(target(proc), sig)
                elif group:  # as SLURM does: every process of the step, loader workers too
                    os.killpg(proc.pid, sig)
                else:
                    proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, (time.monotonic() - sent) if sent else None, err


def _random_signals(world, tmp_path, seed: int, signals: list[int], steps: int) -> list[float]:
    rng = random.Random(seed)
    ref, run = tmp_path / "ref", tmp_path / "run"
    invoke(_distill_args(world, ref, steps=steps, workers=2))
    args = [VLKD_TRAIN, *_distill_args(world, run, "--resume", "auto", steps=steps, workers=2)]
    times = []
    for sig in signals:
        delay = rng.uniform(0.0, 1.0)
        code, seconds, err = _signal_run(args, run, sig, delay)
        if code == 0:  # finished before the signal came: nothing to stop
            print(f"seed {seed}: {signal.Signals(sig).name} after {delay:.2f} s: run had ended")
            break
        assert code == 128 + sig, err[-3000:]
        stop = re.search(r"stopped by \w+ after step (\d+)", err)
        assert stop, err[-3000:]
        assert "Traceback" not in err and "DataLoader worker" not in err, err[-3000:]
        print(f"seed {seed}: {signal.Signals(sig).name} {delay:.2f} s into training, stopped "
              f"after step {stop.group(1)}, exited {seconds:.2f} s after the signal")
        assert seconds < EXIT_BOUND_S
        times.append(seconds)
    code, _, err = _signal_run(args, run, None, 0.0)
    assert code == 0, err[-3000:]
    _assert_same_run(ref, run)
    return times


@pytest.mark.skipif(not VLKD_TRAIN.exists(), reason="vlkd-train is not installed beside python")
def test_sigterm_at_random_moments_to_a_real_process(world, tmp_path):
    times = _random_signals(world, tmp_path, seed=0, signals=[signal.SIGTERM], steps=40)
    assert times  # the signal landed in training


@pytest.mark.slow
@pytest.mark.skipif(not VLKD_TRAIN.exists(), reason="vlkd-train is not installed beside python")
@pytest.mark.parametrize("seed", [1, 2])
def test_many_signals_at_random_moments_to_a_real_process(world, tmp_path, seed):
    sigs = [signal.SIGTERM, signal.SIGINT, signal.SIGTERM, signal.SIGTERM, signal.SIGINT]
    times = _random_signals(world, tmp_path, seed=seed, signals=sigs, steps=80)
    assert len(times) >= 3


# ------------------------------------------------------------------------------- DDP: two ranks
STOP_AT = {1: (3, signal.SIGTERM)}  # rank: (step, signal it sends itself)


def _agree_worker(rank: int, init_file: str, out_dir: str, plan: dict) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        from vlkd.train.distributed import DistEnv, TrainStopSignals, agree_stop

        env = DistEnv(rank=rank, world_size=2)
        result = {"stopped_at": None, "agreed": 0, "local": None}
        with TrainStopSignals() as stop:
            for step in range(10):
                if plan.get(rank, (None,))[0] == step:
                    os.kill(os.getpid(), plan[rank][1])  # this rank alone gets the signal
                time.sleep(0.01 * (1 - rank))  # ranks reach the boundary at different times
                agreed = agree_stop(stop.requested, env)
                if agreed:
                    result.update(stopped_at=step, agreed=agreed, local=stop.requested)
                    break
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("plan, agreed", [
    ({1: (3, signal.SIGTERM)}, signal.SIGTERM),
    ({0: (2, signal.SIGINT), 1: (2, signal.SIGTERM)}, signal.SIGTERM),  # TERM wins over INT
])
def test_ranks_agree_on_the_stop_step(tmp_path, plan, agreed):
    mp.spawn(_agree_worker, args=(str(tmp_path / "pg"), str(tmp_path), plan), nprocs=2,
             join=True)
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    first = min(step for step, _ in plan.values())
    for r in range(2):
        assert res[r]["stopped_at"] == first and res[r]["agreed"] == agreed, res
        assert res[r]["local"] == (plan[r][1] if r in plan else None), res


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_pid(rank: int):
    """The pid of torchrun's worker of global rank ``rank`` (from /proc)."""
    def find(proc: subprocess.Popen) -> int:
        for _ in range(500):
            for d in Path("/proc").iterdir():
                if not d.name.isdigit():
                    continue
                try:
                    ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    environ = (d / "environ").read_bytes().split(b"\0")
                except (OSError, IndexError, ValueError):
                    continue
                if ppid == proc.pid and f"RANK={rank}".encode() in environ:
                    return int(d.name)
            time.sleep(0.01)
        raise AssertionError(f"no rank {rank} under torchrun {proc.pid}")
    return find


def _torchrun_args(world, run, *extra, steps):
    return [TORCHRUN, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
            str(_free_port()), "-m", "vlkd.train.cli",
            *_distill_args(world, run, "--resume", "auto", "--set", "data.chunk_size=3",
                           "--set", "train.log_samples=true", *extra, steps=steps, workers=1)]


def _check_ddp_stop(run: Path, code: int, err: str) -> int:
    assert code != 0, err[-3000:]
    stops = re.findall(r"\[rank (\d)\].*SIGTERM( on another rank)?: stopping after step (\d+)",
                       err)
    assert stops and stops[0][1] == " on another rank", err[-3000:]  # rank 0 was not signalled
    assert "stopped by SIGTERM after step" in err
    # torchrun reports each rank's status; the first to exit is 143, and torchrun's own SIGTERM
    # to the other, if it comes while that rank is already past its checkpoint, may end it
    codes = [int(c) for c in re.findall(r"exitcode\s*: (-?\d+) \(pid", err)]
    assert 143 in codes and set(codes) <= {143, -15}, codes
    step = int(stops[0][2])
    ck = run / "checkpoints" / f"step-{step:08d}"
    assert (ck / "rng-rank0.safetensors").is_file() and (ck / "rng-rank1.safetensors").is_file()
    # both ranks logged the same steps: they stopped at the same boundary
    s0, s1 = ([json.loads(x)["step"] for x in (run / "samples" / f"rank{r}.jsonl").read_text()
               .splitlines()] for r in range(2))
    assert s0 == s1 == list(range(1, step + 1))
    return step


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside python")
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(world, tmp_path):
    run = tmp_path / "run"
    code, seconds, err = _signal_run(_torchrun_args(world, run, steps=40), run, signal.SIGTERM,
                                     0.3, target=_rank_pid(1))
    step = _check_ddp_stop(run, code, err)
    print(f"torchrun, 2 ranks: SIGTERM to rank 1 only, both stopped after step {step}, "
          f"torchrun exited {seconds:.2f} s after the signal")
    assert seconds < EXIT_BOUND_S


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside python")
def test_ddp_run_stopped_on_one_rank_resumes_exactly(world, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    code, _, err = _signal_run(_torchrun_args(world, ref, steps=24), ref, None, 0.0)
    assert code == 0, err[-3000:]
    code, _, err = _signal_run(_torchrun_args(world, run, steps=24), run, signal.SIGTERM, 0.2,
                               target=_rank_pid(1))
    _check_ddp_stop(run, code, err)
    code, _, err = _signal_run(_torchrun_args(world, run, steps=24), run, None, 0.0)
    assert code == 0, err[-3000:]
    _assert_same_run(ref, run)


# ------------------------------------------------------------------------------ signal plumbing
def test_workers_forked_inside_quiet_children_ignore_stop_signals():
    from vlkd.train.distributed import quiet_children

    with quiet_children():
        pid = os.fork()
        if pid == 0:  # the child: would die at once on SIGTERM with the default action
            time.sleep(0.8)
            os._exit(7)
    try:
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
        time.sleep(0.2)
        assert os.waitpid(pid, os.WNOHANG) == (0, 0)  # still running
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 7
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # parent unmasked


_LATE_SIGNAL = """
import os, signal, sys
from vlkd.train import build, cli
save = build.save_model_dir
def save_and_signal(model, directory, *args, **kw):
    if directory.name == "final":  # after the last step: the trainer's context has ended
        os.kill(os.getpid(), signal.SIGTERM)
    return save(model, directory, *args, **kw)
build.save_model_dir = save_and_signal
sys.argv = ["vlkd-train", *sys.argv[1:]]
cli.run()
"""


@pytest.mark.skipif(not VLKD_TRAIN.exists(), reason="vlkd-train is not installed beside python")
def test_a_signal_after_the_last_step_lets_the_run_end_complete(world, tmp_path):
    """A SIGTERM while vlkd-train writes its final model (after the trainer's loop) neither kills
    it half-way through final/ nor asks for a resume: the model is written, exit status 0.
    From Python (no process of its own) the handlers are put back as they were."""
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", _LATE_SIGNAL,
                        *map(str, _distill_args(world, run, steps=4))],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "SIGTERM came after the last step: the run is complete" in r.stderr
    assert (run / "final" / "model.safetensors").is_file()
    before = signal.getsignal(signal.SIGTERM)
    invoke(_distill_args(world, tmp_path / "in-process", steps=2))
    assert signal.getsignal(signal.SIGTERM) is before


def test_repeated_sigint_under_torchrun_keeps_the_first_request(monkeypatch):
    from vlkd.train.distributed import TrainStopSignals

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    with TrainStopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # the terminal's Ctrl-C
        os.kill(os.getpid(), signal.SIGINT)  # torchrun forwarding it
        time.sleep(0.01)
        assert stop.requested == signal.SIGINT
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    with pytest.raises(KeyboardInterrupt), TrainStopSignals():  # alone: twice = now
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)


# ---------------------------------------------------------------------------------- templates
def test_slurm_training_template_requests_signal_and_requeue():
    text = (ROOT / "scripts/cluster/slurm_torchrun.sh").read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))
    assert "requeue" in directives
    # B: the batch shell gets it (and forwards it); with time to stop before the time limit
    sig = re.fullmatch(r"B:TERM@(\d+)", directives.get("signal", ""))
    assert sig and int(sig.group(1)) >= 60, directives.get("signal")
    assert directives.get("open-mode") == "append"  # a requeued job keeps its log
    assert re.search(r"^trap \w+ TERM$", text, re.M)  # ...which forwards the signal to srun
    assert 'kill -TERM "$SRUN_PID"' in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert re.search(r'vlkd\.train\.cli "\$@" --resume auto &$', text, re.M)
    timeout = int(re.search(r"TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-(\d+)", text).group(1))
    assert timeout < int(sig.group(1))  # torchrun's wait fits before the time limit
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts/cluster/slurm_torchrun.sh")]
                          ).returncode == 0


def test_k8s_training_template_requests_grace_period_and_retries():
    docs = list(yaml.safe_load_all((ROOT / "scripts/cluster/k8s_torchrun_job.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    container = pod["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) < grace
    assert grace >= 60
    script = " ".join(container["args"])
    assert script.lstrip().startswith("exec torchrun")  # torchrun is PID 1: it gets SIGTERM
    assert "--resume auto" in script
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in rules
    assert job["spec"]["backoffLimit"] > 0 and pod["restartPolicy"] == "Never"
