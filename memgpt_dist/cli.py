"""Shared behaviour of the command-line entry points: user errors print a message, not a traceback."""
from __future__ import annotations

import sys
from typing import Callable

from memgpt_dist.config import ConfigError
from memgpt_dist.train.checkpoint import CheckpointError

EXIT_USER_ERROR = 2


def run_cli(fn: Callable[[], int], extra_user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run `fn`; a configuration, data or checkpoint problem exits with code 2 and its message."""
    try:
        return fn()
    except (ConfigError, CheckpointError, FileNotFoundError, *extra_user_errors) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
