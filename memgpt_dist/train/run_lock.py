"""An exclusive lock on a run directory, held by rank 0 for the run's lifetime.

Two runs on one run directory (two `--resume auto` jobs, a requeue racing its predecessor) would
both write `metrics.jsonl` and the checkpoints. The lock is a POSIX record lock (`fcntl.lockf`)
on `<run_dir>/run.lock`, taken before anything else is written. The file holds the holder's host,
pid and start time, so a refused run can name it.

Record locks, not `flock`: they belong to the process, so a forked data-loader worker that
outlives its parent does not keep the run locked, and they work on NFS. The kernel drops the
lock when its process dies, so a lock file whose lock nobody holds is stale (its process is
gone): the next run takes it over, with a warning naming the dead holder.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger("memgpt_dist")

LOCK_NAME = "run.lock"
# Lock files this process holds: POSIX locks do not conflict within one process, and closing a
# second descriptor of the file would silently drop the first one's lock, so a second holder in
# the same process is refused here.
_HELD: set[str] = set()


class RunDirLocked(RuntimeError):
    """Another live process holds the run directory's lock; the message names it."""


def holder_record() -> dict[str, Any]:
    """Who holds the lock: this process's host, pid and start time."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start_time": _start_time(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(_start_time()))}


class RunLock:
    """`acquire()` takes the lock or raises `RunDirLocked`; `release()` (or process exit) drops it.

    The file descriptor stays open for the lock's lifetime: closing any descriptor of the file
    would drop a POSIX lock, so the holder record is read and written through this one.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if str(self.path.resolve()) in _HELD:
            raise RunDirLocked(f"run directory {self.path.parent} is already in use by this process (pid "
                               f"{os.getpid()}); pass another --run_dir")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read(fd)
            os.close(fd)
            raise RunDirLocked(f"run directory {self.path.parent} is in use by {_describe(holder)} (lock file "
                               f"{self.path}); wait for that run to end or stop it, or pass another --run_dir")
        previous = _read(fd)
        if previous and not _is_me(previous):
            log.warning("taking over the stale lock %s of %s: that process is gone (%s)", self.path,
                        _describe(previous), _why_stale(previous))
        _write(fd, holder_record())
        self._fd = fd
        _HELD.add(str(self.path.resolve()))
        return self

    def release(self) -> None:
        """Drop the lock; the file stays (its record says who held it last)."""
        if self._fd is not None:
            os.close(self._fd)  # closing drops the record lock
            self._fd = None
            _HELD.discard(str(self.path.resolve()))

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 1 << 16)
    try:
        return json.loads(raw.decode()) if raw.strip() else {}
    except ValueError:
        return {"unreadable": raw[:200].decode(errors="replace")}


def _write(fd: int, record: dict[str, Any]) -> None:
    data = json.dumps(record, sort_keys=True).encode() + b"\n"
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)
    os.fsync(fd)


def _describe(holder: dict[str, Any]) -> str:
    if not holder or "pid" not in holder:
        return f"another process (its lock record is empty or unreadable: {holder or 'empty'})"
    return f"pid {holder['pid']} on host {holder.get('host', '?')} (started {holder.get('started', '?')})"


def _is_me(holder: dict[str, Any]) -> bool:
    return holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid()


def _why_stale(holder: dict[str, Any]) -> str:
    """Why an unheld lock's record is dead: said for the user, the lock itself already decided."""
    if holder.get("host") != socket.gethostname():
        return f"it holds no lock, and host {holder.get('host')} is not this one ({socket.gethostname()})"
    pid = holder.get("pid")
    if not isinstance(pid, int) or not _pid_alive(pid):
        return f"no process {pid} on this host"
    return f"pid {pid} now belongs to a process started later (pid reused)"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _start_time() -> float:
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # psutil is a DeepSpeed dependency; without it, the time of the lock
        return time.time()
