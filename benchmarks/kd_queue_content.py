"""What the hidden-state InfoNCE queue holds: rows by step and by rank, before and after per-step
subsampling (``losses.hidden.params.enqueue_per_step``).

Simulates DDP steps of a paper-scale batch in one process: ``--world`` ranks, ``--batch``
samples each, every sample with its own token count (uniform in ``--tokens`` LO..HI, mean ≈ 120
by default: 64 × 120 × 4 ≈ 30k tokens a step), through :meth:`TokenQueue.enqueue_from_ranks`,
which does what :meth:`TokenQueue.enqueue` does on every rank of a real run (the two are
compared under gloo in tests/test_kd_queue_sampling.py). Each queued row records its (step, rank,
sample), so after ``--steps`` steps the table shows the fraction of the K rows that come from
each of the last steps and each rank, and how many distinct samples the negatives come from.

- before: every token enqueued (``enqueue_per_step: null``), the queue keeps the newest K of
  the ~30k rows of the last step: rows of the last ~35 samples of the last rank only.
- after: ``enqueue_per_step`` rows a step (default 256), ``n / world`` from each rank at random:
  the queue spans the last K / n steps, each rank an equal share.

Run: ``python benchmarks/kd_queue_content.py`` (a few seconds; ``--quick`` is the same with
fewer steps). Deterministic: the same arguments print the same table.
"""
from __future__ import annotations

import argparse
import inspect
from collections import Counter

import numpy as np
import torch

from vlkd.train.kd_queue import TokenQueue
from vlkd.train.losses import HiddenInfoNCELoss

def default_per_step() -> int:
    """``enqueue_per_step``'s default, read from the loss's signature."""
    return inspect.signature(HiddenInfoNCELoss).parameters["enqueue_per_step"].default


def simulate(per_step: int | None, *, steps: int, world: int, batch: int, tokens: tuple[int, int],
             queue_size: int, seed: int = 0) -> np.ndarray:
    """The queue's rows after ``steps`` steps: (K, 3) int array of (step, rank, sample)."""
    rng = np.random.default_rng(seed)  # token counts: the same for every per_step
    q = TokenQueue(queue_size, 3, per_step=per_step, seed=seed)
    for step in range(steps):
        per_rank = []
        for rank in range(world):
            counts = rng.integers(tokens[0], tokens[1] + 1, size=batch)
            sample = np.repeat(np.arange(batch), counts)
            origin = np.stack([np.full_like(sample, step), np.full_like(sample, rank), sample], 1)
            per_rank.append(torch.from_numpy(origin.astype(np.float32)).unsqueeze(1))  # (N, 1, 3)
        q.enqueue_from_ranks(per_rank)
    return q.valid()[0].round().long().numpy()


def table(rows: np.ndarray, steps: int, world: int, show: int) -> list[str]:
    """Fraction of the rows by steps back (0 = the last step) and rank, in percent."""
    by = Counter((steps - 1 - int(s), int(r)) for s, r, _ in rows)
    total = len(rows)
    head = "steps back " + "".join(f"  rank {r}" for r in range(world)) + "     all"
    out = [head, "-" * len(head)]
    ages = sorted({a for a, _ in by})
    shown = [a for a in ages if a < show]
    for age in shown:
        cells = [100.0 * by.get((age, r), 0) / total for r in range(world)]
        out.append(f"{age:>10d} " + "".join(f"{c:7.2f}%" for c in cells) + f"{sum(cells):7.2f}%")
    older = [a for a in ages if a >= show]
    if older:
        cells = [100.0 * sum(by.get((a, r), 0) for a in older) / total for r in range(world)]
        out.append(f"{f'{show}-{older[-1]}':>10s} " + "".join(f"{c:7.2f}%" for c in cells)
                   + f"{sum(cells):7.2f}%")
    samples = len({(int(s), int(r), int(b)) for s, r, b in rows})
    out.append(f"{total} rows from {len(ages)} step(s), {samples} distinct samples")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer steps (the table is the same "
                                                        "once the queue has wrapped)")
    p.add_argument("--steps", type=int, default=0, help="steps simulated (default 40, quick 24)")
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--batch", type=int, default=64, help="samples per rank and step")
    p.add_argument("--tokens", type=int, nargs=2, default=(80, 160), metavar=("LO", "HI"),
                   help="valid tokens per sample, uniform")
    p.add_argument("--queue-size", type=int, default=4096)
    p.add_argument("--per-step", type=int, nargs="*", default=None,
                   help="enqueue_per_step values of the 'after' tables (default: the loss's)")
    p.add_argument("--show", type=int, default=17, help="rows shown before 'older'")
    args = p.parse_args(argv)
    steps = args.steps or (24 if args.quick else 40)
    per_steps = args.per_step or [default_per_step()]
    lo, hi = args.tokens
    print(f"# KD queue content after {steps} steps: K = {args.queue_size}, {args.world} ranks × "
          f"{args.batch} samples × {lo}-{hi} tokens (≈ {args.world * args.batch * (lo + hi) // 2}"
          f" tokens a step); % of the queue's rows by steps back and rank")
    for per_step in [None, *per_steps]:
        rows = simulate(per_step, steps=steps, world=args.world, batch=args.batch,
                        tokens=(lo, hi), queue_size=args.queue_size)
        name = ("before: every token enqueued (enqueue_per_step: null)" if per_step is None else
                f"after: enqueue_per_step: {per_step} ({per_step // args.world} per rank, "
                f"K / n = {args.queue_size / per_step:g} steps)")
        print(f"\n## {name}")
        print("\n".join(table(rows, steps, args.world, args.show)))


if __name__ == "__main__":
    main()
