"""2 ranks x ZeRO-3 on gloo equal 1 rank with the same global batch, step by step.

The loader assigns data by global stream id, so dp=2 x micro_batch 2 reads exactly the rows of
dp=1 x micro_batch 4; the trainer normalises the loss by the global token count. Per-step loss
and gradient norm must agree within 1e-5 relative (float reductions differ in order only).
"""
from __future__ import annotations

import pytest

from helpers import read_metrics, tiny_args, train


@pytest.fixture(scope="module")
def pair(tiny_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("zero3")
    one, two = base / "one", base / "two"
    common = ["--train.max_steps=5", "--checkpoint.every=0", "--checkpoint.save_at_end=false",
              "--train.eval_every=5"]
    train(tiny_args(tiny_data, one, *common, "--parallel.micro_batch_size=4"), nproc=1)
    train(tiny_args(tiny_data, two, *common, "--parallel.micro_batch_size=2"), nproc=2)
    return read_metrics(one), read_metrics(two)


def test_losses_match_single_process(pair):
    one, two = pair
    for step in range(1, 6):
        assert two[step]["train/loss"] == pytest.approx(one[step]["train/loss"], rel=1e-5), step


def test_grad_norms_match_single_process(pair):
    one, two = pair
    for step in range(1, 6):
        assert two[step]["train/grad_norm"] == pytest.approx(one[step]["train/grad_norm"], rel=1e-5), step


def test_validation_matches_single_process(pair):
    one, two = pair
    assert two[5]["val/loss"] == pytest.approx(one[5]["val/loss"], rel=1e-5)


def test_training_makes_progress(pair):
    one, _ = pair
    assert one[5]["train/loss"] < one[1]["train/loss"]
