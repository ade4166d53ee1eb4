"""ZeRO-3 at one process against ZeRO-0, and DeepSpeed's own ZeRO-3 settings as levers, in one run.

    python benchmarks/zero3_settings.py                 # ~20M, memory on, 2 threads
    python benchmarks/zero3_settings.py --size tiny

Every variant is our real training step (benchmarks/train_throughput.py's `engine_step`: the
trainer around a one-process DeepSpeed engine) on the same batches, taking turns in rounds. The
ZeRO-3 variants add keys to the `zero_optimization` dict that
memgpt_dist/parallel/deepspeed_config.py generates:
  persist_all   stage3_param_persistence_threshold / stage3_model_persistence_threshold = 1e12:
                every parameter stays gathered (no fetch or release around each module)
  big_prefetch  stage3_prefetch_bucket_size 1e9, stage3_max_live_parameters and
                stage3_max_reuse_distance 1e10: fetch everything ahead, release nothing early
  sub_group     sub_group_size 1e7: the optimizer steps over smaller flat groups
  reduce_scatter  reduce_scatter true (DeepSpeed's default, and ours before): a reduce-scatter
                per parameter instead of one all-reduce of the gradient bucket, sliced; at one
                process both only copy, and the generated dict chooses the all-reduce there
Target: ZeRO-3 >= 0.9x ZeRO-0 (issue 16 item 8).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import train_throughput as tt  # noqa: E402
from memgpt_dist.parallel import deepspeed_config  # noqa: E402

KNOBS = {
    "zero3_default": {},
    "zero3_persist_all": {"stage3_param_persistence_threshold": 10**12, "stage3_model_persistence_threshold": 10**12},
    "zero3_big_prefetch": {"stage3_prefetch_bucket_size": 10**9, "stage3_max_live_parameters": 10**10,
                           "stage3_max_reuse_distance": 10**10},
    "zero3_sub_group": {"sub_group_size": 10**7},
    "zero3_reduce_scatter": {"reduce_scatter": True},
}


def with_knobs(extra: dict):
    """`deepspeed_config._zero` with `extra` added to its ZeRO-3 dict (the engine reads it at build)."""
    base = deepspeed_config._zero

    def zero(stage, *args, **kw):
        out = base(stage, *args, **kw)
        if stage == 3:
            out.update(extra)
        return out
    return zero


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="20m", choices=sorted(tt.SIZES))
    p.add_argument("--steps", type=int, default=9, help="timed steps per variant, split over the rounds")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory", choices=("on", "off"), default="on")
    p.add_argument("--knobs", default=",".join(KNOBS), help="ZeRO-3 variants to run, comma-separated")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from memgpt_dist.parallel.dist import init_distributed

    topo, n, mem = init_distributed(), args.steps + args.warmup, args.memory == "on"
    cfg0 = tt.make_cfg(args.size, mem, 0, n)
    batches = tt.make_batches(cfg0, n)
    fns = {"zero0": tt.engine_step(cfg0, batches, topo)}
    base = deepspeed_config._zero
    try:
        for name in args.knobs.split(","):
            deepspeed_config._zero = with_knobs(KNOBS[name])
            fns[name] = tt.engine_step(tt.make_cfg(args.size, mem, 3, n), batches, topo)
    finally:
        deepspeed_config._zero = base
    rates = tt.measure(fns, batches, args.warmup, args.rounds)
    print(f"\n== {args.size}, memory {args.memory}: tokens/s (median of {args.rounds} rounds), ratio to ZeRO-0")
    for name, v in rates.items():
        print(f"  {name:20s} {v:10,.0f}  {v / rates['zero0']:.3f}x  {'(target >= 0.9)' if name != 'zero0' else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
