"""A NaN/Inf loss or gradient: every rank skips the step with weights, optimizer state and LR
schedule untouched, the skip is counted, and too many in a row stop the run unsaved.

The faults are injected on the test side by wrapping the trainer's forward: the logits (or only
their gradient) of chosen steps are multiplied by NaN, what a numerically broken batch does.
"""
from __future__ import annotations

import pytest
import torch

from inprocess import assert_same_leaves, full_params, make_trainer, optimizer_state
from memgpt_dist.parallel.dist import init_distributed
from memgpt_dist.train.stopping import EXIT_DIVERGED, Diverged


@pytest.fixture(scope="module")
def topo():
    return init_distributed()


def inject_nan(trainer, steps: set[int], monkeypatch, gradient_only: bool = False) -> None:
    """NaN logits (or, with `gradient_only`, finite logits whose gradient is NaN) at 1-based `steps`."""
    forward = trainer._forward

    def poisoned(batch, read_memory=True, state=None):
        out = forward(batch, read_memory, state)
        if not (trainer.engine.training and trainer.state.step + 1 in steps):
            return out
        if gradient_only:
            out.logits.register_hook(lambda g: g * float("nan"))
            return out
        return out._replace(logits=out.logits * float("nan"))

    monkeypatch.setattr(trainer, "_forward", poisoned)


def snapshot(trainer) -> tuple:
    return (full_params(trainer.engine), optimizer_state(trainer.engine), trainer.engine.lr_scheduler.state_dict(),
            trainer.engine.get_lr())


def assert_unchanged(before: tuple, after: tuple) -> None:
    assert_same_leaves(before[0], after[0])
    # ZeRO's "overflow" flag records the skip itself; everything else must be bit-identical
    assert_same_leaves(before[1], after[1], skip=lambda k: k.endswith("/params") or k == "/overflow")
    assert before[2] == after[2] and before[3] == after[3]


@pytest.mark.parametrize("gradient_only", [False, True], ids=["nan-loss", "nan-gradient"])
def test_nonfinite_step_is_skipped_with_state_untouched(topo, tmp_path, monkeypatch, gradient_only):
    t = make_trainer(topo, tmp_path, stage=3)
    inject_nan(t, {4}, monkeypatch, gradient_only)
    t.fit(stop_after=3)  # past the warmup's first steps, whose learning rate is 0
    before = snapshot(t)
    t.fit(stop_after=4)
    assert_unchanged(before, snapshot(t))
    assert (t.state.step, t.state.skipped_steps, t.state.nonfinite_streak, t.engine.skipped_steps) == (4, 1, 1, 1)
    t.fit(stop_after=5)  # the next finite step is applied and ends the streak
    assert not torch.equal(next(iter(before[0].values())), next(iter(full_params(t.engine).values())))
    assert (t.state.skipped_steps, t.state.nonfinite_streak) == (1, 0)


def test_too_many_consecutive_skips_stop_the_run_unsaved(topo, tmp_path, monkeypatch):
    t = make_trainer(topo, tmp_path, stage=3, extra=("train.max_nan_skips=2", "checkpoint.every=2"))
    inject_nan(t, set(range(3, 11)), monkeypatch)
    with pytest.raises(Diverged, match=r"3 consecutive steps .* train.max_nan_skips=2") as err:
        t.fit()
    assert err.value.exit_code == EXIT_DIVERGED
    assert t.state.step == 5  # steps 3, 4 skipped, the third (5) stops
    assert t.checkpointer.committed_steps() == [2, 4]  # step 4's save holds step 2's weights: nothing after
    assert t.checkpointer.verify(4) is None


def test_zero0_stops_before_applying_a_nonfinite_update(topo, tmp_path, monkeypatch):
    t = make_trainer(topo, tmp_path, stage=0)
    inject_nan(t, {4}, monkeypatch)
    t.fit(stop_after=3)
    before = full_params(t.engine)
    with pytest.raises(Diverged, match="zero_stage=0 cannot skip"):
        t.fit(stop_after=4)
    assert_same_leaves(before, full_params(t.engine))
