"""The generated DeepSpeed dict follows the typed config."""
import pytest

from memgpt_dist.config import ConfigError, load_config
from memgpt_dist.parallel.deepspeed_config import build_ds_config, resolve_precision


def test_batch_sizes_follow_layout():
    cfg = load_config(None, ["parallel.micro_batch_size=3", "parallel.grad_accum=2"])
    ds = build_ds_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 3 * 2 * 4


def test_zero_stage_and_optimizer():
    cfg = load_config(None, ["parallel.zero_stage=1", "optim.lr=3e-4", "optim.weight_decay=0.05"])
    ds = build_ds_config(cfg, world_size=1)
    assert ds["zero_optimization"]["stage"] == 1
    assert ds["optimizer"]["type"] == "AdamW"
    assert ds["optimizer"]["params"]["lr"] == 3e-4
    assert ds["optimizer"]["params"]["weight_decay"] == 0.05
    assert ds["optimizer"]["params"]["torch_adam"] is True  # CPU path


def test_gpu_uses_fused_adam_and_bf16():
    cfg = load_config(None)
    ds = build_ds_config(cfg, world_size=8, device_type="cuda", bf16_supported=True)
    assert "torch_adam" not in ds["optimizer"]["params"]
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["overlap_comm"] is True


def test_cpu_is_fp32_without_comm_overlap():
    ds = build_ds_config(load_config(None), world_size=2)
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["overlap_comm"] is False  # no side streams on CPU


def test_zero3_averages_gradients_with_one_all_reduce_only_at_one_data_parallel_rank():
    """One rank: one all-reduce of the bucket (a copy) instead of a reduce-scatter per parameter;
    more ranks keep DeepSpeed's reduce-scatter, which moves 1/dp of the bytes."""
    cfg = load_config(None, ["parallel.zero_stage=3"])
    assert build_ds_config(cfg, world_size=1)["zero_optimization"]["reduce_scatter"] is False
    assert "reduce_scatter" not in build_ds_config(cfg, world_size=2)["zero_optimization"]
    tp2 = load_config(None, ["parallel.zero_stage=3", "parallel.tp=2"])
    assert build_ds_config(tp2, world_size=2)["zero_optimization"]["reduce_scatter"] is False  # dp 1
    zero1 = load_config(None, ["parallel.zero_stage=1"])
    assert "reduce_scatter" not in build_ds_config(zero1, world_size=1)["zero_optimization"]


def test_schedule_is_warmup_cosine_to_min_lr():
    cfg = load_config(None, ["optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_steps=7", "train.max_steps=90"])
    sched = build_ds_config(cfg, world_size=1)["scheduler"]
    assert sched["type"] == "WarmupCosineLR"
    assert sched["params"]["total_num_steps"] == 90
    assert sched["params"]["warmup_num_steps"] == 7
    assert sched["params"]["cos_min_ratio"] == pytest.approx(0.1)


def test_fp16_on_cpu_is_rejected_with_advice_and_bf16_runs():
    with pytest.raises(ConfigError, match="precision=bf16, fp32 or auto"):
        resolve_precision("fp16", "cpu", False)
    assert resolve_precision("bf16", "cpu", False) == "bf16"  # DeepSpeed's CPU accelerator: tests/train/test_bf16.py
    assert resolve_precision("auto", "cpu", True) == "fp32"


def test_world_size_must_fit_layout():
    cfg = load_config(None)
    assert cfg.parallel.dp(3) == 3


def test_tensor_parallel_asks_for_autotp_with_our_rules():
    from memgpt_dist.parallel.tensor_parallel import autotp_partition_config

    cfg = load_config(None, ["parallel.tp=2", "parallel.micro_batch_size=3"])
    ds = build_ds_config(cfg, world_size=8)
    assert ds["tensor_parallel"] == {"autotp_size": 2, "partition_config": autotp_partition_config()}
    assert ds["train_batch_size"] == 3 * 4  # dp = 8 / tp
    assert "tensor_parallel" not in build_ds_config(load_config(None), world_size=8)
