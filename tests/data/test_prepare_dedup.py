"""The on-disk exact dedup: every repeat found, the first occurrence kept, across tasks and
partitions, with buffers far smaller than the input."""
from __future__ import annotations

import hashlib
import random

import numpy as np

from data_pipeline.dedup import PartitionWriter, iter_duplicates, split_position


def test_every_repeat_is_found_and_the_first_occurrence_kept(tmp_path):
    rng = random.Random(0)
    tasks = [[f"text {rng.randrange(400)}" for _ in range(700)] for _ in range(3)]
    for t, texts in enumerate(tasks):
        w = PartitionWriter(tmp_path, t, n_partitions=7, buffer_records=16)
        for i, text in enumerate(texts):
            w.add(hashlib.sha1(text.encode()).digest(), i)
        w.flush()
    seen, want = set(), set()
    for t, texts in enumerate(tasks):  # what one set in memory would drop, in corpus order
        for i, text in enumerate(texts):
            (want.add((t, i)) if text in seen else seen.add(text))
    dup = np.concatenate(list(iter_duplicates(tmp_path, 3, 7)))
    task, ordinal = split_position(dup)
    assert set(zip(task.tolist(), ordinal.tolist())) == want and len(dup) == len(want)
    assert len(list(tmp_path.glob("part-*.bin"))) == 3 * 7


def test_a_rerun_starts_its_partitions_afresh(tmp_path):
    for _ in range(2):  # a task killed after writing, then run again
        w = PartitionWriter(tmp_path, 0, n_partitions=2)
        for i in range(5):
            w.add(hashlib.sha1(b"same").digest(), i)
        w.flush()
    assert len(np.concatenate(list(iter_duplicates(tmp_path, 1, 2)))) == 4
