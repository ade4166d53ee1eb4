"""The pipeline-parallel view of the GPT: a DeepSpeed `PipelineModule` built from the model's own modules.

The layer list is `layout.pipeline_items`: [embed, block 0 .. block L-1, norm+head], split into
`parallel.pp` stages by DeepSpeed's `partition_method` ("parameters" or "uniform"), so the real
split is the one `--dry-run` prints. The head is tied to the embedding as DeepSpeed ties weights
across stages: both ends are `TiedLayerSpec("embed", ...)` holding their own copy of `wte.weight`,
and DeepSpeed all-reduces its gradient between the first and the last stage.

The layers wrap the modules of a GPT built (and initialised) as for a single process, so a
pipeline run starts from exactly the single-process weights. Between stages only tensors travel:
the activations x (B, T, C) and the reset flags (B, S) bool. Each block computes its rotary tables
from the segment length, and its memory state is created and consumed inside its own scan over
the K segments of the micro-batch, so no state crosses a stage. Carrying the memory from one
micro-batch to the next (train.carry_memory) is not supported under pipeline parallelism.

With parallel.tp > 1 the ranks form DeepSpeed's `PipeModelDataParallelTopology` (tp fastest) and
each stage's blocks are split over its TP ranks by `tensor_parallel.apply_tensor_parallel_layers`
(DeepSpeed's TP layer classes over the grid's tensor-slicing group; AutoTP cannot run there).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memgpt_dist.config import ModelConfig, ParallelConfig
from memgpt_dist.model.gpt import GPT, Block, build_rope
from memgpt_dist.parallel.tensor_parallel import apply_tensor_parallel_layers, check_tp_inputs_once

TIED_KEY = "embed"  # DeepSpeed's tie key for the embedding and the LM head
TIED_ATTR = "wte.weight"  # the tied parameter, as an attribute path inside both tied layers

Activations = tuple[Tensor, Tensor]  # (x (B, T, C), reset (B, S) bool)


def _positions(T: int, segment_len: int, device: torch.device) -> Tensor:
    return torch.arange(T, device=device) % segment_len  # (T,): positions restart in every segment


class EmbedStage(nn.Module):
    """Token (+ learned position) embedding and dropout: (input_ids, reset) -> (x, reset)."""

    def __init__(self, wte: nn.Embedding, wpe: Optional[nn.Embedding], drop: nn.Dropout, segment_len: int):
        super().__init__()
        self.wte, self.wpe, self.drop = wte, wpe, drop
        self.segment_len = segment_len

    def forward(self, inputs: Activations) -> Activations:
        input_ids, reset = inputs
        x = self.wte(input_ids)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(_positions(input_ids.shape[1], self.segment_len, input_ids.device))
        return self.drop(x), reset


class BlockStage(nn.Module):
    """One transformer block; the memory starts from zero at the micro-batch and stays inside."""

    def __init__(self, block: Block, cfg: ModelConfig):
        super().__init__()
        self.block = block
        self.cfg = cfg

    def forward(self, inputs: Activations) -> Activations:
        x, reset = inputs
        cfg = self.cfg
        rope = None
        if cfg.position == "rope":
            rope = build_rope(_positions(x.shape[1], cfg.segment_len, x.device), cfg.head_dim, cfg.rope_theta)
        x, _, _ = self.block(x, rope, None, reset, True)
        return x, reset


class HeadStage(nn.Module):
    """Final LayerNorm and the LM head tied to the embedding: (x, reset) -> logits (B, T, vocab)."""

    def __init__(self, ln_f: nn.LayerNorm, wte: nn.Embedding):
        super().__init__()
        self.ln_f, self.wte = ln_f, wte

    def forward(self, inputs: Activations) -> Tensor:
        x, _ = inputs
        return F.linear(self.ln_f(x), self.wte.weight)  # (B, T, vocab)


def pipeline_specs(model: GPT) -> list:
    """DeepSpeed layer specs in `layout.pipeline_items` order, wrapping `model`'s modules."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    return [TiedLayerSpec(TIED_KEY, EmbedStage, model.wte, model.wpe, model.drop, model.cfg.segment_len,
                          tied_weight_attr=TIED_ATTR),
            *(LayerSpec(BlockStage, block, model.cfg) for block in model.blocks.values()),
            TiedLayerSpec(TIED_KEY, HeadStage, model.ln_f, model.wte, tied_weight_attr=TIED_ATTR)]


def build_pipeline_module(model: GPT, parallel: ParallelConfig, loss_fn: Callable[[Tensor, tuple], Tensor]):
    """This rank's stage of `model` as a PipelineModule of `parallel.pp` stages, each split over
    `parallel.tp` tensor-parallel ranks.

    `model` comes from `apply_plan` on this rank's TP rank (its per-head parameters already hold
    only its heads). `loss_fn(logits, labels)` runs on the last stage with whatever the data
    iterator yields as labels. Needs torch.distributed initialised (the stage comes from the
    global rank)."""
    import torch.distributed as dist
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    dp = dist.get_world_size() // (parallel.pp * parallel.tp)
    topology = PipeModelDataParallelTopology(num_pp=parallel.pp, num_mp=parallel.tp, num_dp=dp)  # tp fastest
    net = PipelineModule(layers=pipeline_specs(model), topology=topology, loss_fn=loss_fn,
                         partition_method=parallel.pp_partition, activation_checkpoint_interval=0)
    _count_final_norm_in_grad_norm(net)
    if parallel.tp > 1:
        _split_stage_over_tp_ranks(net)
    return net


def _split_stage_over_tp_ranks(net) -> None:
    """Tensor parallelism inside the stage: its blocks' Linear layers become DeepSpeed's column- and
    row-parallel layers over the grid's tensor-slicing group (the ranks of this stage and replica;
    `tensor_parallel.apply_tensor_parallel_layers`). The embedding and the tied head stay replicated
    on every TP rank (the vocabulary is small next to the blocks); their gradients are equal there
    because the residual stream is replicated and the column-parallel layers all-reduce their input
    gradient. The stage's first rank also checks once that its TP ranks were given the same batch."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO
    from deepspeed.module_inject.layers import collect_autotp_universal_checkpoint_info

    grid = net._grid
    group = grid.get_slice_parallel_group()
    apply_tensor_parallel_layers(net, group)
    setattr(net, UNIVERSAL_CHECKPOINT_INFO, collect_autotp_universal_checkpoint_info(net))
    if grid.is_first_stage:
        check_tp_inputs_once(net, group, tp_src_rank=grid.get_global_rank() - grid.get_slice_parallel_rank())


def _count_final_norm_in_grad_norm(net) -> None:
    """DeepSpeed flags every parameter of a tied module on its non-first stages `ds_pipe_replicated`,
    so that the gradient norm counts the tied weight once; our tied head module also holds ln_f,
    which exists only on the last stage and must be counted there (else clipping sees a norm
    without ln_f's gradient)."""
    head = net.tied_modules[TIED_KEY] if TIED_KEY in net.tied_modules else None
    if isinstance(head, HeadStage):
        for p in head.ln_f.parameters():
            p.ds_pipe_replicated = False
