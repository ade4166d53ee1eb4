"""Why a run stops before `train.max_steps`, how every rank agrees on it, and the exit codes.

* Preemption: SIGTERM and SIGUSR1 (what Slurm and most schedulers send before they kill or
  requeue a job) only set a flag. At the next step boundary the ranks combine their flags with
  one all-reduce (MAX) over the whole world, so a signal that reached a single rank stops every
  rank at the same step and nobody waits in a collective the others never enter. The run then
  saves a committed checkpoint and stops with `EXIT_PREEMPTED`.
* Stop file: `train.stop_file`, once it appears (newer than the process), counts as a signal.
  Job scripts use it because the scheduler's warning goes to the batch shell, not to the ranks.
* Time budget: `train.max_minutes` stops the same way, with the same exit code, at the last step
  boundary that still leaves time for one more step and a save.
* Divergence: a step whose loss or gradient is not finite on any rank is skipped by every rank;
  more than `train.max_nan_skips` in a row stop the run with `EXIT_DIVERGED` and no save, so the
  last committed checkpoint is the last good state.

* A lost or hung rank: a rank that finished no step for `train.hang_timeout_s` (its watchdog,
  `train.heartbeat`), or a collective that failed or timed out (`parallel.collective_timeout_s`:
  a peer died or stopped), ends the process with `EXIT_LOST_RANK`, naming the lost rank and host
  where it can tell. Nothing is saved then (the peers cannot take part); resume from the last
  committed checkpoint, which the job script does by requeueing like on `EXIT_PREEMPTED`.

The exceptions below carry their exit code up to `memgpt_dist.cli.run_cli`; nothing below
`launch/` calls `sys.exit`.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger("memgpt_dist")

# sysexits.h EX_TEMPFAIL: "temporary failure, the user is invited to retry". A committed
# checkpoint was written; requeue the same command with --resume auto.
EXIT_PREEMPTED = 75
# A rank was lost (killed, a node gone) or hung: the heartbeat found no finished step for
# train.hang_timeout_s, or a collective failed or timed out. Nothing new was saved; requeue with
# --resume auto (the last committed checkpoint is intact).
EXIT_LOST_RANK = 76
# The loss or gradient was non-finite for more than train.max_nan_skips consecutive steps.
EXIT_DIVERGED = 3

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class RunStopped(Exception):
    """The run ended before train.max_steps; `exit_code` tells a job script what to do next."""

    exit_code = 1


class Preempted(RunStopped):
    """A stop signal or the time budget ended the run after a committed checkpoint."""

    exit_code = EXIT_PREEMPTED


class Diverged(RunStopped):
    """Too many consecutive non-finite steps; nothing was saved after the last good checkpoint."""

    exit_code = EXIT_DIVERGED


class StopSignals:
    """While active, SIGTERM and SIGUSR1 set `received` (the signal's name) instead of killing;
    `poll()` also reports a stop file that appeared after the process started.

    The handler only records the signal: saving from inside a handler could interrupt a
    collective half-way. Handlers can only be installed from the main thread; elsewhere (a
    test calling `fit` from a worker thread) the default behaviour is kept.
    """

    def __init__(self, stop_file: str = "", since: Optional[float] = None) -> None:
        self.received: Optional[str] = None
        self._previous: dict[int, object] = {}
        self._stop_file = stop_file
        self._since = _process_start_time() if since is None else since

    def poll(self) -> Optional[str]:
        """Why the run should stop (a signal's name or the stop file), or None. One stat per call."""
        if self.received is None and self._stop_file and _mtime(self._stop_file) >= self._since:
            self.received = f"stop file {self._stop_file}"
        return self.received

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum).name


class TimeBudget:
    """`train.max_minutes` of wall clock, counted from the start of this process.

    At a step boundary the run must stop if the time left would not cover one more step and a
    save, with a 50% margin: both are estimated by the longest seen so far (before the first
    save, a save is assumed to take as long as a step).
    """

    MARGIN = 1.5

    def __init__(self, minutes: float, start: Optional[float] = None):
        self.seconds = minutes * 60.0
        self.start = _process_start_time() if start is None else start

    def exhausted(self, step_s: float, save_s: Optional[float]) -> bool:
        if self.seconds <= 0:
            return False
        left = self.seconds - (time.time() - self.start)
        return left < self.MARGIN * (step_s + (step_s if save_s is None else save_s))


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return float("-inf")


def _process_start_time() -> float:
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # psutil is a DeepSpeed dependency; without it, count from here
        return time.time()


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise OR of `flags` over every rank of the world (one all-reduce MAX).

    The world, not the data-parallel group: a tensor- or pipeline-parallel peer that got a
    signal must stop its whole replica too. Every rank must call this at the same point.
    """
    t = torch.tensor([1.0 if f else 0.0 for f in flags], dtype=torch.float32,
                     device=device if device.type == "cuda" else torch.device("cpu"))  # gloo: host tensors
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.cpu().tolist()]
