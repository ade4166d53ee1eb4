"""Long-range evaluation: `memgpt-eval --checkpoint RUN_DIR [RUN_DIR ...] [--json results.json]`.

For each run: task accuracy at 1, 3, 7, 15, 31 filler segments between fact and question, with
the memory read on and switched off at evaluation time, printed side by side. The task is the
one the run trained on (its data manifest) unless --task-data names another task corpus.
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
    p.add_argument("--task-data", type=Path, default=None, help="task corpus whose task to evaluate "
                   "(default: each run's data.path)")
    p.add_argument("--gaps", default="1,3,7,15,31", help="filler segments between fact and question")
    p.add_argument("--docs", type=int, default=256, help="evaluation documents per gap")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from memgpt_dist.cli import run_cli

    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: _eval(args))


def _eval(args) -> int:
    from tokenizers import Tokenizer

    from memgpt_dist.config import ConfigError
    from memgpt_dist.evaluate import evaluate_task, format_table, task_spec_of
    from memgpt_dist.generate import find_checkpoint, load_model

    gaps = [int(g) for g in args.gaps.split(",")]
    rows, record = [], {}
    for path in args.checkpoint:
        ckpt = find_checkpoint(Path(path), None)
        model, cfg = load_model(ckpt)
        data = args.task_data or Path(cfg.data.path)
        spec = task_spec_of(data)
        if spec is None:
            raise ConfigError(f"{data} is not a task corpus; pass --task-data DIR made by memgpt-prepare --task")
        if spec.segment_len != cfg.model.segment_len:
            raise ConfigError(f"task segment_len {spec.segment_len} != the model's {cfg.model.segment_len}")
        tokenizer = Tokenizer.from_file(str(data / "tokenizer.json"))
        results = evaluate_task(model, spec, tokenizer, gaps, args.docs, args.seed)
        name = str(ckpt.parent.parent.name) + ("" if cfg.memory.enabled else " (no memory)")
        rows.append((name, results))
        record[str(ckpt)] = {"task": spec.kind, "memory": cfg.memory.enabled, "results": [asdict(r) for r in results]}
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
