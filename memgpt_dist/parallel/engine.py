"""The one call to `deepspeed.initialize`, and the optimizer parameter groups it receives.

With parallel.tp > 1 the generated config asks for AutoTP training: DeepSpeed shards the Linear
layers inside `deepspeed.initialize` (after `apply_plan` sliced the other per-head parameters),
then ZeRO partitions each shard over the rank's data-parallel group.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from memgpt_dist.config import OptimConfig, TrainConfig
from memgpt_dist.model.gpt import GATE_SUFFIX
from memgpt_dist.parallel import ds_compat
from memgpt_dist.parallel.deepspeed_config import build_ds_config
from memgpt_dist.parallel.dist import Topology
from memgpt_dist.parallel.tensor_parallel import check_tp_inputs_once, unsharded_grad_norm
from memgpt_dist.parallel.model_build import full_shape


class NonFiniteUpdate(RuntimeError):
    """ZeRO-0 was about to apply a non-finite gradient: it has no overflow check that could skip
    the step, so the run must stop before the update (the trainer says so, as `Diverged`)."""

    def __init__(self, grad_norm: float):
        super().__init__(f"non-finite gradient norm {grad_norm}")
        self.grad_norm = grad_norm


def param_groups(model: nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
    """AdamW groups: matrices decay; biases, norms, gains and the memory's short convolutions
    (decay would pull their identity tap to zero) do not; memory mix gates get their own group
    with a higher learning rate and no weight decay."""
    decay, no_decay, gates = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(GATE_SUFFIX):
            gates.append(p)
        elif len(full_shape(p)) >= 2 and "_conv." not in name:  # a zero.Init parameter's local tensor is 1-D
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    if gates:
        groups.append({"params": gates, "weight_decay": 0.0, "lr": optim.lr * optim.mem_gate_lr_mult,
                       "name": "mem_gates"})
    return [g for g in groups if g["params"]]


def build_engine(model: nn.Module, cfg: TrainConfig, topo: Topology, load_universal: bool = False):
    """Wrap `model` in a DeepSpeed engine configured from `cfg`; returns (engine, ds_config).
    `load_universal`: the engine will load a universal checkpoint (a resume on another layout)."""
    import deepspeed

    ds_config = engine_ds_config(cfg, topo, load_universal)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.optim),
        config=ds_config,
        dist_init_required=False,
        # a PipelineModule brings its own grid
        mpu=None if topo.pp_size > 1 else ds_compat.autotp_mpu(topo.tp_size, topo.tp_rank, topo.dp_rank),
    )
    if topo.tp_size > 1 and topo.pp_size == 1:  # in a pipeline, pipeline.py split the stages and checks
        _replace_tp_input_check(engine, topo)
    if topo.pp_size > 1 and engine.zero_optimization_stage() == 0 and \
            not (engine.fp16_enabled() or engine.bfloat16_enabled()):
        # DeepSpeed's own clipping of this path uses a norm without the later stages
        ds_compat.step_by_whole_model_norm(engine, cfg.optim.grad_clip, _stop_if_nonfinite, unsharded_grad_norm)
    return engine, ds_config


def engine_ds_config(cfg: TrainConfig, topo: Topology, load_universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config of this rank's engine (and of `zero.Init`, which must agree with it)."""
    return build_ds_config(cfg, topo.world_size, device_type=topo.device.type,
                           bf16_supported=_bf16_supported(topo.device), load_universal=load_universal)


def _stop_if_nonfinite(grad_norm: float) -> None:
    """ZeRO-0 applies whatever gradient it gets. Its gradients are already all-reduced here,
    so every rank sees the same norm and stops at the same point, before the update."""
    if not math.isfinite(grad_norm):
        raise NonFiniteUpdate(grad_norm)


def _replace_tp_input_check(engine, topo: Topology) -> None:
    """DeepSpeed's AutoTP engine compares every forward argument across TP ranks once; the memory
    state legitimately differs there (each rank holds its heads; a resumed run passes it on its
    first step), so compare the data only."""
    ds_compat.remove_autotp_input_check(engine)
    check_tp_inputs_once(engine.module, topo.tp_group, tp_src_rank=topo.rank - topo.tp_rank)


def _bf16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()
