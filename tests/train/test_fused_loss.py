"""The training step's fused linear cross-entropy path (`DenseStep.loss_fn`, liger-kernel on CUDA)
wired through the real DeepSpeed engine: run here with the PyTorch implementation of the same
function, so what is tested on CPU is the wiring (the loss computed inside the model's forward
from the final hidden state and the gathered head weight, labels aligned, ZeRO-3's gather, the
carried state, the gradient), and the kernel's own equality is tests/perf/test_kernels.py's."""
from __future__ import annotations

import functools

import pytest
import torch

from inprocess import full_params, make_trainer
from memgpt_dist.parallel.dist import init_distributed
from memgpt_dist.perf.kernels import linear_cross_entropy_sum
from memgpt_dist.train.run import fused_loss_fn
from test_preemption import losses_of


@pytest.fixture(scope="module")
def topo():
    return init_distributed()


def _run(topo, root, stage: int, fused: bool, extra=()):
    t = make_trainer(topo, root, stage=stage, extra=("train.max_steps=4", *extra))
    assert t.step.loss_fn is None  # on CPU the step keeps the logits path
    shapes = []

    def loss_fn(hidden, weight, labels):  # the PyTorch kernel, recording what the forward hands it
        shapes.append((tuple(hidden.shape), tuple(weight.shape), tuple(labels.shape)))
        return linear_cross_entropy_sum(hidden, weight, labels, kernel="torch")

    if fused:
        t.step.loss_fn = loss_fn
    losses = losses_of(t)
    if fused:  # one call per micro-batch, with the whole head weight (ZeRO-3 gathered it)
        m, B, T = t.cfg.model, t.cfg.parallel.micro_batch_size, t.cfg.data.n_segments * t.cfg.model.segment_len
        assert shapes == [((B, T, m.n_embd), (m.vocab_size, m.n_embd), (B, T))] * len(losses)
    return losses, full_params(t.step.engine)


@pytest.mark.parametrize("stage,extra", [(0, ()), (3, ("train.carry_memory=true", "model.tie_embeddings=false"))])
def test_the_loss_inside_the_forward_trains_as_the_logits_path(topo, tmp_path, stage, extra):
    ref_losses, ref_params = _run(topo, tmp_path / "logits", stage, False, extra)
    losses, params = _run(topo, tmp_path / "fused", stage, True, extra)
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=0.0)
    assert len(set(losses)) == len(losses)  # it trains: every step's loss differs
    for name, p in ref_params.items():
        torch.testing.assert_close(params[name], p, rtol=1e-5, atol=1e-6, msg=name)


def test_the_forward_refuses_a_loss_fn_without_labels(topo, tmp_path):
    t = make_trainer(topo, tmp_path, stage=0)
    ids = torch.zeros(1, 16, dtype=torch.long)
    with pytest.raises(ValueError, match="loss_fn needs labels"):
        t.step.engine.module(ids, loss_fn=functools.partial(linear_cross_entropy_sum, kernel="torch"))


def test_on_cpu_no_fused_loss_is_chosen():
    assert fused_loss_fn("cpu") is None
