"""Building only what a rank holds (memgpt_dist/parallel/model_build.py), in one process: a
pipeline stage's build gives its parameters exactly the weights of a whole build (fresh and from a
Hugging Face import) and leaves every other parameter without storage."""
from __future__ import annotations

import pytest
import torch

from memgpt_dist.config import load_config
from memgpt_dist.parallel.shares import stage_parameter_names
from memgpt_dist.train.run import build_model

PP = ["parallel.pp=2", "parallel.zero_stage=1", "model.n_layer=4"]


def _check_stages(cfg, from_hf=False):
    whole = dict(build_model(cfg, from_hf=from_hf).named_parameters())
    for stage in range(cfg.parallel.pp):
        held = stage_parameter_names(cfg, stage)
        part = dict(build_model(cfg, from_hf=from_hf, held=held).named_parameters())
        assert {n for n, p in part.items() if not p.is_meta} == held
        assert 0 < len(held) < len(whole)
        for name in held:
            assert torch.equal(part[name], whole[name]), name


@pytest.mark.parametrize("tied", ["true", "false"])
def test_a_stage_build_holds_the_whole_builds_weights_of_its_stage_only(tied):
    _check_stages(load_config("configs/tiny.yaml", PP + [f"model.tie_embeddings={tied}", "memory.decay=true"]))


def test_a_stage_build_imports_its_share_of_a_hf_checkpoint(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                 max_position_embeddings=64)).save_pretrained(tmp_path)
    _check_stages(load_config(None, PP[:2] + [f"init.from_hf={tmp_path}", "model.segment_len=16"]), from_hf=True)
