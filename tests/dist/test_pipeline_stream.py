"""Stream training, the K curriculum, memory statistics and the validation loss by segment under
pipeline parallelism (pp2, ZeRO-1, gloo) against one process with the same data and global batch.

With train.carry_memory each stage carries the memory of its own layers from one micro-batch to
the next; the losses must follow the single-process stream run (and differ from a run without
carrying from step 2 on, else nothing was carried). The checkpoint stores each stage's layers
under their global indices, equal to the single-process run's state of those layers; a pp2 run
stopped at step 3 and resumed repeats the uninterrupted losses, and so does the pp2 checkpoint
resumed on one process (the stages' layers reassembled into the whole model's memory). The K
curriculum switches the sample length mid-run (the pipeline resets its activation buffers) and
still matches one process, validation included; so does tp2 x pp2, whose four ranks each save
the memory of their stage's layer and their TP rank's heads.
"""
from __future__ import annotations

import pytest
import torch

from helpers import copy_run, read_metrics, tiny_args, train

STEPS, SAVE_AT = 6, 3
COMMON = [f"--train.max_steps={STEPS}", "--parallel.zero_stage=1", "--parallel.grad_accum=2",
          "--parallel.micro_batch_size=4", "--train.carry_memory=true"]
CURRICULUM = ["--data.n_segments_schedule=0:1,2:2,4:3", "--train.eval_every=2"]


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("pipeline_stream")
    train(tiny_args(tiny_data, base / "one", *COMMON), nproc=1)
    train(tiny_args(tiny_data, base / "pp2", *COMMON, "--parallel.pp=2"), nproc=2)
    # stopped after its step-3 checkpoint and resumed, in the same layout and on one process
    train(tiny_args(tiny_data, base / "resumed", *COMMON, "--parallel.pp=2", "--stop-after-steps", str(SAVE_AT)),
          nproc=2)
    copy_run(base / "resumed", base / "on_one")
    train(tiny_args(tiny_data, base / "resumed", *COMMON, "--parallel.pp=2", "--resume", "auto"), nproc=2)
    train(tiny_args(tiny_data, base / "on_one", *COMMON, "--resume", "auto"), nproc=1)
    no_ckpt = ["--checkpoint.every=0", "--checkpoint.save_at_end=false"]
    train(tiny_args(tiny_data, base / "episodic", *COMMON[:-1], *no_ckpt, "--parallel.pp=2"), nproc=2)
    train(tiny_args(tiny_data, base / "k_one", *COMMON, *CURRICULUM), nproc=1)
    train(tiny_args(tiny_data, base / "k_pp2", *COMMON, *CURRICULUM, *no_ckpt, "--parallel.pp=2"), nproc=2)
    train(tiny_args(tiny_data, base / "k_tp2pp2", *COMMON, *CURRICULUM, "--parallel.pp=2", "--parallel.tp=2"), nproc=4)
    return base


def metrics(runs, name: str) -> dict[int, dict]:
    return read_metrics(runs / name)


def test_stream_losses_match_single_process(runs):
    one, pp2, episodic = metrics(runs, "one"), metrics(runs, "pp2"), metrics(runs, "episodic")
    assert pp2[1]["train/loss"] == pytest.approx(one[1]["train/loss"], rel=1e-5)
    for step in range(1, STEPS + 1):
        assert pp2[step]["train/loss"] == pytest.approx(one[step]["train/loss"], rel=1e-4), step
        assert pp2[step]["train/grad_norm"] == pytest.approx(one[step]["train/grad_norm"], rel=1e-4), step
    # the carried memory is read: from step 1 on (micro-batch 2 reads what micro-batch 1 wrote),
    # the losses leave the run without carrying by far more than they differ from one process
    for step in range(1, STEPS + 1):
        assert abs(pp2[step]["train/loss"] - episodic[step]["train/loss"]) > 1e-5, step
        assert pp2[step]["memory/mem_read_norm/layer1"] != episodic[step]["memory/mem_read_norm/layer1"], step


def rank_state(run, rank: int, step: int = SAVE_AT) -> dict:
    return torch.load(run / "checkpoints" / f"step_{step:08d}" / "rank_state" / f"rank_{rank:05d}.pt",
                      weights_only=True)


def test_each_stage_saves_its_layers_memory(runs):
    """Stage 0 holds block 0, stage 1 block 1 (tiny: 2 layers); each saves that layer's state of
    its 4 streams, as the single-process run holds it for the same layer."""
    whole = rank_state(runs / "one", 0)["memory_state"]
    for rank, layer in ((0, 0), (1, 1)):
        state = rank_state(runs / "pp2", rank)
        assert state["coord"]["pp"] == rank and state["layers"] == [layer]
        assert sorted(state["memory_state"]) == [f"layer{layer}.A", f"layer{layer}.z"]
        assert state["memory_state"][f"layer{layer}.A"].shape == (4, 4, 96, 16)  # (streams, heads, dk, hd)
        for key, value in state["memory_state"].items():
            torch.testing.assert_close(value, whole[key], rtol=1e-4, atol=1e-5, msg=key)
        assert state["stream_ids"] == rank_state(runs / "one", 0)["stream_ids"]


def test_resume_continues_with_the_carried_memory(runs):
    pp2, resumed = metrics(runs, "pp2"), metrics(runs, "resumed")
    for step in range(SAVE_AT + 1, STEPS + 1):
        assert resumed[step]["train/loss"] == pp2[step]["train/loss"], step


def test_pipeline_checkpoint_resumes_on_one_process_with_its_memory(runs):
    """pp2 -> pp1: each layer's memory comes from the stage that held it."""
    one, on_one = metrics(runs, "one"), metrics(runs, "on_one")
    for step in range(SAVE_AT + 1, STEPS + 1):
        assert on_one[step]["train/loss"] == pytest.approx(one[step]["train/loss"], rel=1e-4), step


def test_memory_statistics_of_every_stage_are_logged(runs):
    one, pp2 = metrics(runs, "one"), metrics(runs, "pp2")
    keys = {k for k in one[1] if k.startswith("memory/")}
    assert keys == {f"memory/{s}/layer{i}" for s in ("mem_gate", "mem_read_norm") for i in (0, 1)}
    for step in (1, STEPS):
        for key in keys:
            assert pp2[step][key] == pytest.approx(one[step][key], rel=1e-4), (step, key)


def test_validation_loss_by_segment_matches_single_process(runs):
    one, pp2 = metrics(runs, "one"), metrics(runs, "pp2")
    for key in ("val/loss", "val/loss_segment_1", "val/loss_segment_2", "val/loss_segment_3"):
        assert pp2[SAVE_AT][key] == pytest.approx(one[SAVE_AT][key], rel=1e-5), key


def test_k_curriculum_matches_single_process(runs):
    """K = 1, 2, 3 at steps 1-2, 3-4, 5-6: the sample length changes twice, and the validation
    at steps 2 and 4 runs at the full K = 3 between shorter training steps."""
    one, pp2 = metrics(runs, "k_one"), metrics(runs, "k_pp2")
    for step in range(1, STEPS + 1):
        assert pp2[step]["train/loss"] == pytest.approx(one[step]["train/loss"], rel=1e-4), step
    for step in (2, 4, 6):
        assert pp2[step]["val/loss_segment_3"] == pytest.approx(one[step]["val/loss_segment_3"], rel=1e-5), step
    tokens = [pp2[s]["tokens"] - pp2[s - 1]["tokens"] for s in (2, 3, 5)]
    assert tokens[0] < tokens[1] < tokens[2]  # the samples did grow


def test_tp_x_pp_stream_training_splits_the_memory_by_layer_and_head(runs):
    one, tp_pp = metrics(runs, "k_one"), metrics(runs, "k_tp2pp2")
    for step in range(1, STEPS + 1):
        assert tp_pp[step]["train/loss"] == pytest.approx(one[step]["train/loss"], rel=1e-4), step
    assert tp_pp[STEPS]["val/loss"] == pytest.approx(one[STEPS]["val/loss"], rel=1e-5)
    whole = rank_state(runs / "k_one", 0, STEPS)["memory_state"]
    for rank in range(4):  # ranks: tp fastest, then pp (one replica)
        state = rank_state(runs / "k_tp2pp2", rank, STEPS)
        layer, (h0, h1) = rank // 2, state["heads"]
        assert (state["coord"]["pp"], state["coord"]["tp"], state["layers"]) == (layer, rank % 2, [layer])
        assert (h0, h1) == (2 * (rank % 2), 2 * (rank % 2) + 2)
        for key in (f"layer{layer}.A", f"layer{layer}.z"):
            torch.testing.assert_close(state["memory_state"][key], whole[key][:, h0:h1], rtol=1e-4, atol=1e-5,
                                       msg=key)

