"""Prepare a corpus: `memgpt-prepare [INPUT ...] --out DIR [--vocab-size 4096 | --tokenizer tokenizer.json]`.

With no INPUT, the embedded default corpus (the Python standard library's sources) is used.
With --task recall|passkey, a synthetic long-range task corpus is generated instead:
    memgpt-prepare --task recall --out data/recall --segment-len 32 --gap 2 --pairs 8
On Slurm, `python launch/slurm/submit.py prepare --tasks N -- INPUT ... --out DIR` runs it as a job
array; each array task calls this with --stage STAGE --array-task I --array-tasks N.
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
    p.add_argument("--workers", type=int, default=int(os.environ.get("SLURM_CPUS_PER_TASK") or os.cpu_count() or 1),
                   help="tokenizer processes (default: the CPUs Slurm gave the task, else every core)")
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
    a = p.parse_args(argv)
    if a.task and a.inputs:
        p.error("give INPUT paths or --task, not both")
    return a


def main(argv=None) -> int:
    from data_pipeline.errors import DataError
    from data_pipeline.prepare_corpus import prepare

    a = parse_args(sys.argv[1:] if argv is None else argv)
    if a.task:
        return _task(a)
    from data_pipeline.prepare_array import run_stage
    from data_pipeline.prepare_corpus import summary_lines

    cfg = config_from_args(a)
    try:
        m = run_stage(cfg, a.stage, a.array_task, a.array_tasks) if a.stage else prepare(cfg)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if m is None or a.stage not in (None, "merge"):
        print(f"{a.stage} task {a.array_task}/{a.array_tasks}: " + ("done" if m else "the corpus is complete already"))
        return 0
    lines = summary_lines(m, cfg)
    print("\n".join(line for line in lines if not line.startswith("warning:")))
    for line in lines:
        if line.startswith("warning:"):
            print(line, file=sys.stderr)
    return 0


def config_from_args(a):
    """The PrepareConfig of parsed `memgpt-prepare` arguments (also used by submit.py prepare)."""
    from data_pipeline.prepare_corpus import PrepareConfig

    return PrepareConfig(out=Path(a.out), inputs=tuple(a.inputs), text_field=a.text_field, format=a.format,
                         tokenizer=a.tokenizer, vocab_size=a.vocab_size, val_fraction=a.val_fraction,
                         shard_max_mb=a.shard_max_mb, min_shards=a.min_shards, workers=a.workers,
                         max_docs=a.max_docs, overwrite=a.overwrite, seed=a.seed,
                         tokenizer_sample_mb=a.tokenizer_sample, partitions=a.partitions,
                         jsonl_slice_mb=a.jsonl_slice_mb, scrub=a.scrub, encoding=a.encoding,
                         on_decode_error=a.on_decode_error)


def _task(a) -> int:
    from data_pipeline.errors import DataError
    from data_pipeline.prepare_tasks import prepare_task
    from data_pipeline.tasks import TaskSpec

    spec = TaskSpec(kind=a.task, segment_len=a.segment_len, gap=a.gap, pairs=a.pairs, digits=a.digits)
    try:
        m = prepare_task(Path(a.out), spec, a.task_docs, a.task_val_docs, seed=a.seed, tokenizer=a.tokenizer,
                         filler_corpus=a.filler_corpus, min_shards=a.min_shards, overwrite=a.overwrite)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{a.task}: {m['totals']['train']['documents']:,} train / {m['totals']['validation']['documents']:,} "
          f"validation documents of {spec.n_segments} segments x {spec.segment_len} tokens, chance per answer token "
          f"{spec.chance:.4f} -> {a.out}/manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
