"""benchmarks/checkpoint_stall.py runs end to end, and removes only the scratch directory it created itself."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import checkpoint_stall  # noqa: E402


def test_the_scratch_directory_is_new_and_only_it_is_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    neighbour = tmp_path / "ckpt_stall_20m_user"  # a directory the benchmark did not make
    neighbour.mkdir()
    (neighbour / "keep.pt").write_bytes(b"x")
    with checkpoint_stall.scratch_dir("20m") as root:
        assert root.parent == tmp_path and root != neighbour and not any(root.iterdir())
        (root / "step_1").mkdir()
        (root / "step_1" / "model.pt").write_bytes(b"y")
    assert not root.exists()
    assert (neighbour / "keep.pt").read_bytes() == b"x"


def test_the_benchmark_runs_at_tiny_size_and_judges_each_thread_count(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert checkpoint_stall.main(["--sizes", "tiny", "--rounds", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "== tiny, 1 training thread(s)" in out and "sync save" in out and "load" in out
    summary = out.split("summary:")[1].strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith("tiny, 1 thread(s): async stall ")
    assert ("PASS" in summary[0]) != ("FAIL" in summary[0])
    assert not list(tmp_path.glob("ckpt_stall_*"))  # its checkpoints went with the scratch directory
