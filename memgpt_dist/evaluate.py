"""Long-range evaluation of trained checkpoints (`memgpt-eval`).

Task accuracy by distance: fresh task documents (a random stream no training split uses) with
1, 3, 7, 15, 31 filler segments between the fact and the question are read with the memory and
scored at the answer tokens (teacher forcing; recall: per value, passkey: all digits exact).
Each distance is also scored with the memory read switched off at evaluation time: if the
memory carries the answer, that accuracy falls to chance.

The documents come from the caller (`data_pipeline.eval_data`, wired in by `launch/eval.py`):
this module scores a model on them and imports nothing of the data pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from memgpt_dist.model import GPT

DISTANCES = (1, 3, 7, 15, 31)
TaskBatches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (input_ids (b, S*N), answer mask (b, S*N))


@dataclass(frozen=True)
class TaskResult:
    """Accuracy of one model on one task at one distance."""

    gap: int
    accuracy: float
    accuracy_read_off: float
    chance: float
    documents: int


@torch.no_grad()
def answer_accuracy(model: GPT, ids: torch.Tensor, mask: torch.Tensor, per_document: bool,
                    read_memory: bool = True) -> tuple[int, int]:
    """(correct, total): token t is predicted from the logits at t - 1."""
    logits = model(ids, read_memory=read_memory).logits  # (b, T, V)
    pred = logits[:, :-1].argmax(-1)  # (b, T-1): prediction of token t+1
    hit = (pred == ids[:, 1:]) | ~mask[:, 1:]  # non-answer positions count as hits
    if per_document:
        return int(hit.all(dim=1).sum()), ids.shape[0]
    answers = mask[:, 1:]
    return int((hit & answers).sum()), int(answers.sum())


def evaluate_task(model: GPT, batches_at: Callable[[int], TaskBatches], gaps=DISTANCES, exact: bool = False,
                  chance: float = 0.0, n_docs: int = 256) -> list[TaskResult]:
    """Accuracy at each gap, with the memory read on and off. `batches_at(gap)`: the evaluation
    documents with that many filler segments; `exact`: score whole answers (passkey), else tokens."""
    out = []
    for gap in gaps:
        counts = np.zeros((2, 2), dtype=np.int64)  # [read on/off] x [correct, total]
        for ids, mask in batches_at(gap):
            counts[0] += answer_accuracy(model, ids, mask, exact)
            counts[1] += answer_accuracy(model, ids, mask, exact, read_memory=False)
        out.append(TaskResult(gap, counts[0, 0] / counts[0, 1], counts[1, 0] / counts[1, 1], chance, n_docs))
    return out


def format_table(rows: list[tuple[str, list[TaskResult]]]) -> str:
    """Side-by-side accuracy table: one row per (checkpoint, read on/off), one column per gap."""
    gaps = [r.gap for r in rows[0][1]]
    head = f"{'model':40s} {'memory read':12s} " + " ".join(f"gap {g:>3d}" for g in gaps) + "   chance"
    lines = [head, "-" * len(head)]
    for name, results in rows:
        for label, attr in (("on", "accuracy"), ("off (eval)", "accuracy_read_off")):
            cells = " ".join(f"{getattr(r, attr):7.3f}" for r in results)
            lines.append(f"{name[-40:]:40s} {label:12s} {cells}   {results[0].chance:.2g}")
    return "\n".join(lines)


@dataclass(frozen=True)
class CorpusResult:
    """Next-token loss by segment index (1-based position of the segment in its document)."""

    loss_by_segment: list[float]
    loss_by_segment_read_off: list[float]
    documents: int
    segment_len: int


@torch.no_grad()
def evaluate_corpus(model: GPT, docs: list[np.ndarray], segment_len: int, n_segments: int = 16,
                    batch: int = 8) -> CorpusResult:
    """Loss at segment index 1..n_segments over the first n_segments * N (+1) tokens of held-out
    documents at least that long (`docs`), read with the memory and with its read switched off."""
    import torch.nn.functional as F

    T = n_segments * segment_len
    if not docs:
        raise ValueError(f"no held-out document has {T + 1} tokens; lower --segments")
    sums = torch.zeros(2, n_segments, dtype=torch.float64)
    for i in range(0, len(docs), batch):
        ids = torch.from_numpy(np.stack([d[:T + 1] for d in docs[i:i + batch]]))  # (b, T + 1)
        for r, read in enumerate((True, False)):
            logits = model(ids[:, :-1], read_memory=read).logits  # (b, T, V)
            loss = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")  # (b, T)
            sums[r] += loss.view(-1, n_segments, segment_len).sum(dim=(0, 2)).double()
    means = sums / (len(docs) * segment_len)
    return CorpusResult(means[0].tolist(), means[1].tolist(), len(docs), segment_len)


def format_corpus_table(rows: list[tuple[str, CorpusResult]], show=(1, 2, 4, 8, 16)) -> str:
    """Loss at selected segment indices, memory read on and off, one row each per model."""
    idx = [i for i in show if i <= len(rows[0][1].loss_by_segment)]
    head = f"{'model':40s} {'memory read':12s} " + " ".join(f"seg {i:>3d}" for i in idx)
    lines = [head, "-" * len(head)]
    for name, r in rows:
        for label, values in (("on", r.loss_by_segment), ("off (eval)", r.loss_by_segment_read_off)):
            lines.append(f"{name[-40:]:40s} {label:12s} " + " ".join(f"{values[i - 1]:7.3f}" for i in idx))
    return "\n".join(lines)
