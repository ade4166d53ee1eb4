"""benchmarks/long_context_lm.py: its readings score every token once with the context each reading
promises, its buckets count right, its arms are of equal size, and the whole harness runs end to
end at a tiny size through the real CLI."""
from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import ROOT, run_cmd

sys.path.insert(0, str(ROOT / "benchmarks"))
import long_context_lm as lclm  # noqa: E402

from memgpt_dist.config import MemoryConfig, ModelConfig  # noqa: E402
from memgpt_dist.model import GPT  # noqa: E402


def _model(segment_len: int, memory: bool) -> GPT:
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, segment_len=segment_len),
            MemoryConfig(enabled=memory))
    m.init_weights()
    with torch.no_grad():  # a memory that is read: mix gate open, so carrying it matters
        for block in m.blocks.values():
            if memory:
                block.attn.mem_beta.fill_(2.0)
    return m.eval()


def _losses(model, ids):
    return F.cross_entropy(model(ids[:-1].unsqueeze(0)).logits[0], ids[1:], reduction="none")


def test_sliding_window_scores_each_token_from_its_own_window():
    model = _model(32, memory=False)
    ids = torch.randint(0, 64, (32 * 3 + 1,))
    got = lclm.sliding_losses(model, ids, window=32, stride=16)
    assert torch.allclose(got[:32], _losses(model, ids[:33]), atol=1e-5)  # the first window: all its tokens
    for start in (16, 48, 64):  # later windows: their last 16 tokens
        want = _losses(model, ids[start:start + 33])[16:]
        assert torch.allclose(got[start + 16:start + 32], want, atol=1e-5)


def test_chunks_restart_the_context():
    model = _model(32, memory=False)
    ids = torch.randint(0, 64, (80 + 1,))
    got = lclm.chunk_losses(model, ids, 32)
    assert got.shape == (80,)
    assert torch.allclose(got[32:64], _losses(model, ids[32:65]), atol=1e-5)
    assert torch.allclose(got[64:], _losses(model, ids[64:]), atol=1e-5)  # a short last chunk


def test_streaming_carries_the_memory_like_one_forward():
    model = _model(8, memory=True)
    ids = torch.randint(0, 64, (8 * 6 + 1,))
    streamed = lclm.streamed_losses(model, ids, chunk=16)
    assert torch.allclose(streamed, _losses(model, ids), atol=1e-5)
    fresh = torch.cat([_losses(model, ids[j:j + 17]) for j in range(0, 48, 16)])  # no carry: differs
    assert not torch.allclose(streamed, fresh, atol=1e-3)


def test_buckets_weight_every_token_once():
    C = 4
    a, b = torch.arange(10.0), torch.full((3,), 100.0)
    out = lclm.bucket_means([a, b], C)
    assert out["tokens"] == {"[0,C)": 7, "[C,4C)": 6, "[4C,16C)": 0, "overall": 13}
    assert out["[0,C)"] == pytest.approx((0 + 1 + 2 + 3 + 300) / 7)
    assert out["[C,4C)"] == pytest.approx(sum(range(4, 10)) / 6)
    assert out["overall"] == pytest.approx((45 + 300) / 13)


def test_arms_are_made_equal_in_size():
    base: list[str] = []  # configs/tiny.yaml's shape
    arms = [lclm.ARMS[n] for n in ("a", "c")]
    sizes = lclm.equal_size_arms("configs/tiny.yaml", base, arms)
    counts = [n for _, n in sizes.values()]
    assert max(counts) - min(counts) <= lclm.PARAM_TOLERANCE * max(counts)
    plain = lclm.count_params("configs/tiny.yaml", [*base, *arms[0].overrides])
    assert plain < 0.95 * max(counts)  # without widening the memory-free arm would be >5% smaller


def test_harness_end_to_end(tiny_data, tmp_path):
    out = tmp_path / "bench"
    proc = run_cmd([sys.executable, "benchmarks/long_context_lm.py", "--data", str(tiny_data), "--out", str(out),
                    "--arms", "a,c", "--steps", "2", "--docs", "4", "--min-doc-tokens", "64", "--cost-lengths",
                    "128,256", "--model.vocab_size=320", "--model.n_embd=32", "--model.segment_len=16",
                    "--data.n_segments=2", "--parallel.zero_stage=0", "--param-tolerance=0.1"], timeout=600)
    assert "[4C,16C)" in proc.stdout and "scored tokens per bucket" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["C"] == 32
    arms = res["arms"]
    a = arms["a"]
    assert set(a["losses"]) == {"sliding", "chunks"} and set(arms["c"]["losses"]) == {"stream"}
    assert a["losses"]["sliding"]["tokens"] == arms["c"]["losses"]["stream"]["tokens"]  # the same tokens scored
    assert all(0 < r["losses"][k]["overall"] < 10 for r in arms.values() for k in r["losses"])
    assert set(a["cost"]) == {"128", "256"}


def test_an_arm_variant_places_the_memory_and_a_memoryless_one_is_refused():
    arm = lclm.arm_of("c@every:4")
    assert arm.name == "c@every:4" and arm.read == "stream"
    assert arm.overrides[-1] == "--memory.layers=every:4"
    assert lclm.arm_of("d@0+2").overrides[-1] == "--memory.layers=0,2"
    assert lclm.arm_of("a") is lclm.ARMS["a"]
    with pytest.raises(ValueError, match="has no memory"):
        lclm.arm_of("a@0")
    with pytest.raises(ValueError, match="unknown arm"):
        lclm.arm_of("z")
