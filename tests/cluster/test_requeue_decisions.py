"""The job script's two decisions, without a cluster: which overrides an elastic restart on
another number of nodes needs (`submit.py elastic-args`), and whether a fault is requeued
(`submit.py fault-requeue`: while the run makes progress, at most --max times in a row without)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, cli_env
from launch.slurm.submit import main as submit_main, parse_args, sbatch_command
from memgpt_dist.config import ConfigError, load_config
from memgpt_dist.train.resume import elastic_overrides

TINY = "configs/tiny.yaml"  # micro_batch_size 4, grad_accum 1


def commit(run_dir: Path, step: int, world_size: int, *overrides: str) -> None:
    """A commit marker as a run on `world_size` ranks with `overrides` writes it (no tensors needed)."""
    step_dir = run_dir / "checkpoints" / f"step_{step:08d}"
    step_dir.mkdir(parents=True)
    cfg = load_config(TINY, list(overrides))
    (step_dir / "COMMITTED.json").write_text(json.dumps({"step": step, "world_size": world_size, "files": {},
                                                         "meta": {"config": cfg.to_json()}}))


def test_two_nodes_to_one_doubles_the_micro_batch_and_keeps_the_global_batch(tmp_path):
    commit(tmp_path, 4, 2)  # dp 2 x micro_batch 4: 8 streams
    overrides, decision = elastic_overrides(load_config(TINY), 1, tmp_path / "checkpoints")
    assert overrides == ["--parallel.micro_batch_size=8"]
    assert "written by 2 ranks" in decision and "8 data streams, grad_accum 1, global batch 8" in decision
    assert "parallel.micro_batch_size 4 -> 8, grad_accum 1 kept" in decision
    # and back on two nodes from the one-node checkpoint: the YAML's own micro-batch again
    commit(tmp_path, 6, 1, "--parallel.micro_batch_size=8")
    assert elastic_overrides(load_config(TINY), 2, tmp_path / "checkpoints") == ([], None)


def test_nothing_changes_without_a_checkpoint_or_on_the_same_layout(tmp_path):
    assert elastic_overrides(load_config(TINY), 1, tmp_path / "checkpoints") == ([], None)
    commit(tmp_path, 2, 2)
    assert elastic_overrides(load_config(TINY), 2, tmp_path / "checkpoints") == ([], None)


def test_grad_accum_returns_to_the_checkpoints_and_a_world_that_cannot_continue_is_refused(tmp_path):
    commit(tmp_path, 2, 2, "--parallel.grad_accum=2")
    assert elastic_overrides(load_config(TINY), 1, tmp_path / "checkpoints")[0] == \
        ["--parallel.micro_batch_size=8", "--parallel.grad_accum=2"]
    with pytest.raises(ConfigError, match=r"3 ranks give dp 3, which does not divide 8"):
        elastic_overrides(load_config(TINY), 3, tmp_path / "checkpoints")


def test_the_job_script_helper_prints_the_overrides_and_the_decision(tmp_path):
    commit(tmp_path, 4, 2)
    proc = subprocess.run([sys.executable, "launch/slurm/submit.py", "elastic-args", "--config", TINY, "--run-dir",
                           str(tmp_path), "--world-size", "1", "--", "--optim.lr=1e-3"], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["--parallel.micro_batch_size=8"]
    assert "elastic restart: checkpoint step_00000004" in proc.stderr


def test_a_node_range_is_submitted_when_every_size_in_it_can_continue(capsys):
    cmd = sbatch_command(parse_args(["--config", TINY, "--nodes", "2", "--min-nodes", "1", "--gpus-per-node", "0",
                                     "--procs-per-node", "1", "--fault-requeues", "5"]))
    assert "--nodes=1-2" in cmd and "--ntasks=2" in cmd and any(c.endswith(",FAULT_REQUEUES=5") for c in cmd)
    # 5 nodes x 1 rank x micro-batch 4 = 20 streams: 4 nodes divide them, 3 do not
    assert submit_main(["--config", TINY, "--nodes", "5", "--min-nodes", "3", "--gpus-per-node", "0",
                        "--procs-per-node", "1", "--dry-run"]) == 2
    assert "on 3 node(s) the data-parallel degree does not divide the run's 20 data streams" in capsys.readouterr().err


def fault_requeue(run_dir: Path, rc: int, capsys, max_in_a_row: int = 2) -> tuple[int, str]:
    code = submit_main(["fault-requeue", "--rc", str(rc), "--run-dir", str(run_dir), "--max", str(max_in_a_row)])
    return code, capsys.readouterr().err


def test_faults_are_requeued_while_the_run_makes_progress(tmp_path, capsys):
    commit(tmp_path, 2, 2)
    assert fault_requeue(tmp_path, 247, capsys)[0] == 0  # a SIGKILLed rank: requeued
    code, says = fault_requeue(tmp_path, 76, capsys)
    assert code == 0 and "requeue 2 of at most 2 in a row" in says
    code, says = fault_requeue(tmp_path, 247, capsys)  # a third time at step 2: an OOM kill that recurs there
    assert code == 1 and "2 requeue(s) in a row have not got past the checkpoint of step 2" in says
    commit(tmp_path, 4, 2)  # progress: the count starts over
    code, says = fault_requeue(tmp_path, 247, capsys)
    assert code == 0 and "step 4" in says and "requeue 1 of" in says


def test_other_exit_codes_are_not_requeued(tmp_path, capsys):
    for rc in (1, 2, 3):
        assert fault_requeue(tmp_path, rc, capsys)[0] == 1
