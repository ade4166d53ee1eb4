"""Train entry point: `deepspeed launch/train.py --config configs/tiny.yaml [--resume auto] [--key=value ...]`.

Also runs as one plain process and as `memgpt-train`; wires data_pipeline into memgpt_dist, where the logic lives.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file from configs/")
    p.add_argument("--resume", default="none", help="none (default), auto (newest committed checkpoint) or a step")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, the layout (layers, heads, parameters and memory per rank) "
                        "and the DeepSpeed dict, then exit; needs no accelerator")
    p.add_argument("--help-config", action="store_true", help="print every config key with its type, default and doc")
    p.add_argument("--stop-after-steps", type=int, default=None,
                   help="save and exit after this step without changing the schedule (drills, time slots)")
    p.add_argument("--world-size", type=int, default=None, help="world size assumed by --dry-run")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="device type assumed by --dry-run (default: this machine's)")
    p.add_argument("--json", action="store_true", help="--dry-run prints one JSON object")
    p.add_argument("--rendezvous-timeout", type=float, default=600.0,
                   help="seconds a rank waits for rank 0's rendezvous (MASTER_ADDR:MASTER_PORT) before failing")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed's
    return p.parse_known_args(argv)


def main(argv=None) -> int:
    from data_pipeline.errors import DataError
    from memgpt_dist.cli import run_cli

    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: _train(args, overrides), extra_user_errors=(DataError,))


def _train(args, overrides) -> int:
    from data_pipeline.loaders import check_vocab, corpus_fingerprint, corpus_tokenizer
    from memgpt_dist.config import describe_config, load_config
    from memgpt_dist.parallel.dist import init_distributed, share_cores, shutdown
    from memgpt_dist.parallel.dry_run import dry_run_report
    from memgpt_dist.parallel.preflight import check_before_deepspeed, check_same_everywhere, wait_for_master
    from memgpt_dist.train.run import hold_run_dir, run_training

    if args.help_config:
        print(describe_config(), end="")
        return 0
    cfg = load_config(args.config, overrides)
    world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    if args.dry_run:
        print(dry_run_report(cfg, world, args.device, as_json=args.json))
        return 0
    check_before_deepspeed(cfg, world)  # a config or run-directory mistake fails before DeepSpeed's start-up
    share_cores()
    wait_for_master(args.rendezvous_timeout)
    topo = init_distributed(tp=cfg.parallel.tp, pp=cfg.parallel.pp, timeout_s=cfg.parallel.collective_timeout_s)
    try:
        with hold_run_dir(topo, Path(cfg.run_dir)):  # refused at once when another run holds it
            check_same_everywhere(cfg, corpus_fingerprint(cfg.data))  # other code, config or data fails here
            train, make_val = loaders_for(cfg, topo)
            check_vocab(train.vocab_size, cfg.model.vocab_size)
            run_training(cfg, topo, train, make_val, resume=args.resume,
                         tokenizer_file=corpus_tokenizer(cfg.data, Path(cfg.run_dir)), stop_after=args.stop_after_steps)
    finally:
        shutdown()
    return 0


def loaders_for(cfg, topo):
    """(training loader, a function that makes the validation loader) for this rank's replica."""
    from data_pipeline.loaders import ReplicaShare, build_loader, build_train_loader

    share = ReplicaShare(dp_rank=topo.dp_rank, dp_size=topo.dp_size, micro_batch_size=cfg.parallel.micro_batch_size,
                         segment_len=cfg.model.segment_len)
    return build_train_loader(cfg.data, share), lambda: build_loader(cfg.data, share, "validation")


def cli() -> None:
    """Console-script entry point (`memgpt-train`)."""
    from memgpt_dist.cli import exit_process

    exit_process(main())


if __name__ == "__main__":
    cli()
