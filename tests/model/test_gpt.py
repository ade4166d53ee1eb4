"""The decoder: equals an explicit reference, is causal, handles a partial last segment."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import SEGMENT_LEN as N
from conftest import VOCAB


def _layer_norm(x, ln):
    if isinstance(ln, torch.nn.RMSNorm):  # x / rms(x) * gain, no centring, no bias
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + ln.eps) * ln.weight
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    y = (x - mean) / torch.sqrt(var + ln.eps) * ln.weight
    return y + ln.bias if ln.bias is not None else y


def _linear(x, lin):
    return x @ lin.weight.T + (lin.bias if lin.bias is not None else 0.0)


def _mlp(h, mlp, kind):
    """The three feed-forwards written out: erf GELU, GPT-2's tanh GELU, SwiGLU."""
    u = _linear(h, mlp.up_proj)
    if kind == "swiglu":
        g = _linear(h, mlp.gate_proj)
        return _linear(g * torch.sigmoid(g) * u, mlp.down_proj)
    if kind == "gelu_tanh":
        return _linear(0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3))), mlp.down_proj)
    return _linear(0.5 * u * (1 + torch.erf(u / math.sqrt(2))), mlp.down_proj)


def _rope(x, pos, theta):
    """Rotary embedding via complex numbers: first and second half of a head are (re, im)."""
    half = x.shape[-1] // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    rot = torch.polar(torch.ones(len(pos), half, dtype=torch.float64), pos[:, None].double() * freq)  # (T, hd/2)
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * rot[None, :, None, :]
    return torch.cat([z.real, z.imag], dim=-1).float()


def reference_logits(model, ids, head_scale=None):
    """Segment-local GPT written out: explicit mask, manual softmax, each key/value head repeated
    for its group of query heads, the norms and MLPs of `_layer_norm` / `_mlp`, tied or untied head.
    head_scale (n_layer, n_head) multiplies each head's attention output."""
    cfg, (B, T) = model.cfg, ids.shape
    hd, pos = cfg.head_dim, torch.arange(T) % N
    seg = torch.arange(T) // N
    allowed = (seg[:, None] == seg[None, :]) & (torch.arange(T)[None, :] <= torch.arange(T)[:, None])  # (T, T)
    x = model.wte.weight[ids]
    if cfg.position == "learned":
        x = x + model.wpe.weight[pos]
    for i in range(cfg.n_layer):
        blk = model.blocks[str(i)]
        h = _layer_norm(x, blk.ln1)
        q, k, v = (_linear(h, p).view(B, T, -1, hd) for p in (blk.attn.q_proj, blk.attn.k_proj, blk.attn.v_proj))
        group = cfg.n_head // k.shape[2]
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)  # kv head j -> queries j*group..
        if cfg.position == "rope":
            q, k = _rope(q, pos, cfg.rope_theta), _rope(k, pos, cfg.rope_theta)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(~allowed, float("-inf"))
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))
        weights = weights / weights.sum(-1, keepdim=True)
        y = torch.einsum("bhts,bshd->bthd", weights, v)
        if head_scale is not None:
            y = y * head_scale[i].view(1, 1, -1, 1)
        x = x + _linear(y.reshape(B, T, -1), blk.attn.o_proj)
        x = x + _mlp(_layer_norm(x, blk.ln2), blk.mlp, cfg.mlp)
    head = model.wte.weight if cfg.tie_embeddings else model.lm_head.weight
    return _layer_norm(x, model.ln_f) @ head.T


@pytest.mark.parametrize("position", ["rope", "learned"])
@torch.no_grad()
def test_memory_disabled_is_the_plain_segment_local_gpt(make_model, tokens, position):
    model = make_model(memory=False, position=position)
    out = model(tokens)
    assert out.state is None and out.stats == {}
    assert not any("mem_" in name for name, _ in model.named_parameters())
    assert (out.logits - reference_logits(model, tokens)).abs().max().item() <= 1e-5


@torch.no_grad()
def test_memory_with_reads_zeroed_is_the_gated_plain_gpt(make_model, tokens):
    """Nothing but the read reaches the output: with it zeroed, only (1 - g_h) * local remains."""
    model = make_model()
    for block in model.blocks.values():
        block.attn.mem_beta.copy_(torch.linspace(-1.0, 1.0, model.cfg.n_head))
    scale = torch.stack([1 - torch.sigmoid(b.attn.mem_beta) for b in model.blocks.values()])
    ablated = model(tokens, read_memory=False).logits
    assert (ablated - reference_logits(model, tokens, head_scale=scale)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("n_layer,layers,have", [(2, "1", [1]), (4, "every:2", [0, 2]), (4, "0,3", [0, 3])])
def test_memory_in_some_layers_only(make_model, tokens, n_layer, layers, have):
    """memory.layers: mem_* parameters, state and stats in the selected blocks only; the others
    are plain blocks (reads zeroed, the selected ones mix in (1 - g_h) of their local output)."""
    model = make_model(n_layer=n_layer, memory_kwargs={"layers": layers})
    assert model.memory_layers == tuple(have)
    assert sorted({int(n.split(".")[1]) for n, _ in model.named_parameters() if ".mem_" in n}) == have
    plain = make_model(n_layer=n_layer, memory=False)
    assert all(n in dict(model.named_parameters()) for n, _ in plain.named_parameters())
    out = model(tokens)
    assert [s is not None for s in out.state] == [i in have for i in range(n_layer)]
    assert set(out.stats) == {f"{k}/layer{i}" for k in ("mem_gate", "mem_read_norm") for i in have}
    out.logits.square().mean().backward()
    for i in have:
        grad = model.blocks[str(i)].attn.mem_q_proj.weight.grad
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with torch.no_grad():
        scale = torch.stack([1 - torch.sigmoid(b.attn.mem_beta) if b.attn.mem is not None else torch.ones(4)
                             for b in model.blocks.values()])
        ablated = model(tokens, read_memory=False).logits
        assert (ablated - reference_logits(model, tokens, head_scale=scale)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("attention", ["segment", "window"])
@torch.no_grad()
def test_memory_in_every_layer_named_is_todays_model(make_model, tokens, attention):
    """memory.layers naming every block is the model without the option, bit for bit: the same
    parameter names, the same init draws, the same logits and state."""
    today = make_model(attention=attention)
    for layers in ("0,1", "every:1"):
        named = make_model(attention=attention, memory_kwargs={"layers": layers})
        assert list(named.state_dict()) == list(today.state_dict())
        assert all(torch.equal(a, b) for a, b in zip(named.state_dict().values(), today.state_dict().values()))
        a, b = named(tokens), today(tokens)
        assert torch.equal(a.logits, b.logits)
        assert all(torch.equal(x, y) for sa, sb in zip(a.state, b.state) for x, y in zip(sa, sb) if x is not None)


def test_a_memory_state_for_a_block_without_memory_is_rejected(make_model, tokens):
    from memgpt_dist.model import zero_state

    model = make_model(memory_kwargs={"layers": "1"})
    cfg = model.cfg
    everywhere = zero_state(2, 2, cfg.n_head, cfg.head_dim, model.mem_cfg.nu)
    with pytest.raises(ValueError, match=r"memory for block\(s\) \[0\], which have none \(memory.layers='1'\)"):
        model(tokens, state=everywhere)
    only = zero_state(2, 2, cfg.n_head, cfg.head_dim, model.mem_cfg.nu, layers=model.memory_layers)
    assert only[0] is None
    assert torch.equal(model(tokens, state=only).logits, model(tokens).logits)


MODERN = [{"norm": "rmsnorm"}, {"mlp": "swiglu", "mlp_multiple_of": 16}, {"mlp": "gelu_tanh"}, {"n_kv_head": 2},
          {"n_kv_head": 1}, {"tie_embeddings": False}, {"bias": False, "mlp_hidden": 40},
          {"norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 2, "tie_embeddings": False, "bias": False,
           "rope_theta": 500000.0, "norm_eps": 1e-6}]


@pytest.mark.parametrize("options", MODERN, ids=str)
@torch.no_grad()
def test_modern_blocks_equal_the_reference(make_model, tokens, options):
    """rmsnorm, swiglu, tanh GELU, grouped-query attention, the untied head, no biases: each equals
    the written-out reference; with memory, reads zeroed, only (1 - g_h) * local remains."""
    model = make_model(memory=False, **options)
    assert (model(tokens).logits - reference_logits(model, tokens)).abs().max().item() <= 1e-5
    model = make_model(**options)
    scale = torch.stack([1 - torch.sigmoid(b.attn.mem_beta) for b in model.blocks.values()])
    ablated = model(tokens, read_memory=False).logits
    assert (ablated - reference_logits(model, tokens, head_scale=scale)).abs().max().item() <= 1e-5


def test_modern_block_shapes():
    from memgpt_dist.config import MemoryConfig, ModelConfig
    from memgpt_dist.model import GPT

    with torch.device("meta"):
        cfg = ModelConfig(n_embd=128, n_head=8, n_kv_head=2, mlp="swiglu", tie_embeddings=False, norm="rmsnorm")
        shapes = {n: tuple(p.shape) for n, p in GPT(cfg, MemoryConfig()).named_parameters()}
    assert cfg.mlp_hidden_size == 512  # Llama: 256 * ceil(int(2 * 4 * 128 / 3) / 256)
    assert shapes["blocks.0.attn.k_proj.weight"] == (32, 128) and shapes["blocks.0.attn.q_proj.weight"] == (128, 128)
    assert shapes["blocks.0.attn.mem_k_proj.weight"] == (128, 128)  # the memory stays per query head
    assert shapes["blocks.0.mlp.gate_proj.weight"] == (512, 128) and shapes["lm_head.weight"] == (4096, 128)
    assert "blocks.0.ln1.bias" not in shapes and "ln_f.bias" not in shapes
    assert ModelConfig(mlp="swiglu", mlp_hidden=344).mlp_hidden_size == 344


@pytest.mark.parametrize("memory,memory_kwargs", [(True, {}), (False, {}), (True, {"kind": "delta"}),
                                                  (True, {"kind": "delta", "nu": 0}), (True, {"conv": 0})])
@torch.no_grad()
def test_changing_a_token_never_changes_earlier_logits(make_model, tokens, memory, memory_kwargs):
    model = make_model(memory=memory, memory_kwargs=memory_kwargs)
    base = model(tokens).logits
    for t in (3, N, 2 * N + 5):
        changed = tokens.clone()
        changed[:, t] = (tokens[:, t] + 1) % VOCAB
        logits = model(changed).logits
        assert torch.equal(logits[:, :t], base[:, :t])
        assert not torch.allclose(logits[:, t], base[:, t])


@pytest.mark.parametrize("kind", ["head", "delta"])
@torch.no_grad()
def test_only_the_memory_carries_information_across_segments(make_model, tokens, kind):
    changed = tokens.clone()
    changed[:, :N] = (tokens[:, :N] + 1) % VOCAB
    plain = make_model(memory=False)
    assert torch.equal(plain(changed).logits[:, N:], plain(tokens).logits[:, N:])
    read_off = make_model(memory_kwargs={"kind": kind})  # the short convolution must not leak either
    assert torch.equal(read_off(changed, read_memory=False).logits[:, N:], read_off(tokens, read_memory=False).logits[:, N:])
    memory = make_model(memory_kwargs={"kind": kind})
    diff = (memory(changed).logits[:, N:2 * N] - memory(tokens).logits[:, N:2 * N]).abs().max().item()
    assert diff > 1e-4


@pytest.mark.parametrize("position", ["rope", "learned"])
@torch.no_grad()
def test_partial_last_segment_equals_the_prefix_of_a_full_run(make_model, tokens, position):
    model = make_model(position=position)
    full = model(tokens).logits
    for T in (2 * N + 1, 3 * N + 5, 5):
        assert (model(tokens[:, :T]).logits - full[:, :T]).abs().max().item() <= 1e-6


@torch.no_grad()
def test_partial_segment_is_written_to_the_state(make_model, tokens):
    model = make_model()
    whole = model(tokens[:, :N + 3]).state
    before = model(tokens[:, :N]).state
    assert not torch.equal(whole[0].A, before[0].A)
    continued = model(tokens[:, N:N + 3], state=before).state
    assert torch.allclose(whole[0].A, continued[0].A, atol=1e-6)


def test_init_and_stats_follow_the_config(make_model, tokens):
    from memgpt_dist.config import MemoryConfig
    from memgpt_dist.model import GPT
    model = GPT(make_model().cfg, MemoryConfig(gate_init=-2.0, write_gate_bias_init=1.5))
    model.init_weights()
    attn = model.blocks["1"].attn
    assert torch.equal(attn.mem_beta, torch.full((4,), -2.0)) and torch.equal(attn.mem_write_gate.bias, torch.full((4,), 1.5))
    assert model.memory_gate_param_names() == ["blocks.0.attn.mem_beta", "blocks.1.attn.mem_beta"]
    stats = model(tokens).stats
    assert set(stats) == {f"{k}/layer{i}" for k in ("mem_gate", "mem_read_norm") for i in (0, 1)}
    assert stats["mem_gate/layer1"].item() == pytest.approx(1 / (1 + math.exp(2.0)))
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())


def test_bad_reset_shape_is_rejected(make_model, tokens):
    with pytest.raises(ValueError, match="reset has shape"):
        make_model()(tokens, reset=torch.zeros(2, 3, dtype=torch.bool))


def test_segment_conv_starts_as_identity_and_stays_inside_its_segment():
    from memgpt_dist.model.gpt import SegmentConv

    conv = SegmentConv(channels=3, taps=4, segment_len=N)
    conv.reset_parameters()
    x = torch.randn(2, 3 * N + 2, 3)
    torch.testing.assert_close(conv(x), x)
    with torch.no_grad():
        conv.weight.normal_()
    changed = x.clone()
    changed[:, N - 1] += 1.0  # last token of segment 0
    diff = (conv(changed) - conv(x)).abs().amax(dim=(0, 2))  # (T,)
    assert diff[N - 1] > 0 and diff[N:].max() == 0  # seen by itself, never by segment 1
    changed = x.clone()
    changed[:, N] += 1.0  # first token of segment 1: seen by the next taps - 1 tokens only
    diff = (conv(changed) - conv(x)).abs().amax(dim=(0, 2))
    assert (diff[N:N + 4] > 0).all() and diff[N + 4:].max() == 0 and diff[:N].max() == 0


def test_segment_conv_equals_a_depthwise_conv1d_per_segment():
    """The multiply-adds of SegmentConv against torch's depthwise conv1d over each segment with
    taps - 1 zeros in front: values and gradients (input and weight), with a ragged last segment."""
    import torch.nn.functional as F

    from memgpt_dist.model.gpt import SegmentConv

    g = torch.Generator().manual_seed(0)
    C, taps, B, T = 6, 4, 2, 3 * N + 3
    conv = SegmentConv(channels=C, taps=taps, segment_len=N)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(C, 1, taps, generator=g))
    x = torch.randn(B, T, C, generator=g)
    weight = conv.weight.detach().clone().requires_grad_()
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()

    def reference(t):
        parts = [F.conv1d(F.pad(seg.transpose(1, 2), (taps - 1, 0)), weight, groups=C).transpose(1, 2)
                 for seg in t.split(N, dim=1)]  # (B, n, C) each
        return torch.cat(parts, dim=1)

    ours, ref = conv(x_ours), reference(x_ref)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    upstream = torch.randn(B, T, C, generator=g)
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(conv.weight.grad, weight.grad, rtol=1e-5, atol=1e-5)


def test_short_convolutions_are_not_weight_decayed(make_model):
    from memgpt_dist.config import OptimConfig
    from memgpt_dist.parallel.engine import param_groups

    model = make_model()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: [names[id(p)] for p in g["params"]] for g in param_groups(model, OptimConfig())}
    assert any(n.endswith("mem_k_conv.weight") for n in groups["no_decay"])
    assert not any("_conv." in n for n in groups["decay"])
