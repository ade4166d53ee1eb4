"""Shared behaviour of the command-line entry points: user errors print a message, not a traceback.

Exit codes: 0 done; 2 a configuration, data or checkpoint problem the user must fix, or a run
directory locked by another live run (`train.run_lock`); 75 (`stopping.EXIT_PREEMPTED`) stopped
early by a signal or `train.max_minutes` after committing a checkpoint, so requeue with
`--resume auto`; 76 (`stopping.EXIT_LOST_RANK`) a rank was lost or hung (the heartbeat watchdog,
or a collective that failed or timed out), nothing new saved, so requeue with `--resume auto`;
3 (`stopping.EXIT_DIVERGED`) stopped by too many consecutive non-finite steps, nothing saved
after the last good checkpoint.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from memgpt_dist.config import ConfigError
from memgpt_dist.parallel.dist import is_collective_failure
from memgpt_dist.train.checkpoint import CheckpointError
from memgpt_dist.train.run_lock import RunDirLocked
from memgpt_dist.train.stopping import EXIT_LOST_RANK, Preempted, RunStopped

EXIT_USER_ERROR = 2


def run_cli(fn: Callable[[], int], extra_user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run `fn`; a configuration, data or checkpoint problem exits with code 2 and its message,
    an early stop with the code of its `RunStopped` exception."""
    try:
        return fn()
    except (ConfigError, CheckpointError, FileNotFoundError, RunDirLocked, *extra_user_errors) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except RunStopped as exc:
        print(f"{'stopped' if isinstance(exc, Preempted) else 'error'}: {exc}", file=sys.stderr)
        return exc.exit_code
    except RuntimeError as exc:
        if not is_collective_failure(exc):
            raise
        print(f"error: rank {os.environ.get('RANK', '0')}: a collective failed, a peer rank died or hung "
              f"(parallel.collective_timeout_s bounds the wait): {exc}. Requeue with --resume auto", file=sys.stderr)
        return EXIT_LOST_RANK


def exit_process(code: int) -> None:
    """End the process with `code`, skipping the interpreter's teardown (entry points call it last).

    By now everything the run keeps is written and closed: checkpoints (fsynced and committed),
    metrics, TensorBoard events and the process group. Tearing down DeepSpeed's and gloo's native
    threads at interpreter exit sometimes aborts ("terminate called without an active exception",
    exit 250) and would replace the run's exit code (0, 2, 3 or 75), which job scripts act on."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
