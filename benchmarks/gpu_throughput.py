"""Training throughput and MFU on one GPU, all in one run: the environment, a transformers baseline,
our training step in its variants, and PASS/FAIL per target.

    python benchmarks/gpu_throughput.py                      # one H100/H200: <= 8 minutes
    python benchmarks/gpu_throughput.py --device cpu --tiny  # the same code at toy size (tests)

First the environment (CUDA, bf16, which SDPA backend our segment attention gets, which fused
kernels are active). Then, per size (125M and 350M: configs/gpt-125m.yaml, gpt-350m.yaml; context
segment_len x n_segments = 2048 tokens):
  (a) transformers GPT2LMHeadModel of the same width/depth/context (SDPA, bf16 autocast, fused
      torch AdamW), a plain loop: the baseline
  (b) our real training step (Trainer.train_step around a one-process DeepSpeed engine, bf16):
      memory off and on (as the configs ship it: memory.layers every:4; and in every block),
      ZeRO-0 and ZeRO-3, train.compile off and on
Each variant: tokens/s (every input token), MFU (our FLOPs accounting, memgpt_dist/perf/flops.py,
over the device's dense bf16 peak; transformers' full causal attention counted the same way), peak
memory (torch.cuda.max_memory_allocated; RSS on CPU, which only grows). Targets: >= 45% MFU at 350M
memory off; memory on (as shipped) >= 0.85x memory off; ZeRO-3 >= 0.9x ZeRO-0; ours (memory off) >= 1.1x (a).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

from memgpt_dist.config import TrainConfig, load_config  # noqa: E402
from memgpt_dist.perf.device import device_name, peak_memory_gb, peak_tflops  # noqa: E402
from memgpt_dist.perf.flops import count_flops, train_flops_per_token  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"125m": "configs/gpt-125m.yaml", "350m": "configs/gpt-350m.yaml"}
GPU_MICRO_BATCH = 8  # 16K tokens per step at a 2048-token context
# tiny: the GPU configs' structure at toy width (CPU, tests)
TINY = ["model.vocab_size=512", "model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.segment_len=16",
        "data.n_segments=2", "parallel.micro_batch_size=2"]


@dataclass(frozen=True)
class Variant:
    name: str
    memory: bool = False
    zero: int = 0
    compile: bool = False
    hf: bool = False
    layers: Optional[str] = None  # memory.layers over the config's (None: as the config ships it)


VARIANTS = (
    Variant("a_transformers_gpt2", hf=True),
    Variant("ours_mem_off_zero0"),
    Variant("ours_mem_on_zero0", memory=True),
    Variant("ours_mem_all_zero0", memory=True, layers=""),  # memory in every block (the configs ship every:4)
    Variant("ours_mem_off_zero3", zero=3),
    Variant("ours_mem_off_zero0_compile", compile=True),
    Variant("ours_mem_on_zero0_compile", memory=True, compile=True),
)


def make_cfg(size: str, v: Variant, device: str, tiny: bool, steps: int) -> TrainConfig:
    over = [f"memory.enabled={str(v.memory).lower()}", f"parallel.zero_stage={v.zero}",
            f"train.compile={str(v.compile).lower()}", f"train.max_steps={steps}", "optim.warmup_steps=1",
            "log.tensorboard=false", "train.eval_every=0", "checkpoint.every=0",
            f"parallel.precision={'bf16' if device == 'cuda' else 'fp32'}"]
    over += TINY if tiny else [f"parallel.micro_batch_size={GPU_MICRO_BATCH}"]
    if v.layers is not None:
        over.append(f"memory.layers={v.layers}")
    return load_config(ROOT / SIZES[size], over)


# ------------------------------------------------------------------------------- environment


def sdpa_backend(device: str) -> str:
    """The kernel torch's SDPA launches for our attention call (causal, no mask, bf16, segment-sized),
    read from the profiler: 'flash', 'efficient', 'cudnn' or 'math'."""
    if device != "cuda":
        return "math/cpu (the CPU kernels; flash is a CUDA backend)"
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    q = torch.randn(8, 16, 512, 64, device="cuda", dtype=torch.bfloat16)  # (B*S, H, n, hd) as in model/gpt.py
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
        torch.cuda.synchronize()
    names = " ".join(e.key.lower() for e in prof.key_averages())
    for key, label in (("flash", "flash"), ("cudnn", "cudnn"), ("efficient", "efficient"), ("fmha", "efficient")):
        if key in names:
            return label
    return f"math ({names[:120]})"


def fused_adam_status(device: str) -> str:
    if device != "cuda":
        return "torch AdamW (CPU: DeepSpeed's FusedAdam needs CUDA)"
    try:
        from deepspeed.ops.op_builder import FusedAdamBuilder

        return "DeepSpeed FusedAdam: " + ("compatible" if FusedAdamBuilder().is_compatible() else "NOT compatible")
    except Exception as exc:
        return f"DeepSpeed FusedAdam unavailable ({type(exc).__name__}: {exc})"


def environment(device: str, peak: float | None, peak_src: str) -> dict[str, str]:
    from memgpt_dist.perf.kernels import select_linear_cross_entropy

    import deepspeed

    env = {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "device": device_name(device),
           "cuda": str(torch.version.cuda) if device == "cuda" else "not used",
           "bf16": str(device == "cuda" and torch.cuda.is_bf16_supported()),
           "sdpa backend (our attention)": sdpa_backend(device),
           "linear cross-entropy": select_linear_cross_entropy(device).reason,
           "optimizer": fused_adam_status(device),
           "peak": f"{peak:g} TFLOP/s ({peak_src})" if peak else peak_src}
    if device == "cuda":
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["tf32 matmul"] = str(torch.backends.cuda.matmul.allow_tf32)
    return env


# ------------------------------------------------------------------------------- variants


def hf_step(cfg: TrainConfig, device: str):
    """transformers GPT-2 of our width/depth/context, SDPA, bf16 autocast, fused torch AdamW."""
    from transformers import GPT2Config, GPT2LMHeadModel

    m, T = cfg.model, cfg.model.segment_len * cfg.data.n_segments
    model = GPT2LMHeadModel(GPT2Config(vocab_size=m.vocab_size, n_positions=T, n_embd=m.n_embd, n_layer=m.n_layer,
                                       n_head=m.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                       bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    def step(b):
        with torch.autocast(device_type=device, dtype=dtype, enabled=device == "cuda"):
            loss = model(input_ids=b["input_ids"].to(device), labels=b["input_ids"].to(device)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return step, model


def ours_step(cfg: TrainConfig, batches, topo):
    from train_throughput import engine_step

    fn = engine_step(cfg, batches, topo)
    return fn, fn


def flops_per_token(cfg: TrainConfig, hf: bool) -> float:
    """Training FLOPs per token; transformers' attention is full causal over the whole context."""
    if not hf:
        return train_flops_per_token(cfg)
    T = cfg.model.segment_len * cfg.data.n_segments
    from dataclasses import replace

    return 3 * count_flops(replace(cfg.model, segment_len=T), replace(cfg.memory, enabled=False), T).per_token


def time_steps(fn, batches, warmup: int, device: str) -> float:
    """Tokens/s of `fn` over `batches` after `warmup` untimed steps (compilation happens there)."""
    for b in batches[:warmup]:
        fn(b)
    sync(device)
    t0 = time.perf_counter()
    for b in batches[warmup:]:
        fn(b)
    sync(device)
    return sum(b["input_ids"].numel() for b in batches[warmup:]) / (time.perf_counter() - t0)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_variant(size: str, v: Variant, args, topo, peak: float | None) -> dict[str, float]:
    from train_throughput import make_batches

    cfg = make_cfg(size, v, args.device, args.tiny, args.steps + args.warmup)
    batches = make_batches(cfg, args.steps + args.warmup)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fn, keep = hf_step(cfg, args.device) if v.hf else ours_step(cfg, batches, topo)
    tps = time_steps(fn, batches, args.warmup, args.device)
    tflops = tps * flops_per_token(cfg, v.hf) / 1e12
    out = {"tokens_per_s": tps, "tflops": tflops, "mfu": tflops / peak if peak else float("nan"),
           "peak_mem_gb": peak_memory_gb(args.device), "seconds": time.perf_counter() - t0}
    del fn, keep
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return out


def guarded(size: str, v: Variant, args, topo, peak: float | None) -> dict[str, float]:
    """`run_variant`, or on an error (a kernel that will not build on this machine, out of memory)
    its message, so that one broken variant does not cost the rest of a GPU run's figures."""
    try:
        return run_variant(size, v, args, topo, peak)
    except Exception as exc:  # reported in the table and as FAIL by the targets that need it
        print(f"   {size} {v.name}: {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr)
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


# ------------------------------------------------------------------------------- report


def targets(size: str, r: dict[str, dict[str, float]]) -> list[tuple[str, float, float]]:
    """(what, measured, target) for the variants measured at this size."""
    r = {k: v for k, v in r.items() if "error" not in v}
    tps = {k: v["tokens_per_s"] for k, v in r.items()}
    best_off = max(tps.get("ours_mem_off_zero0", 0.0), tps.get("ours_mem_off_zero0_compile", 0.0))
    out = []
    mfus = [r[k]["mfu"] for k in ("ours_mem_off_zero0", "ours_mem_off_zero0_compile") if k in r]
    if size == "350m" and mfus and all(m == m for m in mfus):  # nan: no peak known (CPU)
        out.append(("MFU, memory off (best of compile off/on)", max(mfus), 0.45))
    for suffix in ("", "_compile"):
        if f"ours_mem_on_zero0{suffix}" in tps and f"ours_mem_off_zero0{suffix}" in tps:
            out.append((f"memory on / off{suffix.replace('_', ', ')}",
                        tps[f"ours_mem_on_zero0{suffix}"] / tps[f"ours_mem_off_zero0{suffix}"], 0.85))
    if "ours_mem_all_zero0" in tps and "ours_mem_off_zero0" in tps:
        out.append(("memory in every block / off", tps["ours_mem_all_zero0"] / tps["ours_mem_off_zero0"], 0.85))
    if "ours_mem_off_zero3" in tps and "ours_mem_off_zero0" in tps:
        out.append(("ZeRO-3 / ZeRO-0 (memory off)", tps["ours_mem_off_zero3"] / tps["ours_mem_off_zero0"], 0.9))
    if "a_transformers_gpt2" in tps:
        out.append(("ours memory off (best) / transformers", best_off / tps["a_transformers_gpt2"], 1.1))
    return out


def report(size: str, r: dict[str, dict[str, float]], tiny: bool) -> None:
    base = r.get("a_transformers_gpt2", {}).get("tokens_per_s")
    print(f"\n== {size}: {'variant':28s} {'tokens/s':>12s} {'vs (a)':>7s} {'TFLOP/s':>8s} {'MFU':>6s} "
          f"{'peak mem':>9s} {'wall':>6s}")
    for k, v in r.items():
        if "error" in v:
            print(f"   {'':5s}{k:28s} ERROR {v['error']}")
            continue
        ratio = f"{v['tokens_per_s'] / base:6.2f}x" if base else "      -"
        mfu = f"{100 * v['mfu']:5.1f}%" if v["mfu"] == v["mfu"] else "     -"
        print(f"   {'':5s}{k:28s} {v['tokens_per_s']:12,.0f} {ratio} {v['tflops']:8.2f} {mfu} "
              f"{v['peak_mem_gb']:7.2f}GB {v['seconds']:5.0f}s")
    if tiny:
        print("   (--tiny: toy widths on the code path; the figures mean nothing)")
    for what, got, want in targets(size, r):
        print(f"   {'PASS' if got >= want else 'FAIL'}  {what}: {got:.3f} (target >= {want})")
    for k, v in r.items():
        if "error" in v:
            print(f"   FAIL  {k} did not run, so neither did the targets that compare it")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="toy widths (CPU, tests): the code path, not the figures")
    p.add_argument("--sizes", default="125m,350m")
    p.add_argument("--variants", default=",".join(v.name for v in VARIANTS))
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10; tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3; tiny 1)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="peak of one device (default: the GPU table)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    args.steps = args.steps or (2 if args.tiny else 10)
    args.warmup = args.warmup or (1 if args.tiny else 3)
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from memgpt_dist.parallel.dist import init_distributed

    topo = init_distributed()
    peak, peak_src = peak_tflops(args.device, args.peak_tflops)
    print("== environment")
    for k, v in environment(args.device, peak, peak_src).items():
        print(f"   {k:30s} {v}")
    chosen = [v for v in VARIANTS if v.name in args.variants.split(",")]
    results = {}
    for size in args.sizes.split(","):
        results[size] = {v.name: guarded(size, v, args, topo, peak) for v in chosen}
        report(size, results[size], args.tiny)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
