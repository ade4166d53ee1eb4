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
the K segments of the micro-batch, so no state crosses a stage.

Stream training (train.carry_memory): each stage keeps the memory of its own layers for the
rank's streams in a `StageMemory`, from one training micro-batch to the next. A stage runs its
forwards in micro-batch order (1F1B reorders only forwards against backwards), so micro-batch
j + 1 starts from what micro-batch j left, exactly as in a single process. The state is detached
between micro-batches (truncated BPTT, as there) and never travels between stages: the memory is
partitioned by layer on the stages, by head on their TP ranks and by stream on the replicas.

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
from memgpt_dist.model.memory import LayerState
from memgpt_dist.parallel.tensor_parallel import (apply_tensor_parallel_layers, check_tp_inputs_once,
                                                  unsharded_grad_norm)

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


class StageMemory:
    """What this rank's stage keeps of its layers between micro-batches: with `carry`
    (train.carry_memory) the memory state of the rank's streams per global layer index, and the
    memory statistics of the last training micro-batch. Shared by the stage's `BlockStage`s and
    the trainer, which saves, restores and logs it."""

    def __init__(self, carry: bool):
        self.carry = carry
        self.layers: dict[int, LayerState] = {}  # global layer index -> state after the last micro-batch
        self.owned: list[int] = []  # the global layer indices of this stage's blocks
        self.stats: dict[str, Tensor] = {}  # "<stat>/layer<i>" of the last training micro-batch

    def state_dict(self) -> dict[str, Tensor]:
        """`{"layer<i>.A", "layer<i>.z"}` by global layer index, fp32 on the CPU (as
        `memory.state_to_dict` names a whole model's state, so a pp1 run reads it back)."""
        out: dict[str, Tensor] = {}
        for i, s in sorted(self.layers.items()):
            out[f"layer{i}.A"], out[f"layer{i}.z"] = s.A.float().cpu(), s.z.float().cpu()
        return out

    def load_state_dict(self, tensors: Optional[dict[str, Tensor]], device: torch.device) -> None:
        """Take this stage's layers from a saved state (a stage's or a whole model's); None or a
        state without them: start from zero memory."""
        self.layers = {i: LayerState(tensors[f"layer{i}.A"].to(device, torch.float32),
                                     tensors[f"layer{i}.z"].to(device, torch.float32))
                       for i in self.owned if tensors and f"layer{i}.A" in tensors}


class BlockStage(nn.Module):
    """One transformer block. Its memory starts from zero at the micro-batch, or, when training
    with `memory.carry`, from the state the previous micro-batch left in this layer."""

    def __init__(self, block: Block, cfg: ModelConfig, index: int, memory: StageMemory):
        super().__init__()
        self.block = block
        self.cfg = cfg
        self.index = index
        self.memory = memory  # not a submodule: it holds no parameters and is saved by the trainer

    def forward(self, inputs: Activations) -> Activations:
        x, reset = inputs
        cfg = self.cfg
        rope = None
        if cfg.position == "rope":
            rope = build_rope(_positions(x.shape[1], cfg.segment_len, x.device), cfg.head_dim, cfg.rope_theta)
        carry = self.training and self.memory.carry
        x, state, stats = self.block(x, rope, self.memory.layers.get(self.index) if carry else None, reset, True)
        if self.training:
            self.memory.stats.update({f"{k}/layer{self.index}": v for k, v in stats.items()})
        if carry and state is not None:  # the next micro-batch of each stream continues its document
            self.memory.layers[self.index] = LayerState(state.A.detach(), state.z.detach())
        return x, reset


class HeadStage(nn.Module):
    """Final LayerNorm and the LM head tied to the embedding: (x, reset) -> logits (B, T, vocab)."""

    def __init__(self, ln_f: nn.LayerNorm, wte: nn.Embedding):
        super().__init__()
        self.ln_f, self.wte = ln_f, wte

    def forward(self, inputs: Activations) -> Tensor:
        x, _ = inputs
        return F.linear(self.ln_f(x), self.wte.weight)  # (B, T, vocab)


def pipeline_specs(model: GPT, memory: StageMemory) -> list:
    """DeepSpeed layer specs in `layout.pipeline_items` order, wrapping `model`'s modules."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    return [TiedLayerSpec(TIED_KEY, EmbedStage, model.wte, model.wpe, model.drop, model.cfg.segment_len,
                          tied_weight_attr=TIED_ATTR),
            *(LayerSpec(BlockStage, block, model.cfg, int(i), memory) for i, block in model.blocks.items()),
            TiedLayerSpec(TIED_KEY, HeadStage, model.ln_f, model.wte, tied_weight_attr=TIED_ATTR)]


def build_pipeline_module(model: GPT, parallel: ParallelConfig, loss_fn: Callable[[Tensor, tuple], Tensor],
                          carry_memory: bool = False):
    """This rank's stage of `model` as a PipelineModule of `parallel.pp` stages, each split over
    `parallel.tp` tensor-parallel ranks, and the stage's `StageMemory` (carrying the memory
    between training micro-batches if `carry_memory`).

    `model` comes from `apply_plan` on this rank's TP rank (its per-head parameters already hold
    only its heads). `loss_fn(logits, labels)` runs on the last stage with whatever the data
    iterator yields as labels. Needs torch.distributed initialised (the stage comes from the
    global rank)."""
    import torch.distributed as dist
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    dp = dist.get_world_size() // (parallel.pp * parallel.tp)
    topology = PipeModelDataParallelTopology(num_pp=parallel.pp, num_mp=parallel.tp, num_dp=dp)  # tp fastest
    memory = StageMemory(carry_memory)
    net = PipelineModule(layers=pipeline_specs(model, memory), topology=topology, loss_fn=loss_fn,
                         partition_method=parallel.pp_partition, activation_checkpoint_interval=0)
    # the stage's own blocks (DeepSpeed also builds every spec once to count its parameters)
    memory.owned = sorted(m.index for m in net.modules() if isinstance(m, BlockStage))
    _count_final_norm_in_grad_norm(net)
    if parallel.tp > 1:
        _split_stage_over_tp_ranks(net)
    return net, memory


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


def step_by_whole_model_norm(engine, clip: float, before_update: Callable[[float], None]) -> None:
    """Make a ZeRO-0 fp32 pipeline engine clip by the whole model's gradient norm.

    DeepSpeed clips these gradients with `clip_grad_norm_(mpu=grid)`, which counts a replicated
    parameter only where the grid's model-parallel rank is 0 (a rank's position across all stages),
    so the later stages' parameters are left out of the norm and it reports none. Here the
    engine's `_take_model_step` first computes the whole model's norm (`unsharded_grad_norm` over
    the stage's TP ranks and the pipeline: every rank gets the same value), records it as the
    engine's global norm, calls `before_update(norm)` (which may raise: ZeRO-0 cannot skip a
    non-finite update) and scales the gradients by min(1, clip / (norm + 1e-6)) as DeepSpeed
    does; DeepSpeed's own clipping is switched off."""
    take_model_step = engine._take_model_step
    grid = engine.grid
    tp_group = grid.get_slice_parallel_group() if grid.get_slice_parallel_world_size() > 1 else None

    def take_step(lr_kwargs=None):
        norm = unsharded_grad_norm(engine.module, tp_group, grid.get_pipe_parallel_group())
        engine._global_grad_norm = norm
        before_update(norm)
        coef = clip / (norm + 1e-6)
        if clip > 0 and coef < 1:
            for p in engine.module.parameters():
                if p.grad is not None:
                    p.grad.detach().mul_(coef)
        take_model_step(lr_kwargs)

    engine._take_model_step = take_step
    engine.clip_fp32_gradients = lambda: None  # clipped above, by the right norm

