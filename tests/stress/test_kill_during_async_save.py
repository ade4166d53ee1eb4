"""CI's share of tests/stress/kill_during_save.py --async-save: a few SIGKILLs at random points
of asynchronous saves (host copy, background writes while training goes on, the commit at a
later step boundary); every restart resumes from the newest committed checkpoint, which is
intact, and the chain ends with the uninterrupted run's losses and grad norms, bit for bit.
The script runs the 20+ point version (README, Faults)."""
from __future__ import annotations

import random

from kill_during_save import ASYNC_SAVE, reference_run, run_chains


def test_sigkill_during_async_saves_resumes_from_newest_committed_and_matches(tiny_data, tmp_path):
    metrics, save_s = reference_run(tiny_data, tmp_path / "reference", nproc=1, save_args=ASYNC_SAVE)
    kills = run_chains(tiny_data, tmp_path, points=3, nproc=1, seed=random.randrange(10**6), reference=metrics,
                       save_s=save_s, say=print, save_args=ASYNC_SAVE)
    assert len(kills) == 3
