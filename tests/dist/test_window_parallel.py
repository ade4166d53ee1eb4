"""`model.attention: window` with memory and decay, stream training (train.carry_memory), under
tp2 x pp2 (ZeRO-1, gloo) against one process with the same data and global batch.

Each rank carries the previous segment's keys and values of its stage's layers and its TP rank's
heads from one micro-batch to the next, beside the memory: the losses and gradient norms follow
the single-process run. Each rank's checkpoint holds its window cache (`layer<i>.k`, `.v`,
`.kv_valid`, heads in dim 1) equal to the single-process run's slice of it, and the tp2 x pp2
checkpoint resumed on one process (the cache reassembled by stream, head and layer) repeats the
uninterrupted single-process losses.
"""
from __future__ import annotations

import pytest
import torch

from helpers import copy_run, read_metrics, tiny_args, train

STEPS, SAVE_AT = 6, 3
COMMON = [f"--train.max_steps={STEPS}", "--parallel.zero_stage=1", "--parallel.grad_accum=2",
          "--parallel.micro_batch_size=4", "--train.carry_memory=true", "--model.attention=window",
          "--memory.decay=true", "--memory.decay_bias_init=2.0", "--train.eval_every=0"]


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("window_parallel")
    train(tiny_args(tiny_data, base / "one", *COMMON), nproc=1)
    layout = tiny_args(tiny_data, base / "tp2pp2", *COMMON, "--parallel.tp=2", "--parallel.pp=2")
    train(layout, nproc=4)
    copy_run(base / "tp2pp2", base / "on_one")
    train(tiny_args(tiny_data, base / "on_one", *COMMON, "--resume", str(SAVE_AT)), nproc=1)
    return base


def test_losses_match_single_process(runs):
    one, tp_pp = read_metrics(runs / "one"), read_metrics(runs / "tp2pp2")
    for step in range(1, STEPS + 1):
        assert tp_pp[step]["train/loss"] == pytest.approx(one[step]["train/loss"], rel=1e-5), step
        assert tp_pp[step]["train/grad_norm"] == pytest.approx(one[step]["train/grad_norm"], rel=1e-4), step


def _rank_state(run, rank: int) -> dict:
    return torch.load(run / "checkpoints" / f"step_{SAVE_AT:08d}" / "rank_state" / f"rank_{rank:05d}.pt",
                      weights_only=True)


def test_each_rank_saves_its_heads_of_its_layers_window(runs):
    whole = _rank_state(runs / "one", 0)["memory_state"]
    assert {"layer0.k", "layer0.v", "layer0.kv_valid", "layer1.k"} <= set(whole)
    for rank in range(4):
        state = _rank_state(runs / "tp2pp2", rank)
        h0, h1 = state["heads"]
        layer = state["coord"]["pp"]
        assert sorted(state["memory_state"]) == sorted(f"layer{layer}.{f}" for f in ("A", "z", "k", "v", "kv_valid"))
        for key, value in state["memory_state"].items():
            want = whole[key][:, h0:h1]
            assert value.dtype == want.dtype and torch.allclose(value.float(), want.float(), atol=1e-5), (rank, key)


def test_tp_pp_checkpoint_resumes_on_one_process(runs):
    one, resumed = read_metrics(runs / "one"), read_metrics(runs / "on_one")
    for step in range(SAVE_AT + 1, STEPS + 1):
        assert resumed[step]["train/loss"] == pytest.approx(one[step]["train/loss"], rel=1e-5), step
