"""Parallel layouts: check a (dp, tp, pp, ZeRO) layout against a world size; where each rank sits.

`validate_layout` holds the checks that need the world size (the ones that need only the model
run at config load, in `ParallelConfig.validate_for_model`). Each rank's `RankPlace` (dp, pp, tp)
and head range are computed here; what each rank holds of the model, and how many bytes, is
`parallel.shares`, and `--dry-run` prints it (`parallel.dry_run`).

Rank order is DeepSpeed's `PipeModelDataParallelTopology`: axes (pipe, data, model), row-major,
so tp is the fastest axis: rank = (pp_rank * dp + dp_rank) * tp + tp_rank. The pipeline split
matches `PipelineModule(partition_method="parameters" | "uniform")` over the layer list
[embed, block 0 .. block L-1, norm+head], where the tied head counts the embedding weight again
(TiedLayerSpec builds it on the last stage, and DeepSpeed counts what it builds).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Sequence

from memgpt_dist.config import ConfigError, ParallelConfig, TrainConfig
from memgpt_dist.parallel.tensor_parallel import head_slice

log = logging.getLogger("memgpt_dist")

TIED_EMBEDDING = "wte.weight"


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class RankPlace:
    """A rank's place in the grid: data-parallel replica, pipeline stage, tensor-parallel shard."""

    dp: int
    pp: int
    tp: int


def head_range(n_head: int, tp_rank: int, tp: int) -> tuple[int, int]:
    """The attention heads [first, last + 1) that TP rank `tp_rank` of `tp` holds, with their
    memory: the rank's contiguous block, as AutoTP splits the projections' output features."""
    block = head_slice(n_head, tp_rank, tp)
    return block.start, block.stop


def place_of(rank: int, dp: int, tp: int) -> RankPlace:
    """Coordinates of a global rank in a grid of dp replicas of tp ranks per pipeline stage."""
    return RankPlace(dp=rank // tp % dp, pp=rank // (tp * dp), tp=rank % tp)


@dataclass(frozen=True)
class Layout:
    """A validated layout at one world size. Derived values are computed here, once."""

    world_size: int
    dp: int
    tp: int
    pp: int
    zero_stage: int
    micro_batch_size: int
    grad_accum: int
    global_batch_size: int  # samples per optimizer step, all ranks
    warnings: tuple[str, ...] = ()

    def place(self, rank: int) -> RankPlace:
        """Coordinates of a global rank, in PipeModelDataParallelTopology order (tp fastest)."""
        return place_of(rank, self.dp, self.tp)

    @property
    def streams(self) -> int:
        """Rows of the global batch: the loader's streams (each read by one dp replica)."""
        return self.dp * self.micro_batch_size

    def same_shards(self, other: "Layout") -> bool:
        """True when each rank's checkpoint files fit `other` as they are."""
        return (self.dp, self.tp, self.pp, self.zero_stage) == (other.dp, other.tp, other.pp, other.zero_stage)

    def __str__(self) -> str:
        parts = [f"dp{self.dp}"] + [f"{name}{n}" for name, n in (("tp", self.tp), ("pp", self.pp)) if n > 1]
        return f"{' x '.join(parts)} ZeRO-{self.zero_stage} (micro-batch {self.micro_batch_size})"

    def rank(self, place: RankPlace) -> int:
        """The global rank at `place`; the inverse of `place`."""
        return (place.pp * self.dp + place.dp) * self.tp + place.tp


def validate_layout(cfg: TrainConfig, world_size: int) -> Layout:
    """Check `cfg.parallel` at `world_size` and derive the layout; raises `ConfigError` with the
    nearest valid layout. A pipeline with fewer micro-batches than stages is valid but gets a
    warning in `Layout.warnings`."""
    par = cfg.parallel
    if world_size < 1:
        raise ConfigError(f"world size {world_size}: it must be >= 1")
    if world_size % (par.tp * par.pp):
        raise ConfigError(_world_size_message(cfg, world_size))
    dp = par.dp(world_size)
    return Layout(world_size=world_size, dp=dp, tp=par.tp, pp=par.pp, zero_stage=par.zero_stage,
                  micro_batch_size=par.micro_batch_size, grad_accum=par.grad_accum,
                  global_batch_size=_global_batch(par, dp), warnings=tuple(_bubble_warnings(par)))


def require_executable_layout(cfg: TrainConfig, world_size: int) -> Layout:
    """The trainer's gate: a valid layout that this version can also execute: ZeRO-0..3 x TP x DP,
    or a pipeline (1F1B) x TP x DP with ZeRO-0/1."""
    layout = validate_layout(cfg, world_size)
    for warning in layout.warnings:
        log.warning(warning)
    if layout.pp > 1:
        _require_executable_pipeline(cfg, layout)
    return layout


def _require_executable_pipeline(cfg: TrainConfig, layout: Layout) -> None:
    if layout.zero_stage == 0 and cfg.optim.grad_clip > 0 and cfg.parallel.precision == "fp16":
        # fp32 pipelines are clipped by our own whole-model norm (pipeline.step_by_whole_model_norm)
        # and bf16 ones by DeepSpeed's pipeline-aware BF16 optimizer; the fp16 optimizer's norm over
        # the pipeline grid is unverified, and DeepSpeed's fp32 one measurably wrong
        raise ConfigError(f"parallel.zero_stage=0 with parallel.pp={layout.pp}, parallel.precision=fp16 and "
                          f"optim.grad_clip={cfg.optim.grad_clip}: the gradient norm that DeepSpeed's fp16 optimizer "
                          f"clips pipeline gradients by is not verified to count every stage; use "
                          f"parallel.zero_stage=1, parallel.precision=bf16 or fp32, or optim.grad_clip=0")
    _require_memory_on_every_stage(cfg, layout)


def _require_memory_on_every_stage(cfg: TrainConfig, layout: Layout) -> None:
    """With `memory.layers`, every stage needs a block with memory: the memory's mix gates have
    their own optimizer group, which a stage without them lacks, and DeepSpeed's optimizer runs
    its gradient-norm collectives over the pipeline grid once per group (a stage with fewer groups
    leaves the others waiting: a hang)."""
    if not (cfg.memory.enabled and cfg.memory.layers.strip()):
        return
    from memgpt_dist.parallel.shares import stage_blocks  # builds the model on the meta device

    bare = [(s, blocks) for s, blocks in enumerate(stage_blocks(cfg))
            if not any(cfg.memory.has_memory(i) for i in blocks)]
    if bare:
        named = "; ".join(f"stage {s}: blocks {', '.join(map(str, b))}" for s, b in bare)
        fixed = sorted({*cfg.memory.memory_layers(cfg.model.n_layer), *(b[-1] for _, b in bare)})
        raise ConfigError(f"memory.layers={cfg.memory.layers!r} with parallel.pp={layout.pp} leaves pipeline stage(s) "
                          f"without a block that has the memory ({named}), and DeepSpeed's optimizer cannot run "
                          f"stages with different parameter groups; put the memory in a block of every stage "
                          f"(e.g. memory.layers={','.join(map(str, fixed))}), or use parallel.pp=1")


def bubble_fraction(pp: int, n_micro: int) -> float:
    """Idle share of a 1F1B pipeline step: (pp - 1) / (m + pp - 1) for m micro-batches."""
    return (pp - 1) / (n_micro + pp - 1)


def _world_size_message(cfg: TrainConfig, world_size: int) -> str:
    par = cfg.parallel
    mp = par.tp * par.pp
    sizes = [s for s in (world_size // mp * mp, (world_size // mp + 1) * mp) if s > 0]
    tp, pp = _nearest_fitting_degrees(cfg, world_size)
    return (f"world size {world_size} is not divisible by parallel.tp x parallel.pp = {par.tp} x {par.pp} = {mp}: "
            f"each data-parallel replica needs a whole tp x pp grid of ranks; run on "
            f"{' or '.join(map(str, sizes))} ranks, or use parallel.tp={tp} parallel.pp={pp} on {world_size}")


def _nearest_fitting_degrees(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """The (tp, pp) closest to the configured one that fits `world_size` and the model."""
    par, model = cfg.parallel, cfg.model
    candidates = [(tp, pp) for tp in range(1, model.n_head + 1) for pp in range(1, model.n_layer + 1)
                  if model.n_head % tp == 0 and model.kv_heads % tp == 0 and world_size % (tp * pp) == 0 and (pp == 1 or par.zero_stage < 2)]
    # closest degrees first; among equally close ones, keep the most model parallelism
    return min(candidates, key=lambda c: (abs(c[0] - par.tp) + abs(c[1] - par.pp), -c[0] * c[1]))


def _global_batch(par: ParallelConfig, dp: int) -> int:
    """Samples per optimizer step; a configured global_batch_size must be what the layout gives."""
    per_micro_step = par.micro_batch_size * dp
    derived = per_micro_step * par.grad_accum
    want = par.global_batch_size
    if want == 0:
        return derived
    if want % per_micro_step:
        raise ConfigError(_batch_divisibility_message(par, dp))
    if want != derived:
        raise ConfigError(f"parallel.global_batch_size={want} but parallel.micro_batch_size x parallel.grad_accum "
                          f"x dp = {par.micro_batch_size} x {par.grad_accum} x {dp} = {derived}; set "
                          f"parallel.grad_accum={want // per_micro_step} to keep the global batch, or "
                          f"parallel.global_batch_size=0 to derive it")
    return derived


def _batch_divisibility_message(par: ParallelConfig, dp: int) -> str:
    want, mb = par.global_batch_size, par.micro_batch_size
    step = mb * dp
    near = [n for n in (want // step * step, (want // step + 1) * step) if n > 0]
    options = [f"parallel.global_batch_size={n} (grad_accum {n // step})" for n in near]
    if want % dp == 0:  # a micro-batch size that divides the per-rank share keeps the batch
        per_rank = want // dp
        mb_near = min((d for d in range(1, per_rank + 1) if per_rank % d == 0), key=lambda d: abs(d - mb))
        options.append(f"parallel.micro_batch_size={mb_near} with parallel.grad_accum={per_rank // mb_near}")
    return (f"parallel.global_batch_size={want} is not divisible by parallel.micro_batch_size x dp = {mb} x {dp} = "
            f"{step}: every data-parallel rank takes whole micro-batches in every step; use {' or '.join(options)}")


def _bubble_warnings(par: ParallelConfig) -> Iterable[str]:
    if par.pp > 1 and par.grad_accum < par.pp:
        m, pp = par.grad_accum, par.pp
        yield (f"pipeline bubble: parallel.grad_accum={m} micro-batches per step on parallel.pp={pp} stages leaves "
               f"each stage idle {bubble_fraction(pp, m):.0%} of the step ((pp-1)/(m+pp-1)); raise "
               f"parallel.grad_accum to {pp} ({bubble_fraction(pp, pp):.0%}) or {4 * pp} "
               f"({bubble_fraction(pp, 4 * pp):.0%}), lowering parallel.micro_batch_size to keep the global batch")


# --------------------------------------------------------------------------- pipeline split


@dataclass(frozen=True)
class PipeItem:
    """One entry of the pipeline's layer list, as a DeepSpeed LayerSpec would build it."""

    name: str  # "embed", "block.3" or "norm+head"
    params: tuple[str, ...]  # model parameter names it holds (the tied head holds wte.weight too)


def pipeline_items(param_names: Sequence[str], n_layer: int) -> tuple[PipeItem, ...]:
    """[embed, block 0 .. block L-1, norm+head] with the parameters each one holds (the head:
    ln_f and the tied embedding, or ln_f and the untied `lm_head`)."""
    def starting(*prefixes: str) -> tuple[str, ...]:
        return tuple(n for n in param_names if n.startswith(prefixes))

    untied = any(n.startswith("lm_head.") for n in param_names)
    head = starting("ln_f.", "lm_head.") + (() if untied else (TIED_EMBEDDING,))
    items = (PipeItem("embed", starting("wte.", "wpe.")),
             *(PipeItem(f"block.{i}", starting(f"blocks.{i}.")) for i in range(n_layer)),
             PipeItem("norm+head", head))
    assert {n for item in items for n in item.params} == set(param_names), "a parameter outside the pipeline items"
    return items


def stage_bounds(weights: Sequence[int], pp: int, method: str) -> tuple[int, ...]:
    """Item index bounds of the pp stages (stage s holds items [b[s], b[s+1])), computed as
    DeepSpeed's PipelineModule does for partition_method "uniform" or "parameters"."""
    if method == "uniform":
        return partition_uniform(len(weights), pp)
    return partition_balanced(weights, pp)


def partition_uniform(n_items: int, n_parts: int) -> tuple[int, ...]:
    """deepspeed.runtime.utils.partition_uniform: equal counts, the first parts one larger."""
    if n_items <= n_parts:
        return tuple(min(p, n_items) for p in range(n_parts + 1))
    size, residual = divmod(n_items, n_parts)
    return tuple(p * size + min(p, residual) for p in range(n_parts + 1))


def partition_balanced(weights: Sequence[int], n_parts: int) -> tuple[int, ...]:
    """deepspeed.runtime.utils.partition_balanced, ported so that a dry run imports no DeepSpeed:
    the linear partition minimising max - min part weight, same ties (tested against it)."""
    n, inf = len(weights), float("inf")
    if n <= n_parts:
        return partition_uniform(n, n_parts)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    hi = [[inf] * (n_parts + 1) for _ in range(n + 1)]  # largest part so far
    lo = [[inf] * (n_parts + 1) for _ in range(n + 1)]  # smallest part so far
    cost = [[inf] * (n_parts + 1) for _ in range(n + 1)]
    cut = [[0] * (n_parts + 1) for _ in range(n + 1)]
    hi[0][0] = cost[0][0] = 0
    for i in range(1, n + 1):
        for j in range(1, min(i, n_parts) + 1):
            for k in range(i):
                part = prefix[i] - prefix[k]
                top, bottom = max(hi[k][j - 1], part), min(lo[k][j - 1], part)
                if cost[i][j] >= top - bottom:  # >=: the last cut wins ties, as in DeepSpeed
                    cost[i][j], hi[i][j], lo[i][j], cut[i][j] = top - bottom, top, bottom, k
    bounds = [n]
    for j in range(n_parts, 0, -1):
        bounds.append(cut[bounds[-1]][j])
    return tuple(reversed(bounds))
