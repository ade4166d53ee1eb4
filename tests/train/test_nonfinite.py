"""A NaN/Inf loss or gradient: every rank skips the step with weights, optimizer state and LR
schedule untouched, the skip is counted, and too many in a row stop the run unsaved.

The faults are injected on the test side by wrapping the trainer's forward: the logits (or only
their gradient) of chosen steps are multiplied by NaN, what a numerically broken batch does.
"""
from __future__ import annotations

import math
import re
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import ROOT, bin_path, cli_env, free_port, read_metrics, tiny_args
from inprocess import assert_same_leaves, flatten, full_params, make_trainer, optimizer_state
from stress.kill_during_save import committed, damaged
from memgpt_dist.parallel.dist import init_distributed
from memgpt_dist.train.stopping import EXIT_DIVERGED, Diverged


@pytest.fixture(scope="module")
def topo():
    return init_distributed()


def inject_nan(trainer, steps: set[int], monkeypatch, gradient_only: bool = False) -> None:
    """NaN logits (or, with `gradient_only`, finite logits whose gradient is NaN) at 1-based `steps`."""
    forward = trainer.step.forward

    def poisoned(batch, read_memory=True, state=None, loss=False):
        out = forward(batch, read_memory, state, loss)  # on CPU the logits path: the logits are poisoned
        if not (trainer.engine.training and trainer.state.step + 1 in steps):
            return out
        if gradient_only:
            out.logits.register_hook(lambda g: g * float("nan"))
            return out
        return out._replace(logits=out.logits * float("nan"))

    monkeypatch.setattr(trainer.step, "forward", poisoned)


def snapshot(trainer) -> tuple:
    return (full_params(trainer.engine), optimizer_state(trainer.engine), trainer.engine.lr_scheduler.state_dict(),
            trainer.engine.get_lr())


def assert_unchanged(before: tuple, after: tuple) -> None:
    assert_same_leaves(before[0], after[0])
    # ZeRO's "overflow" flag records the skip itself; everything else must be bit-identical
    assert_same_leaves(before[1], after[1], skip=lambda k: k.endswith("/params") or k == "/overflow")
    assert before[2] == after[2] and before[3] == after[3]


@pytest.mark.parametrize("gradient_only", [False, True], ids=["nan-loss", "nan-gradient"])
def test_nonfinite_step_is_skipped_with_state_untouched(topo, tmp_path, monkeypatch, gradient_only):
    t = make_trainer(topo, tmp_path, stage=3)
    inject_nan(t, {4}, monkeypatch, gradient_only)
    t.fit(stop_after=3)  # past the warmup's first steps, whose learning rate is 0
    before = snapshot(t)
    t.fit(stop_after=4)
    assert_unchanged(before, snapshot(t))
    assert (t.state.step, t.state.skipped_steps, t.state.nonfinite_streak, t.engine.skipped_steps) == (4, 1, 1, 1)
    t.fit(stop_after=5)  # the next finite step is applied and ends the streak
    assert not torch.equal(next(iter(before[0].values())), next(iter(full_params(t.engine).values())))
    assert (t.state.skipped_steps, t.state.nonfinite_streak) == (1, 0)


def test_too_many_consecutive_skips_stop_the_run_unsaved(topo, tmp_path, monkeypatch):
    t = make_trainer(topo, tmp_path, stage=3, extra=("train.max_nan_skips=2", "checkpoint.every=2"))
    inject_nan(t, set(range(3, 11)), monkeypatch)
    with pytest.raises(Diverged, match=r"3 consecutive steps .* train.max_nan_skips=2") as err:
        t.fit()
    assert err.value.exit_code == EXIT_DIVERGED
    assert t.state.step == 5  # steps 3, 4 skipped, the third (5) stops
    assert t.checkpointer.committed_steps() == [2, 4]  # step 4's save holds step 2's weights: nothing after
    assert t.checkpointer.verify(4) is None


def test_zero0_stops_before_applying_a_nonfinite_update(topo, tmp_path, monkeypatch):
    t = make_trainer(topo, tmp_path, stage=0)
    inject_nan(t, {4}, monkeypatch)
    t.fit(stop_after=3)
    before = full_params(t.engine)
    with pytest.raises(Diverged, match="zero_stage=0 cannot skip"):
        t.fit(stop_after=4)
    assert_same_leaves(before, full_params(t.engine))


# ---------------------------------------------------------------- two ranks, real launcher

def train_with_nan(tiny_data, run_dir, rank: int, steps: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**cli_env(), "NAN_RANK": str(rank), "NAN_STEPS": steps}
    cmd = [bin_path("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "tests/train/nan_inject_train.py", *tiny_args(tiny_data, run_dir, "--train.eval_every=0", *extra)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def rank_files(step_dir: Path) -> dict[str, dict]:
    """Every rank's DeepSpeed files of a checkpoint, loaded weights-only, minus bookkeeping."""
    from memgpt_dist.parallel.ds_compat import deepspeed_safe_globals

    out = {}
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        for f in sorted(step_dir.glob("*_states.pt")):
            sd = torch.load(f, weights_only=True, map_location="cpu")
            out.update({f.name + k: v for k, v in flatten(sd).items()
                        if not re.search(r"global_steps|global_samples|skipped_steps|lr_scheduler|client_state|"
                                         r"/overflow|ds_config|iteration|/params/|/train_state/", k)})
    return out


def test_nan_on_one_rank_is_skipped_by_both_and_too_many_stop_the_run(tiny_data, tmp_path):
    run = tmp_path / "skip"
    proc = train_with_nan(tiny_data, run, 1, "4", "--checkpoint.every=1", "--checkpoint.keep_last=10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_metrics(run)
    assert [m[s]["train/skipped_steps"] for s in range(1, 7)] == [0, 0, 0, 1, 1, 1]
    assert math.isnan(m[4]["train/loss"]) and m[4]["train/lr"] == m[3]["train/lr"]  # schedule held back
    assert "step 4 skipped on every rank" in proc.stdout
    before, after = rank_files(run / "checkpoints" / "step_00000003"), rank_files(run / "checkpoints" / "step_00000004")
    assert {k.split("/")[0] for k in before} == {f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt"
                                                 for r in (0, 1) for kind in ("model", "optim")}
    assert any("fp32_flat_groups" in k for k in before) and any("exp_avg_sq" in k for k in before)
    assert_same_leaves(before, after)  # weights, fp32 master partitions, Adam moments and steps: untouched
    applied = rank_files(run / "checkpoints" / "step_00000005")
    assert any(torch.is_tensor(v) and not torch.equal(v, applied[k]) for k, v in after.items())  # step 5 was

    stop = tmp_path / "stop"
    proc = train_with_nan(tiny_data, stop, 0, "4,5,6", "--checkpoint.every=2", "--train.max_nan_skips=1")
    assert proc.returncode == EXIT_DIVERGED, proc.stderr[-3000:]
    assert "2 consecutive steps (to step 5) had a non-finite loss" in proc.stderr
    assert committed(stop / "checkpoints") == [2, 4] and not damaged(stop / "checkpoints", 4)


def test_pipeline_nonfinite_step_is_skipped_or_stops_before_the_update(tiny_data, tmp_path):
    """Under pp2 the NaN enters through the last stage's loss and flows back to both stages: ZeRO-1
    skips the step on both (every layer and optimizer file of steps 3 and 4 equal), ZeRO-0 (our
    whole-model norm before its update) stops the run with exit 3 before anything is applied."""
    pp = ["--parallel.pp=2", "--parallel.grad_accum=2"]
    run = tmp_path / "skip"
    proc = train_with_nan(tiny_data, run, 1, "4", *pp, "--parallel.zero_stage=1", "--checkpoint.every=1",
                          "--checkpoint.keep_last=10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_metrics(run)
    assert [m[s]["train/skipped_steps"] for s in range(1, 7)] == [0, 0, 0, 1, 1, 1]
    before, after = rank_files(run / "checkpoints" / "step_00000003"), rank_files(run / "checkpoints" / "step_00000004")
    assert {k.split("/")[0] for k in before} >= {"layer_01-model_00-model_states.pt",
                                                 "zero_pp_rank_0_mp_rank_01_optim_states.pt"}  # both stages
    assert_same_leaves(before, after)
    applied = rank_files(run / "checkpoints" / "step_00000005")
    assert any(torch.is_tensor(v) and not torch.equal(v, applied[k]) for k, v in after.items())

    stop = tmp_path / "stop"
    proc = train_with_nan(tiny_data, stop, 1, "4", *pp, "--parallel.zero_stage=0", "--checkpoint.every=3")
    assert proc.returncode == EXIT_DIVERGED, proc.stderr[-3000:]
    assert "non-finite gradient at step 4; parallel.zero_stage=0 cannot skip a step" in proc.stderr
    assert committed(stop / "checkpoints") == [3] and not damaged(stop / "checkpoints", 3)

