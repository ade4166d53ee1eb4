"""Parallel layouts: check a (dp, tp, pp, ZeRO) layout against a world size, and plan it.

`validate_layout` holds the checks that need the world size (the ones that need only the model
run at config load, in `ParallelConfig.validate_for_model`). `plan_layout` says, without any
accelerator, torch.distributed or DeepSpeed engine, which rank holds which layers and heads,
how many parameters, and roughly how many bytes; `dry_run_report` prints that for `--dry-run`.

Rank order is DeepSpeed's `PipeModelDataParallelTopology`: axes (pipe, data, model), row-major,
so tp is the fastest axis: rank = (pp_rank * dp + dp_rank) * tp + tp_rank. The pipeline split
matches `PipelineModule(partition_method="parameters" | "uniform")` over the layer list
[embed, block 0 .. block L-1, norm+head], where the tied head counts the embedding weight again
(TiedLayerSpec builds it on the last stage, and DeepSpeed counts what it builds).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from memgpt_dist.config import ConfigError, ParallelConfig, TrainConfig

log = logging.getLogger("memgpt_dist")

GiB = 1024**3

# Parameters split across tensor-parallel ranks: projections whose output features are heads or
# MLP units (column-parallel, weight and bias) and whose input features are (row-parallel,
# weight only). Norms, embeddings and row-parallel biases are replicated on every TP rank.
TP_SHARDED_SUFFIXES = (
    "attn.q_proj.weight", "attn.q_proj.bias", "attn.k_proj.weight", "attn.k_proj.bias",
    "attn.v_proj.weight", "attn.v_proj.bias", "attn.o_proj.weight",
    "attn.mem_q_proj.weight", "attn.mem_k_proj.weight", "attn.mem_v_proj.weight",
    "attn.mem_write_gate.weight", "attn.mem_write_gate.bias", "attn.mem_beta",
    "attn.mem_q_conv.weight", "attn.mem_k_conv.weight", "attn.mem_v_conv.weight",  # depthwise: per channel
    "mlp.up_proj.weight", "mlp.up_proj.bias", "mlp.down_proj.weight",
)
TIED_EMBEDDING = "wte.weight"


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class RankCoord:
    """A rank's place in the grid: data-parallel replica, pipeline stage, tensor-parallel shard."""

    dp: int
    pp: int
    tp: int


def rank_coord(rank: int, dp: int, tp: int) -> RankCoord:
    """Coordinates of a global rank in a grid of dp replicas of tp ranks per pipeline stage."""
    return RankCoord(dp=rank // tp % dp, pp=rank // (tp * dp), tp=rank % tp)


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

    def coord(self, rank: int) -> RankCoord:
        """Coordinates of a global rank, in PipeModelDataParallelTopology order (tp fastest)."""
        return rank_coord(rank, self.dp, self.tp)

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

    def rank(self, coord: RankCoord) -> int:
        """The global rank at `coord`; the inverse of `coord`."""
        return (coord.pp * self.dp + coord.dp) * self.tp + coord.tp


def validate_layout(cfg: TrainConfig, world_size: int) -> Layout:
    """Check `cfg.parallel` at `world_size` and derive the layout; raises `ConfigError` with the
    nearest valid layout. A pipeline with fewer micro-batches than stages is valid but gets a
    warning in `Layout.warnings`."""
    par = cfg.parallel
    if world_size < 1:
        raise ConfigError(f"world size {world_size}: it must be >= 1")
    if world_size % (par.tp * par.pp):
        raise ConfigError(_world_size_message(cfg, world_size))
    dp = world_size // (par.tp * par.pp)
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
                  if model.n_head % tp == 0 and world_size % (tp * pp) == 0 and (pp == 1 or par.zero_stage < 2)]
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
    """[embed, block 0 .. block L-1, norm+head] with the parameters each one holds."""
    def starting(*prefixes: str) -> tuple[str, ...]:
        return tuple(n for n in param_names if n.startswith(prefixes))

    items = (PipeItem("embed", starting("wte.", "wpe.")),
             *(PipeItem(f"block.{i}", starting(f"blocks.{i}.")) for i in range(n_layer)),
             PipeItem("norm+head", starting("ln_f.") + (TIED_EMBEDDING,)))
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


# --------------------------------------------------------------------------- plan and memory


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated bytes on one rank (see `plan_layout` for the formulas)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    memory_state: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.memory_state


@dataclass(frozen=True)
class RankPlan:
    """What one rank holds."""

    rank: int
    coord: RankCoord
    items: tuple[str, ...]  # pipeline items of its stage
    blocks: tuple[int, ...]  # transformer blocks among them
    heads: tuple[int, int]  # [first, last + 1) attention heads (and memory heads) of its TP shard
    n_params: int  # parameters it holds before ZeRO partitioning (its stage, its TP shard)
    memory: MemoryEstimate


@dataclass(frozen=True)
class LayoutPlan:
    """A validated layout with every rank's share of the model and of the memory."""

    layout: Layout
    precision: str  # resolved: "fp32", "bf16" or "fp16"
    n_params: int  # the model's parameters, the tied head counted once
    stage_params: tuple[int, ...]  # the partition weights of each stage, as DeepSpeed counts them
    ranks: tuple[RankPlan, ...]


def parameter_numels(cfg: TrainConfig) -> dict[str, int]:
    """Parameter name -> element count, from a model built on the meta device (nothing allocated)."""
    import torch

    from memgpt_dist.model import GPT

    with torch.device("meta"):
        model = GPT(cfg.model, cfg.memory)
    return {name: p.numel() for name, p in model.named_parameters()}


def plan_layout(cfg: TrainConfig, layout: Layout, precision: str,
                numels: Optional[dict[str, int]] = None) -> LayoutPlan:
    """Split the model over the layout's ranks and estimate each rank's memory.

    Per rank, with P its parameters (stage and TP shard), w = 2 bytes for bf16/fp16 else 4:
    weights P*w, gradients P*w, optimizer 12 bytes per parameter (fp32 master copy + Adam's two
    fp32 moments; no master copy under plain fp32 ZeRO-0). ZeRO divides by dp: stage 1 the
    optimizer states, stage 2 also the gradients, stage 3 also the weights. Activations and the
    memory state: see `activation_bytes` and `memory_state_bytes`.
    """
    numels = numels if numels is not None else parameter_numels(cfg)
    items = pipeline_items(list(numels), cfg.model.n_layer)
    weights = [sum(numels[n] for n in item.params) for item in items]
    bounds = stage_bounds(weights, layout.pp, cfg.parallel.pp_partition)
    ranks = tuple(_rank_plan(cfg, layout, precision, numels, items[bounds[c.pp]:bounds[c.pp + 1]], c, r)
                  for r, c in ((r, layout.coord(r)) for r in range(layout.world_size)))
    stage_params = tuple(sum(weights[bounds[s]:bounds[s + 1]]) for s in range(layout.pp))
    return LayoutPlan(layout, precision, sum(numels.values()), stage_params, ranks)


def _rank_plan(cfg: TrainConfig, layout: Layout, precision: str, numels: dict[str, int],
               stage: Sequence[PipeItem], coord: RankCoord, rank: int) -> RankPlan:
    heads_per_rank = cfg.model.n_head // layout.tp
    held = {n for item in stage for n in item.params}  # a set: pp=1 holds the tied weight once
    n_params = sum(numels[n] // layout.tp if n.endswith(TP_SHARDED_SUFFIXES) else numels[n] for n in held)
    blocks = tuple(int(item.name.split(".")[1]) for item in stage if item.name.startswith("block."))
    has_head = stage[-1].name == "norm+head"
    # 1F1B: stage s keeps the activations of up to pp - s micro-batches in flight
    in_flight = min(layout.pp - coord.pp, layout.grad_accum)
    act = in_flight * activation_bytes(cfg, len(blocks), has_head, layout.tp, precision)
    memory = MemoryEstimate(*_model_state_bytes(n_params, layout, precision), activations=act,
                            memory_state=memory_state_bytes(cfg, len(blocks), layout.tp))
    return RankPlan(rank, coord, tuple(item.name for item in stage), blocks,
                    (coord.tp * heads_per_rank, (coord.tp + 1) * heads_per_rank), n_params, memory)


def _model_state_bytes(n_params: int, layout: Layout, precision: str) -> tuple[int, int, int]:
    """(weights, gradients, optimizer states) bytes of `n_params` parameters after ZeRO."""
    w = 2 if precision in ("bf16", "fp16") else 4
    master = 4 if w == 2 or layout.zero_stage >= 1 else 0  # ZeRO keeps an fp32 copy even for fp32
    stage, dp = layout.zero_stage, layout.dp
    return (n_params * w // (dp if stage >= 3 else 1),
            n_params * w // (dp if stage >= 2 else 1),
            n_params * (master + 8) // (dp if stage >= 1 else 1))


def activation_bytes(cfg: TrainConfig, n_blocks: int, has_head: bool, tp: int, precision: str) -> int:
    """Rough bytes stored for the backward pass of one micro-batch on `n_blocks` blocks.

    b samples of T = n_segments * segment_len tokens, width h, H heads, MLP width I, tp shards,
    a = 2 bytes (bf16/fp16) or 4 (fp32). A block keeps (in a bytes) 4bTh replicated tensors (the
    two LayerNorms' inputs and outputs), 5bTh/tp (q, k, v, attention output, o_proj input),
    2bTI/tp (MLP up output and GELU output), and b(H/tp)*T*N attention probabilities: attention is
    causal inside a segment of N tokens, so the score matrix is T x N, not T x T (flash kernels
    keep less). The memory adds 3bTh/tp + bTH/tp (its projections and write gates) in a bytes
    and, in fp32, 2bT(H/tp)dk DPFP features, 2bTh/tp values and reads, and K per-segment states of
    b(H/tp)dk(hd+1) (gradients flow through all K segments). With activation checkpointing a block
    keeps only its input bTh, plus one block's full set while it is recomputed. The stage holding
    the head adds the logits bTV in a bytes, their fp32 copy and fp32 log-softmax (8 bytes).
    """
    m, mem, par = cfg.model, cfg.memory, cfg.parallel
    a = 2 if precision in ("bf16", "fp16") else 4
    b, K, N, h, H = par.micro_batch_size, cfg.data.n_segments, m.segment_len, m.n_embd, m.n_head
    T, inner, hd = K * N, m.mlp_ratio * m.n_embd, m.head_dim
    block = a * (4 * b * T * h + (5 * b * T * h + 2 * b * T * inner + b * H * T * N) // tp)
    if mem.enabled:
        dk = _feature_dim(hd, mem.nu)
        block += a * (3 * b * T * h + b * T * H) // tp
        block += 4 * (2 * b * T * H * dk + 2 * b * T * h + K * b * H * dk * (hd + 1)) // tp
    if n_blocks == 0:
        stored = 0
    elif par.activation_checkpointing:
        stored = n_blocks * (a * b * T * h) + block
    else:
        stored = n_blocks * block
    return stored + (b * T * m.vocab_size * (a + 8) if has_head else 0)


def memory_state_bytes(cfg: TrainConfig, n_blocks: int, tp: int) -> int:
    """fp32 memory state of one micro-batch on the rank: per block and held head, A (dk, hd) and
    z (dk,) for each of micro_batch_size streams."""
    if not cfg.memory.enabled:
        return 0
    hd = cfg.model.head_dim
    dk = _feature_dim(hd, cfg.memory.nu)
    return 4 * cfg.parallel.micro_batch_size * n_blocks * (cfg.model.n_head // tp) * (dk * hd + dk)


def _feature_dim(head_dim: int, nu: int) -> int:
    # DPFP keys have 2 * nu * head_dim features; nu = 0 (raw keys, memory.kind="delta") keeps head_dim
    return 2 * nu * head_dim if nu > 0 else head_dim


# --------------------------------------------------------------------------- dry run


def dry_run_report(cfg: TrainConfig, world_size: int, device_type: str, as_json: bool = False) -> str:
    """What `--dry-run` prints: the resolved config, the layout with every rank's layers, heads,
    parameters and memory, and the generated DeepSpeed dict (last, as JSON)."""
    from memgpt_dist.parallel.deepspeed_config import build_ds_config, resolve_precision

    layout = validate_layout(cfg, world_size)
    bf16 = device_type != "cpu"  # a dry run has no GPU to ask; assume a bf16-capable one
    plan = plan_layout(cfg, layout, resolve_precision(cfg.parallel.precision, device_type, bf16))
    ds = build_ds_config(cfg, world_size, device_type=device_type, bf16_supported=bf16)
    if as_json:
        return json.dumps({"config": cfg.to_dict(), "plan": _plan_dict(plan), "deepspeed": ds}, indent=2)
    return "\n".join([f"# resolved config\n{cfg.to_json()}", *format_plan(cfg, plan),
                      f"# DeepSpeed config\n{json.dumps(ds, indent=2)}"])


def format_plan(cfg: TrainConfig, plan: LayoutPlan) -> list[str]:
    """Human-readable lines: the layout, its warnings, one row per rank, and what the columns mean."""
    lay = plan.layout
    tokens = lay.global_batch_size * cfg.data.n_segments * cfg.model.segment_len
    lines = [f"# layout: world {lay.world_size} = pp {lay.pp} x dp {lay.dp} x tp {lay.tp} "
             f"(ranks in DeepSpeed's pipe, data, model order: tp fastest); ZeRO-{lay.zero_stage}, {plan.precision}",
             f"# global batch {lay.global_batch_size} samples = micro-batch {lay.micro_batch_size} x grad_accum "
             f"{lay.grad_accum} x dp {lay.dp} ({tokens:,} tokens per step)",
             f"# parameters: {plan.n_params:,} (tied head counted once)" + _split_text(cfg, plan),
             *(f"# warning: {w}" for w in lay.warnings),
             "# rank  dp  pp  tp  layers                          heads   params        weights    grads      "
             "optimizer  activ.     mem state  total"]
    lines += [_rank_line(r) for r in plan.ranks]
    lines.append("# memory per rank: weights and gradients in the training precision, optimizer = fp32 master + "
                 "2 Adam moments, divided by dp as the ZeRO stage partitions them; activations for the micro-batches "
                 "in flight (rough; memgpt_dist/parallel/layout.py:activation_bytes); mem state = fp32 A and z of "
                 "the rank's layers and heads for micro_batch_size streams")
    return lines


def _split_text(cfg: TrainConfig, plan: LayoutPlan) -> str:
    if plan.layout.pp == 1:
        return ""
    stages = ", ".join(f"stage {s} {n:,}" for s, n in enumerate(plan.stage_params))
    return f"; pipeline split by {cfg.parallel.pp_partition} (the tied head counted on both ends): {stages}"


def _rank_line(r: RankPlan) -> str:
    mem = r.memory
    sizes = (mem.weights, mem.gradients, mem.optimizer, mem.activations, mem.memory_state, mem.total)
    return (f"  {r.rank:4d} {r.coord.dp:3d} {r.coord.pp:3d} {r.coord.tp:3d}  {_layers_text(r):<31s} "
            f"{r.heads[0]:>2d}-{r.heads[1] - 1:<3d}  {r.n_params:>12,}  " + " ".join(f"{_fmt_bytes(s):>10s}" for s in sizes))


def _layers_text(r: RankPlan) -> str:
    parts = ["embed"] if "embed" in r.items else []
    if r.blocks:
        parts.append(f"blocks {r.blocks[0]}-{r.blocks[-1]}" if len(r.blocks) > 1 else f"block {r.blocks[0]}")
    if "norm+head" in r.items:
        parts.append("norm+head")
    return ", ".join(parts)


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _plan_dict(plan: LayoutPlan) -> dict:
    out = dataclasses.asdict(plan)
    for rank, r in zip(out["ranks"], plan.ranks):
        rank["memory"]["total"] = r.memory.total
        rank["memory_gib"] = round(r.memory.total / GiB, 4)
    return out
