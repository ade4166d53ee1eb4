"""Prepare a corpus: `memgpt-prepare [INPUT ...] --out DIR [--vocab-size 4096 | --tokenizer tokenizer.json]`.

With no INPUT, the embedded default corpus (the Python standard library's sources) is used.
With --task recall|passkey, a synthetic long-range task corpus is generated instead:
    memgpt-prepare --task recall --out data/recall --segment-len 32 --gap 2 --pairs 8
On Slurm, `python launch/slurm/submit.py prepare --tasks N -- INPUT ... --out DIR` runs it as a job
array; each array task calls this with --stage STAGE --array-task I --array-tasks N.
"""
from __future__ import annotations

import sys


def parse_args(argv):
    from data_pipeline.prepare_cli import build_parser

    p = build_parser(__doc__)
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
    from data_pipeline.prepare_corpus import config_from_args, summary_lines

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


def _task(a) -> int:
    from data_pipeline.errors import DataError
    from data_pipeline.prepare_tasks import prepare_task_from_args

    try:
        print(prepare_task_from_args(a))
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
