"""Faults during training: the heartbeat watchdog, and two ranks of which one is killed (SIGKILL) or
stopped (SIGSTOP) at a step. Every process is gone within the bound, no committed checkpoint is
damaged, and `--resume auto` continues from the newest committed one with the losses of an
uninterrupted run."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest

from helpers import ROOT, bin_path, cli_env, free_port, read_metrics, tiny_args, train
from memgpt_dist.train.checkpoint import committed_step_dirs, verify_step_dir
from memgpt_dist.train.heartbeat import HeartbeatCallback, Watchdog, name_lost
from memgpt_dist.train.stopping import EXIT_LOST_RANK
from test_preemption import rank_processes, wait_for_step

COLLECTIVE_TIMEOUT_S = 5
HANG_TIMEOUT_S = 10
# DeepSpeed's launcher, once a rank failed, SIGTERMs the others and SIGKILLs what is left after 30 s
# (a SIGSTOPped rank cannot act on SIGTERM): the slowest path is a timeout plus that grace.
ALL_GONE_WITHIN_S = COLLECTIVE_TIMEOUT_S + 30 + 25
ARGS = ("--train.max_steps=12", "--checkpoint.every=3", "--train.eval_every=0", "--checkpoint.keep_last=10",
        f"--parallel.collective_timeout_s={COLLECTIVE_TIMEOUT_S}", f"--train.hang_timeout_s={HANG_TIMEOUT_S}")


def test_watchdog_fires_only_after_the_timeout_without_a_beat():
    fired = []
    dog = Watchdog(0.4, fired.append)
    dog.start()
    for _ in range(4):  # beats every 0.2 s keep it quiet
        time.sleep(0.2)
        dog.beat()
    assert not fired
    dog.join(timeout=3)
    assert len(fired) == 1 and fired[0] > 0.4


def test_a_hang_dumps_every_threads_stack_and_exits_76(capfd):
    codes = []
    cb = HeartbeatCallback(0.3, exit=codes.append)

    class Topo:
        rank, world_size = 0, 1

    cb._hang(Topo(), None, 1.6)
    err = capfd.readouterr().err
    assert codes == [EXIT_LOST_RANK] == [76]
    assert "rank 0 on host" in err and "no step finished for 2s (train.hang_timeout_s=0.3" in err
    assert "Current thread" in err and "test_a_hang_dumps_every_threads_stack_and_exits_76" in err  # faulthandler


def test_the_lost_rank_is_named_from_the_heartbeats():
    now = 1000.0
    records = {0: {"host": "a", "pid": 1, "step": 7, "time": now - 1},
               1: {"host": "b", "pid": 2, "step": 7, "time": now - 60},  # stopped or dead
               2: {"host": "c", "pid": 3, "step": 6, "time": now}}  # alive, stuck in step 7
    lost = name_lost(records, 4, now)
    assert [x.split(" (")[0] for x in lost] == ["rank 1 on host b", "rank 2 on host c", "rank 3"]
    assert "silent for 60s" in lost[0] and "still at step 6" in lost[1] and "never wrote" in lost[2]


def test_a_failed_collective_exits_76_and_other_errors_still_raise(capsys):
    from memgpt_dist.cli import run_cli

    def gloo_timeout():
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms "
                           "for recv operation to complete")

    assert run_cli(gloo_timeout) == EXIT_LOST_RANK
    assert "a peer rank died or hung" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(lambda: (_ for _ in ()).throw(RuntimeError("a bug")))


GUARDED = """
import time
from memgpt_dist.train.heartbeat import Guardian
stopped = Guardian(1.0, 7)
stopped.stop()  # the run ended: this one must not fire
time.sleep(2.5)
print("alive after a stopped guardian's timeout", flush=True)
guarded = Guardian(1.5, 7)
guarded.beat()
print("ready", flush=True)
time.sleep(120)
"""


def test_the_guardian_kills_a_stopped_rank_and_only_while_guarding():
    proc = subprocess.Popen([sys.executable, "-c", GUARDED], cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("alive after")
        assert proc.stdout.readline() == "ready\n"
        t0 = time.time()
        proc.send_signal(signal.SIGSTOP)  # its own threads cannot run now: only the guardian can end it
        assert proc.wait(timeout=15) == -signal.SIGKILL
        assert time.time() - t0 < 6
        err = proc.stderr.read()
        assert "guardian of rank 7" in err and "killing it with SIGKILL" in err, err
    finally:
        proc.kill()


# ---------------------------------------------------------------- two ranks, real launcher

@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted")
    train(tiny_args(tiny_data, run, *ARGS), nproc=2)
    return read_metrics(run)


def _launch(tiny_data, run):
    cmd = [bin_path("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
           *tiny_args(tiny_data, run, *ARGS)]
    return subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _fault_at_step(tiny_data, run, sig: signal.Signals, step: int = 5):
    """Launch two ranks, send `sig` to rank 1 after `step`; returns (launcher output, exit code,
    seconds from the fault until every process of the run was gone)."""
    launcher = _launch(tiny_data, run)
    wait_for_step(run, step, launcher)
    ranks = rank_processes(launcher)
    procs = [psutil.Process(launcher.pid), *ranks.values()]
    t0 = time.time()
    ranks[1].send_signal(sig)
    out, _ = launcher.communicate(timeout=ALL_GONE_WITHIN_S + 60)
    _, alive = psutil.wait_procs(procs, timeout=max(1.0, ALL_GONE_WITHIN_S - (time.time() - t0)))
    gone_s = time.time() - t0
    for p in alive:  # never leave a stopped rank behind, even when the test fails
        p.kill()
    assert not alive, f"still running {gone_s:.0f}s after {sig.name}: {alive}\n{out[-3000:]}"
    print(f"{sig.name} of rank 1 at step {step}: every process gone after {gone_s:.1f}s, launcher exit "
          f"{launcher.returncode}")
    return out, launcher.returncode, gone_s


def _assert_resumes_like_uninterrupted(tiny_data, run, reference):
    committed = committed_step_dirs(run / "checkpoints")
    assert committed, "no checkpoint was committed before the fault"
    for step, path in committed.items():
        assert verify_step_dir(path) is None, f"{path} damaged by the fault"
    newest = max(committed)
    proc = train(tiny_args(tiny_data, run, *ARGS, "--resume", "auto"), nproc=2)
    assert f"resumed from {run / 'checkpoints'} at step {newest}" in proc.stdout + proc.stderr
    after = read_metrics(run)
    assert [after[s]["train/loss"] for s in range(1, 13)] == [reference[s]["train/loss"] for s in range(1, 13)]


def test_sigkill_of_one_rank_ends_every_process_and_resume_matches(tiny_data, tmp_path, reference):
    out, code, gone_s = _fault_at_step(tiny_data, tmp_path, signal.SIGKILL)
    assert code != 0 and gone_s < ALL_GONE_WITHIN_S
    assert "lost or hung" in out or "a collective failed" in out, out[-3000:]
    _assert_resumes_like_uninterrupted(tiny_data, tmp_path, reference)


def test_sigstop_of_one_rank_ends_every_process_with_76_naming_it(tiny_data, tmp_path, reference):
    out, code, gone_s = _fault_at_step(tiny_data, tmp_path, signal.SIGSTOP)
    assert code == EXIT_LOST_RANK and gone_s < ALL_GONE_WITHIN_S, out[-3000:]
    assert "rank 1 on host" in out and "stopped or dead" in out, out[-3000:]  # named from its silent heartbeat
    _assert_resumes_like_uninterrupted(tiny_data, tmp_path, reference)
