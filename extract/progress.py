"""Progress of an extraction job on stderr: a tqdm bar (images/s) or JSON lines for cluster logs."""
from __future__ import annotations

import json
import sys
import time

from .options import LOG_FORMATS


class Progress:
    """Progress of a job on stderr: a tqdm bar (images/s) or JSON lines.

    Args:
        log_format: ``text`` (tqdm bar and plain messages) or ``json`` (one JSON object per
            line, for cluster logs: events ``start``, ``progress`` every ``interval`` seconds,
            ``shard_done``, ``summary``).
        enabled: show the bar / progress lines at all (events are always printed).
        interval: seconds between JSON progress lines.
        stream: where to write (default stderr).
    """

    def __init__(self, log_format: str = "text", *, enabled: bool = True,
                 interval: float = 30.0, stream=None):
        if log_format not in LOG_FORMATS:
            raise ValueError(f"--log-format must be text or json, got {log_format!r}")
        self.json = log_format == "json"
        self.enabled = enabled
        self.interval = interval
        self.stream = stream if stream is not None else sys.stderr
        self._bar = None
        self._ctx: dict = {}
        self._total = self._done = self._failed = self._initial = 0
        self._t0 = self._last = time.monotonic()

    def event(self, event: str, message: str = "", **fields) -> None:
        """Print one event: a JSON line, or ``message`` as text."""
        if self.json:
            rec = {"time": round(time.time(), 3), "event": event, **fields}
            self.stream.write(json.dumps(rec, default=str) + "\n")
            self.stream.flush()
        elif message:
            if self._bar is not None:
                self._bar.write(message, file=self.stream)
            else:
                self.stream.write(message + "\n")
                self.stream.flush()

    def start(self, total: int, desc: str, initial: int = 0, **ctx) -> None:
        """Begin counting ``total`` images (one shard), ``initial`` of them already done
        (resumed: shown as done, not counted in images/s)."""
        self._ctx = dict(ctx, desc=desc)
        self._total, self._done, self._failed, self._initial = total, initial, 0, initial
        self._t0 = self._last = time.monotonic()
        if self.enabled and not self.json:
            from tqdm import tqdm
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="img",
                             file=self.stream, dynamic_ncols=True, smoothing=0.1,
                             mininterval=0.5)

    def update(self, n: int, failed: int = 0) -> None:
        self._done += n
        self._failed += failed
        if self._bar is not None:
            self._bar.update(n)
            if failed:
                self._bar.set_postfix(failed=self._failed, refresh=False)
        elif self.json and self.enabled:
            now = time.monotonic()
            if now - self._last >= self.interval:
                self._last = now
                self.event("progress", **self._progress_fields())

    def _progress_fields(self) -> dict:
        el = max(time.monotonic() - self._t0, 1e-9)
        return dict(self._ctx, done=self._done, total=self._total, failed=self._failed,
                    elapsed_s=round(el, 2),
                    images_per_s=round((self._done - self._initial) / el, 3))

    def finish(self) -> dict:
        """Close the bar; returns the final counters."""
        fields = self._progress_fields()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        return fields


def format_shards(indices: list[int]) -> str:
    """``shard 3``, ``shards 0..15`` or ``shards [1, 4, 9]`` (for messages)."""
    if len(indices) == 1:
        return f"shard {indices[0]}"
    return f"shards {indices[0]}..{indices[-1]}" if indices == list(
        range(indices[0], indices[-1] + 1)) else f"shards {indices}"


__all__ = ["Progress", "format_shards"]
