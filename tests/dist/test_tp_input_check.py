"""The TP input check: TP ranks given different batches both fail on the first forward, with
advice; the same batch with a different memory state (each rank holds its heads) passes."""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from helpers import free_port
from memgpt_dist.parallel.tensor_parallel import check_tp_inputs_once


class Echo(nn.Module):
    def forward(self, input_ids, state=None, reset=None):
        return input_ids


def _rank(rank: int, port: int, same_data: bool, errors) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        module = Echo()
        check_tp_inputs_once(module, dist.new_group([0, 1]), tp_src_rank=0)
        ids = torch.arange(6).view(2, 3) + (0 if same_data else rank)
        reset = torch.tensor([[True], [False]])
        module(ids, state=torch.full((2, 2), float(rank)), reset=reset)  # the state differs by rank
        module(ids + rank, reset=reset)  # checked once only
    except RuntimeError as exc:
        errors.put((rank, str(exc)))
    finally:
        dist.destroy_process_group()


def run_two_ranks(same_data: bool, timeout_s: float = 60) -> list:
    """The (rank, message) of every RuntimeError the two ranks raised; fails on a deadlock."""
    errors = mp.get_context("spawn").SimpleQueue()
    ranks = mp.start_processes(_rank, args=(free_port(), same_data, errors), nprocs=2, join=False,
                               start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ranks.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ranks.processes:
                p.kill()
            pytest.fail("the TP input check deadlocked: the ranks ran different collectives")
    out = []
    while not errors.empty():
        out.append(errors.get())
    return sorted(out)


def test_same_batch_with_rank_local_memory_state_passes():
    assert run_two_ranks(same_data=True) == []


def test_different_batches_fail_on_every_tp_rank_with_advice():
    errors = run_two_ranks(same_data=False)
    assert [r for r, _ in errors] == [0, 1]
    assert all("data-parallel rank and size" in msg for _, msg in errors)
