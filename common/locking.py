"""Writer locks: one live writer per shard, and serialised manifest updates.

A lock is a small file holding ``{"host", "pid", "since"}`` of its holder, guarded by
``fcntl.flock``. The kernel drops an flock when its process dies (SIGKILL included), so a lock
file left behind by a dead writer is simply taken over by the next one; the file's contents are
only there to name the holder in the error a second live writer gets. On Linux NFS clients flock
is emulated with POSIX byte-range locks, so the lock also holds across the hosts of a cluster.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path


class LockHeldError(RuntimeError):
    """Raised when a non-blocking lock is held by another live process.

    Attributes:
        holder: the holder's record, ``{"host": str, "pid": int, "since": float}`` (may be
            empty when the holder had not written it yet).
    """

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


def _read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class FileLock:
    """An exclusive, non-reentrant lock on ``path`` naming its holder.

    Args:
        path: the lock file (created if missing).
        blocking: wait for the lock instead of raising ``LockHeldError``.
        remove_on_release: unlink the lock file on release (shard locks); keep it for locks
            that are taken often (the manifest lock) to avoid churn.
    """

    def __init__(self, path: str | os.PathLike, *, blocking: bool = False,
                 remove_on_release: bool = True):
        self.path = Path(path)
        self.blocking = blocking
        self.remove_on_release = remove_on_release
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "FileLock":
        if self._fd is not None:
            raise RuntimeError(f"lock {self.path} is already held by this object")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                flags = fcntl.LOCK_EX | (0 if self.blocking else fcntl.LOCK_NB)
                fcntl.flock(fd, flags)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                holder = _read_holder(self.path)
                where = (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}"
                         if holder else "a process that has not written its name yet")
                raise LockHeldError(f"{self.path} is locked by {where}", holder) from None
            # The previous holder may have unlinked the file between our open and our flock:
            # then we locked an orphaned inode and must retry on the path's current file.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if self.remove_on_release:
                # Unlink while still holding the lock so nobody can lock the old inode and
                # believe they own the path (see the inode check in acquire()).
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
            else:
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing drops the flock

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # a lost object must not keep a shard locked
        try:
            self.release()
        except Exception:
            pass


def describe_holder(holder: dict) -> str:
    """Human-readable holder: ``host node17, pid 4242 (alive)``."""
    if not holder:
        return "an unknown process"
    host, pid = holder.get("host", "?"), holder.get("pid", "?")
    state = ""
    if host == socket.gethostname() and isinstance(pid, int):
        state = " (alive)" if _pid_alive(pid) else " (not running)"
    return f"host {host}, pid {pid}{state}"
