"""Peak host memory of building the model, whole vs partitioned (`parallel.zero_init`), in one run.

    python benchmarks/zero_init_memory.py                          # ~300M parameters, 2 ranks
    python benchmarks/zero_init_memory.py --n-layer 4 --n-embd 256 # quick

Each variant is a fresh pair of gloo ranks (the resident set's high-water mark only grows, so
variants cannot share a process) that builds the model exactly as training does
(`memgpt_dist.train.run.build_model`, ZeRO-3 config from the same function as the engine's) and
reports the growth of its peak RSS over the build. Whole: every rank holds the full fp32 model;
partitioned: its 1/dp share plus one module at a time (at most twice the largest parameter, the
token embedding: the gathered tensor and DeepSpeed's gather buffer). At 7B over 8 ranks that is
3.5 + 1 GB instead of 28 GB per rank. The engine's optimizer state comes after
and is partitioned either way, so it is not part of this comparison.
"""
from __future__ import annotations

import argparse
import os
import socket

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch.multiprocessing as mp  # noqa: E402


def _status_gb(field: str) -> float:
    """VmRSS (now) or VmHWM (the high-water mark) of this process, GB (Linux)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the high-water mark to the current RSS
        f.write("5")


def _rank(rank: int, world: int, port: int, overrides: list[str], partitioned: bool, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import deepspeed
    import torch

    from memgpt_dist.config import load_config
    from memgpt_dist.parallel.deepspeed_config import build_ds_config
    from memgpt_dist.train.run import build_model

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config(None, overrides + [f"parallel.zero_init={str(partitioned).lower()}"])
    ds_config = build_ds_config(cfg, world) if partitioned else None
    # the communication ops' one-time cost (DeepSpeed's CPU comm op maps a shared buffer) is not the build's
    for op in (deepspeed.comm.all_reduce, lambda t: deepspeed.comm.all_gather_into_tensor(torch.zeros(world), t)):
        op(torch.zeros(1))
    before = _status_gb("VmRSS")
    _reset_peak()
    build_model(cfg, partition=ds_config)
    out.put((rank, _status_gb("VmHWM") - before, _status_gb("VmRSS") - before))
    torch.distributed.barrier()


def measure(world: int, overrides: list[str], partitioned: bool) -> float:
    """The largest growth of peak RSS (GB) over the build among the ranks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, port, overrides, partitioned, out)) for r in range(world)]
    for p in procs:
        p.start()
    got = [out.get(timeout=900) for _ in procs]
    print("  ranks (peak growth, growth after):", [(round(g[1], 2), round(g[2], 2)) for g in got])
    grown = [g[1] for g in got]
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"a rank exited with {p.exitcode}")
    return max(grown)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--n-layer", type=int, default=16)
    p.add_argument("--n-embd", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    args = p.parse_args(argv)
    overrides = [f"model.n_layer={args.n_layer}", f"model.n_embd={args.n_embd}", f"model.n_head={args.n_embd // 64}",
                 f"model.vocab_size={args.vocab}", "parallel.zero_stage=3", "parallel.micro_batch_size=1"]
    from memgpt_dist.config import load_config
    from memgpt_dist.parallel.shares import parameter_numels

    n = sum(parameter_numels(load_config(None, overrides)).values())
    print(f"model: {n:,} parameters ({4 * n / 1e9:.2f} GB fp32), {args.world} ranks, ZeRO-3")
    whole = measure(args.world, overrides, partitioned=False)
    part = measure(args.world, overrides, partitioned=True)
    print(f"{'build':<13s} {'peak RSS growth per rank (GB)':>30s}")
    print(f"{'whole':<13s} {whole:>30.2f}")
    print(f"{'partitioned':<13s} {part:>30.2f}")
    largest = 4 * args.vocab * args.n_embd / 1e9  # the token embedding, the largest parameter
    bound = 4 * n / 1e9 / args.world + 2 * largest
    print(f"partitioned / whole: {part / whole:.2f}x; expected partitioned peak <= whole / dp + 2 x the largest "
          f"parameter (DeepSpeed's gather buffer and the gathered tensor) = {bound:.2f} GB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
