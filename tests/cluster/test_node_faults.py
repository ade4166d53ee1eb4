"""Faults across nodes: two `deepspeed --no_ssh` launchers as two nodes (node_rank 0 and 1 on
127.0.0.1, one rank each), and three faults in a row on one run directory, each at a step:

1. node 0 lost: its launcher, its rank (rank 0, which also serves the rendezvous store) and the
   rank's guardian SIGKILLed together;
2. rank 1 SIGKILLed (its launcher lives on);
3. rank 0 SIGSTOPped: the survivors' collectives time out (exit 76) and its guardian, a process
   beside it, kills it, since on its node nobody else would.

After each fault every process of both nodes is gone within the bound and every committed
checkpoint verifies; the next launch (`--resume auto`) resumes from the newest committed one,
and at the end the per-step losses equal an uninterrupted two-node run's, bit for bit.
"""
from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from helpers import read_metrics
from nodes import HANG_TIMEOUT_S, STEPS, finish, node_processes, rank_of, start_nodes, wait_for_step
from memgpt_dist.train.checkpoint import committed_step_dirs, verify_step_dir
from memgpt_dist.train.heartbeat import GUARDIAN_GRACE_S
from memgpt_dist.train.stopping import EXIT_LOST_RANK

# the slowest path: a stopped rank, killed by its guardian HANG + GRACE after its last step, and
# its launcher's next poll; the others are gone after the collective timeout
ALL_GONE_WITHIN_S = HANG_TIMEOUT_S + GUARDIAN_GRACE_S + 20
EXIT_KILLED = 256 - signal.SIGKILL  # DeepSpeed's launcher exits with its rank's -9 as sys.exit(-9)


@dataclass
class Fault:
    """What one fault did: the launchers' exit codes and output, seconds until every process of
    both nodes was gone, the committed steps after it."""

    codes: list[int]
    outs: list[str]
    gone_s: float
    committed: dict[int, Path]


def inject(data: Path, run: Path, at_step: int, kind: str, *extra: str) -> Fault:
    launchers = start_nodes(data, run, *extra)
    try:
        wait_for_step(run, at_step, launchers)
        # the launchers are this process's children: Popen reaps them (psutil would take their exit codes)
        others = [p for launcher in launchers for p in node_processes(launcher)]
        t0 = time.time()
        if kind == "node 0 lost":
            for p in [psutil.Process(launchers[0].pid), *node_processes(launchers[0])]:
                p.send_signal(signal.SIGKILL)
        elif kind == "SIGKILL rank 1":
            rank_of(launchers[1]).send_signal(signal.SIGKILL)
        elif kind == "SIGSTOP rank 0":
            rank_of(launchers[0]).send_signal(signal.SIGSTOP)
        results = finish(launchers, timeout_s=ALL_GONE_WITHIN_S + 30)
        _, alive = psutil.wait_procs(others, timeout=max(0.1, t0 + ALL_GONE_WITHIN_S + 30 - time.time()))
        gone_s = time.time() - t0
    finally:
        for launcher in launchers:  # never leave a stopped rank behind, even when the test fails
            if launcher.poll() is None:
                for p in [*node_processes(launcher), psutil.Process(launcher.pid)]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        p.kill()
    assert not alive, f"{kind}: still running {gone_s:.0f}s later: {alive}"
    print(f"{kind} at step {at_step}: every process of both nodes gone after {gone_s:.1f}s; launchers exited "
          f"{[c for c, _ in results]}")
    return Fault([c for c, _ in results], [o for _, o in results], gone_s, committed_step_dirs(run / "checkpoints"))


@pytest.fixture(scope="module")
def faults(tiny_data, tmp_path_factory) -> tuple[Path, dict[str, Fault], list[tuple[int, str]]]:
    """The three faults in a row, each launch resuming the last; then a launch to the end."""
    run = tmp_path_factory.mktemp("faults") / "run"
    done = {"node 0 lost": inject(tiny_data, run, 3, "node 0 lost")}
    done["SIGKILL rank 1"] = inject(tiny_data, run, 5, "SIGKILL rank 1", "--resume", "auto")
    done["SIGSTOP rank 0"] = inject(tiny_data, run, 7, "SIGSTOP rank 0", "--resume", "auto")
    last = finish(start_nodes(tiny_data, run, "--resume", "auto"))
    return run, done, last


def resumed_at(out: str, run: Path) -> int:
    line = next(x for x in out.splitlines() if f"resumed from {run / 'checkpoints'} at step" in x)
    return int(line.split(" at step ")[1].split()[0])


@pytest.mark.parametrize("kind", ["node 0 lost", "SIGKILL rank 1", "SIGSTOP rank 0"])
def test_every_process_is_gone_within_the_bound_and_no_checkpoint_is_damaged(faults, kind):
    run, done, _ = faults
    fault = done[kind]
    assert fault.gone_s < ALL_GONE_WITHIN_S, fault
    assert all(code != 0 for code in fault.codes), fault.codes
    assert fault.committed, f"{kind}: no checkpoint was committed before the fault"
    for step, path in fault.committed.items():
        assert verify_step_dir(path) is None, f"{path} damaged by {kind}"


def test_the_survivors_exit_76_naming_the_lost_rank(faults):
    _, done, _ = faults
    survivor = done["node 0 lost"].outs[1]  # node 1: its peer and the rendezvous store vanished
    assert done["node 0 lost"].codes[1] == EXIT_LOST_RANK, survivor[-3000:]
    assert "a peer rank died or hung" in survivor or "lost or hung" in survivor, survivor[-3000:]
    assert done["SIGKILL rank 1"].codes == [EXIT_LOST_RANK, EXIT_KILLED], done["SIGKILL rank 1"].outs[0][-3000:]
    stopped = done["SIGSTOP rank 0"]
    assert stopped.codes == [EXIT_KILLED, EXIT_LOST_RANK], stopped.outs[1][-3000:]
    assert "guardian of rank 0" in stopped.outs[0] and "killing it with SIGKILL" in stopped.outs[0]
    assert "rank 0 (its rendezvous store" in stopped.outs[1], stopped.outs[1][-3000:]  # named by rank 1


def test_each_launch_resumes_from_the_newest_committed_checkpoint(faults):
    run, done, last = faults
    launches = [done["SIGKILL rank 1"], done["SIGSTOP rank 0"]]
    before = [done["node 0 lost"], *launches]
    for fault, out in zip(before, [launches[0].outs[0], launches[1].outs[0], last[0][1]]):
        assert resumed_at(out, run) == max(fault.committed)


def test_the_losses_equal_the_uninterrupted_run(faults, two_node_reference):
    run, _, last = faults
    for code, out in last:
        assert code == 0, out[-3000:]
    after, reference = read_metrics(run), read_metrics(two_node_reference)
    assert [after[s]["train/loss"] for s in range(1, STEPS + 1)] == \
        [reference[s]["train/loss"] for s in range(1, STEPS + 1)]
