"""Save a real DeepSpeed engine mid-training, load it into a fresh one: every tensor is equal."""
from __future__ import annotations

import pytest
import torch

from memgpt_dist.config import load_config
from memgpt_dist.parallel.dist import init_distributed
from memgpt_dist.parallel.engine import build_engine
from memgpt_dist.train.checkpoint import Checkpointer
from memgpt_dist.train.metrics import MetricsLogger
from memgpt_dist.train.run import build_model
from memgpt_dist.train.trainer import Trainer


class Batches:
    """A deterministic stateful batch source (the real loader is tested in tests/data)."""

    def __init__(self, cfg, i: int = 0):
        self.cfg, self.i = cfg, i

    def __next__(self):
        g = torch.Generator().manual_seed(self.i)
        self.i += 1
        B, K, N = self.cfg.parallel.micro_batch_size, self.cfg.data.n_segments, self.cfg.model.segment_len
        ids = torch.randint(0, self.cfg.model.vocab_size, (B, K * N + 1), generator=g)
        reset = torch.zeros(B, K, dtype=torch.bool)
        reset[:, 0] = True
        return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "reset": reset}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, sd):
        self.i = sd["i"]


def make_trainer(stage, topo, root, seed):
    cfg = load_config(None, OVERRIDES + [f"train.seed={seed}", f"parallel.zero_stage={stage}"])
    engine, _ = build_engine(build_model(cfg), cfg, topo)
    return Trainer(cfg, topo, engine, Batches(cfg), None, Checkpointer(root, topo, keep_last=2),
                   MetricsLogger(None, enabled=False, tensorboard=False))


OVERRIDES = ["model.vocab_size=128", "model.n_embd=32", "model.n_head=2", "model.segment_len=8",
             "data.n_segments=2", "parallel.micro_batch_size=2", "train.max_steps=10", "optim.warmup_steps=2"]


def full_params(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=engine.zero_optimization_stage() == 3):
        return {n: p.detach().clone() for n, p in params.items()}


def tensors_of(obj, prefix=""):
    """Flatten nested dicts/lists of an optimizer state into {path: tensor or scalar}."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(tensors_of(v, f"{prefix}/{k}"))
        return out
    if isinstance(obj, (list, tuple)):
        out = {}
        for i, v in enumerate(obj):
            out.update(tensors_of(v, f"{prefix}/{i}"))
        return out
    return {prefix: obj}


def plain(x):
    """Objects without __eq__ (DeepSpeed's loss scaler) compare by their attributes."""
    return vars(x) if hasattr(x, "__dict__") else x


@pytest.fixture(scope="module")
def topo():
    return init_distributed()


@pytest.mark.parametrize("stage", [0, 3])
def test_every_tensor_restored(topo, tmp_path, stage):
    a = make_trainer(stage, topo, tmp_path, seed=1)
    for _ in range(3):
        a.train_step()
    a.save()
    b = make_trainer(stage, topo, tmp_path, seed=2)  # different init: load must overwrite everything
    b.restore(3)

    pa, pb = full_params(a.engine), full_params(b.engine)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name

    oa = tensors_of(a.engine.optimizer.state_dict())
    ob = tensors_of(b.engine.optimizer.state_dict())
    assert oa.keys() == ob.keys()
    for key in oa:
        if torch.is_tensor(oa[key]):
            assert torch.equal(oa[key], ob[key]), key
        elif key.endswith("/params") or "param_names" in key:
            continue
        else:
            assert plain(oa[key]) == plain(ob[key]), key
    steps = [v for k, v in ob.items() if k.endswith("/step")]
    assert steps and all(float(s) > 0 for s in steps)
    assert b.engine.lr_scheduler.state_dict() == a.engine.lr_scheduler.state_dict()
    assert b.state == a.state and b.train_batches.i == a.train_batches.i

    # and the next step is identical
    ra, rb = a.train_step(), b.train_step()
    assert ra.loss == rb.loss and ra.grad_norm == rb.grad_norm
