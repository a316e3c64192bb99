"""Sharding: split a sorted item list into contiguous shards and pick this job's shard(s).

Phase one runs as independent array jobs, one shard each. The array index comes from the batch
system's environment (SLURM, Kubernetes Indexed Jobs, AWS Batch) unless given explicitly.
"""
from __future__ import annotations

import os

#: Array-job index variables, in the order they are consulted (the first one set wins).
ARRAY_INDEX_ENV_VARS = ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX",
                        "AWS_BATCH_JOB_ARRAY_INDEX")


def shard_ranges(num_items: int, num_shards: int) -> list[tuple[int, int]]:
    """Split ``range(num_items)`` into ``num_shards`` contiguous, balanced ranges.

    The first ``num_items % num_shards`` shards get one item more than the rest, so sizes differ
    by at most one. With more shards than items, the trailing shards are empty ``(n, n)``.

    Args:
        num_items: number of items (>= 0).
        num_shards: number of shards (>= 1).

    Returns:
        ``[(start, stop), ...]`` of length ``num_shards``, covering ``0..num_items`` in order.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if num_items < 0:
        raise ValueError(f"num_items must be >= 0, got {num_items}")
    base, extra = divmod(num_items, num_shards)
    ranges, start = [], 0
    for i in range(num_shards):
        stop = start + base + (1 if i < extra else 0)
        ranges.append((start, stop))
        start = stop
    return ranges


def _parse_index(text: str, num_shards: int, source: str) -> int:
    try:
        index = int(text.strip())
    except ValueError:
        raise ValueError(f"{source}={text!r} is not an integer shard index; pass "
                         f"--shard-index N (0..{num_shards - 1}) or 'all'") from None
    if not 0 <= index < num_shards:
        raise ValueError(f"{source}={index} is outside 0..{num_shards - 1} for "
                         f"--num-shards {num_shards}; check the array range of the job "
                         f"(it must be 0..{num_shards - 1})")
    return index


def resolve_shard_indices(option: str | int | None, num_shards: int,
                          environ: dict | None = None) -> list[int]:
    """Which shard(s) this process writes.

    Args:
        option: ``"all"`` (every shard in turn), an index (``"3"`` or ``3``), or None to take the
            index from the first set of ``SLURM_ARRAY_TASK_ID``, ``JOB_COMPLETION_INDEX``,
            ``AWS_BATCH_JOB_ARRAY_INDEX``.
        num_shards: total number of shards (>= 1).
        environ: environment to read (default ``os.environ``).

    Returns:
        Sorted list of shard indices.

    Raises:
        ValueError: the index is malformed or out of range, or no index was given and no
            array-job variable is set.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    env = os.environ if environ is None else environ
    if option is not None and str(option).strip().lower() == "all":
        return list(range(num_shards))
    if option is not None and str(option).strip() != "":
        return [_parse_index(str(option), num_shards, "--shard-index")]
    for var in ARRAY_INDEX_ENV_VARS:
        value = env.get(var)
        if value not in (None, ""):
            return [_parse_index(value, num_shards, var)]
    raise ValueError("no shard index: pass --shard-index N (0.."
                     f"{num_shards - 1}) or --shard-index all, or run as an array job that "
                     f"sets one of {', '.join(ARRAY_INDEX_ENV_VARS)}")
