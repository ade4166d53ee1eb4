"""What happens before DeepSpeed is imported: checks that need no DeepSpeed, the extension cache,
the one warnings filter, and a line before DeepSpeed's first-start build.

Importing DeepSpeed and starting its process group takes seconds, and on a fresh virtualenv with
the CPU accelerator DeepSpeed first JIT-compiles its shared-memory communication op (about a
minute on an idle machine, five on a loaded one, silently). A config or run-directory mistake
must not wait for that: `preflight.check_before_deepspeed` runs first. Builds are cached per virtualenv
(`TORCH_EXTENSIONS_DIR` under `sys.prefix`, unless set): two virtualenvs sharing torch's default
~/.cache/torch_extensions rebuild the op back and forth, and a build killed half-way leaves a lock
there on which every later start of every virtualenv waits forever.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path


log = logging.getLogger("memgpt_dist")

COMM_OP = "deepspeed_shm_comm"  # DeepSpeed's ShareMemCommBuilder.NAME (deepspeed/ops/op_builder/cpu/comm.py)
BUILD_NOTE = "building DeepSpeed's CPU communication op, once per environment"


def extensions_dir() -> Path:
    """Where torch JIT-builds extensions for this virtualenv (TORCH_EXTENSIONS_DIR, set if unset)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def announce_comm_op_build(device_name: str) -> None:
    """Say so before DeepSpeed builds its CPU comm op, which it does when no build is cached."""
    built = extensions_dir() / COMM_OP / f"{COMM_OP}.so"
    if device_name == "cpu" and not built.is_file():
        print(f"{BUILD_NOTE} (a minute or more; cached in {built.parent})", file=sys.stderr, flush=True)


def silence_known_warnings() -> None:
    """DeepSpeed's ZeRO calls torch.distributed.reduce_scatter_tensor (every step) and
    all_gather_into_tensor, which torch 2.13 deprecates with a FutureWarning (403 lines in a
    200-step run, issue 16). Nothing for a user to act on; filtered here, the only place, by the
    exact messages."""
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated")
