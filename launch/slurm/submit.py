"""Submit a training run to Slurm: fills in nodes, GPUs, config and time limit for
`launch/slurm/train.sbatch`, and checks the config and layout before anything is queued.

    python launch/slurm/submit.py --config configs/gpt-125m.yaml --nodes 4 --gpus-per-node 8 \\
        --time 24:00:00 --partition gpu -- --optim.lr=3e-4

The run directory (default runs/<job name>) holds the checkpoints, TensorBoard events and logs of
every job of the run, so a resubmission with the same --run-dir continues it (--resume auto).
`--dry-run` prints the sbatch command instead of running it. Run from the repository root.

Prepare a corpus as a Slurm job array (launch/slurm/prepare.sbatch; see the README, "Corpora at scale"):

    python launch/slurm/submit.py prepare --tasks 16 --cpus-per-task 8 -- data/*.jsonl --out data/corpus

It checks --out, then submits scan (array) -> plan -> encode (array) -> merge, each after the one
before; resubmitting the same command submits only the tasks that did not finish.
If sbatch fails, its own message is printed and the exit code is 2.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

SBATCH_SCRIPT = Path(__file__).resolve().with_name("train.sbatch")
PREPARE_SCRIPT = Path(__file__).resolve().with_name("prepare.sbatch")


class SbatchError(RuntimeError):
    """sbatch refused a job; the message holds sbatch's own words."""


def run_sbatch(cmd: list[str]) -> str:
    """Submit; returns the job id, or raises SbatchError with sbatch's stderr."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SbatchError(f"sbatch exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}\n"
                          f"  command: {shlex.join(cmd)}")
    return proc.stdout.strip().split(";")[0]


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
    from data_pipeline.errors import DataError
    from memgpt_dist.cli import run_cli

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prepare"]:
        pargs = parse_prepare_args(argv[1:])
        return run_cli(lambda: _submit_prepare(pargs), (DataError, SbatchError))
    args = parse_args(argv)
    return run_cli(lambda: _submit(args), (SbatchError,))


def _submit(args) -> int:
    check(args)
    cmd = sbatch_command(args)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    run_dir = Path(args.run_dir or f"runs/{args.job_name or Path(args.config).stem}")
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)  # sbatch opens --output before the script runs
    job = run_sbatch(cmd)
    print(f"submitted job {job}: {args.nodes} node(s), run directory {run_dir.resolve()}\n"
          f"  follow:      tail -f {run_dir}/logs/slurm-{job}.out\n"
          f"  TensorBoard: tensorboard --logdir {run_dir}/tensorboard\n"
          f"  preempt now: scancel --signal=USR1 --batch {job}   (saves, requeues, resumes)")
    return 0


# ------------------------------------------------------------------ prepare as a job array
def parse_prepare_args(argv):
    p = argparse.ArgumentParser(prog="submit.py prepare", description="memgpt-prepare as a Slurm job array")
    p.add_argument("--tasks", type=int, required=True, help="array tasks of the scan and encode stages")
    p.add_argument("--cpus-per-task", type=int, default=4, help="each task tokenizes on this many processes")
    p.add_argument("--time", default="4:00:00", help="time limit of each job")
    p.add_argument("--job-name", default="memgpt-prepare")
    p.add_argument("--log-dir", default=None, help="default: runs/prepare-<out name>/logs")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--sbatch-arg", action="append", default=[], help="extra sbatch option (repeatable)")
    p.add_argument("--wait", action="store_true", help="return when the merge job has finished")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch commands, submit nothing")
    p.add_argument("prepare_args", nargs=argparse.REMAINDER, help="-- then memgpt-prepare INPUT ... --out DIR ...")
    a = p.parse_args(argv)
    a.prepare_args = [x for x in a.prepare_args if x != "--"] if a.prepare_args[:1] == ["--"] else a.prepare_args
    return a


def prepare_sbatch_commands(a, cfg, missing: dict[str, list[int]]) -> list[tuple[str, list[str]]]:
    """(stage, sbatch command without its dependency) of every stage that has work left."""
    log_dir = Path(a.log_dir or f"runs/prepare-{cfg.out.name}/logs")
    base = ["sbatch", "--parsable", f"--time={a.time}", f"--cpus-per-task={a.cpus_per_task}",
            "--kill-on-invalid-dep=yes"]
    base += [f"--partition={a.partition}"] * bool(a.partition) + [f"--account={a.account}"] * bool(a.account)
    cmds = []
    for stage, tasks in missing.items():
        if not tasks:
            continue
        array = [f"--array={','.join(map(str, tasks))}", f"--output={log_dir}/{stage}-%A_%a.out"] \
            if stage in ("scan", "encode") else [f"--output={log_dir}/{stage}-%j.out"]
        cmds.append((stage, base + [f"--job-name={a.job_name}-{stage}", *array, *a.sbatch_arg, str(PREPARE_SCRIPT),
                                    stage, "--array-tasks", str(a.tasks), *a.prepare_args]))
    return cmds


def _submit_prepare(a) -> int:
    from data_pipeline.prepare_array import STAGES, init, missing_tasks
    from data_pipeline.prepare_corpus import config_from_args
    from launch.prepare import parse_args as parse_prepare

    cfg = config_from_args(parse_prepare(a.prepare_args))
    if not a.dry_run and not init(cfg, a.tasks):
        print(f"{cfg.out} already holds the corpus these options make; nothing to submit")
        return 0
    missing = {stage: missing_tasks(cfg, stage, a.tasks) if not a.dry_run else list(range(a.tasks))
               for stage in STAGES}
    cmds = prepare_sbatch_commands(a, cfg, missing)
    if a.dry_run:
        print("\n".join(shlex.join(cmd) for _, cmd in cmds))
        return 0
    # sbatch opens --output before the script runs
    Path(a.log_dir or f"runs/prepare-{cfg.out.name}/logs").mkdir(parents=True, exist_ok=True)
    job = None
    for stage, cmd in cmds:
        dep = [f"--dependency=afterok:{job}"] if job else []
        wait = ["--wait"] if a.wait and stage == "merge" else []
        job = run_sbatch(cmd[:1] + dep + wait + cmd[1:])
        print(f"  {stage}: job {job}" + (f" (array tasks {','.join(map(str, missing[stage]))})"
                                        if stage in ("scan", "encode") else ""), flush=True)
    print(f"submitted job {job} (merge, the last): {a.tasks} task(s) -> {cfg.out}/manifest.json\n"
          f"  follow: squeue --name={a.job_name}-scan,{a.job_name}-plan,{a.job_name}-encode,{a.job_name}-merge\n"
          f"  a task failed? run this same command again: only the unfinished tasks are submitted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
