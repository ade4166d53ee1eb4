"""The Llama-style blocks (rmsnorm, SwiGLU, grouped-query attention, untied head, no biases) in every
layout family: TP (kv heads split with their queries) under ZeRO-3, a pipeline (the untied head on
the last stage), and a relayout (a tp2 ZeRO-3 checkpoint resumed as pp2 ZeRO-1, through DeepSpeed's
universal checkpoint) train with the single-process losses, through the real CLI on gloo."""
from __future__ import annotations

import pytest

from helpers import copy_run, read_metrics, tiny_args, train

STEPS, SAVE_AT = 4, 2
MODERN = ["--model.norm=rmsnorm", "--model.mlp=swiglu", "--model.mlp_hidden=96", "--model.n_kv_head=2",
          "--model.tie_embeddings=false", "--model.bias=false"]
COMMON = [*MODERN, f"--train.max_steps={STEPS}", f"--checkpoint.every={SAVE_AT}", "--train.eval_every=0",
          "--parallel.grad_accum=2", "--parallel.micro_batch_size=2"]
LAYOUTS = {"tp2": ["--parallel.tp=2", "--parallel.zero_stage=3"],
           "pp2": ["--parallel.pp=2", "--parallel.zero_stage=1"]}


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("modern")
    train(tiny_args(tiny_data, base / "one", *COMMON, "--parallel.zero_stage=1"), nproc=1)
    for name, extra in LAYOUTS.items():
        train(tiny_args(tiny_data, base / name, *COMMON, *extra), nproc=2)
    # the tp2 run's step-2 checkpoint, resumed in the pipeline layout
    copy_run(base / "tp2", base / "relayout")
    train(tiny_args(tiny_data, base / "relayout", *COMMON, *LAYOUTS["pp2"]) + ["--resume", str(SAVE_AT)], nproc=2)
    return base


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_losses_match_single_process(runs, name):
    one, other = read_metrics(runs / "one"), read_metrics(runs / name)
    assert other[1]["train/loss"] == pytest.approx(one[1]["train/loss"], rel=1e-5)
    assert other[1]["train/grad_norm"] == pytest.approx(one[1]["train/grad_norm"], rel=1e-4)
    for step in range(1, STEPS + 1):
        assert other[step]["train/loss"] == pytest.approx(one[step]["train/loss"], rel=1e-4), step


def test_a_relayout_continues_with_the_single_process_losses(runs):
    one, resumed = read_metrics(runs / "one"), read_metrics(runs / "relayout")
    assert min(resumed) == SAVE_AT + 1
    for step in range(SAVE_AT + 1, STEPS + 1):
        assert resumed[step]["train/loss"] == pytest.approx(one[step]["train/loss"], rel=1e-4), step
