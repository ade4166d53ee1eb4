"""Synthetic task corpora: layout, determinism, supervision masks through the loader."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.errors import DataError
from data_pipeline.prepare_tasks import prepare_task, task_tokenizer
from data_pipeline.segment_stream import IGNORE, SegmentLoader
from data_pipeline.tasks import TaskSpec, generate, vocab_from_tokenizer
from helpers import bin_path, run_cmd

N = 16


def docs(spec: TaskSpec, n: int = 20, seed: int = 0, split: int = 0):
    return list(generate(spec, vocab_from_tokenizer(task_tokenizer(spec), spec), n, seed, split))


def test_recall_layout_fact_then_query_with_the_same_pairs():
    spec = TaskSpec("recall", segment_len=N, gap=3, pairs=4)
    for ids, mask in docs(spec):
        assert ids.shape == mask.shape == (spec.n_segments * N,)
        fact = dict(zip(ids[0:8:2].tolist(), ids[1:8:2].tolist()))
        q = (spec.n_segments - 1) * N
        query = dict(zip(ids[q:q + 8:2].tolist(), ids[q + 1:q + 8:2].tolist()))
        assert fact == query and len(fact) == 4  # distinct keys, same values, new order
        assert np.flatnonzero(mask).tolist() == list(range(q + 1, q + 8, 2))  # only the values


def test_passkey_states_the_digits_once_and_asks_at_the_end():
    spec = TaskSpec("passkey", segment_len=N, gap=2, digits=5)
    vocab = vocab_from_tokenizer(task_tokenizer(spec), spec)
    for ids, mask in docs(spec):
        answer = ids[mask == 1]
        assert len(answer) == 5 and np.isin(answer, vocab.digits).all()
        at = int(np.flatnonzero(ids[:N] == vocab.marker)[0])
        assert np.array_equal(ids[at + 1:at + 6], answer)  # stated in the first segment
        assert mask[:-5].sum() == 0


def test_generation_is_deterministic_and_splits_differ():
    spec = TaskSpec("recall", segment_len=N, gap=1, pairs=4)
    a, b, c = docs(spec), docs(spec), docs(spec, split=1)
    assert all(np.array_equal(x[0], y[0]) for x, y in zip(a, b))
    assert not any(np.array_equal(x[0], y[0]) for x, y in zip(a, c))


def test_bad_task_specs_name_the_setting():
    with pytest.raises(DataError, match="pairs"):
        TaskSpec("recall", segment_len=8, pairs=8).validate()
    with pytest.raises(DataError, match="use one of"):
        TaskSpec("sorting").validate()


def test_task_corpus_trains_only_on_answers(tmp_path):
    spec = TaskSpec("recall", segment_len=N, gap=2, pairs=4)
    m = prepare_task(tmp_path / "t", spec, n_train=64, n_val=8, min_shards=4)
    assert m["task"]["kind"] == "recall" and m["totals"]["train"]["documents"] == 64
    ld = SegmentLoader(tmp_path / "t", segment_len=N, n_segments=spec.n_segments, micro_batch_size=2)
    b = next(ld)
    labels = b["labels"].view(2, spec.n_segments, N)  # (mb, K, N)
    assert (labels[:, :-1] == IGNORE).all()  # nothing supervised before the query segment
    assert ((labels[:, -1] != IGNORE).sum(dim=1) == 4).all()  # the 4 values
    ids = b["input_ids"].view(2, spec.n_segments, N)
    fact = {int(k): int(v) for k, v in zip(ids[0, 0, 0:8:2], ids[0, 0, 1:8:2])}
    keys_at = torch.nonzero(labels[0, -1] != IGNORE).flatten()  # label at t is the value after key t
    assert all(fact[int(ids[0, -1, t])] == int(labels[0, -1, t]) for t in keys_at)
    assert b["reset"][:, 0].all() and not b["reset"][:, 1:].any()


def test_prepare_cli_makes_a_task_corpus(tmp_path):
    proc = run_cmd([bin_path("memgpt-prepare"), "--task", "passkey", "--out", str(tmp_path / "p"), "--task-docs", "40",
                    "--task-val-docs", "8", "--min-shards", "4", "--segment-len", "16", "--gap", "1"])
    assert "passkey: 40 train / 8 validation documents of 3 segments x 16 tokens" in proc.stdout
    bad = run_cmd([bin_path("memgpt-prepare"), "--task", "recall", "--out", str(tmp_path / "r"), "--segment-len", "8"],
                  check=False)
    assert bad.returncode == 2 and "pairs" in bad.stderr


def test_task_with_a_real_tokenizer_uses_real_filler_text(corpus, tmp_path):
    """Mixable task data: the corpus's own tokenizer, filler windows of its real text."""
    from data_pipeline.prepare_corpus import read_manifest

    spec = TaskSpec("passkey", segment_len=N, gap=2, digits=5)
    m = prepare_task(tmp_path / "pk", spec, n_train=16, n_val=4, min_shards=2, tokenizer=corpus / "tokenizer.json",
                     filler_corpus=corpus)
    assert m["tokenizer"]["sha256"] == read_manifest(corpus)["tokenizer"]["sha256"]
    assert m["task"]["filler"] == str(corpus)
    ld = SegmentLoader(tmp_path / "pk", segment_len=N, n_segments=spec.n_segments, micro_batch_size=1)
    ids = next(ld)["input_ids"][0]
    real = np.concatenate([t for t in read_shard_tokens(corpus)])
    window = ids[N:2 * N].numpy()  # a whole filler segment: a window of the corpus's token stream
    assert any(np.array_equal(real[i:i + N], window) for i in np.flatnonzero(real == window[0]))


def read_shard_tokens(data):
    from data_pipeline.prepare_corpus import read_manifest
    from data_pipeline.segment_stream import read_shard

    m = read_manifest(data)
    for s in m["splits"]["train"]:
        yield from read_shard(str(data / s["file"]), m["dtype"], s["documents"], None).tokens
