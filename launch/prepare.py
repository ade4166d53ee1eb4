"""Prepare a corpus: `memgpt-prepare [INPUT ...] --out DIR [--vocab-size 4096 | --tokenizer tokenizer.json]`.

With no INPUT, the embedded default corpus (the Python standard library's sources) is used.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="text directories, .jsonl, json/parquet/text files, save_to_disk dirs")
    p.add_argument("--out", required=True, help="output directory for shards, tokenizer and manifest")
    p.add_argument("--text-field", default="text")
    p.add_argument("--format", choices=["json", "parquet", "text", "csv"], default=None)
    p.add_argument("--tokenizer", type=Path, default=None, help="use this tokenizer.json / HF tokenizer dir")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size when training one")
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--shard-max-mb", type=float, default=64.0)
    p.add_argument("--min-shards", type=int, default=64, help="at least this many train shards (small corpora)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    p.add_argument("--max-docs", type=int, default=None, help="keep at most this many documents (after dedup)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from data_pipeline.errors import DataError
    from data_pipeline.prepare_corpus import PrepareConfig, prepare

    a = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = PrepareConfig(out=Path(a.out), inputs=tuple(a.inputs), text_field=a.text_field, format=a.format,
                        tokenizer=a.tokenizer, vocab_size=a.vocab_size, val_fraction=a.val_fraction,
                        shard_max_mb=a.shard_max_mb, min_shards=a.min_shards, workers=a.workers,
                        max_docs=a.max_docs, overwrite=a.overwrite, seed=a.seed)
    try:
        m = prepare(cfg)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for split, t in m["totals"].items():
        print(f"{split}: {t['documents']:,} documents, {t['tokens']:,} tokens, {t['shards']} shards")
    print(f"vocab {m['tokenizer']['vocab_size']}, {m['duplicates_dropped']} duplicates dropped, "
          f"{m['seconds']}s -> {a.out}/manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
