"""The one checkpointer: directory layout, per-rank state, commit marker, keep-last-k.

Layout under `<run_dir>/checkpoints/`:

    step_00000050/                 a DeepSpeed tag directory (engine.save_checkpoint)
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt, ...
        rank_state/rank_00000.pt   this rank's loader cursor and RNG (every rank writes its own;
                                   DeepSpeed's client_state is written by data-parallel rank 0 only)
        COMMITTED.json             written last by rank 0 after a barrier: step, world size and the
                                   sha256 + size of every file. A directory without it never counts.

DeepSpeed's own `latest` file is written before the final barrier, so it is not trusted: resume
takes the newest directory whose marker verifies. Old checkpoints are deleted only after the new
one is committed, and the newest committed one is never deleted.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from memgpt_dist.parallel.dist import Topology

log = logging.getLogger(__name__)

MARKER = "COMMITTED.json"
TAG_RE = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or used; the message says which file and what to do."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    step: int
    path: Path
    client_state: dict[str, Any]
    rank_state: dict[str, Any]


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Checkpointer:
    """Saves and restores a DeepSpeed engine plus our per-rank state, crash-safely."""

    def __init__(self, root: Path, topo: Topology, keep_last: int):
        self.root = Path(root)
        self.topo = topo
        self.keep_last = keep_last

    # ------------------------------------------------------------------ discovery
    def committed_steps(self) -> list[int]:
        """Steps of checkpoints with a commit marker, oldest first (not yet verified)."""
        if not self.root.is_dir():
            return []
        steps = []
        for child in self.root.iterdir():
            m = TAG_RE.match(child.name)
            if m and (child / MARKER).is_file():
                steps.append(int(m.group(1)))
        return sorted(steps)

    def has_any(self) -> bool:
        return self.root.is_dir() and any(TAG_RE.match(c.name) for c in self.root.iterdir())

    # ------------------------------------------------------------------ save
    def save(self, engine, step: int, client_state: dict[str, Any], rank_state: dict[str, Any],
             meta: Optional[dict[str, Any]] = None) -> Path:
        """Write checkpoint `step` from every rank; returns its directory once committed.

        `meta` (JSON-serialisable, e.g. the resolved config) is stored in the commit marker so a
        resume can check compatibility before touching any tensor file.
        """
        tag = tag_for(step)
        path = self.root / tag
        t0 = time.time()
        try:
            if self.topo.is_main:
                self.root.mkdir(parents=True, exist_ok=True)
                if path.exists():  # an uncommitted leftover of a crashed save of the same step
                    shutil.rmtree(path)
            self.topo.barrier()
            engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
            (path / "rank_state").mkdir(parents=True, exist_ok=True)
            _atomic_torch_save(rank_state, path / "rank_state" / f"rank_{self.topo.rank:05d}.pt")
        except OSError as exc:
            raise CheckpointError(f"could not write checkpoint {path}: {exc}. The previous checkpoint is "
                                  f"untouched; free disk space or fix permissions of {self.root}") from exc
        self.topo.barrier()
        self._commit(path, step, meta or {})
        self.topo.barrier()
        if self.topo.is_main:
            self._prune()
            log.info("saved checkpoint %s in %.1fs", path, time.time() - t0)
        return path

    def _commit(self, path: Path, step: int, meta: dict[str, Any]) -> None:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != MARKER)
        mine = [p for i, p in enumerate(files) if i % self.topo.world_size == self.topo.rank]
        hashed = {str(p.relative_to(path)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in mine}
        merged: dict[str, Any] = {}
        for part in self.topo.all_gather_object(hashed):
            merged.update(part)
        if self.topo.is_main:
            marker = {"step": step, "world_size": self.topo.world_size, "time": time.time(), "files": merged,
                      "meta": meta}
            _atomic_write_text(path / MARKER, json.dumps(marker, indent=1, sort_keys=True))

    def _prune(self) -> None:
        steps = self.committed_steps()
        newest = steps[-1] if steps else None
        for step in steps[:-self.keep_last]:
            shutil.rmtree(self.root / tag_for(step), ignore_errors=True)
        # Uncommitted directories older than the newest committed one are dead saves.
        for child in self.root.iterdir():
            m = TAG_RE.match(child.name)
            if m and newest is not None and int(m.group(1)) < newest and not (child / MARKER).is_file():
                shutil.rmtree(child, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def verify(self, step: int) -> Optional[str]:
        """None if checkpoint `step` is intact, else a message naming the bad file."""
        path = self.root / tag_for(step)
        try:
            marker = json.loads((path / MARKER).read_text())
        except (OSError, ValueError) as exc:
            return f"{path / MARKER} is unreadable ({exc})"
        names = sorted(marker.get("files", {}))
        mine = [n for i, n in enumerate(names) if i % self.topo.world_size == self.topo.rank]
        problems = [self._check_file(path / n, marker["files"][n]) for n in mine]
        problems = [p for p in problems if p]
        everyone = [p for part in self.topo.all_gather_object(problems) for p in part]
        return "; ".join(everyone) if everyone else None

    @staticmethod
    def _check_file(file: Path, expected: dict[str, Any]) -> Optional[str]:
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{file} has {file.stat().st_size} bytes, expected {expected['bytes']} (truncated?)"
        if sha256_file(file) != expected["sha256"]:
            return f"{file} does not match its sha256 (corrupted)"
        return None

    def marker(self, step: int) -> dict[str, Any]:
        return json.loads((self.root / tag_for(step) / MARKER).read_text())

    def latest_valid_step(self) -> Optional[int]:
        """Newest committed checkpoint whose files verify; broken ones are reported and skipped."""
        for step in reversed(self.committed_steps()):
            problem = self.verify(step)
            if problem is None:
                return step
            if self.topo.is_main:
                log.warning("checkpoint %s is not usable: %s; falling back to an older one",
                            self.root / tag_for(step), problem)
        return None

    def load(self, engine, step: int) -> LoadedCheckpoint:
        """Restore engine weights, optimizer and scheduler of `step` and this rank's state."""
        tag = tag_for(step)
        path = self.root / tag
        loaded_path, client_state = engine.load_checkpoint(str(self.root), tag=tag, load_optimizer_states=True,
                                                           load_lr_scheduler_states=True)
        if loaded_path is None:
            raise CheckpointError(f"DeepSpeed could not load {path}; delete it or pass --resume with another checkpoint")
        rank_file = path / "rank_state" / f"rank_{self.topo.rank:05d}.pt"
        if not rank_file.is_file():
            raise CheckpointError(f"{rank_file} is missing: checkpoint {path} was written by a different number "
                                  f"of ranks; resume with the world size it was saved with")
        rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
        return LoadedCheckpoint(step=step, path=path, client_state=client_state or {}, rank_state=rank_state)
