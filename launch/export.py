"""Export a trained run to Hugging Face: `memgpt-export --checkpoint RUN_DIR --out DIR`.

Then `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` and `AutoTokenizer`
load it without this project installed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", required=True, help="run directory (newest committed checkpoint) or a step dir")
    p.add_argument("--step", type=int, default=None, help="export this checkpoint step instead of the newest")
    p.add_argument("--out", required=True, help="directory to write (new, empty, or an earlier export)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run's copy)")
    p.add_argument("--max-shard-size", default="2GB", help="weights above this are split into shards with an index")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from memgpt_dist.cli import run_cli
    from memgpt_dist.hf.export import ExportError

    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: _export(args), extra_user_errors=(ExportError,))


def _export(args) -> int:
    from memgpt_dist.hf.export import export_run

    ckpt = export_run(Path(args.checkpoint), Path(args.out), args.step,
                      Path(args.tokenizer) if args.tokenizer else None, args.max_shard_size)
    print(f"exported {ckpt} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
