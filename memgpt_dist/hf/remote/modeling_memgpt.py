"""An exported memgpt-dist model for transformers (remote code; imports torch and transformers only).

The math is a copy of `memgpt_dist.model` (gpt.py, memory.py), kept equal to it by
tests/hf/test_export.py: attention is causal within a segment of `segment_len` tokens
(`attention: segment`), also over the previous segment's keys and values (`window`), or over the
whole text with continuous positions (`full`); positions restart in every segment otherwise, and
every head mixes in a read of its associative memory (DPFP features, gated delta write, with
`mem_decay` a forgetting gate), which carries what earlier segments held.

Generation carries everything in a `MemGPTCache` passed as `cache` / `past_key_values` (the way
Qwen3-Next keeps recurrent states beside its key/value cache): per layer the memory before the open
segment, the open segment's keys, values and memory inputs (`full`: every token's keys and values)
and, for `window`, the previous segment's, so a new token costs O(segment).
A prompt is read as in training: its whole segments by the segment-parallel forward, the rest into
the open segment; a segment is written to memory when its last token has been read. Rows of a
left-padded batch are segmented from their own first token, so padding changes nothing.
"""
from __future__ import annotations

from dataclasses import fields
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_memgpt import MemGPTConfig


# ---------------------------------------------------------------------------------------- memory
class LayerState(NamedTuple):
    """Memory of one layer. A: (B, H, dk, hd) associations, z: (B, H, dk) normaliser (fp32)."""

    A: Tensor
    z: Tensor


def dpfp(x: Tensor, nu: int) -> Tensor:
    """DPFP features of the last dimension: (..., hd) -> (..., 2 * nu * hd)."""
    r = torch.cat([F.relu(x), F.relu(-x)], dim=-1)
    return torch.cat([r * r.roll(shifts=j, dims=-1) for j in range(1, nu + 1)], dim=-1)


def delta_features(x: Tensor, nu: int) -> Tensor:
    """Unit-length keys of the exact delta rule (DPFP features, or the raw head for nu = 0)."""
    phi = dpfp(x, nu) if nu > 0 else x
    return F.normalize(phi, dim=-1)


def feature_dim(head_dim: int, nu: int) -> int:
    return 2 * nu * head_dim if nu > 0 else head_dim


def _segments(x: Tensor, n: int, S: int) -> Tensor:
    """(B, T, H, c) -> (S, B, H, n, c) in fp32, zero-padded to S * n tokens."""
    B, T, H, c = x.shape
    x = F.pad(x.float(), (0, 0, 0, 0, 0, S * n - T))
    return x.view(B, S, n, H, c).permute(1, 0, 3, 2, 4).contiguous()


def _segment_decays(decay_logit: Optional[Tensor], n: int, S: int) -> Optional[Tensor]:
    """Cumulative log-alphas inside each segment, (S, B, H, n, 1) (None: no decay)."""
    if decay_logit is None:
        return None
    return _segments(F.logsigmoid(decay_logit.float()).unsqueeze(-1), n, S).cumsum(dim=3)


def memory_scan(q, k, v, write_logit, state, n, nu, eps, decay_logit=None):
    """memgpt_dist.model.memory.memory_scan without resets: reads (B, T, H, hd), state after.
    z rides as an extra column of A: one matmul reads q and retrieves k, one more writes."""
    B, T, H, hd = q.shape
    S = -(-T // n)
    with torch.autocast(device_type=q.device.type, enabled=False):
        qk = torch.stack([_segments(q, n, S), _segments(k, n, S)], dim=3)  # (S, B, H, 2, n, hd)
        phi = dpfp(qk.flatten(3, 4), nu)  # (S, B, H, 2n, dk): rows [q of s; k of s]
        b = _segments(torch.sigmoid(write_logit.float()).unsqueeze(-1), n, S)  # (S, B, H, n, 1)
        v_aug = F.pad(_segments(v, n, S), (0, 1), value=1.0)  # (S, B, H, n, hd + 1): ones write z
        A = None if state is None else torch.cat([state.A.float(), state.z.float().unsqueeze(-1)], dim=-1)
        decays = _segment_decays(decay_logit, n, S)
        reads = []
        for s, (phi_s, b_s, v_aug_s) in enumerate(zip(phi.unbind(0), b.unbind(0), v_aug.unbind(0))):
            phi_k = phi_s[:, :, n:]  # (B, H, n, dk)
            if decays is not None:  # later tokens' decay on each write, the whole segment's on A
                cum = decays[s]
                b_s = b_s * torch.exp(cum[:, :, -1:] - cum)
            if A is None:  # empty memory: reads are exactly 0
                reads.append(phi.new_zeros(B, H, n, hd))
                A = phi_k.transpose(-1, -2) @ (b_s * v_aug_s)  # (B, H, dk, hd + 1)
                continue
            num, den = (phi_s @ A).split([hd, 1], dim=-1)  # (B, H, 2n, hd), (B, H, 2n, 1)
            read_s, retrieved = (num / (den + eps)).split(n, dim=2)
            reads.append(read_s)
            delta = b_s * (v_aug_s - F.pad(retrieved, (0, 1)))  # (B, H, n, hd + 1)
            if decays is not None:
                A = torch.exp(decays[s][:, :, -1:]) * A
            A = A + phi_k.transpose(-1, -2) @ delta
        read = torch.cat(reads, dim=2)[:, :, :T].transpose(1, 2)  # (B, T, H, hd)
    return read, LayerState(A[..., :hd].contiguous(), A[..., hd].contiguous())


def delta_scan(q, k, v, write_logit, state, n, nu, eps, decay_logit=None):
    """memgpt_dist.model.memory.delta_scan without resets."""
    B, T, H, hd = q.shape
    S = -(-T // n)
    with torch.autocast(device_type=q.device.type, enabled=False):
        qk = torch.stack([_segments(q, n, S), _segments(k, n, S)], dim=3)
        phi = delta_features(qk.flatten(3, 4), nu)
        b = _segments(torch.sigmoid(write_logit.float()).unsqueeze(-1), n, S)
        vs = _segments(v, n, S)
        dk = phi.shape[-1]
        A = phi.new_zeros(B, H, dk, hd) if state is None else state.A
        z = phi.new_zeros(B, H, dk) if state is None else state.z
        strictly_lower = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1)
        eye = torch.eye(n, device=q.device)
        decays = _segment_decays(decay_logit, n, S)
        reads = []
        for s, (phi_s, b_s, v_s) in enumerate(zip(phi.unbind(0), b.unbind(0), vs.unbind(0))):
            phi_q, phi_k = phi_s.split(n, dim=2)
            reads.append(phi_q @ A)
            gram = b_s * (phi_k @ phi_k.transpose(-1, -2))
            retrieved = phi_k @ A
            if decays is not None:  # Gated DeltaNet: G_t / G_j on the Gram matrix, G_t on the retrieval
                cum = decays[s]
                ratio = torch.where(strictly_lower, cum - cum.transpose(-1, -2), float("-inf")).exp()
                gram, retrieved = gram * ratio, torch.exp(cum) * retrieved
            gram = torch.where(strictly_lower, gram, 0.0)
            u = torch.linalg.solve_triangular(eye + gram, b_s * (v_s - retrieved), upper=False, unitriangular=True)
            gated_k = b_s * phi_k
            if decays is not None:
                later = torch.exp(cum[:, :, -1:] - cum)
                A, z = torch.exp(cum[:, :, -1:]) * A, torch.exp(cum[:, :, -1]) * z
                u, gated_k = later * u, later * gated_k
            A = A + phi_k.transpose(-1, -2) @ u
            z = z + gated_k.sum(dim=2)
        read = torch.cat(reads, dim=2)[:, :, :T].transpose(1, 2)
    return read, LayerState(A, z)


SCANS = {"head": memory_scan, "delta": delta_scan}


def memory_read(q: Tensor, state: LayerState, kind: str, nu: int, eps: float) -> Tensor:
    """What tokens of the open segment read: the scans' read against the memory before it.
    q: (B, m, H, hd) -> (B, m, H, hd) fp32."""
    hd = q.shape[-1]
    with torch.autocast(device_type=q.device.type, enabled=False):
        x = q.float().transpose(1, 2)  # (B, H, m, hd)
        if kind == "delta":
            return (delta_features(x, nu) @ state.A).transpose(1, 2)
        A = torch.cat([state.A, state.z.unsqueeze(-1)], dim=-1)  # (B, H, dk, hd + 1)
        num, den = (dpfp(x, nu) @ A).split([hd, 1], dim=-1)
        return (num / (den + eps)).transpose(1, 2)


# ------------------------------------------------------------------------------------- attention
def rope_tables(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin of the rotary angles for positions (...,) -> (..., 1, hd / 2) each, fp32."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float().unsqueeze(-1) * inv_freq
    return angles.cos().unsqueeze(-2), angles.sin().unsqueeze(-2)


def apply_rope(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    cos, sin = rope
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def gqa_kwargs(q: Tensor, k: Tensor) -> dict:
    """Grouped-query attention: kv head j serves query heads [j H/Hkv, (j+1) H/Hkv)."""
    return {"enable_gqa": True} if q.shape[-3] != k.shape[-3] else {}


def _block_causal(q: Tensor, k: Tensor, v: Tensor, n: int) -> Tensor:
    B, L, H, hd = q.shape
    q, k, v = (t.reshape(B * (L // n), n, -1, hd).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa_kwargs(q, k))
    return out.transpose(1, 2).reshape(B, L, H, hd)


def segment_local_attention(q: Tensor, k: Tensor, v: Tensor, n: int) -> Tensor:
    T = q.shape[1]
    full = (T // n) * n
    parts = []
    if full:
        parts.append(_block_causal(q[:, :full], k[:, :full], v[:, :full], n))
    if full < T:
        parts.append(_block_causal(q[:, full:], k[:, full:], v[:, full:], T - full))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def shift_keys(k: Tensor, n: int, theta: float) -> Tensor:
    """Keys (..., hd) rotated at in-segment positions, rotated by -n more: as seen from the next
    segment's queries (RoPE's relative distance i + n - j)."""
    hd = k.shape[-1]
    inv_freq = theta ** (-torch.arange(0, hd, 2, device=k.device, dtype=torch.float32) / hd)
    angle = -float(n) * inv_freq
    cos, sin = angle.cos(), angle.sin()
    k1, k2 = k.float().chunk(2, dim=-1)
    return torch.cat([k1 * cos - k2 * sin, k1 * sin + k2 * cos], dim=-1).to(k.dtype)


def window_attention(q: Tensor, k: Tensor, v: Tensor, n: int, theta: Optional[float]) -> Tensor:
    """memgpt_dist.model.window.window_attention from a document start (no carried window):
    each segment attends causally to itself and to all of the segment before it."""
    B, T, H, hd = q.shape
    S = -(-T // n)
    pad = S * n - T
    q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)).view(B, S, n, -1, hd) for t in (q, k, v))  # (B, S, n, h, hd)
    Hk = k.shape[3]
    pk = torch.cat([k.new_zeros(B, 1, n, Hk, hd), k[:, :-1]], dim=1)  # (B, S, n, Hkv, hd): segment s - 1's
    pv = torch.cat([v.new_zeros(B, 1, n, Hk, hd), v[:, :-1]], dim=1)
    if theta is not None:
        pk = shift_keys(pk, n, theta)
    keys = torch.cat([pk, k], dim=2).view(B * S, 2 * n, Hk, hd).transpose(1, 2)  # (B*S, Hkv, 2n, hd)
    values = torch.cat([pv, v], dim=2).view(B * S, 2 * n, Hk, hd).transpose(1, 2)
    seen = torch.ones(B, S, n, dtype=torch.bool, device=q.device)
    seen[:, 0] = False  # the first segment has none before it
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    mask = torch.cat([seen.view(B * S, 1, n).expand(B * S, n, n), causal.expand(B * S, n, n)], dim=-1)
    qs = q.reshape(B * S, n, H, hd).transpose(1, 2)  # (B*S, H, n, hd)
    out = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask.unsqueeze(1), **gqa_kwargs(qs, keys))
    return out.transpose(1, 2).reshape(B, S * n, H, hd)[:, :T]


def full_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention over the whole text: (B, T, H, hd)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa_kwargs(q, k)).transpose(1, 2)


class SegmentConv(nn.Module):
    """Depthwise causal convolution inside each segment (zero history at a segment start)."""

    def __init__(self, channels: int, taps: int, segment_len: int):
        super().__init__()
        self.taps = taps
        self.segment_len = segment_len
        self.weight = nn.Parameter(torch.zeros(channels, 1, taps))

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        n = self.segment_len
        S = -(-T // n)
        x = F.pad(x, (0, 0, 0, S * n - T)).view(B * S, n, C).transpose(1, 2)
        y = F.conv1d(F.pad(x, (self.taps - 1, 0)), self.weight.to(x.dtype), groups=C)
        return y.transpose(1, 2).reshape(B, S * n, C)[:, :T]


class LayerCache:
    """One layer's part of `MemGPTCache`: the memory before the open segment, the open segment's
    keys, values (after RoPE) and memory inputs in slots 0..N-1 of each row (`full`: every
    token's keys and values), and the previous segment's keys (shifted by -N) and values (`window`)."""

    def __init__(self, state: LayerState, k: Tensor, v: Tensor, mem_in: Tensor, mem_k: Tensor, mem_v: Tensor,
                 write_logit: Tensor, decay_logit: Tensor, prev_k: Tensor, prev_v: Tensor, prev_valid: Tensor):
        self.state, self.k, self.v = state, k, v  # k, v: (B, N or tokens so far, Hkv, hd)
        self.mem_in = mem_in  # (B, N, 3C) memory q|k|v before the convolution
        self.mem_k, self.mem_v, self.write_logit = mem_k, mem_v, write_logit  # (B, N, C), (B, N, C), (B, N, H)
        self.decay_logit = decay_logit  # (B, N, H)
        self.prev_k, self.prev_v, self.prev_valid = prev_k, prev_v, prev_valid  # (B, N, Hkv, hd) x 2, (B, N)

    def tensors(self) -> list[Tensor]:
        return [self.state.A, self.state.z, self.k, self.v, self.mem_in, self.mem_k, self.mem_v, self.write_logit,
                self.decay_logit, self.prev_k, self.prev_v, self.prev_valid]

    @classmethod
    def of(cls, tensors: list[Tensor]) -> "LayerCache":
        return cls(LayerState(tensors[0], tensors[1]), *tensors[2:])

    def reserve(self, tokens: int) -> None:
        """Room for `tokens` keys and values (the `full` cache grows, doubling)."""
        have = self.k.shape[1]
        if tokens > have:
            grow = max(tokens, 2 * have) - have
            self.k, self.v = (F.pad(t, (0, 0, 0, 0, 0, grow)) for t in (self.k, self.v))


class Attention(nn.Module):
    def __init__(self, cfg: MemGPTConfig, layer: int):
        super().__init__()
        d, d_kv = cfg.n_embd, cfg.n_kv_head * cfg.head_dim
        self.cfg = cfg
        self.head_dim = cfg.head_dim
        self.segment_len = cfg.segment_len
        self.q_proj = nn.Linear(d, d, bias=cfg.bias)
        self.k_proj = nn.Linear(d, d_kv, bias=cfg.bias)
        self.v_proj = nn.Linear(d, d_kv, bias=cfg.bias)
        self.o_proj = nn.Linear(d, d, bias=cfg.bias)
        self.attention = cfg.attention
        self.theta = cfg.rope_theta if cfg.position == "rope" else None
        self.mem = cfg.has_memory(layer)  # mem_layers: the memory in some blocks only
        if self.mem:
            self.mem_q_proj = nn.Linear(d, d, bias=False)
            self.mem_k_proj = nn.Linear(d, d, bias=False)
            self.mem_v_proj = nn.Linear(d, d, bias=False)
            self.mem_write_gate = nn.Linear(d, cfg.n_head)
            self.mem_beta = nn.Parameter(torch.zeros(cfg.n_head))
            if cfg.mem_decay:
                self.mem_decay_gate = nn.Linear(d, cfg.n_head)
            self.conv = cfg.mem_conv >= 2
            if self.conv:
                self.mem_q_conv, self.mem_k_conv, self.mem_v_conv = (
                    SegmentConv(d, cfg.mem_conv, cfg.segment_len) for _ in range(3))

    def _qkv(self, x: Tensor, rope) -> tuple[Tensor, Tensor, Tensor]:
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, -1, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v  # (B, T, H, hd), (B, T, Hkv, hd) twice

    def _mix(self, y: Tensor, read: Tensor) -> Tensor:
        g = torch.sigmoid(self.mem_beta).view(1, 1, -1, 1)
        return g * read.to(y.dtype) + (1 - g) * y

    def forward(self, x: Tensor, rope, state: Optional[LayerState]
                ) -> tuple[Tensor, Optional[LayerState], tuple[Tensor, Tensor]]:
        """The training forward over whole segments from a document start: (B, T, C) ->
        (B, T, C), the memory after, and the last segment's keys and values (B, n, Hkv, hd)."""
        B, T, _ = x.shape
        q, k, v = self._qkv(x, rope)
        if self.attention == "full":
            y = full_attention(q, k, v)
        elif self.attention == "window":
            y = window_attention(q, k, v, self.segment_len, self.theta)
        else:
            y = segment_local_attention(q, k, v, self.segment_len)
        last = (k[:, -self.segment_len:], v[:, -self.segment_len:])
        if self.mem:
            q, k, v = self.mem_q_proj(x), self.mem_k_proj(x), self.mem_v_proj(x)
            if self.conv:
                q, k, v = self.mem_q_conv(q), self.mem_k_conv(k), self.mem_v_conv(v)
            q, k, v = (t.view(B, T, -1, self.head_dim) for t in (q, k, v))
            scan = SCANS[self.cfg.mem_kind]
            decay = self.mem_decay_gate(x) if self.cfg.mem_decay else None
            read, state = scan(q, k, v, self.mem_write_gate(x), state, self.segment_len, self.cfg.mem_nu,
                               self.cfg.mem_eps, decay)
            y = self._mix(y, read)
        return self.o_proj(y.reshape(B, T, -1)), state, last

    def step(self, x: Tensor, rope, slots: Tensor, at: Tensor, lc: LayerCache) -> Tensor:
        """m new tokens of the open segment at `slots` (B, m) (one segment per row; `at`: their
        positions in the text): attend to the cached keys at or before them (`window`: and the
        previous segment's; `full`: every token's) and read the memory before the segment;
        (B, m, C) -> (B, m, C)."""
        B, m, _ = x.shape
        q, k, v = self._qkv(x, rope)
        where = at if self.attention == "full" else slots
        lc.reserve(int(where.max()) + 1)
        index = where.view(B, m, 1, 1).expand_as(k)
        lc.k.scatter_(1, index, k)
        lc.v.scatter_(1, index, v)
        keys, values = lc.k, lc.v
        visible = torch.arange(keys.shape[1], device=x.device).view(1, 1, -1) <= where.unsqueeze(-1)  # (B, m, L)
        if self.attention == "window":
            keys, values = torch.cat([lc.prev_k, keys], dim=1), torch.cat([lc.prev_v, values], dim=1)
            visible = torch.cat([lc.prev_valid.unsqueeze(1).expand(B, m, -1), visible], dim=-1)
        q, ck, cv = q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        y = F.scaled_dot_product_attention(q, ck, cv, attn_mask=visible.unsqueeze(1),
                                           **gqa_kwargs(q, ck)).transpose(1, 2)  # (B, m, H, hd)
        if self.mem:
            mq, mk, mv = self.mem_q_proj(x), self.mem_k_proj(x), self.mem_v_proj(x)  # (B, m, C) each
            if self.conv:
                mq, mk, mv = self._conv_step(torch.cat([mq, mk, mv], dim=-1), slots, lc)
            C = mk.shape[-1]
            lc.mem_k.scatter_(1, slots.unsqueeze(-1).expand(B, m, C), mk)
            lc.mem_v.scatter_(1, slots.unsqueeze(-1).expand(B, m, C), mv)
            wl = self.mem_write_gate(x)  # (B, m, H)
            lc.write_logit.scatter_(1, slots.unsqueeze(-1).expand_as(wl), wl)
            if self.cfg.mem_decay:
                lc.decay_logit.scatter_(1, slots.unsqueeze(-1).expand_as(wl), self.mem_decay_gate(x))
            read = memory_read(mq.view(B, m, -1, self.head_dim), lc.state, self.cfg.mem_kind, self.cfg.mem_nu,
                               self.cfg.mem_eps)
            y = self._mix(y, read)
        return self.o_proj(y.reshape(B, m, -1))

    def _conv_step(self, mem_in: Tensor, slots: Tensor, lc: LayerCache) -> tuple[Tensor, Tensor, Tensor]:
        """The three short convolutions at the new tokens: one multiply-add over a gathered window."""
        B, m, C3 = mem_in.shape
        lc.mem_in.scatter_(1, slots.unsqueeze(-1).expand(B, m, C3), mem_in)
        taps = self.cfg.mem_conv
        pos = slots[:, :1] - (taps - 1) + torch.arange(taps - 1 + m, device=slots.device)  # (B, taps - 1 + m)
        window = lc.mem_in.gather(1, pos.clamp(min=0).unsqueeze(-1).expand(B, taps - 1 + m, C3))
        window = window * (pos >= 0).unsqueeze(-1).to(window.dtype)  # zeros before the segment start
        weight = torch.cat([c.weight for c in (self.mem_q_conv, self.mem_k_conv, self.mem_v_conv)]).view(C3, taps)
        y = (window.unfold(1, taps, 1) * weight.to(window.dtype)).sum(-1)  # (B, m, 3C)
        return y.chunk(3, dim=-1)

    def close(self, rows: Tensor, lc: LayerCache) -> None:
        """The open segment of `rows` is full: write it into their memory (as the training scan
        does) and make it the window's previous segment."""
        if self.attention == "window":
            k = lc.k[rows]
            lc.prev_k[rows] = shift_keys(k, self.segment_len, self.theta) if self.theta is not None else k
            lc.prev_v[rows] = lc.v[rows]
            lc.prev_valid[rows] = True
        if not self.mem:
            return
        k, v = (t[rows].view(len(rows), self.segment_len, -1, self.head_dim) for t in (lc.mem_k, lc.mem_v))
        state = LayerState(lc.state.A[rows], lc.state.z[rows])
        decay = lc.decay_logit[rows] if self.cfg.mem_decay else None
        _, new = SCANS[self.cfg.mem_kind](k, k, v, lc.write_logit[rows], state, self.segment_len, self.cfg.mem_nu,
                                          self.cfg.mem_eps, decay)  # q only shapes the reads, which are not used
        lc.state.A[rows] = new.A
        lc.state.z[rows] = new.z


class MLP(nn.Module):
    """gelu / gelu_tanh: down(gelu(up(x))); swiglu: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: MemGPTConfig):
        super().__init__()
        self.kind = cfg.mlp
        if self.kind == "swiglu":
            self.gate_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "swiglu":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh" if self.kind == "gelu_tanh" else "none"))


def build_norm(cfg: MemGPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


class LMHead(nn.Module):
    """The untied LM head: a (vocab, C) matrix (memgpt_dist.model.gpt.LMHead)."""

    def __init__(self, cfg: MemGPTConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.vocab_size, cfg.n_embd))


class Block(nn.Module):
    def __init__(self, cfg: MemGPTConfig, layer: int):
        super().__init__()
        self.ln1 = build_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.ln2 = build_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, state):
        a, state, last = self.attn(self.ln1(x), rope, state)
        x = x + a
        return x + self.mlp(self.ln2(x)), state, last

    def step(self, x, rope, slots, at, lc):
        x = x + self.attn.step(self.ln1(x), rope, slots, at, lc)
        return x + self.mlp(self.ln2(x))


# ----------------------------------------------------------------------------------------- cache
class MemGPTCache(Cache):
    """The recurrent state of generation: per layer a `LayerCache`, and per row the tokens in its
    open segment (`fill`, (B,)). `get_seq_length` counts the positions seen, padding included."""

    def __init__(self, layers: list[LayerCache], fill: Tensor, pos: Tensor, seen: int):
        super().__init__(layers=[])
        self.memgpt_layers = layers
        self.fill = fill  # (B,) tokens in each row's open segment
        self.pos = pos  # (B,) tokens each row has read (its own, padding excluded)
        self.seen = seen

    def __len__(self) -> int:
        return len(self.memgpt_layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def batch_size(self) -> int:
        return int(self.fill.shape[0])

    def _map_rows(self, fn) -> None:
        self.memgpt_layers = [LayerCache.of([fn(t) for t in lc.tensors()]) for lc in self.memgpt_layers]
        self.fill, self.pos = fn(self.fill), fn(self.pos)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map_rows(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a memory state cannot be rolled back; MemGPTCache does not crop")

    def reset(self) -> None:
        raise NotImplementedError("start generation with a new MemGPTCache instead")

    @staticmethod
    def cat(caches: list["MemGPTCache"], seen: int) -> "MemGPTCache":
        def join(ts):  # `full` key caches of different lengths are padded to the longest
            longest = max(t.shape[1] for t in ts)
            return torch.cat([t if t.shape[1] == longest else F.pad(t, (0, 0) * (t.dim() - 2) + (0, longest - t.shape[1]))
                              for t in ts])

        layers = [LayerCache.of([join(ts) for ts in zip(*(c.memgpt_layers[i].tensors() for c in caches))])
                  for i in range(len(caches[0]))]
        return MemGPTCache(layers, torch.cat([c.fill for c in caches]), torch.cat([c.pos for c in caches]), seen)


# ----------------------------------------------------------------------------------------- model
class MemGPTPreTrainedModel(PreTrainedModel):
    config_class = MemGPTConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def _init_weights(self, module):
        """Export writes every weight; this only serves models built from a config."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


class MemGPTModel(MemGPTPreTrainedModel):
    """The decoder with memgpt-dist's parameter names (wte, wpe, blocks.<i>, ln_f, lm_head when untied)."""

    def __init__(self, config: MemGPTConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.segment_len, config.n_embd) if config.position == "learned" else None
        self.blocks = nn.ModuleDict({str(i): Block(config, i) for i in range(config.n_layer)})
        self.ln_f = build_norm(config)
        self.lm_head = None if config.tie_word_embeddings else LMHead(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def _embed(self, ids: Tensor, positions: Tensor):
        x = self.wte(ids)
        if self.wpe is not None:
            x = x + self.wpe(positions)
        rope = None
        if self.config.position == "rope":
            rope = rope_tables(positions, self.config.head_dim, self.config.rope_theta)
        return x, rope

    def whole(self, ids: Tensor) -> tuple[Tensor, list[tuple]]:
        """The training forward from a document start: hidden (B, T, C) and per layer the memory
        after the last segment and that segment's keys and values."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        if self.config.attention != "full":
            positions = positions % self.config.segment_len
        x, rope = self._embed(ids, positions)
        states = []
        for block in self.blocks.values():
            x, state, last = block(x, rope, None)
            states.append((state, last))
        return self.ln_f(x), states

    def step(self, ids: Tensor, cache: MemGPTCache) -> Tensor:
        """m tokens into each row's open segment (none may cross its end); closes the segments
        that become full. Returns hidden (B, m, C)."""
        B, m = ids.shape
        new = torch.arange(m, device=ids.device)
        slots = cache.fill.unsqueeze(1) + new  # (B, m): places in the open segments
        at = cache.pos.unsqueeze(1) + new  # (B, m): places in the texts
        x, rope = self._embed(ids, at if self.config.attention == "full" else slots)
        for block, lc in zip(self.blocks.values(), cache.memgpt_layers):
            x = block.step(x, rope, slots, at, lc)
        cache.fill = cache.fill + m
        cache.pos = cache.pos + m
        rows = (cache.fill == self.config.segment_len).nonzero().flatten()
        if len(rows):
            for block, lc in zip(self.blocks.values(), cache.memgpt_layers):
                block.attn.close(rows, lc)
            cache.fill[rows] = 0
        cache.seen += m
        return self.ln_f(x)

    def empty_cache(self, batch: int, states: Optional[list[tuple]]) -> MemGPTCache:
        """A cache after `states` (`whole`'s: memory and last segment per layer; None: none)."""
        c, n, H, hd = self.config.n_embd, self.config.segment_len, self.config.n_head, self.config.head_dim
        Hkv = self.config.n_kv_head
        dev, dt = self.wte.weight.device, self.wte.weight.dtype
        dk = feature_dim(hd, self.config.mem_nu)
        theta = self.config.rope_theta if self.config.position == "rope" else None
        layers = []
        for i in range(self.config.n_layer):
            memory, last = states[i] if states else (None, None)
            memory = memory if memory is not None else LayerState(
                torch.zeros(batch, H, dk, hd, device=dev), torch.zeros(batch, H, dk, device=dev))
            z = lambda *shape: torch.zeros(batch, *shape, device=dev, dtype=dt)  # noqa: E731
            prev_k, prev_v = z(n, Hkv, hd), z(n, Hkv, hd)
            prev_valid = torch.zeros(batch, n, dtype=torch.bool, device=dev)
            if last is not None and self.config.attention == "window":
                prev_k = shift_keys(last[0], n, theta) if theta is not None else last[0].clone()
                prev_v, prev_valid = last[1].clone(), ~prev_valid
            layers.append(LayerCache(memory, z(n, Hkv, hd), z(n, Hkv, hd), z(n, 3 * c), z(n, c), z(n, c), z(n, H),
                                     z(n, H), prev_k, prev_v, prev_valid))
        zero = torch.zeros(batch, dtype=torch.long, device=dev)
        return MemGPTCache(layers, zero, zero.clone(), 0)

    def prefill(self, ids: Tensor) -> tuple[Tensor, MemGPTCache]:
        """Read a prompt (B, T) of one length: its whole segments but the last token's by the
        training forward, the rest (1..N tokens) into the open segment."""
        B, T = ids.shape
        n = self.config.segment_len
        # `full` reads every segment through step, which keeps all keys and values
        done = 0 if self.config.attention == "full" else ((T - 1) // n) * n
        hidden, states = self.whole(ids[:, :done]) if done else (None, None)
        cache = self.empty_cache(B, states)
        cache.pos += done
        parts = [hidden] if hidden is not None else []
        parts += [self.step(ids[:, t:t + n], cache) for t in range(done, T, n)]
        cache.seen = T
        return torch.cat(parts, dim=1), cache


def _rows(attention_mask: Optional[Tensor], B: int) -> Optional[list[Tensor]]:
    """Per row, a boolean mask of its tokens when some are padding; None when none is."""
    if attention_mask is None or bool(attention_mask.bool().all()):
        return None
    return [attention_mask[b].bool() for b in range(B)]


class MemGPTForCausalLM(MemGPTPreTrainedModel, GenerationMixin):
    """The LM head is the token embedding (tied) or `model.lm_head` (untied); either way it lives
    inside `self.model` under memgpt-dist's names, so transformers has no tied weights to manage."""

    def __init__(self, config: MemGPTConfig):
        super().__init__(config)
        self.model = MemGPTModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.wte

    def set_input_embeddings(self, value):
        self.model.wte = value

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, cache: Optional[Cache] = None,
                past_key_values: Optional[Cache] = None, labels: Optional[Tensor] = None,
                use_cache: Optional[bool] = None, logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, MemGPTCache):
            if cache.get_seq_length() > 0:
                raise ValueError(f"a {type(cache).__name__} holding tokens was passed; MemGPT needs its MemGPTCache")
            cache = None  # the empty cache generate() makes by default: ours replaces it
        use_cache = (self.config.use_cache and not self.training) if use_cache is None else use_cache
        if cache is not None:
            hidden = self._read_new(input_ids, cache)
        elif use_cache:
            hidden, cache = self._read_prompt(input_ids, attention_mask)
        else:
            hidden = self._read_whole(input_ids, attention_mask)
        hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        head = self.model.wte if self.model.lm_head is None else self.model.lm_head
        logits = F.linear(hidden, head.weight)  # (B, T, vocab)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})

    def _read_whole(self, ids: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
        rows = _rows(attention_mask, ids.shape[0])
        if rows is None:
            return self.model.whole(ids)[0]
        out = torch.zeros(*ids.shape, self.config.n_embd, device=ids.device, dtype=self.model.wte.weight.dtype)
        for b, keep in enumerate(rows):  # each row segmented from its own first token
            if keep.any():
                out[b, keep] = self.model.whole(ids[b, keep].unsqueeze(0))[0][0]
        return out

    def _read_prompt(self, ids: Tensor, attention_mask: Optional[Tensor]) -> tuple[Tensor, MemGPTCache]:
        rows = _rows(attention_mask, ids.shape[0])
        if rows is None:
            return self.model.prefill(ids)
        out = torch.zeros(*ids.shape, self.config.n_embd, device=ids.device, dtype=self.model.wte.weight.dtype)
        caches = []
        for b, keep in enumerate(rows):
            if not keep.any():
                raise ValueError(f"row {b} of the batch has no tokens (its attention_mask is all zeros)")
            hidden, c = self.model.prefill(ids[b, keep].unsqueeze(0))
            out[b, keep] = hidden[0]
            caches.append(c)
        return out, MemGPTCache.cat(caches, seen=ids.shape[1])

    def _read_new(self, ids: Tensor, cache: MemGPTCache) -> Tensor:
        """New tokens after a prompt, one at a time (rows' open segments end at different places)."""
        return torch.cat([self.model.step(ids[:, t:t + 1], cache) for t in range(ids.shape[1])], dim=1)


_CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"
