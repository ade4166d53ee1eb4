"""`launch/train.py` with a test-side fault injector: NaN logits on one rank at chosen steps.

    NAN_RANK=1 NAN_STEPS=4,5 deepspeed --num_gpus 2 tests/train/nan_inject_train.py <train args>

The library has no test hooks; this wrapper patches the trainer's forward before running the
real entry point, the way a numerically broken batch would reach only one rank.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from launch.train import exit_process, main  # noqa: E402
from memgpt_dist.train.trainer import Trainer  # noqa: E402

RANK = int(os.environ["NAN_RANK"])
STEPS = {int(s) for s in os.environ["NAN_STEPS"].split(",")}
_forward = Trainer._forward


def _poisoned_forward(self, batch, read_memory=True, state=None):
    out = _forward(self, batch, read_memory, state)
    if self.engine.training and self.topo.rank == RANK and self.state.step + 1 in STEPS:
        return out._replace(logits=out.logits * float("nan"))
    return out


Trainer._forward = _poisoned_forward

if __name__ == "__main__":
    exit_process(main())
