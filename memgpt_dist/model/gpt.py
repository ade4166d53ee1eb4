"""GPT decoder whose attention is causal within a segment, plus an optional per-head memory.

A sequence of T tokens is cut into segments of N = `segment_len` tokens (the last one may be
shorter). Attention never crosses a segment boundary and positions restart at 0 in every segment,
so the only path from one segment to a later one is the associative memory of `memory.py`, read
and written by every attention head. The memory's q, k, v pass through a short causal convolution
inside the segment (`memory.conv` taps): the key a token writes can then hold the token before it,
so a fact "key value" is stored under the key where the value is read. Without it the model only
learns which values a document held, not which key each belonged to (multi-query recall stalls at
~38%, the accuracy of guessing among the values not yet asked for; with 4 taps it reaches ~100%). With `memory.enabled: false` the model has no memory
parameters at all and is the plain segment-local GPT (the baseline). `memory.layers` puts the memory
in some blocks only (`MemoryConfig.has_memory`): the others are built as with the memory disabled
(no `mem_*` parameters) and carry no memory, their entry of the model's state is None (or, with
`model.attention: window`, a `LayerState` holding only the window's keys and values).

Written to be parallelised from outside (torchtitan style): separate q/k/v/o projections that
tensor-parallel rules can match by name, `view(B, T, -1, head_dim)` so a rank holding a subset of
the heads works unchanged, blocks in a ModuleDict keyed by index, a top-level forward that only
loops, `init_weights()` apart from `__init__` and no devices in constructors.
Imports torch only: no torch.distributed, no deepspeed.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from memgpt_dist.config import MemoryConfig, ModelConfig
from memgpt_dist.model.decode import DecodeCache, LayerCache, empty_cache
from memgpt_dist.model.memory import LayerState, MemoryState, delta_scan, memory_read, memory_scan
from memgpt_dist.model.window import WindowCache, gqa_kwargs, shift_keys, window_attention, with_window

# A context factory: inside `materialize(module)` the module's own parameters are whole
Materialize = Callable[[nn.Module], ContextManager]


def _whole(module: nn.Module) -> ContextManager:
    return contextlib.nullcontext()

SCANS = {"head": memory_scan, "delta": delta_scan}  # memory.kind -> scan over segments

GATE_SUFFIX = "mem_beta"  # name suffix of the per-head mix-gate logits (own optimizer group)


class ModelOutput(NamedTuple):
    """What `GPT.forward` returns; a NamedTuple so DeepSpeed ZeRO-3 can rebuild it."""

    logits: Optional[Tensor]  # (B, T, vocab_size); None when a loss_fn computed the loss instead
    state: Optional[MemoryState]  # memory after the last segment; None when memory is disabled
    stats: dict[str, Tensor]  # detached scalars for logging; empty when memory is disabled
    loss_sum: Optional[Tensor] = None  # loss_fn(final hidden, LM head weight, labels), when one was given


# (final normed hidden (B, T, C), LM head weight (vocab, C), labels (B, T)) -> summed loss: a fused
# linear cross-entropy (memgpt_dist/perf/kernels.py) that never materialises the logits
LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]


class Rope(NamedTuple):
    """cos and sin of the rotary angles, each (T, 1, head_dim // 2), shared by all layers
    ((B, m, 1, head_dim // 2) in incremental decoding, where rows stand at different positions)."""

    cos: Tensor
    sin: Tensor


def build_rope(positions: Tensor, head_dim: int, theta: float) -> Rope:
    """Rotary tables for `positions` (T,) or (B, m), in fp32 whatever the activation dtype."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float().unsqueeze(-1) * inv_freq  # (..., hd / 2)
    return Rope(cos=angles.cos().unsqueeze(-2), sin=angles.sin().unsqueeze(-2))  # (..., 1, hd / 2) each


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """Rotate the two halves of each head as (real, imaginary) pairs. x: (B, T, H, hd)."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, T, H, hd / 2) each
    rotated = torch.cat([x1 * rope.cos - x2 * rope.sin, x1 * rope.sin + x2 * rope.cos], dim=-1)
    return rotated.to(x.dtype)


def _block_causal(q: Tensor, k: Tensor, v: Tensor, n: int, dropout_p: float) -> Tensor:
    """Causal attention inside consecutive blocks of exactly n tokens. q: (B, L, H, hd), k, v:
    (B, L, Hkv, hd) with Hkv dividing H (grouped-query attention) -> (B, L, H, hd)."""
    B, L, H, hd = q.shape
    q, k, v = (t.reshape(B * (L // n), n, -1, hd).transpose(1, 2) for t in (q, k, v))  # (B*S, H or Hkv, n, hd)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True,
                                         **gqa_kwargs(q, k))  # (B*S, H, n, hd)
    return out.transpose(1, 2).reshape(B, L, H, hd)  # (B, L, H, hd)


def full_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> Tensor:
    """`model.attention: full`: causal attention over all T tokens, one block of the whole sample.
    q: (B, T, H, hd), k, v: (B, T, Hkv, hd) -> (B, T, H, hd)."""
    return _block_causal(q, k, v, q.shape[1], dropout_p)


def segment_local_attention(q: Tensor, k: Tensor, v: Tensor, segment_len: int, dropout_p: float) -> Tensor:
    """Block-diagonal causal attention: each segment attends only to itself.

    Full segments are batched into one SDPA call; a shorter last segment (generation) gets a
    second call. q, k, v: (B, T, H, hd) -> (B, T, H, hd).
    """
    T = q.shape[1]
    full = (T // segment_len) * segment_len
    parts = []
    if full:
        parts.append(_block_causal(q[:, :full], k[:, :full], v[:, :full], segment_len, dropout_p))
    if full < T:
        parts.append(_block_causal(q[:, full:], k[:, full:], v[:, full:], T - full, dropout_p))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


class SegmentConv(nn.Module):
    """Depthwise causal convolution over the tokens of each segment (zero history at a segment
    start, so the memory state stays the only thing that crosses segments). Starts as the
    identity: the last tap (the token itself) is 1, the taps on earlier tokens 0."""

    def __init__(self, channels: int, taps: int, segment_len: int):
        super().__init__()
        self.taps = taps
        self.segment_len = segment_len
        self.weight = nn.Parameter(torch.empty(channels, 1, taps))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        nn.init.ones_(self.weight[:, :, -1])

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        n = self.segment_len
        S = -(-T // n)
        if S * n != T:
            x = F.pad(x, (0, 0, 0, S * n - T))  # (B, S * n, C)
        # one copy: each segment's zero history padded on in the (tokens, channels) layout
        x = F.pad(x.view(B * S, n, C), (0, 0, self.taps - 1, 0))  # (B*S, taps - 1 + n, C)
        # taps lead: each tap's (C,) weights contiguous. A strided (C,) operand of the multiply-adds
        # below (a column of the (C, taps) weight) made each 4-7x slower on CPU than this
        w = self.weight.to(x.dtype).view(C, self.taps).t().contiguous()  # (taps, C)
        # a multiply-add per tap over shifted views: forward and backward 1.3-2x faster on CPU
        # than a depthwise conv1d (whose backward is a slow path), the same sum of taps
        y = x[:, self.taps - 1:] * w[-1]  # (B*S, n, C)
        for t in range(self.taps - 1):
            y = torch.addcmul(y, x[:, t:t + n], w[t])
        y = y.reshape(B, S * n, C)  # (B, S * n, C)
        return y if S * n == T else y[:, :T]


class Attention(nn.Module):
    """Segment-local multi-head attention; with memory, each head mixes in its memory read.
    `layer`: the block's index, which `mem.has_memory` asks whether this block has the memory."""

    def __init__(self, cfg: ModelConfig, mem: MemoryConfig, layer: int):
        super().__init__()
        d, d_kv = cfg.n_embd, cfg.kv_heads * cfg.head_dim
        self.head_dim = cfg.head_dim
        self.segment_len = cfg.segment_len
        self.dropout = cfg.dropout
        self.attention = cfg.attention  # 'segment' | 'window' | 'full' (window.py)
        self.rope_theta = cfg.rope_theta if cfg.position == "rope" else None
        self.q_proj = nn.Linear(d, d, bias=cfg.bias)
        self.k_proj = nn.Linear(d, d_kv, bias=cfg.bias)  # grouped-query attention: Hkv heads
        self.v_proj = nn.Linear(d, d_kv, bias=cfg.bias)
        self.o_proj = nn.Linear(d, d, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.mem = mem if mem.has_memory(layer) else None
        if self.mem is not None:
            self.mem_q_proj = nn.Linear(d, d, bias=False)
            self.mem_k_proj = nn.Linear(d, d, bias=False)
            self.mem_v_proj = nn.Linear(d, d, bias=False)
            self.mem_write_gate = nn.Linear(d, cfg.n_head)  # b_t per token and head
            self.mem_beta = nn.Parameter(torch.empty(cfg.n_head))  # g_h = sigmoid(mem_beta_h)
            if mem.decay:
                self.mem_decay_gate = nn.Linear(d, cfg.n_head)  # alpha_t per token and head (forgetting)
            if mem.conv >= 2:
                self.mem_q_conv, self.mem_k_conv, self.mem_v_conv = (
                    SegmentConv(d, mem.conv, cfg.segment_len) for _ in range(3))

    def forward(self, x: Tensor, rope: Optional[Rope], state: Optional[LayerState], reset: Optional[Tensor],
                read_memory: bool) -> tuple[Tensor, Optional[LayerState], Optional[Tensor]]:
        """x: (B, T, C) -> (output (B, T, C), layer state after the last segment, memory read (B, T, H, hd))."""
        B, T, _ = x.shape
        q, k, v = self._qkv(x, rope)  # (B, T, H, hd) each
        p = self.dropout if self.training else 0.0
        y, window = self._attend(q, k, v, state, reset, p)  # (B, T, H, hd), the window for the next forward
        read = None
        if self.mem is not None:
            read, state = self._read_write_memory(x, state, reset, read_memory)
            y = self._mix(y, read)
        else:
            state = None  # no memory here: nothing carried but (below) the window
        if self.attention == "window":
            state = with_window(state, window)
        y = y.reshape(B, T, -1)  # (B, T, H * hd)
        return self.resid_dropout(self.o_proj(y)), state, read

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, state: Optional[LayerState], reset: Optional[Tensor],
                p: float) -> tuple[Tensor, Optional[WindowCache]]:
        """`model.attention` over the rank's heads: (B, T, H, hd), and the window cache the next
        forward starts from ('window' only; None otherwise)."""
        if self.attention == "full":
            return full_attention(q, k, v, p), None
        if self.attention == "window":
            cache = None if state is None or state.k is None else WindowCache(state.k, state.v, state.kv_valid)
            return window_attention(q, k, v, self.segment_len, cache, reset, self.rope_theta, p)
        return segment_local_attention(q, k, v, self.segment_len, p), None

    def _qkv(self, x: Tensor, rope: Optional[Rope]) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys (rotated) and values of the rank's heads: (B, T, C) -> (B, T, H, hd) and
        (B, T, Hkv, hd) twice (Hkv = H without grouped-query attention)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim)  # (B, T, H, hd)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)  # (B, T, Hkv, hd)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)  # (B, T, Hkv, hd)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v

    # -------------------------------------------------------------- incremental decoding
    def step(self, x: Tensor, rope: Optional[Rope], slots: Tensor, at: Tensor, lc: LayerCache) -> Tensor:
        """m new tokens of each row's open segment at `slots` (B, m): they attend to the cached
        keys at or before them (the segment's; with 'window' also the previous segment's; with
        'full' every token's, cached at positions `at` (B, m) in the row) and read the memory
        before the segment. x: (B, m, C) -> (B, m, C)."""
        B, m, _ = x.shape
        q, k, v = self._qkv(x, rope)  # (B, m, H, hd), (B, m, Hkv, hd) twice
        where = at if self.attention == "full" else slots  # (B, m): the new keys' places in lc.k
        lc.reserve(int(where.max()) + 1)
        index = where.view(B, m, 1, 1).expand_as(k)
        lc.k.scatter_(1, index, k)
        lc.v.scatter_(1, index, v)
        keys, values = lc.k, lc.v  # (B, L, Hkv, hd)
        visible = torch.arange(keys.shape[1], device=x.device).view(1, 1, -1) <= where.unsqueeze(-1)  # (B, m, L)
        if self.attention == "window":  # the previous segment first, as window_attention orders them
            keys, values = torch.cat([lc.prev_k, keys], dim=1), torch.cat([lc.prev_v, values], dim=1)
            visible = torch.cat([lc.prev_valid.unsqueeze(1).expand(B, m, -1), visible], dim=-1)  # (B, m, N + L)
        q, ck, cv = q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)  # (B, H or Hkv, m or L, hd)
        y = F.scaled_dot_product_attention(q, ck, cv, attn_mask=visible.unsqueeze(1),
                                           **gqa_kwargs(q, ck)).transpose(1, 2)  # (B, m, H, hd)
        if self.mem is not None:
            y = self._mix(y, self._step_memory(x, slots, lc))
        return self.o_proj(y.reshape(B, m, -1))

    def _mix(self, y: Tensor, read: Tensor) -> Tensor:
        g = torch.sigmoid(self.mem_beta).view(1, 1, -1, 1)  # (1, 1, H, 1)
        return g * read.to(y.dtype) + (1 - g) * y

    def _step_memory(self, x: Tensor, slots: Tensor, lc: LayerCache) -> Tensor:
        """Keep the new tokens' memory inputs for the segment's write; their read (B, m, H, hd)."""
        B, m, C = x.shape
        q, k, v = self.mem_q_proj(x), self.mem_k_proj(x), self.mem_v_proj(x)  # (B, m, C) each
        if self.mem.conv >= 2:
            q, k, v = self._conv_step(torch.cat([q, k, v], dim=-1), slots, lc)
        lc.mem_k.scatter_(1, slots.unsqueeze(-1).expand(B, m, C), k)
        lc.mem_v.scatter_(1, slots.unsqueeze(-1).expand(B, m, C), v)
        write_logit = self.mem_write_gate(x)  # (B, m, H)
        lc.write_logit.scatter_(1, slots.unsqueeze(-1).expand_as(write_logit), write_logit)
        if self.mem.decay:
            lc.decay_logit.scatter_(1, slots.unsqueeze(-1).expand_as(write_logit), self.mem_decay_gate(x))
        return memory_read(q.view(B, m, -1, self.head_dim), lc.state, self.mem.kind, self.mem.nu, self.mem.eps)

    def _conv_step(self, mem_in: Tensor, slots: Tensor, lc: LayerCache) -> tuple[Tensor, Tensor, Tensor]:
        """The three short convolutions at the m new tokens, from the cached segment inputs. One
        multiply-add over a gathered window: a conv1d call per projection per token costs more
        than the whole layer's matmuls at decoding sizes (benchmarks/generate_throughput.py)."""
        B, m, C3 = mem_in.shape
        lc.mem_in.scatter_(1, slots.unsqueeze(-1).expand(B, m, C3), mem_in)
        taps = self.mem.conv
        # window positions: taps - 1 before the first new token, then the new ones; those before the
        # segment start read zeros (the zero history of SegmentConv.forward)
        pos = slots[:, :1] - (taps - 1) + torch.arange(taps - 1 + m, device=slots.device)  # (B, taps - 1 + m)
        window = lc.mem_in.gather(1, pos.clamp(min=0).unsqueeze(-1).expand(B, taps - 1 + m, C3))
        window = window * (pos >= 0).unsqueeze(-1).to(window.dtype)  # (B, taps - 1 + m, 3C)
        weight = torch.cat([c.weight for c in (self.mem_q_conv, self.mem_k_conv, self.mem_v_conv)]).view(C3, taps)
        y = (window.unfold(1, taps, 1) * weight.to(window.dtype)).sum(-1)  # (B, m, 3C, taps) -> (B, m, 3C)
        return y.chunk(3, dim=-1)

    def close_segment(self, rows: Tensor, lc: LayerCache) -> None:
        """The open segment of `rows` is full: write it into their memory with the training scan,
        and (window) make its keys and values the previous segment of the next one."""
        if self.attention == "window":
            k = lc.k[rows]  # (r, N, Hkv, hd), rotated at in-segment positions
            lc.prev_k[rows] = shift_keys(k, self.segment_len, self.rope_theta) if self.rope_theta is not None else k
            lc.prev_v[rows] = lc.v[rows]
            lc.prev_valid[rows] = True
        if self.mem is None:
            return
        k, v = (t[rows].view(len(rows), self.segment_len, -1, self.head_dim) for t in (lc.mem_k, lc.mem_v))
        state = LayerState(lc.state.A[rows], lc.state.z[rows])
        decay = lc.decay_logit[rows] if self.mem.decay else None
        # q only shapes the scan's reads, which are not needed here
        _, new = SCANS[self.mem.kind](k, k, v, lc.write_logit[rows], state, None, self.segment_len, self.mem.nu,
                                      self.mem.eps, decay)
        lc.state.A[rows] = new.A
        lc.state.z[rows] = new.z

    def _read_write_memory(self, x: Tensor, state: Optional[LayerState], reset: Optional[Tensor],
                           read_memory: bool) -> tuple[Tensor, LayerState]:
        B, T, _ = x.shape
        q, k, v = self.mem_q_proj(x), self.mem_k_proj(x), self.mem_v_proj(x)  # (B, T, C) each
        if self.mem.conv >= 2:
            q, k, v = self.mem_q_conv(q), self.mem_k_conv(k), self.mem_v_conv(v)
        q, k, v = (t.view(B, T, -1, self.head_dim) for t in (q, k, v))  # (B, T, H, hd) each
        scan = SCANS[self.mem.kind]
        decay = self.mem_decay_gate(x) if self.mem.decay else None  # (B, T, H) forgetting-gate logits
        read, state = scan(q, k, v, self.mem_write_gate(x), state, reset, self.segment_len, self.mem.nu, self.mem.eps,
                           decay)
        if not read_memory:
            # ablation: every segment sees what the first segment of a document sees (a zero read)
            read = torch.zeros_like(read)
        return read, state


class MLP(nn.Module):
    """Position-wise feed-forward: down(gelu(up(x))) (`model.mlp` gelu / gelu_tanh) or SwiGLU
    down(silu(gate(x)) * up(x)) (Llama); hidden width `ModelConfig.mlp_hidden_size`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.mlp_hidden_size
        self.kind = cfg.mlp
        if self.kind == "swiglu":
            self.gate_proj = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "swiglu":
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = F.gelu(self.up_proj(x), approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return self.dropout(self.down_proj(h))


def build_norm(cfg: ModelConfig) -> nn.Module:
    """`model.norm`: LayerNorm (with a bias when model.bias) or RMSNorm (a gain only)."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


class LMHead(nn.Module):
    """The untied LM head (`model.tie_embeddings: false`): a (vocab, C) matrix. Not an nn.Linear,
    so tensor parallelism leaves it replicated like the embedding (the logits are not split)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.n_embd))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)). Block `layer` has the
    memory where `mem.has_memory(layer)`."""

    def __init__(self, cfg: ModelConfig, mem: MemoryConfig, layer: int):
        super().__init__()
        self.ln1 = build_norm(cfg)
        self.attn = Attention(cfg, mem, layer)
        self.ln2 = build_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, rope: Optional[Rope], state: Optional[LayerState], reset: Optional[Tensor],
                read_memory: bool) -> tuple[Tensor, Optional[LayerState], dict[str, Tensor]]:
        a, state, read = self.attn(self.ln1(x), rope, state, reset, read_memory)
        x = x + a
        x = x + self.mlp(self.ln2(x))
        return x, state, self._stats(read)

    def step(self, x: Tensor, rope: Optional[Rope], slots: Tensor, at: Tensor, lc: LayerCache) -> Tensor:
        """`forward` for m new tokens of the open segment (incremental decoding)."""
        x = x + self.attn.step(self.ln1(x), rope, slots, at, lc)
        return x + self.mlp(self.ln2(x))

    @torch.no_grad()
    def _stats(self, read: Optional[Tensor]) -> dict[str, Tensor]:
        if read is None:
            return {}
        return {"mem_gate": torch.sigmoid(self.attn.mem_beta.detach().float()).mean(),
                "mem_read_norm": read.detach().flatten(2).norm(dim=-1).mean()}  # L2 over all heads of a token


# The pieces of `GPT.forward`, as functions of the modules they use, so that a pipeline stage
# (which holds only some of the modules) runs exactly this code (parallel/pipeline.py).
def segment_positions(T: int, segment_len: int, device: torch.device) -> Tensor:
    """(T,): positions restart at 0 in every segment."""
    return torch.arange(T, device=device) % segment_len


def embed_tokens(wte: nn.Embedding, wpe: Optional[nn.Embedding], drop: nn.Dropout, input_ids: Tensor,
                 segment_len: int) -> Tensor:
    """Token (+ learned position) embedding and dropout: (B, T) -> (B, T, C)."""
    x = wte(input_ids)  # (B, T, C)
    if wpe is not None:
        x = x + wpe(segment_positions(input_ids.shape[1], segment_len, input_ids.device))
    return drop(x)


def rope_tables(cfg: ModelConfig, T: int, device: torch.device) -> Optional[Rope]:
    """The rotary tables every layer uses for T tokens (None with learned positions)."""
    if cfg.position != "rope":
        return None
    # full attention reads the sample as one sequence: continuous positions
    full = cfg.attention == "full"
    positions = torch.arange(T, device=device) if full else segment_positions(T, cfg.segment_len, device)
    return build_rope(positions, cfg.head_dim, cfg.rope_theta)


def lm_head(ln_f: nn.Module, head: nn.Module, x: Tensor) -> Tensor:
    """Final norm and the LM head: `head` is the token embedding (tied) or the `LMHead`, either
    holding a (vocab, C) weight. (B, T, C) -> (B, T, vocab)."""
    return F.linear(ln_f(x), head.weight)


class GPT(nn.Module):
    """Decoder-only LM with segment-local attention and (optionally) per-head memory."""

    def __init__(self, cfg: ModelConfig, mem: MemoryConfig):
        super().__init__()
        self.cfg = cfg
        self.mem_cfg = mem
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.segment_len, cfg.n_embd) if cfg.position == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleDict({str(i): Block(cfg, mem, i) for i in range(cfg.n_layer)})
        self.ln_f = build_norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else LMHead(cfg)

    @property
    def head(self) -> nn.Module:
        """What the logits are computed with: the token embedding (tied) or the `LMHead`."""
        return self.wte if self.lm_head is None else self.lm_head

    @torch.no_grad()
    def init_weights(self, materialize: Optional[Materialize] = None) -> None:
        """GPT-2 style init; output projections scaled by 1/sqrt(2 * n_layer) so the residual
        stream's variance does not grow with depth; memory gates from `MemoryConfig`.

        `materialize(module)`: a context in which `module`'s own parameters are whole (a model
        built partitioned, ZeRO-3's `zero.Init`, passes DeepSpeed's `GatheredParameters`); the
        modules are initialised one at a time, in the same order and with the same random draws
        as an unpartitioned model, so both get the same weights.

        Deterministic given the seed and the config: the draws are taken from the global RNG in
        module order (block 0 to n_layer - 1, each block's modules in their construction order),
        so with `memory.layers` selecting every block the weights are those of a model without
        the option, bit for bit; a block left without memory takes no draws for it, so the blocks
        after it start at another point of the stream than they would with memory everywhere."""
        whole = materialize or _whole
        std = self.cfg.init_std
        for name, module in self.named_modules():
            with whole(module):
                if isinstance(module, (nn.Linear, nn.Embedding, LMHead)):
                    is_output = name.endswith(("attn.o_proj", "mlp.down_proj"))
                    nn.init.normal_(module.weight, mean=0.0,
                                    std=std / math.sqrt(2 * self.cfg.n_layer) if is_output else std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
                if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                    module.reset_parameters()
        # a second pass: named_modules() visits an Attention before its mem_write_gate child
        for block in self.blocks.values():
            attn = block.attn
            if attn.mem is None:
                continue
            with whole(attn.mem_write_gate):
                nn.init.constant_(attn.mem_write_gate.bias, attn.mem.write_gate_bias_init)
            with whole(attn):
                nn.init.constant_(attn.mem_beta, attn.mem.gate_init)
            if attn.mem.decay:  # alpha_t starts near 1: forgetting is learned, not imposed
                with whole(attn.mem_decay_gate):
                    nn.init.constant_(attn.mem_decay_gate.bias, attn.mem.decay_bias_init)
            for name in ("mem_q_conv", "mem_k_conv", "mem_v_conv"):
                if hasattr(attn, name):
                    with whole(getattr(attn, name)):
                        getattr(attn, name).reset_parameters()

    def forward(self, input_ids: Tensor, state: Optional[MemoryState] = None, reset: Optional[Tensor] = None,
                read_memory: bool = True, labels: Optional[Tensor] = None,
                loss_fn: Optional[LossFn] = None) -> ModelOutput:
        """input_ids: (B, T); state: memory before the first segment (None: document start);
        reset: (B, ceil(T / N)) bool, True where segment s starts a new document (the memory is
        zeroed before s reads it); read_memory=False zeroes every memory read (ablation; writes
        still happen). With `loss_fn` (and labels (B, T)) the output holds
        loss_fn(final hidden, head weight, labels) instead of the logits: computed here, where
        ZeRO-3 has gathered the head weight, so a fused kernel sees the whole of it."""
        self._check_inputs(input_ids, state, reset)
        x = embed_tokens(self.wte, self.wpe, self.drop, input_ids, self.cfg.segment_len)  # (B, T, C)
        rope = rope_tables(self.cfg, input_ids.shape[1], input_ids.device)
        layer_states = state if state is not None else (None,) * len(self.blocks)
        new_states, stats = [], {}
        for i, block in self.blocks.items():
            x, layer_state, block_stats = block(x, rope, layer_states[int(i)], reset, read_memory)
            new_states.append(layer_state)
            stats.update({f"{key}/layer{i}": value for key, value in block_stats.items()})
        carried = tuple(new_states) if self.carries_state else None
        if loss_fn is not None:
            if labels is None:
                raise ValueError("GPT.forward: loss_fn needs labels")
            return ModelOutput(None, carried, stats, loss_fn(self.ln_f(x), self.head.weight, labels))
        return ModelOutput(lm_head(self.ln_f, self.head, x), carried, stats)  # logits (B, T, vocab)

    # -------------------------------------------------------------- incremental decoding
    def prefill(self, input_ids: Tensor) -> tuple[Tensor, DecodeCache]:
        """Read prompts (B, T) of one length as training does: the whole segments before the one
        holding the last token by `forward`, the rest (1..N tokens) into the open segment ('full'
        attention: every segment through `step`, which keeps the keys of all of them).
        Returns the logits (B, T, vocab) and the cache to `step` from."""
        B, T = input_ids.shape
        N = self.cfg.segment_len
        done = 0 if self.cfg.attention == "full" else ((T - 1) // N) * N  # tokens read by forward
        out = self(input_ids[:, :done]) if done else None
        cfg = self.cfg
        cache = empty_cache(cfg.n_layer, B, cfg.n_head, cfg.kv_heads, cfg.n_embd, N, self.mem_cfg.nu,
                            out.state if out is not None else None, cfg.rope_theta if cfg.position == "rope" else None,
                            self.wte.weight.device, self.wte.weight.dtype, self.memory_layers)
        cache.pos += done
        logits = [out.logits] if out is not None else []
        logits += [self.step(input_ids[:, t:t + N], cache) for t in range(done, T, N)]
        return torch.cat(logits, dim=1), cache

    def step(self, input_ids: Tensor, cache: DecodeCache) -> Tensor:
        """m tokens (B, m) into each row's open segment, which none may overrun; a segment whose
        last token this reads is written to memory. Returns the logits (B, m, vocab)."""
        B, m = input_ids.shape
        N = self.cfg.segment_len
        if int(cache.fill.max()) + m > N:
            raise ValueError(f"{m} tokens overrun an open segment holding {int(cache.fill.max())} of {N}; step fewer")
        new = torch.arange(m, device=input_ids.device)
        slots = cache.fill.unsqueeze(1) + new  # (B, m): positions in segments
        at = cache.pos.unsqueeze(1) + new  # (B, m): positions in the text (full attention's)
        x = self.wte(input_ids)  # (B, m, C)
        if self.wpe is not None:
            x = x + self.wpe(slots)
        rope = None
        if self.cfg.position == "rope":
            rope = build_rope(at if self.cfg.attention == "full" else slots, self.cfg.head_dim, self.cfg.rope_theta)
        for block, lc in zip(self.blocks.values(), cache.layers):
            x = block.step(x, rope, slots, at, lc)
        cache.fill = cache.fill + m
        cache.pos = cache.pos + m
        rows = (cache.fill == N).nonzero().flatten()
        if len(rows):
            for block, lc in zip(self.blocks.values(), cache.layers):
                block.attn.close_segment(rows, lc)
            cache.fill[rows] = 0
        return lm_head(self.ln_f, self.head, x)

    @property
    def memory_layers(self) -> tuple[int, ...]:
        """The blocks that have the memory (`MemoryConfig.memory_layers`; empty when disabled)."""
        return self.mem_cfg.memory_layers(self.cfg.n_layer)

    @property
    def carries_state(self) -> bool:
        """Whether a forward returns a state for the next one: the memory and/or the window cache."""
        return self.mem_cfg.enabled or self.cfg.attention == "window"

    def _check_inputs(self, input_ids: Tensor, state: Optional[MemoryState], reset: Optional[Tensor]) -> None:
        B, T = input_ids.shape
        n_segments = -(-T // self.cfg.segment_len)
        if reset is not None and tuple(reset.shape) != (B, n_segments):
            raise ValueError(f"reset has shape {tuple(reset.shape)}; expected (batch, segments) = ({B}, {n_segments}) "
                             f"for {T} tokens with model.segment_len={self.cfg.segment_len}")
        if state is not None and not self.carries_state:
            raise ValueError("a state was passed but the model carries none (memory.enabled is false and "
                             "model.attention is not 'window'); pass state=None")
        if state is not None and len(state) != len(self.blocks):
            raise ValueError(f"state has {len(state)} layers; the model has model.n_layer={len(self.blocks)} (a state "
                             f"read back from a dict: state_from_dict(tensors, n_layer={len(self.blocks)}))")
        if state is not None:
            have = self.memory_layers
            stray = [i for i, s in enumerate(state) if s is not None and s.A is not None and i not in have]
            if stray:
                raise ValueError(f"state holds a memory for block(s) {stray}, which have none (memory.layers="
                                 f"{self.mem_cfg.layers!r}); pass None for those layers")

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameter count (a tied LM head is counted once, as the token embedding; an untied one
        is not an embedding)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
        return n

    def memory_gate_param_names(self) -> list[str]:
        """Names of the per-head mix-gate logits (they end in `GATE_SUFFIX`)."""
        return [name for name, _ in self.named_parameters() if name.endswith(GATE_SUFFIX)]
