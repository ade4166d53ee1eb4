"""The cache of incremental decoding: what a new token needs so that it costs O(segment).

Per layer, the memory before each row's open segment and that segment's keys and values (after
RoPE) and memory inputs, in slots 0..N-1; per row, the number of tokens in its open segment
(`fill`; rows of a batch may stand at different places in their segments). `GPT.step` reads new
tokens into it and writes a segment to memory, with the training scan, once its last token has
been read, so decoding equals the full forward (tests/model/test_decode.py). Imports torch only.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from memgpt_dist.model.memory import LayerState, zero_layer_state


class LayerCache:
    """One layer's part of a `DecodeCache`."""

    def __init__(self, state: LayerState, k: Tensor, v: Tensor, mem_in: Tensor, mem_k: Tensor, mem_v: Tensor,
                 write_logit: Tensor):
        self.state = state  # the memory before the open segment
        self.k, self.v = k, v  # (B, N, Hkv, hd) attention keys (rotated) and values, per key/value head
        self.mem_in = mem_in  # (B, N, 3C) memory q|k|v projections before the convolution
        self.mem_k, self.mem_v = mem_k, mem_v  # (B, N, C) after the convolution: what the segment writes
        self.write_logit = write_logit  # (B, N, H)

    def tensors(self) -> list[Tensor]:
        return [self.state.A, self.state.z, self.k, self.v, self.mem_in, self.mem_k, self.mem_v, self.write_logit]

    @classmethod
    def of(cls, tensors: list[Tensor]) -> "LayerCache":
        return cls(LayerState(tensors[0], tensors[1]), *tensors[2:])


class DecodeCache:
    """Every layer's `LayerCache` and each row's `fill` (B,) (tokens in its open segment)."""

    def __init__(self, layers: list[LayerCache], fill: Tensor):
        self.layers = layers
        self.fill = fill

    def map_rows(self, fn) -> None:
        """Apply a row selection/reordering `fn` to every tensor (beam search, batch filtering)."""
        self.layers = [LayerCache.of([fn(t) for t in lc.tensors()]) for lc in self.layers]
        self.fill = fn(self.fill)

    @staticmethod
    def cat(caches: list["DecodeCache"]) -> "DecodeCache":
        layers = [LayerCache.of([torch.cat(ts) for ts in zip(*(c.layers[i].tensors() for c in caches))])
                  for i in range(len(caches[0].layers))]
        return DecodeCache(layers, torch.cat([c.fill for c in caches]))


def empty_cache(n_layer: int, batch: int, n_head: int, n_kv_head: int, n_embd: int, segment_len: int, nu: int,
                states: Optional[tuple[LayerState, ...]], device: torch.device, dtype: torch.dtype) -> DecodeCache:
    """A cache with empty open segments, starting from `states` (None: zero memory)."""
    hd = n_embd // n_head

    def zeros(*shape: int) -> Tensor:
        return torch.zeros(batch, *shape, device=device, dtype=dtype)

    layers = []
    for i in range(n_layer):
        state = states[i] if states is not None else zero_layer_state(batch, n_head, hd, nu, device)
        layers.append(LayerCache(state, zeros(segment_len, n_kv_head, hd), zeros(segment_len, n_kv_head, hd),
                                 zeros(segment_len, 3 * n_embd), zeros(segment_len, n_embd),
                                 zeros(segment_len, n_embd), zeros(segment_len, n_head)))
    return DecodeCache(layers, torch.zeros(batch, dtype=torch.long, device=device))
