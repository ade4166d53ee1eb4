"""Console and TensorBoard logging from the rank that owns the loss.

Every scalar is written twice: against the optimizer step (`train/loss`) and against tokens
seen (`by_tokens/train/loss`). On resume the writer purges events at or after the resumed step,
so TensorBoard shows one continuous run without duplicated or reset steps.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

log = logging.getLogger("memgpt_dist")


class MetricsLogger:
    """Writes scalars to TensorBoard (if enabled and this is the logging rank) and the console."""

    def __init__(self, log_dir: Path, enabled: bool, tensorboard: bool, start_step: int = 0,
                 jsonl: Path | None = None):
        self.enabled = enabled
        self.writer = None
        self.jsonl = jsonl if enabled else None
        if self.jsonl is not None:
            _truncate_after(self.jsonl, start_step)
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1 if start_step else None)

    def scalars(self, values: dict[str, float], step: int, tokens: Optional[int] = None) -> None:
        if self.jsonl is not None:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps({"step": step, "tokens": tokens, **values}) + "\n")
        if not self.enabled or self.writer is None:
            return
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
            if tokens is not None:
                self.writer.add_scalar(f"by_tokens/{key}", value, tokens)

    def line(self, text: str) -> None:
        if self.enabled:
            log.info(text)

    def warning(self, text: str) -> None:
        if self.enabled:
            log.warning(text)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _truncate_after(path: Path, step: int) -> None:
    """Drop records of steps after `step` (left by a run that died after its last checkpoint),
    and a last line torn by a kill in the middle of its write."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if _record_step(line) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _record_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")
