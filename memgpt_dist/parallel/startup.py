"""What happens before DeepSpeed is imported: checks that need no DeepSpeed, the extension cache,
the one warnings filter, and a line before DeepSpeed's first-start build.

Importing DeepSpeed and starting its process group takes seconds, and on a fresh virtualenv with
the CPU accelerator DeepSpeed first JIT-compiles its shared-memory communication op (about a
minute on an idle machine, five on a loaded one, silently). A config or run-directory mistake
must not wait for that: `preflight.check_before_deepspeed` runs first. Builds are cached per virtualenv
(`TORCH_EXTENSIONS_DIR` under `sys.prefix`, unless set): two virtualenvs sharing torch's default
~/.cache/torch_extensions rebuild the op back and forth, and a build killed half-way leaves a lock
there on which every later start of every virtualenv waits forever (a lock whose build
left no trace for ten minutes is removed: `clear_stale_build_lock`).
"""
from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path


log = logging.getLogger("memgpt_dist")

COMM_OP = "deepspeed_shm_comm"  # DeepSpeed's ShareMemCommBuilder.NAME (deepspeed/ops/op_builder/cpu/comm.py)
BUILD_NOTE = "building DeepSpeed's CPU communication op, once per environment"


def extensions_dir() -> Path:
    """Where torch JIT-builds extensions for this virtualenv (TORCH_EXTENSIONS_DIR, set if unset)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


STALE_LOCK_S = 600.0  # no file of a build changed for this long: the build that locked it is gone


def announce_comm_op_build(device_name: str) -> None:
    """Say so before DeepSpeed builds its CPU comm op, which it does when no build is cached;
    first clear a stale build lock (`clear_stale_build_lock`)."""
    built = extensions_dir() / COMM_OP / f"{COMM_OP}.so"
    if device_name == "cpu" and not built.is_file():
        clear_stale_build_lock(built.parent)
        print(f"{BUILD_NOTE} (a minute or more; cached in {built.parent})", file=sys.stderr, flush=True)


def clear_stale_build_lock(build_dir: Path, stale_s: float = STALE_LOCK_S) -> bool:
    """Remove torch's build lock (`build_dir/lock`, an empty file torch's FileBaton creates and
    removes around a JIT build) when nothing in `build_dir` changed for `stale_s` seconds.

    A build killed half-way (a rank SIGKILLed during start-up) leaves the lock behind, and every
    later start waits on it forever, silently. The lock holds no pid, so a build is judged alive
    by its files: a running build touches its objects and logs within minutes. Only the lock is
    removed (in this virtualenv's extension cache), with a warning. True if it was removed."""
    lock = build_dir / "lock"
    try:
        newest = max(p.stat().st_mtime for p in build_dir.iterdir())
    except (FileNotFoundError, ValueError):  # no build directory, or an empty one
        return False
    if not lock.is_file() or time.time() - newest < stale_s:
        return False
    log.warning("removing the stale build lock %s (nothing in %s changed for %.0f s: the build that "
                "took it was killed)", lock, build_dir, time.time() - newest)
    try:
        lock.unlink()
    except FileNotFoundError:  # another rank of this node removed it first
        pass
    return True


def silence_known_warnings() -> None:
    """DeepSpeed's ZeRO calls torch.distributed.reduce_scatter_tensor (every step) and
    all_gather_into_tensor, which torch 2.13 deprecates with a FutureWarning (403 lines in a
    200-step run, issue 16). Nothing for a user to act on; filtered here, the only place, by the
    exact messages."""
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated")
