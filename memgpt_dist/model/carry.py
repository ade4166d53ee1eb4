"""The memory a rank carries from one training micro-batch to the next (`train.carry_memory`).

One representation for every layout: the state of each layer this rank computes, keyed by global
layer index (a whole model holds every layer, a pipeline stage its own; a block without memory,
`memory.layers`, under segment or full attention carries nothing and has no entry, so saves no
key), each a `LayerState` of the rank's streams and heads, detached (truncated BPTT): the memory
(A, z, fp32) and, with `model.attention: window`, the last segment's keys and values (k, v in
their dtype, kv_valid bool). It saves as `{"layer<i>.A", "layer<i>.z", "layer<i>.k", ...}` (the fields that exist), the
names `memory.state_to_dict` gives a whole model's state, every tensor with heads in dim 1, so a
checkpoint of any layout reads back into any other (`train/redistribute.py` slices rows and
heads of every key alike). Imports torch only.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from memgpt_dist.model.memory import STATE_FIELDS, LayerState, MemoryState, detach_state

Snapshot = dict[int, LayerState]


class MemoryCarry:
    """Per-layer carried memory of this rank's streams, with a snapshot/rollback for steps the
    optimizer discards. `enabled=False` (episodic training) carries nothing."""

    def __init__(self, enabled: bool, owned: Optional[list[int]] = None):
        self.enabled = enabled
        self.owned: Optional[list[int]] = owned  # global layers this rank computes; None: every layer
        self.layers: dict[int, LayerState] = {}
        self.stats: dict[str, Tensor] = {}  # "<stat>/layer<i>" of the last training micro-batch

    # ------------------------------------------------------------------ use in a forward
    def state(self, n_layer: int) -> Optional[MemoryState]:
        """The whole model's state to start the next micro-batch from (None: zero memory); None
        for the layers that carry nothing (blocks without memory, `memory.layers`)."""
        if not (self.enabled and self.layers):
            return None
        return tuple(self.layers.get(i) for i in range(n_layer))

    def layer(self, index: int) -> Optional[LayerState]:
        return self.layers.get(index) if self.enabled else None

    def keep(self, state: Optional[MemoryState]) -> None:
        """Carry a whole model's state after a micro-batch (the graph is cut here)."""
        if self.enabled and state is not None:
            self.layers = {i: _detached(s) for i, s in enumerate(state) if s is not None}

    def keep_layer(self, index: int, state: Optional[LayerState]) -> None:
        if self.enabled and state is not None:
            self.layers[index] = _detached(state)

    # ------------------------------------------------------------------ discarded steps
    def snapshot(self) -> Snapshot:
        return dict(self.layers)

    def rollback(self, snapshot: Snapshot) -> None:
        """Back to the memory before a step whose update was discarded."""
        self.layers = dict(snapshot)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Optional[dict[str, Tensor]]:
        """`{"layer<i>.<field>"}` on the CPU (A, z fp32; k, v, kv_valid as computed); None when
        nothing is carried."""
        if not (self.enabled and self.layers):
            return None
        out: dict[str, Tensor] = {}
        for i, s in sorted(self.layers.items()):
            for name, t in zip(STATE_FIELDS, s):
                if t is not None:
                    out[f"layer{i}.{name}"] = (t.float() if name in ("A", "z") else t).cpu()
        return out

    def load_state_dict(self, tensors: Optional[dict[str, Tensor]], device: torch.device) -> None:
        """Take this rank's layers from a saved state (a stage's or a whole model's); None, or a
        state without them: zero memory and no previous segment."""
        if not self.enabled:
            return
        tensors = tensors or {}
        saved = sorted({int(key.split(".")[0][len("layer"):]) for key in tensors})
        layers = self.owned if self.owned is not None else saved
        self.layers = {i: _loaded(tensors, i, device) for i in layers if i in saved}


def _loaded(tensors: dict[str, Tensor], i: int, device: torch.device) -> LayerState:
    """Layer i's fields; a redistributed kv_valid (stacked as float) back to bool."""
    fields = []
    for name in STATE_FIELDS:
        t = tensors.get(f"layer{i}.{name}")
        if t is not None:
            t = t.to(device, torch.float32) if name in ("A", "z") else t.to(device)
            t = t.bool() if name == "kv_valid" else t
        fields.append(t)
    return LayerState(*fields)


def _detached(s: LayerState) -> LayerState:
    return detach_state((s,))[0]
