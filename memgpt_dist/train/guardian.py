"""A small process beside each rank that SIGKILLs it when it finishes no step and its own
watchdog could not end it: the backstop of `train.heartbeat`.

The heartbeat watchdog is a thread of the rank, so it cannot act when the whole process is
stopped (SIGSTOP, a frozen cgroup, a debugger) or when a native call holds the GIL. The peers
then exit on their own (their collectives time out: exit 76), but this rank, and with it its
node's launcher, would wait forever: on another node nobody is left to kill it. The guardian
reads one byte per finished step from a pipe; after `timeout_s` without one it says so on
stderr (the node's log) and SIGKILLs the rank, so that its launcher exits and the job script
can requeue. It exits by itself on the rank's stop byte, at the pipe's end, or when the rank
is gone (it is then re-parented).

Standard library only, and started by file path (`python -I -S guardian.py ...`): it never
imports torch, so it costs a few MB and starts in milliseconds.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import sys
import time

STOP = b"q"  # the rank's last byte: the run ended normally, stop guarding


def guard(fd: int, pid: int, timeout_s: float, rank: int) -> int:
    """Watch rank `rank` (process `pid`) through the read end `fd` of its beat pipe."""
    last = time.monotonic()
    while True:
        ready, _, _ = select.select([fd], [], [], min(1.0, timeout_s / 4))
        if ready:
            data = os.read(fd, 4096)
            if not data or STOP in data:  # the rank closed the pipe or said stop
                return 0
            last = time.monotonic()
        if os.getppid() != pid:  # the rank died: this process was re-parented
            return 0
        silent = time.monotonic() - last
        if silent > timeout_s:
            print(f"error: guardian of rank {rank} on host {socket.gethostname()}: pid {pid} finished no step for "
                  f"{silent:.0f}s and its own watchdog did not end it (the process is stopped, or its threads "
                  f"cannot run); killing it with SIGKILL so that this node's launcher exits", file=sys.stderr,
                  flush=True)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return 0


def main(argv: list[str]) -> int:
    # Slurm's `scancel --signal=USR1 --full` reaches every process of the step: not ours to act on
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd, pid, timeout_s, rank = int(argv[0]), int(argv[1]), float(argv[2]), int(argv[3])
    return guard(fd, pid, timeout_s, rank)


if __name__ == "__main__":  # a process of its own: its exit status is its only output
    raise SystemExit(main(sys.argv[1:]))
