"""The run directory's lock: a second run on a locked directory is refused at once (exit 2) naming
the holder; a lock left by a dead process is taken over with a warning."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from helpers import ROOT, cli_env, tiny_args
from memgpt_dist.train.run_lock import LOCK_NAME, RunDirLocked, RunLock

HOLD = """
import sys, time
from memgpt_dist.train.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding tmp_path's lock until the test ends."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_process_is_refused_naming_the_holder(tmp_path, holder):
    with pytest.raises(RunDirLocked, match=rf"in use by pid {holder.pid} on host {socket.gethostname()}"):
        RunLock(tmp_path).acquire()


def test_the_cli_refuses_a_locked_run_dir_at_once_with_exit_2(tmp_path, tiny_data, holder):
    before = sorted(p.name for p in tmp_path.iterdir())
    t0 = time.time()
    proc = subprocess.run([sys.executable, "launch/train.py", *tiny_args(tiny_data, tmp_path)], cwd=ROOT,
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"in use by pid {holder.pid}" in proc.stderr and "pass another --run_dir" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written: no train.log, no config
    assert time.time() - t0 < 120  # refused before any data is read or engine built


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "start_time": 0}))
    with caplog.at_level(logging.WARNING, logger="memgpt_dist"):
        lock = RunLock(tmp_path).acquire()
    try:
        assert f"stale lock" in caplog.text and f"pid {pid}" in caplog.text and f"no process {pid}" in caplog.text
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_a_lock_killed_holder_leaves_is_taken_over(tmp_path, holder):
    holder.kill()
    holder.wait()  # the kernel dropped its lock; its record stays in the file
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_released_lock_can_be_taken_again(tmp_path):
    RunLock(tmp_path).acquire().release()
    with RunLock(tmp_path):
        with pytest.raises(RunDirLocked):  # a second holder in the same process is refused too
            RunLock(tmp_path).acquire()
