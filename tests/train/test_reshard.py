"""Resume on another layout, the parts that need no engine: which changes are accepted, how the
memory state moves by stream id and head, and how pipeline parameter names map to the GPT's."""
from __future__ import annotations

import pytest
import torch

from memgpt_dist.config import ConfigError
from memgpt_dist.parallel.layout import Layout
from memgpt_dist.train.checkpoint import CheckpointError
from memgpt_dist.parallel.pipeline import model_to_pipeline_name, pipeline_to_model_name
from memgpt_dist.train.redistribute import redistribute_memory
from memgpt_dist.train.universal import (check_layout_change, ensure_universal, merge_universal_info,
                                         stage_with_every_stage_info)


def layout(dp=1, tp=1, pp=1, zero=3, mb=4, ga=1) -> Layout:
    return Layout(world_size=dp * tp * pp, dp=dp, tp=tp, pp=pp, zero_stage=zero, micro_batch_size=mb, grad_accum=ga,
                  global_batch_size=dp * mb * ga)


def test_same_layout_needs_no_conversion():
    assert check_layout_change(layout(dp=2, mb=2), layout(dp=2, mb=2)) is None


@pytest.mark.parametrize("saved,now", [(layout(dp=2, mb=2), layout(dp=1, mb=4)), (layout(dp=1, mb=4), layout(dp=2, mb=2)),
                                       (layout(zero=3), layout(zero=1)), (layout(tp=2), layout(tp=1)),
                                       (layout(pp=2, zero=1), layout(zero=1)), (layout(zero=1), layout(pp=2, zero=1)),
                                       (layout(tp=2, pp=2, zero=1), layout(pp=2, zero=1)),
                                       (layout(tp=2, pp=2, zero=1), layout(zero=1)),
                                       (layout(pp=2, zero=1), layout(tp=2, pp=2, zero=1))])
def test_changes_that_keep_the_streams_are_accepted(saved, now):
    change = check_layout_change(saved, now)
    assert (change.saved, change.now) == (saved, now)


def test_a_change_of_streams_names_the_micro_batch_to_set():
    with pytest.raises(ConfigError, match=r"4 data streams.*2 streams.*set parallel.micro_batch_size=4"):
        check_layout_change(layout(dp=2, mb=2), layout(dp=1, mb=2))
    with pytest.raises(ConfigError, match=r"data-parallel degree divides 4"):
        check_layout_change(layout(dp=2, mb=2), layout(dp=3, mb=1))
    with pytest.raises(ConfigError, match=r"grad_accum 2.*set parallel.micro_batch_size=2 and parallel.grad_accum=2"):
        check_layout_change(layout(dp=2, mb=2, ga=2), layout(dp=2, mb=2, ga=1))


@pytest.mark.parametrize("saved,now", [(layout(zero=0), layout(zero=1)), (layout(dp=2, mb=2, zero=3), layout(dp=1, zero=0))])
def test_zero0_on_either_side_is_refused_with_what_to_do(saved, now):
    with pytest.raises(ConfigError, match="ZeRO-0.*Resume with the saved layout, or use parallel.zero_stage >= 1"):
        check_layout_change(saved, now)


def global_memory(streams=4, heads=4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"layer0.A": torch.randn(streams, heads, 6, 2, generator=g), "layer0.z": torch.randn(streams, heads, 6,
                                                                                                   generator=g)}


def saved_states(memory, dp, tp, heads=4) -> list[dict]:
    """What the ranks of a dp x tp layout saved: their streams' rows and their heads' slices."""
    streams, per = memory["layer0.A"].shape[0] // dp, heads // tp
    return [{"coord": {"dp": d, "tp": t, "pp": 0}, "stream_ids": list(range(d * streams, (d + 1) * streams)),
             "heads": [t * per, (t + 1) * per],
             "memory_state": {k: v[d * streams:(d + 1) * streams, t * per:(t + 1) * per] for k, v in memory.items()}}
            for d in range(dp) for t in range(tp)]


@pytest.mark.parametrize("saved_dp,saved_tp", [(2, 2), (1, 2), (2, 1), (4, 1)])
@pytest.mark.parametrize("streams,heads", [([0, 1, 2, 3], (0, 4)), ([2, 3], (0, 4)), ([0, 1], (2, 4)), ([3], (1, 2))])
def test_memory_moves_by_stream_id_and_head(saved_dp, saved_tp, streams, heads):
    memory = global_memory()
    moved = redistribute_memory(saved_states(memory, saved_dp, saved_tp), streams, heads)
    assert moved.missing_streams == 0
    for key, full in memory.items():
        assert torch.equal(moved.memory[key], full[streams, heads[0]:heads[1]])


def test_streams_without_saved_memory_start_from_zero_and_are_counted():
    memory = global_memory()
    states = saved_states(memory, 2, 1)[:1]  # streams 0, 1 only
    moved = redistribute_memory(states, [1, 2, 3], (0, 4))
    assert moved.missing_streams == 2
    assert torch.equal(moved.memory["layer0.A"][0], memory["layer0.A"][1])
    assert not moved.memory["layer0.A"][1:].any()
    assert redistribute_memory([{"coord": {}, "stream_ids": [0], "heads": [0, 4]}], [0], (0, 4)).memory is None


def test_pipeline_parameter_names_map_to_the_gpt_and_back():
    for gpt in ("wte.weight", "ln_f.bias", "blocks.0.attn.q_proj.weight", "blocks.11.mlp.up_proj.bias"):
        assert pipeline_to_model_name(model_to_pipeline_name(gpt)) == gpt
    assert pipeline_to_model_name("tied_modules.embed.wte.weight") == "wte.weight"
    assert pipeline_to_model_name("tied_modules.embed.ln_f.bias") == "ln_f.bias"
    assert pipeline_to_model_name("1.block.attn.q_proj.weight") == "blocks.0.attn.q_proj.weight"
    assert pipeline_to_model_name("12.block.mlp.down_proj.bias") == "blocks.11.mlp.down_proj.bias"
    assert pipeline_to_model_name("optimizer_state.pt") is None


class OneRank:
    """The Topology calls `ensure_universal` makes, for a world of one."""
    is_main = True

    def broadcast_object(self, obj):
        return obj

    def barrier(self):
        pass


def test_a_finished_conversion_is_reused(tmp_path):
    step_dir = tmp_path / "step_00000003"
    (step_dir / "universal").mkdir(parents=True)
    (step_dir / "universal" / "CONVERTED.json").write_text("{}")
    assert ensure_universal(step_dir, layout(dp=2, mb=2), OneRank()) == (step_dir / "universal", None)


def test_a_failed_conversion_names_the_layout_to_resume_with_and_leaves_nothing(tmp_path):
    step_dir = tmp_path / "step_00000003"
    step_dir.mkdir()
    (step_dir / "junk_optim_states.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"the checkpoint itself is untouched: resume with the layout that "
                                              r"wrote it \(dp2 ZeRO-3"):
        ensure_universal(step_dir, layout(dp=2, mb=2), OneRank())
    assert sorted(p.name for p in step_dir.iterdir()) == ["junk_optim_states.pt"]


def stage_info(block: int) -> dict:
    """A stage's universal-checkpoint info as DeepSpeed collects it: its own layers' rules only."""
    return {"universal_checkpoint_version": 0.4,
            "parameter_with_row_parallelism_patterns": [rf"^{block}\.block\.attn\.o_proj\.weight$"],
            "tp_replicated_parameter_patterns": [rf"^{block}\.block\.ln1\.weight$", r"^tied_modules\.embed\.wte\.weight$"],
            "affine_map": {"version": 1, "params": {rf"^{block}\.block\.attn\.mem_beta$": {"partition_dim": 0}}}}


def test_the_stages_merge_rules_are_joined():
    merged = merge_universal_info([stage_info(1), stage_info(1), stage_info(2), stage_info(2)])
    assert merged["parameter_with_row_parallelism_patterns"] == [r"^1\.block\.attn\.o_proj\.weight$",
                                                                 r"^2\.block\.attn\.o_proj\.weight$"]
    assert merged["tp_replicated_parameter_patterns"] == [r"^1\.block\.ln1\.weight$", r"^tied_modules\.embed\.wte\.weight$",
                                                          r"^2\.block\.ln1\.weight$"]
    assert merged["affine_map"] == {"version": 1, "params": {r"^1\.block\.attn\.mem_beta$": {"partition_dim": 0},
                                                             r"^2\.block\.attn\.mem_beta$": {"partition_dim": 0}}}


def test_stages_that_disagree_on_a_rule_are_refused():
    other = stage_info(2)
    other["affine_map"]["version"] = 2
    with pytest.raises(CheckpointError, match="disagree on affine_map.version"):
        merge_universal_info([stage_info(1), other])


def test_the_conversion_reads_every_stage_rules_from_the_first_model_file(tmp_path):
    """DeepSpeed's conversion reads the rules of mp_rank_00 alone: the staged view rewrites only
    that file (the checkpoint itself is untouched) and links every other file."""
    step_dir = tmp_path / "step_00000003"
    step_dir.mkdir()
    for rank, block in enumerate((1, 1, 2, 2)):  # tp2 x pp2: mp rank = stage x tp + tp rank
        torch.save({"universal_checkpoint_info": stage_info(block), "mp_world_size": 4},
                   step_dir / f"mp_rank_{rank:02d}_model_states.pt")
    (step_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"optim")
    staged = stage_with_every_stage_info(step_dir, tmp_path / "staged")
    first = torch.load(staged / "mp_rank_00_model_states.pt", weights_only=True)
    assert first["universal_checkpoint_info"] == merge_universal_info([stage_info(1), stage_info(2)])
    assert first["mp_world_size"] == 4
    original = torch.load(step_dir / "mp_rank_00_model_states.pt", weights_only=True)
    assert original["universal_checkpoint_info"] == stage_info(1)
    assert sorted(f.name for f in staged.iterdir()) == sorted(f.name for f in step_dir.iterdir())
    assert (staged / "zero_pp_rank_0_mp_rank_00_optim_states.pt").read_bytes() == b"optim"
