"""The one place the DeepSpeed config dict is made: a pure function of the typed config.

Nothing DeepSpeed-specific is written in YAML; `build_ds_config` derives every key from
`TrainConfig` so that a run's DeepSpeed behaviour is reproducible from its saved config.
"""
from __future__ import annotations

from typing import Any

from memgpt_dist.config import ConfigError, TrainConfig
from memgpt_dist.parallel.tensor_parallel import autotp_partition_config


def resolve_precision(requested: str, device_type: str, bf16_supported: bool) -> str:
    """Pick "fp32", "bf16" or "fp16"; "auto" means bf16 where the GPU has it, else fp32.

    bf16 runs on CPU too, through DeepSpeed's bf16 config with its CPU accelerator (the GPU path's
    code: tests/train/test_bf16.py); "auto" still picks fp32 there, because CPUs without bf16
    matrix units run it slower (1.6x the fp32 step time of a tiny model on a 2-core dev machine).
    fp16 needs a loss scaler and is refused on CPU."""
    if requested == "auto":
        return "bf16" if device_type != "cpu" and bf16_supported else "fp32"
    if requested == "fp16" and device_type == "cpu":
        raise ConfigError("parallel.precision=fp16 is not supported on CPU; use parallel.precision=bf16, fp32 or auto")
    return requested


def build_ds_config(cfg: TrainConfig, world_size: int, device_type: str = "cpu",
                    bf16_supported: bool = False, load_universal: bool = False) -> dict[str, Any]:
    """DeepSpeed config for `cfg` at `world_size` ranks on `device_type` ("cpu", "cuda", ...).

    `load_universal`: the engine will restore a universal checkpoint (a resume on another layout,
    see `memgpt_dist.train.universal`); DeepSpeed reads the flag only when loading."""
    par, opt = cfg.parallel, cfg.optim
    dp = par.dp(world_size)
    precision = resolve_precision(par.precision, device_type, bf16_supported)
    ds: dict[str, Any] = {
        "train_batch_size": par.micro_batch_size * par.grad_accum * dp,
        "train_micro_batch_size_per_gpu": par.micro_batch_size,
        "gradient_accumulation_steps": par.grad_accum,
        "gradient_clipping": opt.grad_clip,
        "optimizer": _optimizer(cfg, device_type),
        "scheduler": _scheduler(cfg),
        "zero_optimization": _zero(par.zero_stage, device_type, dp),
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        # DeepSpeed's own console chatter is replaced by our logger.
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    if par.tp > 1 and par.pp == 1:  # inside pipeline stages TP is applied by memgpt_dist/parallel/pipeline.py
        ds["tensor_parallel"] = _tensor_parallel(par.tp)
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    return ds


def _tensor_parallel(tp: int) -> dict[str, Any]:
    """AutoTP training: DeepSpeed replaces the Linear layers our rules name with its column- and
    row-parallel layers (memgpt_dist/parallel/tensor_parallel.py) inside deepspeed.initialize."""
    return {"autotp_size": tp, "partition_config": autotp_partition_config()}


def _optimizer(cfg: TrainConfig, device_type: str) -> dict[str, Any]:
    opt = cfg.optim
    params: dict[str, Any] = {
        "lr": opt.lr,
        "betas": [opt.beta1, opt.beta2],
        "eps": opt.eps,
        "weight_decay": opt.weight_decay,
    }
    if device_type == "cpu":
        # FusedAdam needs a GPU build; torch's AdamW is the CPU path DeepSpeed supports.
        params["torch_adam"] = True
    return {"type": "AdamW", "params": params}


def _scheduler(cfg: TrainConfig) -> dict[str, Any]:
    opt = cfg.optim
    return {
        "type": "WarmupCosineLR",
        "params": {
            "total_num_steps": cfg.train.max_steps,
            # DeepSpeed clamps warmup to >= 2 steps; it scales every param group's own lr.
            "warmup_num_steps": max(opt.warmup_steps, 2) if cfg.train.max_steps >= 2 else 1,
            "warmup_min_ratio": 0.0,
            "warmup_type": "linear",
            "cos_min_ratio": opt.min_lr / opt.lr,
        },
    }


def _zero(stage: int, device_type: str, dp: int) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero.update({
            "contiguous_gradients": True,
            # Overlap needs side streams; on CPU there are none and its extra buffers cost ~8% of
            # a step (benchmarks/train_throughput.py, 20M model).
            "overlap_comm": device_type == "cuda",
            "stage3_gather_16bit_weights_on_model_save": False,
        })
        if dp == 1:
            # One rank: the reduce-scatter per parameter and the one all-reduce of the bucket both
            # only copy, and the copy per parameter is the slower (benchmarks/zero3_settings.py,
            # ~20M memory on: 0.97x -> 1.03x and 0.84x -> 0.94x of ZeRO-0 in two quiet runs).
            zero["reduce_scatter"] = False
    elif stage in (1, 2):
        zero.update({"contiguous_gradients": True, "overlap_comm": False})
    return zero
