"""The one call to `deepspeed.initialize`, and the optimizer parameter groups it receives."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from memgpt_dist.config import OptimConfig, TrainConfig
from memgpt_dist.parallel.deepspeed_config import build_ds_config
from memgpt_dist.parallel.dist import Topology

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


def build_engine(model: nn.Module, cfg: TrainConfig, topo: Topology):
    """Wrap `model` in a DeepSpeed engine configured from `cfg`; returns (engine, ds_config)."""
    import deepspeed

    ds_config = build_ds_config(cfg, topo.world_size, device_type=topo.device.type,
                                bf16_supported=_bf16_supported(topo.device))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.optim),
        config=ds_config,
        dist_init_required=False,
    )
    return engine, ds_config


def _bf16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()
