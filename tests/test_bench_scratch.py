"""benchmarks/checkpoint_stall.py removes only the scratch directory it created itself."""
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
