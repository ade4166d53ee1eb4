"""What one device can do and what it used: peak FLOP/s by device name, peak memory.

MFU is model FLOPs per second over the device's peak. The peaks below are the dense (no 2:4
sparsity) bf16/fp16 tensor-core figures of the vendors' datasheets, the denominator llm-foundry,
torchtitan and nanotron use, whatever precision the run trains in (an fp32 run shows a low MFU,
as it should). The name is matched against `torch.cuda.get_device_name()` (e.g. "NVIDIA H100 80GB
HBM3" is the SXM part, "NVIDIA H100 PCIe" the PCIe one); `perf.peak_tflops` overrides the table,
and is the only way to get an MFU on a CPU or on a device the table does not hold: measure one
with `python benchmarks/matmul_peak.py` (the best dense matmul rate this machine reaches).
"""
from __future__ import annotations

import resource
import sys
from typing import Optional

# (substrings that must all appear in the lower-cased device name, dense bf16 TFLOP/s), most
# specific first: the first match wins
PEAK_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("h100", "pcie"), 756.0),
    (("h100", "nvl"), 835.0),
    (("h100",), 989.0),  # SXM (HBM3); also "H100 80GB HBM3"
    (("h200",), 989.0),  # same compute as H100 SXM, more and faster memory
    (("gh200",), 989.0),
    (("h800",), 989.0),
    (("h20",), 148.0),
    (("b200",), 2250.0),
    (("a100",), 312.0),  # 40 GB and 80 GB, SXM4 and PCIe
    (("a800",), 312.0),
    (("l40s",), 362.0),
    (("l40",), 181.0),
    (("l4",), 121.0),
    (("a10g",), 125.0),  # AWS's A10 variant; the A10 datasheet's figure, unverified on an A10G
    (("a10",), 125.0),
    (("a6000",), 155.0),
    (("v100",), 125.0),  # fp16 tensor cores (no bf16): SXM2; the PCIe card is 112
    (("mi300x",), 1307.0),
    (("mi250x",), 383.0),
)


def table_peak_tflops(device_name: str) -> Optional[float]:
    """The table's peak for a device name, or None when no entry matches."""
    name = device_name.lower()
    for keys, tflops in PEAK_TFLOPS:
        if all(k in name for k in keys):
            return tflops
    return None


def device_name(device_type: str) -> str:
    """What torch calls this process's device ("cpu" on CPU)."""
    if device_type != "cuda":
        return device_type
    import torch

    return torch.cuda.get_device_name()


def peak_tflops(device_type: str, override: float) -> tuple[Optional[float], str]:
    """(peak TFLOP/s of one device or None, where it came from): `perf.peak_tflops` when > 0,
    else the table for a GPU; None on CPU (no meaningful table) or for an unknown GPU."""
    if override > 0:
        return override, f"perf.peak_tflops={override:g}"
    if device_type == "cpu":
        return None, "none on CPU: set perf.peak_tflops to a measured peak (python benchmarks/matmul_peak.py)"
    name = device_name(device_type)
    found = table_peak_tflops(name)
    if found is None:
        return None, f"device {name!r} is not in memgpt_dist/perf/device.py's table: set perf.peak_tflops"
    return found, f"{name}: {found:g} TFLOP/s dense bf16 (memgpt_dist/perf/device.py)"


def peak_memory_gb(device_type: str) -> float:
    """This process's peak memory so far, in GB (1e9 bytes): the accelerator's
    `max_memory_allocated` on CUDA, the resident set's high-water mark (ru_maxrss) on CPU."""
    if device_type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024) / 1e9  # bytes on macOS, KiB on Linux
