"""Test helpers: run the real CLIs, make corpora, read run metrics."""
from __future__ import annotations

import json
import socket
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# DeepSpeed JIT-builds its CPU comm op under ~/.cache/torch_extensions; two virtualenvs (a dev venv
# and CI's) sharing that directory rebuild it back and forth, and a rebuild inside a test that
# limits file sizes fails in the compiler. Each venv keeps its own build.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def cli_env() -> dict[str, str]:
    """The test process's environment minus any process-group variables an in-process test set."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": "false"})
    return env


def bin_path(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def run_cmd(args: list[str], timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                             f"STDERR:\n{proc.stderr[-4000:]}")
    return proc


def make_text_corpus(root: Path, n_docs: int = 80, seed: int = 0) -> Path:
    """Documents of varied length; some are longer than a whole sample so streams span them."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(60)] + ["def", "return", "class", "import", "(", ")", ":", "="]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        n = rng.choice([20, 60, 150, 400, 900])
        (root / f"doc{i:03d}.txt").write_text(" ".join(rng.choice(words) for _ in range(n)) + "\n")
    return root


def prepare_dir(src: Path, out: Path, **kw) -> dict:
    """Run the prepare step in-process on `src` (small vocabulary, one worker); returns the manifest."""
    from data_pipeline.prepare_corpus import PrepareConfig, prepare

    opts = {"vocab_size": 300, "min_shards": 8, "val_fraction": 0.1, "workers": 1, **kw}
    return prepare(PrepareConfig(out=out, inputs=(str(src),), **opts))


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of the run directory `src` at the new path `dst` (copytree refuses an existing one)
    without its metrics.jsonl, so that a run resumed there logs only its own steps."""
    shutil.copytree(src, dst)
    (dst / "metrics.jsonl").unlink()  # the copy's, made just above
    return dst


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """Per-step records of metrics.jsonl (train and val records merged by step)."""
    out: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(rec["step"], {}).update(rec)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--config", "configs/tiny.yaml", f"--run_dir={run_dir}", f"--data.path={data}",
            "--model.vocab_size=320", "--model.n_embd=64", "--model.segment_len=16", "--data.n_segments=3",
            "--train.eval_every=3", "--train.eval_batches=2", "--log.every=1", "--optim.warmup_steps=2",
            "--train.max_steps=6", "--checkpoint.every=3", *extra]


def train(args: list[str], nproc: int = 1, timeout: int = 400):
    """Run launch/train.py with `nproc` ranks: 1 = plain python, >1 = the deepspeed launcher."""
    if nproc == 1:
        cmd = [sys.executable, "launch/train.py", *args]
    else:
        cmd = [bin_path("deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()),
               "launch/train.py", *args]
    return run_cmd(cmd, timeout=timeout)
