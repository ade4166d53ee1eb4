"""Where a run resumes from, checked once, before any engine is built.

`find_resume_point` maps `--resume` (none | auto | STEP) to a committed, verified checkpoint and
runs every compatibility check against it, reading only its commit marker:

* the tokenizer: the checkpoint's tokenizer hash against the corpus's (`data.path`): token ids
  would mean other text, so another tokenizer is refused, naming both hashes and paths;
* the config: model, memory and `data.n_segments` must match; other changed keys are listed;
* the layout: the same one, or a change the universal relayout can continue exactly
  (`universal.check_layout_change`), in which case the checkpoint is converted here.

It says what it found in one log line, and returns a `ResumePoint` for `Checkpointer.load`.

Elastic restarts (`elastic_overrides`, run by the Slurm job script before the ranks start): a
requeued job that got fewer (or more) nodes than the checkpoint was written with continues it
when its data-parallel degree divides the checkpoint's data streams. The decision, logged: the
streams S = dp x micro_batch_size and grad_accum must stay the checkpoint's (the layout rules
of `universal.check_layout_change`: that is what continues every stream's data exactly), so the
micro-batch absorbs the change, micro_batch_size = S / dp, and the global batch S x grad_accum
is kept; activation memory per rank grows by the same factor. Anything else is refused.
May not touch: the engine, the loader or any tensor file.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from memgpt_dist.config import ConfigError, TrainConfig, config_from_json, dp_degree
from memgpt_dist.parallel.dist import Topology
from memgpt_dist.parallel.layout import Layout, validate_layout
from memgpt_dist.train.checkpoint import (CheckpointDir, CheckpointError, committed_step_dirs, read_marker, sha256_file,
                                          sha256_text, tag_for)
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
    if change.saved.dp != change.now.dp and topo.is_main:
        log.info("data-parallel degree %d -> %d: the micro-batch absorbs it (micro_batch_size %d -> %d, grad_accum %d "
                 "kept), so the %d data streams and the global batch of %d samples stay the checkpoint's",
                 change.saved.dp, change.now.dp, change.saved.micro_batch_size, change.now.micro_batch_size,
                 change.now.grad_accum, change.now.streams, change.now.streams * change.now.grad_accum)
    return ResumePoint(step=step, universal=universal, change=change)


def elastic_overrides(cfg: TrainConfig, world_size: int, checkpoints: Path) -> tuple[list[str], Optional[str]]:
    """(config overrides, the decision to log) that let `cfg` on `world_size` ranks continue the
    newest committed checkpoint under `checkpoints` (see the module docstring); ([], None) when
    nothing needs changing: no checkpoint yet, or the config already keeps its streams.

    Reads the commit marker only (not verified: the resume does that; should it fall back to an
    older checkpoint of yet another layout, the resume's own layout check refuses, naming it).
    Raises ConfigError when this world size cannot continue the checkpoint's streams."""
    committed = committed_step_dirs(checkpoints)
    if not committed:
        return [], None
    step = max(committed)
    marker = read_marker(committed[step])
    saved = validate_layout(config_from_json(marker["meta"]["config"]), int(marker["world_size"]))
    dp = dp_degree(world_size, cfg.parallel.tp, cfg.parallel.pp)
    par = cfg.parallel
    if dp * par.micro_batch_size == saved.streams and par.grad_accum == saved.grad_accum:
        return [], None
    if saved.streams % dp:
        raise ConfigError(f"elastic restart: checkpoint {tag_for(step)} was written by {saved} with {saved.streams} data "
                          f"streams (dp x micro_batch_size); {world_size} ranks give dp {dp}, which does not divide "
                          f"{saved.streams}: the run cannot continue its data exactly. Run on a number of nodes whose "
                          f"data-parallel degree divides {saved.streams}")
    mb, ga = saved.streams // dp, saved.grad_accum
    overrides = [f"--parallel.micro_batch_size={mb}"] * (mb != par.micro_batch_size) + \
        [f"--parallel.grad_accum={ga}"] * (ga != par.grad_accum)
    return overrides, _elastic_decision(step, saved, int(marker["world_size"]), world_size, dp, par.micro_batch_size, mb)


def _elastic_decision(step: int, saved: Layout, saved_world: int, world_size: int, dp: int, mb_config: int,
                      mb: int) -> str:
    return (f"elastic restart: checkpoint {tag_for(step)} was written by {saved_world} ranks ({saved}: "
            f"{saved.streams} data streams, grad_accum {saved.grad_accum}, global batch "
            f"{saved.streams * saved.grad_accum}); this job has {world_size} ranks (dp {dp}). Decision: "
            f"parallel.micro_batch_size {mb_config} -> {mb}, grad_accum {saved.grad_accum} kept: the streams and "
            f"grad_accum must stay the checkpoint's for the data to continue exactly, so the micro-batch absorbs the "
            f"change and the global batch is kept (activation memory per rank x{mb / mb_config:g})")


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
