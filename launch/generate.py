"""Sample from a trained run: `memgpt-generate --checkpoint RUN_DIR --prompt "def main("`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", required=True, help="run directory (newest committed checkpoint) or a step dir")
    p.add_argument("--step", type=int, default=None, help="use this checkpoint step instead of the newest")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run's copy)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    from memgpt_dist.cli import run_cli

    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: _generate(args))


def _generate(args) -> int:
    from tokenizers import Tokenizer

    from memgpt_dist.generate import SamplingConfig, find_checkpoint, generate, load_model

    ckpt = find_checkpoint(Path(args.checkpoint), args.step)
    run_dir = ckpt.parent.parent
    tok_file = Path(args.tokenizer) if args.tokenizer else run_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise FileNotFoundError(f"{tok_file} not found; pass --tokenizer DATA_DIR/tokenizer.json")
    tokenizer = Tokenizer.from_file(str(tok_file))
    model, _ = load_model(ckpt)
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    prompt_ids = tokenizer.encode(args.prompt).ids
    new_ids = generate(model, prompt_ids, sampling, eos_id=tokenizer.token_to_id("<|endoftext|>"))
    print(f"# checkpoint {ckpt}", file=sys.stderr)
    print(args.prompt + tokenizer.decode(new_ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
