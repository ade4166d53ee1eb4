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


def fake_sbatch(tmp_path, message: str) -> dict:
    """An environment whose `sbatch` refuses every job the way Slurm does (message on stderr, exit 1)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\necho '{message}' >&2\nexit 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    return {**cli_env(), "PATH": f"{bin_dir}:{cli_env()['PATH']}"}


def test_a_failed_sbatch_shows_its_message_and_exits_2(tmp_path):
    env = fake_sbatch(tmp_path, "sbatch: error: Batch job submission failed: Invalid partition name specified")
    proc = subprocess.run([sys.executable, "launch/slurm/submit.py", "--config", "configs/tiny.yaml", "--nodes", "1",
                           "--gpus-per-node", "0", "--procs-per-node", "1", "--partition", "nope",
                           "--run-dir", str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "Invalid partition name specified" in proc.stderr and "--partition=nope" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_prepare_dry_run_prints_the_four_stages(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    proc = submit("prepare", "--tasks", "3", "--cpus-per-task", "8", "--dry-run", "--", str(src), "--out",
                  str(tmp_path / "out"), "--vocab-size", "8000")
    assert proc.returncode == 0, proc.stderr
    cmds = [shlex.split(line) for line in proc.stdout.strip().splitlines()]
    assert [c[c.index(str(ROOT / "launch/slurm/prepare.sbatch")) + 1] for c in cmds] == ["scan", "plan", "encode",
                                                                                          "merge"]
    for c in cmds:
        assert c[0] == "sbatch" and "--cpus-per-task=8" in c and "--kill-on-invalid-dep=yes" in c
        assert c[-6:] == ["--array-tasks", "3", str(src), "--out", str(tmp_path / "out"), "--vocab-size", "8000"][-6:]
    assert "--array=0,1,2" in cmds[0] and "--array=0,1,2" in cmds[2] and not any(x.startswith("--array=") for x in cmds[1])
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_prepare_refuses_an_out_inside_an_input_before_queueing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    proc = submit("prepare", "--tasks", "2", "--", str(src), "--out", str(src / "corpus"))
    assert proc.returncode == 2 and "lies inside the input" in proc.stderr and "Traceback" not in proc.stderr
