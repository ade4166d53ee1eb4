"""The one call to `deepspeed.initialize`, and the optimizer parameter groups it receives.

With parallel.tp > 1 the generated config asks for AutoTP training: DeepSpeed shards the Linear
layers inside `deepspeed.initialize` (after `apply_plan` sliced the other per-head parameters),
then ZeRO partitions each shard over the rank's data-parallel group.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from memgpt_dist.config import OptimConfig, TrainConfig
from memgpt_dist.parallel.deepspeed_config import build_ds_config
from memgpt_dist.parallel.dist import Topology
from memgpt_dist.parallel.tensor_parallel import check_tp_inputs_once

GATE_SUFFIX = "mem_beta"


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
        elif p.dim() >= 2 and "_conv." not in name:
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

    ds_config = build_ds_config(cfg, topo.world_size, device_type=topo.device.type,
                                bf16_supported=_bf16_supported(topo.device), load_universal=load_universal)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.optim),
        config=ds_config,
        dist_init_required=False,
        mpu=None if topo.pp_size > 1 else _autotp_mpu(topo),  # a PipelineModule brings its own grid
    )
    if topo.tp_size > 1 and topo.pp_size == 1:  # in a pipeline, pipeline.py split the stages and checks
        _replace_tp_input_check(engine, topo)
    return engine, ds_config


def _autotp_mpu(topo: Topology):
    """DeepSpeed's own (data, tensor) process-group mesh, built before the engine so that its
    batch-size check counts data-parallel ranks (world / tp), not the world; None without TP."""
    if topo.tp_size == 1:
        return None
    from deepspeed.utils import groups

    groups._init_tp_mesh_device(tensor_model_parallel_size=topo.tp_size)  # mesh (dp, tp): tp fastest
    assert (groups.get_tensor_model_parallel_rank(), groups.get_data_parallel_rank()) == (topo.tp_rank, topo.dp_rank), \
        "DeepSpeed's TP mesh disagrees with the Topology the per-head parameters were sliced by"
    return groups


def _replace_tp_input_check(engine, topo: Topology) -> None:
    """DeepSpeed's AutoTP engine compares every forward argument across TP ranks once; the memory
    state legitimately differs there (each rank holds its heads; a resumed run passes it on its
    first step), so compare the data only."""
    ds_check = getattr(engine, "first_dataloader_check", None)
    if ds_check is not None:
        ds_check.remove()
    check_tp_inputs_once(engine.module, topo.tp_group, tp_src_rank=topo.rank - topo.tp_rank)


def _bf16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()
