"""A universal-checkpoint load (the path of a resume on another layout) restores what a normal
load restores, in one process: ZeRO-3 through the conversion back into ZeRO-3 gives every
optimizer state bitwise (the two things DeepSpeed's ZeRO-3 universal load gets wrong on its own
included: each param group's hyperparameters, each group's own Adam step), and into ZeRO-1 the
same next losses."""
from __future__ import annotations

import pytest

from inprocess import assert_same_leaves, full_params, make_trainer, optimizer_state
from memgpt_dist.parallel.dist import init_distributed
from memgpt_dist.parallel.layout import Layout
from memgpt_dist.train.universal import ensure_universal

CARRY = ("train.carry_memory=true",)
SAVED = Layout(world_size=1, dp=1, tp=1, pp=1, zero_stage=3, micro_batch_size=2, grad_accum=1, global_batch_size=2)


@pytest.fixture(scope="module")
def topo():
    return init_distributed()


def saved_run(topo, root):
    a = make_trainer(topo, root, seed=1, stage=3, extra=CARRY)
    for _ in range(3):
        a.train_step()
    a.save()
    root_dir, seconds = ensure_universal(root / "checkpoints" / "step_00000003", SAVED, topo)
    assert seconds is not None
    return a, root_dir


def test_universal_load_into_zero3_restores_every_optimizer_state(topo, tmp_path):
    a, universal = saved_run(topo, tmp_path)
    b = make_trainer(topo, tmp_path, seed=2, stage=3, extra=CARRY, load_universal=True)
    b.restore(3, universal)
    assert_same_leaves(full_params(a.engine), full_params(b.engine))
    skip = lambda key: key.endswith("/params") or "param_names" in key  # noqa: E731 - parameter ids
    assert_same_leaves(optimizer_state(a.engine), optimizer_state(b.engine), skip=skip)
    decay = [g["weight_decay"] for g in b.engine.optimizer.optimizer.param_groups]
    assert decay == [0.1, 0.0, 0.0]  # decay, no_decay, memory gates: each its own
    for _ in range(2):  # a shared step counter would show from the second step on
        ra, rb = a.train_step(), b.train_step()
        assert ra.loss == rb.loss and ra.grad_norm == rb.grad_norm


def test_universal_load_into_zero1_continues_with_the_same_losses(topo, tmp_path):
    a, universal = saved_run(topo, tmp_path)
    b = make_trainer(topo, tmp_path, seed=2, stage=1, extra=CARRY, load_universal=True)
    b.restore(3, universal)
    for _ in range(2):
        ra, rb = a.train_step(), b.train_step()
        assert rb.loss == pytest.approx(ra.loss, rel=1e-6)
