"""Crash safety through the real CLI (one process): SIGKILL during saves, a damaged newest
checkpoint, a write failure during a save. The 20+ point version is tests/stress/kill_during_save.py."""
from __future__ import annotations

import random
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, cli_env, read_metrics, run_cmd
from stress.kill_during_save import MAX_STEPS, compare, committed, damaged, reference_run, run_chains, train_args, \
    train_cmd


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("kill") / "reference"
    metrics, save_s = reference_run(tiny_data, run_dir, nproc=1)
    return run_dir, metrics, save_s


def test_sigkill_during_saves_resumes_from_newest_committed_and_matches(tiny_data, reference, tmp_path):
    _, metrics, save_s = reference
    kills = run_chains(tiny_data, tmp_path, points=3, nproc=1, seed=random.randrange(10**6), reference=metrics,
                       save_s=save_s, say=lambda line: None)
    assert len(kills) == 3  # each restart was checked against the newest committed step, the end bitwise


def resume(tiny_data, run_dir, *extra, wrap=lambda cmd: cmd) -> subprocess.CompletedProcess:
    return subprocess.run(wrap(train_cmd(train_args(tiny_data, run_dir, "--resume", "auto", *extra), 1)), cwd=ROOT,
                          env=cli_env(), capture_output=True, text=True, timeout=600)


def test_damaged_newest_checkpoint_is_refused_by_name_and_resume_falls_back(tiny_data, reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    newest = run_dir / "checkpoints" / f"step_{MAX_STEPS:08d}"
    optim = next(newest.glob("*optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[: optim.stat().st_size // 2])
    proc = resume(tiny_data, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"refusing checkpoint {newest}: {optim} has" in proc.stdout and "(truncated?)" in proc.stdout
    assert f"at step {MAX_STEPS - 2} " in proc.stdout  # resumed from the previous committed one
    compare(read_metrics(run_dir), reference[1])  # and retrained the last steps identically
    assert committed(run_dir / "checkpoints")[-1] == MAX_STEPS and not damaged(run_dir / "checkpoints", MAX_STEPS)
    assert any(".superseded-" in p.name for p in (run_dir / "checkpoints").iterdir())  # kept, out of the way


# Sets the limit, then execs the command: an ignored SIGXFSZ and the rlimit survive exec. Not a
# preexec_fn: that makes subprocess fork() the whole pytest process instead of vfork, and late in
# the suite (torch, DeepSpeed, gloo mapped) the kernel's overcommit check refuses that fork (ENOMEM).
FSIZE_SHIM = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "n = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_FSIZE, (n, n)); "
              "os.execv(sys.argv[2], sys.argv[2:])")


def limit_file_size(cmd: list[str], limit: int = 256 * 1024) -> list[str]:
    """A real write failure from the kernel in the middle of torch.save: files may not grow past
    256 KiB (EFBIG, the same failure path as a full disk), small logs are unaffected."""
    return [sys.executable, "-c", FSIZE_SHIM, str(limit), *cmd]


def build_deepspeed_comm_op() -> None:
    """DeepSpeed compiles its CPU shm-comm op on first use; under the file-size limit the
    compiler's own output would fail instead of the checkpoint write, so build it first."""
    run_cmd([sys.executable, "-c", "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()"])


def test_write_failure_during_save_names_the_directory_and_keeps_the_previous(tiny_data, reference, tmp_path):
    build_deepspeed_comm_op()
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    proc = resume(tiny_data, run_dir, f"--train.max_steps={MAX_STEPS + 2}", wrap=limit_file_size)
    failed = run_dir / "checkpoints" / f"step_{MAX_STEPS + 2:08d}"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: could not write checkpoint {failed}" in proc.stderr
    assert f"previous checkpoint {run_dir / 'checkpoints' / f'step_{MAX_STEPS:08d}'} is untouched" in proc.stderr
    assert committed(run_dir / "checkpoints") == [MAX_STEPS - 2, MAX_STEPS]
    assert not damaged(run_dir / "checkpoints", MAX_STEPS)
