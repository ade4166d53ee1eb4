"""Cost of reading long documents: the memory model streamed segment by segment vs. a
full-causal-attention model of the same size over the whole document.

For each document length (default 2K, 8K, 32K, 64K tokens) and each model, a fresh process
evaluates one document (forward only, like evaluation or prefill) and reports tokens/s and the
process's peak resident memory. The memory model's cost per token must stay flat in document
length (its state is fixed-size); full attention grows with the length.

    python benchmarks/streaming_cost.py                       # tiny config sizes
    python benchmarks/streaming_cost.py --lengths 2048,65536 --full-max 32768
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from memgpt_dist.config import load_config
from memgpt_dist.model import GPT


def build(kind: str, length: int, n_layer: int, n_embd: int, n_head: int, segment_len: int) -> GPT:
    """kind 'memory': segment-local attention + memory; 'full': full causal attention over `length`."""
    seg = segment_len if kind == "memory" else length
    cfg = load_config(None, [f"model.n_layer={n_layer}", f"model.n_embd={n_embd}", f"model.n_head={n_head}",
                             f"model.segment_len={seg}", "model.vocab_size=4096",
                             f"memory.enabled={'true' if kind == 'memory' else 'false'}"])
    model = GPT(cfg.model, cfg.memory)
    model.init_weights()
    return model.eval()


@torch.no_grad()
def run_one(kind: str, length: int, args) -> dict:
    """Evaluate one document of `length` tokens; runs in its own process (clean peak memory)."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = build(kind, length, args.n_layer, args.n_embd, args.n_head, args.segment_len)
    ids = torch.randint(0, 4096, (1, length))
    model(ids[:, :args.segment_len])  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(args.repeats):  # best of a few: short documents take a fraction of a second
        t0 = time.perf_counter()
        if kind == "memory":
            state = None
            for chunk in ids.split(args.segment_len * args.segments_per_call, dim=1):
                state = model(chunk, state=state).state  # (1, C) -> memory after the chunk
        else:
            model(ids)
        times.append(time.perf_counter() - t0)
    dt = min(times)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"kind": kind, "length": length, "tokens_per_s": length / dt, "seconds": dt, "peak_rss_mb": peak_mb}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="2048,8192,32768,65536")
    p.add_argument("--full-max", type=int, default=65536, help="longest document given to full attention")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--segment-len", type=int, default=64)
    p.add_argument("--segments-per-call", type=int, default=16, help="segments per forward while streaming")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # "kind:length", child process
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.one:
        kind, length = args.one.split(":")
        print(json.dumps(run_one(kind, int(length), args)))
        return 0
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        for kind in ("memory", "full"):
            if kind == "full" and length > args.full_max:
                continue
            cmd = [sys.executable, __file__, "--one", f"{kind}:{length}", *_passthrough(args)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{kind:7s} {length:>7,d} tokens  {r['tokens_per_s']:>9,.0f} tok/s  peak {r['peak_rss_mb']:>7,.0f} MB",
                  flush=True)
    mem = {r["length"]: r for r in rows if r["kind"] == "memory"}
    full = {r["length"]: r for r in rows if r["kind"] == "full"}
    lo, hi = min(mem), max(mem)
    print(f"\nmemory model: tok/s at {hi:,} / at {lo:,} = {mem[hi]['tokens_per_s'] / mem[lo]['tokens_per_s']:.2f} "
          f"(target >= 0.85: flat cost per token)")
    if full:
        top = max(full)
        print(f"at {top:,} tokens: memory / full attention tok/s = "
              f"{mem[top]['tokens_per_s'] / full[top]['tokens_per_s']:.2f}x, peak memory "
              f"{mem[top]['peak_rss_mb']:,.0f} vs {full[top]['peak_rss_mb']:,.0f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def _passthrough(args) -> list[str]:
    return ["--n-layer", str(args.n_layer), "--n-embd", str(args.n_embd), "--n-head", str(args.n_head),
            "--segment-len", str(args.segment_len), "--segments-per-call", str(args.segments_per_call),
            "--threads", str(args.threads), "--repeats", str(args.repeats)]


if __name__ == "__main__":
    sys.exit(main())
