"""`init.from_hf`: a tiny random GPT-2 and Llama (transformers' own config classes, save_pretrained)
become our model with the memory added on top; step-0 logits equal the HF model's, with memory on
and off; a run from the import trains, resumes, and exports back to transformers."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import bin_path, run_cmd, train
from memgpt_dist.config import ConfigError, load_config
from memgpt_dist.hf.convert import load_hf_weights
from memgpt_dist.model import GPT

VOCAB, N = 320, 16  # the tiny corpus's vocabulary; our segment length
TOL = 1e-4


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                      bos_token_id=0, eos_token_id=0))


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, rope_theta=50000.0,
                                        rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=64))


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def hf_dir(request, tmp_path_factory, tiny_data):
    """A saved random HF model (biases and norm gains randomised so that nothing is trivially zero)
    with the tiny corpus's tokenizer beside it."""
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(0)
    model = _gpt2() if request.param == "gpt2" else _llama()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name or "ln" in name else 0.0, 0.1)
    out = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(out)
    PreTrainedTokenizerFast(tokenizer_file=str(tiny_data / "tokenizer.json")).save_pretrained(out)
    return out


def _ours(hf_dir, memory: bool) -> GPT:
    cfg = load_config(None, [f"init.from_hf={hf_dir}", f"model.segment_len={N}", f"memory.enabled={str(memory).lower()}",
                             "memory.gate_init=0.5"])
    model = GPT(cfg.model, cfg.memory)
    model.init_weights()
    load_hf_weights(model, hf_dir)
    return model.eval()


@pytest.mark.parametrize("memory", [False, True])
def test_step_0_logits_equal_the_hf_model(hf_dir, memory):
    """Three segments: ours reads each as the HF model reads it alone (positions restart, the memory
    reads exactly zero at step 0), fp32."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ours = _ours(hf_dir, memory)
    ids = torch.randint(0, VOCAB, (2, 3 * N), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = torch.cat([hf(ids[:, s:s + N]).logits for s in range(0, 3 * N, N)], dim=1)
        out = ours(ids)
    assert (out.logits - ref).abs().max().item() <= TOL
    if memory:  # the memory is there, written, and read back as zero
        assert out.state is not None and out.state[0].z.abs().sum() > 0
        assert all(v.item() == 0 for k, v in out.stats.items() if k.startswith("mem_read_norm"))


def test_the_model_config_comes_from_the_checkpoint(hf_dir):
    hf = json.loads((hf_dir / "config.json").read_text())
    cfg = load_config(None, [f"init.from_hf={hf_dir}", f"model.segment_len={N}"])
    assert cfg.model.n_layer == 2 and cfg.model.n_embd == 64 and cfg.model.vocab_size == VOCAB
    if hf["model_type"] == "llama":
        assert (cfg.model.norm, cfg.model.mlp, cfg.model.n_kv_head, cfg.model.tie_embeddings) == \
            ("rmsnorm", "swiglu", 2, False)
        assert cfg.model.rope_theta == 50000.0 and cfg.model.mlp_hidden_size == 96 and not cfg.model.bias
    else:
        assert (cfg.model.position, cfg.model.mlp, cfg.model.tie_embeddings) == ("learned", "gelu_tanh", True)
    with pytest.raises(ConfigError, match=r"model\.n_embd=128 differs from the checkpoint"):
        load_config(None, [f"init.from_hf={hf_dir}", f"model.segment_len={N}", "model.n_embd=128"])


def test_a_missing_or_foreign_checkpoint_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        load_config(None, [f"init.from_hf={tmp_path}"])
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(ConfigError, match="not supported"):
        load_config(None, [f"init.from_hf={tmp_path}"])


def _run_args(data, run_dir, hf_dir, steps: int) -> list[str]:
    return [f"--run_dir={run_dir}", f"--data.path={data}", f"--init.from_hf={hf_dir}", f"--model.segment_len={N}",
            "--data.n_segments=2", "--parallel.micro_batch_size=2", "--train.eval_every=0", "--log.every=1",
            "--optim.warmup_steps=1", f"--train.max_steps={steps}", "--checkpoint.every=2"]


def test_a_run_from_the_import_trains_resumes_and_exports_back(hf_dir, tiny_data, tmp_path):
    """3 steps from the import (ZeRO-3), resumed from the step-3 checkpoint to 4,
    then exported: the export's logits equal the run's model."""
    from transformers import AutoModelForCausalLM

    from memgpt_dist.generate import find_checkpoint, load_model

    run = tmp_path / "run"
    train(_run_args(tiny_data, run, hf_dir, 3))
    train(_run_args(tiny_data, run, hf_dir, 4) + ["--resume", "auto"])
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in losses if "train/loss" in r]
    assert steps == [1, 2, 3, 4]  # the second run went on from step 3 (a restart would log 1-4 again)
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in losses if "train/loss" in r)
    out = tmp_path / "hf_out"
    run_cmd([bin_path("memgpt-export"), "--checkpoint", str(run), "--out", str(out)])
    model, _ = load_model(find_checkpoint(run, None))
    exported = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = torch.randint(0, VOCAB, (1, 2 * N + 3), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (exported(ids, use_cache=False).logits - model.float().eval()(ids).logits).abs().max() <= 1e-5
