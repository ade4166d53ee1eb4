"""Process-group setup and the `Topology` object that carries ranks through the program.

There are no module-level process-group globals: `init_distributed` returns a `Topology`
that is passed explicitly to whoever needs a rank, a degree or a collective. Ranks are laid out
as DeepSpeed's `PipeModelDataParallelTopology` lays them out (tp fastest, then dp, then pp; see
`memgpt_dist.parallel.layout`), so dp = world / (tp * pp). The tp ranks of one data-parallel
replica read the same batch: data is assigned by `dp_rank` and `dp_size`, never by the global rank.
"""
from __future__ import annotations

import dataclasses
import os
import socket
from datetime import timedelta
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from memgpt_dist.config import dp_degree
from memgpt_dist.parallel.layout import RankPlace, head_range, place_of


@dataclass(frozen=True)
class Topology:
    """This process's handle on the world: global rank and world size, its data-, tensor- and
    pipeline-parallel ranks and degrees, its device, its process groups and the few collectives
    the trainer uses. Where the rank sits in the grid is its `place` (a `layout.RankPlace`); the
    whole job's layout is a `layout.Layout`; what a rank holds of the model is its `RankShare`."""

    rank: int
    world_size: int
    local_rank: int
    dp_rank: int
    dp_size: int
    device: torch.device
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    # the process group of this rank's data-parallel peers (same tp and pp rank); None: the world
    dp_group: Any = field(default=None, repr=False, compare=False)
    # the process group of this rank's tensor-parallel peers (same dp and pp rank); None when tp == 1
    tp_group: Any = field(default=None, repr=False, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def place(self) -> RankPlace:
        return RankPlace(dp=self.dp_rank, pp=self.pp_rank, tp=self.tp_rank)

    def head_range(self, n_head: int) -> tuple[int, int]:
        """The attention heads [first, last + 1) this rank holds (and their memory): TP rank t of
        tp holds the t-th contiguous block, as AutoTP splits the projections' output features."""
        return head_range(n_head, self.tp_rank, self.tp_size)

    def barrier(self) -> None:
        if dist.is_initialized() and self.world_size > 1:
            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few floats over the data-parallel replicas (float64, so token counts stay exact).

        The tp ranks of one replica see the same batch and compute the same (replicated) logits,
        so each replica's tokens and losses are counted once, not tp times."""
        return self._sum(values, self.dp_group, self.dp_size)

    def sum_over_world(self, values: list[float]) -> list[float]:
        """Sum a few floats over every rank (float64): for figures that only some ranks hold, such
        as the validation loss on a pipeline's last stage; the others contribute zeros."""
        return self._sum(values, None, self.world_size)

    def _sum(self, values: list[float], group, group_size: int) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        if dist.is_initialized() and group_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
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


def place_record(topo: Topology, stream_ids: Optional[list[int]], n_head: int,
               layers: Optional[list[int]] = None) -> dict[str, Any]:
    """Where a rank sits, as its checkpoint file records it: the layout's degrees, the rank's
    (dp, tp, pp) coordinates, the global ids of the streams whose loader cursors and memory state
    it holds (rows of its batch), the heads [first, last + 1) of that memory state and, in a
    pipeline, the global layers of its stage. Enough to redistribute to another layout."""
    h0, h1 = topo.head_range(n_head)
    out = {"layout": {"dp": topo.dp_size, "tp": topo.tp_size, "pp": topo.pp_size},
           "coord": dataclasses.asdict(topo.place),  # "coord": the key every version wrote
           "stream_ids": None if stream_ids is None else [int(g) for g in stream_ids], "heads": [h0, h1]}
    if layers is not None:
        out["layers"] = sorted(layers)
    return out


def share_cores() -> None:
    """Unless OMP_NUM_THREADS says otherwise, give each of this node's ranks an equal share of its
    cores: every rank taking all of them (torch's default) oversubscribes the node, and on CPU a
    step then takes 20-30x longer."""
    local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if "OMP_NUM_THREADS" not in os.environ and local > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


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


def init_distributed(tp: int = 1, pp: int = 1, backend: Optional[str] = None,
                     timeout_s: Optional[float] = None) -> Topology:
    """Initialise torch.distributed through DeepSpeed and describe this process in a grid of
    tp x pp model-parallel ranks per data-parallel replica (`parallel.tp`, `parallel.pp`).

    `timeout_s` (`parallel.collective_timeout_s`; None: torch's default) bounds how long a
    collective waits for a peer that died or hangs; the groups made here get it too (a group
    made without one falls back to torch's 30-minute default, not the world's).

    Works under the `deepspeed` launcher, torchrun, srun wrappers that export RANK/WORLD_SIZE,
    and as a single plain process.
    """
    from memgpt_dist.parallel.startup import announce_comm_op_build, extensions_dir, silence_known_warnings

    extensions_dir()  # before DeepSpeed reads it
    silence_known_warnings()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    _default_single_process_env()
    accel = get_accelerator()
    if backend is None:
        backend = "gloo" if accel.device_name() == "cpu" else accel.communication_backend_name()
    timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        announce_comm_op_build(accel.device_name())
        deepspeed.init_distributed(dist_backend=backend, **({} if timeout is None else {"timeout": timeout}))
    rank, world = dist.get_rank(), dist.get_world_size()
    dp = dp_degree(world, tp, pp)
    place = place_of(rank, dp, tp)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu") if accel.device_name() == "cpu" else torch.device(accel.device_name(), local_rank)
    if device.type != "cpu":
        accel.set_device(local_rank)
    return Topology(rank=rank, world_size=world, local_rank=local_rank, dp_rank=place.dp, dp_size=dp, device=device,
                    tp_rank=place.tp, tp_size=tp, pp_rank=place.pp, pp_size=pp,
                    dp_group=_data_parallel_group(place, dp, tp, pp, timeout),
                    tp_group=_tensor_parallel_group(place, dp, tp, pp, timeout))


def _data_parallel_group(place: RankPlace, dp: int, tp: int, pp: int, timeout: Optional[timedelta] = None):
    """The group of ranks that share this rank's (pp, tp) coordinates; None when it is the world.
    `new_group` is collective: every rank creates every group, in the same order."""
    if tp * pp == 1:
        return None
    groups = {(p, t): dist.new_group([(p * dp + d) * tp + t for d in range(dp)], timeout=timeout)
              for p in range(pp) for t in range(tp)}
    return groups[place.pp, place.tp]


def _tensor_parallel_group(place: RankPlace, dp: int, tp: int, pp: int, timeout: Optional[timedelta] = None):
    """The group of ranks that share this rank's (pp, dp) coordinates (consecutive ranks); None when tp == 1."""
    if tp == 1:
        return None
    groups = {(p, d): dist.new_group([(p * dp + d) * tp + t for t in range(tp)], timeout=timeout)
              for p in range(pp) for d in range(dp)}
    return groups[place.pp, place.dp]


def shutdown() -> None:
    """Tear down the process group and remove this rank's shared-memory allreduce buffer.

    DeepSpeed's CPU shm allreduce (csrc/cpu/comm/shm.cpp) creates one 66 MB file per rank in
    /dev/shm and never unlinks it; /dev/shm is RAM, so a few hundred runs filled 16 GB of this
    machine. Every rank mapped every other rank's file when the group started, so unlinking our
    own at exit is safe."""
    if dist.is_initialized():
        dist.destroy_process_group()
    remove_shm_buffer(os.environ)


def shm_buffer_path(env) -> Optional[str]:
    """This rank's DeepSpeed shm allreduce file, or None outside a launched run."""
    if not all(k in env for k in ("MASTER_ADDR", "MASTER_PORT", "RANK")):
        return None
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{env['MASTER_ADDR']}_{env['MASTER_PORT']}_{env['RANK']}"


def remove_shm_buffer(env) -> None:
    path = shm_buffer_path(env)
    if path is not None and os.path.exists(path):
        os.unlink(path)


def default_store():
    """The rendezvous key-value store of the world (served by rank 0's process), or None.

    Not a collective: the heartbeat's threads publish and read per-rank liveness through it,
    which they may, while only the main thread runs collectives."""
    if not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()  # no public accessor in torch 2.x
    except (RuntimeError, ValueError, AttributeError):
        return None


def is_collective_failure(exc: BaseException) -> bool:
    """Whether `exc` is torch.distributed reporting a lost peer: a connection closed or reset, or
    a collective past the process-group timeout. Gloo raises these as plain RuntimeErrors
    ("[.../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation"),
    NCCL as DistBackendError."""
    kinds = tuple(k for k in (getattr(dist, "DistBackendError", None), getattr(dist, "DistNetworkError", None)) if k)
    return isinstance(exc, kinds) or (isinstance(exc, RuntimeError) and "gloo" in str(exc).lower())
