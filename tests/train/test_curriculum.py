"""K curriculum (data.n_segments_schedule) through the real training CLI: samples grow on
schedule and a run stopped before the switch resumes with the same losses."""
from __future__ import annotations

from helpers import read_metrics, tiny_args, train

SCHEDULE = "--data.n_segments_schedule=0:1,2:3"


def test_curriculum_switches_k_and_resumes_exactly(tiny_data, tmp_path):
    full, resumed, fixed = tmp_path / "full", tmp_path / "resumed", tmp_path / "fixed"
    train(tiny_args(tiny_data, full, SCHEDULE, "--train.max_steps=4", "--checkpoint.every=2"))
    train(tiny_args(tiny_data, resumed, SCHEDULE, "--train.max_steps=4", "--checkpoint.every=2",
                    "--stop-after-steps", "2"))
    train(tiny_args(tiny_data, resumed, SCHEDULE, "--train.max_steps=4", "--checkpoint.every=2", "--resume", "auto"))
    train(tiny_args(tiny_data, fixed, "--train.max_steps=4", "--checkpoint.every=0"))
    a, b, c = read_metrics(full), read_metrics(resumed), read_metrics(fixed)
    for step in range(1, 5):
        assert b[step]["train/loss"] == a[step]["train/loss"], step
    # K=1 samples hold a third of the tokens of K=3 ones; from step 3 on both use K=3
    assert a[1]["tokens"] < 0.5 * c[1]["tokens"]
    assert a[3]["tokens"] - a[2]["tokens"] > 2 * (a[2]["tokens"] - a[1]["tokens"])
