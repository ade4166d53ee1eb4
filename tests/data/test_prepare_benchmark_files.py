"""benchmarks/prepare_throughput.py deletes only what it made: each measurement works in a new
directory of its own (`scratch`), and its input JSONL is written only as a new file."""
from __future__ import annotations

import importlib.util

import pytest

from helpers import ROOT


def bench():
    spec = importlib.util.spec_from_file_location("prepare_throughput", ROOT / "benchmarks" / "prepare_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scratch_removes_only_the_directory_it_made(tmp_path):
    scratch = bench().scratch
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "keep.txt").write_text("a user's")  # the names the benchmark used to reuse
    (tmp_path / "hf-cache-x").mkdir()
    with scratch(tmp_path, "ours-") as work:
        assert work.parent == tmp_path and work.name not in ("ours", "hf-cache-x")
        (work / "corpus").mkdir()
        (work / "corpus" / "manifest.json").write_text("{}")
    assert not work.exists()
    with pytest.raises(RuntimeError), scratch(tmp_path, "hf-cache-") as failed:
        raise RuntimeError("a failed measurement still cleans up its own directory only")
    assert not failed.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf-cache-x", "ours"]
    assert (tmp_path / "ours" / "keep.txt").read_text() == "a user's"


def test_the_input_jsonl_never_overwrites_a_file(tmp_path):
    path = tmp_path / "stdlib-x1.jsonl"
    path.write_text("a user's file")
    with pytest.raises(FileExistsError):
        bench().write_variants(path, 1, max_files=1)
    assert path.read_text() == "a user's file"
    docs, size = bench().write_variants(tmp_path / "new.jsonl", 2, max_files=1)
    assert docs == 2 and size == (tmp_path / "new.jsonl").stat().st_size
