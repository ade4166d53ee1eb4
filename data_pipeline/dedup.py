"""Exact deduplication in bounded memory: document digests go to hash-partition files on disk,
and duplicates are found one partition at a time.

A document is a duplicate when an earlier document (a lower *position*) has the same digest;
the first occurrence is kept. Positions are global and ordered like the corpus: a task of a
Slurm array numbers its documents `task << 40 | ordinal`, so the partitions of all tasks together
resolve duplicates across tasks exactly as one machine would. Memory: one write buffer while
scanning, one partition (1/n_partitions of the digests) while resolving.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from data_pipeline.errors import DataError

RECORD = np.dtype([("digest", "S20"), ("pos", "<u8")])  # sha1 digest, global position
TASK_SHIFT = 40  # position = task << TASK_SHIFT | ordinal: 2**40 documents per task


def global_position(task: int, ordinal: int) -> int:
    return task << TASK_SHIFT | ordinal


def split_position(pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(task, ordinal) of global positions."""
    pos = pos.astype(np.uint64)
    return (pos >> np.uint64(TASK_SHIFT)).astype(np.int64), (pos & np.uint64((1 << TASK_SHIFT) - 1)).astype(np.int64)


class PartitionWriter:
    """Appends (digest, position) records to `root/part-TTTT-PP.bin`, one file per partition
    (chosen by the digest's first byte), through a fixed-size buffer."""

    def __init__(self, root: Path, task: int, n_partitions: int, buffer_records: int = 1 << 16):
        if not 1 <= n_partitions <= 256:
            raise DataError(f"--partitions {n_partitions} must be in 1..256 "
                            f"(a partition is chosen by a digest's first byte)")
        self.root, self.task, self.n = Path(root), task, n_partitions
        self.buf = np.zeros(buffer_records, RECORD)
        self.used = 0
        self.root.mkdir(parents=True, exist_ok=True)
        for p in range(self.n):  # truncate: a rerun of a killed task starts its files afresh
            self.path(p).write_bytes(b"")

    def path(self, partition: int) -> Path:
        return partition_path(self.root, self.task, partition)

    def add(self, digest: bytes, ordinal: int) -> None:
        self.buf[self.used] = (digest, global_position(self.task, ordinal))
        self.used += 1
        if self.used == len(self.buf):
            self.flush()

    def flush(self) -> None:
        recs = self.buf[:self.used]
        first_byte = np.frombuffer(recs.tobytes(), np.uint8).reshape(len(recs), RECORD.itemsize)[:, 0]
        part = first_byte.astype(np.int64) * self.n // 256
        for p in np.unique(part):
            with open(self.path(int(p)), "ab") as f:
                recs[part == p].tofile(f)
        self.used = 0


def partition_path(root: Path, task: int, partition: int) -> Path:
    return Path(root) / f"part-{task:04d}-{partition:02x}.bin"


def duplicates_in_partition(files: list[Path]) -> np.ndarray:
    """Global positions of the duplicates among the records of one partition (of every task)."""
    recs = np.concatenate([np.fromfile(f, RECORD) for f in files]) if files else np.zeros(0, RECORD)
    if len(recs) == 0:
        return np.zeros(0, np.uint64)
    recs = recs[np.argsort(recs, order=("digest", "pos"), kind="stable")]
    repeat = np.zeros(len(recs), bool)
    repeat[1:] = recs["digest"][1:] == recs["digest"][:-1]  # same digest as the one before: not the first
    return recs["pos"][repeat]


def iter_duplicates(root: Path, n_tasks: int, n_partitions: int) -> Iterator[np.ndarray]:
    """Duplicate positions, one partition at a time."""
    for p in range(n_partitions):
        yield duplicates_in_partition([partition_path(root, t, p) for t in range(n_tasks)])
