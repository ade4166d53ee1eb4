"""Shared by the resume-on-another-layout tests: run tests/dist/relayout_worker.py (launch/train.py
with every sample recorded) uninterrupted in a source layout, then resume a copy of its step-3
checkpoint in a target layout, and read back losses and samples."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import ROOT, bin_path, free_port, read_metrics, run_cmd

WORKER = str(ROOT / "tests" / "dist" / "relayout_worker.py")
SAVE_AT, STEPS = 3, 6


def common(data: Path, run_dir: Path) -> list[str]:
    return ["--config", "configs/tiny.yaml", f"--run_dir={run_dir}", f"--data.path={data}", "--model.vocab_size=320",
            "--model.n_embd=64", "--model.segment_len=16", "--data.n_segments=3", "--train.eval_every=0",
            "--log.every=1", "--optim.warmup_steps=2", f"--train.max_steps={STEPS}", f"--checkpoint.every={SAVE_AT}",
            "--checkpoint.keep_last=3"]


def launch(data: Path, run_dir: Path, nproc: int, extra: list[str], check: bool = True) -> subprocess.CompletedProcess:
    args = [WORKER, *common(data, run_dir), *extra]
    cmd = [sys.executable, *args] if nproc == 1 else \
        [bin_path("deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()), *args]
    return run_cmd(cmd, timeout=300, check=check)


def copy_at_save(source: Path, target: Path) -> Path:
    """A run directory holding only the source's step-3 checkpoint (as if the run stopped there)."""
    (target / "checkpoints").mkdir(parents=True)
    for name in ("config.json", "tokenizer.json"):
        shutil.copy2(source / name, target / name)
    tag = f"step_{SAVE_AT:08d}"
    shutil.copytree(source / "checkpoints" / tag, target / "checkpoints" / tag)
    return target


def losses(run_dir: Path) -> dict[int, float]:
    return {step: rec["train/loss"] for step, rec in read_metrics(run_dir).items() if "train/loss" in rec}


def samples(run_dir: Path) -> dict[int, dict[int, str]]:
    """{step: {global stream id: sample hash}} over every rank and launch; the TP ranks and
    pipeline stages of a replica read the same sample, which must then be the same."""
    out: dict[int, dict[int, str]] = {}
    for f in sorted((run_dir / "samples").glob("rank_*.json")):
        for step, stream, digest in json.loads(f.read_text()):
            seen = out.setdefault(step, {}).setdefault(stream, digest)
            assert seen == digest, f"{f}: step {step} stream {stream} read two different samples"
    return out


class Runs:
    """Source runs and resumed copies, each made on first use and kept for the module.

    `sources`: name -> (ranks, overrides); `pairs`: name -> (source name, ranks, overrides, the
    regular expression the resumed run's log must match)."""

    def __init__(self, data: Path, tmp_path_factory, sources: dict, pairs: dict):
        self.data, self.tmp, self.sources, self.pairs = data, tmp_path_factory, sources, pairs
        self.made: dict[str, Path] = {}

    def source(self, name: str) -> Path:
        if name not in self.made:
            nproc, extra = self.sources[name]
            self.made[name] = self.tmp.mktemp(name)
            launch(self.data, self.made[name], nproc, extra)
        return self.made[name]

    def resumed(self, pair: str) -> tuple[Path, Path]:
        """(the uninterrupted source run, its step-3 copy resumed in the pair's target layout)."""
        source_name, nproc, extra, _ = self.pairs[pair]
        source = self.source(source_name)
        if pair not in self.made:
            self.made[pair] = copy_at_save(source, self.tmp.mktemp(pair))
            launch(self.data, self.made[pair], nproc, [*extra, "--resume", "auto"])
        return source, self.made[pair]

    def refused(self, source_name: str, nproc: int, extra: list[str], tmp: Path) -> subprocess.CompletedProcess:
        """Resume a copy of the source's step 3 in a layout that must be refused."""
        target = copy_at_save(self.source(source_name), tmp)
        return launch(self.data, target, nproc, [*extra, "--resume", "auto"], check=False)


def assert_losses_continue(source: Path, target: Path, rel: float = 1e-5) -> None:
    """Steps 4-6 after the change have the uninterrupted run's losses (step 4: the issue's criterion)."""
    a, b = losses(source), losses(target)
    assert sorted(b) == list(range(SAVE_AT + 1, STEPS + 1))
    for step in sorted(b):
        assert abs(b[step] - a[step]) <= rel * abs(a[step]), (step, a[step], b[step])


def assert_samples_continue(source: Path, target: Path) -> None:
    """Every stream reads at every step after the change the sample it read uninterrupted: nothing
    skipped, repeated or reordered; with the steps before the change, the same set of samples."""
    uninterrupted, after = samples(source), samples(target)
    assert sorted(after) == list(range(SAVE_AT + 1, STEPS + 1))
    for step in after:
        assert after[step] == uninterrupted[step], step
    across = [h for step in range(1, STEPS + 1) for h in (uninterrupted if step <= SAVE_AT else after)[step].values()]
    assert sorted(across) == sorted(h for rows in uninterrupted.values() for h in rows.values())


def assert_log_says(target: Path, pattern: str) -> None:
    log = (target / "train.log").read_text()
    assert re.search(rf"checkpoint step {SAVE_AT} written by {pattern}", log), log[-3000:]
