"""Asynchronous checkpoints (`checkpoint.async_save`): the files of an async save equal a sync
save's tensor for tensor, a resume from one continues with the losses of an uninterrupted run,
nothing counts before the commit (a crash while writing leaves the previous checkpoint the newest),
the next save and the end of `fit` wait for a pending save, and the host buffers a save reuses are
not overwritten while the previous writer still reads them."""
from __future__ import annotations

import errno
import os
import threading

import pytest
import torch

from inprocess import flatten, make_trainer
from memgpt_dist.parallel.dist import init_distributed
from memgpt_dist.train.checkpoint import AsyncWrite, CheckpointDir, tag_for
from test_exact_resume import assert_same
from test_preemption import losses_of

ASYNC = ("checkpoint.async_save=true", "checkpoint.every=3")
SYNC = ("checkpoint.every=3",)


@pytest.fixture(scope="module")
def topo():
    return init_distributed()


def test_async_files_equal_sync_files_and_resume_is_exact(topo, tmp_path):
    full = losses_of(make_trainer(topo, tmp_path / "sync", extra=SYNC))
    a = make_trainer(topo, tmp_path / "async", extra=ASYNC)
    assert losses_of(a) == full  # saving in the background changes nothing the run computes
    assert a.checkpointer.last_commit_stall_s is not None  # the periodic saves were committed as async ones
    assert a.checkpointer.committed_steps() == [6, 9]  # keep_last=2; every one committed by the end of fit
    for step in (6, 9):
        assert a.checkpointer.verify(step) is None
        s_dir, a_dir = (tmp_path / r / "checkpoints" / tag_for(step) for r in ("sync", "async"))
        files = sorted(p.relative_to(s_dir) for p in s_dir.rglob("*.pt"))
        assert files and files == sorted(p.relative_to(a_dir) for p in a_dir.rglob("*.pt"))
        compared = sum(assert_same(torch.load(s_dir / f, weights_only=False), torch.load(a_dir / f, weights_only=False),
                                   str(f), (str(tmp_path / "sync"), str(tmp_path / "async"))) for f in files)
        assert compared > 20
    resumed = make_trainer(topo, tmp_path / "async", seed=2, extra=ASYNC)
    resumed.restore(6)
    assert losses_of(resumed) == full[6:]


def test_nothing_counts_before_the_commit(topo, tmp_path, monkeypatch):
    gate = threading.Event()
    run = AsyncWrite.run
    monkeypatch.setattr(AsyncWrite, "run", lambda self: (gate.wait(60), run(self)))  # the writer is held up
    t = make_trainer(topo, tmp_path, extra=("checkpoint.async_save=true",))
    t.fit(stop_after=2)  # a synchronous end save at step 2
    t.checkpointer.save(3, background=True)
    assert t.checkpointer.writing()
    files = CheckpointDir(tmp_path / "checkpoints", topo, keep_last=2)
    assert files.committed_steps() == [2] and files.latest_valid_step() == 2  # a crash now resumes from 2
    gate.set()
    t.checkpointer.save(4, background=True)  # the next save waits for and commits the previous one
    assert files.committed_steps() == [2, 3] and files.verify(3) is None
    t.checkpointer.finish_pending()
    assert files.committed_steps() == [3, 4] and files.verify(4) is None


def test_an_async_commit_deletes_pruned_checkpoints_behind_training(topo, tmp_path, monkeypatch):
    """The commit uncommits what keep_last drops (marker gone at once: never resumed from) and
    returns; the files go in a thread, joined before the next save and when fit ends."""
    from memgpt_dist.train import checkpoint

    gate, started, deleting = threading.Event(), threading.Event(), []
    delete = checkpoint._delete_dirs
    monkeypatch.setattr(checkpoint, "_delete_dirs",
                        lambda paths: (deleting.extend(paths), started.set(), gate.wait(60), delete(paths)))
    t = make_trainer(topo, tmp_path, extra=("checkpoint.async_save=true",))  # keep_last=2
    t.fit(stop_after=1)  # a synchronous end save at step 1
    for step in (2, 3):
        t.checkpointer.save(step, background=True)
        t.checkpointer.finish_pending()  # the commit of 3 returns while the deletion of step 1 is held up
    assert started.wait(10)
    old = tmp_path / "checkpoints" / tag_for(1)
    assert list(deleting) == [old] and old.is_dir() and not (old / "COMMITTED.json").exists()
    assert t.checkpointer.committed_steps() == [2, 3]
    save = threading.Thread(target=t.checkpointer.save, args=(4,), kwargs={"background": True})
    save.start()  # the next save waits for the deletion first
    save.join(1.0)
    assert save.is_alive() and not (tmp_path / "checkpoints" / tag_for(4)).exists()
    gate.set()
    save.join(60)
    assert not old.exists()
    t.checkpointer.finish_pending()
    t.checkpointer.wait_for_deletions()
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [tag_for(3), tag_for(4)]


def test_a_failed_background_write_is_reported_at_the_commit_and_commits_nothing(topo, tmp_path, monkeypatch):
    from memgpt_dist.train.checkpoint import CheckpointError

    t = make_trainer(topo, tmp_path, extra=("checkpoint.async_save=true",))
    t.fit(stop_after=1)

    def full_disk(parts, path, profile=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("memgpt_dist.train.checkpoint._write_recorded", full_disk)
    t.checkpointer.save(2, background=True)
    with pytest.raises(CheckpointError, match=r"step_00000002: .*No space left on device.*previous checkpoint"):
        t.checkpointer.finish_pending()
    assert t.checkpointer.committed_steps() == [1]


def tensors_of(host_copies) -> dict:
    """{path: clone} of the tensors in the host copies."""
    return {k: v for k, v in flatten(host_copies).items() if torch.is_tensor(v)}


def storages_of(obj, prefix: str = "") -> dict:
    """{path: data_ptr} of the tensors themselves (no clones)."""
    if torch.is_tensor(obj):
        return {prefix: obj.data_ptr()}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return {k2: v2 for k, v in items for k2, v2 in storages_of(v, f"{prefix}/{k}").items()}


def test_host_buffers_are_reused_but_not_before_the_previous_writer_is_done(topo, tmp_path, monkeypatch):
    gate = threading.Event()
    run = AsyncWrite.run
    monkeypatch.setattr(AsyncWrite, "run", lambda self: (gate.wait(60), run(self)))
    t = make_trainer(topo, tmp_path, extra=("checkpoint.async_save=true",))
    t.fit(stop_after=2)
    t.checkpointer.save(3, background=True)  # its writer is held up
    first, first_ptrs = tensors_of(t.checkpointer.files._host_copies), storages_of(t.checkpointer.files._host_copies)
    assert sum(v.numel() for v in first.values()) > 1000
    t.train_step()  # training goes on beside the writer and changes the engine's state
    assert t.checkpointer.writing()
    nxt = threading.Thread(target=t.checkpointer.save, args=(5,), kwargs={"background": True})
    nxt.start()  # the next save waits for the step-3 writer before copying anything into its buffers
    nxt.join(1.0)
    assert nxt.is_alive()
    for k, v in tensors_of(t.checkpointer.files._host_copies).items():
        assert torch.equal(v, first[k]), f"{k} was overwritten while the step-3 writer had not read it"
    gate.set()
    nxt.join(60)
    t.checkpointer.finish_pending()
    files = CheckpointDir(tmp_path / "checkpoints", topo, keep_last=5)
    assert files.verify(3) is None and files.verify(5) is None
    step3 = tmp_path / "checkpoints" / tag_for(3)
    saved = {p.name: torch.load(p, weights_only=False) for p in step3.glob("*.pt")}
    on_disk = {k.split("/", 2)[2]: v for k, v in tensors_of(saved).items()}  # keys without the file name
    captured = {k.split("/", 2)[2]: v for k, v in first.items() if not k.startswith("/rank_state")}
    assert captured.keys() <= on_disk.keys()
    assert all(torch.equal(on_disk[k], v) for k, v in captured.items())  # step 3's files hold step 3's state
    last = tensors_of(t.checkpointer.files._host_copies)
    big = [k for k, v in first.items() if v.numel() > 100]
    last_ptrs = storages_of(t.checkpointer.files._host_copies)
    assert big and all(last_ptrs[k] == first_ptrs[k] for k in big)  # copied into, not reallocated
    assert any(not torch.equal(last[k], first[k]) for k in big)  # ... with step 5's values


def test_host_copy_copies_tied_tensors_once_and_fills_each_reused_buffer_once():
    from memgpt_dist.parallel.ds_compat import host_copy

    w = torch.randn(4, 3)
    first = host_copy({"wte": w.detach(), "lm_head": w.detach()})  # tied: one storage, two keys
    assert first["wte"] is first["lm_head"] and first["wte"].data_ptr() != w.data_ptr()
    u = torch.randn(4, 3)
    again = host_copy({"wte": w, "lm_head": u}, into=first)  # no longer tied: the shared buffer serves one key
    assert torch.equal(again["wte"], w) and torch.equal(again["lm_head"], u)
    assert again["wte"].data_ptr() == first["wte"].data_ptr()


def test_the_writer_hashes_while_writing_and_sends_aligned_tensor_bytes_direct(tmp_path):
    """The background writer's files: torch.save's bytes recorded at the step boundary without
    copying a tensor, then written: loadable (also memory-mapped) with every tensor equal, their
    checksum and size computed while writing equal to a read-back of the file, the page-aligned host
    copies' bytes written with O_DIRECT where the file system allows it, an unaligned tensor and
    the page cache only (direct=False) giving the same result."""
    from memgpt_dist.parallel.ds_compat import host_copy
    from memgpt_dist.train.checkpoint import (DIRECT_ALIGN, HashingFile, _address, _open_direct, record_torch_save,
                                              FILE_DIGEST, file_digest)

    w = torch.randn(300, 1001)
    state = {"w": w, "tied": w, "small": torch.randn(5), "bf16": torch.randn(999, 77).to(torch.bfloat16),
             "nested": [torch.arange(70_000), 3, "x"], "step": torch.tensor(7.0)}
    host = host_copy(state)
    assert host["w"].data_ptr() % DIRECT_ALIGN == 0 and host["tied"] is host["w"]
    host["unaligned"] = torch.randn(50_000)[1:]  # a view one element into its storage
    probe = tmp_path / "probe"
    probe.touch()
    direct_fd = _open_direct(probe)
    if direct_fd is not None:
        os.close(direct_fd)
    parts = record_torch_save(host)  # at the step boundary: the pickle and headers copied, tensor bytes not
    assert sum(isinstance(p, memoryview) for p in parts) == 4  # w (once, for both keys), bf16, arange, unaligned
    assert any(isinstance(p, memoryview) and _address(p) == host["w"].data_ptr() for p in parts)
    for direct in (True, False):
        path = tmp_path / f"direct_{direct}.pt"
        out = HashingFile(path, direct=direct)
        for part in parts:
            out.write(part)
        hashed = out.close()
        assert hashed == {FILE_DIGEST: file_digest(path), "bytes": path.stat().st_size}
        if direct and direct_fd is not None:
            assert out.direct_bytes >= 300 * 1001 * 4 // DIRECT_ALIGN * DIRECT_ALIGN
        else:
            assert out.direct_bytes == 0
        for loaded in (torch.load(path, weights_only=True), torch.load(path, weights_only=True, mmap=True)):
            assert loaded.keys() == host.keys() and loaded["nested"][1:] == [3, "x"]
            for k in ("w", "tied", "small", "bf16", "step", "unaligned"):
                assert torch.equal(loaded[k], host[k]) and loaded[k].dtype == host[k].dtype, k
            assert torch.equal(loaded["nested"][0], state["nested"][0])
    assert torch.serialization.get_crc32_options()  # the process-wide options are back
    from torch.utils.serialization import config
    assert config.save.storage_alignment == 64


def test_the_writer_falls_back_to_the_page_cache_where_o_direct_is_refused(tmp_path, monkeypatch):
    from memgpt_dist.parallel.ds_compat import host_copy
    from memgpt_dist.train import checkpoint
    from memgpt_dist.train.checkpoint import FILE_DIGEST, HashingFile, _writer_serialization, file_digest

    host = host_copy({"a": torch.randn(200, 500), "b": torch.randn(100, 700)})
    path = tmp_path / "x.pt"
    # a second plain descriptor stands for the O_DIRECT one on every file system (tmpfs refuses
    # O_DIRECT at open, which would leave nothing to refuse); its writes are refused below
    monkeypatch.setattr(checkpoint, "_open_direct", lambda p: os.open(p, os.O_WRONLY))
    out = HashingFile(path)
    refused = []
    pwrite_all = checkpoint._pwrite_all

    def pwrite(fd, view, offset):
        if fd == out.direct_fd:  # a device that wants another alignment
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        pwrite_all(fd, view, offset)

    monkeypatch.setattr(checkpoint, "_pwrite_all", pwrite)
    with _writer_serialization():
        torch.save(host, out)
    hashed = out.close()
    assert len(refused) == 1 and out.direct_bytes == 0  # refused once, then the page cache for the rest
    assert hashed == {FILE_DIGEST: file_digest(path), "bytes": path.stat().st_size}
    loaded = torch.load(path, weights_only=True)
    assert all(torch.equal(loaded[k], host[k]) for k in host)
