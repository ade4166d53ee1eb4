"""A finished multi-process CPU run leaves no DeepSpeed shared-memory buffer behind: /dev/shm is
RAM, and DeepSpeed itself never unlinks its 66 MB per-rank allreduce files."""
from __future__ import annotations

import glob
import os

from helpers import bin_path, free_port, run_cmd, tiny_args

from memgpt_dist.parallel.dist import remove_shm_buffer, shm_buffer_path


def test_two_rank_run_removes_its_shm_buffers(tiny_data, tmp_path):
    port = free_port()
    run_cmd([bin_path("deepspeed"), "--num_gpus", "2", "--master_port", str(port), "launch/train.py",
             *tiny_args(tiny_data, tmp_path / "run", "--train.max_steps=3", "--train.eval_every=0")])
    assert glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*") == []


def test_remove_shm_buffer_touches_only_this_rank(tmp_path, monkeypatch):
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "1"}
    mine = shm_buffer_path(env)
    other = shm_buffer_path({**env, "RANK": "0"})
    for path in (mine, other):
        open(path, "wb").close()
    try:
        remove_shm_buffer(env)
        assert not os.path.exists(mine) and os.path.exists(other)
        remove_shm_buffer(env)  # already gone: nothing to do
    finally:
        for path in (mine, other):
            if os.path.exists(path):
                os.unlink(path)
    assert shm_buffer_path({"RANK": "0"}) is None
