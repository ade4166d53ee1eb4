"""Throughput and peak memory per rank of each parallel layout on CPU, against one process
measured in the same run of this script, at the same global batch.

Every layout trains through the real CLI (`python launch/train.py` for one process, `deepspeed
--num_gpus N launch/train.py` otherwise) on the prepared default corpus, in a fresh run directory:

  single        1 process, ZeRO-0 (the plain DeepSpeed engine): the baseline
  dp2-z3        2 ranks, data parallel, ZeRO-3        dp2-z1      the same with ZeRO-1
  tp2-z3        2 ranks, tensor parallel, ZeRO-3      pp2-z1      2 pipeline stages, ZeRO-1
  tp2dp2-z3     4 ranks, tp2 x dp2, ZeRO-3            pp2dp2-z1   4 ranks, pp2 x dp2, ZeRO-1

tokens/s = tokens per optimizer step (global batch x n_segments x segment_len, padding included,
so every layout counts the same work) / the median `perf/step_time_s` that the trainer logs to
metrics.jsonl, over the steps after `--warmup`. (The trainer's own `perf/tokens_per_s` counts
loss-bearing tokens only, which depends on how the layout's streams meet padding; it is kept in
the JSON as `trainer_tokens_per_s`.) The trainer logs no memory figure, so the peak resident
memory of each rank is its VmHWM (/proc/PID/status), polled by this script while the rank runs;
it includes DeepSpeed's shared-memory all-reduce buffer where a rank touched it.

Non-pipeline layouts run micro-batch = global batch / dp with grad_accum 1; pipeline layouts run
micro-batch `--pp-micro-batch` (default 1) with grad_accum = global batch / (dp x micro-batch), so
the 1F1B schedule has micro-batches to overlap. Every rank runs `--threads` OpenMP threads (default
1, the baseline too), so a 2-rank layout uses twice the cores of the baseline, and 4 ranks on a
2-core machine are oversubscribed (flagged in the table).

    python benchmarks/parallel_scaling.py                         # tiny and ~20M, every layout
    python benchmarks/parallel_scaling.py --sizes tiny --layouts single,dp2-z3 --steps 20
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_throughput import SIZES as MODEL_SIZES  # noqa: E402  (the ~20M shape, shared)


def size_overrides(size: str) -> list[str]:
    """Model shape over configs/tiny.yaml: `tiny` is that file (train_throughput's tiny is the same
    shape), `20m` is train_throughput's ~20M model (8 layers x 384, 6 heads, vocab 16384)."""
    vocab, n_layer, n_head, n_embd, seg, k, _ = MODEL_SIZES[size]
    return [f"--model.vocab_size={vocab}", f"--model.n_layer={n_layer}", f"--model.n_head={n_head}",
            f"--model.n_embd={n_embd}", f"--model.segment_len={seg}", f"--data.n_segments={k}"]


@dataclass(frozen=True)
class Layout:
    """One way to run the same global batch: ranks, parallel degrees and ZeRO stage."""

    name: str
    label: str
    nproc: int
    zero: int
    tp: int = 1
    pp: int = 1

    @property
    def dp(self) -> int:
        return self.nproc // (self.tp * self.pp)

    def batch_overrides(self, global_batch: int, pp_micro_batch: int) -> list[str]:
        """micro_batch x grad_accum x dp = global_batch; pipelines get several micro-batches."""
        if self.pp > 1:
            micro, accum = pp_micro_batch, global_batch // (self.dp * pp_micro_batch)
        else:
            micro, accum = global_batch // self.dp, 1
        if micro * accum * self.dp != global_batch or accum < 1:
            raise SystemExit(f"--global-batch {global_batch} does not split over {self.label} "
                             f"(dp {self.dp}, pipeline micro-batch {pp_micro_batch})")
        return [f"--parallel.zero_stage={self.zero}", f"--parallel.tp={self.tp}", f"--parallel.pp={self.pp}",
                f"--parallel.micro_batch_size={micro}", f"--parallel.grad_accum={accum}",
                f"--parallel.global_batch_size={global_batch}"]


LAYOUTS = {layout.name: layout for layout in (
    Layout("single", "1 process, ZeRO-0 (baseline)", 1, zero=0),
    Layout("dp2-z3", "dp2, ZeRO-3", 2, zero=3),
    Layout("dp2-z1", "dp2, ZeRO-1", 2, zero=1),
    Layout("tp2-z3", "tp2, ZeRO-3", 2, zero=3, tp=2),
    Layout("pp2-z1", "pp2, ZeRO-1", 2, zero=1, pp=2),
    Layout("tp2dp2-z3", "tp2 x dp2, ZeRO-3", 4, zero=3, tp=2),
    Layout("pp2dp2-z1", "pp2 x dp2, ZeRO-1", 4, zero=1, pp=2),
)}
BASELINE = "single"


@dataclass
class RunResult:
    """What one training run of one layout gave."""

    size: str
    layout: str
    nproc: int
    ok: bool
    wall_s: float
    step_times_s: list[float] = field(default_factory=list)  # timed steps only
    trainer_tokens_per_s: float = 0.0  # loss-bearing tokens / step time, summed over timed steps
    peak_rss_mb: dict[int, float] = field(default_factory=dict)  # rank -> VmHWM in MiB
    error: str = ""


# --------------------------------------------------------------------------- peak memory


def _rank_of(proc: psutil.Process, nproc: int, root_pid: int) -> int | None:
    """The rank a process of the launched tree runs, or None for a launcher process."""
    if nproc == 1:
        return 0 if proc.pid == root_pid else None
    if not any(a.startswith("--local_rank") for a in proc.cmdline()):  # the launcher adds it to each rank
        return None
    return int(proc.environ()["RANK"])


def _vm_hwm_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    return 0.0


class PeakMemoryWatch(threading.Thread):
    """Polls VmHWM (the kernel's peak resident set) of every rank of a launched run until it ends."""

    def __init__(self, popen: subprocess.Popen, nproc: int, interval_s: float = 0.2):
        super().__init__(daemon=True)
        self.popen, self.nproc, self.interval_s = popen, nproc, interval_s
        self.peak_mb: dict[int, float] = {}
        self._ranks: dict[int, int] = {}  # pid -> rank, once a process is known to be a rank

    def run(self) -> None:
        root = psutil.Process(self.popen.pid)
        while self.popen.poll() is None:
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for proc in procs:
                self._sample(proc, root.pid)
            time.sleep(self.interval_s)

    def _sample(self, proc: psutil.Process, root_pid: int) -> None:
        try:
            rank = self._ranks.get(proc.pid)
            if rank is None:  # asked again each time: a child just forked still shows the launcher's cmdline
                rank = _rank_of(proc, self.nproc, root_pid)
            if rank is not None:
                self._ranks[proc.pid] = rank
                self.peak_mb[rank] = max(self.peak_mb.get(rank, 0.0), _vm_hwm_mb(proc.pid))
        except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError, ProcessLookupError):
            pass  # the process ended between listing and reading


# --------------------------------------------------------------------------- runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(layout: Layout, args: list[str]) -> list[str]:
    """One process as plain python (as a user runs it); more through the deepspeed launcher."""
    if layout.nproc == 1:
        return [sys.executable, "launch/train.py", *args]
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    return [deepspeed, "--num_gpus", str(layout.nproc), "--master_port", str(free_port()), "launch/train.py", *args]


def run_env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": "false"})
    return env


def stop_process_group(popen: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the run's process group (the ranks save and exit), SIGKILL what is left after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(popen.pid, sig)
        except ProcessLookupError:
            return  # the whole group has exited
        if sig == signal.SIGTERM:
            try:
                popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass


def run_layout(size: str, layout: Layout, opts, out: Path, round_i: int) -> RunResult:
    run_dir = out / "runs" / f"{size}-{layout.name}-r{round_i}"
    log_file = out / "logs" / f"{size}-{layout.name}-r{round_i}.log"
    args = ["--config", "configs/tiny.yaml", *size_overrides(size), f"--data.path={opts.data}",
            f"--run_dir={run_dir}", f"--train.max_steps={opts.steps}", "--optim.warmup_steps=1",
            "--log.every=1", "--train.eval_every=0", "--checkpoint.every=0", "--checkpoint.save_at_end=false",
            "--log.tensorboard=false", *layout.batch_overrides(opts.global_batch, opts.pp_micro_batch)]
    cmd = train_command(layout, args)
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        log.write(" ".join(cmd) + "\n\n")
        log.flush()
        # own session: a timeout or Ctrl-C stops the launcher and every rank it started
        popen = subprocess.Popen(cmd, cwd=ROOT, env=run_env(opts.threads), stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        watch = PeakMemoryWatch(popen, layout.nproc)
        watch.start()
        try:
            code = popen.wait(timeout=opts.timeout)
        except subprocess.TimeoutExpired:
            code = f"timeout after {opts.timeout} s"
        finally:
            stop_process_group(popen)
        watch.join()
    result = RunResult(size, layout.name, layout.nproc, ok=code == 0, wall_s=time.perf_counter() - t0,
                       peak_rss_mb=dict(sorted(watch.peak_mb.items())))
    if code != 0:
        result.error = f"{code if isinstance(code, str) else f'exit code {code}'}: {_last_error(log_file)}"
    # a run that logged every step and failed afterwards (at teardown) still measured its steps
    result.step_times_s, result.trainer_tokens_per_s = read_step_times(run_dir / "metrics.jsonl", opts.warmup,
                                                                       opts.steps)
    return result


def read_step_times(metrics: Path, warmup: int, steps: int) -> tuple[list[float], float]:
    """Step times after the warm-up steps, and the trainer's tokens/s (loss-bearing tokens) over
    them; nothing unless all `steps` were logged."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    train = sorted((r for r in records if "perf/step_time_s" in r), key=lambda r: r["step"])
    if not train or train[-1]["step"] < steps:
        return [], 0.0
    prev_tokens = {r["step"]: r["tokens"] for r in train}
    timed = [r for r in train if r["step"] > warmup]
    tokens = sum(r["tokens"] - prev_tokens.get(r["step"] - 1, 0) for r in timed)
    seconds = sum(r["perf/step_time_s"] for r in timed)
    return [r["perf/step_time_s"] for r in timed], tokens / seconds if seconds else 0.0


def _last_error(log_file: Path) -> str:
    """The most telling line of a failed run's log: the last one naming an error."""
    lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    # the launcher's own last words only repeat a rank's command line; the rank's message says more
    errors = [line for line in lines if "sigkill_handler" not in line and any(
        word in line for word in ("Error", "error", "terminate called", "Traceback", "Segmentation", "Killed"))]
    return (errors or lines or ["(empty log)"])[-1][:400]


# --------------------------------------------------------------------------- report


@dataclass
class Row:
    """One layout of one size, over all rounds."""

    size: str
    layout: str
    label: str
    nproc: int
    oversubscribed: bool
    tokens_per_step: int
    step_time_s: float | None  # median over the timed steps of every round
    tokens_per_s: float | None
    ratio: float | None  # tokens/s against the single process
    trainer_tokens_per_s: float | None
    peak_rss_mb: dict[int, float]  # per rank, max over rounds
    wall_s: float
    error: str


def summarize(size: str, layout: Layout, runs: list[RunResult], tokens_per_step: int) -> Row:
    measured = [r for r in runs if r.step_times_s]
    times = [t for r in measured for t in r.step_times_s]
    step = statistics.median(times) if times else None
    peak: dict[int, float] = {}
    for r in runs:
        for rank, mb in r.peak_rss_mb.items():
            peak[rank] = max(peak.get(rank, 0.0), mb)
    return Row(size, layout.name, layout.label, layout.nproc, layout.nproc > (os.cpu_count() or 1), tokens_per_step,
               step, tokens_per_step / step if step else None, None,
               statistics.median(r.trainer_tokens_per_s for r in measured) if measured else None,
               dict(sorted(peak.items())), sum(r.wall_s for r in runs), "; ".join(r.error for r in runs if r.error))


def format_table(rows: list[Row]) -> str:
    lines = ["| size | layout | ranks | tokens/s | vs 1 process | step s | peak RSS per rank, MB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ranks = f"{r.nproc}" + (" (oversubscribed)" if r.oversubscribed else "")
        mem = ", ".join(f"{mb:,.0f}" for mb in r.peak_rss_mb.values()) or "-"
        if 0 < len(r.peak_rss_mb) < r.nproc:
            mem += f" (ranks {', '.join(map(str, r.peak_rss_mb))} of {r.nproc} sampled)"
        if r.tokens_per_s is None:
            lines.append(f"| {r.size} | {r.label} | {ranks} | FAILED | - | - | {mem} |")
            continue
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        label = r.label + (" (failed after its last step, see below)" if r.error else "")
        lines.append(f"| {r.size} | {label} | {ranks} | {r.tokens_per_s:,.0f} | {ratio} | "
                     f"{r.step_time_s:.3f} | {mem} |")
    failures = [f"{r.size} {r.label}: {r.error}" for r in rows if r.error]
    return "\n".join(lines + ([""] + ["FAILED " + f for f in failures] if failures else []))


# --------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,20m", help=f"comma-separated: {','.join(MODEL_SIZES)}")
    p.add_argument("--layouts", default=",".join(LAYOUTS),
                   help=f"comma-separated: {','.join(LAYOUTS)} (the baseline '{BASELINE}' always runs)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per run, warm-up included")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    p.add_argument("--global-batch", type=int, default=4, help="samples per optimizer step, every layout")
    p.add_argument("--pp-micro-batch", type=int, default=1, help="micro-batch of the pipeline layouts")
    p.add_argument("--rounds", type=int, default=1, help="run every layout this many times, in turn")
    p.add_argument("--threads", type=int, default=1, help="OpenMP threads per rank (OMP_NUM_THREADS)")
    p.add_argument("--data", default="data/default", help="prepared corpus (memgpt-prepare)")
    p.add_argument("--timeout", type=int, default=900, help="seconds before a run is killed")
    p.add_argument("--out", default="runs/parallel_scaling", help="runs, logs and results.json go here")
    args = p.parse_args(argv)
    unknown = [n for n in args.layouts.split(",") if n not in LAYOUTS]
    if unknown or any(s not in MODEL_SIZES for s in args.sizes.split(",")):
        p.error(f"unknown layout or size: {unknown or args.sizes}")
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")
    if not (Path(args.data) / "manifest.json").is_file():
        p.error(f"{args.data}/manifest.json not found: run memgpt-prepare --out {args.data} first")
    return args


def chosen_layouts(names: str) -> list[Layout]:
    return [LAYOUTS[BASELINE]] + [LAYOUTS[n] for n in names.split(",") if n != BASELINE]


def main(argv=None) -> int:
    opts = parse_args(argv)
    out = Path(opts.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    layouts = chosen_layouts(opts.layouts)
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    rows: list[Row] = []
    for size in opts.sizes.split(","):
        runs: dict[str, list[RunResult]] = {layout.name: [] for layout in layouts}
        for round_i in range(opts.rounds):
            for layout in layouts:  # layouts take turns, so drift of a shared machine hits them alike
                r = run_layout(size, layout, opts, out, round_i)
                runs[layout.name].append(r)
                status = (f"median step {statistics.median(r.step_times_s):.3f} s" if r.step_times_s else "FAILED")
                status += f" ({r.error})" if r.error else ""
                print(f"[{size} round {round_i + 1}/{opts.rounds}] {layout.label}: {status}, peak MB "
                      f"{[round(v) for v in r.peak_rss_mb.values()]}, {r.wall_s:.0f} s with start-up", flush=True)
        _, _, _, _, seg, k, _ = MODEL_SIZES[size]
        size_rows = [summarize(size, layout, runs[layout.name], opts.global_batch * k * seg) for layout in layouts]
        base = size_rows[0].tokens_per_s
        for row in size_rows:
            row.ratio = row.tokens_per_s / base if base and row.tokens_per_s else None
        rows.extend(size_rows)
    meta = {"cpu_count": os.cpu_count(), "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
            "runtime_s": time.perf_counter() - t_start, "steps": opts.steps, "warmup": opts.warmup,
            "global_batch": opts.global_batch, "pp_micro_batch": opts.pp_micro_batch, "rounds": opts.rounds,
            "threads_per_rank": opts.threads}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
    print()
    print(format_table(rows))
    print(f"\nglobal batch {opts.global_batch} samples, {opts.steps} steps ({opts.warmup} warm-up), "
          f"{opts.threads} thread(s) per rank, {os.cpu_count()} CPUs; load average before "
          f"{load_before[0]:.2f}, after {meta['load_avg_after'][0]:.2f}; {meta['runtime_s'] / 60:.1f} min; "
          f"{out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
