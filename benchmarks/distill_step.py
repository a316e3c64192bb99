"""Distillation step overhead: what the distillation losses cost on top of running both models.

For a (student, teacher) pair on a synthetic captioning batch ([CLS] caption [SEP] tags [SEP]
regions, padding, ~15 % of text positions predicted, fp16 region features):

- baseline = a student-only training step (forward, masked-token loss, backward, AdamW step)
  + a teacher forward under ``torch.no_grad()``;
- distill = one distillation step: teacher no-grad forward, student forward with hidden states
  and attention maps, masked-token CE + attention-distribution MSE (uniform layer map) +
  token-wise hidden-state InfoNCE (queue K = 4096 and full, τ = 0.07, every layer pair),
  backward, AdamW step over the student and the loss projections.

The InfoNCE runs with vlkd's default recipe, 128-d linear projections on both sides
(``proj_dim: 128, teacher_projection: linear``, CRD's embedding size; the defaults of
``vlkd-train distill``), and, reported as an ablation, with P_t the identity (d = teacher hidden
size), which costs d_T / 128 more in its q·queue products.

On the CPU, times are process CPU time by default (``--clock cpu``): on a shared machine other
processes inflate wall time but not the CPU time of this one. On a GPU (``--device cuda``) the
CPU time of the launching process says nothing about the kernels, so the clock is the wall
clock between two ``torch.cuda.synchronize()`` calls (``--clock wall``, the CUDA default).
``--amp bf16|fp16`` runs all three steps as ``vlkd-train`` does (``train.amp``,
:func:`vlkd.train.distributed.amp_dtype`): autocast over the forwards and the losses, a
``GradScaler`` for fp16; like the trainer, AMP runs on CUDA only (ignored on the CPU, and the
header says so). Each number is the minimum over ``--rounds`` rounds that run the three steps in
turn, after warm-up, with one CPU thread. Target: distill ÷ baseline ≤ 1.15. ``samples/s`` is
the distillation step's throughput (batch ÷ distill step time).

Run: ``python benchmarks/distill_step.py --quick`` (batch 2, 40 tokens; about a minute) or
without ``--quick`` (batch 8, 90 tokens). The paper sizes on a GPU (12L/768 teacher, 12L/384
student, batch 64, 40 text + 50 region tokens)::

    python benchmarks/distill_step.py --device cuda --amp bf16 --setups student/teacher \
        --batch 64 --text-len 40 --regions 50
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from vlkd.train.distributed import amp_dtype
from vlkd.train.losses import LossCombiner
from vlkd.train.model import VLConfig, VLModel, box_geometry, padding_mask

TARGET = 1.15

# name: (student preset, teacher preset, hidden_infonce params, gated by the target).
# The default recipe (vlkd.train.config.default_losses) projects both sides to 128-d; the
# identity-P_t variant is reported as an ablation.
DEFAULT_RECIPE = {"proj_dim": 128, "teacher_projection": "linear"}
SETUPS = {
    "tiny": ("tiny", "tiny-teacher", {}, True),           # d_T = 64: no 128-d projection
    "student/teacher": ("student", "teacher", DEFAULT_RECIPE, True),
    "student/teacher identity": ("student", "teacher", {}, False),
}


def make_batch(cfg: VLConfig, bsz: int, num_text: int, num_regions: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    text_len = torch.randint(num_text * 2 // 3, num_text + 1, (bsz,), generator=g)
    region_len = torch.randint(num_regions * 2 // 3, num_regions + 1, (bsz,), generator=g)
    text_mask = torch.arange(num_text)[None] < text_len[:, None]
    region_mask = torch.arange(num_regions)[None] < region_len[:, None]
    predict = (torch.rand(bsz, num_text, generator=g) < 0.15) & text_mask
    predict[:, 1] = True  # at least one prediction per sample
    labels = torch.where(predict, torch.randint(1000, 2000, (bsz, num_text), generator=g), -100)
    xy = torch.rand(bsz, num_regions, 2, generator=g) * 400
    boxes = torch.cat([xy, xy + 10 + torch.rand(bsz, num_regions, 2, generator=g) * 200], -1)
    hw = torch.tensor([[480.0, 640.0]]).expand(bsz, 2)
    return {
        "input_ids": torch.randint(1000, 2000, (bsz, num_text), generator=g),
        "token_type_ids": (torch.arange(num_text)[None] >= num_text // 2).long().expand(bsz, -1),
        "region_features": torch.rand(bsz, num_regions, cfg.region_dim, generator=g).half(),
        "region_geometry": box_geometry(boxes, hw, dim=cfg.geometry_dim),
        "attention_mask": padding_mask(text_mask, region_mask),
        "mlm_labels": labels,
    }


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def _timed(fn, clock, sync) -> float:
    sync()
    t0 = clock()
    fn()
    sync()  # CUDA kernels run asynchronously: wait for the step's last one
    return clock() - t0


def bench_pair(name: str, bsz: int, num_text: int, num_regions: int, rounds: int,
               queue_size: int, clock, device: torch.device = torch.device("cpu"),
               amp: torch.dtype | None = None) -> dict:
    """Best-of-``rounds`` milliseconds of the three steps of setup ``name`` on ``device``;
    ``amp``: the autocast dtype (None: full precision), fp16 with a GradScaler."""
    s_name, t_name, nce_params, _ = SETUPS[name]
    torch.manual_seed(0)
    s_cfg, t_cfg = VLConfig.preset(s_name, heads=("mlm",)), VLConfig.preset(t_name, heads=("mlm",))
    student, teacher = VLModel(s_cfg).train().to(device), VLModel(t_cfg).eval().to(device)
    batch = {k: v.to(device) for k, v in make_batch(s_cfg, bsz, num_text, num_regions).items()}

    task_only = LossCombiner.from_config({"task": {"type": "masked_token_ce",
                                                   "params": {"label_smoothing": 0.1}}})
    distill = LossCombiner.from_config({
        "task": {"type": "masked_token_ce", "params": {"label_smoothing": 0.1}},
        "attention": {"type": "attention_mse", "weight": 1.0},
        "hidden": {"type": "hidden_infonce", "weight": 1.0,
                   "params": {"queue_size": queue_size, "temperature": 0.07, **nce_params}},
    }, s_cfg, t_cfg).train().to(device)
    # Steady state: a full queue, as after the first K tokens of training.
    hidden = distill.terms["hidden"]
    q = hidden.queue
    q.keys.copy_(torch.nn.functional.normalize(torch.randn_like(q.keys), dim=-1))
    q.filled.fill_(q.size)

    opt_student = torch.optim.AdamW(student.parameters(), lr=1e-5)
    opt_distill = torch.optim.AdamW(list(student.parameters()) + list(distill.parameters()),
                                    lr=1e-5)

    base_flags = task_only.output_flags()
    kd_flags = distill.output_flags()
    # As vlkd.train.trainer.Trainer: autocast over the forwards and the loss, a GradScaler for
    # fp16 only (one per optimizer: each keeps its own scale).
    def autocast():
        return (torch.autocast(device.type, dtype=amp) if amp is not None
                else contextlib.nullcontext())
    scaler_student = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    scaler_distill = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)

    def student_step():
        with autocast():
            out = student(batch, task="caption", **base_flags)
            total, _ = task_only(out, None, batch)
        opt_student.zero_grad(set_to_none=True)
        scaler_student.scale(total).backward()
        scaler_student.step(opt_student)
        scaler_student.update()

    def teacher_forward():
        with torch.no_grad(), autocast():
            teacher(batch, task="caption", **base_flags)

    def distill_step():
        with autocast():
            with torch.no_grad():
                t_out = teacher(batch, task="caption", **kd_flags)
            s_out = student(batch, task="caption", **kd_flags)
            total, _ = distill(s_out, t_out, batch)
        opt_distill.zero_grad(set_to_none=True)
        scaler_distill.scale(total).backward()
        scaler_distill.step(opt_distill)
        scaler_distill.update()

    steps = {"student": student_step, "teacher": teacher_forward, "distill": distill_step}
    for fn in steps.values():  # warm-up
        fn()
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # Round-robin so that drift (other processes, thermal) hits the three alike; keep minima.
    best = {k: float("inf") for k in steps}
    for _ in range(rounds):
        for k, fn in steps.items():
            best[k] = min(best[k], _timed(fn, clock, sync) * 1e3)
    s, t, d = best["student"], best["teacher"], best["distill"]
    length = num_text + num_regions
    return {"pair": name, "batch": bsz, "length": length,
            "tokens": int(batch["attention_mask"].sum()), "student_ms": s, "teacher_ms": t,
            "distill_ms": d, "ratio": d / (s + t), "samples_per_s": bsz / (d / 1e3)}


def describe_device(device: torch.device, clock: str, amp: str, amp_used) -> str:
    """The header's device part: card and CUDA version on a GPU, the clock, the AMP mode."""
    if device.type == "cuda":
        where = (f"CUDA {torch.cuda.get_device_name(device)} (torch CUDA {torch.version.cuda}), "
                 f"{clock} time" + (", synchronised" if clock == "wall" else ""))
    else:
        where = f"CPU ({clock} time)"
    if amp == "none":
        mode = "amp none"
    elif amp_used is None:
        mode = f"amp {amp} ignored on {device.type} (as vlkd-train: AMP runs on CUDA only)"
    else:
        mode = f"amp {amp}" + (" + GradScaler" if amp_used == torch.float16 else "")
    return f"{where}, {mode}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="batch 2, 40 tokens (about a minute)")
    ap.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--text-len", type=int, default=None)
    ap.add_argument("--regions", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--queue-size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=list(CLOCKS), default=None,
                    help="cpu: this process's CPU time (the CPU default); wall: wall clock, "
                    "between torch.cuda.synchronize() calls on a GPU (the CUDA default)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (models, batch and "
                    "loss modules on it)")
    ap.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                    help="autocast dtype as vlkd-train's train.amp (fp16 with a GradScaler); "
                    "CUDA only")
    ap.add_argument("--json", metavar="PATH", help="also write the header and rows (ms, "
                    "ratio, samples/s) to this JSON file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    clock = args.clock or ("wall" if device.type == "cuda" else "cpu")
    if device.type == "cuda" and clock == "cpu":
        ap.error("--clock cpu times this process's CPU, not the GPU's kernels: use --clock "
                 "wall (CUDA-synchronised) with --device cuda")
    amp = amp_dtype(args.amp, device)
    torch.set_num_threads(args.threads)
    bsz = args.batch or (2 if args.quick else 8)
    num_text = args.text_len or (20 if args.quick else 40)
    num_regions = args.regions or (20 if args.quick else 50)
    rounds = args.rounds or (5 if args.quick else 7)

    rows = [bench_pair(p, bsz, num_text, num_regions, rounds, args.queue_size, CLOCKS[clock],
                       device, amp) for p in args.setups]
    title = (f"distill step ÷ (student training step + teacher no-grad forward); "
             f"{describe_device(device, clock, args.amp, amp)}, {args.threads} thread(s), "
             f"torch {torch.__version__}, K = {args.queue_size}, min of {rounds} rounds")
    print(title)
    header = (f"{'setup':<24} {'batch':>5} {'L':>4} {'tokens':>6} {'student ms':>11} "
              f"{'teacher ms':>11} {'distill ms':>11} {'samples/s':>10} {'ratio':>6}  target")
    print(header)
    print("-" * len(header))
    ok = True
    for r in rows:
        passed = r["ratio"] <= TARGET
        gated = SETUPS[r["pair"]][3]
        ok &= passed or not gated
        verdict = ("ok" if passed else "MISSED") if gated else "(ablation, report)"
        print(f"{r['pair']:<24} {r['batch']:>5} {r['length']:>4} {r['tokens']:>6} "
              f"{r['student_ms']:>11.1f} {r['teacher_ms']:>11.1f} {r['distill_ms']:>11.1f} "
              f"{r['samples_per_s']:>10.1f} {r['ratio']:>6.2f}  ≤ {TARGET} {verdict}")
        r.update(gated=gated, passed=passed)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"title": title, "device": str(device), "device_name":
                       torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                       "amp": args.amp if amp is not None else "none", "clock": clock,
                       "target": TARGET, "rows": rows}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
