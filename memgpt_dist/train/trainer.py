"""The training loop: step, in-loop validation, logging and checkpoints around a DeepSpeed engine.

Loss normalisation: every optimizer step minimises (sum of token losses) / (loss-bearing tokens
in the global batch). Each micro-batch's summed loss is scaled by dp * grad_accum / n_global so
that DeepSpeed's averaging over ranks and micro-steps yields exactly that token-weighted mean,
whatever the layout: a 2-rank run and a 1-rank run with the same global batch see the same loss.

Non-finite steps: a rank whose loss is NaN/Inf multiplies what it backpropagates by NaN, so the
gradient norm that DeepSpeed's ZeRO optimizer all-reduces is NaN on every rank and the optimizer
discards the step everywhere (its overflow check: weights, fp32 master weights, Adam moments and
step count untouched, LR scheduler not advanced). A NaN/Inf gradient under a finite loss takes the
same path. The ranks then confirm the skip with one all-reduce at the step boundary, count it, and
stop after more than `train.max_nan_skips` in a row. ZeRO-0 has no such check: there the run stops
before the update instead of skipping it. The step counter advances over a skipped step (its
batch is consumed), the LR schedule does not: DeepSpeed's convention for fp16 overflow.

The step boundary is also where a stop signal or the time budget is agreed (see `stopping`).
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol

import torch
import torch.nn.functional as F

from memgpt_dist.config import TrainConfig
from memgpt_dist.model.memory import MemoryState, detach_state, move_state, state_from_dict, state_to_dict
from memgpt_dist.parallel.dist import Topology, rank_layout_state
from memgpt_dist.parallel.pipeline import StageMemory, step_by_whole_model_norm
from memgpt_dist.parallel.tensor_parallel import unsharded_grad_norm
from memgpt_dist.train.checkpoint import CheckpointError, Checkpointer, sha256_file, sha256_text, tag_for
from memgpt_dist.train.metrics import MetricsLogger
from memgpt_dist.train.reshard import Redistributed, redistribute_memory, replica_states, state_at
from memgpt_dist.train.state import TrainState, rng_state, set_rng_state
from memgpt_dist.train.stopping import Diverged, Preempted, StopSignals, TimeBudget, any_rank

Batch = dict[str, torch.Tensor]
IGNORE = -100
log = logging.getLogger("memgpt_dist")


class StatefulBatches(Protocol):
    def __next__(self) -> Batch: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, sd: dict[str, Any]) -> None: ...
    # a resume on another layout: the saved states of every data-parallel replica, in dp order
    def load_state_dicts(self, states: list[dict[str, Any]]) -> None: ...
    def set_n_segments(self, k: int) -> None: ...  # only called with data.n_segments_schedule


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross entropy over loss-bearing positions (labels != -100)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def loss_by_segment(logits: torch.Tensor, labels: torch.Tensor, n_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-segment-index summed loss and token count: two tensors of shape (K,)."""
    B, T, V = logits.shape
    per_tok = F.cross_entropy(logits.float().reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE,
                              reduction="none").view(B, n_segments, T // n_segments)  # (B, K, N)
    valid = (labels != IGNORE).view(B, n_segments, T // n_segments)
    return per_tok.sum(dim=(0, 2)), valid.sum(dim=(0, 2)).to(per_tok.dtype)


def scaled_token_loss(logits: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The pipeline's loss_fn: `token_loss_sum` times the step's normalising scale, which travels
    with the labels as `target = (labels, scale)` (see `pipeline_micro_batches`)."""
    labels, scale = target
    return token_loss_sum(logits, labels) * scale


def pipeline_micro_batches(batches: list[Batch], scale: float) -> list[tuple[tuple, tuple]]:
    """(inputs for the first stage, labels for the last) per micro-batch, as `train_batch` reads them."""
    s = torch.tensor(scale, dtype=torch.float32)
    return [((b["input_ids"], b["reset"]), (b["labels"], s)) for b in batches]


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


class Trainer:
    """Runs `cfg.train.max_steps` optimizer steps of `engine` over `train_batches`."""

    def __init__(self, cfg: TrainConfig, topo: Topology, engine, train_batches: StatefulBatches,
                 make_val_batches: Optional[Callable[[], Iterable[Batch]]], checkpointer: Checkpointer,
                 metrics: MetricsLogger, stage_memory: Optional[StageMemory] = None):
        """`stage_memory`: under pipeline parallelism, the memory state and statistics that this
        rank's stage keeps (`pipeline.build_pipeline_module`)."""
        self.cfg = cfg
        self.topo = topo
        self.engine = engine
        self.train_batches = train_batches
        self.make_val_batches = make_val_batches
        self.checkpointer = checkpointer
        self.metrics = metrics
        self.state = TrainState()
        self.client_extra: dict[str, Any] = {}
        # train.carry_memory: the memory of this rank's streams after the last micro-batch (detached)
        self.carried: Optional[MemoryState] = None
        self.stage_memory = stage_memory  # the same, per layer of this rank's stage, under pp
        self._pipe_shape: Optional[tuple[int, ...]] = None  # the activation shape the pipeline last exchanged
        self.last_saved_step: Optional[int] = None  # saved or restored: never written twice
        self.longest_step_s = 0.0
        self.longest_save_s: Optional[float] = None
        if topo.pp_size > 1 and engine.zero_optimization_stage() == 0 and \
                not (engine.fp16_enabled() or engine.bfloat16_enabled()):
            # DeepSpeed's own clipping of this path uses a norm without the later stages
            step_by_whole_model_norm(engine, cfg.optim.grad_clip, self._maybe_stop_before_unskippable_update)

    # ------------------------------------------------------------------ state
    def client_state(self) -> dict[str, Any]:
        return {"train_state": self.state.state_dict(), "config": self.cfg.to_json(),
                "world_size": self.topo.world_size, **self.client_extra}

    def rank_state(self) -> dict[str, Any]:
        out = {"loader": self.train_batches.state_dict(), "rng": rng_state(), "rank": self.topo.rank,
               # where this file sits in the layout: coordinates, global stream ids, memory heads
               **rank_layout_state(self.topo, getattr(self.train_batches, "stream_ids", None), self.cfg.model.n_head)}
        if self.carried is not None:  # this rank's streams' memory, every layer and its heads, fp32
            out["memory_state"] = {k: v.cpu() for k, v in state_to_dict(self.carried).items()}
        if self.stage_memory is not None:  # under pp: the layers of this rank's stage only
            out["layers"] = sorted(self.stage_memory.owned)
            if self.stage_memory.layers:
                out["memory_state"] = self.stage_memory.state_dict()
        return out

    def checkpoint_meta(self) -> dict[str, Any]:
        """What a resume checks before any tensor is read: config, its hash, the tokenizer hash."""
        config = self.cfg.to_json()
        return {"config": config, "config_sha256": sha256_text(config), "world_size": self.topo.world_size,
                "tokenizer_sha256": self._tokenizer_sha256()}

    def _tokenizer_sha256(self) -> Optional[str]:
        tokenizer = Path(self.cfg.run_dir) / "tokenizer.json"  # the data's tokenizer, copied at start
        return sha256_file(tokenizer) if tokenizer.is_file() else None

    def save(self) -> None:
        t0 = time.perf_counter()
        self.checkpointer.save(self.engine, self.state.step, self.client_state(), self.rank_state(),
                               self.checkpoint_meta())
        self.last_saved_step = self.state.step
        self.longest_save_s = max(self.longest_save_s or 0.0, time.perf_counter() - t0)

    def restore(self, step: int, universal: Optional[Path] = None) -> Optional[Redistributed]:
        """Load checkpoint `step`. `universal`: its universal form, for a resume on another layout
        (`reshard`); the per-rank state is then redistributed, and what moved is returned."""
        self._check_checkpoint_meta(step)
        loaded = self.checkpointer.load(self.engine, step, universal)
        self.last_saved_step = step
        self.state.load_state_dict(loaded.client_state["train_state"])
        self._apply_curriculum(max(self.state.step - 1, 0))  # the K the saved loader state was cut with
        if universal is None:
            self._restore_rank_state(loaded.rank_state)
            return None
        return self._redistribute_rank_states(loaded.rank_states)

    def _restore_rank_state(self, saved: dict[str, Any]) -> None:
        self.train_batches.load_state_dict(saved["loader"])
        set_rng_state(saved["rng"])
        self._set_carried(saved.get("memory_state"))

    def _set_carried(self, memory: Optional[dict[str, torch.Tensor]]) -> None:
        """Restore the carried memory from a saved `{"layer<i>.A"/".z"}` (by global layer index;
        a pipeline stage takes its own layers, a whole model all of them)."""
        if not self.cfg.train.carry_memory:
            return
        if self.stage_memory is not None:
            self.stage_memory.load_state_dict(memory, self.topo.device)
            return
        self.carried = move_state(state_from_dict(memory), self.topo.device) if memory else None

    def _redistribute_rank_states(self, saved: tuple[dict[str, Any], ...]) -> Redistributed:
        """Per-rank state written by another layout: each of this rank's streams takes its loader
        cursor and memory rows from the saved rank that held it (by global stream id; memory
        heads by head index), the RNG from the saved rank at the same coordinates, if any."""
        if not all("coord" in s for s in saved):
            raise CheckpointError("this checkpoint's rank files do not record their layout (written by an older "
                                  "version); resume it with the layout that wrote it")
        self.train_batches.load_state_dicts([s["loader"] for s in replica_states(list(saved))])
        mine = rank_layout_state(self.topo, getattr(self.train_batches, "stream_ids", None), self.cfg.model.n_head)
        same_place = state_at(list(saved), mine["coord"])
        if same_place is not None:
            set_rng_state(same_place["rng"])
        moved = redistribute_memory(list(saved), mine["stream_ids"] or [], (mine["heads"][0], mine["heads"][1]))
        self._set_carried(moved.memory)
        return moved

    def _check_checkpoint_meta(self, step: int) -> None:
        """Refuse a checkpoint trained with another tokenizer; report config keys that changed."""
        meta = self.checkpointer.marker(step).get("meta", {})
        saved_tok, tok = meta.get("tokenizer_sha256"), self._tokenizer_sha256()
        if saved_tok and tok and saved_tok != tok:
            raise CheckpointError(f"checkpoint {tag_for(step)} was trained with a tokenizer of sha256 "
                                  f"{saved_tok[:12]}..., the data's tokenizer ({self.cfg.data.path}) has "
                                  f"{tok[:12]}...: token ids would mean different text. Resume with the original "
                                  f"data or start a new run_dir")
        saved_cfg = meta.get("config")
        if saved_cfg and sha256_text(saved_cfg) != sha256_text(self.cfg.to_json()) and self.topo.is_main:
            changed = _changed_keys(json.loads(saved_cfg), self.cfg.to_dict())
            log.warning("resuming %s with changed settings: %s", tag_for(step),
                        ", ".join(changed) or "(formatting only)")

    # ------------------------------------------------------------------ steps
    def _apply_curriculum(self, step: int) -> None:
        """data.n_segments_schedule: the loader cuts samples of K(step) segments."""
        if self.cfg.data.n_segments_schedule:
            self.train_batches.set_n_segments(self.cfg.data.n_segments_at(step))

    def _next_micro_batches(self) -> tuple[list[Batch], float]:
        self._apply_curriculum(self.state.step)
        t0 = time.perf_counter()
        batches = [next(self.train_batches) for _ in range(self.cfg.parallel.grad_accum)]
        return batches, time.perf_counter() - t0

    def _forward(self, batch: Batch, read_memory: bool = True, state: Optional[MemoryState] = None):
        dev = self.topo.device
        return self.engine(batch["input_ids"].to(dev), state=state, reset=batch["reset"].to(dev),
                           read_memory=read_memory)

    def train_step(self) -> StepResult:
        """One optimizer step over grad_accum micro-batches on every rank.

        A step with a non-finite loss or gradient is discarded by the optimizer on every rank (see
        the module docstring); `StepResult.nonfinite` says so, and the carried memory goes back to
        where it was before the step.
        """
        t0 = time.perf_counter()
        batches, data_time = self._next_micro_batches()
        n_local = sum(int((b["labels"] != IGNORE).sum()) for b in batches)
        n_global, samples = self.topo.all_reduce_sum([float(n_local), float(sum(len(b["input_ids"]) for b in batches))])
        scale = self.topo.dp_size * self.cfg.parallel.grad_accum / max(n_global, 1.0)
        self.engine.train()
        if self.topo.pp_size > 1:
            loss, grad_norm, nonfinite, stats = self._pipeline_micro_steps(batches, scale)
        else:
            loss_sum_local, grad_norm, nonfinite, stats = self._micro_steps(batches, scale)
            (loss_sum_global,) = self.topo.all_reduce_sum([loss_sum_local])
            loss = loss_sum_global / max(n_global, 1.0)
        self.state.step += 1
        self.state.tokens_seen += int(n_global)
        self.state.samples_seen += int(samples)
        return StepResult(loss=loss, grad_norm=_grad_norm(self.engine, grad_norm),
                          lr=self.engine.get_lr()[0], tokens=int(n_global), samples=int(samples),
                          step_time=time.perf_counter() - t0, data_time=data_time,
                          stats={k: float(v) for k, v in stats.items()}, nonfinite=nonfinite)

    def _micro_steps(self, batches: list[Batch], scale: float
                     ) -> tuple[float, Optional[float], bool, dict[str, torch.Tensor]]:
        """Forward, backward and step per micro-batch; returns (this rank's summed token loss,
        the gradient norm where DeepSpeed does not record it, non-finite, memory stats)."""
        carried_before = self.carried
        loss_sum_local = 0.0
        nonfinite = False
        stats: dict[str, torch.Tensor] = {}
        grad_norm = None
        for batch in batches:
            out = self._forward(batch, state=self.carried)
            if self.cfg.train.carry_memory:
                # the next sample of each stream continues its document: keep the memory, cut the graph
                self.carried = detach_state(out.state)
            loss_sum = token_loss_sum(out.logits, batch["labels"].to(self.topo.device))
            finite = bool(torch.isfinite(loss_sum))
            nonfinite |= not finite
            # NaN-poison a non-finite loss so that its gradient, and hence the all-reduced
            # gradient norm, is NaN on every rank: the ZeRO optimizer then skips the step everywhere.
            self.engine.backward(loss_sum * scale if finite else loss_sum * scale * float("nan"))
            if self.engine.is_gradient_accumulation_boundary():
                grad_norm = _unpartitioned_grad_norm(self.engine, self.topo)
                self._maybe_stop_before_unskippable_update(grad_norm)
            self.engine.step()
            loss_sum_local += float(loss_sum.detach())
            stats = out.stats
        nonfinite |= not self.engine.was_step_applied()
        if nonfinite:
            self.carried = carried_before
        return loss_sum_local, grad_norm, nonfinite, stats

    def _pipeline_micro_steps(self, batches: list[Batch], scale: float
                              ) -> tuple[float, Optional[float], bool, dict[str, torch.Tensor]]:
        """One 1F1B `train_batch` over the micro-batches; every stage of the replica read the same
        ones. The last stage's loss_fn (`scaled_token_loss`) gets the labels with the step's scale,
        and DeepSpeed broadcasts the step's mean loss (over micro-batches and replicas, i.e. the
        global token mean) to every stage. The carried memory lives in the stages' `StageMemory`;
        a discarded step puts it back. Memory stats are this stage's (gathered when logged)."""
        memory = self.stage_memory
        carried_before = dict(memory.layers) if memory is not None else {}
        self._set_pipeline_shape(batches)
        loss = float(self.engine.train_batch(data_iter=iter(pipeline_micro_batches(batches, scale))))
        nonfinite = not math.isfinite(loss) or not self.engine.was_step_applied()
        if nonfinite and memory is not None:
            memory.layers = carried_before
        return loss, None, nonfinite, dict(memory.stats) if memory is not None else {}

    def _set_pipeline_shape(self, batches: list[Batch]) -> None:
        """The pipeline engine sizes its send/receive buffers once, from the first activations it
        exchanges; when the sample length changes (data.n_segments_schedule, or validation after
        a shorter training K) every rank resets them at the same step (DeepSpeed's curriculum hook)."""
        shape = tuple(batches[0]["input_ids"].shape)
        if self._pipe_shape is not None and shape != self._pipe_shape:
            self.engine.reset_activation_shape()
        self._pipe_shape = shape

    def _maybe_stop_before_unskippable_update(self, grad_norm: Optional[float]) -> None:
        """ZeRO-0 applies whatever gradient it gets. Its gradients are already all-reduced here,
        so every rank sees the same norm and stops at the same point, before the update."""
        if grad_norm is not None and not math.isfinite(grad_norm):
            raise Diverged(f"non-finite gradient at step {self.state.step + 1}; parallel.zero_stage=0 cannot skip "
                           f"a step, so the run stopped before the update. {self._last_checkpoint_note()}; use "
                           f"parallel.zero_stage >= 1 to skip such steps")

    def _last_checkpoint_note(self) -> str:
        steps = self.checkpointer.committed_steps()
        where = self.checkpointer.root / tag_for(steps[-1]) if steps else None
        return f"The last committed checkpoint {where} is intact" if where else "No checkpoint was committed"

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss, perplexity and loss by segment index over `eval_batches` micro-batches.

        Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively);
        a rank whose validation stream ended feeds fully masked batches.
        """
        if self.make_val_batches is None:
            return {}
        if self.topo.pp_size > 1:
            return self._evaluate_pipeline()
        K = self.cfg.data.n_segments
        self.engine.eval()
        sums = torch.zeros(K, dtype=torch.float64)
        counts = torch.zeros(K, dtype=torch.float64)
        it = iter(self.make_val_batches())
        template: Optional[Batch] = None
        for _ in range(self.cfg.train.eval_batches):
            batch = next(it, None)
            if batch is None:
                batch = _masked_like(template)
            template = template or batch
            out = self._forward(batch)
            s, c = loss_by_segment(out.logits, batch["labels"].to(self.topo.device), K)
            sums += s.double().cpu()
            counts += c.double().cpu()
        reduced = self.topo.all_reduce_sum(sums.tolist() + counts.tolist())
        self.engine.train()
        return _val_result(torch.tensor(reduced[:K]), torch.tensor(reduced[K:]))

    def _val_batches(self) -> list[Batch]:
        """`eval_batches` validation micro-batches; fully masked ones where this rank's stream ended."""
        it = iter(self.make_val_batches())
        batches: list[Batch] = []
        for _ in range(self.cfg.train.eval_batches):
            batch = next(it, None)
            batches.append(batch if batch is not None else _masked_like(batches[0] if batches else None))
        return batches

    def _evaluate_pipeline(self) -> dict[str, float]:
        """Validation through the pipeline's `eval_batch`, one micro-batch at a time so that the
        last stage gets each one's logits (DeepSpeed returns the last micro-batch's only) and sums
        the loss by segment index; the sums reach every rank through one all-reduce over the
        world, to which only the last stage's first TP rank of each replica contributes."""
        K = self.cfg.data.n_segments
        sums = torch.zeros(K, dtype=torch.float64)
        counts = torch.zeros(K, dtype=torch.float64)
        self.engine.eval()
        for batch in self._val_batches():
            self._set_pipeline_shape([batch])
            micro = pipeline_micro_batches([batch], 1.0)
            # the loss is computed too (DeepSpeed adds every last-stage output to its running total,
            # which takes scalars only), but not broadcast: the sums below are what is reported
            _, logits = self.engine.eval_batch(iter(micro), return_logits=True, bcast_loss=False,
                                               num_micro_batches=1)
            if self.engine.is_last_stage() and self.topo.tp_rank == 0:
                s, c = loss_by_segment(logits, batch["labels"].to(logits.device), K)
                sums += s.double().cpu()
                counts += c.double().cpu()
        self.engine.train()
        reduced = self.topo.sum_over_world(sums.tolist() + counts.tolist())
        return _val_result(torch.tensor(reduced[:K]), torch.tensor(reduced[K:]))

    # ------------------------------------------------------------------ loop
    def fit(self, stop_after: Optional[int] = None) -> TrainState:
        """Train to `train.max_steps`; `stop_after` ends early (with a checkpoint) at that step,
        leaving the schedule untouched, as a preempted job would.

        Raises `Preempted` after a committed checkpoint when a stop signal reached any rank or the
        time budget ran out, and `Diverged` (without saving) after too many non-finite steps.
        """
        cfg = self.cfg
        last = min(cfg.train.max_steps, stop_after) if stop_after else cfg.train.max_steps
        budget = TimeBudget(cfg.train.max_minutes)
        with StopSignals(cfg.train.stop_file) as signals:
            while self.state.step < last:
                result = self.train_step()
                self.longest_step_s = max(self.longest_step_s, result.step_time)
                skipped, signalled, out_of_time = any_rank(
                    [result.nonfinite, signals.poll() is not None,
                     budget.exhausted(self.longest_step_s, self.longest_save_s)], self.topo.device)
                self._count_skip(skipped)
                self._log_step(result, skipped)
                self._stop_if_diverged()
                if (signalled or out_of_time) and self.state.step < last:  # before eval: the grace time is short
                    self._stop_preempted(signals.received if signalled else None, out_of_time)
                if cfg.train.eval_every and self.state.step % cfg.train.eval_every == 0:
                    self._log_eval()
                if cfg.checkpoint.every and self.state.step % cfg.checkpoint.every == 0:
                    self.save()
            stopped_early = self.state.step < cfg.train.max_steps
            if (cfg.checkpoint.save_at_end or stopped_early) and self.last_saved_step != self.state.step:
                self.save()  # still under the handlers: a signal now cannot cut the final save short
        self.metrics.flush()
        return self.state

    def _count_skip(self, skipped: bool) -> None:
        """Account a step that some rank found non-finite (agreed by all-reduce)."""
        if not skipped:
            self.state.nonfinite_streak = 0
            return
        if self.engine.was_step_applied():  # the optimizer must have discarded it on this rank too
            raise RuntimeError(f"step {self.state.step} was non-finite on some rank but its update was applied "
                               f"here; the optimizer's overflow check did not fire")
        self.state.skipped_steps += 1
        self.state.nonfinite_streak += 1

    def _stop_if_diverged(self) -> None:
        """More than train.max_nan_skips skipped steps in a row end the run, unsaved."""
        if self.state.nonfinite_streak <= self.cfg.train.max_nan_skips:
            return
        self.metrics.flush()
        raise Diverged(f"{self.state.nonfinite_streak} consecutive steps (to step {self.state.step}) had a "
                       f"non-finite loss or gradient, more than train.max_nan_skips={self.cfg.train.max_nan_skips}. "
                       f"{self._last_checkpoint_note()}; lower optim.lr or check the data, then resume with "
                       f"--resume auto")

    def _stop_preempted(self, signal_name: Optional[str], out_of_time: bool) -> None:
        reason = (f"{signal_name} received" if signal_name else "a stop signal on another rank") if not out_of_time \
            else f"time budget train.max_minutes={self.cfg.train.max_minutes:g} nearly used"
        if self.last_saved_step != self.state.step:
            self.save()
        self.metrics.flush()
        raise Preempted(f"stopped at step {self.state.step} ({reason}); checkpoint "
                        f"{self.checkpointer.root / tag_for(self.state.step)} is committed: run the same "
                        f"command with --resume auto to continue")

    def _log_step(self, r: StepResult, skipped: bool) -> None:
        step = self.state.step
        if not (skipped or step % self.cfg.log.every == 0 or step == 1 or step == self.cfg.train.max_steps):
            return
        toks = r.tokens / max(r.step_time, 1e-9)
        values = {"train/loss": r.loss, "train/lr": r.lr, "train/grad_norm": r.grad_norm,
                  "train/skipped_steps": self.state.skipped_steps,
                  "perf/tokens_per_s": toks, "perf/step_time_s": r.step_time, "perf/data_wait_s": r.data_time}
        stats = self._stage_stats(r.stats) if self.topo.pp_size > 1 else r.stats
        values.update({f"memory/{k}": v for k, v in stats.items()})
        values.update(self._data_skips())
        self.metrics.scalars(values, step, self.state.tokens_seen)
        self.metrics.line(f"step {step}/{self.cfg.train.max_steps} loss {r.loss:.4f} "
                          f"lr {r.lr:.2e} gnorm {r.grad_norm:.3f} tok/s {toks:,.0f} "
                          f"step {r.step_time * 1000:.0f}ms data {r.data_time * 1000:.0f}ms")
        if skipped:
            self.metrics.warning(f"step {step} skipped on every rank: non-finite loss or gradient "
                                 f"({self.state.nonfinite_streak} in a row, {self.state.skipped_steps} in all; "
                                 f"the run stops after {self.cfg.train.max_nan_skips} in a row)")

    def _stage_stats(self, mine: dict[str, float]) -> dict[str, float]:
        """Every stage's memory statistics (of its layers), as the first TP rank of the first
        replica saw them: a collective, called at the same steps on every rank."""
        gathered = self.topo.all_gather_object((self.topo.dp_rank, self.topo.tp_rank, mine))
        return {k: v for dp_rank, tp_rank, stats in gathered if dp_rank == 0 and tp_rank == 0 for k, v in stats.items()}

    def _data_skips(self) -> dict[str, float]:
        """Documents skipped in damaged shards so far, and their fraction of all documents read,
        over every data-parallel replica (a collective: every rank logs the same steps)."""
        loaders = getattr(self.train_batches, "sources", [self.train_batches])
        counts = [float(sum(getattr(x, attr, 0) for x in loaders)) for attr in ("skipped_samples", "seen_samples")]
        skipped, seen = self.topo.all_reduce_sum(counts)
        return {"data/skipped_docs": skipped, "data/skipped_fraction": skipped / max(skipped + seen, 1.0)}

    def _log_eval(self) -> None:
        result = self.evaluate()
        if result:
            self.metrics.scalars(result, self.state.step, self.state.tokens_seen)
            by_seg = " ".join(f"{result[k]:.3f}" for k in sorted(result) if k.startswith("val/loss_segment_"))
            self.metrics.line(f"eval step {self.state.step}: val loss {result['val/loss']:.4f} "
                              f"ppl {result['val/ppl']:.2f}" + (f" by segment [{by_seg}]" if by_seg else ""))


def _val_result(sums: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
    """Validation loss, perplexity and loss by segment index from per-segment (K,) loss sums and
    token counts over the whole validation batch."""
    loss = float(sums.sum() / counts.sum().clamp(min=1))
    result = {"val/loss": loss, "val/ppl": math.exp(min(loss, 30.0))}
    for k in range(len(sums)):
        if counts[k] > 0:
            result[f"val/loss_segment_{k + 1}"] = float(sums[k] / counts[k])
    return result


def _unpartitioned_grad_norm(engine, topo: Topology) -> Optional[float]:
    """Without a ZeRO optimizer DeepSpeed does not record the norm; gradients are already
    averaged over data-parallel ranks after the boundary backward, and TP-sharded ones are
    summed over the TP group, so every rank gets the whole model's norm."""
    if engine.zero_optimization_stage() > 0:
        return None
    return unsharded_grad_norm(engine.module, topo.tp_group)


def _grad_norm(engine, fallback: Optional[float]) -> float:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan") if fallback is None else fallback
    return float(norm.item() if torch.is_tensor(norm) else norm)


def _changed_keys(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """'section.key: old -> new' for every leaf that differs between two config dicts."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "(absent)"), current.get(key, "(absent)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a} -> {b}")
    return out


def _masked_like(template: Optional[Batch]) -> Batch:
    if template is None:
        raise RuntimeError("validation produced no batch on this rank; the validation split is empty")
    out = {k: v.clone() for k, v in template.items()}
    out["labels"].fill_(IGNORE)
    out["reset"].fill_(True)
    return out
