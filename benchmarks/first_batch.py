"""Time to first batch of the training loader, at start and at resume (issue 17 item 4: <= 2 s
with 64 streams on the stdlib corpus).

Each measurement runs in a fresh process (so worker processes of an earlier loader cannot steal
its cores, and nothing is cached in the loader) and times SegmentLoader construction plus the
first `next()`: at start from the beginning, at resume after `load_state_dict` of a state saved
`--resume-after` batches in (every stream then sits mid-shard, so it reopens its shard and walks
to its document again). Imports are not counted (a trainer has them already). `--repeats` runs
each and keeps the fastest, so the page cache is warm for all and the figure is the loader's.

    memgpt-prepare --out /tmp/stdlib --vocab-size 4096
    python benchmarks/first_batch.py /tmp/stdlib                    # 64 streams in one process
    python benchmarks/first_batch.py /tmp/stdlib --workers 2        # with data.num_workers=2
    python benchmarks/first_batch.py http://127.0.0.1:8000/ --cache-dir /tmp/shard-cache
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build(args):
    from data_pipeline.segment_stream import SegmentLoader

    extra = {"cache_dir": args.cache_dir} if args.cache_dir else {}
    return SegmentLoader(args.data, "train", segment_len=args.segment_len, n_segments=args.n_segments,
                         micro_batch_size=args.streams, seed=1234, num_workers=args.workers, **extra)


def first_batch_seconds(args) -> float:
    """One measurement, in this process: construction (+ load_state_dict) + first next()."""
    import data_pipeline.segment_stream  # noqa: F401  (imports are not what is measured)

    state = json.loads(Path(args.state).read_text()) if args.state else None
    t0 = time.perf_counter()
    ld = build(args)
    if state is not None:
        ld.load_state_dict(state)
    next(ld)
    seconds = time.perf_counter() - t0
    ld.close()
    return seconds


def save_state(args, path: Path) -> None:
    ld = build(args)
    for _ in range(args.resume_after):
        next(ld)
    path.write_text(json.dumps(ld.state_dict()))  # as stored in a checkpoint
    ld.close()


def measure(args, argv: list[str], state: str = "") -> float:
    """Fastest of `--repeats` fresh processes."""
    cmd = [sys.executable, __file__, *argv, "--child"] + (["--state", state] if state else [])
    runs = [float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])
            for _ in range(args.repeats)]
    return min(runs)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="a prepared corpus: directory, http(s):// base or pipe: command")
    p.add_argument("--streams", type=int, default=64, help="streams read by this process (dp x micro-batch)")
    p.add_argument("--segment-len", type=int, default=512)
    p.add_argument("--n-segments", type=int, default=4)
    p.add_argument("--workers", type=int, default=0, help="data.num_workers")
    p.add_argument("--resume-after", type=int, default=20, help="batches read before the state is saved")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--target-s", type=float, default=2.0)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--state", default="", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.child:
        print(f"{first_batch_seconds(args):.4f}")
        return 0
    start = measure(args, argv)
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "loader_state.json"
        save_state(args, state)
        resume = measure(args, argv, str(state))
    verdict = "PASS" if max(start, resume) <= args.target_s else "FAIL"
    print(f"time to first batch, {args.streams} streams, {args.workers} workers: start {start:.2f} s, "
          f"resume {resume:.2f} s  [{verdict} <= {args.target_s:g} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
