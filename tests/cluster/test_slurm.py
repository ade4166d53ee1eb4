"""The real job script on a real two-node Slurm cluster: a two-node training job, and a
preemption drill (USR1 -> committed checkpoint -> requeue -> resume) that must reproduce the
uninterrupted run's losses exactly."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT

STEPS = 24


def overrides(data: Path) -> list[str]:
    return [f"--data.path={data}", "--model.vocab_size=320", "--model.n_embd=64", "--model.segment_len=16",
            "--data.n_segments=3", "--train.eval_every=0", "--log.every=1", "--optim.warmup_steps=2",
            f"--train.max_steps={STEPS}", "--checkpoint.every=100"]


def submit(env: dict, data: Path, run_dir: Path, name: str) -> str:
    """Submit through the submit helper: 2 CPU nodes x 1 rank, the tiny config."""
    proc = subprocess.run([sys.executable, "launch/slurm/submit.py", "--config", "configs/tiny.yaml", "--nodes", "2",
                           "--gpus-per-node", "0", "--procs-per-node", "1", "--time", "15", "--job-name", name,
                           "--run-dir", str(run_dir), "--", *overrides(data)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return re.search(r"submitted job (\d+)", proc.stdout).group(1)


def job_info(env: dict, job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_for(env: dict, job: str, done, timeout_s: float, what: str) -> dict[str, str]:
    deadline = time.time() + timeout_s
    info: dict[str, str] = {}
    while time.time() < deadline:
        info = job_info(env, job)
        if done(info):
            return info
        if info.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            break
        time.sleep(1)
    raise AssertionError(f"job {job}: gave up waiting for {what}; last state {info}")


def wait_done(env: dict, job: str, run_dir: Path, timeout_s: float = 600) -> dict[str, str]:
    try:
        info = wait_for(env, job, lambda i: i.get("JobState") == "COMPLETED", timeout_s, "COMPLETED")
    except AssertionError as e:
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((run_dir / "logs").glob("*")))
        raise AssertionError(f"{e}\n{logs}") from None
    return info


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def tensorboard_losses(run_dir: Path) -> list[tuple[int, float]]:
    """train/loss as TensorBoard shows it, read with tensorboard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("train/loss")]


@pytest.fixture(scope="module")
def reference(slurm_env, tiny_data, tmp_path_factory) -> Path:
    """One uninterrupted two-node job; returns its run directory."""
    run_dir = tmp_path_factory.mktemp("slurm_reference")
    job = submit(slurm_env, tiny_data, run_dir, "reference")
    info = wait_done(slurm_env, job, run_dir)
    assert info["Restarts"] == "0"
    return run_dir


def test_two_node_job(reference):
    run_dir = reference
    # both nodes ran a launcher and together made one world of 2 ranks
    node_logs = sorted((run_dir / "logs").glob("node*-job*-restart0.log"))
    assert len(node_logs) == 2, node_logs
    for node_rank, log in enumerate(node_logs):
        text = log.read_text()
        assert "nnodes=2" in text and f"node_rank={node_rank}" in text and "dist_world_size=2" in text
    assert "world size 2 = dp 2 x tp 1 x pp 1" in (run_dir / "train.log").read_text()
    # a committed checkpoint of the last step
    marker = run_dir / "checkpoints" / f"step_{STEPS:08d}" / "COMMITTED.json"
    assert marker.is_file()
    assert json.loads(marker.read_text())["step"] == STEPS
    # TensorBoard's reader sees every step once, with the logged values
    jsonl = losses(run_dir)
    tb = tensorboard_losses(run_dir)
    assert [s for s, _ in tb] == list(range(1, STEPS + 1))
    for step, value in tb:
        assert value == pytest.approx(jsonl[step], rel=1e-6)  # TensorBoard stores float32


@pytest.mark.parametrize("target", ["--batch", "--full"])
def test_preemption_drill(slurm_env, tiny_data, tmp_path, reference, target):
    """--batch: only the batch shell gets USR1 (as with --signal=B:USR1@T) and touches the stop
    file; --full: every process gets it, the launchers ignore it and the ranks catch it."""
    run_dir = tmp_path / "drill"
    job = submit(slurm_env, tiny_data, run_dir, "drill")
    metrics = run_dir / "metrics.jsonl"
    wait_for(slurm_env, job, lambda i: metrics.is_file() and len(metrics.read_text().splitlines()) >= 4, 300,
             "step 4")
    subprocess.run(["scancel", "--signal=USR1", target, job], env=slurm_env, check=True)
    # the job saves, exits 75 and requeues itself: it comes back pending with one restart
    # (the test cluster's credentials expire after 10 s, so Slurm restarts it that soon)
    wait_for(slurm_env, job, lambda i: i.get("Restarts") == "1", 300, "the requeue")
    wait_done(slurm_env, job, run_dir)

    out = (run_dir / "logs" / f"slurm-{job}.out").read_text()
    assert "USR1: asking the ranks to save and stop" in out
    assert "training step exited with 75" in out and f"requeueing job {job}" in out
    assert "restart 1] run complete" in out
    ranks_saw = "stop file" if target == "--batch" else "SIGUSR1 received"
    node_logs = [p.read_text() for p in (run_dir / "logs").glob("node*-restart0.log")]
    assert len(node_logs) == 2 and any(ranks_saw in text for text in node_logs)
    # the stop left a committed checkpoint before the end, and the second incarnation resumed from it
    steps = sorted(int(p.parent.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*/COMMITTED.json"))
    assert steps[-1] == STEPS and steps[0] < STEPS
    assert f"resumed from {run_dir / 'checkpoints'} at step {steps[0]}" in (run_dir / "train.log").read_text()
    # per-step losses equal the uninterrupted run's, bit for bit, across the preemption
    assert losses(run_dir) == losses(reference)
    # and TensorBoard shows one continuous run: every step once, no reset after the resume
    assert [s for s, _ in tensorboard_losses(run_dir)] == list(range(1, STEPS + 1))
