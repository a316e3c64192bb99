"""Stages started from a preloaded process instead of a fresh interpreter.

Every demo stage is a command line of its own (``vlkd-train finetune …``), and a fresh Python
spends most of a short stage importing: torch, transformers' ``BertModel`` and detectron2 take
7-11 s per process on the 2-core machine, against a quick demo of ~35 stages. The demo
therefore starts one *preloader* (``python -m vlkd.demo.preload SOCKET``) that imports them
once and then, for each stage, forks a process that runs the stage's own entry point (the
console script named by ``argv[0]``, ``-m module`` or ``-c code``) with the stage's ``sys.argv`` and
environment, its stdout and stderr on the pipe the demo reads. The code that runs is the
command's, unchanged; only the imports are inherited. ``vlkd-demo --no-preload`` starts every
stage as a plain subprocess instead.

Protocol (one Unix-socket connection per stage): the demo sends one JSON line
``{"argv": [...], "env": {...}}`` with the write end of its pipe attached (``SCM_RIGHTS``);
the preloader forks a *waiter*, which forks the stage, waits for it and answers one JSON line
``{"pid": N}`` then ``{"rc": RC}`` (``-SIGNUM`` when a signal ended it, as ``subprocess``
reports). The preloader itself stays single-threaded, so forking it is safe.
"""
from __future__ import annotations

import importlib
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
import types
import warnings
from importlib.metadata import entry_points
from pathlib import Path

# what the stages import; imported once in the preloader (a failure only costs the saving)
PRELOAD = ("torch", "transformers", "vlkd.train.model", "vlkd.train.cli", "vlkd.train.tasks",
           "vlkd.train.trainer", "vlkd.train.metrics", "vlkd.extract.cli",
           "vlkd.extract.detector", "vlkd.extract.proposals", "vlkd.extract.teacher",
           "detectron2.modeling", "vlkd.data.synthetic")


def _stage_main(argv: list[str], env: dict[str, str]) -> int:
    """Runs one stage's entry point in this (forked) process; returns its exit status."""
    os.environ.clear()
    os.environ.update(env)
    try:
        if len(argv) >= 3 and argv[1] == "-m":
            sys.argv = [argv[2], *argv[3:]]
            with warnings.catch_warnings():     # "found in sys.modules": it was preloaded
                warnings.filterwarnings("ignore", category=RuntimeWarning, module="runpy")
                runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
            return 0
        if len(argv) >= 3 and argv[1] == "-c":
            sys.argv = ["-c", *argv[3:]]
            sys.modules["__main__"] = main = types.ModuleType("__main__")
            exec(compile(argv[2], "<string>", "exec"), main.__dict__)
            return 0
        name = Path(argv[0]).name
        eps = [e for e in entry_points(group="console_scripts") if e.name == name]
        if not eps:
            print(f"vlkd-demo preloader: no console script named {name!r}", file=sys.stderr)
            return 127
        sys.argv = [argv[0], *argv[1:]]
        # as in a console script's own process: __main__ is a script, not this module (click
        # names the program after it)
        sys.modules["__main__"] = types.ModuleType("__main__")
        res = eps[0].load()()
        return res if isinstance(res, int) else 0
    except SystemExit as e:
        code = e.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 (reported like an uncaught exception would be)
        traceback.print_exc()
        return 1


def _serve_one(conn: socket.socket) -> None:
    """In the waiter: forks the stage, reports its pid and exit status on ``conn``."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the stage gets Ctrl-C; we report it
    buf, fds, _, _ = socket.recv_fds(conn, 1 << 20, 1)
    while not buf.endswith(b"\n"):
        more = conn.recv(1 << 20)
        if not more:
            break
        buf += more
    req = json.loads(buf)
    pid = os.fork()
    if pid == 0:                                    # the stage
        rc = 1
        try:
            conn.close()
            os.dup2(fds[0], 1)
            os.dup2(fds[0], 2)
            os.close(fds[0])
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            for s in (sys.stdout, sys.stderr):
                s.reconfigure(line_buffering=True)
            rc = _stage_main(req["argv"], req["env"])
        finally:
            for s in (sys.stdout, sys.stderr):
                try:
                    s.flush()
                except Exception:  # noqa: BLE001
                    pass
            os._exit(rc & 0xFF if rc >= 0 else 1)
    os.close(fds[0])
    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    _, status = os.waitpid(pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    conn.sendall(json.dumps({"rc": rc}).encode() + b"\n")


def serve(path: str) -> None:
    """The preloader: imports :data:`PRELOAD`, then forks one waiter per connection; it ends
    when the demo ends (terminate) or is gone (checked every second)."""
    for mod in PRELOAD:
        try:
            with warnings.catch_warnings():     # the stages' own imports would show them
                warnings.simplefilter("ignore")
                importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001 (a stage that needs it reports the error)
            print(f"vlkd-demo preloader: could not preload {mod}: {e}", file=sys.stderr)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # waiters are reaped by the kernel
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(64)
    srv.settimeout(1.0)
    parent = os.getppid()
    print("ready", flush=True)
    while True:
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            if os.getppid() != parent:      # the demo is gone (killed): so are we
                return
            continue
        conn.settimeout(None)
        if os.fork() == 0:
            srv.close()
            try:
                _serve_one(conn)
            finally:
                os._exit(0)
        conn.close()


class Preloader:
    """The demo's side: starts the preloader and runs stages through it."""

    def __init__(self, env: dict[str, str]) -> None:
        self.dir = tempfile.mkdtemp(prefix="vlkd-preload-")
        self.path = os.path.join(self.dir, "sock")
        self.proc = subprocess.Popen([sys.executable, "-m", "vlkd.demo.preload", self.path],
                                     stdout=subprocess.PIPE, env=env, text=True)
        self.failed: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._wait_ready, daemon=True).start()

    def _wait_ready(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.failed = f"the demo's preloader did not start (exit {self.proc.wait()})"
        self._ready.set()

    def ready(self, timeout: float | None = 0) -> bool:
        """Whether stages can start through it (False while it imports, or if it failed)."""
        return self._ready.wait(timeout) and self.failed is None

    def start(self, argv: list[str], env: dict[str, str]) -> "Started":
        """Starts ``argv`` with ``env``; its output comes on :attr:`Started.stdout`."""
        if not self.ready(None):
            raise RuntimeError(f"{self.failed}; run vlkd-demo with --no-preload")
        r, w = os.pipe()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(self.path)
            socket.send_fds(conn, [json.dumps({"argv": argv, "env": env}).encode() + b"\n"],
                            [w])
        finally:
            os.close(w)
        return Started(conn, os.fdopen(r, "r", buffering=1, errors="replace"))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.rmdir(self.dir)


class Started:
    """A stage started by the preloader: ``stdout`` (text lines), ``pid``, :meth:`wait`."""

    def __init__(self, conn: socket.socket, stdout) -> None:
        self.conn, self.stdout = conn, stdout
        self._answers = conn.makefile("r")
        first = self._answers.readline()
        self.pid = json.loads(first)["pid"] if first else None

    def wait(self) -> int:
        line = self._answers.readline()
        self._answers.close()
        self.conn.close()
        self.stdout.close()
        if not line:
            return -int(signal.SIGKILL)     # the waiter died: report the stage as killed
        return int(json.loads(line)["rc"])

    def send_signal(self, signum: int) -> None:
        if self.pid:
            os.kill(self.pid, signum)


if __name__ == "__main__":
    serve(sys.argv[1])
