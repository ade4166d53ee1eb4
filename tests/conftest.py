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
