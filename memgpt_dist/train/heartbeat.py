"""The step heartbeat: a rank that stops finishing steps dumps its stacks and exits, naming the lost peer.

A rank that hangs (SIGSTOP, a deadlock, a dead NFS mount) or waits in a collective for a peer
that will never come would otherwise sit until the process-group timeout, or forever. Every rank
runs a `Watchdog` thread; `HeartbeatCallback` beats it after each step and its callbacks. When no
beat came for `train.hang_timeout_s`, the watchdog

1. logs which rank stopped beating, read from the per-rank liveness records every rank's
   `Publisher` thread keeps in the rendezvous store (the rank whose record stopped moving, or
   whose step is behind; rank 0 itself when its store does not answer);
2. dumps every thread's stack with `faulthandler` to stderr (the launcher's log);
3. ends the process with `EXIT_LOST_RANK` (76), which job scripts requeue like 75.

A thread cannot act when its whole process is stopped or a native call holds the GIL; for that
each rank also starts a `Guardian` (`train.guardian`: a separate stdlib-only process) that
SIGKILLs the rank `GUARDIAN_GRACE_S` after its own watchdog should have fired, so that a stopped
rank on another node than the survivors cannot keep its launcher alive.

The threads never run a collective (only the main thread may: the ranks must enter them in the
same order); they use the store, which is a plain key-value server. Reading it is bounded by a
join timeout, so a stopped rank 0 (the store's server) cannot keep the watchdog from exiting.
"""
from __future__ import annotations

import faulthandler
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from memgpt_dist.parallel.dist import Topology, default_store, is_collective_failure
from memgpt_dist.train.callbacks import Callback
from memgpt_dist.train.stopping import EXIT_LOST_RANK

if TYPE_CHECKING:
    from memgpt_dist.train.callbacks import StepEnd
    from memgpt_dist.train.trainer import Trainer

log = logging.getLogger("memgpt_dist")

PUBLISH_EVERY_S = 1.0
STORE_READ_TIMEOUT_S = 3.0
# the rank's own watchdog reads the store (<= STORE_READ_TIMEOUT_S) and dumps stacks before it
# exits; the guardian kills only a rank that could not do that in this much more time
GUARDIAN_GRACE_S = 15.0
GUARDIAN_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guardian.py")


def _key(rank: int) -> str:
    return f"memgpt/heartbeat/{rank}"


class Publisher(threading.Thread):
    """Writes this rank's liveness record (host, pid, last finished step, wall time) to the store
    every second. A stopped or killed process stops writing; a rank stuck in a collective keeps
    writing but its step stays behind."""

    def __init__(self, store, rank: int, last_step: Callable[[], int]):
        super().__init__(name=f"heartbeat-publisher-rank{rank}", daemon=True)
        self.store, self.rank, self.last_step = store, rank, last_step
        self.stopped = threading.Event()

    def run(self) -> None:
        host, pid = socket.gethostname(), os.getpid()
        while not self.stopped.is_set():
            record = {"host": host, "pid": pid, "step": self.last_step(), "time": time.time()}
            try:
                self.store.set(_key(self.rank), json.dumps(record))
            except Exception:  # the store's server (rank 0) is gone: nothing left to tell
                return
            self.stopped.wait(PUBLISH_EVERY_S)


def read_records(store, world_size: int) -> dict[int, dict[str, Any]]:
    """Every rank's last liveness record found in the store (ranks that never wrote are absent)."""
    out = {}
    for rank in range(world_size):
        try:
            if store.check([_key(rank)]):  # `get` of a missing key would wait for it
                out[rank] = json.loads(store.get(_key(rank)))
        except Exception:
            continue
    return out


def name_lost(records: dict[int, dict[str, Any]], world_size: int, now: float,
              stale_after_s: float = 3 * PUBLISH_EVERY_S) -> list[str]:
    """Which ranks look lost, with why: no record, a record that stopped moving (the process is
    stopped or dead), or a step behind the others' (it hangs inside a step)."""
    newest_step = max((r["step"] for r in records.values()), default=0)
    lost = []
    for rank in range(world_size):
        r = records.get(rank)
        if r is None:
            lost.append(f"rank {rank} (never wrote a heartbeat)")
        elif now - r["time"] > stale_after_s:
            lost.append(f"rank {rank} on host {r['host']} (pid {r['pid']}; silent for {now - r['time']:.0f}s, "
                        f"last finished step {r['step']}: stopped or dead)")
        elif r["step"] < newest_step:
            lost.append(f"rank {rank} on host {r['host']} (pid {r['pid']}; still at step {r['step']}, others "
                        f"finished step {newest_step})")
    return lost


class Watchdog(threading.Thread):
    """Fires `on_hang` when `beat()` was not called for `timeout_s` seconds (see the module docstring)."""

    def __init__(self, timeout_s: float, on_hang: Callable[[float], None]):
        super().__init__(name="heartbeat-watchdog", daemon=True)
        self.timeout_s = timeout_s
        self.on_hang = on_hang
        self.last_beat = time.monotonic()
        self.stopped = threading.Event()

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def run(self) -> None:
        while not self.stopped.wait(min(1.0, self.timeout_s / 4)):
            silent = time.monotonic() - self.last_beat
            if silent > self.timeout_s:
                self.on_hang(silent)
                return


class Guardian:
    """The rank's side of `train.guardian`: starts the process, sends it one byte per beat
    (non-blocking: a full or broken pipe only loses beats), and tells it to stop."""

    def __init__(self, timeout_s: float, rank: int):
        read_end, self.fd = os.pipe()
        self.proc = subprocess.Popen([sys.executable, "-I", "-S", GUARDIAN_PY, str(read_end), str(os.getpid()),
                                      f"{timeout_s:g}", str(rank)], pass_fds=(read_end,), stdin=subprocess.DEVNULL)
        os.close(read_end)
        os.set_blocking(self.fd, False)

    def _send(self, byte: bytes) -> None:
        try:
            os.write(self.fd, byte)
        except OSError:  # BlockingIOError (pipe full: the guardian is slow) or BrokenPipeError (it is gone)
            pass

    def beat(self) -> None:
        self._send(b".")

    def stop(self) -> None:
        from memgpt_dist.train.guardian import STOP

        self._send(STOP)
        os.close(self.fd)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class HeartbeatCallback(Callback):
    """Beats the watchdog after every step and its callbacks (last in the order, so a save or a
    validation counts towards the step it follows); starts and stops the threads with `fit`."""

    def __init__(self, hang_timeout_s: float, exit: Callable[[int], None] = os._exit):
        self.hang_timeout_s = hang_timeout_s
        self.exit = exit  # tests replace it; the real one cannot be caught, which is the point
        self.watchdog: Optional[Watchdog] = None
        self.publisher: Optional[Publisher] = None
        self.guardian: Optional[Guardian] = None
        self.step = 0

    def on_fit_start(self, trainer: "Trainer") -> None:
        if self.hang_timeout_s <= 0:
            return
        topo = trainer.topo
        self.step = trainer.state.step
        store = default_store() if topo.world_size > 1 else None
        if store is not None:
            self.publisher = Publisher(store, topo.rank, lambda: self.step)
            self.publisher.start()
        self.watchdog = Watchdog(self.hang_timeout_s, lambda silent: self._hang(topo, store, silent))
        self.watchdog.start()
        self.guardian = Guardian(self.hang_timeout_s + GUARDIAN_GRACE_S, topo.rank)

    def on_step_end(self, trainer: "Trainer", end: "StepEnd", flags: list[bool]) -> None:
        self.step = trainer.state.step
        if self.watchdog is not None:
            self.watchdog.beat()
        if self.guardian is not None:
            self.guardian.beat()

    def on_fit_error(self, trainer: "Trainer", exc: Exception) -> None:
        """A collective failed (a peer's connection closed, or `parallel.collective_timeout_s`
        passed): say which rank is lost, as far as the heartbeats tell."""
        if self.publisher is None or not is_collective_failure(exc):
            return
        lost = _lost_ranks(self.publisher.store, trainer.topo.world_size)
        log.error("rank %d on host %s: a collective failed after step %d (%s); lost or hung: %s", trainer.topo.rank,
                  socket.gethostname(), self.step, str(exc).splitlines()[0][:300],
                  "; ".join(lost) or "no rank identified (all heartbeats current)")

    def close(self, trainer: "Trainer") -> None:
        for thread in (self.watchdog, self.publisher):
            if thread is not None:
                thread.stopped.set()
        if self.guardian is not None:
            self.guardian.stop()
        self.watchdog = self.publisher = self.guardian = None

    def _hang(self, topo: Topology, store, silent: float) -> None:
        lost = _lost_ranks(store, topo.world_size) if store is not None else ["(one process: no peers)"]
        msg = (f"rank {topo.rank} on host {socket.gethostname()}: no step finished for {silent:.0f}s "
               f"(train.hang_timeout_s={self.hang_timeout_s:g}; last finished step {self.step}); lost or hung: "
               f"{'; '.join(lost) or 'no rank identified (all heartbeats current)'}. Dumping every thread's stack, "
               f"then exiting with code {EXIT_LOST_RANK}: requeue with --resume auto")
        log.error(msg)
        print(f"error: {msg}", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        for handler in logging.getLogger().handlers + log.handlers:
            handler.flush()
        self.exit(EXIT_LOST_RANK)


def _lost_ranks(store, world_size: int) -> list[str]:
    """`name_lost` of the store's records, read in a thread bounded by a timeout: the store's
    server is rank 0, and a stopped rank 0 answers nobody."""
    box: dict[str, Any] = {}
    reader = threading.Thread(target=lambda: box.update(records=read_records(store, world_size)), daemon=True)
    reader.start()
    reader.join(STORE_READ_TIMEOUT_S)
    if "records" not in box:
        return [f"rank 0 (its rendezvous store at {os.environ.get('MASTER_ADDR', '?')}:"
                f"{os.environ.get('MASTER_PORT', '?')} does not answer: stopped or dead)"]
    return name_lost(box["records"], world_size, time.time())
