"""`--resume auto` on another data-parallel degree (and ZeRO stage) continues the run exactly.

Each pair trains 6 steps uninterrupted in the source layout (checkpoints at 3 and 6; stream
training on, so every stream's memory state is carried and must move with it), then resumes a
copy of its step-3 checkpoint in the target layout through the real `run_training`, conversion
to a universal checkpoint included. The global batch keeps its 4 streams (dp x micro_batch_size).
Compared with the uninterrupted run (tests/dist/relayout.py): the losses of steps 4-6 within
1e-5 relative (measured: ~1e-7, float reduction order), and each step's samples by global stream
id and a hash of their tokens. tp, pp and ZeRO 1 -> 3: test_resume_relayout_tp_pp.py.
"""
from __future__ import annotations

import json

import pytest

from relayout import SAVE_AT, Runs, assert_log_says, assert_losses_continue, assert_samples_continue
from memgpt_dist.train.checkpoint import FILE_DIGEST, file_digest

CARRY = "--train.carry_memory=true"
SOURCES = {"dp2_zero3": (2, ["--parallel.micro_batch_size=2", CARRY]),
           "dp1_zero3": (1, ["--parallel.micro_batch_size=4", CARRY])}
PAIRS = {"dp2_to_dp1": ("dp2_zero3", 1, ["--parallel.micro_batch_size=4", CARRY], "dp2 ZeRO-3.*loaded into dp1 ZeRO-3"),
         "dp1_to_dp2": ("dp1_zero3", 2, ["--parallel.micro_batch_size=2", CARRY], "dp1 ZeRO-3.*loaded into dp2 ZeRO-3"),
         "zero3_to_zero1": ("dp2_zero3", 2, ["--parallel.micro_batch_size=2", "--parallel.zero_stage=1", CARRY],
                            "dp2 ZeRO-3.*loaded into dp2 ZeRO-1")}


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> Runs:
    return Runs(tiny_data, tmp_path_factory, SOURCES, PAIRS)


@pytest.mark.parametrize("pair", PAIRS)
def test_losses_after_the_change_equal_the_uninterrupted_run(pair, runs):
    assert_losses_continue(*runs.resumed(pair))


@pytest.mark.parametrize("pair", PAIRS)
def test_samples_across_the_change_equal_the_uninterrupted_run(pair, runs):
    assert_samples_continue(*runs.resumed(pair))


@pytest.mark.parametrize("pair", PAIRS)
def test_the_log_says_what_the_resume_did(pair, runs):
    assert_log_says(runs.resumed(pair)[1], PAIRS[pair][3])


def test_the_original_checkpoint_is_untouched(runs):
    step_dir = runs.resumed("dp2_to_dp1")[1] / "checkpoints" / f"step_{SAVE_AT:08d}"
    marker = json.loads((step_dir / "COMMITTED.json").read_text())
    for name, expected in marker["files"].items():
        assert file_digest(step_dir / name) == expected[FILE_DIGEST], name
    assert (step_dir / "universal" / "CONVERTED.json").is_file()  # the conversion sits beside them


def test_a_change_of_streams_is_refused_with_the_setting_to_change(runs, tmp_path):
    proc = runs.refused("dp2_zero3", 1, ["--parallel.micro_batch_size=2", CARRY], tmp_path / "run")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "set parallel.micro_batch_size=4" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints" / f"step_{SAVE_AT:08d}" / "universal").exists()  # before converting
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # and before any step
