"""The arguments of `memgpt-prepare` (launch/prepare.py parses them; launch/slurm/submit.py too)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path


def build_parser(description: str) -> argparse.ArgumentParser:
    """Every option of `memgpt-prepare`: corpus, tokenizer, shards, hygiene, Slurm array tasks, tasks."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="text directories, .jsonl, json/parquet/text files, save_to_disk dirs")
    p.add_argument("--out", required=True, help="output directory for shards, tokenizer and manifest")
    p.add_argument("--text-field", default="text")
    p.add_argument("--format", choices=["json", "parquet", "text", "csv"], default=None)
    p.add_argument("--tokenizer", type=Path, default=None, help="use this tokenizer.json / HF tokenizer dir")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size when training one")
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--shard-max-mb", type=float, default=64.0)
    p.add_argument("--min-shards", type=int, default=64, help="at least this many train shards (small corpora)")
    p.add_argument("--workers", type=int, default=int(os.environ.get("SLURM_CPUS_PER_TASK") or os.cpu_count() or 1),
                   help="tokenizer threads (default: the CPUs Slurm gave the task, else every core)")
    p.add_argument("--max-docs", type=int, default=None, help="keep at most this many documents (after dedup)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a corpus this tool wrote in --out")
    p.add_argument("--tokenizer-sample", type=float, default=1024.0, metavar="MB",
                   help="train the BPE on at most this much training text, a deterministic sample")
    p.add_argument("--scrub", action=argparse.BooleanOptionalAction, default=False,
                   help="replace secrets and personal data with placeholders (data_pipeline/scrub.py)")
    p.add_argument("--encoding", default="utf-8", help="of text and JSONL files")
    p.add_argument("--on-decode-error", choices=["skip", "replace", "fail"], default="skip",
                   help="a document that does not decode: skip it, replace the bad bytes, or stop (counted, named)")
    p.add_argument("--partitions", type=int, default=16, help="hash partitions of the on-disk exact dedup")
    p.add_argument("--jsonl-slice-mb", type=float, default=256.0, help="Slurm arrays: JSONL slice size")
    s = p.add_argument_group("one task of a Slurm array (launch/slurm/prepare.sbatch)")
    s.add_argument("--stage", choices=["scan", "plan", "encode", "merge"], default=None)
    s.add_argument("--array-task", type=int, default=0, help="this task's index (SLURM_ARRAY_TASK_ID)")
    s.add_argument("--array-tasks", type=int, default=1, help="tasks of the scan and encode arrays")
    t = p.add_argument_group("synthetic tasks (instead of INPUT)")
    t.add_argument("--task", choices=["recall", "passkey"], default=None)
    t.add_argument("--task-docs", type=int, default=20_000, help="train documents")
    t.add_argument("--task-val-docs", type=int, default=512)
    t.add_argument("--segment-len", type=int, default=32, help="must equal model.segment_len when training")
    t.add_argument("--gap", type=int, default=2, help="filler segments between fact and question")
    t.add_argument("--pairs", type=int, default=8, help="recall: key-value pairs")
    t.add_argument("--digits", type=int, default=5, help="passkey: digits")
    t.add_argument("--filler-corpus", type=Path, default=None, help="prepared corpus whose text is the filler "
                   "(use its tokenizer with --tokenizer)")
    return p
