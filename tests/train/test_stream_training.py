"""Stream training (train.carry_memory): the memory state of each stream carries into its next
sample across steps, is saved per rank in checkpoints and restored exactly on resume."""
from __future__ import annotations

import torch

from helpers import read_metrics, tiny_args, train

CARRY = "--train.carry_memory=true"


def test_carried_state_changes_training_and_resumes_exactly(tiny_data, tmp_path):
    full, resumed, episodic = tmp_path / "full", tmp_path / "resumed", tmp_path / "episodic"
    train(tiny_args(tiny_data, full, CARRY), nproc=2)
    train(tiny_args(tiny_data, resumed, CARRY, "--stop-after-steps", "3"), nproc=2)
    train(tiny_args(tiny_data, resumed, CARRY, "--resume", "auto"), nproc=2)
    train(tiny_args(tiny_data, episodic, "--train.max_steps=3", "--checkpoint.every=0"), nproc=2)
    a, b, e = read_metrics(full), read_metrics(resumed), read_metrics(episodic)
    for step in range(1, 7):  # the resumed run continues with the same memory: identical losses
        assert b[step]["train/loss"] == a[step]["train/loss"], step
    assert a[1]["train/loss"] == e[1]["train/loss"]  # nothing carried yet at step 1
    assert a[2]["train/loss"] != e[2]["train/loss"]  # from step 2 on, the carried memory is read


def test_each_rank_saves_its_streams_memory(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(tiny_args(tiny_data, run, CARRY, "--train.max_steps=3", "--checkpoint.every=3"), nproc=2)
    states = [torch.load(run / "checkpoints" / "step_00000003" / "rank_state" / f"rank_{r:05d}.pt",
                         weights_only=True) for r in range(2)]
    A0, A1 = (s["memory_state"]["layer0.A"] for s in states)
    # tiny.yaml + tiny_args: 4 streams per rank, 4 heads of 16 dims -> A is (4, 4, 6*16, 16) in fp32
    assert A0.shape == (4, 4, 96, 16) and A0.dtype == torch.float32
    assert not torch.equal(A0, A1)  # different streams, different memories
    assert set(states[0]["loader"]["streams"]) == {"0", "1", "2", "3"}
    assert set(states[1]["loader"]["streams"]) == {"4", "5", "6", "7"}


def test_memory_in_one_layer_trains_saves_and_resumes_exactly(tiny_data, tmp_path):
    """memory.layers=1 through the CLI (one process): only block 1 has memory weights and a carried
    memory, the checkpoint holds only its state, and a resumed run continues bitwise."""
    from memgpt_dist.generate import find_checkpoint, load_model

    layers = "--memory.layers=1"
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(tiny_args(tiny_data, full, CARRY, layers))
    train(tiny_args(tiny_data, resumed, CARRY, layers, "--stop-after-steps", "3"))
    train(tiny_args(tiny_data, resumed, CARRY, layers, "--resume", "auto"))
    a, b = read_metrics(full), read_metrics(resumed)
    for step in range(1, 7):
        assert b[step]["train/loss"] == a[step]["train/loss"], step
    state = torch.load(resumed / "checkpoints" / "step_00000003" / "rank_state" / "rank_00000.pt", weights_only=True)
    assert sorted(state["memory_state"]) == ["layer1.A", "layer1.z"]
    model, cfg = load_model(find_checkpoint(full / "checkpoints", None))
    assert cfg.memory.layers == "1" and model.memory_layers == (1,)
    assert {n.split(".")[1] for n, _ in model.named_parameters() if ".mem_" in n} == {"1"}
