"""The step objects: one per engine family, each owning its forward/backward, its memory carry
and its validation pass, so the trainer's loop never asks which layout it runs on.

* `DenseStep`: a DeepSpeed engine over the whole model (ZeRO-0..3, with or without TP): a
  forward, `engine.backward` and `engine.step` per micro-batch.
* `PipelineStep`: a `PipelineEngine` (1F1B over the micro-batches, `train_batch`/`eval_batch`).

Non-finite steps: a rank whose loss is NaN/Inf multiplies what it backpropagates by NaN, so the
gradient norm that DeepSpeed's ZeRO optimizer all-reduces is NaN on every rank and the optimizer
discards the step everywhere (its overflow check: weights, fp32 master weights, Adam moments and
step count untouched, LR scheduler not advanced). A NaN/Inf gradient under a finite loss takes the
same path. The step reports it (`StepOutput.nonfinite`) and puts the carried memory back where it
was. ZeRO-0 has no such check: there the step raises `NonFiniteUpdate` before the update (the
pipeline's version of that check is installed with the engine, `parallel.engine`).

Host syncs: one per step for the loss and finiteness of every micro-batch together (the trainer
must decide every step whether it was skipped), not one per micro-batch.

May not touch: the loop, the train state, checkpoints or logging (the trainer and callbacks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from memgpt_dist.model.carry import MemoryCarry
from memgpt_dist.parallel.dist import Topology
from memgpt_dist.parallel.engine import NonFiniteUpdate
from memgpt_dist.parallel.tensor_parallel import unsharded_grad_norm
from memgpt_dist.train.batch import (Batch, loss_by_segment, masked_like, pipeline_micro_batches, token_loss_sum,
                                     val_result)


@dataclass
class StepOutput:
    """What one optimizer step over its micro-batches produced."""

    loss: float  # the global token-mean loss (NaN when non-finite)
    grad_norm: float  # the whole model's gradient norm (NaN where nothing reports one)
    nonfinite: bool  # this rank saw a non-finite loss, or the optimizer discarded the step
    stats: dict[str, float]  # memory statistics of the last micro-batch ("<stat>/layer<i>")


class _Step:
    """What both families share: the engine, where the rank sits, the memory carry."""

    def __init__(self, engine, topo: Topology, carry: MemoryCarry, n_segments: int):
        self.engine = engine
        self.topo = topo
        self.carry = carry
        self.n_segments = n_segments  # K of validation samples (data.n_segments)

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def was_step_applied(self) -> bool:
        return self.engine.was_step_applied()

    def grad_norm(self, fallback: Optional[float]) -> float:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return float("nan") if fallback is None else fallback
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def log_stats(self, stats: dict[str, float]) -> dict[str, float]:
        """The memory statistics to log (a collective where stages must be gathered)."""
        return stats

    def _val_batches(self, make_batches, n: int) -> list[Batch]:
        """`n` validation micro-batches; fully masked ones where this rank's stream ended."""
        it = iter(make_batches())
        batches: list[Batch] = []
        for _ in range(n):
            batch = next(it, None)
            batches.append(batch if batch is not None else masked_like(batches[0] if batches else None))
        return batches


class DenseStep(_Step):
    """ZeRO-0..3 (and TP) over the whole model: forward, backward and step per micro-batch."""

    def __init__(self, engine, topo: Topology, carry: MemoryCarry, n_segments: int, n_layer: int,
                 loss_fn: Optional[Callable] = None):
        super().__init__(engine, topo, carry, n_segments)
        self.n_layer = n_layer
        # a fused linear cross-entropy run inside the model's forward (perf/kernels.py); None: the
        # logits and token_loss_sum
        self.loss_fn = loss_fn

    def forward(self, batch: Batch, read_memory: bool = True, state=None, loss: bool = False):
        """The engine's forward of a micro-batch; `loss`: with the step's loss_fn, whose summed
        loss the output then holds instead of the logits."""
        dev = self.topo.device
        fused = {"labels": batch["labels"].to(dev), "loss_fn": self.loss_fn} if loss and self.loss_fn else {}
        return self.engine(batch["input_ids"].to(dev), state=state, reset=batch["reset"].to(dev),
                           read_memory=read_memory, **fused)

    def _loss_sum(self, batch: Batch, out) -> torch.Tensor:
        if out.loss_sum is not None:
            return out.loss_sum
        return token_loss_sum(out.logits, batch["labels"].to(self.topo.device))

    def train(self, batches: list[Batch], scale: float, n_global: float) -> StepOutput:
        self.engine.train()
        before = self.carry.snapshot()
        loss_sums, grad_norm, stats = [], None, {}
        for batch in batches:
            out = self.forward(batch, state=self.carry.state(self.n_layer), loss=True)
            self.carry.keep(out.state)  # the next sample of each stream continues its document
            loss_sum = self._loss_sum(batch, out)
            # NaN-poison a non-finite loss so that its gradient, and hence the all-reduced gradient
            # norm, is NaN on every rank: the ZeRO optimizer then skips the step everywhere. A
            # select, not a host sync: multiplying a finite loss by 1.0 changes no bit.
            poison = torch.where(torch.isfinite(loss_sum.detach()), 1.0, float("nan"))
            self.engine.backward(loss_sum * scale * poison)
            if self.engine.is_gradient_accumulation_boundary():
                grad_norm = self._zero0_norm()
            self.engine.step()
            loss_sums.append(loss_sum.detach())
            stats = out.stats
        local = torch.stack(loss_sums).double()
        loss_sum_local, finite = float(local.sum()), bool(torch.isfinite(local).all())  # the step's one sync
        nonfinite = not finite or not self.engine.was_step_applied()
        if nonfinite:
            self.carry.rollback(before)
        (loss_sum_global,) = self.topo.all_reduce_sum([loss_sum_local])
        return StepOutput(loss=loss_sum_global / max(n_global, 1.0), grad_norm=self.grad_norm(grad_norm),
                          nonfinite=nonfinite, stats={k: float(v) for k, v in stats.items()})

    def _zero0_norm(self) -> Optional[float]:
        """Without a ZeRO optimizer DeepSpeed records no norm and applies whatever gradient it
        gets. Gradients are already averaged over data-parallel ranks after the boundary backward
        (TP-sharded ones summed over the TP group), so every rank gets the same norm and stops at
        the same point, before the update."""
        if self.engine.zero_optimization_stage() > 0:
            return None
        norm = unsharded_grad_norm(self.engine.module, self.topo.tp_group)
        if not math.isfinite(norm):
            raise NonFiniteUpdate(norm)
        return norm

    @torch.no_grad()
    def evaluate(self, make_batches, n_batches: int) -> dict[str, float]:
        """Validation loss, perplexity and loss by segment index over `n_batches` micro-batches.
        Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively)."""
        K = self.n_segments
        self.engine.eval()
        sums = torch.zeros(K, dtype=torch.float64)
        counts = torch.zeros(K, dtype=torch.float64)
        for batch in self._val_batches(make_batches, n_batches):
            out = self.forward(batch)
            s, c = loss_by_segment(out.logits, batch["labels"].to(self.topo.device), K)
            sums += s.double().cpu()
            counts += c.double().cpu()
        reduced = self.topo.all_reduce_sum(sums.tolist() + counts.tolist())
        self.engine.train()
        return val_result(torch.tensor(reduced[:K]), torch.tensor(reduced[K:]))


class PipelineStep(_Step):
    """A PipelineEngine: one 1F1B `train_batch` over the micro-batches of a step.

    Every stage of a replica reads the same micro-batches. The last stage's loss_fn
    (`scaled_token_loss`) gets the labels with the step's scale, and DeepSpeed broadcasts the
    step's mean loss (over micro-batches and replicas: the global token mean) to every stage. The
    carried memory lives in the stages' shared `MemoryCarry`, per layer of the stage."""

    def __init__(self, engine, topo: Topology, carry: MemoryCarry, n_segments: int):
        super().__init__(engine, topo, carry, n_segments)
        self._shape: Optional[tuple[int, ...]] = None  # the activation shape the pipeline last exchanged

    def train(self, batches: list[Batch], scale: float, n_global: float) -> StepOutput:
        self.engine.train()
        before = self.carry.snapshot()
        self._set_shape(batches)
        loss = float(self.engine.train_batch(data_iter=iter(pipeline_micro_batches(batches, scale))))
        nonfinite = not math.isfinite(loss) or not self.engine.was_step_applied()
        if nonfinite:
            self.carry.rollback(before)
        return StepOutput(loss=loss, grad_norm=self.grad_norm(None), nonfinite=nonfinite,
                          stats={k: float(v) for k, v in self.carry.stats.items()})

    def log_stats(self, stats: dict[str, float]) -> dict[str, float]:
        """Every stage's memory statistics (of its layers), as the first TP rank of the first
        replica saw them: a collective, called at the same steps on every rank."""
        gathered = self.topo.all_gather_object((self.topo.dp_rank, self.topo.tp_rank, stats))
        return {k: v for dp_rank, tp_rank, s in gathered if dp_rank == 0 and tp_rank == 0 for k, v in s.items()}

    def _set_shape(self, batches: list[Batch]) -> None:
        """The pipeline engine sizes its send/receive buffers once, from the first activations it
        exchanges; when the sample length changes (data.n_segments_schedule, or validation after
        a shorter training K) every rank resets them at the same step (DeepSpeed's curriculum hook)."""
        shape = tuple(batches[0]["input_ids"].shape)
        if self._shape is not None and shape != self._shape:
            self.engine.reset_activation_shape()
        self._shape = shape

    @torch.no_grad()
    def evaluate(self, make_batches, n_batches: int) -> dict[str, float]:
        """Validation through `eval_batch`, one micro-batch at a time so that the last stage gets
        each one's logits (DeepSpeed returns the last micro-batch's only) and sums the loss by
        segment index; the sums reach every rank through one all-reduce over the world, to which
        only the last stage's first TP rank of each replica contributes."""
        K = self.n_segments
        sums = torch.zeros(K, dtype=torch.float64)
        counts = torch.zeros(K, dtype=torch.float64)
        self.engine.eval()
        for batch in self._val_batches(make_batches, n_batches):
            self._set_shape([batch])
            # the loss is computed too (DeepSpeed adds every last-stage output to its running total,
            # which takes scalars only), but not broadcast: the sums below are what is reported
            _, logits = self.engine.eval_batch(iter(pipeline_micro_batches([batch], 1.0)), return_logits=True,
                                               bcast_loss=False, num_micro_batches=1)
            if self.engine.is_last_stage() and self.topo.tp_rank == 0:
                s, c = loss_by_segment(logits, batch["labels"].to(logits.device), K)
                sums += s.double().cpu()
                counts += c.double().cpu()
        self.engine.train()
        reduced = self.topo.sum_over_world(sums.tolist() + counts.tolist())
        return val_result(torch.tensor(reduced[:K]), torch.tensor(reduced[K:]))
