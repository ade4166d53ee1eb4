"""`--resume auto` from a tensor- or pipeline-parallel checkpoint into one process, from one
process into a pipeline, from ZeRO-1 into ZeRO-3, and from and into tensor parallelism inside
pipeline stages (tp2 x pp2), continues the run exactly (as tests/dist/test_resume_relayout.py:
losses of steps 4-6 within 1e-5 relative of the uninterrupted run, every step's samples by
stream id).

tp2 -> tp1 merges the AutoTP shards and the head-sliced memory parameters (DeepSpeed's
conversion, by the metadata `tensor_parallel.shard_head_parameters` records) and each stream's
memory state from the two TP ranks' heads; pp2 -> pp1 and pp1 -> pp2 map the PipelineModule's
parameter names to the GPT's and back. tp2 x pp2 -> pp2 and -> one process merge every stage's
TP shards (by the union of the stages' merge rules, `universal.stage_with_every_stage_info`);
pp2 -> tp2 x pp2 splits them again by the TP layers' own metadata.
"""
from __future__ import annotations

import pytest

from relayout import SAVE_AT, Runs, assert_log_says, assert_losses_continue, assert_samples_continue

CARRY = "--train.carry_memory=true"
MB4 = "--parallel.micro_batch_size=4"
PP2 = [MB4, "--parallel.pp=2", "--parallel.zero_stage=1"]  # carry_memory: not under pp
TP2_PP2 = [*PP2, "--parallel.tp=2"]
SOURCES = {"tp2_zero3": (2, [MB4, "--parallel.tp=2", CARRY]),
           "pp2_zero1": (2, PP2),
           "tp2pp2_zero1": (4, TP2_PP2),
           "dp1_zero1": (1, [MB4, "--parallel.zero_stage=1"])}  # no carried memory: it can go into a pipeline
PAIRS = {"tp2_to_tp1": ("tp2_zero3", 1, [MB4, CARRY], "dp1 x tp2 ZeRO-3.*loaded into dp1 ZeRO-3"),
         "pp2_to_pp1": ("pp2_zero1", 1, [MB4, "--parallel.zero_stage=1"], "dp1 x pp2 ZeRO-1.*loaded into dp1 ZeRO-1"),
         "pp1_to_pp2": ("dp1_zero1", 2, PP2, "dp1 ZeRO-1.*loaded into dp1 x pp2 ZeRO-1"),
         "zero1_to_zero3": ("dp1_zero1", 1, [MB4, "--parallel.zero_stage=3"], "dp1 ZeRO-1.*loaded into dp1 ZeRO-3"),
         "tp2pp2_to_pp2": ("tp2pp2_zero1", 2, PP2, "dp1 x tp2 x pp2 ZeRO-1.*loaded into dp1 x pp2 ZeRO-1"),
         "tp2pp2_to_tp1pp1": ("tp2pp2_zero1", 1, [MB4, "--parallel.zero_stage=1"],
                              "dp1 x tp2 x pp2 ZeRO-1.*loaded into dp1 ZeRO-1"),
         "pp2_to_tp2pp2": ("pp2_zero1", 4, TP2_PP2, "dp1 x pp2 ZeRO-1.*loaded into dp1 x tp2 x pp2 ZeRO-1")}


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

