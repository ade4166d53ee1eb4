"""`launch/train.py` with a test-side fault injector: NaN logits on one rank at chosen steps.

    NAN_RANK=1 NAN_STEPS=4,5 deepspeed --num_gpus 2 tests/train/nan_inject_train.py <train args>

The library has no test hooks; this wrapper patches the dense step's forward before running the
real entry point, the way a numerically broken batch would reach only one rank. Under pipeline
parallelism the logits exist on the last stage only: there the pipeline's loss function is
poisoned instead (NAN_RANK must then be a last-stage rank).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import memgpt_dist.train.run as run  # noqa: E402
from launch.train import main  # noqa: E402
from memgpt_dist.cli import exit_process  # noqa: E402
from memgpt_dist.train.steps import DenseStep  # noqa: E402
from memgpt_dist.train.trainer import Trainer  # noqa: E402

RANK = int(os.environ["NAN_RANK"])
STEPS = {int(s) for s in os.environ["NAN_STEPS"].split(",")}
POISON = {"on": False}  # set around a poisoned step, read by the forward (dense) or the loss (pipeline)
_train_step = Trainer.train_step
_forward = DenseStep.forward
_loss = run.scaled_token_loss


def _poisoned_train_step(self):
    POISON["on"] = self.topo.rank == RANK and self.state.step + 1 in STEPS
    try:
        return _train_step(self)
    finally:
        POISON["on"] = False


def _poisoned_forward(self, batch, read_memory=True, state=None, loss=False):
    out = _forward(self, batch, read_memory, state, loss)  # on CPU the step keeps the logits, poisoned here
    if self.engine.training and POISON["on"]:
        return out._replace(logits=out.logits * float("nan"))
    return out


def _poisoned_loss(logits, target):
    return _loss(logits * float("nan") if POISON["on"] else logits, target)


Trainer.train_step = _poisoned_train_step
DenseStep.forward = _poisoned_forward
run.scaled_token_loss = _poisoned_loss

if __name__ == "__main__":
    exit_process(main())
