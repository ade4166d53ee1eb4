"""One rank of tests/dist/test_resume_relayout*.py: `launch/train.py` (the real loader wiring and
`run_training`, resume included) with the training loader wrapped so that every sample this rank
is given is recorded: its step, global stream id and a hash of its tokens and document ids.

    python tests/dist/relayout_worker.py --config ... [--resume auto] [--key=value ...]
    deepspeed --num_gpus N tests/dist/relayout_worker.py ...

Writes RUN_DIR/samples/rank_XXXXX_from_STEP.json: [[step, stream id, sample hash], ...] for the
steps this launch trained (STEP: the step it started from).
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from data_pipeline.errors import DataError  # noqa: E402
from launch.train import loaders_for, parse_args  # noqa: E402
from memgpt_dist.cli import run_cli  # noqa: E402
from memgpt_dist.config import load_config  # noqa: E402
from memgpt_dist.parallel.dist import init_distributed, shutdown  # noqa: E402
from memgpt_dist.train.run import run_training, setup_logging  # noqa: E402


class RecordingBatches:
    """The loader, recording (micro-batch index, stream id, sample hash) of every row it hands out."""

    def __init__(self, loader):
        self.loader = loader
        self.rows: list[tuple[int, int, str]] = []
        self.calls = 0

    def __next__(self):
        batch = next(self.loader)
        for ids, docs, g in zip(batch["input_ids"], batch["doc_ids"], batch["stream_ids"]):
            digest = hashlib.sha1(ids.numpy().tobytes() + docs.numpy().tobytes()).hexdigest()[:16]
            self.rows.append((self.calls, int(g), digest))
        self.calls += 1
        return batch

    def __getattr__(self, name):  # state_dict, load_state_dict(s), stream_ids, ...
        return getattr(self.loader, name)


def main() -> int:
    """Exit codes as launch/train.py's (2: a configuration or checkpoint problem)."""
    return run_cli(train, extra_user_errors=(DataError,))


def train() -> int:
    args, overrides = parse_args([a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    cfg = load_config(args.config, overrides)
    topo = init_distributed(tp=cfg.parallel.tp, pp=cfg.parallel.pp)
    try:
        setup_logging(topo, Path(cfg.run_dir))
        batches = RecordingBatches(loaders_for(cfg, topo)[0])
        state = run_training(cfg, topo, batches, None, resume=args.resume,
                             tokenizer_file=Path(cfg.data.path) / "tokenizer.json", stop_after=args.stop_after_steps)
        steps = batches.calls // cfg.parallel.grad_accum
        first = state.step - steps  # the step this launch resumed from
        out = Path(cfg.run_dir) / "samples" / f"rank_{topo.rank:05d}_from_{first}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps([(first + 1 + call // cfg.parallel.grad_accum, g, h) for call, g, h in batches.rows]))
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
