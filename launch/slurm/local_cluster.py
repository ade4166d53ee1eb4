"""A real two-node Slurm cluster on one machine, for trying the job scripts and for the tests.

`python launch/slurm/local_cluster.py up DIR` writes a `slurm.conf` under DIR and starts munged,
slurmctld and one slurmd per node (`slurmd -N nodeK`, each with its own port, spool and log,
`NodeAddr=127.0.0.1`), then waits until the nodes are idle. `export SLURM_CONF=DIR/slurm.conf`
and use `sbatch`, `squeue`, `scontrol` as on any cluster; `... down DIR` stops the daemons by
the process ids recorded in DIR. Needs Slurm and munge (`apt-get install slurm-wlm munge`) and
root, because slurmd starts job steps as the submitting user.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PIDS_FILE = "daemons.json"
# Slurm holds a requeued job back until its previous credential expires (cred_expire, 120 s by
# default; starting it earlier fails with "Job credential revoked"). A short one lets a preempted
# and requeued job come back within seconds on this test cluster.
CRED_EXPIRE_S = 10


@dataclass(frozen=True)
class LocalCluster:
    """Where a local cluster lives and what it is called."""

    root: Path
    nodes: tuple[str, ...] = ("node1", "node2")
    cpus_per_node: int = 2

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment for Slurm client commands (sbatch, squeue, scontrol) of this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def write_config(cluster: LocalCluster) -> None:
    """slurm.conf for a controller and len(nodes) slurmd on 127.0.0.1, each on its own port."""
    root = cluster.root
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ctld_port, *node_ports = _free_ports(1 + len(cluster.nodes))
    host = socket.gethostname()  # slurmctld only runs where SlurmctldHost names this machine
    nodes = "\n".join(f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname={host} Port={p} CPUs={cluster.cpus_per_node} "
                      f"State=UNKNOWN" for n, p in zip(cluster.nodes, node_ports))
    cluster.conf.write_text(f"""\
ClusterName=memgpt-local
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root / 'munge.socket'},cred_expire={CRED_EXPIRE_S}
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}/%n
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'spool'}/slurmd-%n.pid
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log'}/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
{nodes}
PartitionName=debug Nodes={','.join(cluster.nodes)} Default=YES MaxTime=INFINITE State=UP
""")


def _start(cmd: list[str], log: Path) -> int:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True).pid


def install() -> None:
    """apt-get install Slurm and munge if they are missing (Debian/Ubuntu, as root)."""
    if all(shutil.which(b) for b in ("munged", "slurmctld", "slurmd", "sbatch")):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError("Slurm and munge are not installed and this is not a root shell with apt-get: "
                           "install slurm-wlm and munge (apt-get install slurm-wlm munge) and retry")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def up(cluster: LocalCluster, timeout_s: float = 60.0) -> dict[str, int]:
    """Start munged, slurmctld and the slurmd daemons in the foreground of their own sessions;
    returns and records their process ids."""
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(b) is None]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not found: install Slurm and munge "
                           f"(apt-get install slurm-wlm munge)")
    root = cluster.root
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)  # munged refuses a socket directory others can write to
    write_config(cluster)
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    pids = {"munged": _start(["munged", "-F", "--force", f"--socket={root / 'munge.socket'}", f"--key-file={key}",
                              f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'log' / 'munged.log'}",
                              f"--seed-file={root / 'munged.seed'}"], root / "log" / "munged.out")}
    _wait_for(lambda: (root / "munge.socket").exists(), timeout_s, "munged's socket", root)
    env = cluster.env
    os.environ["SLURM_CONF"] = str(cluster.conf)  # the daemons read it from their environment
    pids["slurmctld"] = _start(["slurmctld", "-D", "-i", "-f", str(cluster.conf)], root / "log" / "slurmctld.out")
    for node in cluster.nodes:
        pids[f"slurmd-{node}"] = _start(["slurmd", "-D", "-N", node, "-f", str(cluster.conf)],
                                        root / "log" / f"slurmd-{node}.out")
    (root / PIDS_FILE).write_text(json.dumps(pids))
    _wait_for(lambda: _idle_nodes(env) >= len(cluster.nodes), timeout_s, "the nodes to be idle", root)
    return pids


def _idle_nodes(env: dict[str, str]) -> int:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True)
    return sum(1 for line in out.stdout.splitlines() if line.split()[-1:] == ["idle"])


def _wait_for(ready, timeout_s: float, what: str, root: Path) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if ready():
            return
        time.sleep(0.5)
    logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted((root / "log").glob("*")) if p.is_file())
    raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}; daemon logs:\n{logs}")


def down(cluster: LocalCluster, timeout_s: float = 20.0) -> None:
    """Stop the daemons recorded by `up`, by their process ids (SIGTERM, then SIGKILL)."""
    pids_file = cluster.root / PIDS_FILE
    if not pids_file.is_file():
        return
    pids = json.loads(pids_file.read_text())
    for name in sorted(pids, key=lambda n: n == "munged"):  # munged last: the others talk to it on the way out
        _stop(pids[name], timeout_s)
    pids_file.unlink()


def _stop(pid: int, timeout_s: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:  # not our child (started by another process): poll for it
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("up", "down"))
    p.add_argument("root", type=Path, help="directory for the config, state, spools and logs")
    p.add_argument("--install", action="store_true", help="apt-get install slurm-wlm and munge first if missing")
    args = p.parse_args(argv)
    cluster = LocalCluster(args.root.resolve())
    if args.action == "up":
        if args.install:
            install()
        pids = up(cluster)
        print(f"cluster up: {', '.join(f'{k} {v}' for k, v in pids.items())}\nexport SLURM_CONF={cluster.conf}")
    else:
        down(cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main())
