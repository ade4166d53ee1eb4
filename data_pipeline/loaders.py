"""Build the loaders a training run reads, from the `data:` section of its config.

The factory `launch/train.py` calls: it takes the data section and this replica's share of the
global batch (`ReplicaShare`), never the whole run config, and imports nothing of `memgpt_dist`
(the two packages are wired together in `launch/`). A replica's streams are chosen by the
data-parallel rank and degree, so the TP and pipeline ranks of one replica read the same batches.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from data_pipeline.bpe_tokenizer import file_sha256
from data_pipeline.errors import DataError
from data_pipeline.remote import fetch_tokenizer, parse_location, read_corpus_file
from data_pipeline.segment_stream import MixedLoader, SegmentLoader


@dataclass(frozen=True)
class ReplicaShare:
    """What one data-parallel replica reads: its rank among `dp_size` replicas, the samples per
    micro-batch (its streams) and the model's segment length."""

    dp_rank: int
    dp_size: int
    micro_batch_size: int
    segment_len: int


def build_loader(data: Any, share: ReplicaShare, split: str, path: Optional[str] = None) -> SegmentLoader:
    """A split of a corpus (`data.path`, or `path`; a directory or a remote location) as this
    replica reads it. `data`: the config's data section."""
    return SegmentLoader(path or data.path, split=split, segment_len=share.segment_len, n_segments=data.n_segments,
                         micro_batch_size=share.micro_batch_size, dp_rank=share.dp_rank, dp_size=share.dp_size,
                         seed=data.seed, num_workers=data.num_workers, max_skip_fraction=data.max_skip_fraction,
                         expected_tokenizer_hash=_tokenizer_hash(data.tokenizer),
                         verify_checksums=data.verify_checksums, cache_dir=data.cache_dir or None,
                         cache_max_gb=data.cache_max_gb, open_retries=data.open_retries,
                         retry_backoff_s=data.retry_backoff_s)


def build_train_loader(data: Any, share: ReplicaShare):
    """The training loader: one corpus, or a weighted blend of data.path and data.mix."""
    sources = data.mix_sources()
    if len(sources) == 1:
        return build_loader(data, share, "train")
    return MixedLoader([build_loader(data, share, "train", p) for p, _ in sources], [w for _, w in sources],
                       data.seed)


def check_vocab(data_vocab: int, model_vocab: int) -> None:
    """The shards' tokenizer must fit the model's embedding."""
    if data_vocab > model_vocab:
        raise DataError(f"the shards' tokenizer has {data_vocab} tokens but model.vocab_size={model_vocab}; "
                        f"set model.vocab_size >= {data_vocab}")


def corpus_tokenizer(data: Any, run_dir: Path) -> Path:
    """The tokenizer file the corpus `data.path` was tokenized with (the resume check compares
    its hash with the checkpoint's). A remote corpus's is fetched, checked against its manifest,
    into the run directory (a file of ours: `corpus-tokenizer.json`)."""
    if not parse_location(data.path).is_remote:
        return Path(data.path) / "tokenizer.json"
    target = Path(run_dir) / "corpus-tokenizer.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")  # every rank writes the same bytes
    tmp.write_bytes(fetch_tokenizer(data.path))
    os.replace(tmp, target)
    return target


def corpus_fingerprint(data: Any) -> str:
    """A digest of the manifests of every corpus the run reads (they hold each shard's sha256),
    local or remote: ranks that would read other data differ here."""
    h = hashlib.sha256()
    for path, _ in data.mix_sources():
        try:
            h.update(read_corpus_file(path, "manifest.json"))
        except DataError as exc:
            h.update(f"unreadable {path}: {exc}".encode())
    return h.hexdigest()[:16]


def _tokenizer_hash(path: str) -> Optional[str]:
    return file_sha256(Path(path) / "tokenizer.json" if Path(path).is_dir() else path) if path else None
