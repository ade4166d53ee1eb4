"""Training state that is not config: counters and per-rank RNG, each with state_dict()."""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch


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
