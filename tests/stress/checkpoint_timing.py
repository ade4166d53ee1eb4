"""Checkpoint save, verify and load times of one process (ZeRO-3) for the tiny config and a ~20M
parameter model, on a real DeepSpeed engine.

    python tests/stress/checkpoint_timing.py [--repeats 3]

Save = DeepSpeed files + per-rank state + fsync + sha256 manifest + commit marker; verify = the
sha256 check `--resume auto` does; load = weights-only load into a fresh engine.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1] / "train"))  # tests/train, for inprocess

from inprocess import make_trainer  # noqa: E402
from memgpt_dist.parallel.dist import init_distributed  # noqa: E402

SIZES = {
    "tiny": ("model.vocab_size=4096", "model.n_layer=2", "model.n_head=4", "model.n_embd=128", "model.segment_len=64",
             "data.n_segments=4", "parallel.micro_batch_size=4"),
    "20M": ("model.vocab_size=16384", "model.n_layer=8", "model.n_head=6", "model.n_embd=384", "model.segment_len=64",
            "data.n_segments=2", "parallel.micro_batch_size=1"),
}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    topo = init_distributed()
    logging.getLogger("memgpt_dist").setLevel(logging.ERROR)  # the fresh engine's seed differs on purpose
    print(f"{'config':6s} {'params':>11s} {'bytes':>10s} {'save s':>7s} {'verify s':>8s} {'load s':>7s}")
    for name, extra in SIZES.items():
        with tempfile.TemporaryDirectory() as tmp:
            t = make_trainer(topo, Path(tmp), extra=extra)
            fresh = make_trainer(topo, Path(tmp), seed=2, extra=extra)
            saves, verifies, loads = [], [], []
            for _ in range(args.repeats):
                t.train_step()
                saves.append(timed(t.save))
                step = t.state.step
                verifies.append(timed(lambda: t.checkpointer.verify(step)))
                loads.append(timed(lambda: fresh.restore(step)))
            marker = t.checkpointer.marker(t.state.step)
            n_params = sum(getattr(q, "ds_numel", q.numel()) for q in t.engine.module.parameters())
            print(f"{name:6s} {n_params:11,d} {marker['total_bytes']:10,d} {statistics.median(saves):7.2f} "
                  f"{statistics.median(verifies):8.2f} {statistics.median(loads):7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
