"""Training state that is not config: the run's counters, per-rank RNG, and the per-rank parts the
checkpointer saves (loader cursor, RNG, carried memory), each with state_dict()/load_state_dict()."""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from memgpt_dist.train.redistribute import redistribute_memory, replica_states, state_at


@dataclass
class TrainState:
    """Progress of the run, identical on every rank."""

    step: int = 0  # optimizer steps completed
    tokens_seen: int = 0  # global loss-bearing tokens consumed
    samples_seen: int = 0  # global samples consumed (K segments each)
    skipped_steps: int = 0  # steps whose update was skipped: non-finite loss or gradient on some rank
    nonfinite_streak: int = 0  # consecutive skipped steps up to now (train.max_nan_skips bounds it)

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step = int(sd["step"])
        self.tokens_seen = int(sd["tokens_seen"])
        self.samples_seen = int(sd["samples_seen"])
        self.skipped_steps = int(sd.get("skipped_steps", 0))  # absent in checkpoints of older versions
        self.nonfinite_streak = int(sd.get("nonfinite_streak", 0))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This rank's RNG state in a form `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# --------------------------------------------------------------------------- checkpointed parts
# The per-rank parts the checkpointer saves in every rank's file (`train.checkpointer`). Their
# names there ("loader", "rng", "memory_state") are those older versions wrote.
class LoaderPart:
    """The training loader's cursor. `before_load` runs first (the K curriculum: the loader must
    cut samples of the K its saved state was cut with)."""

    def __init__(self, loader, before_load=lambda: None):
        self.loader = loader
        self.before_load = before_load

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, sd) -> None:
        self.before_load()
        self.loader.load_state_dict(sd)

    def load_redistributed(self, saved: list[dict], place: dict) -> None:
        """Every stream continues from its saved cursor, whichever replica held it."""
        self.before_load()
        self.loader.load_state_dicts([s["loader"] for s in replica_states(saved)])


class RngPart:
    """This rank's Python, NumPy and torch RNG states."""

    def state_dict(self):
        return rng_state()

    def load_state_dict(self, sd) -> None:
        set_rng_state(sd)

    def load_redistributed(self, saved: list[dict], place: dict) -> None:
        """The RNG of the saved rank at the same (dp, tp, pp) coordinates, if the layout had one."""
        same_place = state_at(saved, place["coord"])
        if same_place is not None:
            set_rng_state(same_place["rng"])


class MemoryPart:
    """The carried memory (`model.carry.MemoryCarry`) of this rank's streams, heads and layers."""

    def __init__(self, carry, device: torch.device):
        self.carry = carry
        self.device = device
        self.missing_streams = 0  # after a relayout: streams of this rank no saved rank held

    def state_dict(self):
        return self.carry.state_dict()

    def load_state_dict(self, sd) -> None:
        self.carry.load_state_dict(sd, self.device)

    def load_redistributed(self, saved: list[dict], place: dict) -> None:
        """Rows by global stream id, heads by head index, layers by global layer index."""
        moved = redistribute_memory(saved, place["stream_ids"] or [], (place["heads"][0], place["heads"][1]))
        self.carry.load_state_dict(moved.memory, self.device)
        self.missing_streams = moved.missing_streams if self.carry.enabled else 0
