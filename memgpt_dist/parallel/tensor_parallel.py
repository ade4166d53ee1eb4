"""Tensor parallelism: DeepSpeed AutoTP rules for our module names (ZeRO x TP x DP layouts), the
same rules applied with DeepSpeed's TP layer classes inside pipeline stages
(`apply_tensor_parallel_layers`), and the per-head parameters neither partitions.

Attention is split by heads and the MLP by hidden units (Megatron's scheme, run by DeepSpeed's
AutoTP training layers inside `deepspeed.initialize`, before ZeRO partitions the shards):

* column-parallel (output features split; the input gradient is all-reduced in backward):
  attn.q_proj, k_proj, v_proj, the memory's attn.mem_q_proj, mem_k_proj, mem_v_proj and
  attn.mem_write_gate and attn.mem_decay_gate (d -> n_head, one row per head), mlp.up_proj and
  (SwiGLU) mlp.gate_proj;
* row-parallel (input features split; the output is all-reduced in forward): attn.o_proj,
  mlp.down_proj.

AutoTP splits a dimension of size d into tp equal contiguous blocks, so TP rank t holds output
rows [t d/tp, (t+1) d/tp): heads [t H/tp, (t+1) H/tp), because `view(B, T, -1, head_dim)` puts
head h at features [h hd, (h+1) hd). With grouped-query attention k_proj and v_proj have Hkv heads
and rank t holds key/value heads [t Hkv/tp, (t+1) Hkv/tp), which serve exactly its query heads
(kv head j serves queries [j H/Hkv, (j+1) H/Hkv)); parallel.tp must divide model.n_kv_head
(checked at load). AutoTP replaces only nn.Linear layers; the per-head
parameters that are not Linear weights are sliced to the same heads by `shard_head_parameters`
before `deepspeed.initialize`: attn.mem_beta (n_head,) and the depthwise convolution weights
(C, 1, taps) of attn.mem_q_conv, mem_k_conv, mem_v_conv over the memory projections' channels.
The model then computes, reads and writes the memory state A, z (B, H/tp, dk, hd) of its own
heads only: the memory adds no communication; neither does `model.attention: window`, whose
carried keys and values (B, H/tp, N, hd) are the rank's heads'. LayerNorms, the (tied) embedding
and row-parallel biases stay replicated (so does an untied LM head, `model.LMHead`, which is not an
nn.Linear); their gradients are equal on every TP rank because the residual stream
is replicated and the column-parallel layers all-reduce their input gradient.
"""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from memgpt_dist.parallel import ds_compat

COLUMN_PARALLEL = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.mem_q_proj", "attn.mem_k_proj",
                   "attn.mem_v_proj", "attn.mem_write_gate", "attn.mem_decay_gate", "mlp.up_proj", "mlp.gate_proj")
ROW_PARALLEL = ("attn.o_proj", "mlp.down_proj")
# Per-head parameters that are not Linear weights, split along dim 0 into the ranks' heads.
HEAD_SLICED = ("attn.mem_beta", "attn.mem_q_conv.weight", "attn.mem_k_conv.weight", "attn.mem_v_conv.weight")


def autotp_partition_config() -> dict[str, Any]:
    """`tensor_parallel.partition_config` for DeepSpeed: our rules only, no built-in presets.

    strict_mode makes a Linear layer without a rule an error at `deepspeed.initialize`: a new
    layer silently left replicated would be wrong if it reads the rank's heads."""
    return {
        "use_default_specs": False,
        "strict_mode": True,
        "layer_specs": [
            {"patterns": [_weight_pattern(m) for m in ROW_PARALLEL], "partition_type": "row"},
            {"patterns": [_weight_pattern(m) for m in COLUMN_PARALLEL], "partition_type": "column"},
            # AutoTP takes any module named lm_head for the output head, whatever its type; ours
            # (the untied head, model.LMHead) stays replicated, like the embedding
            {"patterns": [r"^(.*\.)?lm_head\.weight$"], "partition_type": "skip"},
        ],
    }


def apply_tensor_parallel_layers(module: nn.Module, tp_group) -> list[str]:
    """Replace the Linear layers our rules name with DeepSpeed's training TP layers over `tp_group`:
    `LinearLayer` (column-parallel) and `LinearAllreduce` (row-parallel), the classes AutoTP
    itself creates, splitting each weight into the same equal contiguous blocks. Returns the
    replaced modules' names.

    For pipeline stages, where AutoTP cannot run: DeepSpeed's engine applies AutoTP over its own
    (data, tensor) mesh and then takes that mesh as the model-parallel unit, which contradicts the
    PipelineModule's grid (runtime/pipe/engine.py asserts the grid's data-parallel size). Here the
    group is the grid's tensor-slicing group, and the engine never hears of AutoTP. Every other
    Linear layer is an error, as AutoTP's strict_mode: left replicated it would read all heads.
    Run after `shard_head_parameters` (same rank, same heads)."""
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer, set_autotp_mode

    set_autotp_mode(training=True)  # the layers' backward collectives; deepspeed.initialize sets it only for AutoTP
    replaced = []
    for name, child in list(module.named_modules()):
        if not isinstance(child, nn.Linear):
            continue
        if _has_suffix(name, COLUMN_PARALLEL):
            layer = LinearLayer(child, tp_group, name=name)
        elif _has_suffix(name, ROW_PARALLEL):
            layer = LinearAllreduce(child, tp_group, name=name)
        else:
            raise ValueError(f"{name} is an nn.Linear without a tensor-parallel rule; add it to COLUMN_PARALLEL or "
                             f"ROW_PARALLEL in memgpt_dist/parallel/tensor_parallel.py")
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent), attr, layer)
        replaced.append(name)
    return replaced


def _has_suffix(name: str, suffixes: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def _weight_pattern(module_suffix: str) -> str:
    # AutoTP matches with re.match against the full name; every rule's module has a parent
    return r".*\." + re.escape(module_suffix) + r"\.weight$"


def tp_sharded_suffixes() -> tuple[str, ...]:
    """Names (suffixes) of the parameters split across TP ranks: column-parallel weights and
    biases, row-parallel weights (their bias is replicated), and the head-sliced parameters.
    The memory estimate (`layout.TP_SHARDED_SUFFIXES`) reads this same table."""
    column = tuple(f"{m}.{p}" for m in COLUMN_PARALLEL for p in ("weight", "bias"))
    return column + tuple(f"{m}.weight" for m in ROW_PARALLEL) + HEAD_SLICED


def tp_shard_dim(name: str) -> Optional[int]:
    """The dimension along which TP splits parameter `name` (0: column-parallel and head-sliced,
    1: row-parallel weights); None: replicated on every TP rank."""
    module = name.rpartition(".")[0]
    if name.endswith(HEAD_SLICED) or module.endswith(COLUMN_PARALLEL):
        return 0
    if module.endswith(ROW_PARALLEL) and name.endswith(".weight"):
        return 1
    return None


def merge_tp_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The whole model's state dict from the TP ranks' state dicts (in tp-rank order)."""
    def merged(name: str) -> torch.Tensor:
        dim = tp_shard_dim(name)
        return shards[0][name] if dim is None else torch.cat([s[name] for s in shards], dim=dim)

    return {name: merged(name) for name in shards[0]}


def consolidated_tp_state_dict(ckpt_dir: Path, zero_stage: int, tp: int) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a tensor-parallel DeepSpeed checkpoint directory, for one process.

    ZeRO-0 keeps each TP rank's module in its own mp_rank_XX_model_states.pt, merged here by the
    rules above. ZeRO-1/2/3 partitions the shards further over data-parallel ranks, which
    DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint` does not handle with TP; DeepSpeed's
    universal-checkpoint conversion does (it knows how AutoTP split each parameter, and how the
    head-sliced ones are split from `_describe_for_universal_checkpoint`), so it is run into a
    temporary directory and its per-parameter fp32 tensors are read back.
    """
    if zero_stage == 0:
        files = [ckpt_dir / f"mp_rank_{t:02d}_model_states.pt" for t in range(tp)]
        return merge_tp_shards([torch.load(f, map_location="cpu", weights_only=False)["module"] for f in files])
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                        str(ckpt_dir), "--output_folder", tmp], check=True, stdout=sys.stderr)
        return {p.name: _universal_fp32(p / "fp32.pt") for p in sorted((Path(tmp) / "zero").iterdir()) if p.is_dir()}


def _universal_fp32(path: Path) -> torch.Tensor:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    return saved["param"] if isinstance(saved, dict) else saved


def head_slice(n: int, tp_rank: int, tp: int) -> slice:
    """The rank's contiguous block of a dimension of size n split into tp equal parts (as AutoTP)."""
    if n % tp:
        raise ValueError(f"a per-head dimension of size {n} does not split into parallel.tp={tp} equal parts")
    size = n // tp
    return slice(tp_rank * size, (tp_rank + 1) * size)


@torch.no_grad()
def shard_head_parameters(model: nn.Module, tp_rank: int, tp: int) -> list[str]:
    """Keep only TP rank `tp_rank`'s heads of the per-head parameters AutoTP does not split
    (`HEAD_SLICED`); returns their names. Run before `deepspeed.initialize`, on full tensors."""
    if tp == 1:
        return []
    sliced = []
    for name, param in list(model.named_parameters()):
        if not name.endswith(HEAD_SLICED):
            continue
        owner_name, _, attr = name.rpartition(".")
        shard = nn.Parameter(param.detach()[head_slice(param.shape[0], tp_rank, tp)].clone(),
                             requires_grad=param.requires_grad)
        # counted on every TP rank in DeepSpeed's gradient norm (else on TP rank 0 only, as replicated)
        shard.tensor_model_parallel = True
        ds_compat.describe_for_universal_checkpoint(shard, tuple(param.shape), tp)
        setattr(model.get_submodule(owner_name), attr, shard)
        sliced.append(name)
    return sliced


def unsharded_grad_norm(model: nn.Module, tp_group, pipe_group=None) -> float:
    """L2 norm of the whole model's gradient, from this TP rank's gradients, when no ZeRO
    optimizer computes it (ZeRO-0): squares of TP-sharded gradients (parameters marked
    `tensor_model_parallel`, as AutoTP, DeepSpeed's TP layers and `shard_head_parameters` mark
    them) are summed over the TP group, replicated ones counted once. `tp_group` None: no tensor
    parallelism. `pipe_group`: this rank's peers on the other pipeline stages; the stages' squares
    are summed, and the tied weight's copy on a later stage (`ds_pipe_replicated`) left out."""
    grads = [(p.grad.detach(), getattr(p, "tensor_model_parallel", False)) for p in model.parameters()
             if p.grad is not None and not getattr(p, "ds_pipe_replicated", False)]
    if not grads:
        return 0.0
    sharded, replicated = torch.zeros(2, dtype=torch.float64, device=grads[0][0].device)  # on the grads' device
    for g, is_sharded in grads:
        if is_sharded:
            sharded += g.double().pow(2).sum()
        else:
            replicated += g.double().pow(2).sum()
    if tp_group is not None:
        dist.all_reduce(sharded, group=tp_group)
    total = (sharded + replicated).reshape(1)
    if pipe_group is not None:
        dist.all_reduce(total, group=pipe_group)
    return float(total.sqrt())


def check_tp_inputs_once(module: nn.Module, tp_group, tp_src_rank: int):
    """On the first forward, check that every TP rank of a replica got the same batch.

    This replaces the check DeepSpeed's AutoTP engine registers, which compares every argument:
    the memory state passed as `state` legitimately differs between TP ranks (each holds its own
    heads), so only the data (input_ids, reset) is compared. Returns the hook handle."""
    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        handle.remove()
        first = args[0] if args else kwargs.get("input_ids")
        # a pipeline's first stage gets one tuple (input_ids, reset)
        data = list(first) if isinstance(first, tuple) else [first, kwargs.get("reset")]
        data = [t for t in data if t is not None]
        same = all([_equal_to_source(t, tp_group, tp_src_rank) for t in data])  # a list: every broadcast runs
        flag = torch.tensor([1 if same else 0], dtype=torch.int64, device=data[0].device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=tp_group)  # every rank raises, none hangs
        if not flag.item():
            raise RuntimeError("tensor-parallel ranks of one data-parallel replica were given different batches; "
                               "the loader must be built with the data-parallel rank and size (Topology.dp_rank, "
                               "Topology.dp_size), not the global rank")

    handle = module.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    return handle


def _equal_to_source(t: torch.Tensor, group, src: int) -> bool:
    mine = t.detach().to(torch.int64)  # token ids and reset flags; int64 goes through every backend
    ref = mine.clone()
    dist.broadcast(ref, src=src, group=group)
    return torch.equal(ref, mine)
