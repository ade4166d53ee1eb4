"""A small prepared corpus made through the Python API (fast: one process, no launcher)."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import make_text_corpus, prepare_dir


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """80 documents of varied length in >= 8 train shards."""
    base = tmp_path_factory.mktemp("data")
    prepare_dir(make_text_corpus(base / "text"), base / "shards")
    return base / "shards"


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory) -> Path:
    """300 short documents: enough for the 1% skipped-sample rule to apply."""
    base = tmp_path_factory.mktemp("big")
    prepare_dir(make_text_corpus(base / "text", n_docs=300, seed=3), base / "shards")
    return base / "shards"
