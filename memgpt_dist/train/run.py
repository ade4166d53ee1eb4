"""Assemble a training run from a config: run directory, model, engine, checkpoints, logger.

`launch/train.py` parses arguments and builds the data loaders (it wires `data_pipeline` in);
everything else is here so that it can be tested without a launcher.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from memgpt_dist.config import ConfigError, TrainConfig, config_from_json
from memgpt_dist.model import GPT
from memgpt_dist.parallel.dist import Topology
from memgpt_dist.parallel.engine import build_engine
from memgpt_dist.parallel.layout import parameter_numels, require_executable_layout, validate_layout
from memgpt_dist.parallel.pipeline import build_pipeline_module
from memgpt_dist.parallel.plan import apply_plan
from memgpt_dist.train.checkpoint import CheckpointError, Checkpointer, tag_for
from memgpt_dist.train.metrics import MetricsLogger
from memgpt_dist.train.reshard import LayoutChange, Redistributed, check_layout_change, ensure_universal
from memgpt_dist.train.state import TrainState, seed_everything
from memgpt_dist.train.trainer import Batch, StatefulBatches, Trainer, scaled_token_loss

log = logging.getLogger("memgpt_dist")


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer.json"


def setup_logging(topo: Topology, run_dir: Optional[Path] = None) -> None:
    level = logging.INFO if topo.is_main else logging.WARNING
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if run_dir is not None and topo.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    logging.basicConfig(level=level, format=f"[%(asctime)s rank{topo.rank}] %(message)s", handlers=handlers,
                        force=True)


def build_model(cfg: TrainConfig, tp_rank: int = 0) -> GPT:
    """The same initial weights on every rank: seeded from the run seed, not the rank; a TP rank
    then keeps its heads' share of them (the whole model is initialised first, so a TP run
    starts from exactly the weights of a single-process run)."""
    seed_everything(cfg.train.seed)
    model = GPT(cfg.model, cfg.memory)
    model.init_weights()
    return apply_plan(model, cfg.parallel, tp_rank)


def resolve_resume(resume: str, checkpointer: Checkpointer) -> Optional[int]:
    """Map --resume (none | auto | STEP) to a checkpoint step; refuse to silently restart."""
    if resume == "none":
        if checkpointer.has_any():
            raise CheckpointError(f"{checkpointer.root} already holds checkpoints: pass --resume auto to continue "
                                  f"that run, or choose a new run_dir")
        return None
    if resume == "auto":
        return checkpointer.latest_valid_step()
    if resume.isdigit():
        step = int(resume)
        problem = checkpointer.verify(step)
        if problem:
            raise CheckpointError(f"--resume {resume}: {problem}")
        return step
    raise ConfigError(f"--resume {resume!r}: use none, auto or a step number")


def check_resume_compatible(saved_json: str, cfg: TrainConfig, saved_world: int,
                            topo: Topology) -> Optional[LayoutChange]:
    """Model shape and data must match the checkpoint; training length may change, and so may the
    layout (dp, tp, pp, ZeRO stage) when the run can continue exactly: that change is returned
    (None: same layout), anything else is refused with what to set (`reshard.check_layout_change`)."""
    saved = config_from_json(saved_json)
    for section in ("model", "memory"):
        if getattr(saved, section) != getattr(cfg, section):
            raise ConfigError(f"--resume: the checkpoint's {section} section differs from the config "
                              f"({getattr(saved, section)} vs {getattr(cfg, section)}); resume with the saved "
                              f"settings or start a new run_dir")
    if saved.data.n_segments != cfg.data.n_segments:
        raise ConfigError("--resume: data.n_segments must match the checkpoint")
    return check_layout_change(validate_layout(saved, saved_world), validate_layout(cfg, topo.world_size))


def layout_change_of(checkpointer: Checkpointer, step: Optional[int], cfg: TrainConfig,
                     topo: Topology) -> Optional[LayoutChange]:
    """Check checkpoint `step` against this run before any engine is built; the layout change, if any."""
    if step is None:
        return None
    meta = checkpointer.marker(step).get("meta", {})
    return check_resume_compatible(meta["config"], cfg, int(meta["world_size"]), topo)


def prepare_run_dir(cfg: TrainConfig, topo: Topology, tokenizer_file: Optional[Path]) -> RunPaths:
    paths = RunPaths(Path(cfg.run_dir))
    if topo.is_main:
        paths.root.mkdir(parents=True, exist_ok=True)
        paths.config.write_text(cfg.to_json())
        # never over a run's own copy: a resume with another tokenizer is refused later, and the
        # tokenizer the checkpoints were trained with must survive that
        if tokenizer_file is not None and tokenizer_file.is_file() and not paths.tokenizer.exists():
            shutil.copyfile(tokenizer_file, paths.tokenizer)
    topo.barrier()
    return paths


def run_training(cfg: TrainConfig, topo: Topology, train_batches: StatefulBatches,
                 make_val_batches: Optional[Callable[[], Iterable[Batch]]], resume: str = "none",
                 tokenizer_file: Optional[Path] = None, stop_after: Optional[int] = None) -> TrainState:
    """Train `cfg` end to end; returns the final train state."""
    require_executable_layout(cfg, topo.world_size)  # before any directory or engine
    paths = prepare_run_dir(cfg, topo, tokenizer_file)
    checkpointer = Checkpointer(paths.checkpoints, topo, cfg.checkpoint.keep_last)
    start = resolve_resume(resume, checkpointer)
    change = layout_change_of(checkpointer, start, cfg, topo)
    model = build_model(cfg, topo.tp_rank)
    stage_memory = None
    if topo.pp_size > 1:
        model, stage_memory = build_pipeline_module(model, cfg.parallel, scaled_token_loss, cfg.train.carry_memory)
    engine, _ = build_engine(model, cfg, topo, load_universal=change is not None)
    # dropout etc. differ per data-parallel replica, reproducibly; the TP ranks of a replica draw
    # the same masks, so the activations they hold replicated stay identical
    seed_everything(cfg.train.seed + 1000 * topo.dp_rank)
    metrics = MetricsLogger(paths.tensorboard, enabled=topo.is_main, tensorboard=cfg.log.tensorboard,
                            start_step=start or 0, jsonl=paths.root / "metrics.jsonl")
    trainer = Trainer(cfg, topo, engine, train_batches, make_val_batches, checkpointer, metrics, stage_memory)
    if start is not None:
        _restore(trainer, start, change, topo)
    log.info("model: %s parameters; world size %d = dp %d x tp %d x pp %d; global batch %d samples x %d "
             "segments x %d tokens", f"{sum(parameter_numels(cfg).values()):,}", topo.world_size, topo.dp_size,
             topo.tp_size, topo.pp_size, cfg.parallel.micro_batch_size * cfg.parallel.grad_accum * topo.dp_size,
             cfg.data.n_segments, cfg.model.segment_len)
    try:
        return trainer.fit(stop_after)
    finally:
        metrics.close()


def _restore(trainer: Trainer, step: int, change: Optional[LayoutChange], topo: Topology) -> None:
    universal, seconds = None, None
    if change is not None:
        universal, seconds = ensure_universal(trainer.checkpointer.root / tag_for(step), change.saved, topo)
    moved = trainer.restore(step, universal)
    if change is not None:
        _report_layout_change(trainer, step, change, universal, seconds, moved)
    log.info("resumed from %s at step %d (%s tokens seen)", trainer.checkpointer.root, trainer.state.step,
             f"{trainer.state.tokens_seen:,}")


def _report_layout_change(trainer: Trainer, step: int, change: LayoutChange, universal: Path,
                          seconds: Optional[float], moved: Redistributed) -> None:
    """Say what a resume on another layout did (rank 0), and warn about memory that could not move."""
    how = f"converted to universal at {universal} in {seconds:.1f}s" if seconds is not None \
        else f"already converted to universal at {universal}"
    carry = trainer.cfg.train.carry_memory
    memory = "; memory state redistributed by global stream id, head and layer" if carry and moved.memory is not None else ""
    log.info("checkpoint step %d written by %s %s; loaded into %s; the %d data streams continue from their saved "
             "cursors (%s global samples seen)%s", step, change.saved, how, change.now, change.now.streams,
             f"{trainer.state.samples_seen:,}", memory)
    if carry and moved.missing_streams:
        log.warning("rank %d: the checkpoint holds no memory state for %d of its %d streams; they start from zero "
                    "memory", trainer.topo.rank, moved.missing_streams, trainer.cfg.parallel.micro_batch_size)


def count_parameters(model: torch.nn.Module) -> int:
    """Full parameter count, also after ZeRO-3 has partitioned the tensors (their local numel is then 0)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def dry_run_report(cfg: TrainConfig, world_size: int, device_type: str) -> str:
    from memgpt_dist.parallel.deepspeed_config import build_ds_config

    ds = build_ds_config(cfg, world_size, device_type=device_type, bf16_supported=device_type == "cuda")
    model = GPT(cfg.model, cfg.memory)
    n_params = count_parameters(model)
    return (f"# resolved config\n{cfg.to_json()}\n# world size {world_size}, dp {cfg.parallel.dp(world_size)}, "
            f"{n_params:,} parameters\n# DeepSpeed config\n{json.dumps(ds, indent=2)}")
