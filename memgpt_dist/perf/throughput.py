"""Throughput over a logging window: tokens/s, TFLOP/s and MFU per device.

Every figure is a window total over the window's summed step time (the trainer's `step_time`:
data wait, forward, backward and update; validation and checkpoints are outside it), divided by
the world size: "per device" is the job's rate over its devices (torchtitan's TPS/GPU), whatever
share of the model each one holds. Input tokens are every token fed to the model; loss-bearing
tokens are those with a label (what `tok/s` showed before; fewer on task corpora, whose prompts
are masked).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional


@dataclass
class ThroughputWindow:
    """Sums since the last logging step."""

    steps: int = 0
    seconds: float = 0.0
    input_tokens: int = 0
    loss_tokens: int = 0
    flops: float = 0.0

    def add(self, seconds: float, input_tokens: int, loss_tokens: int, flops: float) -> None:
        self.steps += 1
        self.seconds += seconds
        self.input_tokens += input_tokens
        self.loss_tokens += loss_tokens
        self.flops += flops

    def figures(self, world_size: int, peak_tflops: Optional[float]) -> dict[str, float]:
        """The `perf/*` rates per device; `perf/mfu` (a fraction) only when a peak is known."""
        per_device_s = max(self.seconds, 1e-9) * world_size
        out = {"perf/tokens_per_s_per_device": self.input_tokens / per_device_s,
               "perf/loss_tokens_per_s_per_device": self.loss_tokens / per_device_s,
               "perf/tflops_per_device": self.flops / per_device_s / 1e12}
        if peak_tflops:
            out["perf/mfu"] = out["perf/tflops_per_device"] / peak_tflops
        return out


class FlopsPerSample:
    """Training FLOPs of one sample by its length, computed once per length (the K curriculum
    changes it) from `flops_of(T)`."""

    def __init__(self, flops_of: Callable[[int], float]):
        self.flops_of = flops_of
        self.cache: dict[int, float] = {}

    def __call__(self, T: int) -> float:
        if T not in self.cache:
            self.cache[T] = self.flops_of(T)
        return self.cache[T]


def console_text(figures: dict[str, float]) -> str:
    """The console line's part: `mfu 41.2% 12.3 TFLOP/s/dev tok/s/dev 45,000 (loss 40,000) mem 12.3GB`."""
    mfu = f"mfu {100 * figures['perf/mfu']:.1f}% " if "perf/mfu" in figures else ""
    return (f"{mfu}{figures['perf/tflops_per_device']:.3g} TFLOP/s/dev "
            f"tok/s/dev {figures['perf/tokens_per_s_per_device']:,.0f} "
            f"(loss {figures['perf/loss_tokens_per_s_per_device']:,.0f}) "
            f"mem {figures['perf/peak_mem_gb']:.2f}GB")
