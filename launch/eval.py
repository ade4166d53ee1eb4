"""Long-range evaluation: `memgpt-eval --checkpoint RUN_DIR [RUN_DIR ...] [--json results.json]`.

For each run, with the memory read on and switched off at evaluation time, side by side:
- a task corpus (`memgpt-prepare --task`): accuracy at 1, 3, 7, 15, 31 filler segments;
- a text corpus: next-token loss by segment index over long held-out documents;
- with --streaming 2048,8192,32768,65536: tokens/s and peak memory reading documents of those
  lengths segment by segment, next to a full-causal-attention model of the same size.
The data is the run's own (data.path) unless --data names another prepared corpus.
"""
from __future__ import annotations

import argparse
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
    from data_pipeline.errors import DataError
    from memgpt_dist.cli import run_cli

    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: _eval(args), extra_user_errors=(DataError,))


def _eval(args) -> int:
    from memgpt_dist.evaluate import format_corpus_table, format_table

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # --streaming: a benchmark
    from streaming import checkpoint_streaming_cost

    gaps = [int(g) for g in args.gaps.split(",")]
    task_rows, corpus_rows, record = [], [], {}
    for path in args.checkpoint:
        name, kind, result, rec = _eval_one(Path(path), args, gaps)
        (task_rows if kind == "task" else corpus_rows).append((name, result))
        record[name] = rec
        if args.streaming:
            rec["streaming"] = checkpoint_streaming_cost(Path(rec["checkpoint"]), name, [
                int(x) for x in args.streaming.split(",")], args.full_max, args.device)
    if task_rows:
        print(format_table(task_rows))
    if corpus_rows:
        print(format_corpus_table(corpus_rows))
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
    return 0


def _eval_one(path: Path, args, gaps):
    from data_pipeline.eval_data import corpus_eval_documents, task_batches, task_for_model, task_spec_of
    from memgpt_dist.evaluate import evaluate_corpus, evaluate_task
    from memgpt_dist.generate import find_checkpoint, load_model

    ckpt = find_checkpoint(path, None)
    model, cfg = load_model(ckpt)
    data, N = args.data or Path(cfg.data.path), cfg.model.segment_len
    name = f"{ckpt.parent.parent.name}@{ckpt.name.removeprefix('step_').lstrip('0')}" + (
        "" if cfg.memory.enabled else " (no memory)")
    rec = {"checkpoint": str(ckpt), "memory": cfg.memory.enabled, "data": str(data)}
    spec = task_spec_of(data)
    if spec is None:
        result = evaluate_corpus(model, corpus_eval_documents(data, args.segments, N, args.corpus_docs), N, args.segments)
        return name, "corpus", result, {**rec, "corpus": asdict(result)}
    tokenizer, exact = task_for_model(data, spec, N), spec.kind == "passkey"
    results = evaluate_task(model, lambda gap: task_batches(spec, tokenizer, args.docs, args.seed, 32, gap), gaps,
                            exact=exact, chance=spec.chance ** spec.digits if exact else spec.chance, n_docs=args.docs)
    return name, "task", results, {**rec, "task": spec.kind, "results": [asdict(r) for r in results]}


if __name__ == "__main__":
    sys.exit(main())
