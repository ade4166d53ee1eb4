"""Attention across segments (`model.attention: window | full`) and the memory's forgetting gate
(`memory.decay`): each against a written-out reference, one forward against streaming, the
carried window cache saved bitwise and relaid out by stream, head and layer."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conftest import SEGMENT_LEN as N
from conftest import VOCAB, build_tiny
from memgpt_dist.model import GPT, state_from_dict, state_to_dict
from memgpt_dist.model.carry import MemoryCarry
from memgpt_dist.model.gpt import apply_rope, build_rope
from memgpt_dist.model.memory import (LayerState, delta_reference_scan, delta_scan, memory_scan,
                                      reference_scan)
from memgpt_dist.model.window import WindowCache, reference_window_attention, shift_keys, window_attention
from memgpt_dist.train.redistribute import redistribute_memory

B, T, H, HD = 2, 22, 4, 8  # 22 tokens: three whole segments of 6 and a short one


def _qkv(seed=0, heads_kv=H):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, H, HD, generator=g), torch.randn(B, T, heads_kv, HD, generator=g),
            torch.randn(B, T, heads_kv, HD, generator=g))


def _cache(n=6, heads=H):
    g = torch.Generator().manual_seed(1)
    valid = (torch.arange(n) < 4).view(1, 1, n).expand(B, heads, n).clone()  # a short previous segment
    return WindowCache(torch.randn(B, heads, n, HD, generator=g), torch.randn(B, heads, n, HD, generator=g), valid)


# --------------------------------------------------------------------------- window attention


def test_shifted_keys_are_keys_rotated_one_segment_earlier():
    x = torch.randn(1, 6, H, HD)
    pos = torch.arange(6)
    shifted = shift_keys(apply_rope(x, build_rope(pos, HD, 1e4)), 6, 1e4)
    assert torch.allclose(shifted, apply_rope(x, build_rope(pos - 6, HD, 1e4)), atol=1e-6)


@pytest.mark.parametrize("with_cache", [False, True])
@pytest.mark.parametrize("with_reset", [False, True])
def test_window_attention_equals_reference(with_cache, with_reset):
    q, k, v = _qkv()
    reset = torch.tensor([[False, False, True, False], [False, True, False, False]]) if with_reset else None
    cache = _cache() if with_cache else None
    got, _ = window_attention(q, k, v, 6, cache, reset, 1e4, 0.0)
    want = reference_window_attention(q, k, v, 6, cache, reset, 1e4)
    assert (got - want).abs().max().item() <= 1e-5


def test_window_attention_with_grouped_kv_heads_equals_reference():
    q, k, v = _qkv(heads_kv=2)
    got, _ = window_attention(q, k, v, 6, _cache(heads=2), None, 1e4, 0.0)
    assert (got - reference_window_attention(q, k, v, 6, _cache(heads=2), None, 1e4)).abs().max().item() <= 1e-5


def test_window_attention_in_chunks_equals_one_call():
    q, k, v = _qkv()
    whole, _ = window_attention(q[:, :18], k[:, :18], v[:, :18], 6, None, None, 1e4, 0.0)
    first, cache = window_attention(q[:, :12], k[:, :12], v[:, :12], 6, None, None, 1e4, 0.0)
    second, _ = window_attention(q[:, 12:18], k[:, 12:18], v[:, 12:18], 6, cache, None, 1e4, 0.0)
    assert torch.equal(torch.cat([first, second], dim=1), whole)


def test_window_sees_the_previous_segment_and_no_further():
    q, k, v = _qkv()
    base, _ = window_attention(q, k, v, 6, None, None, 1e4, 0.0)
    v2 = v.clone()
    v2[:, 0:6] += 1.0  # segment 0 changes: segment 1 sees it, segment 2 does not
    moved, _ = window_attention(q, k, v2, 6, None, None, 1e4, 0.0)
    assert (moved[:, 6:12] - base[:, 6:12]).abs().max() > 1e-3
    assert torch.equal(moved[:, 12:], base[:, 12:])


# --------------------------------------------------------------------------- decay


def _memory_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, HD, generator=g) for _ in range(3))
    return q, k, v, torch.randn(B, T, H, generator=g), torch.randn(B, T, H, generator=g) + 2.0


@pytest.mark.parametrize("kind", ["head", "delta"])
@pytest.mark.parametrize("with_reset", [False, True])
def test_decayed_scan_equals_the_token_recurrence(kind, with_reset):
    q, k, v, write, decay = _memory_inputs()
    reset = torch.tensor([[False, False, True, False], [False, False, False, False]]) if with_reset else None
    fast, ref = (memory_scan, reference_scan) if kind == "head" else (delta_scan, delta_reference_scan)
    start = LayerState(torch.rand(B, H, 2 * HD, HD), torch.rand(B, H, 2 * HD))
    read, state = fast(q, k, v, write, start, reset, 6, 1, 1e-5, decay)
    want_read, want = ref(q, k, v, write, start, reset, 6, 1, 1e-5, decay)
    assert (read - want_read).abs().max().item() <= 1e-5
    assert (state.A - want.A).abs().max().item() <= 1e-5 and (state.z - want.z).abs().max().item() <= 1e-5


def test_decay_forgets():
    """alpha -> 1 is the undecayed memory; a small alpha leaves little of the first segments."""
    q, k, v, write, _ = _memory_inputs()
    _, plain = memory_scan(q, k, v, write, None, None, 6, 1, 1e-5)
    _, kept = memory_scan(q, k, v, write, None, None, 6, 1, 1e-5, torch.full((B, T, H), 40.0))
    assert torch.equal(kept.A, plain.A)
    _, faded = memory_scan(q, k, v, write, None, None, 6, 1, 1e-5, torch.full((B, T, H), -3.0))
    assert faded.z.sum() < 0.2 * plain.z.sum()


def test_decay_gradients_are_finite_for_tiny_alphas():
    q, k, v, write, _ = _memory_inputs()
    decay = torch.full((B, T, H), -30.0, requires_grad=True)  # G_t / G_j spans e^-150: never divided
    read, state = delta_scan(q, k, v, write, None, None, 6, 1, 1e-5, decay)
    (read.sum() + state.A.sum()).backward()
    assert torch.isfinite(decay.grad).all()


# --------------------------------------------------------------------------- the carried cache


def _window_state(layers=2, streams=4, heads=H, n=N):
    g = torch.Generator().manual_seed(3)
    return tuple(LayerState(torch.randn(streams, heads, 2 * HD, HD, generator=g),
                            torch.rand(streams, heads, 2 * HD, generator=g),
                            torch.randn(streams, heads, n, HD, generator=g),
                            torch.randn(streams, heads, n, HD, generator=g),
                            torch.rand(streams, heads, n, generator=g) > 0.3) for _ in range(layers))


def test_carry_saves_and_loads_the_window_cache_bitwise():
    carry = MemoryCarry(True)
    carry.keep(_window_state())
    again = MemoryCarry(True)
    again.load_state_dict(carry.state_dict(), torch.device("cpu"))
    for i, s in carry.layers.items():
        for a, b in zip(s, again.layers[i]):
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_window_cache_relayout_by_stream_head_and_layer():
    """Saved by 2 dp x 2 tp x 2 pp ranks (streams 0-1 | 2-3, heads 0-1 | 2-3, layer 0 | 1), read
    by one rank holding streams [3, 0] and all heads of layer 1 only."""
    whole = _window_state()
    ranks = []
    for dp in range(2):
        for tp in range(2):
            for pp in range(2):
                rows, heads = slice(2 * dp, 2 * dp + 2), slice(2 * tp, 2 * tp + 2)
                s = whole[pp]
                part = {f"layer{pp}.{name}": t[rows, heads] for name, t in zip(LayerState._fields, s)}
                ranks.append({"coord": {"dp": dp, "tp": tp, "pp": pp}, "stream_ids": [2 * dp, 2 * dp + 1],
                              "heads": [2 * tp, 2 * tp + 2], "memory_state": part})
    moved = redistribute_memory(ranks, [3, 0], (0, H))
    assert moved.missing_streams == 0
    carry = MemoryCarry(True, owned=[1])
    carry.load_state_dict(moved.memory, torch.device("cpu"))
    assert list(carry.layers) == [1]
    for name, got, want in zip(LayerState._fields, carry.layers[1], whole[1]):
        assert got.dtype == want.dtype, name
        assert torch.equal(got, want[[3, 0]]), name


# --------------------------------------------------------------------------- the GPT


def _tokens(T_=4 * N, seed=0):
    return torch.randint(0, VOCAB, (2, T_), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("memory,decay", [(False, False), (True, False), (True, True)])
def test_window_model_one_forward_equals_streaming(memory, decay, tmp_path):
    model = build_tiny(memory=memory, attention="window", memory_kwargs={"decay": decay} if memory else None)
    tokens = _tokens()
    whole = model(tokens)
    state, parts = None, []
    for s in range(4):
        if s == 2:  # the carried cache survives a save and load bitwise
            torch.save(state_to_dict(state), tmp_path / "state.pt")
            state = state_from_dict(torch.load(tmp_path / "state.pt", weights_only=True))
        out = model(tokens[:, s * N:(s + 1) * N], state=state)
        parts.append(out.logits)
        state = out.state
    assert (whole.logits - torch.cat(parts, dim=1)).abs().max().item() <= 1e-5
    assert torch.equal(state[0].k, whole.state[0].k)


@torch.no_grad()
def test_window_model_reaches_one_segment_back():
    model = build_tiny(memory=False, attention="window")
    tokens = _tokens()
    other = tokens.clone()
    other[:, :N] = (tokens[:, :N] + 1) % VOCAB
    a, b = model(tokens).logits, model(other).logits
    assert (a[:, N:2 * N] - b[:, N:2 * N]).abs().max() > 1e-4  # segment 1 sees segment 0
    assert (a[:, 2 * N:3 * N] - b[:, 2 * N:3 * N]).abs().max() > 1e-4  # two layers: two segments back
    assert torch.allclose(a[:, 3 * N:], b[:, 3 * N:], atol=1e-6)  # three back: out of reach


@torch.no_grad()
def test_window_reset_cuts_the_previous_document():
    model = build_tiny(memory=True, attention="window")
    tokens = _tokens()
    reset = torch.zeros(2, 4, dtype=torch.bool)
    reset[:, 2] = True
    joined = model(tokens, reset=reset).logits[:, 2 * N:]
    alone = model(tokens[:, 2 * N:]).logits
    assert (joined - alone).abs().max().item() <= 1e-5


@torch.no_grad()
def test_full_attention_is_the_plain_causal_gpt():
    """attention=full over 4 segments equals the segment-local GPT whose one segment spans them
    (continuous positions, causal over all tokens), the same weights in both."""
    full = build_tiny(memory=False, attention="full")
    one_segment = GPT(dataclasses.replace(full.cfg, attention="segment", segment_len=4 * N), full.mem_cfg)
    one_segment.load_state_dict(full.state_dict())
    one_segment.eval()
    tokens = _tokens()
    assert (full(tokens).logits - one_segment(tokens).logits).abs().max().item() <= 1e-5
    assert full(tokens).state is None


def test_full_attention_reference():
    """Full attention written out: softmax(q k^T / sqrt(hd)) over positions <= t."""
    from memgpt_dist.model.gpt import full_attention

    q, k, v = _qkv()
    got = full_attention(q, k, v, 0.0)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / HD ** 0.5
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    want = torch.einsum("bhts,bshd->bthd", F.softmax(scores, dim=-1), v)
    assert (got - want).abs().max().item() <= 1e-5


def test_grouped_kv_window_cache_relayout_by_kv_heads():
    """With 2 key/value heads for 4 query heads, TP rank t of 2 holds query heads [2t, 2t+2) and
    kv head t: a one-rank reader gets both kv heads back in order."""
    whole = _window_state(layers=1, streams=2)
    k = whole[0].k[:, :2]  # (2 streams, 2 kv heads, N, hd)
    ranks = [{"coord": {"dp": 0, "tp": t, "pp": 0}, "stream_ids": [0, 1], "heads": [2 * t, 2 * t + 2],
              "memory_state": {"layer0.A": whole[0].A[:, 2 * t:2 * t + 2], "layer0.k": k[:, t:t + 1]}}
             for t in range(2)]
    moved = redistribute_memory(ranks, [1, 0], (0, H))
    assert torch.equal(moved.memory["layer0.k"], k[[1, 0]])
    assert torch.equal(moved.memory["layer0.A"], whole[0].A[[1, 0]])
    half = redistribute_memory(ranks, [0], (2, 4))  # a tp2 reader's second rank
    assert torch.equal(half.memory["layer0.k"], k[[0], 1:2])


def test_config_says_what_to_change():
    from memgpt_dist.config import ConfigError, load_config

    with pytest.raises((ValueError, ConfigError), match="model.attention='full' needs model.position='rope'"):
        load_config("configs/tiny.yaml", ["model.attention=full", "model.position=learned"])
    with pytest.raises((ValueError, ConfigError), match="model.attention"):
        load_config("configs/tiny.yaml", ["model.attention=sliding"])
    cfg = load_config("configs/tiny.yaml", ["model.attention=window", "memory.enabled=false", "train.carry_memory=true"])
    assert cfg.train.carry_memory  # the window cache alone is a state to carry
