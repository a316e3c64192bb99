"""The demo's preloader runs a stage's own entry point and reports what a subprocess would."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlkd.demo.preload import Preloader

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def pre():
    p = Preloader(dict(os.environ))
    assert p.ready(120), p.failed
    yield p
    p.close()
    assert p.proc.poll() is not None


def _run(pre, argv, env=None):
    st = pre.start(argv, dict(os.environ, **(env or {})))
    out = st.stdout.read()
    return st.wait(), out


def test_console_script_and_exit_codes_match_a_subprocess(pre, tmp_path):
    for argv in ([str(BIN / "vlkd-train"), "--help"],
                 [str(BIN / "vlkd-train"), "no-such-command"],
                 [sys.executable, "-m", "vlkd.data.synthetic", "--num-train", "-3",
                  "--out", str(tmp_path / "w")]):
        ref = subprocess.run(argv, capture_output=True, text=True)
        rc, out = _run(pre, argv)
        assert rc == ref.returncode, (argv, out)
        # the same program name and message as the real command prints
        assert ref.stdout.splitlines()[:1] == out.splitlines()[:1] or \
            ref.stderr.splitlines()[:1] == out.splitlines()[:1], (ref, out)
    assert _run(pre, [str(BIN / "vlkd-train"), "no-such-command"])[0] == 2


def test_signal_and_unknown_command(pre, tmp_path):
    # a stage that runs until signalled: the world generator on a large count
    st = pre.start([sys.executable, "-m", "vlkd.data.synthetic", "--out", str(tmp_path / "w"),
                    "--num-train", "100000", "--num-val", "1", "--num-test", "1"],
                   dict(os.environ))
    time.sleep(3)
    st.send_signal(signal.SIGTERM)
    assert st.wait() == -signal.SIGTERM
    rc, out = _run(pre, [sys.executable, "-c", "import sys; print(sys.argv); sys.exit(3)", "a"])
    assert rc == 3 and out.strip() == "['-c', 'a']", out
    rc, out = _run(pre, [str(BIN / "vlkd-nonexistent")])
    assert rc == 127 and "no console script named 'vlkd-nonexistent'" in out


def test_preloader_ends_with_its_parent(tmp_path):
    code = ("import os, sys; from vlkd.demo.preload import Preloader; p = Preloader(dict(os.environ));"
            " assert p.ready(120); print(p.proc.pid, flush=True); os._exit(0)")
    pid = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True).stdout.split()[-1])
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    pytest.fail(f"preloader {pid} outlived the demo")
