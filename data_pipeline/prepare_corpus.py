"""`memgpt-prepare`: documents -> dedup -> train/validation split -> BPE -> WebDataset shards + manifest.

Output directory:
    tokenizer.json
    train-000000.tar ...   one sample per document: __key__ "doc%09d", ids.u16|ids.u32, source.txt
    val-000000.tar ...
    manifest.json          written last (atomically): a directory without it is not a corpus
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import webdataset as wds

from data_pipeline.bpe_tokenizer import (encode_all, file_sha256, load_tokenizer, special_ids, token_dtype,
                                         train_bpe)
from data_pipeline.corpus_sources import iter_documents
from data_pipeline.errors import DataError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SPLITS = {"train": "train", "validation": "val"}


@dataclass(frozen=True)
class PrepareConfig:
    """Options of one `memgpt-prepare` run."""

    out: Path
    inputs: tuple[str, ...] = ()
    text_field: str = "text"
    format: Optional[str] = None
    tokenizer: Optional[Path] = None  # None: train a byte-level BPE
    vocab_size: int = 4096
    val_fraction: float = 0.02
    shard_max_mb: float = 64.0
    min_shards: int = 64  # train shards at least (validation: at least min(4, docs))
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_docs: Optional[int] = None
    overwrite: bool = False
    seed: int = 0


@dataclass
class Document:
    doc_id: int
    source: str
    text: str


def collect_documents(cfg: PrepareConfig) -> tuple[list[Document], int]:
    """Non-empty documents with exact duplicates dropped (at most `max_docs` kept); returns
    (documents, duplicates)."""
    seen: set[bytes] = set()
    docs, dupes = [], 0
    for source, text in iter_documents(list(cfg.inputs), cfg.text_field, cfg.format):
        if cfg.max_docs is not None and len(docs) >= cfg.max_docs:
            break
        if not text.strip():
            continue
        digest = hashlib.sha1(text.encode("utf-8")).digest()
        if digest in seen:
            dupes += 1
            continue
        seen.add(digest)
        docs.append(Document(len(docs), source, text))
    if not docs:
        where = ", ".join(cfg.inputs) or "the default corpus"
        raise DataError(f"no non-empty documents found in {where}; check the path, --format and --text-field")
    return docs, dupes


def split_documents(docs: list[Document], val_fraction: float, seed: int) -> dict[str, list[Document]]:
    """Deterministic split by a hash of the text: a document lands in the same split every time."""
    def u(d: Document) -> float:
        h = hashlib.sha1(f"{seed}:{d.text}".encode("utf-8")).digest()
        return int.from_bytes(h[:8], "big") / 2**64

    val = [d for d in docs if u(d) < val_fraction]
    if not val and len(docs) >= 2 and val_fraction > 0:
        val = [min(docs, key=u)]
    val_ids = {d.doc_id for d in val}
    return {"train": [d for d in docs if d.doc_id not in val_ids], "validation": val}


def shard_limits(n_docs: int, total_bytes: int, min_shards: int, shard_max_mb: float) -> tuple[int, int]:
    """(maxcount, maxsize) for ShardWriter so a split gets >= min_shards shards when it can."""
    target = max(1, min(min_shards, n_docs))
    maxcount = max(1, n_docs // target)  # floor: at least `target` shards
    maxsize = int(min(shard_max_mb * 2**20, max(total_bytes / target, 1)))
    return maxcount, max(maxsize, 1)


def write_split(out: Path, prefix: str, docs: list[Document], encoded: list[bytes], suffix: str,
                min_shards: int, shard_max_mb: float, masks: Optional[list[bytes]] = None) -> list[dict]:
    """Write one split's shards; returns their manifest entries. `masks` (one uint8 byte per
    token, 1 = supervised) restricts the loss to those tokens, for task corpora."""
    maxcount, maxsize = shard_limits(len(docs), sum(len(e) for e in encoded) + 1024 * len(docs), min_shards,
                                     shard_max_mb)
    itemsize = 2 if suffix == "u16" else 4
    stats: dict[str, dict] = {}
    writer = wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=maxcount, maxsize=maxsize, verbose=0)
    try:
        for i, (doc, ids) in enumerate(zip(docs, encoded)):
            sample = {"__key__": f"doc{doc.doc_id:09d}", f"ids.{suffix}": ids, "source.txt": doc.source}
            if masks is not None:
                sample["mask.u8"] = masks[i]
            writer.write(sample)
            entry = stats.setdefault(Path(writer.fname).name, {"documents": 0, "tokens": 0})
            entry["documents"] += 1
            entry["tokens"] += len(ids) // itemsize
    finally:
        writer.close()
    return [{"file": name, **s, "sha256": file_sha256(out / name)} for name, s in sorted(stats.items())]


def prepare_output_dir(cfg: PrepareConfig) -> None:
    out = cfg.out
    if out.exists() and any(out.iterdir()):
        if not (out / MANIFEST).exists() and not cfg.overwrite:
            raise DataError(f"{out} is not empty and holds no corpus; choose an empty --out or pass --overwrite")
        if not cfg.overwrite:
            raise DataError(f"{out} already holds a prepared corpus ({out / MANIFEST}); pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def prepare(cfg: PrepareConfig) -> dict:
    """Run the whole prepare step; returns the manifest (also written to OUT/manifest.json)."""
    t0 = time.time()
    docs, dupes = collect_documents(cfg)
    splits = split_documents(docs, cfg.val_fraction, cfg.seed)
    prepare_output_dir(cfg)
    tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else train_bpe((d.text for d in splits["train"]),
                                                                        cfg.vocab_size)
    tok.save(str(cfg.out / "tokenizer.json"))
    eos, pad = special_ids(tok)
    vocab = tok.get_vocab_size()
    suffix = "u16" if token_dtype(vocab).itemsize == 2 else "u32"
    shards = {}
    for split, prefix in SPLITS.items():
        encoded = list(encode_all(tok, [d.text for d in splits[split]], cfg.workers))
        min_shards = cfg.min_shards if split == "train" else min(4, cfg.min_shards)
        shards[split] = write_split(cfg.out, prefix, splits[split], encoded, suffix, min_shards, cfg.shard_max_mb)
    manifest = build_manifest(cfg, shards, dupes, vocab, eos, pad, suffix, time.time() - t0)
    _atomic_write_json(cfg.out / MANIFEST, manifest)
    return manifest


def build_manifest(cfg: PrepareConfig, shards: dict, dupes: int, vocab: int, eos: int, pad: int,
                   suffix: str, seconds: float) -> dict:
    totals = {split: {"shards": len(s), "documents": sum(x["documents"] for x in s),
                      "tokens": sum(x["tokens"] for x in s)} for split, s in shards.items()}
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": {"file": "tokenizer.json", "sha256": file_sha256(cfg.out / "tokenizer.json"),
                      "vocab_size": vocab, "eos_id": eos, "pad_id": pad, "trained": cfg.tokenizer is None},
        "dtype": suffix,
        "splits": shards,
        "totals": totals,
        "duplicates_dropped": dupes,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "inputs": list(cfg.inputs) or ["<default: python stdlib sources>"],
        "command": sys.argv,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(seconds, 1),
    }


def _atomic_write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def read_manifest(data_dir: str | Path) -> dict:
    """The manifest of a prepared corpus, or a DataError that says how to make one."""
    path = Path(data_dir) / MANIFEST
    if not Path(data_dir).is_dir():
        raise DataError(f"data directory {data_dir} does not exist; run memgpt-prepare --out {data_dir} first")
    if not path.is_file():
        raise DataError(f"{path} is missing: {data_dir} is not a prepared corpus (or its prepare step did not "
                        f"finish); run memgpt-prepare --out {data_dir}")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); re-run memgpt-prepare --out {data_dir} --overwrite") from exc
