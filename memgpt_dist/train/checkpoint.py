"""A run's checkpoint directory: layout, crash-safe writes, the commit marker, verification, keep-last-k.

What goes into a checkpoint is decided by `train.checkpointer.Checkpointer`, which writes and
reads through `CheckpointDir`; this module owns the files: the commit marker has one writer
(`CheckpointDir._commit`) and one reader (`read_marker`).

Layout under `<run_dir>/checkpoints/`:

    step_00000050/                 a DeepSpeed tag directory (engine.save_checkpoint)
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt, ...
        rank_state/rank_00000.pt   this rank's loader cursor and RNG (every rank writes its own;
                                   DeepSpeed's client_state is written by data-parallel rank 0 only)
        COMMITTED.json             written last by rank 0 after a barrier: step, world size, config
                                   hash, and the checksum (`FILE_DIGEST`) + size of every other file.

A save is crash-safe because nothing counts until the marker exists:

1. preflight (every rank, agreed): the directory is writable and has room for a checkpoint as
   large as the last one; otherwise every rank raises before anything is written;
2. every rank writes its files and fsyncs them; a leftover uncommitted directory of the same step
   (a save killed half-way) is first renamed aside, never deleted before the new commit;
3. barrier; the ranks hash the files between them; rank 0 writes the marker (tmp, fsync, rename,
   fsync of the directory): the commit point;
4. barrier; only then rank 0 prunes: committed checkpoints beyond `keep_last` (marker removed
   first, so a half-deleted directory is uncommitted), uncommitted directories older than the
   newest committed one, and set-aside leftovers. The newest committed checkpoint is never pruned.

DeepSpeed's own `latest` file is not written and never read: resume takes the newest directory
whose marker verifies, and a checkpoint whose file is missing, truncated or corrupted is refused
with a message naming the file, falling back to the previous one. Loading reads every file with
`torch.load(weights_only=True)`, DeepSpeed's included, so a checkpoint cannot execute code.
"""
from __future__ import annotations

import bisect
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import xxhash

from memgpt_dist.parallel.dist import Topology
from memgpt_dist.parallel.ds_compat import (captured_checkpoint_writes, host_copy, repair_universal_optimizer_state,
                                            torch_load_weights_only, weights_only_loading)

log = logging.getLogger(__name__)

MARKER = "COMMITTED.json"
TAG_RE = re.compile(r"^step_(\d{8})$")
# Directories renamed out of the way: an uncommitted leftover of a killed save ("partial", pruned
# once a newer checkpoint is committed) or a committed checkpoint newer than the step a run
# resumed from ("superseded": kept for the user, never read or deleted by the run).
# An "uncommitted" directory newer than the step a run resumed from (a save that did not finish,
# or a checkpoint whose marker was removed) is set aside the same way and never deleted by the run.
ASIDE_RE = re.compile(r"^step_(\d{8})\.(partial|superseded|uncommitted)-\d+$")
# How much larger than the previous checkpoint the free space must be before a save starts.
FREE_SPACE_FACTOR = 1.1
RANK_STATE_COPY = "rank_state"  # the key of this rank's own state among the reused host copies


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or used; the message says which file and what to do."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    step: int
    path: Path
    client_state: dict[str, Any]
    rank_state: dict[str, Any]  # this rank's own saved state (same layout)
    rank_states: tuple[dict[str, Any], ...] = ()  # every saved rank's state (a resume on another layout)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


# The checksum of each checkpoint file in the marker. xxh3-128 costs ~0.14 s of CPU per GB here
# against sha256's ~0.7, and a background writer takes that CPU from training. It guards against
# damage (a truncated, bit-flipped or stale file), not tampering: files are loaded weights_only.
# Markers written before it hold "sha256"; `verify` checks whichever a marker holds.
FILE_DIGEST = "xxh3_128"
DIGESTS = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}


def file_digest(path: Path, algo: str = FILE_DIGEST, chunk: int = 1 << 22) -> str:
    h = DIGESTS[algo]()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    return file_digest(path, "sha256")


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (a rename or a new file) on POSIX file systems."""
    with contextlib.suppress(OSError):  # some file systems refuse fsync on directories
        _fsync_file(path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_marker(step_dir: Path) -> dict[str, Any]:
    """The commit marker of a checkpoint directory (the one reader of its format). Markers of
    older versions also held `config_sha256` and `meta.world_size`; the world size is read from
    the top level, where every version wrote it."""
    return json.loads((Path(step_dir) / MARKER).read_text())


def is_committed(step_dir: Path) -> bool:
    return (Path(step_dir) / MARKER).is_file()


def verify_step_dir(step_dir: Path) -> Optional[str]:
    """None if the checkpoint in `step_dir` is intact, else a message naming the bad file (one
    process; `CheckpointDir.verify` shares the hashing out over the ranks)."""
    try:
        expected = read_marker(step_dir)["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{Path(step_dir) / MARKER} is unreadable ({exc})"
    problems = [p for p in (_check_file(Path(step_dir) / n, e) for n, e in sorted(expected.items())) if p]
    return "; ".join(problems) if problems else None


def committed_step_dirs(root: Path) -> dict[int, Path]:
    """{step: directory} of the committed checkpoints under `root` (not verified)."""
    if not Path(root).is_dir():
        return {}
    return {int(m.group(1)): c for c in sorted(Path(root).iterdir())
            if (m := TAG_RE.match(c.name)) and c.is_dir() and is_committed(c)}


# The background writer's CPU priority (nice, Linux). Where training keeps every core busy, a
# writer at normal priority takes its slices from the training threads, and each parallel region
# of a step then waits for the thread it displaced; at the lowest priority it runs in the time
# training leaves idle, and takes longer. It only lowers its own thread, never the trainer's.
WRITER_NICE = 19


# The file offset and memory alignment O_DIRECT needs (the page size covers the block sizes of
# common devices); the writer aligns every record of its files to it (torch's storage_alignment).
DIRECT_ALIGN = 4096
# Records smaller than this go through the page cache with the zip headers around them.
DIRECT_MIN_BYTES = 1 << 16


@contextlib.contextmanager
def _writer_serialization():
    """torch.save settings of the background writer: no zip CRC32 (a second pass over every byte,
    ~0.8 s of CPU per GB here, that the marker's checksum makes redundant; torch.load reads files
    without it) and every record aligned to `DIRECT_ALIGN` (64 by default), so that tensor bytes
    can go to disk with O_DIRECT; torch.load reads the alignment from the file's
    `.storage_alignment` record. Both options are process-wide: a torch.save elsewhere meanwhile
    also skips the CRC and pads, which is harmless for the same reasons."""
    from torch.utils.serialization import config

    before = torch.serialization.get_crc32_options(), config.save.storage_alignment
    torch.serialization.set_crc32_options(False)
    config.save.storage_alignment = DIRECT_ALIGN
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before[0])
        config.save.storage_alignment = before[1]


def _open_direct(path: Path) -> Optional[int]:
    """A second, O_DIRECT descriptor of `path`, or None where the file system refuses it (tmpfs)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError:
        return None


def _address(view: memoryview) -> int:
    import numpy as np  # a dependency of torch's; reads the address of a read-only buffer

    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


class HashingFile:
    """Where the background writer writes a file: the pieces `record_torch_save` kept (or torch.save
    itself, as a file object), tensor bytes as views of the host copies (no serialization copy);
    each byte is hashed as it passes
    (one read of memory, no read-back of the file), and a tensor's bytes that start on a page in
    memory and in the file go to disk with O_DIRECT: no copy into the page cache, no writeback
    later. The rest (zip headers, pickle, padding, small tensors, the tail of each tensor that does
    not fill a block) is written through the page cache. `close` fsyncs (the data and the file's
    size and blocks) and returns the checksum and size, as `file_digest` would compute them."""

    def __init__(self, path: Path, direct: bool = True):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.direct_fd = _open_direct(path) if direct else None
        self.digest = DIGESTS[FILE_DIGEST]()
        self.pos = 0
        self.direct_bytes = 0
        self.profile = {"hash_cpu_s": 0.0, "write_cpu_s": 0.0, "fsync_s": 0.0}  # this thread's CPU; fsync wall

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        t0 = time.thread_time()
        self.digest.update(view)  # releases the GIL for large buffers
        t1 = time.thread_time()
        self.profile["hash_cpu_s"] += t1 - t0
        head = 0
        if (self.direct_fd is not None and n >= DIRECT_MIN_BYTES and self.pos % DIRECT_ALIGN == 0
                and _address(view) % DIRECT_ALIGN == 0):
            head = n - n % DIRECT_ALIGN
            try:
                _pwrite_all(self.direct_fd, view[:head], self.pos)
                self.direct_bytes += head
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: this device wants another alignment
                    raise
                os.close(self.direct_fd)
                self.direct_fd, head = None, 0  # the page cache for the rest of the file
        _pwrite_all(self.fd, view[head:], self.pos + head)
        self.profile["write_cpu_s"] += time.thread_time() - t1
        self.pos += n
        return n

    def flush(self) -> None:
        pass

    def close(self) -> dict[str, Any]:
        try:
            t0 = time.perf_counter()
            os.fsync(self.fd)
            self.profile["fsync_s"] += time.perf_counter() - t0
            size = os.fstat(self.fd).st_size
        finally:
            self._close_fds()
        if size != self.pos:
            raise OSError(errno.EIO, f"{self.path} has {size} bytes after writing {self.pos}")
        return {FILE_DIGEST: self.digest.hexdigest(), "bytes": size}

    def _close_fds(self) -> None:
        for fd in (self.fd, self.direct_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.direct_fd = None

    def abort(self) -> None:
        if self.fd is not None:
            self._close_fds()


def _storage_ranges(obj, out: Optional[list] = None) -> list[tuple[int, int]]:
    """(start, end) addresses of the storages of every tensor in a state dict."""
    out = [] if out is None else out
    if torch.is_tensor(obj):
        storage = obj.untyped_storage()
        out.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
    elif isinstance(obj, dict):
        for v in obj.values():
            _storage_ranges(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _storage_ranges(v, out)
    return out


class _Recorder:
    """The file object of `record_torch_save`: keeps the pieces torch.save writes, in order."""

    def __init__(self, ranges: list[tuple[int, int]]):
        self.ranges = sorted(ranges)
        self.starts = [a for a, _ in self.ranges]
        self.parts: list[Any] = []

    def _in_storage(self, view: memoryview) -> bool:
        addr = _address(view)
        i = bisect.bisect_right(self.starts, addr) - 1
        return i >= 0 and addr + len(view) <= self.ranges[i][1]

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if len(view) >= DIRECT_MIN_BYTES and self._in_storage(view):
            self.parts.append(view)  # a host copy's bytes: valid until the writer is done
        elif self.parts and isinstance(self.parts[-1], bytearray):
            self.parts[-1] += view  # torch's own buffer (headers, the pickle), reused after this call
        else:
            self.parts.append(bytearray(view))
        return len(view)

    def flush(self) -> None:
        pass


def record_torch_save(obj: Any) -> list[Any]:
    """The bytes `torch.save(obj)` would write (no zip CRC32, records aligned for O_DIRECT: see
    `_writer_serialization`), as pieces in file order: tensor bytes as views of `obj`'s own storages
    (no copy; `obj` must outlive the pieces and not change), the rest copied. Runs torch.save's
    pickling here, at the step boundary, so that the writer thread is left with hashing and write
    calls, which release the GIL: a writer starved of CPU at nice 19 then cannot hold the GIL the
    training thread waits for."""
    recorder = _Recorder(_storage_ranges(obj))
    with _writer_serialization():
        torch.save(obj, recorder)
    return recorder.parts


def _write_recorded(parts: list[Any], path: Path, profile: Optional[dict[str, float]] = None) -> dict[str, Any]:
    """Write `record_torch_save`'s pieces to `path` crash-safely (tmp, fsync, rename) through a
    `HashingFile`, returning the file's checksum and size as the marker records them, computed while
    writing. `profile`: where to add the writer's time per part (`HashingFile.profile`)."""
    tmp = path.with_name(path.name + ".tmp")
    out = HashingFile(tmp)
    try:
        for part in parts:
            out.write(part)
        hashed = out.close()
    finally:
        out.abort()
        if profile is not None:
            for k, v in out.profile.items():
                profile[k] = profile.get(k, 0.0) + v
            profile["direct_bytes"] = profile.get("direct_bytes", 0) + out.direct_bytes
    os.replace(tmp, path)
    return hashed


def _atomic_torch_save_hashed(obj: Any, path: Path, profile: Optional[dict[str, float]] = None) -> dict[str, Any]:
    """`_atomic_torch_save` as the background writer does it (`record_torch_save`, `_write_recorded`)."""
    return _write_recorded(record_torch_save(obj), path, profile)


def _lower_thread_priority(nice: int) -> None:
    """Lower the calling thread's CPU priority (Linux schedules threads apart; elsewhere
    setpriority would lower the whole process, so it is left alone)."""
    if nice and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


class AsyncWrite(threading.Thread):
    """Writes captured host copies, recorded at the step boundary (`record_torch_save`), to their
    files in the background (tmp, fsync, rename), hashing each as it goes so the commit need not
    read them again. Never runs a
    collective: the commit (`CheckpointDir.finish_pending`) is the main thread's, at a later step
    boundary. Runs at `WRITER_NICE`. `profile`: its CPU time (`cpu_s`, of which hashing and the
    write calls), fsync and wall time, once done (benchmarks)."""

    def __init__(self, path: Path, files: list[tuple[Path, Any]]):
        super().__init__(name=f"async-save-{path.name}", daemon=True)
        self.path = path
        self.files = files
        self.hashed: dict[str, dict[str, Any]] = {}
        self.error: Optional[BaseException] = None
        self.profile: dict[str, float] = {}

    def run(self) -> None:
        _lower_thread_priority(WRITER_NICE)
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            for target, parts in self.files:
                target.parent.mkdir(parents=True, exist_ok=True)
                self.hashed[str(target.relative_to(self.path))] = _write_recorded(parts, target, self.profile)
        except BaseException as exc:  # reported by every rank together at the commit
            self.error = exc
        finally:
            self.files = []  # the host copies stay with CheckpointDir, for the next save to reuse
            self.profile.update(cpu_s=time.thread_time() - cpu, wall_s=time.perf_counter() - wall)


@dataclass
class PendingSave:
    """An asynchronous save whose files are being written; committed by `finish_pending`."""

    step: int
    path: Path
    meta: dict[str, Any]
    writer: AsyncWrite
    started: float = field(default_factory=time.perf_counter)


class CheckpointDir:
    """Writes and reads a DeepSpeed engine plus per-rank state under `root`, crash-safely."""

    def __init__(self, root: Path, topo: Topology, keep_last: int):
        self.root = Path(root)
        self.topo = topo
        self.keep_last = max(int(keep_last), 1)  # the newest committed checkpoint is never deleted
        self.pending: Optional[PendingSave] = None  # an asynchronous save not yet committed
        # The host copies of the last asynchronous save, by file name: the next one copies into
        # them (same shapes every save) rather than allocating a checkpoint's worth of memory.
        # Overwritten only once their writer is done (`write_async` commits the pending save first).
        self._host_copies: dict[str, Any] = {}
        self._deleting: Optional[threading.Thread] = None  # pruned directories, deleted behind training

    # ------------------------------------------------------------------ discovery
    def committed_steps(self) -> list[int]:
        """Steps of checkpoints with a commit marker, oldest first (not yet verified)."""
        return [step for step, committed in self._step_dirs() if committed]

    def has_any(self) -> bool:
        return bool(self._step_dirs())

    def _step_dirs(self) -> list[tuple[int, bool]]:
        """(step, committed) of every `step_*` directory, oldest first."""
        if not self.root.is_dir():
            return []
        out = []
        for child in self.root.iterdir():
            m = TAG_RE.match(child.name)
            if m and child.is_dir():
                out.append((int(m.group(1)), is_committed(child)))
        return sorted(out)

    def marker(self, step: int) -> dict[str, Any]:
        return read_marker(self.root / tag_for(step))

    def meta(self, step: int) -> dict[str, Any]:
        """What a resume checks before any tensor is read: the config, its hash, the tokenizer
        hash, and the world size that wrote the checkpoint."""
        marker = self.marker(step)
        return {**marker.get("meta", {}), "world_size": int(marker["world_size"])}

    # ------------------------------------------------------------------ save
    def write(self, engine, step: int, client_state: dict[str, Any], rank_state: dict[str, Any],
              meta: Optional[dict[str, Any]] = None) -> Path:
        """Write checkpoint `step` from every rank; returns its directory once committed.

        `meta` (JSON-serialisable: the resolved config, its hash, the tokenizer hash) is stored in
        the commit marker so a resume can check compatibility before touching any tensor file.
        Raises CheckpointError, naming the directory, when it cannot be written; the previous
        checkpoints are then untouched.
        """
        self.wait_for_deletions()
        path = self.root / tag_for(step)
        t0 = time.perf_counter()
        self._preflight(path)
        try:
            engine.save_checkpoint(str(self.root), tag=path.name, client_state=client_state, save_latest=False)
            (path / "rank_state").mkdir(parents=True, exist_ok=True)
            _atomic_torch_save(rank_state, path / "rank_state" / f"rank_{self.topo.rank:05d}.pt")
        except (OSError, RuntimeError) as exc:
            # torch.save reports a full disk as RuntimeError ("file write failed"). No collective
            # follows: the other ranks are stopped by the launcher when this one exits.
            raise CheckpointError(f"could not write checkpoint {path}: {exc}. {self._untouched_note()}") from exc
        self.topo.barrier()
        self._commit(path, step, meta or {})
        self.topo.barrier()
        if self.topo.is_main:
            self._prune()
            log.info("saved checkpoint %s in %.2fs", path, time.perf_counter() - t0)
        return path

    def write_async(self, engine, step: int, client_state: dict[str, Any], rank_state: dict[str, Any],
                    meta: Optional[dict[str, Any]] = None) -> Path:
        """Start checkpoint `step` (every rank): copy this rank's state to host memory now, write it
        in a background thread while training goes on; `finish_pending` commits it later. A save
        still pending is committed first (collective: every rank has one, saves are at agreed steps).

        The stall is the copy (into the previous save's host buffers, kept for the run: RAM for
        one more copy of the rank's share) and DeepSpeed's own bookkeeping, barriers included, plus
        what the writer takes from training. Until the commit nothing counts: a kill while writing
        leaves the previous committed checkpoint the newest, and the uncommitted directory is set
        aside by the next save or resume."""
        self.finish_pending()  # the host copies below reuse the previous save's: its writer must be done
        path = self.root / tag_for(step)
        self._preflight(path)
        try:
            with captured_checkpoint_writes(engine, reuse=self._host_copies) as captured:
                engine.save_checkpoint(str(self.root), tag=path.name, client_state=client_state, save_latest=False)
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(f"could not write checkpoint {path}: {exc}. {self._untouched_note()}") from exc
        rank_file = path / "rank_state" / f"rank_{self.topo.rank:05d}.pt"
        files = [(Path(p), obj) for p, obj in captured]
        files.append((rank_file, host_copy(rank_state, into=self._host_copies.get(RANK_STATE_COPY))))
        # kept until the next save: the recorded pieces are views of these copies' storages
        self._host_copies = {p.name: obj for p, obj in files[:-1]} | {RANK_STATE_COPY: files[-1][1]}
        recorded = [(p, record_torch_save(obj)) for p, obj in files]
        self.pending = PendingSave(step, path, meta or {}, AsyncWrite(path, recorded))
        self.pending.writer.start()
        return path

    def writing(self) -> bool:
        """This rank is still writing an asynchronous save."""
        return self.pending is not None and self.pending.writer.is_alive()

    def finish_pending(self) -> Optional[Path]:
        """Wait for this rank's writer, then commit the pending save from every rank (collective;
        every rank has one pending, since saves happen at agreed steps). None: nothing pending."""
        self.wait_for_deletions()
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        pending.writer.join()
        error = pending.writer.error
        problems = [p for p in self.topo.all_gather_object(None if error is None else str(error)) if p]
        if problems:
            raise CheckpointError(f"could not write checkpoint {pending.path}: {'; '.join(sorted(set(problems)))}. "
                                  f"{self._untouched_note()}")
        self.topo.barrier()
        self._commit(pending.path, pending.step, pending.meta, known=pending.writer.hashed)
        self.topo.barrier()
        if self.topo.is_main:
            self._prune(background=True)
            log.info("committed asynchronous checkpoint %s, %.2fs after it started", pending.path,
                     time.perf_counter() - pending.started)
        return pending.path

    def _untouched_note(self) -> str:
        steps = self.committed_steps()
        previous = f"the previous checkpoint {self.root / tag_for(steps[-1])}" if steps else "no earlier checkpoint"
        return (f"Nothing was committed and {previous} is untouched; free disk space or fix the permissions "
                f"of {self.root}, then resume with --resume auto")

    def _preflight(self, path: Path) -> None:
        """Every rank checks that it can write; all raise together, before any file is written."""
        problem = self._local_write_problem()
        if problem is None and self.topo.is_main and is_committed(path):
            problem = f"{path} is already committed (refusing to overwrite it)"
        problems = [p for p in self.topo.all_gather_object(problem) if p]
        if problems:
            raise CheckpointError(f"cannot write checkpoint {path}: {'; '.join(sorted(set(problems)))}. "
                                  f"{self._untouched_note()}")
        if self.topo.is_main and path.exists():  # an uncommitted leftover of a killed save of this step
            self._set_aside(path, "partial")
        self.topo.barrier()

    def _local_write_problem(self) -> Optional[str]:
        probe = self.root / f".write_probe_rank{self.topo.rank:05d}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"x")
                f.flush()
                os.fsync(f.fileno())
            probe.unlink()
            free, need = shutil.disk_usage(self.root).free, self._expected_bytes()
        except OSError as exc:
            return f"{self.root} is not writable ({exc})"
        if free < need:
            return (f"{self.root} has {free / 2**20:,.1f} MiB free, the last checkpoint took "
                    f"{need / FREE_SPACE_FACTOR / 2**20:,.1f} MiB ({os.strerror(errno.ENOSPC)})")
        return None

    def _expected_bytes(self) -> int:
        """Free space a save needs: the size of the newest committed checkpoint, with a margin."""
        steps = self.committed_steps()
        if not steps:
            return 0
        try:
            files = read_marker(self.root / tag_for(steps[-1]))["files"]
        except (OSError, ValueError, KeyError):
            return 0
        return int(FREE_SPACE_FACTOR * sum(f["bytes"] for f in files.values()))

    def _commit(self, path: Path, step: int, meta: dict[str, Any],
                known: Optional[dict[str, dict[str, Any]]] = None) -> None:
        """Hash the files (shared out over ranks), then rank 0 writes the marker: the commit point.
        `known`: files this rank already wrote, fsynced and hashed (an asynchronous save's)."""
        merged: dict[str, Any] = {}
        if known is not None:
            for part in self.topo.all_gather_object(known):
                merged.update(part)
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != MARKER)
        todo = [p for p in files if str(p.relative_to(path)) not in merged]
        mine = [p for i, p in enumerate(todo) if i % self.topo.world_size == self.topo.rank]
        hashed = {}
        for p in mine:
            _fsync_file(p)  # the data is on disk before the marker says it is
            hashed[str(p.relative_to(path))] = {FILE_DIGEST: file_digest(p), "bytes": p.stat().st_size}
        for part in self.topo.all_gather_object(hashed):
            merged.update(part)
        if self.topo.is_main:
            for d in {p.parent for p in files}:
                fsync_dir(d)
            marker = {"step": step, "world_size": self.topo.world_size, "time": time.time(),
                      "total_bytes": sum(f["bytes"] for f in merged.values()), "files": merged, "meta": meta}
            _atomic_write_text(path / MARKER, json.dumps(marker, indent=1, sort_keys=True))

    def _prune(self, background: bool = False) -> None:
        """After a commit: old committed checkpoints beyond keep_last, dead leftovers. Each old
        checkpoint is uncommitted here (marker removed, so a deletion cut short leaves no false
        checkpoint); `background` (an asynchronous save's commit): the files are then deleted by a
        thread while training goes on (a checkpoint's worth of unlinking took ~0.25 s per 0.3 GB
        here), joined before the next save or commit and at the end of the run (`wait_for_deletions`)."""
        steps = self.committed_steps()
        if not steps:
            return
        newest = steps[-1]
        doomed = {}  # directory -> the files its marker listed
        for step in steps[:-self.keep_last]:
            path = self.root / tag_for(step)
            doomed[path] = set(read_marker(path)["files"])
            _uncommit(path)
        for child in self.root.iterdir():
            tag, aside = TAG_RE.match(child.name), ASIDE_RE.match(child.name)
            if tag and int(tag.group(1)) < newest and not (child / MARKER).is_file():
                doomed.setdefault(child, set())  # a save that died before its commit
            elif aside and aside.group(2) == "partial" and int(aside.group(1)) <= newest:
                doomed[child] = set()
        if not doomed:
            return
        if not background:
            _delete_dirs(doomed)
        else:
            self._deleting = threading.Thread(target=_delete_dirs, args=(doomed,), name="checkpoint-prune")
            self._deleting.start()

    def wait_for_deletions(self) -> None:
        """Join the deletion of pruned directories started by an asynchronous commit, if any."""
        if self._deleting is not None:
            self._deleting.join()
            self._deleting = None

    def _set_aside(self, path: Path, kind: str) -> Path:
        target = path.with_name(f"{path.name}.{kind}-{time.time_ns()}")
        os.replace(path, target)
        fsync_dir(path.parent)
        return target

    # ------------------------------------------------------------------ verify
    def verify(self, step: int) -> Optional[str]:
        """None if checkpoint `step` is intact, else a message naming the bad file (collective)."""
        path = self.root / tag_for(step)
        try:
            marker = read_marker(path)
            expected = marker["files"]
            problems = [] if marker.get("step") == step else [f"{path / MARKER} is for step {marker.get('step')}"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            expected, problems = {}, [f"{path / MARKER} is unreadable ({exc})"]
        names = sorted(expected)
        mine = [n for i, n in enumerate(names) if i % self.topo.world_size == self.topo.rank]
        problems += [p for p in (_check_file(path / n, expected[n]) for n in mine) if p]
        everyone = sorted({p for part in self.topo.all_gather_object(problems) for p in part})
        return "; ".join(everyone) if everyone else None

    def latest_valid_step(self) -> Optional[int]:
        """Newest committed checkpoint whose files verify; broken ones are reported and skipped.

        None when there is no committed checkpoint at all (a fresh run, or every save so far was
        killed before its commit). When checkpoints are committed but none verifies, raises
        rather than silently starting over.
        """
        refused = []
        self._name_uncommitted()
        for step in reversed(self.committed_steps()):
            problem = self.verify(step)
            if problem is None:
                if refused and self.topo.is_main:
                    log.warning("resuming from %s instead", self.root / tag_for(step))
                return step
            refused.append(f"{tag_for(step)}: {problem}")
            if self.topo.is_main:
                log.warning("refusing checkpoint %s: %s; falling back to the previous committed one",
                            self.root / tag_for(step), problem)
        if refused:
            raise CheckpointError(f"no usable checkpoint in {self.root}: {' | '.join(refused)}. Restore the "
                                  f"damaged files, or move the directory away to start the run over")
        return None

    # ------------------------------------------------------------------ load
    def read(self, engine, step: int, universal: Optional[Path] = None) -> LoadedCheckpoint:
        """Restore engine weights, optimizer and scheduler of `step` and the saved per-rank state.

        `universal`: the root of the checkpoint's universal form (a resume on another layout, see
        `universal`), loaded by an engine built with `checkpoint.load_universal`; `rank_states` then
        holds every saved rank's state for the caller to redistribute, `rank_state` is empty.
        Otherwise `rank_state` is this rank's own file.

        Committed checkpoints newer than `step` (a resume from an older step, or past damaged
        ones) belong to a history this run abandons: they are renamed aside (`.superseded-*`),
        kept for the user, so a later `--resume auto` cannot jump back to them.
        """
        path = self.root / tag_for(step)
        load_dir = self.root if universal is None else universal
        with weights_only_loading(engine), (torch_load_weights_only() if universal else contextlib.nullcontext()):
            loaded_path, client_state = engine.load_checkpoint(
                str(load_dir), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True)
            if universal is not None and loaded_path is not None:
                _repair(engine, universal / path.name)
        if loaded_path is None:
            raise CheckpointError(f"DeepSpeed could not load {load_dir / path.name}; delete it or pass --resume with "
                                  f"another checkpoint")
        if universal is None:
            rank_state, rank_states = self._own_rank_state(path), ()
        else:
            rank_state, rank_states = {}, self.all_rank_states(step)
        self.topo.barrier()  # every rank has read what it needs before anything is renamed
        if self.topo.is_main:
            self._set_aside_newer(step)
        self.topo.barrier()
        return LoadedCheckpoint(step=step, path=path, client_state=client_state or {}, rank_state=rank_state,
                                rank_states=rank_states)

    def _own_rank_state(self, path: Path) -> dict[str, Any]:
        rank_file = path / "rank_state" / f"rank_{self.topo.rank:05d}.pt"
        if not rank_file.is_file():
            raise CheckpointError(f"{rank_file} is missing: checkpoint {path} was written by a different number "
                                  f"of ranks; resume with the world size it was saved with")
        return torch.load(rank_file, map_location="cpu", weights_only=True)

    def all_rank_states(self, step: int) -> tuple[dict[str, Any], ...]:
        """Every saved rank's state of checkpoint `step`, in rank order. Memory-mapped: a rank
        copies only the tensors it keeps (its streams' memory), not every rank's."""
        files = sorted((self.root / tag_for(step) / "rank_state").glob("rank_*.pt"))
        return tuple(torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files)

    def _name_uncommitted(self) -> None:
        """Say which step directories a resume skips for want of a commit marker."""
        if not self.topo.is_main:
            return
        for step, committed in self._step_dirs():
            if not committed:
                log.warning("skipping %s: it has no %s (a save that did not finish, or its marker was removed)",
                            self.root / tag_for(step), MARKER)

    def _set_aside_newer(self, step: int) -> None:
        """Directories newer than the resumed step belong to an abandoned history: renamed aside,
        kept for the user (never pruned), so a later `--resume auto` cannot jump back to them."""
        for newer, committed in self._step_dirs():
            if newer > step:
                kind = "superseded" if committed else "uncommitted"
                target = self._set_aside(self.root / tag_for(newer), kind)
                log.warning("resumed from step %d: moved the newer %s %s aside to %s (not deleted)", step,
                            "checkpoint" if committed else f"directory without {MARKER}", tag_for(newer), target)


def _check_file(file: Path, expected: dict[str, Any]) -> Optional[str]:
    if not file.is_file():
        return f"{file} is missing"
    size = file.stat().st_size
    if size != expected["bytes"]:
        return f"{file} has {size} bytes, expected {expected['bytes']} (truncated?)"
    algo = next((a for a in DIGESTS if a in expected), None)
    if algo is None:
        return f"{file} has no checksum in the marker (expected one of {sorted(DIGESTS)})"
    if file_digest(file, algo) != expected[algo]:
        return f"{file} does not match its {algo} checksum (corrupted)"
    return None


def _uncommit(path: Path) -> None:
    """Remove the marker (durably): from now on `path` is an uncommitted directory."""
    with contextlib.suppress(FileNotFoundError):
        (path / MARKER).unlink()
    fsync_dir(path)


# What a save writes in a step directory besides the files its marker lists (an uncommitted one
# has no list): DeepSpeed's model/optimizer states (any layout, pipeline layers included), the
# ranks' own state, the marker, and each one's tmp name while it is written.
OWN_FILE_RE = re.compile(r"^(COMMITTED\.json|[\w.-]+_(model|optim)_states\.pt|rank_state/rank_\d{5}\.pt)(\.tmp)?$")


def _delete_dirs(doomed: dict[Path, set[str]]) -> None:
    for path, listed in doomed.items():
        _delete_own(path, listed)


def _delete_own(path: Path, listed: set[str]) -> None:
    """Delete what this project wrote in step directory `path` (the files its marker listed,
    `listed`; files named as a save names them; a universal conversion of ours, its DONE record
    present, or a half-done one in its tmp directory), then the directories left empty. Anything else, and the directories
    holding it, stays and is named: a file a user put there is never deleted. Symlinks are not
    followed."""
    from memgpt_dist.train.universal import DONE, UNIVERSAL_DIR

    universal_ours = (path / UNIVERSAL_DIR / DONE).is_file()
    foreign = []
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        here = Path(dirpath)
        foreign += [(here / d).relative_to(path).as_posix() for d in dirnames if (here / d).is_symlink()]
        for name in filenames:
            rel = (here / name).relative_to(path).as_posix()
            if (rel in listed or OWN_FILE_RE.match(rel) or rel.startswith(f"{UNIVERSAL_DIR}.tmp-")
                    or (universal_ours and rel.startswith(f"{UNIVERSAL_DIR}/"))):
                with contextlib.suppress(FileNotFoundError):
                    (here / name).unlink()
            else:
                foreign.append(rel)
        with contextlib.suppress(OSError):
            here.rmdir()  # only once empty
    if foreign:
        log.warning("kept %s: it holds files this project did not write (%s%s); delete it yourself once they are "
                    "safe", path, ", ".join(sorted(foreign)[:3]), ", ..." if len(foreign) > 3 else "")


def _repair(engine, universal_tag_dir: Path) -> None:
    try:
        repair_universal_optimizer_state(engine, universal_tag_dir)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
