"""The loop's observers: a fixed, documented order, every hook on every step, and a callback's
flags agreed over the ranks before any callback sees them."""
from __future__ import annotations

import pytest

from inprocess import make_trainer
from memgpt_dist.parallel.dist import init_distributed
from memgpt_dist.train.callbacks import DEFAULT_ORDER, Callback


@pytest.fixture(scope="module")
def topo():
    return init_distributed()


class Recorder(Callback):
    def __init__(self, log):
        self.log = log

    def on_fit_start(self, trainer):
        self.log.append("start")

    def local_flags(self, trainer, result):
        return [trainer.state.step == 2]  # raised after step 2 only

    def on_step_end(self, trainer, end, flags):
        self.log.append((trainer.state.step, flags))

    def on_fit_end(self, trainer):
        self.log.append("end")

    def close(self, trainer):
        self.log.append("close")


def test_callbacks_run_in_the_documented_order_with_their_agreed_flags(topo, tmp_path):
    t = make_trainer(topo, tmp_path)
    assert tuple(type(cb).__name__ for cb in t.callbacks) == DEFAULT_ORDER
    log = []
    t.callbacks.append(Recorder(log))
    t.fit(stop_after=3)
    assert log == ["start", (1, [False]), (2, [True]), (3, [False]), "end", "close"]
