"""Training stall per checkpoint, synchronous vs asynchronous (`checkpoint.async_save`), in one run.

One process, a real DeepSpeed engine (ZeRO-0, fp32 AdamW: weights + master-free moments, so a
checkpoint is about 3x the weights). For each size, sync and async saves take turns in the same
trainer, spaced as a real run spaces them: the gap in steps is derived from the measured sync save
and step times (`--gap-factor` sync saves' worth of training between two saves, printed), so an
async writer has time to finish before the next save, as it has in a run that saves every few
hundred steps. The stall of an async save is everything training loses to it, in three parts:

* copy: the step boundary, where each rank's state is copied into host buffers (DeepSpeed's
  `save_checkpoint` through the capturing engine, barriers included) and torch.save's pickling of
  each file is recorded (`checkpoint.record_torch_save`: tensor bytes stay views of the buffers);
* extra step time: the wall time of the steps that run beside the writer (the commit comes at the
  first boundary after it is done) over the median step without a writer of the same round,
  signed: noise averages out, the writer's share of the cores shows as slower steps;
* wait: what is left of the writer when the next save is due (that save waits for it).

The first async save of a run allocates its host buffers (later saves copy into them); its copy
time is printed apart and not in the per-save figures. Each round prints the writer thread's CPU
time (checksum, write calls), fsync and wall time: on a machine whose cores training keeps busy, the
stall is about the copy plus the writer's CPU. Also the save time per GB of the
synchronous save and the load time per GB (`Checkpointer.load`). Target: async stall <= 20% of
the sync save time.

Each size runs at each of `--threads` training threads: by default all cores but one (the writer
gets a core, as on a GPU node, whose training leaves most host cores idle) and all cores (training
saturates the machine: the writer's I/O and its few CPU slices then come out of training's time).

    python benchmarks/checkpoint_stall.py                       # ~20M and ~85M parameters
    python benchmarks/checkpoint_stall.py --sizes 85m --rounds 2 --threads 1
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "train"))

SIZES = {
    # name: (vocab, n_layer, n_head, n_embd)
    "tiny": (512, 2, 2, 64),  # the smoke test's
    "20m": (8192, 6, 8, 512),
    "85m": (8192, 12, 12, 768),
}
MIN_GAP = 3  # steps between saves at least: a baseline step before each async save, one beside it


def overrides(size: str, steps: int) -> tuple[str, ...]:
    vocab, n_layer, n_head, n_embd = SIZES[size]
    return (f"model.vocab_size={vocab}", f"model.n_layer={n_layer}", f"model.n_head={n_head}",
            f"model.n_embd={n_embd}", "model.segment_len=32", "data.n_segments=2", "parallel.micro_batch_size=2",
            f"train.max_steps={steps}", "memory.enabled=false")


def timed_step(trainer) -> float:
    """Wall time of one loop iteration (step, agreement, callbacks: the commit), as `fit` runs it."""
    t0 = time.perf_counter()
    result = trainer.train_step()
    end = trainer._agree(result)
    for cb in trainer.callbacks:
        cb.on_step_end(trainer, end, end.flags[id(cb)])
    return time.perf_counter() - t0


def checkpoint_gb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e9


def async_round(t, gap: int) -> dict[str, float]:
    """One async save `gap` steps after the previous save, and the `gap` steps after it."""
    ckpt = t.checkpointer
    before = [timed_step(t) for _ in range(gap)]
    t0 = time.perf_counter()
    ckpt.save(t.state.step, background=True)
    copy_s = time.perf_counter() - t0
    writer = ckpt.files.pending.writer
    beside, after, started = [], [], time.perf_counter()
    for _ in range(gap):  # the commit comes in the callbacks of the first step after the writer is done
        (beside if ckpt.has_pending() else after).append(timed_step(t))
    writer_s = time.perf_counter() - started if ckpt.has_pending() else None
    t0 = time.perf_counter()
    ckpt.finish_pending()  # the next save would wait here for a writer still busy
    wait_s = time.perf_counter() - t0
    base = statistics.median(before + after)
    extra_s = sum(beside) - len(beside) * base
    return {"copy_s": copy_s, "extra_s": extra_s, "wait_s": wait_s, "stall_s": copy_s + extra_s + wait_s,
            "beside": len(beside), "step_s": base, "still_writing": writer_s is not None, **writer.profile}


def sync_save(t) -> tuple[float, float]:
    t0 = time.perf_counter()
    path = t.checkpointer.save(t.state.step)
    return time.perf_counter() - t0, checkpoint_gb(path)


@contextlib.contextmanager
def scratch_dir(size: str):
    """A fresh directory this benchmark creates for its checkpoints (a few GB per size), removed
    on exit with everything in it: only ever the directory `mkdtemp` just made, never a path given."""
    root = Path(tempfile.mkdtemp(prefix=f"ckpt_stall_{size}_"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def bench(topo, size: str, rounds: int, gap_factor: float) -> dict[str, float]:
    with scratch_dir(size) as root:
        return _bench(topo, root, size, rounds, gap_factor)


def _bench(topo, root: Path, size: str, rounds: int, gap_factor: float) -> dict[str, float]:
    from inprocess import make_trainer

    t = make_trainer(topo, root, stage=0, extra=overrides(size, steps=10_000) + ("checkpoint.async_save=true",))
    cb = next(c for c in t.callbacks if type(c).__name__ == "CheckpointCallback")
    cb.checkpoint = dataclasses.replace(cb.checkpoint, every=0)  # the benchmark decides when to save
    for c in t.callbacks:  # as `fit` starts them (stop handlers, the heartbeat)
        c.on_fit_start(t)
    timed_step(t)  # warm-up
    steps = [timed_step(t) for _ in range(2)]
    t0 = time.perf_counter()
    t.checkpointer.save(t.state.step, background=True)  # a run's first async save allocates the host buffers
    first_copy_s = time.perf_counter() - t0
    t.checkpointer.finish_pending()
    steps.append(timed_step(t))
    sync_s, gb = sync_save(t)
    gap = max(MIN_GAP, math.ceil(gap_factor * sync_s / statistics.median(steps)))
    print(f"{size}: step {statistics.median(steps):.2f}s, sync save {sync_s:.2f}s -> saves {gap} steps apart "
          f"(--gap-factor {gap_factor:g}); the first async save's copy (allocating) {first_copy_s:.2f}s", flush=True)
    syncs, gbs, asyncs = [sync_s], [gb], []
    for _ in range(rounds):
        asyncs.append(async_round(t, gap))  # ends `gap` steps after the async save: the sync save is due
        s, g = sync_save(t)
        syncs.append(s)
        gbs.append(g)
    loaded = t.checkpointer.committed_steps()[-1]
    t0 = time.perf_counter()
    t.restore(loaded)
    load_s = time.perf_counter() - t0
    for c in t.callbacks:
        c.close(t)
    gb = statistics.median(gbs)
    med = {k: statistics.median(r[k] for r in asyncs)
           for k in ("copy_s", "extra_s", "wait_s", "stall_s", "step_s", "cpu_s", "hash_cpu_s", "wall_s")}
    return {"params_m": sum(p.numel() for p in t.engine.module.parameters()) / 1e6, "gb": gb, "gap": gap,
            "sync_save_s": statistics.median(syncs), "save_s_per_gb": statistics.median(syncs) / gb,
            "load_s_per_gb": load_s / gb, "rounds": asyncs, **med}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["20m", "85m"], choices=sorted(SIZES))
    p.add_argument("--rounds", type=int, default=5,
                   help="async saves per size (medians; one step beside a 20m writer varies by +-0.1 s)")
    p.add_argument("--gap-factor", type=float, default=4.0,
                   help="training between two saves, in sync save times (default 4; a run saving every "
                        "checkpoint.every=50 steps leaves far more)")
    cores = os.cpu_count() or 1
    p.add_argument("--threads", default=f"{max(cores - 1, 1)},{cores}",
                   help="training threads (torch.set_num_threads), comma-separated: each size runs at each "
                        "(default: all cores but one, then all cores)")
    p.add_argument("--writer-nice", type=int, default=None,
                   help="the background writer's nice (default: checkpoint.WRITER_NICE)")
    args = p.parse_args(argv)
    from memgpt_dist.parallel.dist import init_distributed
    from memgpt_dist.train import checkpoint

    if args.writer_nice is not None:
        checkpoint.WRITER_NICE = args.writer_nice
    print(f"writer nice {checkpoint.WRITER_NICE}", flush=True)

    topo = init_distributed()
    import torch

    summary, threads_before = [], torch.get_num_threads()
    try:
        _run_all(args, topo, summary)
    finally:
        torch.set_num_threads(threads_before)  # as it was (a test calls main in its process)
    print("\n".join(["summary:", *summary]), flush=True)
    return 0


def _run_all(args, topo, summary: list[str]) -> None:
    import torch

    for threads, size in [(int(n), size) for n in dict.fromkeys(args.threads.split(",")) for size in args.sizes]:
        torch.set_num_threads(threads)
        print(f"== {size}, {threads} training thread(s) of {os.cpu_count()} cores", flush=True)
        r = bench(topo, size, args.rounds, args.gap_factor)
        for i, a in enumerate(r["rounds"]):
            print(f"  round {i}: copy {a['copy_s']:.2f}s + extra step time {a['extra_s']:+.2f}s over {a['beside']} "
                  f"step(s) beside the writer (step {a['step_s']:.2f}s) + wait {a['wait_s']:.2f}s = {a['stall_s']:.2f}s"
                  + (" (still writing at the next save)" if a["still_writing"] else ""), flush=True)
            print(f"    writer: CPU {a['cpu_s']:.2f}s (checksum {a['hash_cpu_s']:.2f}s, write calls "
                  f"{a['write_cpu_s']:.2f}s, the rest opening, fsync and renaming), fsync {a['fsync_s']:.2f}s, wall "
                  f"{a['wall_s']:.2f}s, {a['direct_bytes'] / 1e9:.3f} GB with O_DIRECT", flush=True)
        ratio = r["stall_s"] / r["sync_save_s"]
        print(f"{size}: {r['params_m']:.1f}M params, checkpoint {r['gb']:.3f} GB, step {r['step_s']:.2f}s, saves "
              f"{r['gap']} steps apart | sync save {r['sync_save_s']:.2f}s ({r['save_s_per_gb']:.2f} s/GB) | async "
              f"stall {r['stall_s']:.2f}s = {ratio:.0%} of sync (target <= 20%): copy {r['copy_s']:.2f}s, extra step "
              f"time {r['extra_s']:+.2f}s, wait {r['wait_s']:.2f}s (medians over {len(r['rounds'])} rounds) | writer "
              f"CPU {r['cpu_s'] / r['gb']:.2f} s/GB (checksum {r['hash_cpu_s'] / r['gb']:.2f}), wall "
              f"{r['wall_s'] / r['gb']:.2f} s/GB | load {r['load_s_per_gb']:.2f} s/GB", flush=True)
        summary.append(f"{size}, {threads} thread(s): async stall {ratio:.0%} of sync "
                       f"({'PASS' if ratio <= 0.2 else 'FAIL'}, target <= 20%)")


if __name__ == "__main__":
    sys.exit(main())
