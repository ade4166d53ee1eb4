"""Checkpointer rules that need no engine: commit marker, verification, fallback, keep-last-k."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from memgpt_dist.parallel.dist import Topology
from memgpt_dist.train import checkpoint as ckpt_mod
from memgpt_dist.train.checkpoint import FILE_DIGEST, MARKER, CheckpointDir, CheckpointError, file_digest, sha256_file, \
    tag_for


class FakeEngine:
    """Writes one tensor file per tag the way DeepSpeed's save_checkpoint lays out a tag dir."""

    def __init__(self, value: float = 0.0):
        self.value = value

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"w": torch.full((4,), self.value), "client": client_state}, d / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, load_dir, tag, **kw):
        sd = torch.load(Path(load_dir) / tag / "mp_rank_00_model_states.pt", weights_only=True)
        self.value = float(sd["w"][0])
        return str(Path(load_dir) / tag), sd["client"]


TOPO = Topology(rank=0, world_size=1, local_rank=0, dp_rank=0, dp_size=1, device=torch.device("cpu"))


def save(ck: CheckpointDir, step: int, value: float = 0.0) -> Path:
    return ck.write(FakeEngine(value), step, {"step": step}, {"cursor": step}, meta={"config": "{}"})


def test_commit_marker_lists_every_file_with_its_checksum(tmp_path):
    ck = CheckpointDir(tmp_path, TOPO, keep_last=3)
    path = save(ck, 5)
    marker = json.loads((path / MARKER).read_text())
    assert set(marker["files"]) == {"mp_rank_00_model_states.pt", "rank_state/rank_00000.pt"}
    assert all(v[FILE_DIGEST] == file_digest(path / name) and len(v[FILE_DIGEST]) == 32
               for name, v in marker["files"].items())
    assert ck.verify(5) is None


def test_uncommitted_directory_is_ignored(tmp_path):
    ck = CheckpointDir(tmp_path, TOPO, keep_last=3)
    save(ck, 1)
    path = save(ck, 2)
    (path / MARKER).unlink()  # as if the job died before the commit
    assert ck.latest_valid_step() == 1


def test_truncated_file_is_named_and_resume_falls_back(tmp_path, caplog):
    ck = CheckpointDir(tmp_path, TOPO, keep_last=3)
    save(ck, 1)
    path = save(ck, 2)
    f = path / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:10])
    assert "mp_rank_00_model_states.pt" in ck.verify(2)
    assert ck.latest_valid_step() == 1
    assert "falling back" in caplog.text


def test_corrupted_bytes_same_size_are_detected(tmp_path):
    ck = CheckpointDir(tmp_path, TOPO, keep_last=3)
    path = save(ck, 1)
    f = path / "rank_state" / "rank_00000.pt"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    assert f"does not match its {FILE_DIGEST} checksum" in ck.verify(1)


def test_a_marker_written_with_sha256_still_verifies_and_catches_damage(tmp_path):
    """Markers from before the xxh3 checksum hold sha256: verified by that, damage still named."""
    ck = CheckpointDir(tmp_path, TOPO, keep_last=3)
    path = save(ck, 1)
    marker = json.loads((path / MARKER).read_text())
    marker["files"] = {name: {"sha256": sha256_file(path / name), "bytes": v["bytes"]}
                       for name, v in marker["files"].items()}
    (path / MARKER).write_text(json.dumps(marker))
    assert ck.verify(1) is None
    f = path / "rank_state" / "rank_00000.pt"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    assert f"{f} does not match its sha256 checksum" in ck.verify(1)


def test_keep_last_k_deletes_only_older_committed(tmp_path):
    ck = CheckpointDir(tmp_path, TOPO, keep_last=2)
    for step in (1, 2, 3, 4):
        save(ck, step)
    assert ck.committed_steps() == [3, 4]


def test_pruning_deletes_only_what_the_project_wrote(tmp_path, caplog):
    """A pruned checkpoint and a dead uncommitted save lose our files (DeepSpeed's, the ranks',
    tmp names, a universal conversion of ours, a half-done one); a user's file or a universal
    directory we did not write stays, with the directories holding it, and is named."""
    ck = CheckpointDir(tmp_path, TOPO, keep_last=1)
    first = save(ck, 1)
    (first / "notes.txt").write_text("mine")  # a user's file beside our checkpoint files
    (first / "universal" / "step_00000001" / "zero").mkdir(parents=True)
    (first / "universal" / "CONVERTED.json").write_text("{}")  # a conversion of ours
    (first / "universal" / "step_00000001" / "zero" / "fp32.pt").write_bytes(b"x")
    dead = tmp_path / tag_for(2)  # a save killed before its commit: some of our files, a user's subdirectory
    (dead / "rank_state").mkdir(parents=True)
    (dead / "rank_state" / "rank_00000.pt.tmp").write_bytes(b"x")
    (dead / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x")
    (dead / "universal.tmp-123" / "zero").mkdir(parents=True)  # a conversion killed half-way
    (dead / "universal.tmp-123" / "zero" / "exp_avg.pt").write_bytes(b"x")
    (dead / "universal" / "zero").mkdir(parents=True)  # a hand-made universal directory: no DONE record
    (dead / "universal" / "zero" / "mine.pt").write_bytes(b"y")
    save(ck, 3)  # prunes 1 (keep_last) and 2 (uncommitted, older than the newest)
    assert sorted(p.relative_to(first).as_posix() for p in first.rglob("*")) == ["notes.txt"]
    assert sorted(p.relative_to(dead).as_posix() for p in dead.rglob("*")) == ["universal", "universal/zero",
                                                                               "universal/zero/mine.pt"]
    assert (first / "notes.txt").read_text() == "mine" and (dead / "universal" / "zero" / "mine.pt").read_bytes() == b"y"
    assert f"kept {first}: it holds files this project did not write (notes.txt)" in caplog.text
    assert f"kept {dead}: it holds files this project did not write (universal/zero/mine.pt)" in caplog.text
    assert ck.committed_steps() == [3] and ck.verify(3) is None
    save(ck, 4)  # nothing of ours is left in them to delete; the user's files stay
    assert (first / "notes.txt").read_text() == "mine" and (dead / "universal" / "zero" / "mine.pt").is_file()
    assert not (tmp_path / tag_for(3)).exists()  # a checkpoint with only our files goes entirely


def test_pruning_does_not_follow_a_symlink(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "mp_rank_00_model_states.pt").write_bytes(b"user")  # named like ours, but elsewhere
    ck = CheckpointDir(tmp_path / "ck", TOPO, keep_last=1)
    first = save(ck, 1)
    (first / "link").symlink_to(outside, target_is_directory=True)
    save(ck, 2)
    assert (outside / "mp_rank_00_model_states.pt").read_bytes() == b"user"
    assert (first / "link").is_symlink() and not (first / "mp_rank_00_model_states.pt").exists()


def test_load_restores_engine_and_rank_state(tmp_path):
    ck = CheckpointDir(tmp_path, TOPO, keep_last=2)
    save(ck, 7, value=3.5)
    engine = FakeEngine()
    loaded = ck.read(engine, 7)
    assert engine.value == 3.5
    assert loaded.rank_state == {"cursor": 7}
    assert loaded.client_state == {"step": 7}


def test_missing_rank_file_gives_layout_advice(tmp_path):
    ck = CheckpointDir(tmp_path, TOPO, keep_last=2)
    path = save(ck, 1)
    (path / "rank_state" / "rank_00000.pt").unlink()
    with pytest.raises(CheckpointError, match="different number of ranks"):
        ck.read(FakeEngine(), 1)


def test_unwritable_directory_is_a_clear_error_and_keeps_previous(tmp_path):
    ck = CheckpointDir(tmp_path, TOPO, keep_last=2)
    save(ck, 1)

    class FullDisk(FakeEngine):
        def save_checkpoint(self, *a, **k):
            raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointError, match="previous checkpoint .* is untouched"):
        ck.write(FullDisk(), 2, {}, {})
    assert ck.latest_valid_step() == 1
    assert tag_for(1) in {p.name for p in tmp_path.iterdir()}


def test_uncommitted_leftover_of_same_step_is_set_aside_until_the_new_commit(tmp_path, monkeypatch):
    ck = CheckpointDir(tmp_path, TOPO, keep_last=3)
    save(ck, 1)
    leftover = save(ck, 2)
    (leftover / MARKER).unlink()  # a save of step 2 killed before its commit
    seen = {}

    class Watching(FakeEngine):
        def save_checkpoint(self, save_dir, tag, client_state, save_latest):
            seen["during"] = sorted(p.name for p in tmp_path.iterdir())
            super().save_checkpoint(save_dir, tag, client_state, save_latest)

    ck.write(Watching(), 2, {}, {}, meta={})
    assert any(n.startswith("step_00000002.partial-") for n in seen["during"])  # renamed, not deleted
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_")) == [tag_for(1), tag_for(2)]
    assert ck.verify(2) is None


def test_uncommitted_newer_than_newest_committed_is_kept(tmp_path):
    ck = CheckpointDir(tmp_path, TOPO, keep_last=3)
    save(ck, 1)
    (tmp_path / tag_for(5)).mkdir()  # a save in progress (or killed) of a later step
    save(ck, 2)
    assert (tmp_path / tag_for(5)).is_dir()
    save(ck, 6)
    assert not (tmp_path / tag_for(5)).exists()  # dead once a newer checkpoint is committed


def test_prune_keeps_the_newest_committed_even_with_keep_last_0(tmp_path):
    ck = CheckpointDir(tmp_path, TOPO, keep_last=0)
    save(ck, 1)
    save(ck, 2)
    assert ck.committed_steps() == [2]


def test_prune_uncommits_before_deleting(tmp_path, monkeypatch):
    ck = CheckpointDir(tmp_path, TOPO, keep_last=1)
    save(ck, 1)

    def interrupted_delete(path, listed):
        raise KeyboardInterrupt  # the process dies in the middle of deleting step 1

    monkeypatch.setattr(ckpt_mod, "_delete_own", interrupted_delete)
    with pytest.raises(KeyboardInterrupt):
        save(ck, 2)
    assert ck.committed_steps() == [2]  # step 1 lost its marker first: never a half-deleted "checkpoint"


def test_resume_refuses_when_every_committed_checkpoint_is_damaged(tmp_path):
    ck = CheckpointDir(tmp_path, TOPO, keep_last=3)
    path = save(ck, 1)
    (path / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt is missing"):
        ck.latest_valid_step()


def test_no_committed_checkpoint_means_a_fresh_start(tmp_path):
    ck = CheckpointDir(tmp_path, TOPO, keep_last=3)
    (tmp_path / tag_for(2)).mkdir()  # the very first save was killed
    assert ck.latest_valid_step() is None


def test_loading_an_older_step_sets_newer_checkpoints_aside(tmp_path):
    ck = CheckpointDir(tmp_path, TOPO, keep_last=5)
    for step in (1, 2, 3):
        save(ck, step)
    ck.read(FakeEngine(), 1)
    assert ck.committed_steps() == [1]
    aside = sorted(p.name.split(".")[1].split("-")[0] for p in tmp_path.iterdir() if "." in p.name)
    assert aside == ["superseded", "superseded"]  # kept for the user, out of --resume auto's way
    save(ck, 2)  # the new history writes step 2 again
    assert ck.committed_steps() == [1, 2]


def test_full_disk_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    ck = CheckpointDir(tmp_path, TOPO, keep_last=2)
    save(ck, 1)
    monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", lambda p: shutil_usage(free=100))
    with pytest.raises(CheckpointError, match=f"{tmp_path} has 0.0 MiB free"):
        save(ck, 2)
    assert not (tmp_path / tag_for(2)).exists()
    assert ck.latest_valid_step() == 1


def test_committed_checkpoint_of_the_same_step_is_never_overwritten(tmp_path):
    ck = CheckpointDir(tmp_path, TOPO, keep_last=2)
    save(ck, 1, value=1.0)
    with pytest.raises(CheckpointError, match="already committed"):
        save(ck, 1, value=2.0)
    assert ck.verify(1) is None


def shutil_usage(free: int):
    import shutil

    return shutil._ntuple_diskusage(total=10**9, used=10**9 - free, free=free)


def test_deepspeed_latest_file_is_never_trusted(tmp_path):
    ck = CheckpointDir(tmp_path, TOPO, keep_last=3)
    save(ck, 1)
    (tmp_path / tag_for(2)).mkdir()
    (tmp_path / "latest").write_text(tag_for(2))  # what DeepSpeed writes before its final barrier
    assert ck.latest_valid_step() == 1
    assert not (tmp_path / tag_for(1) / "latest").exists() and ck.marker(1)["step"] == 1


# ---------------------------------------------------------------- careless commands lose nothing (issue 13)
def test_a_removed_marker_is_named_set_aside_and_never_pruned(tmp_path, caplog):
    ck = CheckpointDir(tmp_path, TOPO, keep_last=2)
    save(ck, 1)
    (save(ck, 2) / MARKER).unlink()  # the newest checkpoint's marker removed by hand
    with caplog.at_level("WARNING"):
        assert ck.latest_valid_step() == 1
        ck.read(FakeEngine(), 1)
    assert f"skipping {tmp_path / tag_for(2)}: it has no {MARKER}" in caplog.text
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(f"{tag_for(2)}.uncommitted-")]
    assert len(aside) == 1 and str(aside[0]) in caplog.text
    for step in (2, 3, 4):  # the run goes on; prunes follow every commit
        save(ck, step)
    assert aside[0].is_dir() and (aside[0] / "mp_rank_00_model_states.pt").is_file()


def test_resume_of_a_step_without_checkpoint_lists_the_ones_there(tmp_path):
    from memgpt_dist.train.resume import resolve_resume

    ck = CheckpointDir(tmp_path, TOPO, keep_last=3)
    save(ck, 1)
    save(ck, 2)
    with pytest.raises(CheckpointError, match=r"--resume 999: step 999 has no committed checkpoint .*committed "
                                              r"steps: 1, 2"):
        resolve_resume("999", ck)


def test_generate_falls_back_past_a_truncated_newest_checkpoint(tmp_path, caplog):
    from memgpt_dist.generate import find_checkpoint

    ck = CheckpointDir(tmp_path / "checkpoints", TOPO, keep_last=3)
    save(ck, 1)
    model_file = save(ck, 2) / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:100])
    with caplog.at_level("WARNING"):
        assert find_checkpoint(tmp_path) == tmp_path / "checkpoints" / tag_for(1)
    assert "truncated" in caplog.text and tag_for(2) in caplog.text
    with pytest.raises(CheckpointError, match="is damaged"):
        find_checkpoint(tmp_path, step=2)


def test_a_universal_directory_we_did_not_write_is_refused_not_deleted(tmp_path):
    from memgpt_dist.parallel.layout import Layout
    from memgpt_dist.train.universal import ensure_universal

    step_dir = save(CheckpointDir(tmp_path, TOPO, keep_last=3), 1)
    (step_dir / "universal").mkdir()
    (step_dir / "universal" / "mine.txt").write_text("a conversion made by hand")
    saved = Layout(world_size=2, dp=2, tp=1, pp=1, zero_stage=3, micro_batch_size=2, grad_accum=1, global_batch_size=4)
    with pytest.raises(CheckpointError, match=r"universal exists but was not written by memgpt-dist"):
        ensure_universal(step_dir, saved, TOPO)
    assert (step_dir / "universal" / "mine.txt").read_text() == "a conversion made by hand"
