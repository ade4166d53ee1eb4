"""Assemble a training run from a config: run directory, resume point, model, engine, step object,
checkpointer with its registered parts, callbacks, trainer.

`launch/train.py` parses arguments and builds the data loaders (it wires `data_pipeline` in);
everything else is here so that it can be tested without a launcher. The path of a resume:
`resume.find_resume_point` (checks, conversion) -> engine built for it -> `Checkpointer.load`.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from memgpt_dist.config import TrainConfig
from memgpt_dist.model import GPT
from memgpt_dist.model.carry import MemoryCarry
from memgpt_dist.parallel.dist import Topology, place_record
from memgpt_dist.parallel.engine import build_engine, engine_ds_config
from memgpt_dist.parallel.layout import require_executable_layout
from memgpt_dist.parallel.shares import parameter_numels
from memgpt_dist.parallel.pipeline import build_pipeline_module
from memgpt_dist.parallel.plan import apply_plan
from memgpt_dist.parallel.model_build import (builds_partitioned, held_share, hold_only, on_host_while,
                                              partitioned_construction, require_held, whole_module, whole_parameters)
from memgpt_dist.parallel.shares import stage_parameter_names
from memgpt_dist.perf.kernels import linear_cross_entropy_sum, select_linear_cross_entropy
from memgpt_dist.train.batch import Batch, StatefulBatches, scaled_token_loss
from memgpt_dist.train.callbacks import Callback, default_callbacks
from memgpt_dist.train.checkpoint import CheckpointDir
from memgpt_dist.train.checkpointer import Checkpointer, ResumePoint
from memgpt_dist.train.metrics import MetricsLogger
from memgpt_dist.train.resume import find_resume_point, run_meta
from memgpt_dist.train.run_lock import RunDirLocked, RunLock
from memgpt_dist.train.state import LoaderPart, MemoryPart, RngPart, TrainState, seed_everything
from memgpt_dist.train.steps import DenseStep, PipelineStep
from memgpt_dist.train.trainer import Trainer

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


@contextlib.contextmanager
def hold_run_dir(topo: Topology, run_dir: Path) -> Iterator[None]:
    """Hold the run directory's exclusive lock (rank 0) for the block, then set up logging into it.

    The lock comes before anything is written there, `train.log` included. Every rank learns
    rank 0's answer (one broadcast), so a refused run ends on all ranks at once, not in a
    collective the others never enter."""
    lock, problem = RunLock(run_dir), None
    if topo.is_main:
        try:
            lock.acquire()
        except RunDirLocked as exc:
            problem = str(exc)
    problem = topo.broadcast_object(problem)
    if problem is not None:
        raise RunDirLocked(problem)
    try:
        setup_logging(topo, run_dir)
        yield
    finally:
        lock.release()


def build_model(cfg: TrainConfig, tp_rank: int = 0, from_hf: bool = False, partition: Optional[dict] = None,
                held: Optional[frozenset[str]] = None) -> GPT:
    """The same initial weights on every rank: seeded from the run seed, not the rank; a TP rank
    then keeps its heads' share of them (the whole model is initialised first, so a TP run
    starts from exactly the weights of a single-process run). `from_hf`: then overwritten by
    the checkpoint of init.from_hf (memgpt_dist.hf.convert), before TP slicing and ZeRO.

    Built only in part (memgpt_dist.parallel.model_build), with the same weights: `partition`,
    the engine's DeepSpeed config, builds it partitioned under ZeRO-3's `zero.Init`; `held`, the
    parameter names of this rank's pipeline stage, gives storage to those only (the rest on meta)."""
    import torch

    seed_everything(cfg.train.seed)
    build = (partitioned_construction(partition) if partition is not None else
             torch.device("meta") if held is not None else contextlib.nullcontext())
    with build:
        model = GPT(cfg.model, cfg.memory)
    if held is not None:
        hold_only(model, held)
    seed_everything(cfg.train.seed)  # the init's draws do not depend on what construction drew
    model.init_weights(whole_module if partition is not None else on_host_while if held is not None else None)
    if partition is not None:
        log.info("model built partitioned (parallel.zero_init): this rank holds %s", held_share(model))
    if from_hf and cfg.init.from_hf:
        from memgpt_dist.hf.convert import load_hf_weights

        log.info("initial weights from %s (memory added at zero)", cfg.init.from_hf)
        load_hf_weights(model, cfg.init.from_hf, whole_parameters if partition is not None else None)
    return apply_plan(model, cfg.parallel, tp_rank, compile=cfg.train.compile)


def build_step(cfg: TrainConfig, topo: Topology, load_universal: bool = False, from_hf: bool = False):
    """The model on this rank, its engine and the step object of its family (dense or pipeline).
    `from_hf`: start from init.from_hf's weights (a fresh run; a resume loads its checkpoint)."""
    partition = engine_ds_config(cfg, topo, load_universal) if builds_partitioned(cfg.parallel) else None
    held = stage_parameter_names(cfg, topo.pp_rank) if topo.pp_size > 1 else None
    model = build_model(cfg, topo.tp_rank, from_hf, partition, held)
    if topo.pp_size > 1:
        module, carry = build_pipeline_module(model, cfg.parallel, scaled_token_loss, cfg.train.carry_memory)
        require_held(module, f"pipeline stage {topo.pp_rank}")
        engine, _ = build_engine(module, cfg, topo, load_universal=load_universal)
        return PipelineStep(engine, topo, carry, cfg.data.n_segments)
    engine, _ = build_engine(model, cfg, topo, load_universal=load_universal)
    return DenseStep(engine, topo, MemoryCarry(cfg.train.carry_memory), cfg.data.n_segments, cfg.model.n_layer,
                     loss_fn=fused_loss_fn(topo.device.type))


def fused_loss_fn(device_type: str) -> Optional[Callable]:
    """The training step's fused linear cross-entropy where one is installed and passes its check
    (liger-kernel on CUDA); None, the logits and token_loss_sum, elsewhere. Logged either way.
    Pipelines keep the logits: their last stage computes the loss (parallel/pipeline.py)."""
    choice = select_linear_cross_entropy(device_type)
    log.info("loss: %s", choice.reason)
    return functools.partial(linear_cross_entropy_sum, kernel=choice.name) if choice.name != "torch" else None


def build_trainer(cfg: TrainConfig, topo: Topology, step, train_batches: StatefulBatches,
                  make_val_batches: Optional[Callable[[], Iterable[Batch]]], files: CheckpointDir,
                  metrics: MetricsLogger, tokenizer_file: Optional[Path] = None,
                  callbacks: Optional[list[Callback]] = None) -> Trainer:
    """A trainer whose checkpointer holds every stateful part: the train state (once), and per
    rank the loader cursor, the RNG and the memory carry beside the rank's place."""
    checkpointer = Checkpointer(files=files, topo=topo, engine=step.engine, meta=run_meta(cfg, tokenizer_file),
                                tokenizer_file=tokenizer_file)
    trainer = Trainer(cfg, topo, step, train_batches, checkpointer,
                      callbacks if callbacks is not None else default_callbacks(cfg, metrics, make_val_batches))
    checkpointer.register("train_state", trainer.state)
    # the K its saved state was cut with: that of the last step taken
    checkpointer.register("loader", LoaderPart(train_batches, lambda: trainer.apply_curriculum(
        max(trainer.state.step - 1, 0))), per_rank=True)
    checkpointer.register("rng", RngPart(), per_rank=True)
    checkpointer.register("memory_state", MemoryPart(step.carry, topo.device), per_rank=True)
    checkpointer.place = lambda: place_record(topo, getattr(train_batches, "stream_ids", None), cfg.model.n_head,
                                            step.carry.owned)
    return trainer


def prepare_run_dir(cfg: TrainConfig, topo: Topology, tokenizer_file: Optional[Path]) -> RunPaths:
    paths = RunPaths(Path(cfg.run_dir))
    if topo.is_main:
        paths.root.mkdir(parents=True, exist_ok=True)
        paths.config.write_text(cfg.to_json())
        # the tokenizer the checkpoints were trained with, for generation; never over a run's own copy
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
    files = CheckpointDir(paths.checkpoints, topo, cfg.checkpoint.keep_last)
    point = find_resume_point(resume, files, cfg, topo, tokenizer_file)  # every check before the engine
    step = build_step(cfg, topo, load_universal=point is not None and point.universal is not None,
                      from_hf=point is None)
    # dropout etc. differ per data-parallel replica, reproducibly; the TP ranks of a replica draw
    # the same masks, so the activations they hold replicated stay identical
    seed_everything(cfg.train.seed + 1000 * topo.dp_rank)
    metrics = MetricsLogger(paths.tensorboard, enabled=topo.is_main, tensorboard=cfg.log.tensorboard,
                            start_step=point.step if point else 0, jsonl=paths.root / "metrics.jsonl")
    trainer = build_trainer(cfg, topo, step, train_batches, make_val_batches, files, metrics, tokenizer_file)
    if trainer.resume(point) is not None:
        _report_resume(trainer, point)
    log.info("model: %s parameters; world size %d = dp %d x tp %d x pp %d; global batch %d samples x %d "
             "segments x %d tokens", f"{sum(parameter_numels(cfg).values()):,}", topo.world_size, topo.dp_size,
             topo.tp_size, topo.pp_size, cfg.parallel.micro_batch_size * cfg.parallel.grad_accum * topo.dp_size,
             cfg.data.n_segments, cfg.model.segment_len)
    try:
        state = trainer.fit(stop_after)
    finally:
        metrics.close()
    maybe_export_hf(cfg, topo, paths.root)
    return state


def maybe_export_hf(cfg: TrainConfig, topo: Topology, run_dir: Path) -> None:
    """`checkpoint.export_hf_at_end`: rank 0 exports the newest checkpoint to <run_dir>/hf once the
    run has ended normally (its checkpoints are committed; the other ranks need not wait). A
    failure is logged, not raised: the run itself succeeded and `memgpt-export` can retry."""
    if not (cfg.checkpoint.export_hf_at_end and topo.is_main):
        return
    from memgpt_dist.hf.export import ExportError, export_run

    try:
        ckpt = export_run(run_dir, run_dir / "hf")
    except (ExportError, OSError) as exc:
        log.error("checkpoint.export_hf_at_end: the export failed (%s); retry with memgpt-export", exc)
        return
    log.info("exported %s to %s (checkpoint.export_hf_at_end)", ckpt, run_dir / "hf")


def _report_resume(trainer: Trainer, point: ResumePoint) -> None:
    """Say where the run continues, and what a resume on another layout moved (rank 0); warn
    about memory that could not move."""
    log.info("resumed from %s at step %d (%s tokens seen)", trainer.checkpointer.root, trainer.state.step,
             f"{trainer.state.tokens_seen:,}")
    if point.change is None:
        return
    carry = trainer.cfg.train.carry_memory
    memory = trainer.checkpointer.part("memory_state")
    moved = "; memory state redistributed by global stream id, head and layer" if carry and memory.carry.layers else ""
    log.info("the %d data streams continue from their saved cursors (%s global samples seen)%s",
             point.change.now.streams, f"{trainer.state.samples_seen:,}", moved)
    if carry and memory.missing_streams:
        log.warning("rank %d: the checkpoint holds no memory state for %d of its %d streams; they start from zero "
                    "memory", trainer.topo.rank, memory.missing_streams, trainer.cfg.parallel.micro_batch_size)
