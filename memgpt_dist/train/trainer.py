"""The training loop, apart from the step: batches in, one step object's work, callbacks out.

`Trainer.fit` reads top to bottom like nanoGPT's loop: draw the step's micro-batches, count
their tokens over the replicas, let the step object (`train.steps`: dense or pipeline) run its
forward/backward/update, agree with every rank whether the step was skipped and on the
callbacks' flags (one all-reduce), update the train state, call the callbacks
(`train.callbacks`: metrics, non-finite accounting, stop signals, validation, checkpoints).
It never asks which layout it runs on.

The trainer owns the train state (step, tokens, samples, skip counts) and the K curriculum; the
step object owns the engine and the memory carry; the checkpointer owns what goes into a
checkpoint. The step counter advances over a skipped step (its batch is consumed), the LR schedule
does not: DeepSpeed's convention for fp16 overflow. May not touch: the engine's internals, the
checkpoint files, the model.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from memgpt_dist.config import TrainConfig
from memgpt_dist.parallel.dist import Topology
from memgpt_dist.parallel.engine import NonFiniteUpdate
from memgpt_dist.train.batch import IGNORE, Batch, StatefulBatches
from memgpt_dist.train.callbacks import Callback, StepEnd
from memgpt_dist.train.checkpointer import Checkpointer, ResumePoint
from memgpt_dist.train.resume import find_resume_point
from memgpt_dist.train.state import TrainState
from memgpt_dist.train.stopping import Diverged, any_rank

log = logging.getLogger("memgpt_dist")


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    tokens: int
    samples: int
    step_time: float
    data_time: float
    stats: dict[str, float]
    nonfinite: bool = False  # this rank saw a non-finite loss, or the optimizer discarded the step
    input_tokens: int = 0  # every input token of the step over the replicas (`tokens` counts loss-bearing ones)


class Trainer:
    """Runs `cfg.train.max_steps` optimizer steps of `step` over `train_batches` (see the module
    docstring); built by `run.build_trainer`, which registers the checkpointed parts."""

    def __init__(self, cfg: TrainConfig, topo: Topology, step, train_batches: StatefulBatches,
                 checkpointer: Checkpointer, callbacks: list[Callback]):
        self.cfg = cfg
        self.topo = topo
        self.step = step  # steps.DenseStep or steps.PipelineStep
        self.train_batches = train_batches
        self.checkpointer = checkpointer
        self.callbacks = callbacks
        self.state = TrainState()
        self.last_step = cfg.train.max_steps  # where this `fit` ends (`stop_after` may end it earlier)

    @property
    def engine(self):
        return self.step.engine

    # ------------------------------------------------------------------ loop
    def fit(self, stop_after: Optional[int] = None) -> TrainState:
        """Train to `train.max_steps`; `stop_after` ends early (with a checkpoint) at that step,
        leaving the schedule untouched, as a preempted job would.

        Raises `Preempted` after a committed checkpoint when a stop signal reached any rank or the
        time budget ran out, and `Diverged` (without saving) after too many non-finite steps.
        """
        self.last_step = min(self.cfg.train.max_steps, stop_after) if stop_after else self.cfg.train.max_steps
        try:
            for cb in self.callbacks:
                cb.on_fit_start(self)
            while self.state.step < self.last_step:
                result = self.train_step()
                end = self._agree(result)
                for cb in self.callbacks:
                    cb.on_step_end(self, end, end.flags[id(cb)])
            for cb in reversed(self.callbacks):
                cb.on_fit_end(self)
        except Exception as exc:
            for cb in self.callbacks:
                cb.on_fit_error(self, exc)
            raise
        finally:
            for cb in self.callbacks:
                cb.close(self)
        return self.state

    def train_step(self) -> StepResult:
        """One optimizer step over grad_accum micro-batches on every rank."""
        t0 = time.perf_counter()
        batches, data_time = self._next_micro_batches()
        n_local = sum(int((b["labels"] != IGNORE).sum()) for b in batches)
        local = [float(n_local), float(sum(len(b["input_ids"]) for b in batches)),
                 float(sum(b["input_ids"].numel() for b in batches))]
        n_global, samples, input_tokens = self.topo.all_reduce_sum(local)  # the same one all-reduce as before
        scale = self.topo.dp_size * self.cfg.parallel.grad_accum / max(n_global, 1.0)
        try:
            out = self.step.train(batches, scale, n_global)
        except NonFiniteUpdate as exc:
            raise Diverged(f"non-finite gradient at step {self.state.step + 1}; parallel.zero_stage=0 cannot skip "
                           f"a step, so the run stopped before the update. {self.checkpointer.last_checkpoint_note()}; "
                           f"use parallel.zero_stage >= 1 to skip such steps") from exc
        self.state.step += 1
        self.state.tokens_seen += int(n_global)
        self.state.samples_seen += int(samples)
        return StepResult(loss=out.loss, grad_norm=out.grad_norm, lr=self.step.lr(), tokens=int(n_global),
                          samples=int(samples), step_time=time.perf_counter() - t0, data_time=data_time,
                          stats=out.stats, nonfinite=out.nonfinite, input_tokens=int(input_tokens))

    def _next_micro_batches(self) -> tuple[list[Batch], float]:
        self.apply_curriculum(self.state.step)
        t0 = time.perf_counter()
        batches = [next(self.train_batches) for _ in range(self.cfg.parallel.grad_accum)]
        return batches, time.perf_counter() - t0

    def apply_curriculum(self, step: int) -> None:
        """data.n_segments_schedule: the loader cuts samples of K(step) segments."""
        if self.cfg.data.n_segments_schedule:
            self.train_batches.set_n_segments(self.cfg.data.n_segments_at(step))

    def _agree(self, result: StepResult) -> StepEnd:
        """One all-reduce over the world: was the step skipped anywhere, and every callback's flags."""
        local = [result.nonfinite]
        spans = []
        for cb in self.callbacks:
            flags = cb.local_flags(self, result)
            spans.append((cb, len(local), len(flags)))
            local += flags
        agreed = any_rank(local, self.topo.device)
        skipped = agreed[0]
        self.state.nonfinite_streak = self.state.nonfinite_streak + 1 if skipped else 0
        self.state.skipped_steps += int(skipped)
        return StepEnd(result=result, skipped=skipped,
                       flags={id(cb): agreed[start:start + n] for cb, start, n in spans})

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        self.checkpointer.save(self.state.step)

    def save_once(self) -> None:
        """Save unless this step is already saved (or was just restored); either way committed on return."""
        if self.checkpointer.last_saved_step != self.state.step:
            self.save()
        self.checkpointer.finish_pending()  # a stop or the end waits for an asynchronous save still writing

    def resume(self, point: Optional[ResumePoint]) -> Optional[int]:
        """Restore every checkpointed part from a checked `ResumePoint` (`resume.find_resume_point`)."""
        return self.checkpointer.load(point)

    def restore(self, step: int, universal: Optional[Path] = None) -> None:
        """Restore checkpoint `step` in-process (tests, tools): of the same layout, checked as
        `--resume STEP` is, or from its universal form `universal` (the engine must have been
        built to load one), redistributing the per-rank state as a relayout does."""
        if universal is not None:
            self.resume(ResumePoint(step=step, universal=universal))
            return
        self.resume(find_resume_point(str(step), self.checkpointer.files, self.cfg, self.topo,
                                      self.checkpointer.tokenizer_file))

    # ------------------------------------------------------------------ data figures
    def data_skips(self) -> dict[str, float]:
        """Documents skipped in damaged shards so far, and their fraction of all documents read,
        over every data-parallel replica (a collective: every rank logs the same steps)."""
        loaders = getattr(self.train_batches, "sources", [self.train_batches])
        counts = [float(sum(getattr(x, attr, 0) for x in loaders)) for attr in ("skipped_samples", "seen_samples")]
        skipped, seen = self.topo.all_reduce_sum(counts)
        return {"data/skipped_docs": skipped, "data/skipped_fraction": skipped / max(skipped + seen, 1.0)}
