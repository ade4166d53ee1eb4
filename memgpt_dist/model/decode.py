"""The cache of incremental decoding: what a new token needs so that it costs O(segment).

Per layer: the memory before each row's open segment; the attention's keys and values (after
RoPE): the open segment's in slots 0..N-1 (`model.attention` segment and window) or every token
read so far (full, a growing cache as any GPT's); the open segment's memory inputs and gate
logits; and, for `window`, the previous segment's keys (already shifted by -N, window.py) and
values with a mask of the slots that hold a token. Per row: the tokens in its open segment
(`fill`) and in all (`pos`); rows of a batch may stand at different places. `GPT.step` reads new
tokens into it and, once a segment's last token has been read, writes it to memory with the
training scan and makes it the window's previous segment, so decoding equals the full forward
(tests/model/test_decode.py). A block without memory (`memory.layers`, or the memory off) holds
none of the memory's parts: they are None in its `LayerCache`. Imports torch only.
"""
from __future__ import annotations

from typing import Collection, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from memgpt_dist.model.memory import LayerState, zero_layer_state
from memgpt_dist.model.window import shift_keys


class LayerCache:
    """One layer's part of a `DecodeCache`."""

    def __init__(self, state: Optional[LayerState], k: Tensor, v: Tensor, mem_in: Optional[Tensor],
                 mem_k: Optional[Tensor], mem_v: Optional[Tensor], write_logit: Optional[Tensor],
                 decay_logit: Optional[Tensor], prev_k: Tensor, prev_v: Tensor, prev_valid: Tensor):
        self.state = state  # the memory before the open segment; None and the memory's parts below: no memory
        self.k, self.v = k, v  # (B, N or tokens so far, Hkv, hd) attention keys (rotated) and values
        self.mem_in = mem_in  # (B, N, 3C) memory q|k|v projections before the convolution
        self.mem_k, self.mem_v = mem_k, mem_v  # (B, N, C) after the convolution: what the segment writes
        self.write_logit = write_logit  # (B, N, H)
        self.decay_logit = decay_logit  # (B, N, H) forgetting-gate logits (memory.decay)
        self.prev_k, self.prev_v = prev_k, prev_v  # (B, N, Hkv, hd): the previous segment (window)
        self.prev_valid = prev_valid  # (B, N) bool: False where there is no previous segment

    def tensors(self) -> list[Optional[Tensor]]:
        """Every tensor, None for the memory's parts of a block without memory."""
        A, z = (self.state.A, self.state.z) if self.state is not None else (None, None)
        return [A, z, self.k, self.v, self.mem_in, self.mem_k, self.mem_v, self.write_logit,
                self.decay_logit, self.prev_k, self.prev_v, self.prev_valid]

    @classmethod
    def of(cls, tensors: list[Optional[Tensor]]) -> "LayerCache":
        return cls(LayerState(tensors[0], tensors[1]) if tensors[0] is not None else None, *tensors[2:])

    def reserve(self, tokens: int) -> None:
        """Room for `tokens` keys and values (full attention's cache grows; doubling keeps the
        copies O(T) in all)."""
        have = self.k.shape[1]
        if tokens > have:
            grow = max(tokens, 2 * have) - have
            self.k, self.v = (F.pad(t, (0, 0, 0, 0, 0, grow)) for t in (self.k, self.v))


class DecodeCache:
    """Every layer's `LayerCache`, each row's `fill` (B,) (tokens in its open segment) and `pos`
    (B,) (tokens read in all: full attention's positions)."""

    def __init__(self, layers: list[LayerCache], fill: Tensor, pos: Tensor):
        self.layers = layers
        self.fill = fill
        self.pos = pos

    def map_rows(self, fn) -> None:
        """Apply a row selection/reordering `fn` to every tensor (beam search, batch filtering)."""
        self.layers = [LayerCache.of([None if t is None else fn(t) for t in lc.tensors()]) for lc in self.layers]
        self.fill, self.pos = fn(self.fill), fn(self.pos)

    @staticmethod
    def cat(caches: list["DecodeCache"]) -> "DecodeCache":
        """The rows of several caches in one (full attention's key caches padded to the longest)."""
        def join(ts: tuple[Optional[Tensor], ...]) -> Optional[Tensor]:  # every cache tensor is (B, L, ...)
            if ts[0] is None:  # a block without memory, in every cache
                return None
            longest = max(t.shape[1] for t in ts)
            return torch.cat([t if t.shape[1] == longest else
                              F.pad(t, (0, 0) * (t.dim() - 2) + (0, longest - t.shape[1])) for t in ts])

        layers = [LayerCache.of([join(ts) for ts in zip(*(c.layers[i].tensors() for c in caches))])
                  for i in range(len(caches[0].layers))]
        return DecodeCache(layers, torch.cat([c.fill for c in caches]), torch.cat([c.pos for c in caches]))


def empty_cache(n_layer: int, batch: int, n_head: int, n_kv_head: int, n_embd: int, segment_len: int, nu: int,
                states: Optional[tuple[Optional[LayerState], ...]], rope_theta: Optional[float], device: torch.device,
                dtype: torch.dtype, memory_layers: Optional[Collection[int]] = None) -> DecodeCache:
    """A cache with empty open segments after `states` (None: a document start), the carried
    state of `GPT.forward`: its memory (A, z) and window cache (k, v, kv_valid), either may be
    None. rope_theta: the model's (None: learned positions), to shift the window's keys.
    memory_layers: the blocks that have the memory (None: every block); the others hold none of
    its parts."""
    hd = n_embd // n_head

    def zeros(*shape: int) -> Tensor:
        return torch.zeros(batch, *shape, device=device, dtype=dtype)

    layers = []
    for i in range(n_layer):
        state = states[i] if states is not None else None
        prev_k, prev_v = zeros(segment_len, n_kv_head, hd), zeros(segment_len, n_kv_head, hd)
        prev_valid = torch.zeros(batch, segment_len, dtype=torch.bool, device=device)
        if state is not None and state.k is not None:
            prev_k = state.k.transpose(1, 2).to(dtype)  # (B, N, Hkv, hd)
            prev_k = shift_keys(prev_k, segment_len, rope_theta) if rope_theta is not None else prev_k
            prev_v, prev_valid = state.v.transpose(1, 2).to(dtype), state.kv_valid[:, 0].clone()
        parts: list = [None] * 6  # the memory's: state, mem_in, mem_k, mem_v, write_logit, decay_logit
        if memory_layers is None or i in memory_layers:
            memory = (LayerState(state.A, state.z) if state is not None and state.A is not None
                      else zero_layer_state(batch, n_head, hd, nu, device))
            parts = [memory, zeros(segment_len, 3 * n_embd), zeros(segment_len, n_embd), zeros(segment_len, n_embd),
                     zeros(segment_len, n_head), zeros(segment_len, n_head)]
        layers.append(LayerCache(parts[0], zeros(segment_len, n_kv_head, hd), zeros(segment_len, n_kv_head, hd),
                                 *parts[1:], prev_k.contiguous(), prev_v.contiguous(), prev_valid))
    zero = torch.zeros(batch, dtype=torch.long, device=device)
    return DecodeCache(layers, zero, zero.clone())
