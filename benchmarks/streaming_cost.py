"""Cost of reading long documents: the memory model streamed segment by segment vs. the same
model with memory off (streamed alike) and a full-causal-attention model of the same size over
the whole document. Targets (issue 16), each printed PASS/FAIL from this one run: at the
shortest length the memory model reads >= 0.7x the memory-off model's tokens/s; its tokens/s at
the longest length is within 15% of the shortest; it reads faster than full attention at every
length from 16K tokens on.

Each (model, length) runs in a fresh process (`benchmarks/streaming.py`): forward only, tokens/s
and the process's peak memory. `memgpt-eval --streaming` measures the same for a checkpoint.

    python benchmarks/streaming_cost.py                       # tiny config sizes
    python benchmarks/streaming_cost.py --lengths 2048,65536 --full-max 32768
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from memgpt_dist.config import load_config
from streaming import format_streaming_table, streaming_costs, summary, targets  # benchmarks/streaming.py


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml", help="model and memory shape to measure")
    p.add_argument("--lengths", default="2048,8192,32768,65536")
    p.add_argument("--full-max", type=int, default=65536, help="longest document given to full attention")
    p.add_argument("--segments-per-call", type=int, default=16, help="segments per forward while streaming")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-memory-off", action="store_true", help="skip the memory-off column (and its target)")
    p.add_argument("--json", default=None)
    args, overrides = p.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    rows = streaming_costs(cfg.model, cfg.memory, [int(x) for x in args.lengths.split(",")], args.full_max,
                           device=args.device, threads=args.threads, segments_per_call=args.segments_per_call,
                           repeats=args.repeats, memory_off=not args.no_memory_off)
    print(format_streaming_table(rows))
    for passed, line in targets(rows):
        print(f"{'PASS' if passed else 'FAIL'}  {line}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": [dataclasses.asdict(r) for r in rows], "summary": summary(rows)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
