"""Tensor parallelism inside pipeline stages (tp2 x pp2, ZeRO-1) on gloo equals one process.

Four ranks (2 stages of 2 TP ranks, one data-parallel replica) train the memory model through the
real CLI on the same data and global batch (micro-batch 4 x grad_accum 2) as a single process:
losses and gradient norms agree within 1e-5 at step 1 and 1e-4 over 5 steps, and so does the
validation loss. Each TP rank's layer files hold its heads' shards, which merge by the TP rules
into the single-process weights after 6 steps; the replicated LayerNorms, biases and embedding
are bitwise equal across the TP ranks. A copy of the run resumed from its step-3 checkpoint
repeats the losses of steps 4-6. The first stage's TP ranks check once that they got one batch.
`memgpt-generate` and `memgpt-eval` read the tp x pp checkpoint as the single-process model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from helpers import bin_path, copy_run, free_port, read_metrics, run_cmd, tiny_args, train
from memgpt_dist.generate import load_model
from memgpt_dist.parallel.tensor_parallel import (apply_tensor_parallel_layers, check_tp_inputs_once, merge_tp_shards,
                                                  tp_shard_dim)

STEPS, SAVE_AT, TP, N_LAYER = 6, 3, 2, 2
COMMON = [f"--train.max_steps={STEPS}", "--parallel.zero_stage=1", "--parallel.grad_accum=2",
          "--parallel.micro_batch_size=4"]


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("tp_pp")
    train(tiny_args(tiny_data, base / "one", *COMMON), nproc=1)
    layout = tiny_args(tiny_data, base / "tp2pp2", *COMMON, "--parallel.tp=2", "--parallel.pp=2")
    train(layout, nproc=4)
    # the same run stopped after its step-3 checkpoint, then resumed there
    copy_run(base / "tp2pp2", base / "resumed")
    train([a.replace(str(base / "tp2pp2"), str(base / "resumed")) for a in layout] + ["--resume", str(SAVE_AT)],
          nproc=4)
    return base


def metrics(runs: Path, name: str) -> dict[int, dict]:
    return read_metrics(runs / name)


def test_losses_match_single_process(runs):
    one, tp_pp = metrics(runs, "one"), metrics(runs, "tp2pp2")
    assert tp_pp[1]["train/loss"] == pytest.approx(one[1]["train/loss"], rel=1e-5)
    for step in range(1, 6):
        assert tp_pp[step]["train/loss"] == pytest.approx(one[step]["train/loss"], rel=1e-4), step


def test_grad_norms_match_single_process(runs):
    """TP-sharded gradients counted on every TP rank, replicated ones once, the tied embedding once
    across stages (DeepSpeed's `tensor_model_parallel` and `ds_pipe_replicated` marks)."""
    one, tp_pp = metrics(runs, "one"), metrics(runs, "tp2pp2")
    assert tp_pp[1]["train/grad_norm"] == pytest.approx(one[1]["train/grad_norm"], rel=1e-5)
    for step in range(1, 6):
        assert tp_pp[step]["train/grad_norm"] == pytest.approx(one[step]["train/grad_norm"], rel=1e-4), step


def test_validation_loss_matches_single_process(runs):
    assert metrics(runs, "tp2pp2")[3]["val/loss"] == pytest.approx(metrics(runs, "one")[3]["val/loss"], rel=1e-5)


def layer_files(ckpt: Path, tp_rank: int) -> dict[str, torch.Tensor]:
    """One TP rank's parameters from the PipelineModule's per-layer files, under the GPT's names
    (layer 0 the embedding, layer i + 1 block i, the last layer ln_f and the tied head)."""
    out = {}
    for layer in range(N_LAYER + 2):
        state = torch.load(ckpt / f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt", weights_only=True)
        for name, tensor in state.items():
            if name.startswith("block."):
                name = f"blocks.{layer - 1}.{name[len('block.'):]}"
            out[name] = tensor
    return out


def test_tp_shards_merge_into_the_single_process_weights(runs):
    ckpt = runs / "tp2pp2" / "checkpoints" / f"step_{STEPS:08d}"
    shards = [layer_files(ckpt, t) for t in range(TP)]
    assert shards[0]["blocks.0.attn.q_proj.weight"].shape == (32, 64)  # 2 of the 4 heads
    assert shards[0]["blocks.1.attn.mem_beta"].shape == (2,)
    merged = merge_tp_shards(shards)
    one = torch.load(runs / "one" / "checkpoints" / f"step_{STEPS:08d}" / "mp_rank_00_model_states.pt",
                     weights_only=True)["module"]
    assert set(merged) == set(one)
    for name, full in one.items():
        assert float((merged[name] - full).norm() / full.norm()) < 1e-4, name


def test_replicated_parameters_are_bitwise_equal_across_tp_ranks(runs):
    ckpt = runs / "tp2pp2" / "checkpoints" / f"step_{STEPS:08d}"
    shards = [layer_files(ckpt, t) for t in range(TP)]
    replicated = [n for n in shards[0] if tp_shard_dim(n) is None]
    assert {"blocks.0.ln1.weight", "blocks.1.ln2.bias", "ln_f.weight", "wte.weight"} <= set(replicated)
    for name in replicated:
        assert torch.equal(shards[0][name], shards[1][name]), name


def test_a_tp_pp_checkpoint_loads_as_the_whole_model_for_generation_and_eval(runs):
    """load_model merges every TP rank's layer files of every stage into the GPT: the merged
    shards exactly, and the single-process run's weights within the training tolerance above."""
    ckpt = runs / "tp2pp2" / "checkpoints" / f"step_{STEPS:08d}"
    model, cfg = load_model(ckpt)
    whole, _ = load_model(runs / "one" / "checkpoints" / f"step_{STEPS:08d}")
    assert (cfg.parallel.tp, cfg.parallel.pp) == (TP, 2)
    merged = merge_tp_shards([layer_files(ckpt, t) for t in range(TP)])
    expected = {name: param.detach() for name, param in whole.named_parameters()}
    assert sorted(n for n, _ in model.named_parameters()) == sorted(expected)
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), merged[name].float()), name
        assert float((param.detach() - expected[name]).norm() / expected[name].norm()) < 1e-4, name


def test_eval_of_a_tp_pp_checkpoint_matches_the_single_process_run(runs, tmp_path):
    """memgpt-eval runs on the tp x pp checkpoint, and its loss by segment is the single-process
    checkpoint's (the weights agree within 1e-4)."""
    out = tmp_path / "eval.json"
    run_cmd([bin_path("memgpt-eval"), "--checkpoint", str(runs / "one"), str(runs / "tp2pp2"), "--segments", "3",
             "--corpus-docs", "4", "--json", str(out)])
    record = json.loads(out.read_text())
    one, tp_pp = (next(r["corpus"] for name, r in record.items() if name.startswith(run)) for run in ("one@", "tp2pp2@"))
    assert len(tp_pp["loss_by_segment"]) == 3
    assert tp_pp["loss_by_segment"] == pytest.approx(one["loss_by_segment"], rel=1e-4)


def test_resume_in_the_layout_reproduces_the_losses(runs):
    uninterrupted, resumed = metrics(runs, "tp2pp2"), metrics(runs, "resumed")
    assert min(resumed) == SAVE_AT + 1
    for step in range(SAVE_AT + 1, STEPS + 1):
        assert resumed[step]["train/loss"] == pytest.approx(uninterrupted[step]["train/loss"], rel=1e-6), step


def test_a_linear_layer_without_a_rule_is_refused():
    with pytest.raises(ValueError, match=r"mlp.extra_proj is an nn.Linear without a tensor-parallel rule"):
        apply_tensor_parallel_layers(nn.ModuleDict({"mlp": nn.ModuleDict({"extra_proj": nn.Linear(4, 4)})}), None)


def _first_stage_rank(rank: int, port: int, errors) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        stage = nn.Identity()
        check_tp_inputs_once(stage, dist.new_group([0, 1]), tp_src_rank=0)
        stage((torch.arange(6).view(2, 3) + rank, torch.tensor([[True], [False]])))  # a pipeline's (input_ids, reset)
    except RuntimeError as exc:
        errors.put((rank, str(exc)))
    finally:
        dist.destroy_process_group()


def test_first_stage_tp_ranks_given_different_batches_both_fail():
    errors = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_first_stage_rank, args=(free_port(), errors), nprocs=2, start_method="spawn")  # joins
    got = sorted(errors.get() for _ in range(2))
    assert [r for r, _ in got] == [0, 1] and all("data-parallel rank and size" in msg for _, msg in got)
