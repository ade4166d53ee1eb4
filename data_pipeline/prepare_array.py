"""`memgpt-prepare` as a Slurm job array: the stages of `prepare_stages` as tasks sharing
OUT/.prepare-work on the cluster's shared disk.

    init            (at submit time)  check OUT and the inputs, record the options in the work dir
    scan   array 0..N-1  ->  plan  ->  encode array 0..N-1  ->  merge

Each job depends on the one before (afterok). A task that finished left its marker, so
resubmitting the same command submits only the tasks without one (a failed task reruns alone)
and a rerun of a finished prepare does nothing. The options are fingerprinted: a work directory
or corpus made with other options is never mixed with this one's.
"""
from __future__ import annotations

import hashlib
import logging
import json
from dataclasses import asdict
from typing import Optional

from data_pipeline.errors import DataError
from data_pipeline.prepare_corpus import (MANIFEST, PrepareConfig, is_our_corpus, load_scrubber, refuse_input_overlap,
                                          remove_corpus)
from data_pipeline.prepare_stages import WorkDir, atomic_write_json, encode, merge, plan, read_json, scan

log = logging.getLogger(__name__)
WORK_DIR = ".prepare-work"
STAGES = ("scan", "plan", "encode", "merge")
ARRAY_STAGES = ("scan", "encode")  # one task per slice; plan and merge run once
# options that do not change the corpus: a rerun may differ in them
NOT_FINGERPRINTED = ("out", "workers", "overwrite")


def fingerprint(cfg: PrepareConfig, n_tasks: int) -> str:
    opts = {k: str(v) for k, v in asdict(cfg).items() if k not in NOT_FINGERPRINTED}
    return hashlib.sha256(json.dumps({**opts, "tasks": n_tasks}, sort_keys=True).encode()).hexdigest()[:16]


def work_dir(cfg: PrepareConfig) -> WorkDir:
    return WorkDir(cfg.out / WORK_DIR)


def is_complete(cfg: PrepareConfig, n_tasks: int) -> bool:
    """OUT holds the corpus that these options and task count make."""
    m = read_json(cfg.out / MANIFEST) if is_our_corpus(cfg.out) else None
    return m is not None and m.get("prepare_fingerprint") == fingerprint(cfg, n_tasks)


def init(cfg: PrepareConfig, n_tasks: int) -> bool:
    """Make OUT ready for an array of `n_tasks`; returns False when OUT already holds this very
    corpus (nothing to do). Refuses what would mix two corpora or destroy anything not ours."""
    if n_tasks < 1:
        raise DataError(f"--tasks {n_tasks} must be >= 1")
    refuse_input_overlap(cfg)
    if is_complete(cfg, n_tasks):
        return False
    out, work = cfg.out, work_dir(cfg)
    recorded = read_json(work.root / "config.json")
    if recorded is not None and recorded["fingerprint"] != fingerprint(cfg, n_tasks):
        raise DataError(f"{work.root} holds an unfinished prepare with other options or task count "
                        f"({recorded['options']}); resubmit with those, or choose another --out")
    others = [p.name for p in out.iterdir() if p.name != WORK_DIR] if out.is_dir() else []
    if is_our_corpus(out):
        if not cfg.overwrite:
            raise DataError(f"{out} already holds a prepared corpus ({out / MANIFEST}) made with other options; "
                            f"pass --overwrite to replace it")
        remove_corpus(out)  # only the corpus's own files: what else the user keeps there stays
    elif recorded is None and others:
        raise DataError(f"{out} is not empty and holds no corpus made by memgpt-prepare ({', '.join(others[:5])}); "
                        f"choose an empty or new --out directory")
    work.root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work.root / "config.json", {"fingerprint": fingerprint(cfg, n_tasks), "tasks": n_tasks,
                                                  "options": {k: str(v) for k, v in asdict(cfg).items()}})
    return True


def missing_tasks(cfg: PrepareConfig, stage: str, n_tasks: int) -> list[int]:
    """The tasks of `stage` that have not left their marker (all done: [])."""
    work = work_dir(cfg)
    if is_complete(cfg, n_tasks):
        return []
    if stage == "scan":
        return [t for t in range(n_tasks) if not work.scan_marker(t).is_file()]
    if stage == "plan":
        return [] if work.plan_marker().is_file() else [0]
    if stage == "encode":
        return [t for t in range(n_tasks) if not work.encode_marker(t).is_file()]
    return [0]


def run_stage(cfg: PrepareConfig, stage: str, task: int, n_tasks: int) -> Optional[dict]:
    """Run one task of one stage (what an array task of prepare.sbatch calls)."""
    if is_complete(cfg, n_tasks):
        remove_work_dir(work_dir(cfg))  # a merge killed after its manifest left it
        return None
    work = work_dir(cfg)
    recorded = read_json(work.root / "config.json")
    if recorded is None or recorded["fingerprint"] != fingerprint(cfg, n_tasks):
        raise DataError(f"{work.root} was not initialised for these options and --tasks {n_tasks}; "
                        f"submit with launch/slurm/submit.py prepare (it runs the init step first)")
    if not 0 <= task < n_tasks:
        raise DataError(f"--task {task} is outside 0..{n_tasks - 1}")
    scrub = load_scrubber(cfg.scrub)
    if stage == "scan":
        return scan(cfg, work, task, n_tasks, scrub)
    if stage == "plan":
        return plan(cfg, work, n_tasks, scrub)
    if stage == "encode":
        return encode(cfg, work, task, n_tasks, cfg.out, scrub)
    manifest = merge(cfg, work, n_tasks, cfg.out, extra={"prepare_fingerprint": fingerprint(cfg, n_tasks)})
    remove_work_dir(work)
    return manifest


def remove_work_dir(work: WorkDir) -> None:
    """Delete the array's work files, only if the directory is ours: `init` writes its
    config.json (with the options' fingerprint) first, so a directory of that name without it is
    left alone; and even in ours only the files the stages write go (`WorkDir.remove`)."""
    recorded = read_json(work.root / "config.json") if work.root.is_dir() else None
    if recorded is None or "fingerprint" not in recorded:
        if work.root.exists():
            log.warning("left %s in place: it holds no work record of memgpt-prepare", work.root)
        return
    left = work.remove()
    if left:
        log.warning("left %s in place: it also holds files memgpt-prepare did not write (%s)", work.root,
                    ", ".join(str(p.relative_to(work.root)) for p in left[:5]))
