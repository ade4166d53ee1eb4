"""A damaged shard during training: its documents are skipped deterministically, counted in the
metrics and TensorBoard over all ranks, and a resumed run still matches the uninterrupted one."""
from __future__ import annotations

import shutil

from helpers import read_metrics, tiny_args, train

from data_pipeline.prepare_corpus import read_manifest


def truncated_copy(src, dst):
    shutil.copytree(src, dst)
    for entry in read_manifest(dst)["splits"]["train"][:2]:  # the first shard of each of the 2 ranks
        shard = dst / entry["file"]
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    return dst


def test_damaged_shard_is_counted_and_resume_still_matches(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = truncated_copy(tiny_data, tmp_path / "data")
    extra = ["--data.verify_checksums=false", "--data.max_skip_fraction=0.9", "--train.eval_every=0"]
    train(tiny_args(data, tmp_path / "a", *extra), nproc=2)
    train(tiny_args(data, tmp_path / "b", *extra, "--stop-after-steps=3"), nproc=2)
    train(tiny_args(data, tmp_path / "b", *extra, "--resume", "auto"), nproc=2)
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [a[s]["train/loss"] for s in sorted(a)] == [b[s]["train/loss"] for s in sorted(b)]
    skipped = [a[s]["data/skipped_docs"] for s in sorted(a)]
    assert skipped[-1] > 0 and skipped == sorted(skipped)  # a running count over both ranks
    assert [b[s]["data/skipped_docs"] for s in sorted(b)] == skipped  # restored with the loader cursors
    assert 0 < a[max(a)]["data/skipped_fraction"] < 0.9
    acc = EventAccumulator(str(tmp_path / "a" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.value for e in acc.Scalars("data/skipped_docs")] == skipped
