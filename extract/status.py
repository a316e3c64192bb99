"""`vlkd-extract status`: which shards of a region set are complete, running, partial or missing,
and the array spec that re-runs only what is not done (e.g. ``3,7,12-15``)."""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from vlkd.common.manifest import ManifestError, read_manifest

_SHARD_RE = re.compile(r"^shard-(\d{5})-of-(\d{5})\.(h5|zarr)(\.partial|\.lock)?$")


@dataclass
class ShardStatus:
    index: int
    state: str                      # complete | running | partial | missing
    name: str = ""
    num_images: int | None = None
    num_failures: int = 0
    holder: str = ""                # "host pid" of a live writer


@dataclass
class SetStatus:
    path: Path
    num_shards: int
    shards: list[ShardStatus] = field(default_factory=list)

    def indices(self, *states: str) -> list[int]:
        return [s.index for s in self.shards if s.state in states]

    @property
    def todo(self) -> list[int]:
        """Shards an array job should (re-)run: partial (died) and missing; not running ones."""
        return self.indices("partial", "missing")


def array_spec(indices: list[int]) -> str:
    """Compress sorted indices to a SLURM-style array spec: [3, 7, 12, 13, 14, 15] -> '3,7,12-15'."""
    parts: list[str] = []
    idx = sorted(set(indices))
    i = 0
    while i < len(idx):
        j = i
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        parts.append(str(idx[i]) if i == j else f"{idx[i]}-{idx[j]}")
        i = j + 1
    return ",".join(parts)


def _lock_holder(lock: Path) -> str:
    """'host pid' if the lock names a live process (on this host) or another host; else ''."""
    try:
        text = lock.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    host = re.search(r"host[\"'=:\s]+([^\s\"',}]+)", text)
    pid = re.search(r"pid[\"'=:\s]+(\d+)", text)
    if not pid:
        return ""
    h = host.group(1) if host else "?"
    if h == socket.gethostname():
        try:
            os.kill(int(pid.group(1)), 0)
        except ProcessLookupError:
            return ""              # stale: the writer died
        except PermissionError:
            pass
    return f"{h} pid {pid.group(1)}"


def set_status(path: str | os.PathLike, num_shards: int | None = None) -> SetStatus:
    """Inspect a region-set directory (made or being made by array jobs).

    Args:
        path: the set directory.
        num_shards: total shard count; read from the manifest or the shard names when None.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; pass the --out directory of "
                                "vlkd-extract proposals or teacher-features")
    try:
        manifest = read_manifest(path)
    except ManifestError:
        if (path / "manifest.json").exists():
            raise
        manifest = {}
    names = {}
    found_k = set()
    for p in path.iterdir():
        m = _SHARD_RE.match(p.name)
        if m:
            names.setdefault(int(m.group(1)), []).append(p)
            found_k.add(int(m.group(2)))
    k = num_shards or manifest.get("num_shards") or (max(found_k) if found_k else None)
    if k is None:
        raise ValueError(f"{path} holds no shards and no manifest yet; pass --num-shards to say "
                         "how many shards the set should have")
    if found_k - {k}:
        raise ValueError(f"{path} holds shards of a {sorted(found_k)}-shard layout but "
                         f"{k} shards were expected; is this the right set?")
    by_index = {int(s["index"]): s for s in manifest.get("shards", [])}
    st = SetStatus(path, int(k))
    for i in range(int(k)):
        entry = by_index.get(i)
        files = {p.name: p for p in names.get(i, [])}
        final = [n for n in files if n.endswith((".h5", ".zarr"))]
        partial = [n for n in files if n.endswith(".partial")]
        locks = [files[n] for n in files if n.endswith(".lock")]
        holder = next((h for h in map(_lock_holder, locks) if h), "")
        if entry is not None and final:
            st.shards.append(ShardStatus(i, "complete", final[0], entry.get("num_images"),
                                         len(entry.get("failures", []))))
        elif holder:
            st.shards.append(ShardStatus(i, "running", (partial or [""])[0], holder=holder))
        elif partial or final:
            st.shards.append(ShardStatus(i, "partial", (partial or final)[0]))
        else:
            st.shards.append(ShardStatus(i, "missing"))
    return st
