"""The memory a rank carries from one training micro-batch to the next (`train.carry_memory`).

One representation for every layout: the state of each layer this rank computes, keyed by global
layer index (a whole model holds every layer, a pipeline stage its own), each a `LayerState` of
the rank's streams and heads, detached (truncated BPTT), fp32. It saves as
`{"layer<i>.A", "layer<i>.z"}`, the names `memory.state_to_dict` gives a whole model's state, so a
checkpoint of any layout reads back into any other. Imports torch only.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from memgpt_dist.model.memory import LayerState, MemoryState

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
        """The whole model's state to start the next micro-batch from (None: zero memory)."""
        if not (self.enabled and self.layers):
            return None
        return tuple(self.layers[i] for i in range(n_layer))

    def layer(self, index: int) -> Optional[LayerState]:
        return self.layers.get(index) if self.enabled else None

    def keep(self, state: Optional[MemoryState]) -> None:
        """Carry a whole model's state after a micro-batch (the graph is cut here)."""
        if self.enabled and state is not None:
            self.layers = {i: _detached(s) for i, s in enumerate(state)}

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
        """`{"layer<i>.A", "layer<i>.z"}` on the CPU, fp32; None when nothing is carried."""
        if not (self.enabled and self.layers):
            return None
        out: dict[str, Tensor] = {}
        for i, s in sorted(self.layers.items()):
            out[f"layer{i}.A"], out[f"layer{i}.z"] = s.A.float().cpu(), s.z.float().cpu()
        return out

    def load_state_dict(self, tensors: Optional[dict[str, Tensor]], device: torch.device) -> None:
        """Take this rank's layers from a saved state (a stage's or a whole model's); None, or a
        state without them: zero memory."""
        if not self.enabled:
            return
        layers = self.owned if self.owned is not None else sorted(
            int(k[len("layer"):-len(".A")]) for k in (tensors or {}) if k.endswith(".A"))
        self.layers = {i: LayerState(tensors[f"layer{i}.A"].to(device, torch.float32),
                                     tensors[f"layer{i}.z"].to(device, torch.float32))
                       for i in layers if tensors and f"layer{i}.A" in tensors}


def _detached(s: LayerState) -> LayerState:
    return LayerState(s.A.detach(), s.z.detach())
