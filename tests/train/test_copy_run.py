"""The test helper that copies a run to resume it deletes only from its own copy."""
from __future__ import annotations

import pytest


def test_copy_run_deletes_only_its_own_copy_of_the_metrics(tmp_path):
    """tests/helpers.copy_run drops metrics.jsonl from the copy it makes, never from the source,
    and refuses a destination that exists (it could hold a user's files)."""
    from helpers import copy_run

    src = tmp_path / "src"
    src.mkdir()
    (src / "metrics.jsonl").write_text("{}\n")
    (src / "config.json").write_text("{}")
    dst = copy_run(src, tmp_path / "dst")
    assert (src / "metrics.jsonl").read_text() == "{}\n"
    assert sorted(p.name for p in dst.iterdir()) == ["config.json"]
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "metrics.jsonl").write_text("a user's")
    with pytest.raises(FileExistsError):
        copy_run(src, tmp_path / "theirs")
    assert (tmp_path / "theirs" / "metrics.jsonl").read_text() == "a user's"
