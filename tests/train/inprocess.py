"""In-process trainers on a real DeepSpeed engine (world of one) over a synthetic batch source,
and helpers that flatten engine state for exact comparisons."""
from __future__ import annotations

from pathlib import Path

import torch

from memgpt_dist.config import load_config
from memgpt_dist.train.checkpoint import CheckpointDir
from memgpt_dist.train.metrics import MetricsLogger
from memgpt_dist.train.run import build_step, build_trainer
from memgpt_dist.train.trainer import Trainer

OVERRIDES = ["model.vocab_size=128", "model.n_embd=32", "model.n_head=2", "model.segment_len=8",
             "data.n_segments=2", "parallel.micro_batch_size=2", "train.max_steps=10", "optim.warmup_steps=2",
             "train.eval_every=0", "checkpoint.every=0", "checkpoint.save_at_end=false"]


class Batches:
    """A deterministic stateful batch source (the real loader is tested in tests/data)."""

    def __init__(self, cfg, i: int = 0):
        self.cfg, self.i = cfg, i
        self.stream_ids = list(range(cfg.parallel.micro_batch_size))  # a world of one holds every stream

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

    def load_state_dicts(self, states):  # a resume on another layout: one replica here
        self.load_state_dict(states[0])


def make_trainer(topo, root: Path, seed: int = 1, stage: int = 3, extra: tuple[str, ...] = (),
                 load_universal: bool = False, batches=Batches) -> Trainer:
    """A trainer whose checkpoints go to `root/checkpoints`; `seed` sets the initial weights;
    `load_universal`: its engine restores universal checkpoints; `batches`: the batch source's class."""
    cfg = load_config(None, OVERRIDES + [f"run_dir={root}", f"train.seed={seed}", f"parallel.zero_stage={stage}",
                                         *extra])
    step = build_step(cfg, topo, load_universal=load_universal)
    # the run directory's tokenizer.json stands for the corpus's (a test rewrites it to change the data)
    return build_trainer(cfg, topo, step, batches(cfg), None,
                         CheckpointDir(Path(root) / "checkpoints", topo, keep_last=2),
                         MetricsLogger(None, enabled=False, tensorboard=False), tokenizer_file=Path(root) / "tokenizer.json")


def full_params(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=engine.zero_optimization_stage() == 3):
        return {n: p.detach().clone() for n, p in params.items()}


def flatten(obj, prefix: str = "") -> dict:
    """Nested dicts/lists/tuples as {path: leaf}; tensors are cloned."""
    if isinstance(obj, dict):
        return {k2: v2 for k, v in obj.items() for k2, v2 in flatten(v, f"{prefix}/{k}").items()}
    if isinstance(obj, (list, tuple)):
        return {k2: v2 for i, v in enumerate(obj) for k2, v2 in flatten(v, f"{prefix}/{i}").items()}
    return {prefix: obj.detach().clone() if torch.is_tensor(obj) else obj}


def plain(x):
    """Objects without __eq__ (DeepSpeed's loss scaler) compare by their attributes."""
    return vars(x) if hasattr(x, "__dict__") else x


def optimizer_state(engine) -> dict:
    """Every entry of the optimizer's state dict (ZeRO-3: fp32 master partitions, Adam moments, steps)."""
    return flatten(engine.optimizer.state_dict())


def assert_same_leaves(a: dict, b: dict, skip=lambda key: False) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if skip(key):
            continue
        if torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), key
        else:
            assert plain(a[key]) == plain(b[key]), key
