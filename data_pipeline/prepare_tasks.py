"""`memgpt-prepare --task recall|passkey`: synthetic long-range task corpora as ordinary shards.

The output directory looks like any prepared corpus (tokenizer.json, train/val shards, manifest)
and every sample also carries `mask.u8`, so the loader supervises only the answers. Without
`--tokenizer` the corpus gets its own word-level tokenizer (a vocabulary of about a hundred
tokens, for tiny models); with one (e.g. a real corpus's), task tokens are drawn from it and
filler is real text from `--filler-corpus`, so the task mixes with that corpus.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers

from data_pipeline.bpe_tokenizer import EOS_TOKEN, PAD_TOKEN, load_tokenizer, special_ids, token_dtype
from data_pipeline.prepare_corpus import (MANIFEST, Document, PrepareConfig, _atomic_write_json, build_manifest,
                                          prepare_output_dir, read_manifest, write_split)
from data_pipeline.segment_stream import read_shard
from data_pipeline.tasks import TaskSpec, generate, own_vocab_tokens, vocab_from_tokenizer


def task_tokenizer(spec: TaskSpec) -> Tokenizer:
    """A word-level tokenizer over the task's own vocabulary: EOS 0, PAD 1, then the task words."""
    vocab = {t: i for i, t in enumerate([EOS_TOKEN, PAD_TOKEN, *own_vocab_tokens(spec)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOS_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def filler_tokens(corpus: Optional[Path], limit: int = 2_000_000) -> Optional[np.ndarray]:
    """Up to `limit` tokens of a prepared corpus's train split, concatenated, as filler text."""
    if corpus is None:
        return None
    m = read_manifest(corpus)
    parts, total = [], 0
    for s in m["splits"]["train"]:
        docs = read_shard(str(corpus / s["file"]), m["dtype"], s["documents"], None)
        for t in docs.tokens:
            parts.append(t)
            total += len(t)
        if total >= limit:
            break
    return np.concatenate(parts)[:limit]


def prepare_task(out: Path, spec: TaskSpec, n_train: int, n_val: int, seed: int = 0,
                 tokenizer: Optional[Path] = None, filler_corpus: Optional[Path] = None,
                 min_shards: int = 64, overwrite: bool = False) -> dict:
    """Write a task corpus to `out`; returns its manifest."""
    t0 = time.time()
    spec.validate()
    cfg = PrepareConfig(out=out, inputs=(f"<task:{spec.kind}>",), tokenizer=tokenizer, val_fraction=0.0,
                        min_shards=min_shards, overwrite=overwrite, seed=seed)
    prepare_output_dir(cfg)
    tok = load_tokenizer(tokenizer) if tokenizer else task_tokenizer(spec)
    tok.save(str(out / "tokenizer.json"))
    vocab, filler = vocab_from_tokenizer(tok, spec), filler_tokens(filler_corpus)
    eos, pad = special_ids(tok)
    dtype = token_dtype(tok.get_vocab_size())
    suffix = "u16" if dtype.itemsize == 2 else "u32"
    shards = {}
    for split, (prefix, n, stream) in {"train": ("train", n_train, 0), "validation": ("val", n_val, 1)}.items():
        encoded, masks, docs = [], [], []
        for i, (ids, mask) in enumerate(generate(spec, vocab, n, seed, stream, filler)):
            encoded.append(np.append(ids, eos).astype(dtype).tobytes())
            masks.append(np.append(mask, 0).astype(np.uint8).tobytes())
            docs.append(Document(i, f"task:{spec.kind}#{stream}.{i}", ""))
        shards[split] = write_split(out, prefix, docs, encoded, suffix,
                                    min_shards if split == "train" else min(4, min_shards), 64.0, masks)
    manifest = build_manifest(cfg, shards, 0, tok.get_vocab_size(), eos, pad, suffix, time.time() - t0)
    manifest["task"] = {**asdict(spec), "seed": seed, "chance": spec.chance,
                        "filler": str(filler_corpus) if filler_corpus else "random"}
    _atomic_write_json(out / MANIFEST, manifest)
    return manifest


def prepare_task_from_args(a) -> str:
    """`memgpt-prepare --task ...`: generate the task corpus from parsed arguments; its summary line."""
    from data_pipeline.tasks import TaskSpec

    spec = TaskSpec(kind=a.task, segment_len=a.segment_len, gap=a.gap, pairs=a.pairs, digits=a.digits)
    m = prepare_task(Path(a.out), spec, a.task_docs, a.task_val_docs, seed=a.seed, tokenizer=a.tokenizer,
                     filler_corpus=a.filler_corpus, min_shards=a.min_shards, overwrite=a.overwrite)
    return (f"{a.task}: {m['totals']['train']['documents']:,} train / {m['totals']['validation']['documents']:,} "
            f"validation documents of {spec.n_segments} segments x {spec.segment_len} tokens, chance per answer "
            f"token {spec.chance:.4f} -> {a.out}/manifest.json")
