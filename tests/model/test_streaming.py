"""The streaming-cost measurement reads what it claims: the memory model in chunks that carry the
state (equal to one pass), the full-attention twin with one segment over the whole document."""
from __future__ import annotations

import dataclasses

import torch

from memgpt_dist.config import MemoryConfig, ModelConfig
from memgpt_dist.model import GPT
from streaming import _read, full_attention_twin, measure_in_subprocess


def test_chunked_read_carries_the_memory_like_one_pass():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=16, segment_len=8)
    model = GPT(cfg, MemoryConfig()).eval()
    model.init_weights()
    ids = torch.randint(0, 64, (1, 64))
    seen = []
    forward = model.forward
    model.forward = lambda x, state=None: seen.append(state) or forward(x, state=state)
    _read(model, ids, chunk=16)
    assert len(seen) == 4 and seen[0] is None and all(s is not None for s in seen[1:])
    model.forward = forward
    one_pass = model(ids).state
    chunked = model(ids[:, 48:], state=model(ids[:, :48]).state).state
    for a, b in zip(one_pass, chunked):
        torch.testing.assert_close(a.A, b.A)


def test_full_attention_twin_sees_the_whole_document():
    cfg, mem = full_attention_twin(ModelConfig(segment_len=64), 4096)
    assert cfg.segment_len == 4096 and not mem.enabled
    assert dataclasses.replace(cfg, segment_len=64) == ModelConfig()


def test_measurement_runs_in_its_own_process():
    cfg = ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, segment_len=8)
    r = measure_in_subprocess(cfg, MemoryConfig(), "memory", 128, threads=1, repeats=1)
    assert r.kind == "memory" and r.length == 128 and r.tokens_per_s > 0 and r.peak_mb > 50


def test_targets_pass_and_fail_on_the_figures():
    from streaming import StreamCost, targets

    def rows(mem_2k, off_2k, mem_64k, full_16k, mem_16k):
        return [StreamCost("memory", 2048, mem_2k, 1.0, 1.0), StreamCost("off", 2048, off_2k, 1.0, 1.0),
                StreamCost("memory", 16384, mem_16k, 1.0, 1.0), StreamCost("full", 16384, full_16k, 1.0, 1.0),
                StreamCost("full", 2048, 10 * mem_2k, 1.0, 1.0),  # full attention below 16K is not a target
                StreamCost("memory", 65536, mem_64k, 1.0, 1.0)]

    assert [ok for ok, _ in targets(rows(700, 1000, 600, 500, 650))] == [True, True, True]
    assert [ok for ok, _ in targets(rows(690, 1000, 580, 700, 650))] == [False, False, False]
