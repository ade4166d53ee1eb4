"""Training throughput on CPU, all measured in one run on the same batches.

(a) Hugging Face GPT2LMHeadModel of the same width/depth/context, plain torch AdamW loop (baseline)
(b) our GPT, memory off and on, in the same plain loop
(c) our real training step (Trainer.train_step around a DeepSpeed engine, 1 process), ZeRO-0 and ZeRO-3

The variants take turns in rounds (median tokens/s over rounds), so a noisy shared machine does
not favour one of them. Prints tokens/s for each and the ratio to (a). Targets at ~20M parameters: (b) memory off >= 1.0x
of (a), memory on >= 0.85x of memory off (also for each `--levers` variant); (c) ZeRO-3 >= 0.9x of ZeRO-0.

    python benchmarks/train_throughput.py                 # tiny and ~20M
    python benchmarks/train_throughput.py --sizes 20m --steps 20
    python benchmarks/train_throughput.py --sizes 20m --levers nu=1,layers=every:2,layers=every:4,layers=0
    python benchmarks/train_throughput.py --sizes 20m --compile --warmup 3   # + compiled blocks (b)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

if __name__ == "__main__":  # a CPU benchmark; gpu_throughput.py imports its helpers on a GPU
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from memgpt_dist.config import TrainConfig, load_config  # noqa: E402

SIZES = {
    # name: (vocab, n_layer, n_head, n_embd, segment_len, n_segments, micro_batch)
    "tiny": (4096, 2, 4, 128, 64, 4, 4),
    "20m": (16384, 8, 6, 384, 64, 4, 4),
}


# Memory-cost levers (`--levers`): memory-on variants of (b), each reported against memory off.
# Their quality is measured apart (benchmarks/long_range.py, long_context_lm.py; README).
LEVERS = {
    "nu=2": ("memory.nu=2",),  # DPFP order: 2*nu*head_dim key features (default 3)
    "nu=1": ("memory.nu=1",),
    "conv=0": ("memory.conv=0",),  # no causal convolution on the memory's q, k, v
    "layers=every:2": ("memory.layers=every:2",),  # the memory in blocks 0, 2, 4, 6 of 8 only
    "layers=every:4": ("memory.layers=every:4",),  # in blocks 0 and 4 only
    "layers=every:4+nu=1": ("memory.layers=every:4", "memory.nu=1"),  # both levers together
    "layers=0": ("memory.layers=0",),  # in the first block only (where recall is learned: README)
}


def make_cfg(size: str, memory: bool, zero_stage: int = 0, steps: int = 100, extra: tuple[str, ...] = ()) -> TrainConfig:
    vocab, n_layer, n_head, n_embd, seg, k, mb = SIZES[size]
    return load_config(None, [
        f"model.vocab_size={vocab}", f"model.n_layer={n_layer}", f"model.n_head={n_head}",
        f"model.n_embd={n_embd}", f"model.segment_len={seg}", f"data.n_segments={k}",
        f"parallel.micro_batch_size={mb}", f"parallel.zero_stage={zero_stage}", f"memory.enabled={str(memory).lower()}",
        f"train.max_steps={steps}", "optim.warmup_steps=1", "log.tensorboard=false", *extra,
    ])


def make_batches(cfg: TrainConfig, n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    B, K, N = cfg.parallel.micro_batch_size, cfg.data.n_segments, cfg.model.segment_len
    out = []
    for _ in range(n):
        ids = torch.randint(0, cfg.model.vocab_size, (B, K * N + 1), generator=g)
        reset = torch.zeros(B, K, dtype=torch.bool)
        reset[:, 0] = True
        out.append({"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(), "reset": reset})
    return out


def measure(step_fns: dict, batches, warmup: int, rounds: int) -> dict[str, float]:
    """Median tokens/s of each step function. Variants take turns round by round on the same
    batches, so drift of a shared machine hits them all alike instead of whichever ran last."""
    per_round = max(1, (len(batches) - warmup) // rounds)
    rates: dict[str, list[float]] = {name: [] for name in step_fns}
    for name, fn in step_fns.items():
        for b in batches[:warmup]:
            fn(b)
    for r in range(rounds):
        chunk = batches[warmup + r * per_round: warmup + (r + 1) * per_round]
        for name, fn in step_fns.items():
            t0 = time.perf_counter()
            for b in chunk:
                fn(b)
            rates[name].append(sum(b["input_ids"].numel() for b in chunk) / (time.perf_counter() - t0))
    return {name: sorted(v)[len(v) // 2] for name, v in rates.items()}


def plain_step_fn(model, forward_loss):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(b):
        loss = forward_loss(model, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return step


def hf_step(cfg: TrainConfig):
    from transformers import GPT2Config, GPT2LMHeadModel

    m = cfg.model
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=m.vocab_size, n_positions=m.segment_len * cfg.data.n_segments,
                                    n_embd=m.n_embd, n_layer=m.n_layer, n_head=m.n_head, resid_pdrop=0.0,
                                    embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa"))
    hf.train()
    return plain_step_fn(hf, lambda mod, b: mod(input_ids=b["input_ids"], labels=b["input_ids"]).loss)


def ours_plain_step(cfg: TrainConfig, compile_blocks: bool = False):
    from memgpt_dist.model import GPT
    from memgpt_dist.parallel.plan import apply_compile
    from memgpt_dist.train.batch import token_loss_sum

    model = GPT(cfg.model, cfg.memory)
    model.init_weights()
    model.train()
    if compile_blocks:  # train.compile's transform; the warm-up steps pay the compilation
        apply_compile(model)

    def loss(mod, b):
        out = mod(b["input_ids"], reset=b["reset"])
        return token_loss_sum(out.logits, b["labels"]) / b["labels"].numel()
    return plain_step_fn(model, loss)


class ListBatches:
    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def __next__(self):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        return b

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, sd):
        self.i = sd["i"]


def engine_step(cfg: TrainConfig, batches, topo):
    import tempfile

    from memgpt_dist.train.checkpoint import CheckpointDir
    from memgpt_dist.train.metrics import MetricsLogger
    from memgpt_dist.train.run import build_step, build_trainer

    files = CheckpointDir(Path(tempfile.mkdtemp(prefix="bench-")), topo, keep_last=1)  # never written
    trainer = build_trainer(cfg, topo, build_step(cfg, topo), ListBatches(batches), None, files,
                            MetricsLogger(None, enabled=False, tensorboard=False))
    return lambda b: trainer.train_step()  # the trainer draws the same batches, in order


def run_size(size: str, steps: int, warmup: int, rounds: int, topo, compile_blocks: bool = False,
             levers: tuple[str, ...] = ()) -> dict[str, float]:
    cfg_off, cfg_on = make_cfg(size, False), make_cfg(size, True)
    batches = make_batches(cfg_on, steps + warmup)
    fns = {
        "a_hf_gpt2": hf_step(cfg_on),
        "b_ours_mem_off": ours_plain_step(cfg_off),
        "b_ours_mem_on": ours_plain_step(cfg_on),
        "c_engine_zero0_mem_on": engine_step(make_cfg(size, True, 0, steps + warmup), batches, topo),
        "c_engine_zero3_mem_on": engine_step(make_cfg(size, True, 3, steps + warmup), batches, topo),
    }
    for lever in levers:
        fns[f"b_ours_mem_on_{lever}"] = ours_plain_step(make_cfg(size, True, extra=LEVERS[lever]))
    if compile_blocks:
        fns["b_ours_mem_off_compile"] = ours_plain_step(cfg_off, compile_blocks=True)
        fns["b_ours_mem_on_compile"] = ours_plain_step(cfg_on, compile_blocks=True)
    return measure(fns, batches, warmup, rounds)


def report(size: str, r: dict[str, float]) -> None:
    base = r["a_hf_gpt2"]
    print(f"\n== {size}: tokens/s (ratio to (a) HF GPT2 plain loop)")
    for k, v in r.items():
        print(f"  {k:28s} {v:10,.0f}  {v / base:5.2f}x")
    for k in [k for k in r if k.startswith("b_ours_mem_on") and not k.endswith("_compile")]:
        ratio = r[k] / r["b_ours_mem_off"]
        print(f"  (b) {k[len('b_ours_'):]} / memory off: {ratio:.2f}  (target >= 0.85: {'PASS' if ratio >= 0.85 else 'FAIL'})")
    print(f"  (c) ZeRO-3 / (b) memory on: {r['c_engine_zero3_mem_on'] / r['b_ours_mem_on']:.2f}")
    print(f"  (c) ZeRO-0 / (b) memory on: {r['c_engine_zero0_mem_on'] / r['b_ours_mem_on']:.2f}")
    print(f"  (c) ZeRO-3 / (c) ZeRO-0:    {r['c_engine_zero3_mem_on'] / r['c_engine_zero0_mem_on']:.2f}  "
          f"(target >= 0.9)")
    for mem in ("off", "on"):
        if f"b_ours_mem_{mem}_compile" in r:
            print(f"  (b) memory {mem}, compile on / off: "
                  f"{r[f'b_ours_mem_{mem}_compile'] / r[f'b_ours_mem_{mem}']:.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,20m")
    p.add_argument("--steps", type=int, default=15, help="timed steps per variant, split over the rounds")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also (b) with every block compiled (train.compile); "
                                                            "its first steps compile, so raise --warmup")
    p.add_argument("--levers", default="", help=f"also (b) memory on with each lever, comma-separated: {','.join(LEVERS)}")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from memgpt_dist.parallel.dist import init_distributed

    topo = init_distributed()
    results = {}
    for size in args.sizes.split(","):
        levers = tuple(x for x in args.levers.split(",") if x)
        unknown = [x for x in levers if x not in LEVERS]
        if unknown:
            p.error(f"unknown lever(s) {unknown}: choose from {sorted(LEVERS)}")
        results[size] = run_size(size, args.steps, args.warmup, args.rounds, topo, args.compile, levers)
        report(size, results[size])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
