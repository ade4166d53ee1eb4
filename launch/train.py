"""Train entry point: `deepspeed launch/train.py --config configs/tiny.yaml [--resume auto] [--key=value ...]`.

Also runs as one plain process (`python launch/train.py ...`) and as `memgpt-train`.
Wires the data pipeline into the trainer; all logic lives in memgpt_dist and data_pipeline.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file from configs/")
    p.add_argument("--resume", default="none", help="none (default), auto (newest committed checkpoint) or a step")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, the layout (layers, heads, parameters and memory per rank) "
                        "and the DeepSpeed dict, then exit; needs no accelerator")
    p.add_argument("--stop-after-steps", type=int, default=None,
                   help="save and exit after this step without changing the schedule (drills, time slots)")
    p.add_argument("--world-size", type=int, default=None, help="world size assumed by --dry-run")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="device type assumed by --dry-run (default: this machine's)")
    p.add_argument("--json", action="store_true", help="--dry-run prints one JSON object")
    p.add_argument("--rendezvous-timeout", type=float, default=600.0,
                   help="seconds a rank waits for rank 0's rendezvous (MASTER_ADDR:MASTER_PORT) before failing")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, overrides = p.parse_known_args(argv)
    return args, overrides


def main(argv=None) -> int:
    from data_pipeline.errors import DataError
    from memgpt_dist.cli import run_cli

    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: _train(args, overrides), extra_user_errors=(DataError,))


def _train(args, overrides) -> int:
    from memgpt_dist.config import load_config
    from memgpt_dist.parallel.dist import init_distributed, shutdown
    from memgpt_dist.parallel.layout import dry_run_report
    from memgpt_dist.parallel.preflight import check_same_everywhere, wait_for_master
    from memgpt_dist.train.run import run_training, setup_logging

    cfg = load_config(args.config, overrides)
    if args.dry_run:
        world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        print(dry_run_report(cfg, world, args.device or ("cuda" if _has_cuda() else "cpu"), as_json=args.json))
        return 0
    _share_cores()
    wait_for_master(args.rendezvous_timeout)
    topo = init_distributed(tp=cfg.parallel.tp, pp=cfg.parallel.pp)
    try:
        setup_logging(topo, Path(cfg.run_dir))
        check_same_everywhere(cfg)  # a node with other code, config or data fails here, not hours later
        train = build_train_loader(cfg, topo)
        _check_vocab(train.vocab_size, cfg.model.vocab_size)
        run_training(cfg, topo, train, lambda: build_loader(cfg, topo, "validation"), resume=args.resume,
                     tokenizer_file=Path(cfg.data.path) / "tokenizer.json", stop_after=args.stop_after_steps)
    finally:
        shutdown()
    return 0


def build_loader(cfg, topo, split: str, path: Optional[str] = None):
    """A split of a corpus as read by this rank's data-parallel replica: its streams are chosen by
    the data-parallel rank and degree, so the TP ranks of one replica read the same batches."""
    from data_pipeline.segment_stream import SegmentLoader

    d, m = cfg.data, cfg.model
    return SegmentLoader(path or d.path, split=split, segment_len=m.segment_len, n_segments=d.n_segments,
                         micro_batch_size=cfg.parallel.micro_batch_size, dp_rank=topo.dp_rank, dp_size=topo.dp_size,
                         seed=d.seed, num_workers=d.num_workers, max_skip_fraction=d.max_skip_fraction,
                         expected_tokenizer_hash=_tokenizer_hash(d.tokenizer), verify_checksums=d.verify_checksums)


def build_train_loader(cfg, topo):
    """The training loader: one corpus, or a weighted blend of data.path and data.mix."""
    from data_pipeline.segment_stream import MixedLoader

    sources = cfg.data.mix_sources()
    if len(sources) == 1:
        return build_loader(cfg, topo, "train")
    return MixedLoader([build_loader(cfg, topo, "train", p) for p, _ in sources], [w for _, w in sources],
                       cfg.data.seed)


def _tokenizer_hash(path: str):
    from data_pipeline.bpe_tokenizer import file_sha256

    return file_sha256(Path(path) / "tokenizer.json" if Path(path).is_dir() else path) if path else None


def _check_vocab(data_vocab: int, model_vocab: int) -> None:
    from memgpt_dist.config import ConfigError

    if data_vocab > model_vocab:
        raise ConfigError(f"the shards' tokenizer has {data_vocab} tokens but model.vocab_size={model_vocab}; "
                          f"set model.vocab_size >= {data_vocab}")


def _share_cores() -> None:
    """Unless OMP_NUM_THREADS says otherwise, give each of this node's ranks an equal share of its
    cores: every rank taking all of them (torch's default) oversubscribes the node, and on CPU a
    step then takes 20-30x longer."""
    import torch

    local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if "OMP_NUM_THREADS" not in os.environ and local > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def exit_process(code: int) -> None:
    """End the process with `code`, skipping the interpreter's teardown.

    By now everything the run keeps is written and closed: checkpoints (fsynced and committed),
    metrics, TensorBoard events and the process group. Tearing down DeepSpeed's and gloo's native
    threads at interpreter exit sometimes aborts ("terminate called without an active exception",
    exit 250) and would replace the run's exit code (0, 2, 3 or 75), which job scripts act on."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cli() -> None:
    """Console-script entry point (`memgpt-train`)."""
    exit_process(main())


if __name__ == "__main__":
    exit_process(main())
