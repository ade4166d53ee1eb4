"""Measure this machine's dense matmul peak, the value to give `perf.peak_tflops` where the device
table has none (every CPU): `python benchmarks/matmul_peak.py [--device cpu] [--dtype fp32]`.

Times square matmuls of a few sizes, best of `--repeats` each, and prints the best rate in
TFLOP/s (2 n^3 FLOPs per n x n matmul). On CPU it uses the threads torch uses in training
(OMP_NUM_THREADS / torch.get_num_threads()), so run it with the same setting as the job.
"""
from __future__ import annotations

import argparse
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def matmul_tflops(n: int, device: str, dtype: torch.dtype, repeats: int) -> float:
    """Best TFLOP/s of an (n, n) @ (n, n) matmul over `repeats` timed runs (after one warm-up)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--sizes", default="256,512,1024,2048")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]
    rates = {n: matmul_tflops(n, args.device, DTYPES[args.dtype], args.repeats) for n in sizes}
    for n, r in rates.items():
        print(f"{args.device} {args.dtype} matmul {n}x{n}: {r:.4f} TFLOP/s")
    print(f"threads {torch.get_num_threads()}; best {max(rates.values()):.4f} TFLOP/s -> "
          f"--perf.peak_tflops={max(rates.values()):.4g}")


if __name__ == "__main__":
    main()
