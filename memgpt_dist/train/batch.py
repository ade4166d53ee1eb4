"""What a training step consumes and how its loss is counted: the batch, the ignore label, the
loss functions. The lowest module of `train/`: it imports torch only, so the steps, the trainer
and the pipeline's loss function can all use it without importing one another.

Loss normalisation: every optimizer step minimises (sum of token losses) / (loss-bearing tokens
in the global batch). Each micro-batch's summed loss is scaled by dp * grad_accum / n_global so
that DeepSpeed's averaging over ranks and micro-steps yields exactly that token-weighted mean,
whatever the layout: a 2-rank run and a 1-rank run with the same global batch see the same loss.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Protocol

import torch
import torch.nn.functional as F

Batch = dict[str, torch.Tensor]  # input_ids (B, T), labels (B, T), reset (B, K) bool
IGNORE = -100  # label of positions without a loss (padding, unsupervised task tokens)


class StatefulBatches(Protocol):
    """The training loader as the trainer sees it (built by `data_pipeline.loaders`)."""

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


def masked_like(template: Optional[Batch]) -> Batch:
    """A batch shaped like `template` with no loss-bearing token: what a rank whose validation
    stream ended feeds, so that every rank runs the same number of forwards."""
    if template is None:
        raise RuntimeError("validation produced no batch on this rank; the validation split is empty")
    out = {k: v.clone() for k, v in template.items()}
    out["labels"].fill_(IGNORE)
    out["reset"].fill_(True)
    return out


def val_result(sums: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
    """Validation loss, perplexity and loss by segment index from per-segment (K,) loss sums and
    token counts over the whole validation batch."""
    loss = float(sums.sum() / counts.sum().clamp(min=1))
    result = {"val/loss": loss, "val/ppl": math.exp(min(loss, 30.0))}
    for k in range(len(sums)):
        if counts[k] > 0:
            result[f"val/loss_segment_{k + 1}"] = float(sums[k] / counts[k])
    return result
