"""Process-group setup and the `Topology` object that carries ranks through the program.

There are no module-level process-group globals: `init_distributed` returns a `Topology`
that is passed explicitly to whoever needs a rank, a degree or a collective.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    """Where this process sits: global rank/world, data-parallel rank/degree, device."""

    rank: int
    world_size: int
    local_rank: int
    dp_rank: int
    dp_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if dist.is_initialized() and self.world_size > 1:
            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few floats over all ranks (float64, so token counts stay exact)."""
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        if dist.is_initialized() and self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().tolist()

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not (dist.is_initialized() and self.world_size > 1):
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not (dist.is_initialized() and self.world_size > 1):
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def _comm_device(self) -> torch.device:
        # NCCL reduces only device tensors; gloo only host tensors.
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_single_process_env() -> None:
    """A plain `python launch/train.py` is a world of one: give DeepSpeed the env it expects."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})


def init_distributed(backend: Optional[str] = None) -> Topology:
    """Initialise torch.distributed through DeepSpeed and describe this process.

    Works under the `deepspeed` launcher, torchrun, srun wrappers that export RANK/WORLD_SIZE,
    and as a single plain process. Data parallelism spans the whole world until TP/PP arrive.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    _default_single_process_env()
    accel = get_accelerator()
    if backend is None:
        backend = "gloo" if accel.device_name() == "cpu" else accel.communication_backend_name()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu") if accel.device_name() == "cpu" else torch.device(accel.device_name(), local_rank)
    if device.type != "cpu":
        accel.set_device(local_rank)
    return Topology(rank=rank, world_size=world, local_rank=local_rank, dp_rank=rank, dp_size=world, device=device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
