"""Long-range evaluation: `memgpt-eval --checkpoint RUN_DIR [RUN_DIR ...] [--json results.json]`.

For each run, with the memory read on and switched off at evaluation time, side by side:
- on a task corpus (made by `memgpt-prepare --task`): accuracy at 1, 3, 7, 15, 31 filler
  segments between fact and question;
- on a text corpus: next-token loss by segment index over long held-out documents;
- with --streaming 2048,8192,32768,65536: tokens/s and peak memory reading documents of those
  lengths segment by segment, next to a full-causal-attention model of the same size.
The data is the run's own (data.path) unless --data names another prepared corpus.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import asdict
from pathlib import Path


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", required=True, help="run directories (newest checkpoint) or step dirs")
    p.add_argument("--data", type=Path, default=None, help="task or text corpus to evaluate on "
                   "(default: each run's data.path)")
    p.add_argument("--segments", type=int, default=16, help="text corpus: segments per document")
    p.add_argument("--corpus-docs", type=int, default=32, help="text corpus: held-out documents")
    p.add_argument("--gaps", default="1,3,7,15,31", help="filler segments between fact and question")
    p.add_argument("--docs", type=int, default=256, help="evaluation documents per gap")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--streaming", default="", help="document lengths for the streaming cost, e.g. 2048,65536")
    p.add_argument("--full-max", type=int, default=32768, help="longest document given to full attention")
    p.add_argument("--device", default="cpu", help="device for the streaming cost")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from memgpt_dist.cli import run_cli

    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: _eval(args))


def _eval(args) -> int:
    from memgpt_dist.evaluate import format_corpus_table, format_table

    gaps = [int(g) for g in args.gaps.split(",")]
    task_rows, corpus_rows, record = [], [], {}
    for path in args.checkpoint:
        name, kind, result, rec = _eval_one(Path(path), args, gaps)
        (task_rows if kind == "task" else corpus_rows).append((name, result))
        record[name] = rec
        if args.streaming:
            rec["streaming"] = _streaming(Path(rec["checkpoint"]), name, args)
    if task_rows:
        print(format_table(task_rows))
    if corpus_rows:
        print(format_corpus_table(corpus_rows))
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
    return 0


def _streaming(ckpt: Path, name: str, args) -> dict:
    """Streaming cost of a model of this checkpoint's shape (the cost does not depend on weights)."""
    from memgpt_dist.generate import checkpoint_config
    from memgpt_dist.streaming import format_streaming_table, streaming_costs, summary

    cfg = checkpoint_config(ckpt)
    mem = cfg.memory if cfg.memory.enabled else dataclasses.replace(cfg.memory, enabled=True)
    rows = streaming_costs(cfg.model, mem, [int(x) for x in args.streaming.split(",")], args.full_max,
                           device=args.device)
    print(f"\nstreaming cost, {name} shape\n{format_streaming_table(rows)}")
    return {"rows": [asdict(r) for r in rows], "summary": summary(rows)}


def _eval_one(path: Path, args, gaps):
    from tokenizers import Tokenizer

    from memgpt_dist.config import ConfigError
    from memgpt_dist.evaluate import evaluate_corpus, evaluate_task, task_spec_of
    from memgpt_dist.generate import find_checkpoint, load_model

    ckpt = find_checkpoint(path, None)
    model, cfg = load_model(ckpt)
    data = args.data or Path(cfg.data.path)
    name = f"{ckpt.parent.parent.name}@{ckpt.name.removeprefix('step_').lstrip('0')}" + (
        "" if cfg.memory.enabled else " (no memory)")
    rec = {"checkpoint": str(ckpt), "memory": cfg.memory.enabled, "data": str(data)}
    spec = task_spec_of(data)
    if spec is None:
        result = evaluate_corpus(model, data, cfg.model.segment_len, args.segments, args.corpus_docs)
        return name, "corpus", result, {**rec, "corpus": asdict(result)}
    if spec.segment_len != cfg.model.segment_len:
        raise ConfigError(f"the task in {data} has segment_len {spec.segment_len} but the model "
                          f"{cfg.model.segment_len}; prepare the task with --segment-len {cfg.model.segment_len}")
    tokenizer = Tokenizer.from_file(str(data / "tokenizer.json"))
    results = evaluate_task(model, spec, tokenizer, gaps, args.docs, args.seed)
    return name, "task", results, {**rec, "task": spec.kind, "results": [asdict(r) for r in results]}


if __name__ == "__main__":
    sys.exit(main())
