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

Two subcommands are the job script's, not the user's (train.sbatch runs them; the logic lives
here, in Python, rather than in the shell):

* `elastic-args --config C --run-dir D --world-size N -- OVERRIDES`: prints the overrides that
  let N ranks continue the run's newest committed checkpoint (`--nodes MIN-MAX`: a requeued job
  that got fewer nodes), the decision on stderr (memgpt_dist.train.resume.elastic_overrides);
* `fault-requeue --rc RC --run-dir D --max K`: exit 0 to requeue after a fault, 1 not to (below).

Faults (76: a rank lost or hung; 247: a rank SIGKILLed, by the OOM killer, the guardian of a
stopped rank or a person; 137: a launcher SIGKILLed) are requeued while the run makes progress:
after K fault requeues in a row without a newer committed checkpoint (an OOM kill recurs at the
same step) the job stops and says so, instead of looping. 75 (saved and stopped) always requeues.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

SBATCH_SCRIPT = Path(__file__).resolve().with_name("train.sbatch")
FAULT_CODES = {76: "a rank was lost or hung", 247: "a rank was SIGKILLed (the OOM killer, a stopped rank's guardian, "
               "or a person)", 137: "a launcher was SIGKILLed"}
FAULT_RECORD = "fault_requeues.json"  # in the run's logs/: the newest committed step at each fault requeue
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
    p.add_argument("--min-nodes", type=int, default=None,
                   help="accept as few as this many nodes (sbatch --nodes=MIN-MAX): a requeued job that gets fewer "
                        "continues on them, the micro-batch absorbing the change (README, Faults)")
    p.add_argument("--fault-requeues", type=int, default=None,
                   help="requeue after a fault (exit 76, 247, 137) at most this many times in a row without a newer "
                        "committed checkpoint (default: train.sbatch's, 3)")
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
    # A node range: Slurm gives as few nodes as hold the tasks, so ask for one task per node of the
    # largest count (not per node): both nodes when both are free, one when only one is.
    nodes = [f"--nodes={args.min_nodes}-{args.nodes}", f"--ntasks={args.nodes}"] \
        if args.min_nodes and args.min_nodes < args.nodes else [f"--nodes={args.nodes}", "--ntasks-per-node=1"]
    cmd = ["sbatch", "--parsable", f"--job-name={name}", *nodes,
           f"--time={args.time}", f"--signal=B:USR1@{args.signal_seconds}",
           f"--output={run_dir}/logs/slurm-%j.out",
           f"--export=ALL,CONFIG={args.config},RUN_DIR={run_dir},PROCS_PER_NODE={procs}"
           + (f",FAULT_REQUEUES={args.fault_requeues}" if args.fault_requeues is not None else "")]
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
    layout = require_executable_layout(cfg, args.nodes * procs)
    if args.min_nodes is not None:
        if not 1 <= args.min_nodes <= args.nodes:
            raise ConfigError(f"--min-nodes {args.min_nodes} must be between 1 and --nodes {args.nodes}")
        bad = [n for n in range(args.min_nodes, args.nodes) if not _continues(layout, n * procs)]
        if bad:
            raise ConfigError(f"--min-nodes {args.min_nodes}: on {', '.join(map(str, bad))} node(s) the data-parallel "
                              f"degree does not divide the run's {layout.streams} data streams (dp x "
                              f"micro_batch_size), so a restart there could not continue the data exactly; raise "
                              f"--min-nodes or choose a micro_batch_size that they divide")


def _continues(layout, world_size: int) -> bool:
    """`world_size` ranks can continue a checkpoint of `layout` (same tp x pp, dp dividing its streams)."""
    model_parallel = layout.tp * layout.pp
    return world_size % model_parallel == 0 and layout.streams % (world_size // model_parallel) == 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fault-requeue"]:  # stdlib only: it runs at the end of every faulted job
        return fault_requeue(parse_fault_args(argv[1:]))
    from data_pipeline.errors import DataError
    from memgpt_dist.cli import run_cli

    if argv[:1] == ["elastic-args"]:
        eargs = parse_elastic_args(argv[1:])
        return run_cli(lambda: _elastic_args(eargs))
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


# ------------------------------------------------------------------ the job script's helpers
def parse_elastic_args(argv):
    p = argparse.ArgumentParser(prog="submit.py elastic-args")
    p.add_argument("--config", required=True)
    p.add_argument("--run-dir", required=True, type=Path)
    p.add_argument("--world-size", required=True, type=int)
    p.add_argument("overrides", nargs=argparse.REMAINDER)
    return p.parse_args(argv)


def _elastic_args(a) -> int:
    from memgpt_dist.config import load_config
    from memgpt_dist.train.resume import elastic_overrides

    overrides = [o for o in a.overrides if o != "--"]
    extra, decision = elastic_overrides(load_config(a.config, overrides), a.world_size, a.run_dir / "checkpoints")
    if decision:
        print(decision, file=sys.stderr)
    print(" ".join(extra))
    return 0


def parse_fault_args(argv):
    p = argparse.ArgumentParser(prog="submit.py fault-requeue")
    p.add_argument("--rc", required=True, type=int, help="the training step's exit code")
    p.add_argument("--run-dir", required=True, type=Path)
    p.add_argument("--max", type=int, default=3, help="fault requeues in a row without a newer committed checkpoint")
    return p.parse_args(argv)


def newest_committed_step(run_dir: Path) -> int:
    """The newest step with a commit marker under run_dir/checkpoints (-1: none); stdlib only."""
    steps = [int(m.group(1)) for p in (run_dir / "checkpoints").glob("step_*/COMMITTED.json")
             if (m := re.fullmatch(r"step_(\d{8})", p.parent.name))]
    return max(steps, default=-1)


def fault_requeue(a) -> int:
    """Exit 0: requeue after fault `a.rc`; 1: do not (not a fault, or `a.max` fault requeues in a
    row have not moved the newest committed checkpoint). Records each requeue in the run's logs/."""
    if a.rc not in FAULT_CODES:
        print(f"exit {a.rc} is not a fault this job requeues", file=sys.stderr)
        return 1
    record_file = a.run_dir / "logs" / FAULT_RECORD
    record = json.loads(record_file.read_text()) if record_file.is_file() else {"step": None, "in_a_row": 0}
    newest = newest_committed_step(a.run_dir)
    in_a_row = record["in_a_row"] + 1 if record["step"] == newest else 1
    if in_a_row > a.max:
        print(f"exit {a.rc} ({FAULT_CODES[a.rc]}): not requeued, {a.max} requeue(s) in a row have not got past the "
              f"checkpoint of step {newest} (a fault that recurs there, e.g. out of memory); fix it and resubmit "
              f"with the same run directory", file=sys.stderr)
        return 1
    record_file.parent.mkdir(parents=True, exist_ok=True)
    record_file.write_text(json.dumps({"step": newest, "in_a_row": in_a_row}))
    print(f"exit {a.rc} ({FAULT_CODES[a.rc]}): requeueing to resume from the newest committed checkpoint (step "
          f"{newest}); fault requeue {in_a_row} of at most {a.max} in a row without a newer one", file=sys.stderr)
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
