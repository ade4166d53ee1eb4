"""Model transforms applied from outside the model, in a fixed order (torchtitan style).

The model file stays free of parallel and memory-saving code; `apply_plan` is the one place
that changes a built model before DeepSpeed wraps it. Order (torchtitan's): tensor-parallel
partitioning, activation checkpointing (it wraps whole blocks), compile (of each block, with its
checkpointing inside), then the engine. Tensor parallelism is split in two by DeepSpeed's AutoTP
flow: here the per-head parameters that are not Linear weights keep only the rank's heads;
`deepspeed.initialize` (memgpt_dist/parallel/engine.py) then shards the Linear layers by the rules
in memgpt_dist/parallel/tensor_parallel.py, before ZeRO partitions.
"""
from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

from memgpt_dist.config import ParallelConfig
from memgpt_dist.parallel.tensor_parallel import shard_head_parameters


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute every block in the backward pass instead of storing its activations.

    The block's bound `forward` is wrapped in place, so parameter names (and therefore
    checkpoints) are the same with and without activation checkpointing. Non-reentrant
    checkpointing supports the memory state flowing through blocks and keyword arguments.
    """
    for block in model.blocks.values():
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return model


def apply_compile(model: nn.Module, backend: str = "inductor") -> nn.Module:
    """`torch.compile` each block in place (`Module.compile`), as torchtitan does: blocks are
    the repeated unit, so one graph serves them all, and the embedding, the LM head and the loss
    stay eager. Parameter names (and checkpoints) do not change, unlike `torch.compile(model)`
    (which prefixes `_orig_mod.`). Tracing happens at the first call, so it sees whatever
    DeepSpeed's engine does to the block's submodules before then (ZeRO-3's parameter hooks)."""
    for block in model.blocks.values():
        block.compile(backend=backend)
    return model


def apply_plan(model: nn.Module, parallel: ParallelConfig, tp_rank: int = 0, compile: bool = False) -> nn.Module:
    """Apply the configured transforms to a freshly built model on TP rank `tp_rank`, in
    torchtitan's order: TP, activation checkpointing, compile (`train.compile`)."""
    shard_head_parameters(model, tp_rank, parallel.tp)
    if parallel.activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    return model
