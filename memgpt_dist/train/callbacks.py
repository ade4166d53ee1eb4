"""Observers of the training loop, called in a fixed order that is the same on every rank.

After every step the trainer agrees with all ranks, in one all-reduce, on whether the step was
skipped and on every flag a callback raised (`local_flags`), then calls `on_step_end` of each
callback in `DEFAULT_ORDER`:

0. `ThroughputCallback`: sums tokens, step time and model FLOPs every step and, at logging
   steps, hands `perf/*` figures (MFU, TFLOP/s and tokens/s per device, peak memory) averaged
   over the window since the last one to the metrics callback through `StepEnd.figures`; first,
   so that the figures exist when they are logged;
1. `MetricsCallback`: console line, TensorBoard and metrics.jsonl at logging steps (and at
   skipped ones); the only host syncs for figures happen here, at those steps;
2. `NonFiniteCallback`: a skipped step must not have been applied on this rank; more than
   `train.max_nan_skips` in a row end the run unsaved (`Diverged`);
3. `StopCallback`: a stop signal or file on any rank, or the time budget, saves a committed
   checkpoint and stops every rank at the same step (`Preempted`);
4. `EvalCallback`: validation every `train.eval_every` steps;
5. `CheckpointCallback`: a checkpoint every `checkpoint.every` steps, and at the end;
6. `HeartbeatCallback` (`train.heartbeat`): beats the hang watchdog once the step and every
   callback before it are done (`train.hang_timeout_s`).

Collectives inside callbacks run at the same steps on every rank, because the flags that decide
them were agreed. New observers subclass `Callback`
and are inserted in this list. A callback may read the trainer; it may not run a training step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from memgpt_dist.config import CheckpointConfig, LogConfig, TrainConfig, TrainingConfig
from memgpt_dist.perf.device import peak_memory_gb, peak_tflops
from memgpt_dist.perf.flops import count_flops
from memgpt_dist.perf.throughput import FlopsPerSample, ThroughputWindow, console_text
from memgpt_dist.train.checkpoint import tag_for
from memgpt_dist.train.metrics import MetricsLogger
from memgpt_dist.train.stopping import Diverged, Preempted, StopSignals, TimeBudget

if TYPE_CHECKING:
    from memgpt_dist.train.trainer import StepResult, Trainer


@dataclass
class StepEnd:
    """What the callbacks see after step `trainer.state.step`: its result, whether every rank
    agreed it was skipped, and each callback's agreed flags (by callback index)."""

    result: "StepResult"
    skipped: bool
    flags: dict[int, list[bool]] = field(default_factory=dict)
    # scalars an earlier callback computed for this logging step, logged by `MetricsCallback`
    # (to TensorBoard and metrics.jsonl, and `console` on its console line)
    figures: dict[str, float] = field(default_factory=dict)
    console: list[str] = field(default_factory=list)


class Callback:
    """A loop observer. Every hook is called on every rank."""

    def on_fit_start(self, trainer: "Trainer") -> None: ...

    def local_flags(self, trainer: "Trainer", result: "StepResult") -> list[bool]:
        """Flags to OR over all ranks after this step (one all-reduce for every callback)."""
        return []

    def on_step_end(self, trainer: "Trainer", end: StepEnd, flags: list[bool]) -> None: ...

    def on_fit_end(self, trainer: "Trainer") -> None:
        """After the last step, in reverse order (the final save runs before the stop handlers go)."""

    def on_fit_error(self, trainer: "Trainer", exc: Exception) -> None:
        """The loop raised `exc` (it is re-raised after every callback saw it); no collectives here:
        the other ranks may be gone."""

    def close(self, trainer: "Trainer") -> None:
        """Always, also when the loop raised."""


def is_logging_step(step: int, skipped: bool, log: LogConfig, train: TrainingConfig) -> bool:
    """Steps with a console line and scalars: every `log.every`, the first, the last, and every
    skipped one (agreed over the ranks, so collectives at these steps run everywhere)."""
    return skipped or step % log.every == 0 or step == 1 or step == train.max_steps


class ThroughputCallback(Callback):
    """MFU, TFLOP/s, tokens/s (input and loss-bearing) per device and peak memory, averaged over
    each logging window (memgpt_dist/perf/throughput.py), with the model FLOPs of
    memgpt_dist/perf/flops.py and the peak of memgpt_dist/perf/device.py (or `perf.peak_tflops`)."""

    def __init__(self, cfg: TrainConfig, metrics: MetricsLogger):
        self.cfg = cfg
        self.metrics = metrics
        self.window = ThroughputWindow()
        carried = cfg.train.carry_memory  # the first segment reads a carried memory (perf/flops.py)
        self.flops = FlopsPerSample(lambda T: T * count_flops(cfg.model, cfg.memory, T, carried).train_per_token)
        self.peak: Optional[float] = None

    def on_fit_start(self, trainer: "Trainer") -> None:
        self.peak, source = peak_tflops(trainer.topo.device.type, self.cfg.perf.peak_tflops)
        T = self.cfg.data.n_segments * self.cfg.model.segment_len
        self.metrics.line(f"perf: {self.flops(T) / T / 1e6:,.2f} MFLOPs per token trained (3x forward, "
                          f"K={self.cfg.data.n_segments}); MFU peak: {source}")

    def on_step_end(self, trainer: "Trainer", end: StepEnd, flags: list[bool]) -> None:
        r = end.result
        T = r.input_tokens // max(r.samples, 1)
        self.window.add(r.step_time, r.input_tokens, r.tokens, r.samples * self.flops(T))
        if not is_logging_step(trainer.state.step, end.skipped, self.cfg.log, self.cfg.train):
            return
        figures = self.window.figures(trainer.topo.world_size, self.peak)
        # the most loaded rank's peak: a collective, at a step every rank agreed to log
        figures["perf/peak_mem_gb"] = max(trainer.topo.all_gather_object(peak_memory_gb(trainer.topo.device.type)))
        end.figures.update(figures)
        end.console.append(console_text(figures))
        self.window = ThroughputWindow()


class MetricsCallback(Callback):
    """Scalars and console lines at logging steps, and a warning for every skipped step."""

    def __init__(self, log: LogConfig, train: TrainingConfig, metrics: MetricsLogger):
        self.log = log
        self.train = train
        self.metrics = metrics

    def on_step_end(self, trainer: "Trainer", end: StepEnd, flags: list[bool]) -> None:
        step, r, state = trainer.state.step, end.result, trainer.state
        if not is_logging_step(step, end.skipped, self.log, self.train):
            return
        toks = r.tokens / max(r.step_time, 1e-9)
        values = {"train/loss": r.loss, "train/lr": r.lr, "train/grad_norm": r.grad_norm,
                  "train/skipped_steps": state.skipped_steps,
                  "perf/tokens_per_s": toks, "perf/step_time_s": r.step_time, "perf/data_wait_s": r.data_time}
        values.update({f"memory/{k}": v for k, v in trainer.step.log_stats(r.stats).items()})
        values.update(trainer.data_skips())
        values.update(end.figures)
        self.metrics.scalars(values, step, state.tokens_seen)
        self.metrics.line(" | ".join([f"step {step}/{self.train.max_steps} loss {r.loss:.4f} "
                                      f"lr {r.lr:.2e} gnorm {r.grad_norm:.3f} tok/s {toks:,.0f} "
                                      f"step {r.step_time * 1000:.0f}ms data {r.data_time * 1000:.0f}ms",
                                      *end.console]))
        if end.skipped:
            self.metrics.warning(f"step {step} skipped on every rank: non-finite loss or gradient "
                                 f"({state.nonfinite_streak} in a row, {state.skipped_steps} in all; "
                                 f"the run stops after {self.train.max_nan_skips} in a row)")

    def on_fit_end(self, trainer: "Trainer") -> None:
        self.metrics.flush()


class NonFiniteCallback(Callback):
    """Checks a skipped step and ends a run that keeps diverging (the counts are the train state's)."""

    def __init__(self, max_nan_skips: int, metrics: MetricsLogger):
        self.max_nan_skips = max_nan_skips
        self.metrics = metrics

    def on_step_end(self, trainer: "Trainer", end: StepEnd, flags: list[bool]) -> None:
        state = trainer.state
        if end.skipped and trainer.step.was_step_applied():  # the optimizer must have discarded it here too
            raise RuntimeError(f"step {state.step} was non-finite on some rank but its update was applied "
                               f"here; the optimizer's overflow check did not fire")
        if state.nonfinite_streak <= self.max_nan_skips:
            return
        self.metrics.flush()
        raise Diverged(f"{state.nonfinite_streak} consecutive steps (to step {state.step}) had a "
                       f"non-finite loss or gradient, more than train.max_nan_skips={self.max_nan_skips}. "
                       f"{trainer.checkpointer.last_checkpoint_note()}; lower optim.lr or check the data, then "
                       f"resume with --resume auto")


class StopCallback(Callback):
    """Stop signals (SIGTERM, SIGUSR1, `train.stop_file`) and the `train.max_minutes` budget."""

    def __init__(self, train: TrainingConfig, metrics: MetricsLogger):
        self.train = train
        self.metrics = metrics
        self.budget = TimeBudget(train.max_minutes)
        self.signals: Optional[StopSignals] = None
        self.longest_step_s = 0.0

    def on_fit_start(self, trainer: "Trainer") -> None:
        self.signals = StopSignals(self.train.stop_file).__enter__()

    def local_flags(self, trainer: "Trainer", result: "StepResult") -> list[bool]:
        self.longest_step_s = max(self.longest_step_s, result.step_time)
        return [self.signals.poll() is not None,
                self.budget.exhausted(self.longest_step_s, trainer.checkpointer.longest_save_s)]

    def on_step_end(self, trainer: "Trainer", end: StepEnd, flags: list[bool]) -> None:
        signalled, out_of_time = flags
        if not (signalled or out_of_time) or trainer.state.step >= trainer.last_step:
            return  # a stop at the last step is the normal end
        if out_of_time:
            reason = f"time budget train.max_minutes={self.train.max_minutes:g} nearly used"
        else:  # before eval: the grace time is short
            reason = f"{self.signals.received} received" if self.signals.received else "a stop signal on another rank"
        trainer.save_once()
        self.metrics.flush()
        raise Preempted(f"stopped at step {trainer.state.step} ({reason}); checkpoint "
                        f"{trainer.checkpointer.root / tag_for(trainer.state.step)} is committed: run the same "
                        f"command with --resume auto to continue")

    def close(self, trainer: "Trainer") -> None:
        if self.signals is not None:
            self.signals.__exit__(None, None, None)
            self.signals = None


class EvalCallback(Callback):
    """Validation every `train.eval_every` steps (0: never)."""

    def __init__(self, train: TrainingConfig, metrics: MetricsLogger, make_val_batches):
        self.every = train.eval_every
        self.n_batches = train.eval_batches
        self.metrics = metrics
        self.make_val_batches = make_val_batches

    def on_step_end(self, trainer: "Trainer", end: StepEnd, flags: list[bool]) -> None:
        if self.make_val_batches is None or not self.every or trainer.state.step % self.every:
            return
        result = trainer.step.evaluate(self.make_val_batches, self.n_batches)
        step = trainer.state.step
        self.metrics.scalars(result, step, trainer.state.tokens_seen)
        by_seg = " ".join(f"{result[k]:.3f}" for k in sorted(result) if k.startswith("val/loss_segment_"))
        self.metrics.line(f"eval step {step}: val loss {result['val/loss']:.4f} ppl {result['val/ppl']:.2f}"
                          + (f" by segment [{by_seg}]" if by_seg else ""))


class CheckpointCallback(Callback):
    """A checkpoint every `checkpoint.every` steps, and one at the end (`checkpoint.save_at_end`,
    or always when the run stopped before `train.max_steps`).

    With `checkpoint.async_save` the periodic saves write in the background; the flag "still
    writing here" is agreed with the step's other flags, and at the first step boundary where no
    rank is still writing, every rank commits together (no extra collective to ask)."""

    def __init__(self, checkpoint: CheckpointConfig, max_steps: int):
        self.checkpoint = checkpoint
        self.max_steps = max_steps

    def local_flags(self, trainer: "Trainer", result: "StepResult") -> list[bool]:
        return [trainer.checkpointer.writing()]

    def on_step_end(self, trainer: "Trainer", end: StepEnd, flags: list[bool]) -> None:
        if trainer.checkpointer.has_pending() and not flags[0]:  # every rank has written its files
            trainer.checkpointer.finish_pending()
        if self.checkpoint.every and trainer.state.step % self.checkpoint.every == 0:
            trainer.checkpointer.save(trainer.state.step, background=self.checkpoint.async_save)

    def on_fit_end(self, trainer: "Trainer") -> None:
        stopped_early = trainer.state.step < self.max_steps
        if self.checkpoint.save_at_end or stopped_early:
            trainer.save_once()  # still under the stop handlers: a signal now cannot cut the save short
        trainer.checkpointer.finish_pending()  # an asynchronous save still writing is committed before fit returns

    def close(self, trainer: "Trainer") -> None:
        trainer.checkpointer.wait_for_deletions()  # local, no collective: also after an error


def default_callbacks(cfg: TrainConfig, metrics: MetricsLogger, make_val_batches) -> list[Callback]:
    """The documented order (see the module docstring)."""
    from memgpt_dist.train.heartbeat import HeartbeatCallback  # it subclasses Callback: imported here

    return [ThroughputCallback(cfg, metrics), MetricsCallback(cfg.log, cfg.train, metrics),
            NonFiniteCallback(cfg.train.max_nan_skips, metrics),
            StopCallback(cfg.train, metrics), EvalCallback(cfg.train, metrics, make_val_batches),
            CheckpointCallback(cfg.checkpoint, cfg.train.max_steps), HeartbeatCallback(cfg.train.hang_timeout_s)]


DEFAULT_ORDER = ("ThroughputCallback", "MetricsCallback", "NonFiniteCallback", "StopCallback", "EvalCallback",
                 "CheckpointCallback", "HeartbeatCallback")
