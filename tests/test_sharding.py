"""Shard ranges and array-job index resolution."""
import pytest
from hypothesis import given, strategies as st

from vlkd.common.sharding import resolve_shard_indices, shard_ranges


def test_shard_ranges_pinned():
    assert shard_ranges(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_ranges(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert shard_ranges(0, 2) == [(0, 0), (0, 0)]
    assert shard_ranges(5, 1) == [(0, 5)]


@given(n=st.integers(0, 10_000), k=st.integers(1, 300))
def test_shard_ranges_cover_contiguous_balanced(n, k):
    ranges = shard_ranges(n, k)
    assert len(ranges) == k
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, in order
    sizes = [b - a for a, b in ranges]
    assert min(sizes) >= 0 and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the larger shards come first
    covered = [i for a, b in ranges for i in range(a, b)] if n <= 2000 else None
    if covered is not None:
        assert covered == list(range(n))


def test_shard_ranges_rejects_bad_arguments():
    with pytest.raises(ValueError):
        shard_ranges(5, 0)
    with pytest.raises(ValueError):
        shard_ranges(-1, 2)


def test_resolve_explicit_and_all():
    assert resolve_shard_indices("all", 4, environ={}) == [0, 1, 2, 3]
    assert resolve_shard_indices("ALL", 2, environ={"SLURM_ARRAY_TASK_ID": "1"}) == [0, 1]
    assert resolve_shard_indices("3", 4, environ={"SLURM_ARRAY_TASK_ID": "1"}) == [3]
    assert resolve_shard_indices(2, 4, environ={}) == [2]


@pytest.mark.parametrize("var", ["SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX",
                                 "AWS_BATCH_JOB_ARRAY_INDEX"])
def test_resolve_from_each_batch_system(var):
    assert resolve_shard_indices(None, 8, environ={var: "5"}) == [5]


def test_resolve_first_set_variable_wins():
    env = {"JOB_COMPLETION_INDEX": "2", "AWS_BATCH_JOB_ARRAY_INDEX": "3"}
    assert resolve_shard_indices(None, 8, environ=env) == [2]
    env["SLURM_ARRAY_TASK_ID"] = "1"
    assert resolve_shard_indices(None, 8, environ=env) == [1]
    env["SLURM_ARRAY_TASK_ID"] = ""  # empty counts as unset
    assert resolve_shard_indices(None, 8, environ=env) == [2]


def test_resolve_reads_os_environ_by_default(monkeypatch):
    for var in ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX", "AWS_BATCH_JOB_ARRAY_INDEX"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_BATCH_JOB_ARRAY_INDEX", "1")
    assert resolve_shard_indices(None, 2) == [1]


def test_resolve_errors_say_what_to_do():
    with pytest.raises(ValueError, match="--shard-index"):
        resolve_shard_indices(None, 4, environ={})
    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_ID=4 is outside 0..3"):
        resolve_shard_indices(None, 4, environ={"SLURM_ARRAY_TASK_ID": "4"})
    with pytest.raises(ValueError, match="not an integer"):
        resolve_shard_indices("x", 4, environ={})
    with pytest.raises(ValueError, match="outside"):
        resolve_shard_indices("-1", 4, environ={})
