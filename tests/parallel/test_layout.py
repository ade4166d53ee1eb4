"""Layouts: rejected layouts and their advice, the rank grid, the pipeline split, memory estimates, --dry-run."""
import json
import logging
import random

import pytest

from helpers import bin_path, run_cmd
from memgpt_dist.config import ConfigError, load_config
from memgpt_dist.parallel.layout import (RankPlace, bubble_fraction, partition_balanced, partition_uniform,
                                         require_executable_layout, validate_layout)
from memgpt_dist.parallel.shares import parameter_numels, rank_shares

SMALL = ["model.n_layer=4", "model.n_head=4", "model.n_embd=64", "model.vocab_size=256", "model.segment_len=16"]


def layout_of(world_size, *overrides):
    return validate_layout(load_config(None, SMALL + list(overrides)), world_size)


@pytest.mark.parametrize("overrides, message", [
    (["parallel.pp=2", "parallel.zero_stage=3"],
     r"pipeline parallelism \(parallel.pp=2\) runs only with ZeRO-0/1 in DeepSpeed \(PipelineEngine asserts "
     r"zero_stage < 2\), got parallel.zero_stage=3; use parallel.zero_stage=1 with parallel.pp=2, or parallel.pp=1 "
     r"with parallel.zero_stage=3 and parallel.tp for model parallelism"),
    (["parallel.pp=2", "parallel.zero_stage=2"], r"ZeRO-0/1.*zero_stage=2; use parallel.zero_stage=1 with parallel.pp=2"),
    (["model.n_head=12", "model.n_embd=96", "parallel.tp=5"],
     r"parallel.tp=5 does not divide model.n_head=12: .*whole attention heads.*; use parallel.tp=4 or parallel.tp=6"),
    (["model.n_head=4", "parallel.tp=8"], r"parallel.tp=8 does not divide model.n_head=4.*; use parallel.tp=4$"),
    (["parallel.pp=6", "parallel.zero_stage=1"],
     r"parallel.pp=6 exceeds model.n_layer=4: every pipeline stage needs at least one block; use parallel.pp=4"),
])
def test_layout_rejected_at_config_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, SMALL + overrides)


def test_world_size_not_divisible_by_tp_x_pp():
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by parallel.tp x parallel.pp = 2 x 2 = 4: "
                                          r".*run on 4 or 8 ranks, or use parallel.tp=\d parallel.pp=\d on 6"):
        layout_of(6, "parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1")


def test_world_size_advice_fits():
    """The proposed (tp, pp) really divides the world size and the heads."""
    cfg = load_config(None, SMALL + ["parallel.tp=4", "parallel.pp=1"])
    with pytest.raises(ConfigError, match=r"use parallel.tp=2 parallel.pp=1 on 6"):
        validate_layout(cfg, 6)


def test_global_batch_not_divisible_by_micro_batch_x_dp():
    with pytest.raises(ConfigError, match=r"parallel.global_batch_size=40 is not divisible by parallel.micro_batch_size "
                                          r"x dp = 4 x 4 = 16: .*use parallel.global_batch_size=32 \(grad_accum 2\) or "
                                          r"parallel.global_batch_size=48 \(grad_accum 3\) or "
                                          r"parallel.micro_batch_size=5 with parallel.grad_accum=2"):
        layout_of(4, "parallel.micro_batch_size=4", "parallel.global_batch_size=40")


def test_global_batch_must_match_grad_accum():
    with pytest.raises(ConfigError, match=r"global_batch_size=64 but .* = 4 x 1 x 4 = 16; set parallel.grad_accum=4"):
        layout_of(4, "parallel.micro_batch_size=4", "parallel.global_batch_size=64")


def test_global_batch_derived_or_checked():
    assert layout_of(4, "parallel.micro_batch_size=2", "parallel.grad_accum=3").global_batch_size == 24
    layout = layout_of(4, "parallel.micro_batch_size=2", "parallel.grad_accum=3", "parallel.global_batch_size=24")
    assert (layout.dp, layout.grad_accum, layout.global_batch_size) == (4, 3, 24)


def test_fewer_micro_batches_than_stages_is_a_logged_bubble_warning(caplog):
    cfg = load_config(None, SMALL + ["parallel.pp=4", "parallel.zero_stage=1", "parallel.grad_accum=2"])
    (warning,) = validate_layout(cfg, 4).warnings
    assert "idle 60% of the step" in warning and bubble_fraction(4, 2) == pytest.approx(0.6)
    assert "raise parallel.grad_accum to 4 (43%)" in warning
    with caplog.at_level(logging.WARNING, logger="memgpt_dist"):
        require_executable_layout(cfg, 4)
    assert "pipeline bubble" in caplog.text
    assert layout_of(4, "parallel.pp=4", "parallel.zero_stage=1", "parallel.grad_accum=4").warnings == ()


def test_trainer_runs_tp_inside_pipeline_stages():
    cfg = load_config(None, SMALL + ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1"])
    layout = require_executable_layout(cfg, 8)
    assert (layout.dp, layout.tp, layout.pp, layout.zero_stage) == (2, 2, 2, 1)


@pytest.mark.parametrize("overrides, message", [
    (["parallel.zero_stage=0", "parallel.precision=fp16"],
     r"parallel.zero_stage=0 with parallel.pp=2, parallel.precision=fp16 and optim.grad_clip=1.0: .*not verified.*"
     r"use parallel.zero_stage=1, parallel.precision=bf16 or fp32, or optim.grad_clip=0"),
])
def test_trainer_refuses_what_the_pipeline_cannot_run_yet(overrides, message):
    cfg = load_config(None, SMALL + ["parallel.pp=2", "parallel.zero_stage=1", *overrides])
    with pytest.raises(ConfigError, match=message):
        require_executable_layout(cfg, 2)


def test_pipeline_refuses_a_stage_without_memory():
    """memory.layers must leave a block with memory on every stage (the gates' optimizer group)."""
    cfg = load_config(None, SMALL + ["parallel.pp=2", "parallel.zero_stage=1", "memory.layers=1"])
    with pytest.raises(ConfigError, match=r"memory.layers='1' with parallel.pp=2 leaves pipeline stage\(s\) without "
                                          r"a block that has the memory \(stage 1: blocks 2, 3\).*memory.layers=1,3"):
        require_executable_layout(cfg, 2)
    assert require_executable_layout(load_config(None, SMALL + ["parallel.pp=2", "parallel.zero_stage=1",
                                                                "memory.layers=every:2"]), 2).pp == 2


@pytest.mark.parametrize("overrides", [["train.carry_memory=true"], ["data.n_segments_schedule=0:2,10:4"],
                                       ["train.carry_memory=true", "data.n_segments_schedule=0:1,4:2", "parallel.tp=2"]])
def test_pipeline_runs_stream_training_and_the_k_curriculum(overrides):
    cfg = load_config(None, SMALL + ["parallel.pp=2", "parallel.zero_stage=1", *overrides])
    assert require_executable_layout(cfg, 4).pp == 2


@pytest.mark.parametrize("overrides", [["optim.grad_clip=0"], ["optim.grad_clip=0", "parallel.precision=fp16"],
                                       ["parallel.precision=fp32"], ["parallel.precision=auto"]])
def test_pipeline_under_zero0_runs(overrides):
    cfg = load_config(None, SMALL + ["parallel.pp=2", "parallel.zero_stage=0", *overrides])
    assert require_executable_layout(cfg, 2).zero_stage == 0


def test_trainer_runs_pipeline_x_data_parallel_layouts():
    layout = require_executable_layout(load_config(None, SMALL + ["parallel.pp=2", "parallel.zero_stage=1"]), 4)
    assert (layout.dp, layout.tp, layout.pp, layout.zero_stage) == (2, 1, 2, 1)


def test_trainer_runs_tensor_parallel_layouts():
    layout = require_executable_layout(load_config(None, SMALL + ["parallel.tp=2"]), 4)
    assert (layout.dp, layout.tp, layout.pp, layout.zero_stage) == (2, 2, 1, 3)


def test_rank_grid_follows_deepspeed_topology():
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    layout = layout_of(8, "parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1")
    assert (layout.dp, layout.tp, layout.pp) == (2, 2, 2)
    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=2)
    for rank in range(8):
        ds = topo.get_coord(rank)
        assert layout.place(rank) == RankPlace(dp=ds.data, pp=ds.pipe, tp=ds.model), rank
        assert layout.rank(layout.place(rank)) == rank
    # tp fastest, then dp, then pp
    assert [tuple(vars(layout.place(r)).values()) for r in range(4)] == [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1)]


def test_rank_table_world8_tp2_pp2_dp2():
    cfg = load_config(None, SMALL + ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1"])
    plan = rank_shares(cfg, validate_layout(cfg, 8), "fp32")
    table = [(r.rank, r.place.dp, r.place.pp, r.place.tp, r.items, r.heads) for r in plan.ranks]
    first = ("embed", "block.0", "block.1")
    last = ("block.2", "block.3", "norm+head")
    assert table == [(0, 0, 0, 0, first, (0, 2)), (1, 0, 0, 1, first, (2, 4)),
                     (2, 1, 0, 0, first, (0, 2)), (3, 1, 0, 1, first, (2, 4)),
                     (4, 0, 1, 0, last, (0, 2)), (5, 0, 1, 1, last, (2, 4)),
                     (6, 1, 1, 0, last, (0, 2)), (7, 1, 1, 1, last, (2, 4))]


def test_parameters_per_rank_add_up():
    """Over one replica (dp 0), TP-sharded tensors appear once, replicated ones on every TP rank, and
    the tied embedding on both end stages."""
    cfg = load_config(None, SMALL + ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1"])
    numels = parameter_numels(cfg)
    plan = rank_shares(cfg, validate_layout(cfg, 8), "fp32", numels)
    replicated = sum(v for n, v in numels.items() if ".ln" in n or n.startswith("ln_f.")
                     or n.endswith(("o_proj.bias", "down_proj.bias")))
    tied = numels["wte.weight"]
    sharded = plan.n_params - replicated - tied
    assert sum(r.n_params for r in plan.ranks if r.place.dp == 0) == sharded + 2 * replicated + 2 * 2 * tied


def test_meta_device_count_equals_the_real_model():
    from memgpt_dist.model import GPT

    for extra in ([], ["memory.layers=1,2"]):
        cfg = load_config(None, SMALL + extra)
        assert sum(parameter_numels(cfg).values()) == GPT(cfg.model, cfg.memory).num_params()


@pytest.mark.parametrize("seed", range(20))
def test_partitions_match_deepspeed(seed):
    from deepspeed.runtime.utils import partition_balanced as ds_balanced
    from deepspeed.runtime.utils import partition_uniform as ds_uniform

    rng = random.Random(seed)
    weights = [rng.choice([0, 1, 5, 100, 1000, rng.randint(1, 10**6)]) for _ in range(rng.randint(1, 14))]
    parts = rng.randint(1, 6)
    assert list(partition_balanced(weights, parts)) == [int(x) for x in ds_balanced(weights, parts)]
    assert list(partition_uniform(len(weights), parts)) == [int(x) for x in ds_uniform(len(weights), parts)]


def test_uniform_split_counts_items_not_parameters():
    cfg = load_config(None, SMALL + ["parallel.pp=3", "parallel.zero_stage=1", "parallel.pp_partition=uniform"])
    plan = rank_shares(cfg, validate_layout(cfg, 3), "fp32")
    assert [r.items for r in plan.ranks] == [("embed", "block.0"), ("block.1", "block.2"), ("block.3", "norm+head")]


def memory_at(stage, *extra):
    cfg = load_config(None, SMALL + [f"parallel.zero_stage={stage}", *extra])
    (rank0, *_) = rank_shares(cfg, validate_layout(cfg, 4), "bf16").ranks
    return rank0.n_params, rank0.memory


def test_memory_estimate_shrinks_with_zero_stage():
    n, m0 = memory_at(0)
    assert (m0.weights, m0.gradients, m0.optimizer) == (2 * n, 2 * n, 12 * n)  # bf16 + fp32 master and moments
    _, m1 = memory_at(1)
    assert (m1.weights, m1.gradients, m1.optimizer) == (2 * n, 2 * n, 12 * n // 4)  # optimizer states over dp 4
    _, m2 = memory_at(2)
    assert (m2.weights, m2.gradients, m2.optimizer) == (2 * n, 2 * n // 4, 12 * n // 4)  # and gradients
    _, m3 = memory_at(3)
    assert (m3.weights, m3.gradients, m3.optimizer) == (2 * n // 4, 2 * n // 4, 12 * n // 4)  # and weights
    assert m0.total > m1.total > m2.total > m3.total
    assert m0.activations == m3.activations and m0.memory_state == m3.memory_state


def test_memory_state_is_split_by_heads_and_layers():
    cfg = load_config(None, SMALL + ["parallel.micro_batch_size=3"])
    (rank0,) = rank_shares(cfg, validate_layout(cfg, 1), "fp32").ranks
    dk, hd = 2 * 3 * 16, 16  # dk = 2 * nu * head_dim
    assert rank0.memory.memory_state == 4 * 3 * 4 * 4 * (dk * hd + dk)  # fp32 x streams x layers x heads
    cfg = load_config(None, SMALL + ["parallel.micro_batch_size=3", "parallel.tp=2", "parallel.pp=2",
                                     "parallel.zero_stage=1"])
    rank0 = rank_shares(cfg, validate_layout(cfg, 4), "fp32").ranks[0]
    assert rank0.memory.memory_state == 4 * 3 * 2 * 2 * (dk * hd + dk)


def test_memory_in_some_layers_counts_only_there():
    """memory.layers: the memory state, its activations and its parameters on the stages of the
    blocks that have it (uniform split: blocks 0, 1 on stage 0, blocks 2, 3 on stage 1)."""
    def ranks(layers):
        cfg = load_config(None, SMALL + ["parallel.micro_batch_size=3", "parallel.pp=2", "parallel.zero_stage=1",
                                         "parallel.pp_partition=uniform", f"memory.layers={layers}"])
        return rank_shares(cfg, validate_layout(cfg, 2), "fp32").ranks

    dk, hd = 2 * 3 * 16, 16
    every, last, everywhere = ranks("every:2"), ranks("3"), ranks("")
    assert [r.memory.memory_state for r in every] == [4 * 3 * 1 * 4 * (dk * hd + dk)] * 2  # one memory block each
    assert [r.memory.memory_state for r in last] == [0, 4 * 3 * 1 * 4 * (dk * hd + dk)]
    assert last[0].memory.activations < every[0].memory.activations < everywhere[0].memory.activations
    assert last[1].memory.activations == every[1].memory.activations < everywhere[1].memory.activations
    assert last[0].n_params < every[0].n_params < everywhere[0].n_params
    assert last[1].n_params == every[1].n_params < everywhere[1].n_params


def test_window_and_full_attention_in_the_estimate():
    """The window's carried keys and values per held kv head; scores over 2N keys (window) or T (full)."""
    def rank0(*extra, world=1):
        cfg = load_config(None, SMALL + ["parallel.micro_batch_size=3", *extra])
        return cfg, rank_shares(cfg, validate_layout(cfg, world), "fp32").ranks[0].memory

    cfg, seg = rank0()
    _, win = rank0("model.attention=window")
    N, hd = cfg.model.segment_len, 16
    assert win.memory_state - seg.memory_state == 3 * 4 * 4 * N * (2 * 4 * hd + 1)  # streams x layers x kv heads
    _, win_tp = rank0("model.attention=window", "parallel.tp=2", world=2)
    _, seg_tp = rank0("parallel.tp=2", world=2)
    assert win_tp.memory_state - seg_tp.memory_state == 3 * 4 * 2 * N * (2 * 4 * hd + 1)
    _, full = rank0("model.attention=full")
    assert seg.activations < win.activations < full.activations


def test_activation_checkpointing_shrinks_activations():
    _, plain = memory_at(3)
    _, ac = memory_at(3, "parallel.activation_checkpointing=true")
    assert ac.activations < plain.activations


def test_dry_run_cli_prints_every_rank():
    proc = run_cmd([bin_path("python"), "-m", "launch.train", "--config", "configs/gpt-125m.yaml", "--dry-run",
                    "--world-size", "8", "parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=1"])
    rows = [line.split() for line in proc.stdout.splitlines() if line[:1] == " " and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == list(range(8))
    assert [r[1:4] for r in rows[:3]] == [["0", "0", "0"], ["0", "0", "1"], ["1", "0", "0"]]  # dp pp tp
    assert "world 8 = pp 2 x dp 2 x tp 2" in proc.stdout and "pipeline bubble" in proc.stdout
    ds = json.loads(proc.stdout.split("# DeepSpeed config\n", 1)[1])
    assert ds["train_batch_size"] == 8 * 2


def test_dry_run_cli_json():
    proc = run_cmd([bin_path("python"), "-m", "launch.train", "--config", "configs/gpt-125m.yaml", "--dry-run",
                    "--world-size", "8", "--json", "--device", "cuda"])
    out = json.loads(proc.stdout)
    assert out["plan"]["precision"] == "bf16" and len(out["plan"]["ranks"]) == 8
    assert out["plan"]["ranks"][0]["memory"]["total"] > 0 and out["deepspeed"]["zero_optimization"]["stage"] == 3
