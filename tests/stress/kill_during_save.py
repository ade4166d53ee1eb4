"""SIGKILL real training processes at random points during checkpoint saves and check that every
restart resumes from the newest committed checkpoint and ends with the losses of an
uninterrupted run, bit for bit.

    python tests/stress/kill_during_save.py --points 24            # one process per run
    python tests/stress/kill_during_save.py --points 8 --nproc 2   # SIGKILL one of two ranks
    python tests/stress/kill_during_save.py --points 24 --async-save  # during background saves

With --async-save (`checkpoint.async_save`) the window a kill aims at runs from the step
directory's appearance (the host copy at the step boundary) through the background writes,
while training goes on, to the commit at a later step boundary; whatever it hits, the previous
committed checkpoint must stay the newest intact one and the chain must still end bitwise equal.

Each launch is `launch/train.py ... --resume auto` (through the deepspeed launcher for --nproc 2),
unmodified: no hook slows the save down. The script waits until the launch has started writing
the checkpoint it targets (the step directory appears), sleeps a random fraction of a measured
save time (or, for a quarter of the points, waits for the commit marker's temporary file) and
sends SIGKILL (to the process, or to one random rank). It then records what the
kill left behind (the phase), the newest committed checkpoint, and checks that the next launch
resumes from exactly that one and that no committed checkpoint was lost or damaged. A chain of
launches that reaches the last step is compared with the reference run; then a new chain starts.
`tests/train/test_kill_during_save.py` runs a few points of this in CI, and
`tests/stress/test_kill_during_async_save.py` a few with --async-save.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))  # tests/, for helpers

from helpers import ROOT, bin_path, cli_env, free_port, make_text_corpus, read_metrics, run_cmd  # noqa: E402

MAX_STEPS, EVERY = 8, 2
# ~4M parameters, so that a save (DeepSpeed files, fsync, sha256, marker) takes ~0.3 s here
MODEL = ("--model.vocab_size=320", "--model.n_embd=256", "--model.n_layer=4", "--model.segment_len=16",
         "--data.n_segments=3")
MARKER = "COMMITTED.json"
MARKER_SHARE = 0.25  # share of kill points aimed at the commit marker's write instead of a random delay
ASYNC_SAVE = ("--checkpoint.async_save=true",)


def train_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--config", "configs/tiny.yaml", f"--run_dir={run_dir}", f"--data.path={data}", *MODEL,
            "--train.eval_every=0", "--log.every=1", "--optim.warmup_steps=2", f"--train.max_steps={MAX_STEPS}",
            f"--checkpoint.every={EVERY}", "--checkpoint.keep_last=2", *extra]


def train_cmd(args: list[str], nproc: int, port: int | None = None) -> list[str]:
    if nproc == 1:
        return [sys.executable, "launch/train.py", *args]
    return [bin_path("deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port or free_port()),
            "launch/train.py", *args]


def remove_shm_buffers(port: int) -> None:
    """A SIGKILLed rank cannot unlink DeepSpeed's shm allreduce buffer (66 MB of RAM each)."""
    import glob

    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def reference_run(data: Path, run_dir: Path, nproc: int, save_args: tuple[str, ...] = ()) -> tuple[dict[int, dict], float]:
    """An uninterrupted run: its per-step metrics and the median time from a step directory's
    appearance to its commit marker's, as a watcher sees it (the window the kills aim at)."""
    log = run_dir.with_name(run_dir.name + ".log")
    run_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(train_cmd(train_args(data, run_dir, *save_args), nproc), cwd=ROOT, env=cli_env(),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    seen: dict[int, float] = {}
    windows = []
    pending = list(range(EVERY, MAX_STEPS + 1, EVERY))
    while pending and proc.poll() is None:
        path = run_dir / "checkpoints" / f"step_{pending[0]:08d}"
        now = time.perf_counter()
        if pending[0] not in seen and path.exists():
            seen[pending[0]] = now
        if pending[0] in seen and (path / MARKER).exists():
            windows.append(now - seen[pending.pop(0)])
        time.sleep(0.0005)
    assert proc.wait(timeout=600) == 0 and len(windows) == MAX_STEPS // EVERY, log.read_text()[-3000:]
    return read_metrics(run_dir), sorted(windows)[len(windows) // 2]


# ---------------------------------------------------------------- inspecting a run directory

def committed(ckpt_root: Path) -> list[int]:
    if not ckpt_root.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in ckpt_root.iterdir()
                  if re.fullmatch(r"step_\d{8}", p.name) and (p / MARKER).is_file())


def damaged(ckpt_root: Path, step: int) -> list[str]:
    """Files of committed checkpoint `step` that are missing or differ from its marker."""
    from memgpt_dist.train.checkpoint import _check_file  # size, then the checksum the marker holds

    path = ckpt_root / f"step_{step:08d}"
    files = json.loads((path / MARKER).read_text())["files"]
    return [name for name, f in files.items() if _check_file(path / name, f) is not None]


def phase_of(path: Path) -> str:
    """What a kill during the save of `path` left behind."""
    if (path / MARKER).is_file():
        return "committed (killed after the commit: pruning or later)"
    if (path / (MARKER + ".tmp")).exists():
        return "marker being written"
    if list((path / "rank_state").glob("rank_*.pt")) if (path / "rank_state").is_dir() else False:
        return "files written, hashing/fsync before the commit"
    if path.is_dir():
        return "DeepSpeed writing model/optimizer files"
    return "before the step directory existed"


# ---------------------------------------------------------------- one killed launch

@dataclass
class Kill:
    target_step: int
    delay_s: float
    phase: str
    committed_before: list[int]
    committed_after: list[int]
    resumed_from_expected: int  # 0: a fresh start


def launch(data: Path, run_dir: Path, nproc: int, log: Path, save_args: tuple[str, ...] = ()) -> subprocess.Popen:
    """`--resume auto` on a known rendezvous port (`proc.port`), so its shm buffers can be found."""
    port = free_port()
    env = {**cli_env(), "MASTER_PORT": str(port)}  # a single process takes its port from here
    proc = subprocess.Popen(train_cmd(train_args(data, run_dir, "--resume", "auto", *save_args), nproc, port), cwd=ROOT,
                            env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    proc.port = port
    return proc


def inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def wait_for_dir(path: Path, proc: subprocess.Popen, stale: int | None, timeout: float = 600) -> bool:
    """Wait until this launch creates `path` (a leftover of an earlier kill, inode `stale`, is
    renamed aside by the launch first)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        ino = inode(path)
        if ino is not None and ino != stale:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.001)
    raise TimeoutError(f"{path} did not appear in {timeout}s")


def wait_for_marker(path: Path, proc: subprocess.Popen) -> float:
    """Busy-wait for the commit marker's temporary file (or the marker): kill points in the
    milliseconds around the commit, which uniform delays rarely hit. Returns the delay."""
    t0 = time.perf_counter()
    while proc.poll() is None:
        if (path / (MARKER + ".tmp")).exists() or (path / MARKER).exists():
            break
    return time.perf_counter() - t0


def victim_pid(proc: subprocess.Popen, nproc: int, rng: random.Random) -> int:
    if nproc == 1:
        return proc.pid
    import psutil

    ranks = [c for c in psutil.Process(proc.pid).children(recursive=True)
             if any(a.startswith("--local_rank=") for a in c.cmdline())]
    return rng.choice(ranks).pid


def kill_during_save(data: Path, run_dir: Path, nproc: int, rng: random.Random, save_s: float,
                     log: Path, save_args: tuple[str, ...] = ()) -> Kill | None:
    """Launch with --resume auto and SIGKILL it during its first or second save; None if the
    launch finished before the targeted save began."""
    ckpt_root = run_dir / "checkpoints"
    start = (committed(ckpt_root) or [0])[-1]
    target = start + EVERY * rng.choice([1, 2])
    target = min(target, MAX_STEPS)
    stale = inode(ckpt_root / f"step_{target:08d}")
    proc = launch(data, run_dir, nproc, log, save_args)
    if not wait_for_dir(ckpt_root / f"step_{target:08d}", proc, stale):
        proc.wait(timeout=600)
        remove_shm_buffers(proc.port)
        return None
    if rng.random() < MARKER_SHARE:
        delay = wait_for_marker(ckpt_root / f"step_{target:08d}", proc)
    else:
        delay = rng.uniform(0.0, save_s)
        time.sleep(delay)
    before = committed(ckpt_root)
    os.kill(victim_pid(proc, nproc, rng), signal.SIGKILL)
    proc.wait(timeout=120)
    remove_shm_buffers(proc.port)
    after = committed(ckpt_root)
    return Kill(target_step=target, delay_s=delay, phase=phase_of(ckpt_root / f"step_{target:08d}"),
                committed_before=before, committed_after=after, resumed_from_expected=(after or [0])[-1])


def check_kill(k: Kill, ckpt_root: Path) -> None:
    """No committed checkpoint that existed before the kill was lost, the newest is intact."""
    assert not k.committed_before or (k.committed_after and k.committed_after[-1] >= k.committed_before[-1]), k
    if k.committed_after:
        bad = damaged(ckpt_root, k.committed_after[-1])
        assert not bad, f"newest committed checkpoint damaged after a kill: {bad}"


def resumed_step(log: Path) -> int:
    m = re.search(r"resumed from \S+ at step (\d+)", log.read_text())
    return int(m.group(1)) if m else 0


def run_chains(data: Path, workdir: Path, points: int, nproc: int, seed: int, reference: dict[int, dict],
               save_s: float, say=print, save_args: tuple[str, ...] = ()) -> list[Kill]:
    """Kill launches until `points` kills happened; every chain that reaches the last step must
    reproduce the reference losses and grad norms exactly."""
    rng = random.Random(seed)
    kills: list[Kill] = []
    chain = 0
    while len(kills) < points:
        run_dir = workdir / f"chain{chain:03d}"
        n_launch = 0
        while len(kills) < points:
            log = workdir / f"chain{chain:03d}_launch{n_launch:02d}.log"
            k = kill_during_save(data, run_dir, nproc, rng, save_s, log, save_args)
            if n_launch:
                expected = kills[-1].resumed_from_expected
                got = resumed_step(log)
                assert got == expected, f"{log}: resumed from step {got}, newest committed was {expected}"
            n_launch += 1
            if k is None:  # reached the end without a save to kill
                break
            check_kill(k, run_dir / "checkpoints")
            kills.append(k)
            say(f"kill {len(kills):3d}: save of step {k.target_step} +{k.delay_s * 1000:4.0f} ms -> {k.phase}; "
                f"committed {k.committed_after}")
        finish = workdir / f"chain{chain:03d}_final.log"
        proc = launch(data, run_dir, nproc, finish, save_args)
        assert proc.wait(timeout=600) == 0, finish.read_text()[-3000:]
        remove_shm_buffers(proc.port)
        if kills:
            assert resumed_step(finish) == kills[-1].resumed_from_expected or n_launch == 0
        compare(read_metrics(run_dir), reference)
        chain += 1
    say(f"{chain} chains of launches ran to step {MAX_STEPS}, each equal to the reference bitwise")
    return kills


def compare(got: dict[int, dict], reference: dict[int, dict]) -> None:
    for step in range(1, MAX_STEPS + 1):
        for key in ("train/loss", "train/grad_norm"):
            assert got[step][key] == reference[step][key], (step, key, got[step][key], reference[step][key])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=int, default=24, help="number of SIGKILLs (default 24)")
    p.add_argument("--nproc", type=int, default=1, help="ranks per run (2: SIGKILL one random rank)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--async-save", action="store_true", help="kill during asynchronous saves (checkpoint.async_save)")
    p.add_argument("--workdir", type=Path, default=None, help="default: a new temporary directory")
    args = p.parse_args(argv)
    import tempfile

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kill_during_save_"))
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    if not (data / "manifest.json").is_file():
        src = make_text_corpus(workdir / "text")
        run_cmd([bin_path("memgpt-prepare"), str(src), "--out", str(data), "--vocab-size", "320", "--min-shards", "8",
                 "--val-fraction", "0.1", "--workers", "1"])
    t0 = time.time()
    save_args = ASYNC_SAVE if args.async_save else ()
    reference, save_s = reference_run(data, workdir / "reference", args.nproc, save_args)
    print(f"reference run: {MAX_STEPS} steps, median {save_s:.2f}s from a step directory to its commit marker; "
          f"kills at uniform delays in [0, {save_s:.2f}s] after the step directory appears, or at the marker")
    kills = run_chains(data, workdir, args.points, args.nproc, args.seed, reference, save_s, save_args=save_args)
    print(f"\n{len(kills)} kill points survived in {time.time() - t0:.0f}s (nproc {args.nproc}"
          f"{', async saves' if args.async_save else ''}); every restart "
          f"resumed from the newest committed checkpoint and every chain matched the reference bitwise")
    for phase, n in Counter(k.phase for k in kills).most_common():
        print(f"  {n:3d}  {phase}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
