"""`--dry-run`: the resolved config, every rank's share of the model and memory, and the DeepSpeed dict."""
from __future__ import annotations

import dataclasses
import json
from typing import Optional

from memgpt_dist.config import TrainConfig
from memgpt_dist.parallel.layout import validate_layout
from memgpt_dist.parallel.shares import GiB, LayoutShares, RankShare, rank_shares
from memgpt_dist.parallel.model_build import builds_partitioned
from memgpt_dist.perf.flops import count_flops, format_count


def dry_run_report(cfg: TrainConfig, world_size: int, device_type: Optional[str] = None, as_json: bool = False) -> str:
    """What `--dry-run` prints: the resolved config, the layout with every rank's layers, heads,
    parameters and memory, and the generated DeepSpeed dict (last, as JSON)."""
    from memgpt_dist.parallel.deepspeed_config import build_ds_config, resolve_precision

    layout = validate_layout(cfg, world_size)
    if device_type is None:  # this machine's
        import torch

        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = device_type != "cpu"  # a dry run has no GPU to ask; assume a bf16-capable one
    plan = rank_shares(cfg, layout, resolve_precision(cfg.parallel.precision, device_type, bf16))
    ds = build_ds_config(cfg, world_size, device_type=device_type, bf16_supported=bf16)
    if as_json:
        return json.dumps({"config": cfg.to_dict(), "plan": _shares_dict(plan), "flops": flops_dict(cfg, plan),
                           "deepspeed": ds}, indent=2)
    return "\n".join([f"# resolved config\n{cfg.to_json()}", *format_shares(cfg, plan), *format_flops(cfg, plan),
                      f"# DeepSpeed config\n{json.dumps(ds, indent=2)}"])


def _sample_flops(cfg: TrainConfig):
    """The forward FLOPs of one training sample of data.n_segments segments (memgpt_dist/perf/flops.py)."""
    T = cfg.data.n_segments * cfg.model.segment_len
    return count_flops(cfg.model, cfg.memory, T, cfg.train.carry_memory)


def flops_dict(cfg: TrainConfig, plan: LayoutShares) -> dict:
    """Model FLOPs: forward and training (3x) per token, training per optimizer step over the job."""
    count = _sample_flops(cfg)
    return {"forward_per_token": count.per_token, "train_per_token": count.train_per_token,
            "train_per_step": count.train_per_token * count.tokens * plan.layout.global_batch_size,
            "forward_by_term": {**count.matmul, **count.other}}


def format_flops(cfg: TrainConfig, plan: LayoutShares) -> list[str]:
    """The FLOPs lines of the dry run, with the forward's terms."""
    count, f = _sample_flops(cfg), flops_dict(cfg, plan)
    return [f"# model FLOPs: {f['train_per_token'] / 1e6:,.2f} MFLOPs per token trained (3 x forward "
            f"{f['forward_per_token'] / 1e6:,.2f}), {_fmt_flops(f['train_per_step'])} per step "
            f"({plan.layout.global_batch_size} samples x {count.tokens} tokens); forward by term:",
            format_count(count)]


def _fmt_flops(n: float) -> str:
    for unit, size in (("PFLOPs", 1e15), ("TFLOPs", 1e12), ("GFLOPs", 1e9)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n / 1e6:,.2f} MFLOPs"


def format_shares(cfg: TrainConfig, plan: LayoutShares) -> list[str]:
    """Human-readable lines: the layout, its warnings, one row per rank, and what the columns mean."""
    lay = plan.layout
    tokens = lay.global_batch_size * cfg.data.n_segments * cfg.model.segment_len
    lines = [f"# layout: world {lay.world_size} = pp {lay.pp} x dp {lay.dp} x tp {lay.tp} "
             f"(ranks in DeepSpeed's pipe, data, model order: tp fastest); ZeRO-{lay.zero_stage}, {plan.precision}",
             f"# global batch {lay.global_batch_size} samples = micro-batch {lay.micro_batch_size} x grad_accum "
             f"{lay.grad_accum} x dp {lay.dp} ({tokens:,} tokens per step)",
             f"# parameters: {plan.n_params:,}" + (" (tied head counted once)" if cfg.model.tie_embeddings else "") + _split_text(cfg, plan),
             _build_text(cfg, plan),
             *(f"# warning: {w}" for w in lay.warnings),
             "# rank  dp  pp  tp  layers                          heads   params        weights    grads      "
             "optimizer  activ.     mem state  total"]
    lines += [_rank_line(r) for r in plan.ranks]
    lines.append("# memory per rank: weights and gradients in the training precision, optimizer = fp32 master + "
                 "2 Adam moments, divided by dp as the ZeRO stage partitions them; activations for the micro-batches "
                 "in flight (rough; memgpt_dist/parallel/layout.py:activation_bytes); mem state = fp32 A and z of "
                 "the rank's layers that have the memory (memory.layers) and heads for micro_batch_size streams")
    return lines


def _build_text(cfg: TrainConfig, plan: LayoutShares) -> str:
    """How each rank builds the model before the engine: partitioned (zero.Init) or whole."""
    if builds_partitioned(cfg.parallel):
        return ("# model build: partitioned by deepspeed.zero.Init (parallel.zero_init): no rank holds the whole "
                "model; the build adds one module's weights whole at a time")
    if cfg.parallel.pp > 1:
        return ("# model build: each rank builds only its stage's parameters (the others stay on the meta device)"
                + ("; each of its TP ranks builds the stage whole, then keeps its heads" if cfg.parallel.tp > 1 else ""))
    return (f"# model build: whole on every rank first ({_fmt_bytes(4 * plan.n_params)} fp32), then "
            f"{'sliced by TP and ' if cfg.parallel.tp > 1 else ''}partitioned"
            + ("" if cfg.parallel.zero_stage != 3 or cfg.parallel.tp > 1 else "; parallel.zero_init=true builds it "
               "partitioned"))


def _split_text(cfg: TrainConfig, plan: LayoutShares) -> str:
    if plan.layout.pp == 1:
        return ""
    stages = ", ".join(f"stage {s} {n:,}" for s, n in enumerate(plan.stage_params))
    return f"; pipeline split by {cfg.parallel.pp_partition} (the tied head counted on both ends): {stages}"


def _rank_line(r: RankShare) -> str:
    mem = r.memory
    sizes = (mem.weights, mem.gradients, mem.optimizer, mem.activations, mem.memory_state, mem.total)
    return (f"  {r.rank:4d} {r.place.dp:3d} {r.place.pp:3d} {r.place.tp:3d}  {_layers_text(r):<31s} "
            f"{r.heads[0]:>2d}-{r.heads[1] - 1:<3d}  {r.n_params:>12,}  " + " ".join(f"{_fmt_bytes(s):>10s}" for s in sizes))


def _layers_text(r: RankShare) -> str:
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


def _shares_dict(plan: LayoutShares) -> dict:
    out = dataclasses.asdict(plan)
    for rank, r in zip(out["ranks"], plan.ranks):
        rank["memory"]["total"] = r.memory.total
        rank["memory_gib"] = round(r.memory.total / GiB, 4)
    return out
