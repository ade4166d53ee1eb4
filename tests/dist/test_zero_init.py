"""`parallel.zero_init` (ZeRO-3 without TP): the model built partitioned by `deepspeed.zero.Init`
trains exactly as the model built whole and then partitioned, from a fresh init and from a
Hugging Face import, on 2 gloo ranks; each rank holds only its share of the weights."""
from __future__ import annotations

import re

import pytest
import torch

from helpers import read_metrics, tiny_args, train

STEPS = 3
COMMON = [f"--train.max_steps={STEPS}", "--checkpoint.every=0", "--checkpoint.save_at_end=false",
          "--train.eval_every=3", "--parallel.micro_batch_size=2", "--parallel.zero_stage=3"]


def _llama_dir(tmp_path, tokenizer_file):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                         max_position_embeddings=64))
    model.save_pretrained(tmp_path)
    PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file)).save_pretrained(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("zero_init")
    hf = _llama_dir(base / "llama", tiny_data / "tokenizer.json")
    out = {}
    for source, extra in (("fresh", []), ("hf", [f"--init.from_hf={hf}", "--model.segment_len=16"])):
        for flag in ("true", "false"):
            run = base / f"{source}-{flag}"
            train(tiny_args(tiny_data, run, *COMMON, *extra, f"--parallel.zero_init={flag}"), nproc=2)
            out[source, flag] = run
    return out


@pytest.mark.parametrize("source", ["fresh", "hf"])
def test_partitioned_build_trains_exactly_as_the_whole_build(runs, source):
    on, off = read_metrics(runs[source, "true"]), read_metrics(runs[source, "false"])
    for step in range(1, STEPS + 1):
        assert on[step]["train/loss"] == off[step]["train/loss"], step
        assert on[step]["train/grad_norm"] == off[step]["train/grad_norm"], step
    assert on[STEPS]["val/loss"] == off[STEPS]["val/loss"]


@pytest.mark.parametrize("source", ["fresh", "hf"])
def test_each_rank_holds_only_its_share(runs, source):
    log = (runs[source, "true"] / "train.log").read_text()
    m = re.search(r"model built partitioned \(parallel.zero_init\): this rank holds ([\d,]+) of ([\d,]+) parameters", log)
    assert m, log[-2000:]
    held, whole = (int(g.replace(",", "")) for g in m.groups())
    assert held <= whole // 2 + 1024  # its half, up to DeepSpeed's padding of each partition
    assert "built partitioned" not in (runs[source, "false"] / "train.log").read_text()
