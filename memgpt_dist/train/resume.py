"""Where a run resumes from, checked once, before any engine is built.

`find_resume_point` maps `--resume` (none | auto | STEP) to a committed, verified checkpoint and
runs every compatibility check against it, reading only its commit marker:

* the tokenizer: the checkpoint's tokenizer hash against the corpus's (`data.path`): token ids
  would mean other text, so another tokenizer is refused, naming both hashes and paths;
* the config: model, memory and `data.n_segments` must match; other changed keys are listed;
* the layout: the same one, or a change the universal relayout can continue exactly
  (`universal.check_layout_change`), in which case the checkpoint is converted here.

It says what it found in one log line, and returns a `ResumePoint` for `Checkpointer.load`.
May not touch: the engine, the loader or any tensor file.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from memgpt_dist.config import ConfigError, TrainConfig, config_from_json
from memgpt_dist.parallel.dist import Topology
from memgpt_dist.parallel.layout import validate_layout
from memgpt_dist.train.checkpoint import CheckpointDir, CheckpointError, sha256_file, sha256_text, tag_for
from memgpt_dist.train.checkpointer import ResumePoint
from memgpt_dist.train.universal import LayoutChange, check_layout_change, ensure_universal

log = logging.getLogger("memgpt_dist")


def run_meta(cfg: TrainConfig, tokenizer_file: Optional[Path]) -> dict[str, Any]:
    """What every checkpoint of this run records for later resumes (in its commit marker)."""
    config = cfg.to_json()
    return {"config": config, "config_sha256": sha256_text(config), "tokenizer_sha256": tokenizer_sha256(tokenizer_file),
            "tokenizer_file": str(tokenizer_file) if tokenizer_file else None}


def tokenizer_sha256(tokenizer_file: Optional[Path]) -> Optional[str]:
    return sha256_file(tokenizer_file) if tokenizer_file is not None and Path(tokenizer_file).is_file() else None


def resolve_resume(resume: str, files: CheckpointDir) -> Optional[int]:
    """Map --resume (none | auto | STEP) to a checkpoint step; refuse to silently restart."""
    if resume == "none":
        if files.has_any():
            raise CheckpointError(f"{files.root} already holds checkpoints: pass --resume auto to continue "
                                  f"that run, or choose a new run_dir")
        return None
    if resume == "auto":
        return files.latest_valid_step()
    if resume.isdigit():
        step = int(resume)
        if step not in files.committed_steps():
            there = ", ".join(str(s) for s in files.committed_steps()) or "none"
            raise CheckpointError(f"--resume {resume}: step {step} has no committed checkpoint in {files.root} "
                                  f"(committed steps: {there}); pass one of them or --resume auto")
        problem = files.verify(step)
        if problem:
            raise CheckpointError(f"--resume {resume}: {problem}")
        return step
    raise ConfigError(f"--resume {resume!r}: use none, auto or a step number")


def find_resume_point(resume: str, files: CheckpointDir, cfg: TrainConfig, topo: Topology,
                      tokenizer_file: Optional[Path]) -> Optional[ResumePoint]:
    """The checked checkpoint to resume from (collective), or None for a fresh start."""
    step = resolve_resume(resume, files)
    if step is None:
        return None
    meta = files.meta(step)
    check_tokenizer(meta, step, tokenizer_file)
    report_changed_settings(meta, step, cfg, topo)
    change = check_resume_compatible(meta["config"], cfg, int(meta["world_size"]), topo)
    if change is None:
        log.info("resuming from %s (same layout)", files.root / tag_for(step))
        return ResumePoint(step=step)
    universal, seconds = ensure_universal(files.root / tag_for(step), change.saved, topo)
    how = f"converted to universal at {universal} in {seconds:.1f}s" if seconds is not None \
        else f"already converted to universal at {universal}"
    log.info("checkpoint step %d written by %s %s; loaded into %s", step, change.saved, how, change.now)
    return ResumePoint(step=step, universal=universal, change=change)


def check_tokenizer(meta: dict[str, Any], step: int, tokenizer_file: Optional[Path]) -> None:
    """Refuse a checkpoint trained with another tokenizer than the corpus's."""
    saved, now = meta.get("tokenizer_sha256"), tokenizer_sha256(tokenizer_file)
    if saved and now and saved != now:
        trained_on = meta.get("tokenizer_file") or "the run's original data"
        raise CheckpointError(f"checkpoint {tag_for(step)} was trained with a tokenizer of sha256 {saved[:12]}... "
                              f"({trained_on}), the data's tokenizer {tokenizer_file} has {now[:12]}...: token ids "
                              f"would mean different text. Resume with the original data or start a new run_dir")


def report_changed_settings(meta: dict[str, Any], step: int, cfg: TrainConfig, topo: Topology) -> None:
    saved_cfg = meta.get("config")
    if saved_cfg and sha256_text(saved_cfg) != sha256_text(cfg.to_json()) and topo.is_main:
        changed = changed_keys(json.loads(saved_cfg), cfg.to_dict())
        log.warning("resuming %s with changed settings: %s", tag_for(step), ", ".join(changed) or "(formatting only)")


def check_resume_compatible(saved_json: str, cfg: TrainConfig, saved_world: int,
                            topo: Topology) -> Optional[LayoutChange]:
    """Model shape and data must match the checkpoint; training length may change, and so may the
    layout (dp, tp, pp, ZeRO stage) when the run can continue exactly: that change is returned
    (None: same layout), anything else is refused with what to set (`universal.check_layout_change`)."""
    saved = config_from_json(saved_json)
    for section in ("model", "memory"):
        if getattr(saved, section) != getattr(cfg, section):
            raise ConfigError(f"--resume: the checkpoint's {section} section differs from the config "
                              f"({getattr(saved, section)} vs {getattr(cfg, section)}); resume with the saved "
                              f"settings or start a new run_dir")
    if saved.data.n_segments != cfg.data.n_segments:
        raise ConfigError("--resume: data.n_segments must match the checkpoint")
    return check_layout_change(validate_layout(saved, saved_world), validate_layout(cfg, topo.world_size))


def changed_keys(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """'section.key: old -> new' for every leaf that differs between two config dicts."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "(absent)"), current.get(key, "(absent)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a} -> {b}")
    return out
