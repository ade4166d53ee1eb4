"""Checks before training on a cluster: the rendezvous is reachable, and every rank runs the same
code on the same config and data.

On a multi-node job each node has its own checkout, virtualenv and view of the data; a node with a
stale checkout or a half-synced corpus would otherwise train silently on something else, or fail
hours later in a collective. `wait_for_master` turns an unreachable rendezvous into an error that
names the address instead of a 30-minute store timeout; `check_same_everywhere` all-gathers a
fingerprint of each rank's code, config and data and names the ranks and hosts that differ.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from memgpt_dist.config import ConfigError, TrainConfig

# the packages whose source decides what a rank computes
CODE_PACKAGES = ("memgpt_dist", "data_pipeline", "launch")


@dataclass(frozen=True)
class Fingerprint:
    """What must be identical on every rank (sha256 prefixes), and where the rank runs."""

    code: str
    config: str
    data: str
    host: str

    def differences(self, other: "Fingerprint") -> list[str]:
        return [k for k in ("code", "config", "data") if getattr(self, k) != getattr(other, k)]


def code_hash(root: Optional[Path] = None) -> str:
    """sha256 over the project's Python sources (relative path and bytes, in path order): the
    same on every node exactly when the code is, with or without a git checkout."""
    root = root or Path(__file__).resolve().parents[2]
    h = hashlib.sha256()
    for package in CODE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def fingerprint(cfg: TrainConfig, data: str) -> Fingerprint:
    """`data`: a digest of the corpora's manifests (`data_pipeline.loaders.corpus_fingerprint`)."""
    return Fingerprint(code=code_hash(), config=hashlib.sha256(cfg.to_json().encode()).hexdigest()[:16],
                       data=data, host=socket.gethostname())


def check_same_everywhere(cfg: TrainConfig, data: str = "", mine: Optional[Fingerprint] = None) -> None:
    """All-gather every rank's fingerprint; raise ConfigError on every rank if any differs from
    rank 0's, naming the ranks, their hosts and what differs. Call on every rank."""
    mine = mine or fingerprint(cfg, data)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, asdict(mine))
    prints = [Fingerprint(**g) for g in gathered]
    problems = [f"rank {r} on {p.host}: {', '.join(p.differences(prints[0]))}"
                for r, p in enumerate(prints) if p.differences(prints[0])]
    if problems:
        raise ConfigError(f"the ranks do not all run the same code, config and data as rank 0 (on {prints[0].host}): "
                          f"{'; '.join(problems)}. Sync the checkout (git pull / reinstall), the config and the "
                          f"corpus (compare data.path/manifest.json) on those nodes and relaunch. Fingerprints: "
                          f"{json.dumps(gathered)}")


def wait_for_master(timeout_s: float, env: Optional[dict] = None) -> None:
    """On ranks other than 0, wait until MASTER_ADDR:MASTER_PORT accepts a TCP connection (rank 0
    opens it in init_process_group) and raise a clear error after `timeout_s`."""
    env = os.environ if env is None else env
    if int(env.get("RANK", "0")) == 0 or "MASTER_ADDR" not in env:
        return
    addr, port = env["MASTER_ADDR"], int(env.get("MASTER_PORT", "29500"))
    deadline = time.time() + timeout_s
    last: Optional[OSError] = None
    while time.time() < deadline:
        try:
            with socket.create_connection((addr, port), timeout=5):
                return
        except OSError as e:  # not listening yet, or unreachable: retry until the deadline
            last = e
            time.sleep(1.0)
    raise ConfigError(f"rank {env.get('RANK')} on {socket.gethostname()} could not reach the rendezvous "
                      f"MASTER_ADDR={addr} MASTER_PORT={port} within {timeout_s:.0f} s ({last}); check that rank 0's "
                      f"node started, that the address is reachable from this node and the port is open")


def check_before_deepspeed(cfg: TrainConfig, world_size: int) -> None:
    """The layout at this world size and the run directory; raises ConfigError naming what to change."""
    from memgpt_dist.parallel.layout import require_executable_layout

    require_executable_layout(cfg, world_size)
    check_run_dir(Path(cfg.run_dir))


def check_run_dir(run_dir: Path) -> None:
    """`run_dir` is a directory this process can write, or can be created."""
    existing = next((p for p in (run_dir, *run_dir.parents) if p.exists()), None)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir={run_dir} is a file; set run_dir to a directory (it holds config, logs, "
                          f"checkpoints)")
    if existing is not None and not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise ConfigError(f"run_dir={run_dir}: {existing} is not a writable directory; choose a run_dir "
                          f"under a directory you can write")
