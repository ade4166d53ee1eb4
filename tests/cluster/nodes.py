"""Two `deepspeed --no_ssh` launchers as two nodes on this machine (node_rank 0 and 1, one rank
each, rendezvous on 127.0.0.1), and the config the fault tests share (tests/cluster/test_node_faults.py,
test_slurm_faults.py; their uninterrupted reference is conftest's `two_node_reference`)."""
from __future__ import annotations

import time
import subprocess
from pathlib import Path

import psutil

from helpers import ROOT, bin_path, cli_env, free_port, read_metrics

COLLECTIVE_TIMEOUT_S = 5
HANG_TIMEOUT_S = 10
STEPS = 12  # room after the first requeue for the node loss to land mid-run (test_slurm_faults)
OVERRIDES = ("--model.vocab_size=320", "--model.n_embd=64", "--model.segment_len=16", "--data.n_segments=3",
             "--train.eval_every=0", "--log.every=1", "--optim.warmup_steps=2", f"--train.max_steps={STEPS}",
             "--checkpoint.every=2", "--checkpoint.keep_last=10",
             f"--parallel.collective_timeout_s={COLLECTIVE_TIMEOUT_S}", f"--train.hang_timeout_s={HANG_TIMEOUT_S}")


def fault_args(data: Path, run: Path, *extra: str) -> list[str]:
    return ["--config", "configs/tiny.yaml", f"--run_dir={run}", f"--data.path={data}", *OVERRIDES, *extra]


def start_nodes(data: Path, run: Path, *extra: str) -> list[subprocess.Popen]:
    """One launcher per node of a two-node hostfile; each writes its output to a file beside the
    run directory (`.log_path`), so that neither blocks on a full pipe."""
    launch = len(list(run.parent.glob(f"{run.name}-launch*-node0.log")))
    hostfile = run.parent / f"{run.name}-hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = free_port()
    launchers = []
    for node in (0, 1):
        log_path = run.parent / f"{run.name}-launch{launch}-node{node}.log"
        with open(log_path, "w") as out:
            p = subprocess.Popen([bin_path("deepspeed"), "--no_ssh", f"--node_rank={node}", f"--hostfile={hostfile}",
                                  "--master_addr=127.0.0.1", f"--master_port={port}", "launch/train.py",
                                  *fault_args(data, run, *extra)],
                                 cwd=ROOT, env=cli_env(), stdout=out, stderr=subprocess.STDOUT, text=True)
        p.log_path = log_path
        launchers.append(p)
    return launchers


def finish(launchers: list[subprocess.Popen], timeout_s: float = 400) -> list[tuple[int, str]]:
    """(exit code, output) of each launcher once it has ended."""
    deadline = time.time() + timeout_s
    codes = [p.wait(timeout=max(0.1, deadline - time.time())) for p in launchers]
    return [(code, p.log_path.read_text()) for code, p in zip(codes, launchers)]


def node_processes(launcher: subprocess.Popen) -> list[psutil.Process]:
    """What runs under a node's launcher: DeepSpeed's launch process, the rank, its guardian."""
    return psutil.Process(launcher.pid).children(recursive=True)


def rank_of(launcher: subprocess.Popen) -> psutil.Process:
    return next(p for p in node_processes(launcher) if any(a.startswith("--local_rank=") for a in p.cmdline()))


def wait_for_step(run: Path, step: int, launchers: list[subprocess.Popen], timeout_s: float = 400) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline and all(p.poll() is None for p in launchers):
        if (run / "metrics.jsonl").is_file() and any(s >= step for s in read_metrics(run)):
            return
        time.sleep(0.02)
    outs = "\n".join(p.log_path.read_text()[-3000:] for p in launchers)
    raise AssertionError(f"the run did not reach step {step}\n{outs}")
