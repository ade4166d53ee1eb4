"""Tensor parallelism (DeepSpeed AutoTP) x ZeRO x data parallelism equals one process.

tp2 ZeRO-3 (2 ranks), tp2 x dp2 ZeRO-3 and tp2 x dp2 ZeRO-0 (4 ranks) train the same memory
model on the same data and global batch (4 streams) as a single process, for 5 steps, through
tests/dist/tp_worker.py (the real loader wiring, model plan, engine, trainer step and
checkpointer on gloo). Compared: losses and gradient norms (step 1 within 1e-5 relative, all 5
steps within 1e-4), gradients of named parameters reassembled from the TP shards (likewise,
relative in L2 norm), weights after 5 steps, replicated parameters bitwise equal across TP ranks,
each rank's memory-state slice against the single-process state's rows (streams) and heads, the
layout recorded in each rank's checkpoint file, a resume in the layout, and loading a TP
checkpoint as the whole model (generation and evaluation).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from helpers import ROOT, bin_path, free_port, run_cmd
from memgpt_dist.generate import load_model
from memgpt_dist.parallel.tensor_parallel import merge_tp_shards, tp_shard_dim

WORKER = str(ROOT / "tests" / "dist" / "tp_worker.py")
COMMON = ["--model.vocab_size=320", "--model.n_layer=2", "--model.n_head=4", "--model.n_embd=64",
          "--model.segment_len=16", "--data.n_segments=3", "--train.carry_memory=true", "--train.max_steps=10",
          "--optim.warmup_steps=2"]
# name -> (ranks, overrides); global batch 4 streams everywhere
LAYOUTS = {"tp2_zero3": (2, ["--parallel.tp=2", "--parallel.micro_batch_size=4", "--parallel.zero_stage=3"]),
           "tp2_dp2_zero3": (4, ["--parallel.tp=2", "--parallel.micro_batch_size=2", "--parallel.zero_stage=3"]),
           "tp2_dp2_zero0": (4, ["--parallel.tp=2", "--parallel.micro_batch_size=2", "--parallel.zero_stage=0"])}
N_HEAD, TP = 4, 2


def launch(out: Path, data: Path, nproc: int, extra: list[str]) -> list[dict]:
    args = [WORKER, str(out), str(data), *COMMON, *extra]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [bin_path("deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()), *args]
    run_cmd(cmd, timeout=300)
    return [torch.load(out / f"rank_{r:05d}.pt", weights_only=False) for r in range(nproc)]


def rank_states(out: Path, nproc: int, step: int = 3) -> list[dict]:
    """Each rank's own checkpoint file (its loader cursors, memory state and layout record)."""
    files = out / "checkpoints" / f"step_{step:08d}" / "rank_state"
    return [torch.load(files / f"rank_{r:05d}.pt", weights_only=True) for r in range(nproc)]


@pytest.fixture(scope="module")
def single(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp_single")
    return launch(out, tiny_data, 1, ["--parallel.micro_batch_size=4", "--parallel.zero_stage=3"])[0]


class LayoutRun(NamedTuple):
    name: str
    dumps: list[dict]  # per rank, from tp_worker.py
    states: list[dict]  # per rank, its step-3 checkpoint file
    out: Path


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layout_run(request, tiny_data, tmp_path_factory) -> LayoutRun:
    nproc, extra = LAYOUTS[request.param]
    out = tmp_path_factory.mktemp(request.param)
    return LayoutRun(request.param, launch(out, tiny_data, nproc, extra), rank_states(out, nproc), out)


def replica0(dumps: list[dict], states: list[dict]) -> list[dict]:
    """The dumps of data-parallel replica 0, in tp-rank order."""
    return [d for d, s in sorted(zip(dumps, states), key=lambda x: x[1]["coord"]["tp"]) if s["coord"]["dp"] == 0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def test_losses_match_single_process(layout_run, single):
    dumps = layout_run.dumps
    for dump in dumps:
        assert dump["losses"][0] == pytest.approx(single["losses"][0], rel=1e-5)
        assert dump["losses"] == pytest.approx(single["losses"], rel=1e-4)


def test_gradient_norms_match_single_process(layout_run, single):
    """ZeRO-3 computes the norm over TP shards itself; without a ZeRO optimizer
    `unsharded_grad_norm` does (the trainer's ZeRO-0 fallback is still a local norm)."""
    dumps, name = layout_run.dumps, layout_run.name
    for dump in dumps:
        norms = dump["unsharded_grad_norms"][:5] if name.endswith("zero0") else dump["grad_norms"]
        assert norms[0] == pytest.approx(single["grad_norms"][0], rel=1e-5)
        assert norms == pytest.approx(single["grad_norms"], rel=1e-4)


def test_every_sharded_parameter_is_marked_for_deepspeeds_gradient_norm(layout_run):
    """DeepSpeed counts a parameter's gradient on every TP rank only if it is marked
    `tensor_model_parallel`, else once (as replicated): the head-sliced ones must be marked too."""
    dumps = layout_run.dumps
    for dump in dumps:
        assert set(dump["tp_sharded"]) == {n for n in dump["params"] if tp_shard_dim(n) is not None}


def test_gradients_of_named_parameters_match_single_process(layout_run, single):
    dumps, states = layout_run.dumps, layout_run.states
    replica = replica0(dumps, states)
    for step, want in enumerate(single["grads"][:5]):  # then come the 2 steps after the resume
        tol = 1e-5 if step == 0 else 1e-4
        got = merge_tp_shards([d["grads"][step] for d in replica])
        for name, full in want.items():
            assert got[name].shape == full.shape, name
            assert rel_err(got[name], full) < tol, (step + 1, name, rel_err(got[name], full))


def test_weights_after_five_steps_match_single_process(layout_run, single):
    dumps, states = layout_run.dumps, layout_run.states
    merged = merge_tp_shards([d["params"] for d in replica0(dumps, states)])
    for name, full in single["params"].items():
        assert rel_err(merged[name], full) < 1e-4, name


def test_replicated_parameters_are_bitwise_equal_across_tp_ranks(layout_run):
    dumps, states = layout_run.dumps, layout_run.states
    replicated = [n for n in dumps[0]["params"] if tp_shard_dim(n) is None]
    assert {"blocks.0.ln1.weight", "blocks.1.ln2.bias", "ln_f.weight", "wte.weight"} <= set(replicated)
    for dp in {s["coord"]["dp"] for s in states}:
        ranks = [d for d, s in zip(dumps, states) if s["coord"]["dp"] == dp]
        for name in replicated:
            assert all(torch.equal(r["params"][name], ranks[0]["params"][name]) for r in ranks), name


def test_memory_state_slice_is_the_ranks_streams_and_heads(layout_run, single):
    dumps, states = layout_run.dumps, layout_run.states
    per_rank = N_HEAD // TP
    for dump, state in zip(dumps, states):
        rows, tp = state["stream_ids"], state["coord"]["tp"]
        heads = slice(tp * per_rank, (tp + 1) * per_rank)
        for key, full in single["memory"].items():  # layer{i}.A (B, H, dk, hd), layer{i}.z (B, H, dk)
            mine = dump["memory"][key]
            assert mine.shape[:2] == (len(rows), per_rank), key
            assert rel_err(mine, full[rows][:, heads]) < 1e-4, (key, state["coord"])


def test_checkpoint_records_each_ranks_layout_streams_and_heads(layout_run):
    dumps, states = layout_run.dumps, layout_run.states
    dp = len(dumps) // TP
    mb = 4 // dp
    for rank, state in enumerate(states):
        coord = {"dp": rank // TP, "tp": rank % TP, "pp": 0}  # tp fastest, as DeepSpeed's topology
        assert state["layout"] == {"dp": dp, "tp": TP, "pp": 1}
        assert state["coord"] == coord
        assert state["stream_ids"] == list(range(coord["dp"] * mb, (coord["dp"] + 1) * mb))
        assert state["heads"] == [coord["tp"] * N_HEAD // TP, (coord["tp"] + 1) * N_HEAD // TP]
        assert state["memory_state"]["layer0.A"].shape[1] == N_HEAD // TP


def test_resume_in_the_layout_reproduces_the_losses(layout_run):
    dumps = layout_run.dumps
    for dump in dumps:
        assert dump["resumed_losses"] == pytest.approx(dump["losses"][3:], rel=1e-6)


def test_a_tp_checkpoint_loads_as_the_whole_model_for_generation_and_eval(layout_run, single):
    """memgpt-generate and memgpt-eval read a TP checkpoint as the single-process model: ZeRO-0's
    per-TP-rank modules merged by the TP rules, ZeRO-3's through DeepSpeed's universal-checkpoint
    conversion (head-sliced memory parameters included)."""
    model, cfg = load_model(layout_run.out / "checkpoints" / "step_00000003")
    assert cfg.parallel.tp == TP
    for name, param in model.named_parameters():
        full = single["saved_params"][name]
        torch.testing.assert_close(param.detach(), full, rtol=1e-4, atol=1e-6, msg=name)
