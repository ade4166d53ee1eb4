"""The documents `memgpt-eval` scores a model on: fresh task documents and long held-out ones.

Data only (numpy and torch tensors); `memgpt_dist.evaluate` scores the model on them and
`launch/eval.py` wires the two together.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from data_pipeline.errors import DataError
from data_pipeline.prepare_corpus import read_manifest
from data_pipeline.segment_stream import read_shard
from data_pipeline.tasks import TaskSpec, generate, vocab_from_tokenizer

EVAL_STREAM = 2  # task split index for evaluation documents (train 0, validation 1)


def task_spec_of(data_dir: Path) -> Optional[TaskSpec]:
    """The task a prepared corpus was generated for (None for a text corpus)."""
    t = read_manifest(data_dir).get("task")
    if t is None:
        return None
    return TaskSpec(**{k: t[k] for k in TaskSpec.__dataclass_fields__})


def task_batches(spec: TaskSpec, tokenizer, n_docs: int, seed: int, batch: int, gap: Optional[int] = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (input_ids (b, S*N), answer mask (b, S*N)) of evaluation documents (a random
    stream no training split uses), with `gap` filler segments if given."""
    if gap is not None:
        spec = replace(spec, gap=gap)
    docs = list(generate(spec, vocab_from_tokenizer(tokenizer, spec), n_docs, seed, EVAL_STREAM))
    for i in range(0, n_docs, batch):
        ids = torch.from_numpy(np.stack([d[0] for d in docs[i:i + batch]]))  # (b, S*N)
        mask = torch.from_numpy(np.stack([d[1] for d in docs[i:i + batch]])).bool()  # (b, S*N)
        yield ids, mask


def long_documents(data_dir: Path, split: str, min_tokens: int, limit: int) -> list[np.ndarray]:
    """Up to `limit` documents of a prepared corpus with at least `min_tokens` tokens, in order."""
    m = read_manifest(data_dir)
    out: list[np.ndarray] = []
    for s in m["splits"][split]:
        docs = read_shard(str(Path(data_dir) / s["file"]), m["dtype"], s["documents"], None)
        out.extend(t for t in docs.tokens if len(t) >= min_tokens)
        if len(out) >= limit:
            break
    return out[:limit]


def corpus_eval_documents(data_dir: Path, n_segments: int, segment_len: int, limit: int) -> list[np.ndarray]:
    """Held-out documents of at least n_segments * segment_len + 1 tokens, or a DataError."""
    T = n_segments * segment_len
    docs = long_documents(data_dir, "validation", T + 1, limit)
    if not docs:
        raise DataError(f"no validation document of {data_dir} has {T + 1} tokens; lower --segments")
    return docs


def task_for_model(data_dir: Path, spec: TaskSpec, segment_len: int):
    """The task corpus's tokenizer, once its segment length is checked against the model's."""
    from tokenizers import Tokenizer

    if spec.segment_len != segment_len:
        raise DataError(f"the task in {data_dir} has segment_len {spec.segment_len} but the model {segment_len}; "
                        f"prepare the task with --segment-len {segment_len}")
    return Tokenizer.from_file(str(Path(data_dir) / "tokenizer.json"))
