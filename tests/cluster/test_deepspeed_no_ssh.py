"""The multi-node `deepspeed --no_ssh` path: one launcher per node (here two on this machine as
two nodes, node_rank 0 and 1) that train together; and the checks that run before training."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, bin_path, cli_env, free_port, tiny_args


def launch_nodes(tmp_path: Path, args_per_node: list[list[str]], timeout: int = 400):
    """Start one `deepspeed --no_ssh` launcher per node of a two-node hostfile; returns
    [(returncode, output)] in node order."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"node{i} slots=1\n" for i in range(len(args_per_node))))
    port = free_port()
    procs = [subprocess.Popen([bin_path("deepspeed"), "--no_ssh", f"--node_rank={rank}", f"--hostfile={hostfile}",
                               "--master_addr=127.0.0.1", f"--master_port={port}", "launch/train.py", *args],
                              cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank, args in enumerate(args_per_node)]
    try:
        return [(p.wait(timeout=timeout), p.stdout.read()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_two_launchers_train_together(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_args(tiny_data, run_dir)
    results = launch_nodes(tmp_path, [args, args])
    for rank, (code, out) in enumerate(results):
        assert code == 0, out[-4000:]
        assert f"node_rank={rank}" in out and "dist_world_size=2" in out
    assert "world size 2 = dp 2 x tp 1 x pp 1" in (run_dir / "train.log").read_text()
    assert json.loads((run_dir / "checkpoints" / "step_00000006" / "COMMITTED.json").read_text())["world_size"] == 2


def test_a_node_with_another_config_is_refused(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    results = launch_nodes(tmp_path, [tiny_args(tiny_data, run_dir), tiny_args(tiny_data, run_dir, "--optim.lr=1e-3")])
    for code, out in results:
        assert code == 2, out[-4000:]
        assert "do not all run the same code, config and data" in out and "rank 1 on" in out and ": config" in out
    assert not (run_dir / "checkpoints").exists()  # refused before anything was written


def test_unreachable_rendezvous_names_the_address(tiny_data, tmp_path):
    port = free_port()  # nobody listens there
    env = {**cli_env(), "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    proc = subprocess.run([sys.executable, "launch/train.py", *tiny_args(tiny_data, tmp_path / "run"),
                           "--rendezvous-timeout", "3"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"could not reach the rendezvous MASTER_ADDR=127.0.0.1 MASTER_PORT={port} within 3 s" in proc.stderr


def test_fingerprints_tell_what_differs(tmp_path):
    from memgpt_dist.parallel.preflight import Fingerprint, code_hash

    for package in ("memgpt_dist", "data_pipeline", "launch"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "a.py").write_text("x = 1\n")
    before = code_hash(tmp_path)
    (tmp_path / "launch" / "a.py").write_text("x = 2\n")
    assert code_hash(tmp_path) != before
    a = Fingerprint(code="c", config="k", data="d", host="h1")
    assert a.differences(Fingerprint(code="c", config="k2", data="d2", host="h2")) == ["config", "data"]
    assert a.differences(Fingerprint(code="c", config="k", data="d", host="h2")) == []
