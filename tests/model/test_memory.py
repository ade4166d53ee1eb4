"""Memory state semantics: scan vs streaming, save/load, document resets, BPTT, fp32 state."""
from __future__ import annotations

import pytest
import torch

from conftest import SEGMENT_LEN as N
from conftest import VOCAB
from memgpt_dist.model import state_from_dict, state_to_dict


def stream(model, tokens, state=None, save_at=None, tmp_path=None):
    """Run segment by segment, passing the state; optionally round-trip it through a file."""
    logits = []
    for s in range(tokens.shape[1] // N):
        if s == save_at:
            torch.save(state_to_dict(state), tmp_path / "state.pt")
            state = state_from_dict(torch.load(tmp_path / "state.pt", weights_only=True), n_layer=len(model.blocks))
        out = model(tokens[:, s * N:(s + 1) * N], state=state)
        logits.append(out.logits)
        state = out.state
    return torch.cat(logits, dim=1), state


# the memory in every block, and in block 1 of 2 only (memory.layers: block 0 carries nothing)
LAYERS = ["", "1"]


@pytest.mark.parametrize("layers", LAYERS)
@torch.no_grad()
def test_scan_over_segments_equals_streaming(make_model, tokens, layers):
    model = make_model(memory_kwargs={"layers": layers})
    full = model(tokens)
    streamed, state = stream(model, tokens)
    assert (full.logits - streamed).abs().max().item() <= 1e-6
    assert [s is not None for s in state] == [s is not None for s in full.state] == [layers != "1", True]
    for a, b in zip(full.state, state):
        if a is not None:
            assert torch.allclose(a.A, b.A, atol=1e-6) and torch.allclose(a.z, b.z, atol=1e-6)


@pytest.mark.parametrize("layers", LAYERS)
@torch.no_grad()
def test_state_save_load_mid_document_is_bitwise(make_model, tokens, tmp_path, layers):
    model = make_model(memory_kwargs={"layers": layers})
    straight, _ = stream(model, tokens)
    resumed, _ = stream(model, tokens, save_at=2, tmp_path=tmp_path)
    assert torch.equal(straight, resumed)


@torch.no_grad()
def test_reset_starts_the_second_document_from_an_empty_memory(make_model, tokens):
    model = make_model()
    reset = torch.zeros(2, 4, dtype=torch.bool)
    reset[:, 2] = True
    joined = model(tokens, reset=reset).logits[:, 2 * N:]
    alone = model(tokens[:, 2 * N:]).logits
    assert (joined - alone).abs().max().item() <= 1e-6
    other_first_doc = tokens.clone()
    other_first_doc[:, :2 * N] = (tokens[:, :2 * N] + 1) % VOCAB
    assert torch.equal(model(other_first_doc, reset=reset).logits[:, 2 * N:], joined)


@torch.no_grad()
def test_reset_is_per_sample(make_model, tokens):
    model = make_model()
    reset = torch.zeros(2, 4, dtype=torch.bool)
    reset[0, 1] = True
    with_reset, without = model(tokens, reset=reset).logits, model(tokens).logits
    assert torch.equal(with_reset[1], without[1])
    assert not torch.allclose(with_reset[0, N:], without[0, N:])


@torch.no_grad()
def test_reset_also_clears_a_passed_state(make_model, tokens):
    model = make_model()
    carried = model(tokens[:, :N]).state
    reset = torch.ones(2, 3, dtype=torch.bool)
    assert torch.equal(model(tokens[:, N:], state=carried, reset=reset).logits, model(tokens[:, N:], reset=reset).logits)


def _embedding_grad_of_last_segment_loss(model, tokens):
    captured = {}

    def keep(module, inputs, out):
        captured["emb"] = out

    handle = model.wte.register_forward_hook(keep)
    try:
        logits = model(tokens).logits
    finally:
        handle.remove()
    captured["emb"].retain_grad()
    logits[:, 3 * N:].logsumexp(-1).sum().backward()
    return captured["emb"].grad  # (B, T, C)


@pytest.mark.parametrize("layers", LAYERS)
def test_gradients_flow_through_the_state_across_segments(make_model, tokens, layers):
    model = make_model(memory_kwargs={"layers": layers})
    emb_grad = _embedding_grad_of_last_segment_loss(model, tokens)
    assert emb_grad[:, :N].abs().sum() > 0  # segment 0 tokens influence the segment 3 loss
    with_memory = [block for block in model.blocks.values() if block.attn.mem is not None]
    assert len(with_memory) == (1 if layers else 2)
    for block in with_memory:
        assert block.attn.mem_k_proj.weight.grad.abs().sum() > 0


def test_without_memory_no_gradient_crosses_segments(make_model, tokens):
    emb_grad = _embedding_grad_of_last_segment_loss(make_model(memory=False), tokens)
    assert torch.equal(emb_grad[:, :3 * N], torch.zeros_like(emb_grad[:, :3 * N]))


def test_state_is_fp32_under_bf16_autocast(make_model, tokens):
    model = make_model()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = model(tokens)
    assert out.logits.dtype == torch.bfloat16
    hd = model.cfg.head_dim
    for layer in out.state:
        assert layer.A.dtype == layer.z.dtype == torch.float32
        assert layer.A.shape == (2, model.cfg.n_head, 6 * hd, hd)
        assert layer.z.shape == (2, model.cfg.n_head, 6 * hd)


@torch.no_grad()
def test_read_memory_false_keeps_writing(make_model, tokens):
    model = make_model()
    ablated, normal = model(tokens, read_memory=False), model(tokens)
    assert not torch.allclose(ablated.logits[:, N:], normal.logits[:, N:])
    assert ablated.stats["mem_read_norm/layer0"] == 0
    # layer 0's writes see the same input either way, so its state is unchanged by the ablation
    assert torch.equal(ablated.state[0].A, normal.state[0].A)


def test_fused_scan_matches_the_written_out_equations():
    """memory_scan (fused) against reference_scan (one line per equation): outputs, final state and
    gradients, with a ragged last segment, a reset mid-sequence and an incoming state."""
    from memgpt_dist.model.memory import LayerState, memory_scan, reference_scan

    g = torch.Generator().manual_seed(0)
    B, T, H, hd, n, nu = 3, 2 * 5 + 3, 2, 4, 5, 3
    inputs = [torch.randn(B, T, H, hd, generator=g, dtype=torch.float32) for _ in range(3)]
    logit = torch.randn(B, T, H, generator=g, dtype=torch.float32)
    dk = 2 * nu * hd
    state = LayerState(torch.randn(B, H, dk, hd, generator=g, dtype=torch.float32),
                       torch.rand(B, H, dk, generator=g, dtype=torch.float32) * 5)
    reset = torch.tensor([[False, False, False], [False, True, False], [True, False, True]])
    for st in (None, state):
        results = []
        for scan in (memory_scan, reference_scan):
            leaves = [x.clone().requires_grad_() for x in (*inputs, logit)]
            read, out = scan(*leaves, st, reset, n, nu, 1e-6)
            (read.square().sum() + out.A.sum() + out.z.sum()).backward()
            results.append([read, out.A, out.z, *(x.grad for x in leaves)])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # both compute in fp32



@pytest.mark.parametrize("nu", [1, 2, 3])
def test_dpfp_equals_its_definition_with_and_without_autograd(nu):
    """dpfp against Schlag et al.'s definition, written with roll: r = [relu(x), relu(-x)],
    features [r * roll(r, 1), ..., r * roll(r, nu)] in that order (the order of the rows of the
    carried state A, so saved states and the exported model's copy stay valid). Values equal
    bit for bit on both paths (autograd, and the no-grad one writing in place); gradients as
    the definition's."""
    from memgpt_dist.model.memory import dpfp

    x = torch.randn(3, 2, 7, 5, generator=torch.Generator().manual_seed(nu))  # odd head size

    def definition(t):
        r = torch.cat([torch.relu(t), torch.relu(-t)], dim=-1)
        return torch.cat([r * r.roll(shifts=j, dims=-1) for j in range(1, nu + 1)], dim=-1)

    with torch.no_grad():
        assert torch.equal(dpfp(x, nu), definition(x))
    leaves = [x.clone().requires_grad_() for _ in range(2)]
    outs = [dpfp(leaves[0], nu), definition(leaves[1])]
    assert torch.equal(outs[0], outs[1]) and outs[0].shape[-1] == 2 * nu * 5
    weights = torch.randn_like(outs[0])
    for out in outs:
        (out * weights).sum().backward()
    torch.testing.assert_close(leaves[0].grad, leaves[1].grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("nu", [0, 3])
def test_chunked_delta_rule_matches_the_token_by_token_recurrence(nu):
    """delta_scan (one triangular solve per segment) against DeltaNet's per-token recurrence:
    reads, final state and gradients, with a ragged last segment, resets and an incoming state."""
    from memgpt_dist.model.memory import LayerState, delta_features, delta_reference_scan, delta_scan

    g = torch.Generator().manual_seed(1)
    B, T, H, hd, n = 3, 3 * 5 + 2, 2, 4, 5
    inputs = [torch.randn(B, T, H, hd, generator=g) for _ in range(3)]
    logit = torch.randn(B, T, H, generator=g)
    dk = delta_features(torch.zeros(hd), nu).shape[-1]
    state = LayerState(torch.randn(B, H, dk, hd, generator=g) * 0.3, torch.rand(B, H, dk, generator=g))
    reset = torch.tensor([[False, False, False, False], [False, True, False, False], [True, False, True, False]])
    for st in (None, state):
        results = []
        for scan in (delta_scan, delta_reference_scan):
            leaves = [x.clone().requires_grad_() for x in (*inputs, logit)]
            read, out = scan(*leaves, st, reset, n, nu, 1e-6)
            (read.square().sum() + out.A.square().sum() + out.z.sum()).backward()
            results.append([read, out.A, out.z, *(x.grad for x in leaves)])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_delta_rule_recalls_every_pair_written_in_one_segment():
    """The reason for the exact rule: orthogonal keys written in the same segment are read back
    exactly by the next segment, where the one-shot (segment-at-once) write would blur them."""
    from memgpt_dist.model.memory import delta_scan

    hd, pairs = 8, 4
    keys = torch.eye(hd)[:pairs]  # orthogonal unit keys
    values = torch.randn(pairs, hd)
    q = torch.cat([torch.zeros(pairs, hd), keys]).view(1, 2 * pairs, 1, hd)  # segment 2 asks each key
    k = torch.cat([keys, torch.zeros(pairs, hd)]).view(1, 2 * pairs, 1, hd)
    v = torch.cat([values, torch.zeros(pairs, hd)]).view(1, 2 * pairs, 1, hd)
    write = torch.full((1, 2 * pairs, 1), 30.0)  # gate ~1: overwrite completely
    read, _ = delta_scan(q, k, v, write, None, None, pairs, 0, 1e-6)
    torch.testing.assert_close(read[0, pairs:, 0], values, rtol=1e-5, atol=1e-5)
