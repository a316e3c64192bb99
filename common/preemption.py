"""Stopping at a safe point on SIGTERM / SIGINT (preemption by SLURM or Kubernetes).

Batch systems stop a job with SIGTERM, then SIGKILL after a grace period (SLURM ``--signal``
and ``KillWait``, Kubernetes ``terminationGracePeriodSeconds``). Inside :class:`StopSignals`
the first SIGTERM or SIGINT only sets :attr:`StopSignals.requested`; the job looks at it at its
safe points (an extraction job after each committed window, the trainer after each optimizer
step), saves what it has, and raises :class:`Stopped`, which the command turns into exit status
``128 + signal`` (143 for SIGTERM, 130 for SIGINT). A re-run with the same arguments resumes.

A second SIGINT (Ctrl-C twice) does not wait for the safe point: it raises
``KeyboardInterrupt`` at once, which leaves the job as a SIGKILL would (the last commit or
checkpoint is intact; the re-run resumes from it).

::

    with StopSignals() as stop:
        for window in windows:
            process_and_commit(window)
            stop.check("after window 12")   # raises Stopped when a signal came
"""
from __future__ import annotations

import signal
import threading
import time

__all__ = ["StopSignals", "Stopped", "ignore_stop_signals", "EXIT_CODES"]

#: Exit status of a command stopped by each signal (the shell convention ``128 + signum``).
EXIT_CODES = {signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 128 + signal.SIGINT}


class Stopped(Exception):
    """The job stopped at a safe point because a stop signal came.

    Attributes:
        signum: the signal.
        exit_code: ``128 + signum``.
        seconds: from the signal to the safe point.
    """

    def __init__(self, signum: int, where: str, seconds: float):
        self.signum, self.seconds = int(signum), float(seconds)
        self.exit_code = 128 + self.signum
        name = signal.Signals(self.signum).name
        super().__init__(f"stopped by {name} {where} ({self.seconds:.2f} s after the signal); "
                         "everything up to here is saved: run the same command again to resume")


class StopSignals:
    """Context manager that turns SIGTERM and SIGINT into a stop request (see the module).

    Handlers are installed only in the main thread of the process (elsewhere the context is a
    no-op that never requests a stop) and restored on exit.

    Args:
        second_sigint_stops_now: a SIGINT after a request raises ``KeyboardInterrupt`` (a
            second Ctrl-C). Pass a callable returning False where repeated signals are
            expected (under torchrun, which forwards the terminal's Ctrl-C to ranks that got
            it already).
        keep_on_exit: leave the handlers installed when the context ends (a command whose
            work is done: a signal from then on, while it writes its last files and exits,
            is recorded and does nothing, instead of killing it with the default action
            half-way through them).

    Attributes:
        requested: the signal number once one came, else None.
        received_at: ``time.monotonic()`` of that signal.
    """

    signals = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, second_sigint_stops_now=True, keep_on_exit: bool = False):
        self.requested: int | None = None
        self.received_at: float | None = None
        self._old: dict[int, object] = {}
        self._second_stops = second_sigint_stops_now
        self._keep = bool(keep_on_exit)

    def _handle(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            now = self._second_stops() if callable(self._second_stops) else self._second_stops
            if now:
                raise KeyboardInterrupt  # the second Ctrl-C: stop now
            return
        if self.requested is None:
            self.requested, self.received_at = int(signum), time.monotonic()

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if not self._keep:
            for s, old in self._old.items():
                signal.signal(s, old)
        self._old.clear()

    def check(self, where: str) -> None:
        """Raise :class:`Stopped` when a stop was requested (call at a safe point)."""
        if self.requested is not None:
            raise Stopped(self.requested, where, time.monotonic() - (self.received_at or 0.0))


def ignore_stop_signals() -> None:
    """For helper processes (DataLoader workers): ignore SIGTERM and SIGINT, which a batch
    system sends to every process of the job, so they keep serving until the main process has
    reached its safe point and shuts them down."""
    for s in StopSignals.signals:
        signal.signal(s, signal.SIG_IGN)
