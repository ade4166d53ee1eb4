"""The submit helper: the sbatch command it builds, and the layouts it refuses before queueing."""
from __future__ import annotations

import shlex
import subprocess
import sys

from helpers import ROOT, cli_env


def submit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/slurm/submit.py", *args], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=120)


def test_dry_run_prints_the_sbatch_command():
    proc = submit("--config", "configs/gpt-125m.yaml", "--nodes", "4", "--gpus-per-node", "8", "--time", "12:00:00",
                  "--partition", "gpu", "--dry-run", "--", "--optim.lr=3e-4")
    assert proc.returncode == 0, proc.stderr
    cmd = shlex.split(proc.stdout.strip())
    assert cmd[0] == "sbatch" and cmd[-2:] == [str(ROOT / "launch/slurm/train.sbatch"), "--optim.lr=3e-4"]
    for opt in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--time=12:00:00", "--partition=gpu",
                "--signal=B:USR1@120", "--requeue", "--output=runs/gpt-125m/logs/slurm-%j.out",
                "--export=ALL,CONFIG=configs/gpt-125m.yaml,RUN_DIR=runs/gpt-125m,PROCS_PER_NODE=8"):
        assert opt in cmd, (opt, cmd)


def test_a_layout_the_world_cannot_run_is_refused_before_queueing():
    # 2 nodes x 1 rank = world 2 cannot hold tp 4 x pp 1 x dp >= 1
    proc = submit("--config", "configs/tiny.yaml", "--nodes", "2", "--gpus-per-node", "0", "--procs-per-node", "1",
                  "--dry-run", "--", "--parallel.tp=4")
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "world size 2" in proc.stderr and "sbatch" not in proc.stdout


def test_cpu_nodes_need_a_rank_count():
    proc = submit("--config", "configs/tiny.yaml", "--gpus-per-node", "0", "--dry-run")
    assert proc.returncode == 2 and "--procs-per-node" in proc.stderr
