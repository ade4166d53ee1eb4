"""benchmarks/gpu_throughput.py runs end to end at toy size on CPU (`--device cpu --tiny`): the
environment check, every non-compiled variant through the real training step, and a PASS/FAIL line
per target. The compiled variants' path is tests/perf/test_compile.py's (inductor's first build of
the memory model takes minutes on a 2-core CPU)."""
from __future__ import annotations

import json
import sys

from helpers import ROOT, run_cmd

VARIANTS = "a_transformers_gpt2,ours_mem_off_zero0,ours_mem_on_zero0,ours_mem_all_zero0,ours_mem_off_zero3"


def test_the_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "figures.json"
    proc = run_cmd([sys.executable, str(ROOT / "benchmarks/gpu_throughput.py"), "--device", "cpu", "--tiny",
                    "--sizes", "350m", "--variants", VARIANTS, "--peak-tflops", "0.05", "--json", str(out)],
                   timeout=600)
    text = proc.stdout
    env = text[text.index("== environment"):text.index("== 350m")]
    for key in ("torch", "deepspeed", "sdpa backend (our attention)", "linear cross-entropy", "optimizer", "peak"):
        assert key in env, key
    assert "liger-kernel needs CUDA" in env
    figures = json.loads(out.read_text())["350m"]
    assert list(figures) == VARIANTS.split(",")
    assert all(f["tokens_per_s"] > 0 and 0 < f["mfu"] < 1 and f["peak_mem_gb"] > 0 for f in figures.values())
    verdicts = [line.split()[0] for line in text.splitlines() if line.strip().startswith(("PASS", "FAIL"))]
    assert len(verdicts) == 5, text[-3000:]  # MFU, memory on/off, every block/off, ZeRO-3/ZeRO-0, ours/transformers


def test_memory_on_is_the_configs_placement_and_every_block_is_measured_beside_it():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_throughput as gt

    variants = {v.name: v for v in gt.VARIANTS}
    shipped = gt.make_cfg("125m", variants["ours_mem_on_zero0"], "cpu", tiny=False, steps=2)
    every = gt.make_cfg("125m", variants["ours_mem_all_zero0"], "cpu", tiny=False, steps=2)
    assert shipped.memory.memory_layers(shipped.model.n_layer) == (0, 4, 8)  # configs/gpt-125m.yaml: every:4
    assert every.memory.memory_layers(every.model.n_layer) == tuple(range(12))
