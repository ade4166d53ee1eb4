"""The checkpointer: what goes into a checkpoint, and putting it back.

Stateful parts are registered with it once, by `run.build_trainer`:

* global parts (the train state), stored once in DeepSpeed's client state;
* per-rank parts (the loader cursor, the RNG, the memory carry), each rank in its own file,
  beside the rank's place in the layout (coordinates, global stream ids, heads, layers), which
  is what lets a resume on another layout give every part what it needs
  (`load_redistributed`);
* the engine (weights, optimizer, LR schedule), written and read by DeepSpeed;
* the meta of the run (config, its hash, the tokenizer hash), stored once in the commit marker.

It offers `save(step)` and `load(point) -> step | None`, where `point` is the `ResumePoint` the
resume module chose (and checked) before the engine was built. The files themselves (layout,
commit marker, verification, pruning) belong to `train.checkpoint.CheckpointDir`.

May not touch: the loop or the step (it is called by the checkpoint callback and the trainer).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

from memgpt_dist.parallel.dist import Topology
from memgpt_dist.train.checkpoint import CheckpointDir, CheckpointError, tag_for

log = logging.getLogger("memgpt_dist")


class Stateful(Protocol):
    def state_dict(self) -> Any: ...
    def load_state_dict(self, sd: Any) -> None: ...


class RankStateful(Stateful, Protocol):
    """A per-rank part; `load_redistributed` takes its share of every saved rank's state when
    the checkpoint was written by another layout (`place`: where this rank sits now)."""

    def load_redistributed(self, saved: list[dict[str, Any]], place: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class ResumePoint:
    """A checked checkpoint to resume from: its step and, when it was written by another layout,
    the root of its universal form (`train.universal`) and a description of the change."""

    step: int
    universal: Optional[Path] = None
    change: Any = None  # universal.LayoutChange, when the layout changed


@dataclass
class Checkpointer:
    """Registered parts in, `save(step)` / `load(point)` out (see the module docstring)."""

    files: CheckpointDir
    topo: Topology
    engine: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    place: Callable[[], dict[str, Any]] = dict  # where this rank sits (rank_state keys)
    tokenizer_file: Optional[Path] = None  # the corpus's tokenizer, checked against a checkpoint's
    last_saved_step: Optional[int] = None  # saved or restored: never written twice
    longest_save_s: Optional[float] = None
    last_stall_s: Optional[float] = None  # how long the last save held the loop up (benchmarks)
    last_commit_stall_s: Optional[float] = None  # how long committing the last asynchronous save did
    _global: dict[str, Stateful] = field(default_factory=dict)
    _rank: dict[str, RankStateful] = field(default_factory=dict)

    def register(self, name: str, part: Stateful, per_rank: bool = False) -> None:
        """Add a part under `name` (also its key in the files: keep names stable, old
        checkpoints are read by them). Per-rank parts load in registration order."""
        (self._rank if per_rank else self._global)[name] = part

    def part(self, name: str) -> Stateful:
        return self._rank[name] if name in self._rank else self._global[name]

    # ------------------------------------------------------------------ save
    def save(self, step: int, background: bool = False) -> Path:
        """Write and commit checkpoint `step` from every rank (collective). `background`
        (`checkpoint.async_save`): copy the state to host memory and return; the files are written
        by a thread and committed by `finish_pending` at a later step boundary. A save first
        waits for (and commits) the previous one still pending."""
        self.finish_pending()
        t0 = time.perf_counter()
        client_state = {name: part.state_dict() for name, part in self._global.items()}
        rank_state = {"rank": self.topo.rank, **self.place()}
        for name, part in self._rank.items():
            sd = part.state_dict()
            if sd is not None:  # e.g. no carried memory: the key is absent, as older versions wrote
                rank_state[name] = sd
        if background:
            path = self.files.write_async(self.engine, step, client_state, rank_state, self.meta)
            self.last_stall_s = time.perf_counter() - t0
        else:
            path = self.files.write(self.engine, step, client_state, rank_state, self.meta)
            # what a stop must leave time for (stopping.TimeBudget): stops save synchronously
            self.longest_save_s = max(self.longest_save_s or 0.0, time.perf_counter() - t0)
            self.last_stall_s = time.perf_counter() - t0
        self.last_saved_step = step
        return path

    def writing(self) -> bool:
        """This rank is still writing an asynchronous save (a local answer: agree on it first)."""
        return self.files.writing()

    def has_pending(self) -> bool:
        return self.files.pending is not None

    def finish_pending(self) -> Optional[Path]:
        """Wait for a pending asynchronous save and commit it (collective); None if there is none."""
        t0 = time.perf_counter()
        path = self.files.finish_pending()
        if path is not None:
            self.last_commit_stall_s = time.perf_counter() - t0
        return path

    def wait_for_deletions(self) -> None:
        """Join the background deletion of pruned checkpoints (an asynchronous commit's), if any."""
        self.files.wait_for_deletions()

    # ------------------------------------------------------------------ load
    def load(self, point: Optional[ResumePoint]) -> Optional[int]:
        """Restore every registered part from `point`; returns its step (None: nothing to load)."""
        if point is None:
            return None
        loaded = self.files.read(self.engine, point.step, point.universal)
        for name, part in self._global.items():
            part.load_state_dict(loaded.client_state[name])
        if point.universal is None:
            for name, part in self._rank.items():
                part.load_state_dict(loaded.rank_state.get(name))
        else:
            saved = list(loaded.rank_states)
            if not all("coord" in s for s in saved):
                raise CheckpointError("this checkpoint's rank files do not record their layout (written by an "
                                      "older version); resume it with the layout that wrote it")
            place = self.place()
            for part in self._rank.values():
                part.load_redistributed(saved, place)
        self.last_saved_step = point.step
        return point.step

    # ------------------------------------------------------------------ the files, for callers
    @property
    def root(self) -> Path:
        return self.files.root

    def committed_steps(self) -> list[int]:
        return self.files.committed_steps()

    def verify(self, step: int) -> Optional[str]:
        return self.files.verify(step)

    def marker(self, step: int) -> dict[str, Any]:
        return self.files.marker(step)

    def last_checkpoint_note(self) -> str:
        """Which committed checkpoint is intact, for messages of a run that stops."""
        steps = self.committed_steps()
        where = self.root / tag_for(steps[-1]) if steps else None
        return f"The last committed checkpoint {where} is intact" if where else "No checkpoint was committed"
