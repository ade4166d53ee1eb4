"""Attention across segments: `model.attention: window` and `full`.

`window` (Transformer-XL's segment recurrence, ARMT's `--prev_seg_kv`): each token of segment s
attends causally to its own segment and to all of segment s-1's keys and values, so no token is
blind at a segment start. Keys are rotated at their position inside their own segment (as in
`segment`); the previous segment's keys are rotated once more by -N, so a query at i and a key
at j of the previous segment are i + N - j apart, the relative distance RoPE sees in one
continuous sequence. Inside a forward the previous segment is the one before in the same
sample; before the first segment of a forward it is the `WindowCache` carried from the last
forward (stream training, streaming evaluation), like the memory state; in generation the
cache of `decode.py` holds it. Where `reset` says a segment starts a document it sees no
previous segment.

`full` (ordinary causal attention over the whole sample with continuous positions, the plain GPT
a user would otherwise train) is `gpt.full_attention`: nothing is carried between forwards;
generation keeps every token's keys and values (`decode.py`).

Imports torch only.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from memgpt_dist.model.memory import LayerState


class WindowCache(NamedTuple):
    """The keys and values of the last segment a forward read, per layer. k, v: (B, H, N, hd)
    (keys rotated at their in-segment positions); valid: (B, H, N) bool, False for a slot that
    holds no token (no previous segment, or a short last segment). Heads lead after the batch, as
    in the memory state, so TP slices and relayout treat both alike."""

    k: Tensor
    v: Tensor
    valid: Tensor


def shift_keys(k: Tensor, segment_len: int, theta: float) -> Tensor:
    """Rotate keys (..., n, H, hd) already rotated at in-segment positions by -segment_len more:
    a rotation by a fixed angle composes with the first, so the result is the key rotated at
    position j - N (RoPE's relative distance to a query of the next segment is i + N - j)."""
    hd = k.shape[-1]
    inv_freq = theta ** (-torch.arange(0, hd, 2, device=k.device, dtype=torch.float32) / hd)  # (hd / 2,)
    angle = -float(segment_len) * inv_freq
    cos, sin = angle.cos(), angle.sin()
    k1, k2 = k.float().chunk(2, dim=-1)  # (..., hd / 2) each
    return torch.cat([k1 * cos - k2 * sin, k1 * sin + k2 * cos], dim=-1).to(k.dtype)


def gqa_kwargs(q: Tensor, k: Tensor) -> dict:
    """SDPA's grouped-query flag when q (.., H, n, hd) has more heads than k (.., Hkv, n, hd): key/value
    head j serves query heads [j H/Hkv, (j+1) H/Hkv), Llama's repeat_kv order (and a TP rank holding
    kv heads [a, b) holds exactly their queries). Empty for plain multi-head attention."""
    return {"enable_gqa": True} if q.shape[-3] != k.shape[-3] else {}


def _expand_heads(x: Tensor, n_head: int) -> Tensor:
    """Repeat grouped key/value heads (B', H_kv, n, hd) to the query heads (B', H, n, hd), in
    `gqa_kwargs`' order (for the written-out reference)."""
    return x if x.shape[1] == n_head else x.repeat_interleave(n_head // x.shape[1], dim=1)


def window_attention(q: Tensor, k: Tensor, v: Tensor, segment_len: int, cache: Optional[WindowCache],
                     reset: Optional[Tensor], rope_theta: Optional[float], dropout_p: float
                     ) -> tuple[Tensor, WindowCache]:
    """Causal attention over each segment and the one before it.

    q: (B, T, H, hd), k, v: (B, T, H_kv, hd), keys rotated at in-segment positions (rope_theta
    None: learned positions, no shift); cache: the previous forward's last segment (None:
    none); reset: (B, S) bool, True where segment s starts a document. Returns (B, T, H, hd) and
    the cache for the next forward (this forward's last segment, its padding marked invalid).
    """
    B, T, H, hd = q.shape
    n = segment_len
    S = -(-T // n)
    pad = S * n - T
    q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)).view(B, S, n, -1, hd) for t in (q, k, v))  # (B, S, n, h, hd)
    Hk = k.shape[3]
    if cache is None:
        prev_k = k.new_zeros(B, 1, n, Hk, hd)
        prev_v = v.new_zeros(B, 1, n, Hk, hd)
        prev_valid = torch.zeros(B, 1, n, dtype=torch.bool, device=q.device)
    else:
        prev_k = cache.k.transpose(1, 2).unsqueeze(1).to(k.dtype)  # (B, 1, n, H_kv, hd)
        prev_v = cache.v.transpose(1, 2).unsqueeze(1).to(v.dtype)  # (B, 1, n, H_kv, hd)
        prev_valid = cache.valid[:, 0].unsqueeze(1)  # (B, 1, n): the same for every head
    pk = torch.cat([prev_k, k[:, :-1]], dim=1)  # (B, S, n, H_kv, hd): segment s-1's keys for segment s
    pv = torch.cat([prev_v, v[:, :-1]], dim=1)  # (B, S, n, H_kv, hd)
    seen = torch.cat([prev_valid, prev_valid.new_ones(B, S - 1, n)], dim=1)  # (B, S, n)
    if reset is not None:
        seen = seen & ~reset.view(B, S, 1)  # a document start sees no previous segment
    if rope_theta is not None:
        pk = shift_keys(pk, n, rope_theta)
    keys = torch.cat([pk, k], dim=2).view(B * S, 2 * n, Hk, hd).transpose(1, 2)  # (B*S, H_kv, 2n, hd)
    values = torch.cat([pv, v], dim=2).view(B * S, 2 * n, Hk, hd).transpose(1, 2)  # (B*S, H_kv, 2n, hd)
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()  # (n, n)
    mask = torch.cat([seen.view(B * S, 1, n).expand(B * S, n, n), causal.expand(B * S, n, n)], dim=-1)  # (B*S, n, 2n)
    qs = q.reshape(B * S, n, H, hd).transpose(1, 2)  # (B*S, H, n, hd)
    out = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask.unsqueeze(1), dropout_p=dropout_p,
                                         **gqa_kwargs(qs, keys))  # (B*S, H, n, hd)
    y = out.transpose(1, 2).reshape(B, S * n, H, hd)[:, :T]  # (B, T, H, hd)
    filled = torch.arange(n, device=q.device) < n - pad  # (n,): the last segment's real tokens
    new = WindowCache(k=k[:, -1].transpose(1, 2), v=v[:, -1].transpose(1, 2),  # (B, H_kv, n, hd) each
                      valid=filled.view(1, 1, n).expand(B, Hk, n).clone())
    return y, new


def reference_window_attention(q: Tensor, k: Tensor, v: Tensor, segment_len: int, cache: Optional[WindowCache],
                               reset: Optional[Tensor], rope_theta: Optional[float]) -> Tensor:
    """`window_attention` written out one query at a time (softmax over the visible keys), for
    tests. Same arguments (no dropout); returns (B, T, H, hd)."""
    B, T, H, hd = q.shape
    n = segment_len
    out = torch.zeros(B, T, H, hd, dtype=torch.float32)
    for b in range(B):
        for t in range(T):
            s, i = divmod(t, n)
            keys, values = [k[b, s * n:t + 1].float()], [v[b, s * n:t + 1].float()]  # own segment, causal
            starts_doc = reset is not None and bool(reset[b, s])
            if s > 0 and not starts_doc:
                keys.insert(0, k[b, (s - 1) * n:s * n].float())
                values.insert(0, v[b, (s - 1) * n:s * n].float())
            elif s == 0 and cache is not None and not starts_doc:
                ok = cache.valid[b, 0]
                keys.insert(0, cache.k[b].transpose(0, 1)[ok].float())
                values.insert(0, cache.v[b].transpose(0, 1)[ok].float())
            if len(keys) == 2 and rope_theta is not None:
                keys[0] = shift_keys(keys[0], n, rope_theta)
            kk = _expand_heads(torch.cat(keys).transpose(0, 1).unsqueeze(0), H)[0]  # (H, m, hd)
            vv = _expand_heads(torch.cat(values).transpose(0, 1).unsqueeze(0), H)[0]  # (H, m, hd)
            scores = (kk @ q[b, t].float().unsqueeze(-1)).squeeze(-1) / hd ** 0.5  # (H, m)
            out[b, t] = (scores.softmax(dim=-1).unsqueeze(-1) * vv).sum(dim=1)
    return out


def with_window(memory: Optional["LayerState"], window: WindowCache) -> "LayerState":
    """One layer's carried state: its memory (A, z; None without memory) and the window cache."""
    from memgpt_dist.model.memory import LayerState

    A, z = (memory.A, memory.z) if memory is not None else (None, None)
    return LayerState(A, z, window.k, window.v, window.valid)

