"""Shared fixtures: a small prepared corpus for the CLI and distributed tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import bin_path, make_text_corpus, run_cmd

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared corpus (vocab ~300, many small shards) shared by the CLI and distributed tests."""
    base = tmp_path_factory.mktemp("corpus")
    src = make_text_corpus(base / "text")
    out = base / "data"
    run_cmd([bin_path("memgpt-prepare"), str(src), "--out", str(out), "--vocab-size", "320",
             "--min-shards", "8", "--val-fraction", "0.1", "--workers", "1"])
    assert (out / "manifest.json").is_file()
    return out


@pytest.fixture(scope="session", autouse=True)
def no_leaked_shm_buffers():
    """Tests SIGKILL training processes on purpose, and a killed rank cannot remove its DeepSpeed
    shm allreduce file (66 MB of RAM in /dev/shm each); remove the ones this session made."""
    import glob
    import time

    start = time.time()
    yield
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*"):
        try:
            if os.stat(path).st_mtime >= start:
                os.unlink(path)
        except FileNotFoundError:
            pass
