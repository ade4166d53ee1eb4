"""Preemption: SIGTERM/SIGUSR1 set a flag that every rank agrees on at the next step boundary;
the run saves a committed checkpoint and exits with EXIT_PREEMPTED (75), and a resume continues
with the losses of an uninterrupted run. `train.max_minutes` stops the same way."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import ROOT, bin_path, cli_env, free_port, read_metrics, tiny_args, train
from inprocess import make_trainer
from memgpt_dist.parallel.dist import init_distributed
from memgpt_dist.train.stopping import EXIT_PREEMPTED, Preempted, StopSignals, TimeBudget


@pytest.fixture(scope="module")
def topo():
    return init_distributed()


def test_signals_set_a_flag_and_handlers_are_restored():
    previous = signal.getsignal(signal.SIGUSR1)
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received in ("SIGUSR1", "SIGTERM")  # the process is still alive
    assert signal.getsignal(signal.SIGUSR1) is previous


def test_time_budget_leaves_room_for_a_step_and_a_save():
    now = time.time()
    assert not TimeBudget(0.0, start=now - 10**6).exhausted(1.0, 1.0)  # 0: no budget
    assert not TimeBudget(1.0, start=now).exhausted(step_s=10.0, save_s=5.0)  # 60 s left > 1.5 * 15 s
    assert TimeBudget(1.0, start=now - 40).exhausted(step_s=10.0, save_s=5.0)  # 20 s left < 22.5 s
    assert TimeBudget(1.0, start=now - 40).exhausted(step_s=10.0, save_s=None)  # a save costs a step: 30 s


def losses_of(trainer, stop_after=None) -> list[float]:
    out = []
    step = trainer.train_step

    def recording():
        r = step()
        out.append(r.loss)
        return r

    trainer.train_step = recording
    try:
        trainer.fit(stop_after)
    finally:
        trainer.train_step = step
    return out


def test_signal_saves_stops_and_resumes_exactly(topo, tmp_path):
    full = losses_of(make_trainer(topo, tmp_path / "full"))
    t = make_trainer(topo, tmp_path / "run")
    step = t.train_step

    def signalled_at_4():
        r = step()
        if t.state.step == 4:
            os.kill(os.getpid(), signal.SIGUSR1)
        return r

    t.train_step = signalled_at_4
    with pytest.raises(Preempted, match=r"stopped at step 4 \(SIGUSR1 received\)") as err:
        t.fit()
    assert err.value.exit_code == EXIT_PREEMPTED == 75
    assert t.checkpointer.committed_steps() == [4] and t.checkpointer.verify(4) is None
    resumed = make_trainer(topo, tmp_path / "run", seed=2)
    resumed.restore(4)
    assert losses_of(resumed) == full[4:]


def test_time_budget_saves_and_stops(topo, tmp_path):
    t = make_trainer(topo, tmp_path, extra=("train.max_minutes=0.0001",))  # 6 ms: over after the first step
    with pytest.raises(Preempted, match="time budget train.max_minutes=0.0001"):
        t.fit()
    assert t.state.step == 1 and t.checkpointer.committed_steps() == [1]


# ---------------------------------------------------------------- two ranks, real launcher

def rank_processes(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    """The training ranks the deepspeed launcher started, by their --local_rank."""
    out = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        for arg in child.cmdline():
            if arg.startswith("--local_rank="):
                out[int(arg.split("=")[1])] = child
    return out


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and any(r >= step for r in read_metrics(run_dir)):
            return
        time.sleep(0.01)
    raise AssertionError(f"run did not reach step {step}; exit code {proc.poll()}")


def test_sigterm_to_one_rank_stops_both_with_a_checkpoint_and_resume_matches(tiny_data, tmp_path):
    args = ("--train.max_steps=30", "--checkpoint.every=0", "--train.eval_every=0")
    full, run = tmp_path / "full", tmp_path / "run"
    train(tiny_args(tiny_data, full, *args), nproc=2)
    cmd = [bin_path("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
           *tiny_args(tiny_data, run, *args)]
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    wait_for_step(run, 2, launcher)
    rank_processes(launcher)[1].send_signal(signal.SIGTERM)  # only rank 1 gets it
    out, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == EXIT_PREEMPTED, out[-3000:]
    stopped = max(read_metrics(run))
    assert 2 <= stopped < 30 and "a stop signal on another rank" in out and "SIGTERM received" in out
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == [f"step_{stopped:08d}"] and (run / "checkpoints" / ckpts[0] / "COMMITTED.json").is_file()
    train(tiny_args(tiny_data, run, *args, "--resume", "auto"), nproc=2)
    a, b = read_metrics(full), read_metrics(run)
    assert [b[s]["train/loss"] for s in range(1, 31)] == [a[s]["train/loss"] for s in range(1, 31)]
    assert [b[s]["train/grad_norm"] for s in range(1, 31)] == [a[s]["train/grad_norm"] for s in range(1, 31)]
