"""Exact resume across processes: run A trains 0 -> N; run B trains 0 -> N/2, stops, and new
processes resume N/2 -> N. Per-step loss and gradient norm are bitwise equal, and every tensor of
every file of the final checkpoints (weights, fp32 master weights, Adam moments and step counts,
LR schedule, per-rank RNG, loader cursors, stream memory state) is `torch.equal`.

Layouts: one process with stream training, dp2 ZeRO-3 with stream training, pp2 ZeRO-1.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from helpers import read_metrics, tiny_args, train

STEPS = 40
LAYOUTS = {
    "single-stream": (1, ["--train.carry_memory=true"]),
    "dp2-zero3-stream": (2, ["--train.carry_memory=true", "--parallel.zero_stage=3"]),
    "pp2-zero1": (2, ["--parallel.pp=2", "--parallel.zero_stage=1", "--parallel.grad_accum=2"]),
}
# fields that record when and how long, not what was computed
WALL_CLOCK_KEYS = {"time", "wall_time", "elapsed_s", "save_s", "step_time_s"}


def args(data: Path, run_dir: Path, extra: list[str]) -> list[str]:
    return tiny_args(data, run_dir, f"--train.max_steps={STEPS}", f"--checkpoint.every={STEPS}",
                     "--train.eval_every=0", *extra)


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def runs(request, tiny_data, tmp_path_factory):
    nproc, extra = LAYOUTS[request.param]
    base = tmp_path_factory.mktemp(f"exact_{request.param}")
    train(args(tiny_data, base / "a", extra), nproc=nproc)
    train(args(tiny_data, base / "b", extra) + [f"--stop-after-steps={STEPS // 2}"], nproc=nproc)
    train(args(tiny_data, base / "b", extra) + ["--resume", "auto"], nproc=nproc)
    return base / "a", base / "b"


def test_per_step_loss_and_grad_norm_are_bitwise_equal(runs):
    a, b = (read_metrics(r) for r in runs)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        for key in ("train/loss", "train/grad_norm", "train/lr"):
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])
    assert all(math.isfinite(a[s]["train/loss"]) for s in a)


def test_every_state_of_the_final_checkpoint_is_equal(runs):
    a, b = (r / "checkpoints" / f"step_{STEPS:08d}" for r in runs)
    files = sorted(p.relative_to(a) for p in a.rglob("*.pt"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.pt"))
    assert any("optim_states" in str(f) for f in files) and any("rank_state" in str(f) for f in files)
    runs_named = (str(runs[0]), str(runs[1]))  # the run directory is the only thing allowed to differ
    compared = 0
    for rel in files:
        compared += assert_same(torch.load(a / rel, weights_only=False, map_location="cpu"),
                                torch.load(b / rel, weights_only=False, map_location="cpu"), str(rel), runs_named)
    assert compared > 50  # weights, master weights, moments, RNG, cursors, memory state: all reached
    optim = torch.load(next(a.glob("*optim_states.pt")), weights_only=False, map_location="cpu")
    assert optimizer_steps(optim) and all(s > 0 for s in optimizer_steps(optim))


def assert_same(x, y, where: str, run_dirs: tuple[str, str]) -> int:
    """Recursively assert equality (tensors with torch.equal, dtype and shape; strings up to the
    two runs' directory names); returns the number of tensors compared."""
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape, where
        assert torch.equal(x, y), f"{where}: tensors differ (max |diff| {(x.double() - y.double()).abs().max()})"
        return 1
    if isinstance(x, dict):
        keys = set(x) - WALL_CLOCK_KEYS
        assert keys == set(y) - WALL_CLOCK_KEYS, f"{where}: keys {sorted(map(str, keys ^ (set(y) - WALL_CLOCK_KEYS)))}"
        return sum(assert_same(x[k], y[k], f"{where}/{k}", run_dirs) for k in keys)
    if isinstance(x, (list, tuple)):
        assert type(x) is type(y) and len(x) == len(y), where
        return sum(assert_same(u, v, f"{where}[{i}]", run_dirs) for i, (u, v) in enumerate(zip(x, y)))
    if hasattr(x, "__getstate__") and not isinstance(x, (str, bytes, int, float, bool, type(None))):
        state_x, state_y = x.__getstate__(), y.__getstate__()
        if state_x is not None and not isinstance(state_x, type(x)):
            return assert_same(state_x, state_y, f"{where}<{type(x).__name__}>", run_dirs)
    if isinstance(x, str) and isinstance(y, str):
        x, y = x.replace(run_dirs[0], "<run>"), y.replace(run_dirs[1], "<run>")
    assert x == y, f"{where}: {x!r} != {y!r}"
    return 0


def optimizer_steps(optim_file: dict) -> list[float]:
    """Adam step counts found anywhere in a DeepSpeed optimizer file."""
    found: list[float] = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "step":
                    found.append(float(v))
                else:
                    walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)

    walk(optim_file)
    return found
