"""Incremental decoding (`GPT.prefill` / `GPT.step`) equals the full forward, for every option."""
from __future__ import annotations

import pytest
import torch

from conftest import SEGMENT_LEN as N
from conftest import VOCAB

OPTIONS = [{}, {"position": "learned"}, {"memory_kwargs": {"kind": "delta"}}, {"memory": False},
           {"memory_kwargs": {"conv": 0}}, {"n_kv_head": 2}, {"n_kv_head": 1, "memory": False},
           {"norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 2, "tie_embeddings": False, "bias": False},
           # issue 15's attention modes and the forgetting gate (alpha starting at sigmoid(0) = 0.5,
           # far from 1, so a decay left out of the cached write would show)
           {"attention": "window"}, {"attention": "window", "memory": False}, {"attention": "window", "n_kv_head": 2},
           {"attention": "window", "position": "learned"}, {"attention": "full"}, {"attention": "full", "memory": False},
           {"memory_kwargs": {"decay": True, "decay_bias_init": 0.0}},
           {"attention": "window", "memory_kwargs": {"decay": True, "decay_bias_init": 0.0, "kind": "delta"}},
           # issue 16: the memory in some blocks only (the others' cache holds no memory of theirs)
           {"n_layer": 4, "memory_kwargs": {"layers": "every:2"}}, {"attention": "window", "memory_kwargs": {"layers": "0"}}]
TOL = 1e-5


@pytest.fixture()
def ids():
    return torch.randint(0, VOCAB, (2, 5 * N + 3), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_token_by_token_equals_the_full_forward(make_model, ids, options):
    """A prompt ending inside its third segment, then one token at a time over three segment ends."""
    model = make_model(**options)
    with torch.no_grad():
        ref = model(ids).logits
        logits, cache = model.prefill(ids[:, :2 * N + 3])
        steps = [logits] + [model.step(ids[:, t:t + 1], cache) for t in range(2 * N + 3, ids.shape[1])]
    assert (torch.cat(steps, dim=1) - ref).abs().max() <= TOL


@pytest.mark.parametrize("attention", ["segment", "window", "full"])
@pytest.mark.parametrize("length", [1, N, N + 1, 2 * N])
def test_prefill_equals_the_full_forward(make_model, ids, length, attention):
    model = make_model(attention=attention)
    with torch.no_grad():
        logits, cache = model.prefill(ids[:, :length])
        assert (logits - model(ids[:, :length]).logits).abs().max() <= TOL
    assert cache.fill.tolist() == [length % N] * 2 and cache.pos.tolist() == [length] * 2


@pytest.mark.parametrize("attention", ["segment", "window", "full"])
def test_rows_at_different_places_in_their_segments(make_model, ids, attention):
    """Two rows prefilled apart (different lengths) then stepped together, as left-padded batches are."""
    from memgpt_dist.model.decode import DecodeCache

    model = make_model(attention=attention)
    with torch.no_grad():
        (_, a), (_, b) = model.prefill(ids[:1, :N + 2]), model.prefill(ids[1:, :5])
        cache = DecodeCache.cat([a, b])
        out = [model.step(torch.stack([ids[0, N + 2 + t], ids[1, 5 + t]]).view(2, 1), cache) for t in range(N)]
        ref_a = model(ids[:1, :2 * N + 2]).logits[0, N + 2:]
        ref_b = model(ids[1:, :N + 5]).logits[0, 5:]
    got = torch.cat(out, dim=1)
    assert (got[0] - ref_a).abs().max() <= TOL and (got[1] - ref_b).abs().max() <= TOL


def test_a_step_may_not_overrun_the_open_segment(make_model, ids):
    model = make_model()
    with torch.no_grad():
        _, cache = model.prefill(ids[:, :3])
        with pytest.raises(ValueError, match="overrun"):
            model.step(ids[:, :N], cache)
