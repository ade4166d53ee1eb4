"""`memory.layers=every:2` (the memory in blocks 0 and 2 of 4 only) with stream training under
tp2 x pp2 (ZeRO-1, gloo, uniform split: blocks 0, 1 on stage 0 and 2, 3 on stage 1) against one
process with the same data and global batch.

Blocks 1 and 3 have no memory parameters (the TP rules and the pipeline's parameter names meet
blocks without them) and carry nothing; each stage carries its block with memory under its global
index, split over its TP ranks by head. The losses follow the single-process run, each rank saves
only its heads of its stage's block with memory, and the checkpoint resumed on one process (the
memory reassembled by stream, head and layer) repeats the uninterrupted losses. (A stage with no
block with memory is refused at load: tests/parallel/test_layout.py.)
"""
from __future__ import annotations

import pytest
import torch

from helpers import copy_run, read_metrics, tiny_args, train

STEPS, SAVE_AT = 4, 2
COMMON = [f"--train.max_steps={STEPS}", f"--checkpoint.every={SAVE_AT}", "--parallel.zero_stage=1",
          "--parallel.grad_accum=2", "--parallel.micro_batch_size=4", "--train.carry_memory=true",
          "--model.n_layer=4", "--memory.layers=every:2", "--parallel.pp_partition=uniform", "--train.eval_every=0"]


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("memory_layers_parallel")
    train(tiny_args(tiny_data, base / "one", *COMMON), nproc=1)
    train(tiny_args(tiny_data, base / "tp2pp2", *COMMON, "--parallel.tp=2", "--parallel.pp=2"), nproc=4)
    copy_run(base / "tp2pp2", base / "on_one")
    train(tiny_args(tiny_data, base / "on_one", *COMMON, "--resume", str(SAVE_AT)), nproc=1)
    return base


def _rank_state(run, rank: int) -> dict:
    return torch.load(run / "checkpoints" / f"step_{SAVE_AT:08d}" / "rank_state" / f"rank_{rank:05d}.pt",
                      weights_only=True)


def test_losses_match_single_process(runs):
    one, tp_pp = read_metrics(runs / "one"), read_metrics(runs / "tp2pp2")
    for step in range(1, STEPS + 1):
        assert tp_pp[step]["train/loss"] == pytest.approx(one[step]["train/loss"], rel=1e-5), step
        assert tp_pp[step]["train/grad_norm"] == pytest.approx(one[step]["train/grad_norm"], rel=1e-4), step
    assert {k for k in one[1] if k.startswith("memory/")} == {f"memory/{s}/layer{i}" for s in ("mem_gate", "mem_read_norm")
                                                              for i in (0, 2)}


def test_each_rank_saves_only_its_block_with_memory(runs):
    whole = _rank_state(runs / "one", 0)["memory_state"]
    assert sorted(whole) == ["layer0.A", "layer0.z", "layer2.A", "layer2.z"]
    for rank in range(4):  # tp fastest: ranks 0, 1 hold blocks 0, 1; ranks 2, 3 blocks 2, 3
        state = _rank_state(runs / "tp2pp2", rank)
        layer, (h0, h1) = 2 * state["coord"]["pp"], state["heads"]
        assert sorted(state["memory_state"]) == [f"layer{layer}.A", f"layer{layer}.z"]
        for key, value in state["memory_state"].items():
            torch.testing.assert_close(value, whole[key][:, h0:h1], rtol=1e-4, atol=1e-5, msg=key)


def test_tp_pp_checkpoint_resumes_on_one_process(runs):
    one, resumed = read_metrics(runs / "one"), read_metrics(runs / "on_one")
    for step in range(SAVE_AT + 1, STEPS + 1):
        assert resumed[step]["train/loss"] == pytest.approx(one[step]["train/loss"], rel=1e-5), step
