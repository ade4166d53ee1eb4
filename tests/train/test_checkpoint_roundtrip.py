"""Save a real DeepSpeed engine mid-training, load it into a fresh one: every key of every state
is restored exactly, and the next step is bitwise identical."""
from __future__ import annotations

import pickle

import pytest
import torch

from inprocess import assert_same_leaves, flatten, full_params, make_trainer, optimizer_state
from memgpt_dist.parallel.dist import init_distributed
from memgpt_dist.parallel.ds_compat import weights_only_loading
from memgpt_dist.train.checkpoint import CheckpointError
from memgpt_dist.train.state import rng_state

CARRY = ("train.carry_memory=true",)


@pytest.fixture(scope="module")
def topo():
    return init_distributed()


def ignored_optimizer_key(key: str) -> bool:
    return key.endswith("/params") or "param_names" in key  # ids of the parameters, not state


@pytest.mark.parametrize("stage", [0, 3])
def test_every_state_restored(topo, tmp_path, stage):
    a = make_trainer(topo, tmp_path, seed=1, stage=stage, extra=CARRY)
    for _ in range(3):
        a.train_step()
    rng_at_save = rng_state()
    a.save()
    b = make_trainer(topo, tmp_path, seed=2, stage=stage, extra=CARRY)  # other init: load must overwrite all
    torch.manual_seed(123)
    b.restore(3)

    assert_same_leaves(full_params(a.engine), full_params(b.engine))  # model
    oa, ob = optimizer_state(a.engine), optimizer_state(b.engine)
    assert_same_leaves(oa, ob, skip=ignored_optimizer_key)  # fp32 master, moments, steps, groups
    assert any("exp_avg_sq" in k for k in ob) and any("exp_avg" in k for k in ob)
    if stage == 3:
        assert any("fp32_flat_groups" in k for k in ob)  # ZeRO-3's fp32 master partitions
    steps = [v for k, v in ob.items() if k.endswith("/step")]
    assert steps and all(float(s) > 0 for s in steps)
    assert b.engine.lr_scheduler.state_dict() == a.engine.lr_scheduler.state_dict()
    assert (b.engine.global_steps, b.engine.global_samples, b.engine.skipped_steps) == \
        (a.engine.global_steps, a.engine.global_samples, a.engine.skipped_steps)
    assert b.state == a.state and b.state.step == 3
    assert b.train_batches.state_dict() == a.train_batches.state_dict()  # loader cursor
    assert_same_leaves(flatten(rng_at_save), flatten(rng_state()))  # python, numpy, torch RNG
    assert a.step.carry.state_dict() is not None
    assert_same_leaves(a.step.carry.state_dict(), b.step.carry.state_dict())  # stream memory, every layer

    ra, rb = a.train_step(), b.train_step()  # and the next step is identical
    assert ra.loss == rb.loss and ra.grad_norm == rb.grad_norm


class RunsCode:
    """A pickle that would run code on load."""

    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_deepspeed_files_are_loaded_weights_only(topo, tmp_path, monkeypatch):
    """DeepSpeed's own loader passes weights_only=False; ours refuses a file that would run code."""
    monkeypatch.chdir(tmp_path)
    a = make_trainer(topo, tmp_path, stage=3)
    a.train_step()
    a.save()
    model_file = next((tmp_path / "checkpoints" / "step_00000001").glob("*model_states.pt"))
    sd = torch.load(model_file, weights_only=True, map_location="cpu")
    sd["evil"] = RunsCode()
    torch.save(sd, model_file)
    with pytest.raises(pickle.UnpicklingError), weights_only_loading(a.engine):
        a.engine.load_checkpoint(str(tmp_path / "checkpoints"), tag="step_00000001")
    assert not (tmp_path / "PWNED").exists()


def test_resume_refuses_another_tokenizer_and_reports_changed_settings(topo, tmp_path, caplog):
    (tmp_path / "tokenizer.json").write_text('{"model": "A"}')
    a = make_trainer(topo, tmp_path)
    a.train_step()
    a.save()
    assert a.checkpointer.files.meta(1)["config_sha256"] == a.checkpointer.meta["config_sha256"]
    longer = make_trainer(topo, tmp_path, extra=("train.max_steps=20",))
    longer.restore(1)
    assert "train.max_steps: 10 -> 20" in caplog.text
    (tmp_path / "tokenizer.json").write_text('{"model": "B"}')  # the data was re-prepared with another vocabulary
    with pytest.raises(CheckpointError, match="trained with a tokenizer of sha256"):
        make_trainer(topo, tmp_path).restore(1)
