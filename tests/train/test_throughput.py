"""The perf scalars of every run: written to TensorBoard at logging steps, averaged over the window,
consistent with the FLOPs count, and MFU only where a peak is known."""
from __future__ import annotations

from pathlib import Path

import pytest

from inprocess import OVERRIDES, Batches
from memgpt_dist.config import load_config
from memgpt_dist.parallel.dist import init_distributed
from memgpt_dist.perf.device import peak_tflops, table_peak_tflops
from memgpt_dist.perf.flops import train_flops_per_token
from memgpt_dist.perf.throughput import ThroughputWindow
from memgpt_dist.train.checkpoint import CheckpointDir
from memgpt_dist.train.metrics import MetricsLogger
from memgpt_dist.train.run import build_step, build_trainer

PERF_KEYS = ("perf/tokens_per_s_per_device", "perf/loss_tokens_per_s_per_device", "perf/tflops_per_device",
             "perf/peak_mem_gb")


@pytest.fixture(scope="module")
def topo():
    return init_distributed()


def run(topo, root: Path, *extra: str):
    """Six steps of the in-process trainer logging every 2 steps to TensorBoard under root."""
    cfg = load_config(None, OVERRIDES + [f"run_dir={root}", "parallel.zero_stage=0", "log.every=2",
                                         "train.max_steps=6", *extra])
    metrics = MetricsLogger(root / "tensorboard", enabled=True, tensorboard=True, jsonl=root / "metrics.jsonl")
    trainer = build_trainer(cfg, topo, build_step(cfg, topo), Batches(cfg), None,
                            CheckpointDir(root / "checkpoints", topo, keep_last=1), metrics)
    trainer.fit()
    metrics.close()
    return cfg


def scalars(root: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(root / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_perf_scalars_reach_tensorboard_with_mfu_from_the_override(topo, tmp_path):
    cfg = run(topo, tmp_path, "perf.peak_tflops=0.5")
    tb = scalars(tmp_path)
    for key in (*PERF_KEYS, "perf/mfu"):
        assert [s for s, _ in tb[key]] == [1, 2, 4, 6], key  # logging steps only
        assert all(v > 0 for _, v in tb[key]), key
    tokens = dict(tb["perf/tokens_per_s_per_device"])
    tflops = dict(tb["perf/tflops_per_device"])
    per_token = train_flops_per_token(cfg)
    for step in tokens:  # TFLOP/s = tokens/s x FLOPs per token; MFU = TFLOP/s / peak
        assert tflops[step] == pytest.approx(tokens[step] * per_token / 1e12, rel=1e-4)
        assert dict(tb["perf/mfu"])[step] == pytest.approx(tflops[step] / 0.5, rel=1e-4)
    # synthetic batches: every input token carries a label
    assert dict(tb["perf/loss_tokens_per_s_per_device"]) == pytest.approx(tokens, rel=1e-6)


def test_no_mfu_on_cpu_without_a_peak(topo, tmp_path):
    tb = scalars(tmp_path) if run(topo, tmp_path) else {}
    assert "perf/mfu" not in tb and all(k in tb for k in PERF_KEYS)


def test_window_averages_over_its_steps():
    w = ThroughputWindow()
    w.add(1.0, input_tokens=1000, loss_tokens=500, flops=4e12)
    w.add(3.0, input_tokens=3000, loss_tokens=1500, flops=12e12)
    f = w.figures(world_size=2, peak_tflops=4.0)
    assert f["perf/tokens_per_s_per_device"] == 500  # 4000 tokens / 4 s / 2 devices
    assert f["perf/loss_tokens_per_s_per_device"] == 250
    assert f["perf/tflops_per_device"] == 2 and f["perf/mfu"] == 0.5


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                          ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-40GB", 312),
                                          ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA L40S", 362), ("NVIDIA A10G", 125),
                                          ("Tesla V100-SXM2-32GB", 125), ("AMD Instinct MI300X", 1307)])
def test_peak_table_by_device_name(name, tflops):
    assert table_peak_tflops(name) == tflops


def test_peak_override_and_cpu():
    assert peak_tflops("cpu", 0.0)[0] is None and "perf.peak_tflops" in peak_tflops("cpu", 0.0)[1]
    assert peak_tflops("cpu", 1.5) == (1.5, "perf.peak_tflops=1.5")
    assert table_peak_tflops("Some Future Accelerator") is None
