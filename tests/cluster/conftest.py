"""A real two-node Slurm cluster on this machine for the cluster tests (installed with apt if
missing), started once per session and stopped by its daemons' process ids at the end."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from helpers import cli_env


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    from launch.slurm.local_cluster import LocalCluster, down, install, up

    install()
    # a short path: Slurm and munge keep sockets under it (AF_UNIX paths are limited to 108 bytes)
    cluster = LocalCluster(Path(tmp_path_factory.mktemp("slurm")))
    try:
        up(cluster)
        yield cluster
    finally:
        down(cluster)


@pytest.fixture(scope="session")
def slurm_env(slurm) -> dict[str, str]:
    """What a user's shell has when submitting: the cluster's SLURM_CONF, CPU DeepSpeed, our venv."""
    return {**cli_env(), "SLURM_CONF": str(slurm.conf), "VENV": str(Path(sys.executable).parent.parent),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.fixture(scope="session")
def two_node_reference(tiny_data, tmp_path_factory) -> Path:
    """An uninterrupted run of the fault tests' config on two launchers as two nodes (nodes.py);
    returns its run directory."""
    from nodes import finish, start_nodes

    run = tmp_path_factory.mktemp("two_node_reference") / "run"
    for code, out in finish(start_nodes(tiny_data, run)):
        assert code == 0, out[-3000:]
    return run
