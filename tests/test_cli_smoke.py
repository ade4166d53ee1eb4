"""End to end through the real CLIs at tiny size: prepare, train with the deepspeed launcher
(2 CPU ranks, ZeRO-3), stop, resume with --resume auto, generate, and inspect TensorBoard."""
from __future__ import annotations

import json

import pytest

from helpers import bin_path, read_metrics, run_cmd
from helpers import tiny_args, train


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """One uninterrupted 6-step run on 2 ranks, shared by the tests that only read it."""
    full = tmp_path_factory.mktemp("smoke") / "full"
    train(tiny_args(tiny_data, full), nproc=2)
    return tiny_data, full


def test_uninterrupted_run_writes_checkpoints_and_metrics(runs):
    _, full = runs
    ckpts = sorted(p.name for p in (full / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step_00000003", "step_00000006"]
    assert (full / "checkpoints" / "zero_to_fp32.py").is_file()  # DeepSpeed's consolidation script for users
    assert all((full / "checkpoints" / c / "COMMITTED.json").is_file() for c in ckpts)
    m = read_metrics(full)
    assert sorted(k for k in m if "train/loss" in m[k]) == [1, 2, 3, 4, 5, 6]
    assert "val/loss" in m[3] and "val/loss_segment_3" in m[6]


def test_resume_continues_with_identical_losses(runs, tmp_path):
    tiny_data, full = runs
    resumed = tmp_path / "resumed"
    train(tiny_args(tiny_data, resumed, "--stop-after-steps", "3"), nproc=2)
    first = read_metrics(resumed)
    assert max(first) == 3
    proc = train(tiny_args(tiny_data, resumed, "--resume", "auto"), nproc=2)
    assert "resumed from" in proc.stdout
    a, b = read_metrics(full), read_metrics(resumed)
    for step in range(1, 7):
        assert b[step]["train/loss"] == a[step]["train/loss"], step
        assert b[step]["train/grad_norm"] == a[step]["train/grad_norm"], step


def test_restart_without_resume_refuses_to_overwrite(runs):
    data, full = runs
    proc = run_cmd([bin_path("python"), "launch/train.py", *tiny_args(data, full)], check=False)
    assert proc.returncode == 2
    assert "--resume auto" in proc.stderr


def test_generate_prints_a_continuation(runs):
    _, full = runs
    proc = run_cmd([bin_path("memgpt-generate"), "--checkpoint", str(full), "--prompt", "def w1 (",
                    "--max-new-tokens", "20", "--seed", "1"])
    assert proc.stdout.startswith("def w1 (")
    assert len(proc.stdout.strip()) > len("def w1 (")


def test_tensorboard_events_hold_the_scalars(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, full = runs
    acc = EventAccumulator(str(full / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/data_wait_s",
                "val/loss", "val/ppl", "memory/mem_gate/layer0", "memory/mem_read_norm/layer1",
                "by_tokens/train/loss"):
        assert tag in tags, tag
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


def test_dry_run_prints_config_and_deepspeed_dict(tiny_data, tmp_path):
    proc = run_cmd([bin_path("python"), "launch/train.py", *tiny_args(tiny_data, tmp_path / "r"), "--dry-run",
                    "--world-size", "4"])
    ds = json.loads(proc.stdout.split("# DeepSpeed config\n", 1)[1])
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["train_batch_size"] == 4 * 4


def test_bad_override_is_a_clear_error(tiny_data, tmp_path):
    proc = run_cmd([bin_path("python"), "launch/train.py", *tiny_args(tiny_data, tmp_path / "r"),
                    "--model.n_layers=3"], check=False)
    assert proc.returncode == 2 and "model.n_layers" in proc.stderr


def test_eval_reports_loss_by_segment_with_and_without_the_memory_read(runs, tmp_path):
    _, full = runs
    out = tmp_path / "eval.json"
    proc = run_cmd([bin_path("memgpt-eval"), "--checkpoint", str(full), "--segments", "4", "--corpus-docs", "4",
                    "--json", str(out)])
    assert "seg   4" in proc.stdout and "off (eval)" in proc.stdout
    (record,) = json.loads(out.read_text()).values()
    r = record["corpus"]
    assert len(r["loss_by_segment"]) == len(r["loss_by_segment_read_off"]) == 4
    assert r["loss_by_segment"][0] == r["loss_by_segment_read_off"][0]  # segment 1 reads an empty memory
    assert r["loss_by_segment"][3] != r["loss_by_segment_read_off"][3]


def test_eval_measures_the_streaming_cost_next_to_full_attention(runs, tmp_path):
    _, full = runs
    out = tmp_path / "eval.json"
    proc = run_cmd([bin_path("memgpt-eval"), "--checkpoint", str(full), "--segments", "2", "--corpus-docs", "2",
                    "--streaming", "64,256", "--full-max", "64", "--json", str(out)])
    assert "streaming cost" in proc.stdout and "full causal attention" in proc.stdout
    (record,) = json.loads(out.read_text()).values()
    rows = {(r["kind"], r["length"]): r for r in record["streaming"]["rows"]}
    assert set(rows) == {("memory", 64), ("full", 64), ("memory", 256)}  # full attention only up to --full-max
    assert all(r["tokens_per_s"] > 0 and r["peak_mb"] > 0 for r in rows.values())
