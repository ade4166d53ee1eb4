"""A checkpoint written before the trainer/checkpointer split (commit c8771de, made by
tests/data/checkpoint_v1/make.py) still resumes: the next losses equal those of the run that
wrote it, bitwise."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from inprocess import make_trainer
from memgpt_dist.parallel.dist import init_distributed

DATA = Path(__file__).resolve().parents[1] / "data" / "checkpoint_v1"


@pytest.fixture(scope="module")
def topo():
    return init_distributed()


def test_checkpoint_of_the_previous_version_resumes_exactly(topo, tmp_path):
    expected = json.loads((DATA / "expected.json").read_text())
    shutil.copytree(DATA / "step_00000003", tmp_path / "checkpoints" / "step_00000003")
    t = make_trainer(topo, tmp_path, seed=2, stage=3, extra=("train.carry_memory=true",))  # other initial weights
    t.restore(expected["step"])
    assert t.state.step == 3 and t.step.carry.state_dict() is not None  # the carried memory came back
    assert [t.train_step().loss for _ in range(2)] == expected["losses_after"]
