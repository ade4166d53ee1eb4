"""What each rank holds of the model: layers, heads, parameters, and an estimate of its memory.

`rank_shares` says, without any accelerator, torch.distributed or DeepSpeed engine, which rank
holds which pipeline items, blocks and heads, how many parameters, and roughly how many bytes of
weights, gradients, optimizer state, activations and memory state (`--dry-run` prints it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from memgpt_dist.config import TrainConfig
from memgpt_dist.model.memory import feature_dim
from memgpt_dist.parallel.layout import (Layout, PipeItem, RankPlace, head_range, pipeline_items, stage_bounds)
from memgpt_dist.parallel.tensor_parallel import tp_sharded_suffixes

GiB = 1024**3

# Parameters split across tensor-parallel ranks (the TP rules' own table, so the estimate and the
# sharding cannot disagree); norms, embeddings and row-parallel biases are replicated.
TP_SHARDED_SUFFIXES = tp_sharded_suffixes()



@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated bytes on one rank (see `rank_shares` for the formulas)."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    memory_state: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.memory_state


@dataclass(frozen=True)
class RankShare:
    """What one rank holds."""

    rank: int
    place: RankPlace
    items: tuple[str, ...]  # pipeline items of its stage
    blocks: tuple[int, ...]  # transformer blocks among them
    heads: tuple[int, int]  # [first, last + 1) attention heads (and memory heads) of its TP shard
    n_params: int  # parameters it holds before ZeRO partitioning (its stage, its TP shard)
    memory: MemoryEstimate


@dataclass(frozen=True)
class LayoutShares:
    """A validated layout with every rank's share of the model and of the memory."""

    layout: Layout
    precision: str  # resolved: "fp32", "bf16" or "fp16"
    n_params: int  # the model's parameters, the tied head counted once
    stage_params: tuple[int, ...]  # the partition weights of each stage, as DeepSpeed counts them
    ranks: tuple[RankShare, ...]


def parameter_numels(cfg: TrainConfig) -> dict[str, int]:
    """Parameter name -> element count, from a model built on the meta device (nothing allocated)."""
    import torch

    from memgpt_dist.model import GPT

    with torch.device("meta"):
        model = GPT(cfg.model, cfg.memory)
    return {name: p.numel() for name, p in model.named_parameters()}


def rank_shares(cfg: TrainConfig, layout: Layout, precision: str,
                numels: Optional[dict[str, int]] = None) -> LayoutShares:
    """Split the model over the layout's ranks and estimate each rank's memory.

    Per rank, with P its parameters (stage and TP shard), w = 2 bytes for bf16/fp16 else 4:
    weights P*w, gradients P*w, optimizer 12 bytes per parameter (fp32 master copy + Adam's two
    fp32 moments; no master copy under plain fp32 ZeRO-0). ZeRO divides by dp: stage 1 the
    optimizer states, stage 2 also the gradients, stage 3 also the weights. Activations and the
    memory state: see `activation_bytes` and `memory_state_bytes`.
    """
    numels = numels if numels is not None else parameter_numels(cfg)
    items, weights, bounds = _stages(cfg, numels, layout.pp)
    ranks = tuple(_rank_share(cfg, layout, precision, numels, items[bounds[c.pp]:bounds[c.pp + 1]], c, r)
                  for r, c in ((r, layout.place(r)) for r in range(layout.world_size)))
    stage_params = tuple(sum(weights[bounds[s]:bounds[s + 1]]) for s in range(layout.pp))
    return LayoutShares(layout, precision, sum(numels.values()), stage_params, ranks)


def _stages(cfg: TrainConfig, numels: dict[str, int], pp: int):
    """(pipeline items, their parameter counts, the stages' item bounds) as DeepSpeed splits them."""
    items = pipeline_items(list(numels), cfg.model.n_layer)
    weights = [sum(numels[n] for n in item.params) for item in items]
    return items, weights, stage_bounds(weights, pp, cfg.parallel.pp_partition)


def stage_blocks(cfg: TrainConfig) -> list[tuple[int, ...]]:
    """The blocks (global indices) each of the `parallel.pp` pipeline stages holds."""
    items, _, bounds = _stages(cfg, parameter_numels(cfg), cfg.parallel.pp)
    return [tuple(int(item.name.split(".")[1]) for item in items[bounds[s]:bounds[s + 1]]
                  if item.name.startswith("block.")) for s in range(cfg.parallel.pp)]


def stage_parameter_names(cfg: TrainConfig, stage: int) -> frozenset[str]:
    """The model parameters pipeline stage `stage` of `parallel.pp` holds (the last one holds the
    tied embedding too): a rank builds only these (`memgpt_dist.train.run.build_model`)."""
    items, _, bounds = _stages(cfg, parameter_numels(cfg), cfg.parallel.pp)
    return frozenset(n for item in items[bounds[stage]:bounds[stage + 1]] for n in item.params)


def _rank_share(cfg: TrainConfig, layout: Layout, precision: str, numels: dict[str, int],
               stage: Sequence[PipeItem], place: RankPlace, rank: int) -> RankShare:
    held = {n for item in stage for n in item.params}  # a set: pp=1 holds the tied weight once
    n_params = sum(numels[n] // layout.tp if n.endswith(TP_SHARDED_SUFFIXES) else numels[n] for n in held)
    blocks = tuple(int(item.name.split(".")[1]) for item in stage if item.name.startswith("block."))
    has_head = stage[-1].name == "norm+head"
    # 1F1B: stage s keeps the activations of up to pp - s micro-batches in flight
    in_flight = min(layout.pp - place.pp, layout.grad_accum)
    act = in_flight * activation_bytes(cfg, blocks, has_head, layout.tp, precision)
    memory = MemoryEstimate(*_model_state_bytes(n_params, layout, precision), activations=act,
                            memory_state=memory_state_bytes(cfg, blocks, layout.tp))
    return RankShare(rank, place, tuple(item.name for item in stage), blocks,
                    head_range(cfg.model.n_head, place.tp, layout.tp), n_params, memory)


def _model_state_bytes(n_params: int, layout: Layout, precision: str) -> tuple[int, int, int]:
    """(weights, gradients, optimizer states) bytes of `n_params` parameters after ZeRO."""
    w = 2 if precision in ("bf16", "fp16") else 4
    master = 4 if w == 2 or layout.zero_stage >= 1 else 0  # ZeRO keeps an fp32 copy even for fp32
    stage, dp = layout.zero_stage, layout.dp
    return (n_params * w // (dp if stage >= 3 else 1),
            n_params * w // (dp if stage >= 2 else 1),
            n_params * (master + 8) // (dp if stage >= 1 else 1))


def activation_bytes(cfg: TrainConfig, blocks: Sequence[int], has_head: bool, tp: int, precision: str) -> int:
    """Rough bytes stored for the backward pass of one micro-batch on `blocks` (global indices).

    b samples of T = n_segments * segment_len tokens, width h, H heads (Hkv key/value heads of
    width h_kv = Hkv * hd), MLP width I, tp shards, a = 2 bytes (bf16/fp16) or 4 (fp32). A block
    keeps (in a bytes) 4bTh replicated tensors (the two norms' inputs and outputs),
    (3bTh + 2bTh_kv)/tp (q, attention output, o_proj input; k, v), 2bTI/tp (MLP up output and GELU
    output; SwiGLU 3bTI: gate, up and their product), and b(H/tp)*T*L attention probabilities: with
    `model.attention: segment` attention is causal inside a segment of N tokens, so the score matrix
    is T x N (L = N), not T x T; `window` adds the previous segment's keys (L = 2N), `full` is T x T
    (L = T) (flash kernels keep less). The memory adds 3bTh/tp + bTH/tp (its projections and write
    gates; bTH/tp more for the forgetting gate) in a bytes
    and, in fp32, 2bT(H/tp)dk DPFP features, 2bTh/tp values and reads, and K per-segment states of
    b(H/tp)dk(hd+1) (gradients flow through all K segments), in the blocks that have the memory
    (`memory.layers`). With activation checkpointing a block
    keeps only its input bTh, plus one block's full set while it is recomputed. The stage holding
    the head adds the logits bTV in a bytes, their fp32 copy and fp32 log-softmax (8 bytes).
    """
    m, mem, par = cfg.model, cfg.memory, cfg.parallel
    a = 2 if precision in ("bf16", "fp16") else 4
    b, K, N, h, H = par.micro_batch_size, cfg.data.n_segments, m.segment_len, m.n_embd, m.n_head
    T, inner, hd = K * N, m.mlp_hidden_size, m.head_dim
    mlp_tensors = 3 if m.mlp == "swiglu" else 2
    qkv = 3 * b * T * h + 2 * b * T * m.kv_heads * hd
    keys = {"segment": N, "window": 2 * N, "full": T}[m.attention]  # keys each query's scores cover
    block = a * (4 * b * T * h + (qkv + mlp_tensors * b * T * inner + b * H * T * keys) // tp)
    dk = feature_dim(hd, mem.nu)
    memory = (a * (3 * b * T * h + b * T * H * (2 if mem.decay else 1)) // tp
              + 4 * (2 * b * T * H * dk + 2 * b * T * h + K * b * H * dk * (hd + 1)) // tp)
    n_memory = sum(mem.has_memory(i) for i in blocks)
    if not blocks:
        stored = 0
    elif par.activation_checkpointing:  # the recomputed block: one with memory if any has it
        stored = len(blocks) * (a * b * T * h) + block + (memory if n_memory else 0)
    else:
        stored = len(blocks) * block + n_memory * memory
    return stored + (b * T * m.vocab_size * (a + 8) if has_head else 0)


def memory_state_bytes(cfg: TrainConfig, blocks: Sequence[int], tp: int) -> int:
    """The carried state of one micro-batch on the rank's `blocks` (global indices), for each of
    micro_batch_size streams: in each block that has the memory (`memory.layers`) the fp32 memory,
    A (dk, hd) and z (dk,) per held head, and with `model.attention: window` in every block the
    last segment's keys and values, N x hd each per held key/value head (counted at 4 bytes), and
    their N-slot mask."""
    m, b = cfg.model, cfg.parallel.micro_batch_size
    hd = m.head_dim
    n_memory = sum(cfg.memory.has_memory(i) for i in blocks)
    dk = feature_dim(hd, cfg.memory.nu)
    total = 4 * b * n_memory * (m.n_head // tp) * (dk * hd + dk)
    if m.attention == "window":
        kv_heads = max(1, m.kv_heads // tp)
        total += b * len(blocks) * kv_heads * m.segment_len * (2 * 4 * hd + 1)
    return total
