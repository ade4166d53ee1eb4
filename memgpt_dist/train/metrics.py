"""Console and TensorBoard logging from the rank that owns the loss.

Every scalar is written twice: against the optimizer step (`train/loss`) and against tokens
seen (`by_tokens/train/loss`). On resume the writer purges events at or after the resumed step,
so TensorBoard shows one continuous run without duplicated or reset steps.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

log = logging.getLogger("memgpt_dist")


class MetricsLogger:
    """Writes scalars to TensorBoard (if enabled and this is the logging rank) and the console."""

    def __init__(self, log_dir: Path, enabled: bool, tensorboard: bool, start_step: int = 0):
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1 if start_step else None)

    def scalars(self, values: dict[str, float], step: int, tokens: Optional[int] = None) -> None:
        if not self.enabled or self.writer is None:
            return
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
            if tokens is not None:
                self.writer.add_scalar(f"by_tokens/{key}", value, tokens)

    def line(self, text: str) -> None:
        if self.enabled:
            log.info(text)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
