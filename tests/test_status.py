"""`vlkd-extract status`: shard states and the re-run array spec, on real shards."""
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from vlkd.common.regionset import ShardWriter
from vlkd.extract.cli import main
from vlkd.extract.status import array_spec, set_status


@pytest.mark.parametrize("idx, spec", [([], ""), ([5], "5"), ([3, 7, 12, 13, 14, 15], "3,7,12-15"),
                                       ([0, 1, 2, 4], "0-2,4"), ([9, 1, 2], "1-2,9")])
def test_array_spec(idx, spec):
    assert array_spec(idx) == spec


def _write(set_dir, index, k, n=3, finalize=True):
    w = ShardWriter(set_dir, index, k, backend="hdf5", feature_dim=4, feature_dtype="float16")
    for i in range(n):
        w.append(f"img{index}-{i}", (10, 10), np.zeros((1, 4), "f4"), np.ones(1, "f4"),
                 np.zeros(1, "i4"), np.zeros((1, 4), "f2"))
    if finalize:
        w.finalize()
    else:
        w.commit()
    return w


def test_status_states_and_respec(tmp_path):
    k = 6
    for i in (0, 2, 3):
        _write(tmp_path, i, k)
    # shard 4: a writer that died after a commit (SIGKILL): partial, not running
    code = textwrap.dedent(f"""
        import numpy as np, os, signal
        from vlkd.common.regionset import ShardWriter
        w = ShardWriter({str(tmp_path)!r}, 4, {k}, backend="hdf5", feature_dim=4)
        w.append("x", (10, 10), np.zeros((1, 4), "f4"), np.ones(1, "f4"), np.zeros(1, "i4"),
                 np.zeros((1, 4), "f2"))
        w.commit()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    r = subprocess.run([sys.executable, "-c", code])
    assert r.returncode == -signal.SIGKILL
    # shard 5: a live writer in this process
    live = _write(tmp_path, 5, k, finalize=False)
    st = set_status(tmp_path)
    assert [s.state for s in st.shards] == ["complete", "missing", "complete", "complete",
                                            "partial", "running"]
    assert st.shards[0].num_images == 3
    assert str(os.getpid()) in st.shards[5].holder
    assert st.todo == [1, 4]

    res = CliRunner().invoke(main, ["status", str(tmp_path)])
    assert res.exit_code == 1, res.output
    assert "3 complete, 1 running, 1 partial, 1 missing" in res.output
    assert res.output.strip().endswith("re-run: 1,4")
    res = CliRunner().invoke(main, ["status", str(tmp_path), "--array-spec"])
    assert res.output.strip() == "1,4"

    live.finalize()
    for i in (1, 4):
        _write(tmp_path, i, k)   # 4 resumes its partial shard
    res = CliRunner().invoke(main, ["status", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "nothing to re-run" in res.output


def test_status_needs_shard_count_for_empty_dir(tmp_path):
    res = CliRunner().invoke(main, ["status", str(tmp_path)])
    assert res.exit_code != 0 and "--num-shards" in res.output
    res = CliRunner().invoke(main, ["status", str(tmp_path), "--num-shards", "3"])
    assert res.exit_code == 1 and "re-run: 0-2" in res.output
