"""Submit a training run to Slurm: fills in nodes, GPUs, config and time limit for
`launch/slurm/train.sbatch`, and checks the config and layout before anything is queued.

    python launch/slurm/submit.py --config configs/gpt-125m.yaml --nodes 4 --gpus-per-node 8 \\
        --time 24:00:00 --partition gpu -- --optim.lr=3e-4

The run directory (default runs/<job name>) holds the checkpoints, TensorBoard events and logs of
every job of the run, so a resubmission with the same --run-dir continues it (--resume auto).
`--dry-run` prints the sbatch command instead of running it. Run from the repository root.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

SBATCH_SCRIPT = Path(__file__).resolve().with_name("train.sbatch")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML file from configs/")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs to request per node (0 on CPU nodes)")
    p.add_argument("--procs-per-node", type=int, default=None,
                   help="ranks per node (default: --gpus-per-node; required with --gpus-per-node 0)")
    p.add_argument("--time", default="24:00:00", help="time limit, as sbatch --time takes it")
    p.add_argument("--signal-seconds", type=int, default=120,
                   help="Slurm warns the job this many seconds before the time limit; the run saves and requeues")
    p.add_argument("--job-name", default=None, help="default: the config's file name")
    p.add_argument("--run-dir", default=None, help="default: runs/<job name>")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--no-requeue", action="store_true", help="do not requeue after a preemption save")
    p.add_argument("--sbatch-arg", action="append", default=[], help="extra sbatch option (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch command, do not submit")
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="-- then config overrides (--section.key=value)")
    return p.parse_args(argv)


def sbatch_command(args) -> list[str]:
    """The sbatch command line for `args` (validated by `check`)."""
    name = args.job_name or Path(args.config).stem
    run_dir = args.run_dir or f"runs/{name}"
    procs = args.procs_per_node or args.gpus_per_node
    cmd = ["sbatch", "--parsable", f"--job-name={name}", f"--nodes={args.nodes}", "--ntasks-per-node=1",
           f"--time={args.time}", f"--signal=B:USR1@{args.signal_seconds}",
           f"--output={run_dir}/logs/slurm-%j.out",
           f"--export=ALL,CONFIG={args.config},RUN_DIR={run_dir},PROCS_PER_NODE={procs}"]
    cmd.append("--no-requeue" if args.no_requeue else "--requeue")
    if args.gpus_per_node:
        cmd.append(f"--gpus-per-node={args.gpus_per_node}")
    if args.partition:
        cmd.append(f"--partition={args.partition}")
    if args.account:
        cmd.append(f"--account={args.account}")
    return cmd + list(args.sbatch_arg) + [str(SBATCH_SCRIPT)] + _overrides(args)


def _overrides(args) -> list[str]:
    return [o for o in args.overrides if o != "--"]


def check(args) -> None:
    """Refuse what would only fail in the queue: a bad config, or a layout that the world size
    (nodes x ranks per node) cannot run. Raises ConfigError with what to change."""
    from memgpt_dist.config import ConfigError, load_config
    from memgpt_dist.parallel.layout import require_executable_layout

    if args.nodes < 1:
        raise ConfigError("--nodes must be >= 1")
    procs = args.procs_per_node or args.gpus_per_node
    if procs < 1:
        raise ConfigError("--gpus-per-node 0 needs --procs-per-node N (ranks per CPU node)")
    cfg = load_config(args.config, _overrides(args))
    require_executable_layout(cfg, args.nodes * procs)


def main(argv=None) -> int:
    from memgpt_dist.cli import run_cli

    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: _submit(args))


def _submit(args) -> int:
    check(args)
    cmd = sbatch_command(args)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    run_dir = Path(args.run_dir or f"runs/{args.job_name or Path(args.config).stem}")
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)  # sbatch opens --output before the script runs
    job = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().split(";")[0]
    print(f"submitted job {job}: {args.nodes} node(s), run directory {run_dir.resolve()}\n"
          f"  follow:      tail -f {run_dir}/logs/slurm-{job}.out\n"
          f"  TensorBoard: tensorboard --logdir {run_dir}/tensorboard\n"
          f"  preempt now: scancel --signal=USR1 --batch {job}   (saves, requeues, resumes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
