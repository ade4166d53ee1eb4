"""The pipeline-parallel view of the GPT: a DeepSpeed `PipelineModule` built from the model's own modules.

The layer list is `layout.pipeline_items`: [embed, block 0 .. block L-1, norm+head], split into
`parallel.pp` stages by DeepSpeed's `partition_method` ("parameters" or "uniform"), so the real
split is the one `--dry-run` prints. The head is tied to the embedding as DeepSpeed ties weights
across stages: both ends are `TiedLayerSpec("embed", ...)` holding their own copy of `wte.weight`,
and DeepSpeed all-reduces its gradient between the first and the last stage. An untied head
(`model.tie_embeddings: false`) keeps the same two specs (so parameter names do not depend on the
option) with no tied weight attribute: DeepSpeed then neither broadcasts nor all-reduces anything
between them, and the head's own `lm_head.weight` lives on the last stage only.

The layers wrap the modules of a GPT built (and initialised) as for a single process, so a
pipeline run starts from exactly the single-process weights. Between stages only tensors travel:
the activations x (B, T, C) and the reset flags (B, S) bool. Each block computes its rotary tables
from the segment length, and its memory state is created and consumed inside its own scan over
the K segments of the micro-batch, so no state crosses a stage.

Stream training (train.carry_memory): each stage keeps the memory of its own layers for the
rank's streams in a `MemoryCarry`, from one training micro-batch to the next. A stage runs its
forwards in micro-batch order (1F1B reorders only forwards against backwards), so micro-batch
j + 1 starts from what micro-batch j left, exactly as in a single process. The state is detached
between micro-batches (truncated BPTT, as there) and never travels between stages: the memory is
partitioned by layer on the stages, by head on their TP ranks and by stream on the replicas.

With parallel.tp > 1 the ranks form DeepSpeed's `PipeModelDataParallelTopology` (tp fastest) and
each stage's blocks are split over its TP ranks by `tensor_parallel.apply_tensor_parallel_layers`
(DeepSpeed's TP layer classes over the grid's tensor-slicing group; AutoTP cannot run there).
"""
from __future__ import annotations

import re
from typing import Callable, Optional

from torch import Tensor, nn

from memgpt_dist.config import ModelConfig, ParallelConfig
from memgpt_dist.model.carry import MemoryCarry
from memgpt_dist.model.gpt import GPT, Block, embed_tokens, lm_head, rope_tables
from memgpt_dist.parallel import ds_compat
from memgpt_dist.parallel.tensor_parallel import apply_tensor_parallel_layers, check_tp_inputs_once

TIED_KEY = "embed"  # DeepSpeed's tie key for the embedding and the LM head
TIED_ATTR = "wte.weight"  # the tied parameter, as an attribute path inside both tied layers
# How a PipelineModule names the GPT's parameters (the one home of this mapping): layer 0 is the
# embedding, layer i + 1 block i ("3.block.attn.q_proj.weight" is "blocks.2.attn.q_proj.weight"),
# and the tied layers' parameters sit under "tied_modules.embed." (wte, wpe; ln_f on the last stage).
_PIPE_BLOCK = re.compile(r"^(\d+)\.block\.(.+)$")
_PIPE_TIED = f"tied_modules.{TIED_KEY}."


def model_to_pipeline_name(name: str) -> Optional[str]:
    """The PipelineModule name of a GPT parameter; None for names outside the model."""
    m = re.match(r"^blocks\.(\d+)\.(.+)$", name)
    if m:
        return f"{int(m.group(1)) + 1}.block.{m.group(2)}"
    if name.startswith(("wte.", "wpe.", "ln_f.", "lm_head.")):
        return _PIPE_TIED + name
    return None


def pipeline_to_model_name(name: str) -> Optional[str]:
    """The GPT parameter name of a PipelineModule parameter name (a layer file's key prefixed
    with its layer index, "3.block.attn.q_proj.weight", or a tied module's); None otherwise."""
    if name.startswith(_PIPE_TIED):
        return name[len(_PIPE_TIED):]
    m = _PIPE_BLOCK.match(name)
    if m:
        return f"blocks.{int(m.group(1)) - 1}.{m.group(2)}"
    return None

Activations = tuple[Tensor, Tensor]  # (x (B, T, C), reset (B, S) bool)


class EmbedStage(nn.Module):
    """`GPT`'s embedding (`embed_tokens`): (input_ids, reset) -> (x, reset)."""

    def __init__(self, wte: nn.Embedding, wpe, drop: nn.Dropout, segment_len: int):
        super().__init__()
        self.wte, self.wpe, self.drop = wte, wpe, drop
        self.segment_len = segment_len

    def forward(self, inputs: Activations) -> Activations:
        input_ids, reset = inputs
        return embed_tokens(self.wte, self.wpe, self.drop, input_ids, self.segment_len), reset


class BlockStage(nn.Module):
    """One of `GPT`'s blocks with the rotary tables `GPT.forward` gives it. Its memory starts from
    zero at the micro-batch, or, when training with the carry enabled, from the state the previous
    micro-batch left in this layer (`MemoryCarry`, shared by the stage's blocks and its step)."""

    def __init__(self, block: Block, cfg: ModelConfig, index: int, memory: MemoryCarry):
        super().__init__()
        self.block = block
        self.cfg = cfg
        self.index = index
        self.memory = memory  # not a submodule: it holds no parameters and is saved by the checkpointer

    def forward(self, inputs: Activations) -> Activations:
        x, reset = inputs
        rope = rope_tables(self.cfg, x.shape[1], x.device)
        carry = self.training and self.memory.enabled
        x, state, stats = self.block(x, rope, self.memory.layer(self.index) if carry else None, reset, True)
        if self.training:
            self.memory.stats.update({f"{k}/layer{self.index}": v for k, v in stats.items()})
        if carry:  # the next micro-batch of each stream continues its document
            self.memory.keep_layer(self.index, state)
        return x, reset


class HeadStage(nn.Module):
    """`GPT`'s final norm and LM head (`lm_head`): (x, reset) -> logits (B, T, vocab). `head` is
    the embedding (tied; held as `wte`, the tied attribute) or the untied `LMHead` (`lm_head`)."""

    def __init__(self, ln_f: nn.Module, head: nn.Module, tied: bool):
        super().__init__()
        self.ln_f = ln_f
        if tied:
            self.wte = head
        else:
            self.lm_head = head

    def forward(self, inputs: Activations) -> Tensor:
        x, _ = inputs
        return lm_head(self.ln_f, self.wte if hasattr(self, "wte") else self.lm_head, x)  # (B, T, vocab)


def pipeline_specs(model: GPT, memory: MemoryCarry) -> list:
    """DeepSpeed layer specs in `layout.pipeline_items` order, wrapping `model`'s modules."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    tied = model.cfg.tie_embeddings
    attr = TIED_ATTR if tied else []  # untied: the same specs, nothing shared between them
    return [TiedLayerSpec(TIED_KEY, EmbedStage, model.wte, model.wpe, model.drop, model.cfg.segment_len,
                          tied_weight_attr=attr),
            *(LayerSpec(BlockStage, block, model.cfg, int(i), memory) for i, block in model.blocks.items()),
            TiedLayerSpec(TIED_KEY, HeadStage, model.ln_f, model.head, tied, tied_weight_attr=attr)]


def build_pipeline_module(model: GPT, parallel: ParallelConfig, loss_fn: Callable[[Tensor, tuple], Tensor],
                          carry_memory: bool = False):
    """This rank's stage of `model` as a PipelineModule of `parallel.pp` stages, each split over
    `parallel.tp` tensor-parallel ranks, and the stage's `MemoryCarry` (carrying the memory
    between training micro-batches if `carry_memory`).

    `model` comes from `apply_plan` on this rank's TP rank (its per-head parameters already hold
    only its heads). `loss_fn(logits, labels)` runs on the last stage with whatever the data
    iterator yields as labels. Needs torch.distributed initialised (the stage comes from the
    global rank)."""
    import torch.distributed as dist
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    dp = parallel.dp(dist.get_world_size())
    topology = PipeModelDataParallelTopology(num_pp=parallel.pp, num_mp=parallel.tp, num_dp=dp)  # tp fastest
    memory = MemoryCarry(carry_memory, owned=[])
    net = PipelineModule(layers=pipeline_specs(model, memory), topology=topology, loss_fn=loss_fn,
                         partition_method=parallel.pp_partition, activation_checkpoint_interval=0)
    # the stage's own blocks (DeepSpeed also builds every spec once to count its parameters)
    memory.owned = sorted(m.index for m in net.modules() if isinstance(m, BlockStage))
    head = net.tied_modules[TIED_KEY] if TIED_KEY in net.tied_modules else None
    if isinstance(head, HeadStage):  # the tied head module also holds ln_f, which only the last stage has
        ds_compat.count_in_grad_norm(head.ln_f)
        if hasattr(head, "lm_head"):  # so does an untied head its own matrix
            ds_compat.count_in_grad_norm(head.lm_head)
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

    grid = ds_compat.pipeline_grid(net)
    group = grid.get_slice_parallel_group()
    apply_tensor_parallel_layers(net, group)
    setattr(net, UNIVERSAL_CHECKPOINT_INFO, collect_autotp_universal_checkpoint_info(net))
    if grid.is_first_stage:
        check_tp_inputs_once(net, group, tp_src_rank=grid.get_global_rank() - grid.get_slice_parallel_rank())
