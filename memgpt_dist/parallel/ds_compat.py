"""Every place where memgpt-dist reaches into DeepSpeed's internals, in one module.

Each patch below was written for DeepSpeed `TESTED_VERSION` (pyproject pins ">=0.19.8,<0.20"),
covers a gap or bug of that version, and is guarded by the test named in `PATCHES`: run that test
first when DeepSpeed is upgraded, then drop the patch if upstream fixed it. Importing this module
on another DeepSpeed version logs one warning naming the patches at risk.

Outside this module the project uses DeepSpeed's public API only (`deepspeed.initialize`,
`engine.save_checkpoint/load_checkpoint/train_batch/eval_batch`, `ds_to_universal`). The on-disk
repairs of universal checkpoints (`train/universal.py`) read and write DeepSpeed's file formats
and are listed here too, since a format change breaks them the same way.
"""
from __future__ import annotations

import contextlib
import logging
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

TESTED_VERSION = "0.19.8"


@dataclass(frozen=True)
class Patch:
    """One workaround: what it covers in DeepSpeed and the test that fails without it."""

    name: str
    covers: str
    test: str


PATCHES = (
    Patch("weights_only_loading", "TorchCheckpointEngine.load calls torch.load(weights_only=False): a tampered "
          "checkpoint could run code", "tests/train/test_checkpoint_roundtrip.py::test_deepspeed_files_are_loaded_weights_only"),
    Patch("torch_load_weights_only", "ds_to_universal and the universal loader call torch.load(weights_only=False) "
          "directly", "tests/train/test_reshard.py"),
    Patch("repair_universal_optimizer_state", "ZeRO-3 universal load copies param group 0's options into every "
          "group and shares one Adam `step` tensor between groups", "tests/train/test_universal_restore.py"),
    Patch("step_by_whole_model_norm", "PipelineEngine ZeRO-0 fp32 clipping (clip_grad_norm_ with mpu=grid) leaves "
          "the later stages out of the norm and reports none", "tests/dist/test_pipeline.py (ZeRO-0 clip)"),
    Patch("autotp_mpu", "AutoTP's (dp, tp) mesh must exist before deepspeed.initialize so its batch check counts "
          "dp ranks (groups._init_tp_mesh_device)", "tests/dist/test_tensor_parallel.py"),
    Patch("replace_tp_input_check", "AutoTP's first_dataloader_check compares every forward argument, the memory "
          "state included, which differs across TP ranks by design", "tests/dist/test_tp_input_check.py"),
    Patch("describe_for_universal_checkpoint", "per-head parameters that AutoTP does not split need its private "
          "UC metadata (_build_param_uc_restore_meta) or ds_to_universal merges them from one rank",
          "tests/dist/test_resume_relayout.py (tp2 -> tp1)"),
    Patch("count_in_grad_norm", "PipelineModule marks every parameter of a tied module on later stages as "
          "replicated (ds_pipe_replicated), the last stage's final norm included", "tests/dist/test_pipeline.py"),
    Patch("pipeline_grid", "PipelineModule exposes its process grid only as the private `_grid`",
          "tests/dist/test_tp_pp.py"),
    Patch("captured_checkpoint_writes", "engine.save_checkpoint writes synchronously; its DecoupledCheckpointEngine "
          "(checkpoint.writer.decoupled) needs the aio FastFileWriter, a spawned process per rank and commits inside "
          "engine.step, apart from our marker. Swapping engine.checkpoint_engine for one whose save() copies to host "
          "memory lets a thread write the files", "tests/train/test_async_checkpoint.py"),
    Patch("universal surgery (train/universal.py)", "ds_to_universal reads TP merge rules from the first stage's "
          "file only, writes bare tensors for ZeRO-3, and names pipeline parameters by layer index",
          "tests/dist/test_resume_relayout_tp_pp.py"),
)


def check_version(version: Optional[str] = None) -> bool:
    """True on the tested DeepSpeed; otherwise log one warning naming the patches at risk. Reads
    the installed version from the package metadata (importing DeepSpeed takes seconds)."""
    if version is None:
        from importlib.metadata import PackageNotFoundError, version as installed

        try:
            version = installed("deepspeed")
        except PackageNotFoundError:
            return False
    if version.split("+")[0] == TESTED_VERSION:
        return True
    log.warning("DeepSpeed %s is not the tested %s; these workarounds of DeepSpeed internals may break: %s "
                "(see memgpt_dist/parallel/ds_compat.py for the test guarding each)", version, TESTED_VERSION,
                ", ".join(p.name for p in PATCHES))
    return False


check_version()  # once, at import


# --------------------------------------------------------------------------- safe loading
def deepspeed_safe_globals() -> list:
    """The non-tensor classes DeepSpeed pickles into its own checkpoint files."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address  # ZeRO-1/2 optimizer: (numel, start) of a slice

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextlib.contextmanager
def weights_only_loading(engine) -> Iterator[None]:
    """Make DeepSpeed read its checkpoint files with `torch.load(weights_only=True)`.

    Every load of model, optimizer and scheduler state goes through `engine.checkpoint_engine.load`,
    so for the duration of a load that method is shadowed on the instance by one that allows
    tensors, plain containers and the few DeepSpeed classes above, nothing else."""
    ckpt_engine = getattr(engine, "checkpoint_engine", None)
    if ckpt_engine is None:
        yield
        return
    allowed = deepspeed_safe_globals()

    def load(path, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    ckpt_engine.load = load
    try:
        yield
    finally:
        del ckpt_engine.load


@contextlib.contextmanager
def torch_load_weights_only() -> Iterator[None]:
    """Every `torch.load` in this process reads with `weights_only=True` while inside.

    DeepSpeed's universal-checkpoint conversion, loading and ZeRO consolidation call `torch.load`
    directly, so for their duration the function itself is shadowed: same allow-list, nothing else
    unpickled. Single-threaded use only (the conversion runs without worker pools)."""
    original = torch.load
    allowed = deepspeed_safe_globals()

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return original(f, *args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def repair_universal_optimizer_state(engine, universal_tag_dir: Path) -> None:
    """Undo two things DeepSpeed's ZeRO-3 universal load (0.19.8,
    `load_hp_checkpoint_state_from_checkpoint_dir_stage3`) gets wrong for more than one param group.

    1. It copies every key of saved group 0 into every group, its name included: weight decay
       would hit the norms, biases and memory gates, and the gates would lose their learning-rate
       multiplier. The torch optimizer inside ZeRO holds one group per group we passed, in that
       order, at every layout and stage, so saved group i is group i.
    2. It gives every group's Adam state the same `step` tensor object; torch's AdamW increments
       it in place once per group, so the groups' bias corrections would run ahead.
    ZeRO-1/2 restore both per group already; doing it again there changes nothing. Raises
    ValueError when the group counts differ."""
    saved = torch.load(universal_tag_dir / "zero" / "optimizer_state.pt", map_location="cpu",
                       weights_only=True)["param_groups"]
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch optimizer inside ZeRO's
    if len(saved) != len(optimizer.param_groups):
        raise ValueError(f"{universal_tag_dir}: the saved optimizer has {len(saved)} parameter groups, this "
                         f"model has {len(optimizer.param_groups)}; resume with the layout that wrote it")
    for group, source in zip(optimizer.param_groups, saved):
        group.update({k: v for k, v in source.items() if k != "params"})
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


# --------------------------------------------------------------------------- engines
def step_by_whole_model_norm(engine, clip: float, before_update: Callable[[float], None],
                             grad_norm: Callable[..., float]) -> None:
    """Make a ZeRO-0 fp32 pipeline engine clip by the whole model's gradient norm.

    DeepSpeed clips these gradients with `clip_grad_norm_(mpu=grid)`, which counts a replicated
    parameter only where the grid's model-parallel rank is 0, so the later stages' parameters are
    left out and no norm is reported. Here `_take_model_step` first computes the whole model's
    norm (`grad_norm(module, tp_group, pipe_group)`: the same value on every rank), records it as
    the engine's global norm, calls `before_update(norm)` (which may raise: ZeRO-0 cannot skip a
    non-finite update) and scales the gradients by min(1, clip / (norm + 1e-6)) as DeepSpeed does;
    DeepSpeed's own clipping is switched off."""
    take_model_step = engine._take_model_step
    grid = engine.grid
    tp_group = grid.get_slice_parallel_group() if grid.get_slice_parallel_world_size() > 1 else None

    def take_step(lr_kwargs=None):
        norm = grad_norm(engine.module, tp_group, grid.get_pipe_parallel_group())
        engine._global_grad_norm = norm
        before_update(norm)
        coef = clip / (norm + 1e-6)
        if clip > 0 and coef < 1:
            for p in engine.module.parameters():
                if p.grad is not None:
                    p.grad.detach().mul_(coef)
        take_model_step(lr_kwargs)

    engine._take_model_step = take_step
    engine.clip_fp32_gradients = lambda: None  # clipped above, by the right norm


def autotp_mpu(tp_size: int, tp_rank: int, dp_rank: int):
    """DeepSpeed's own (data, tensor) process-group mesh, built before the engine so that its
    batch-size check counts data-parallel ranks (world / tp), not the world; None without TP."""
    if tp_size == 1:
        return None
    from deepspeed.utils import groups

    groups._init_tp_mesh_device(tensor_model_parallel_size=tp_size)  # mesh (dp, tp): tp fastest
    assert (groups.get_tensor_model_parallel_rank(), groups.get_data_parallel_rank()) == (tp_rank, dp_rank), \
        "DeepSpeed's TP mesh disagrees with the Topology the per-head parameters were sliced by"
    return groups


def remove_autotp_input_check(engine) -> None:
    """Drop the check DeepSpeed's AutoTP engine registers on the first forward (it compares every
    argument across TP ranks; the caller installs one that compares the data only)."""
    ds_check = getattr(engine, "first_dataloader_check", None)
    if ds_check is not None:
        ds_check.remove()


def describe_for_universal_checkpoint(shard: nn.Parameter, full_shape: tuple[int, ...], tp: int) -> None:
    """Record on `shard` that it is split along dim 0 like a column-parallel weight, in the
    metadata AutoTP's own layers carry. DeepSpeed collects it into the checkpoint's universal-
    checkpoint info (ds_to_universal merges the ranks' shards by it); a parameter without it
    counts as replicated there, and would be merged from one rank's heads only."""
    from deepspeed.checkpoint.constants import DS_AUTOTP_UC_META
    from deepspeed.module_inject.layers import _build_param_uc_restore_meta, _derive_affine_map

    sizes = (full_shape[0] // tp,) * tp
    affine_map = _derive_affine_map(tp_world_size=tp, logical_shape=full_shape, partition_dim=0, partition_sizes=sizes,
                                    sub_param_shard_widths=None, replicated=False, unsupported_reason=None)
    setattr(shard, DS_AUTOTP_UC_META, _build_param_uc_restore_meta(
        partition_type="column", partition_dim=0, logical_shape=full_shape, output_shape=(full_shape[0],),
        partition_sizes=sizes, target_partition_shape=tuple(shard.shape), original_shape=full_shape,
        affine_map=affine_map))


def count_in_grad_norm(module: nn.Module) -> None:
    """DeepSpeed flags every parameter of a tied module `ds_pipe_replicated` on its non-first
    stages, so that the gradient norm counts the tied weight once; a tied module that also holds
    parameters of its own stage (our head holds ln_f, which exists only on the last stage) must
    have those counted there, or clipping sees a norm without their gradient."""
    for p in module.parameters():
        p.ds_pipe_replicated = False


def pipeline_grid(net):
    """The process grid of a PipelineModule (stage, data and tensor-slicing groups)."""
    return net._grid


# Host copies at least this large are page-aligned (`aligned_host_empty`): the background writer
# sends their bytes to disk with O_DIRECT (`train.checkpoint.HashingFile`). Smaller ones are not
# worth an mmap each.
ALIGNED_COPY_MIN_BYTES = 1 << 16


def aligned_host_empty(like: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous host tensor of `like`'s shape and dtype whose data starts on a
    page boundary (its own anonymous mmap, freed with the tensor), and whose storage holds exactly
    its bytes, as a clone's does: torch.save writes it the same way."""
    numel = like.numel()
    buf = mmap.mmap(-1, numel * like.element_size())
    return torch.frombuffer(buf, dtype=like.dtype, count=numel).view(like.shape)


def _fresh_host_copy(src: torch.Tensor) -> torch.Tensor:
    if src.is_contiguous() and src.numel() * src.element_size() >= ALIGNED_COPY_MIN_BYTES:
        return aligned_host_empty(src).copy_(src)
    return src.to("cpu", copy=True)


def host_copy(obj, into=None, _memo: Optional[dict] = None):
    """A copy of a state dict whose tensors are host tensors of their own (clones), so training can
    go on changing the originals while a thread writes the copy. Non-tensor leaves (DeepSpeed's
    loss scaler, config objects) are deep-copied. Tensors that are the same view of one storage
    (tied weights under two keys) get one copy, which torch.save then writes once, as from the originals.

    `into`: an earlier copy of the same structure whose tensors may be overwritten (nobody reads
    them any more): a tensor of the same shape, dtype and strides there is filled with `copy_`
    instead of a fresh allocation, which saves the page faults of ~1 GB of new memory per save.
    Fresh copies of large contiguous tensors are page-aligned (`aligned_host_empty`)."""
    import copy

    memo = {} if _memo is None else _memo
    if torch.is_tensor(obj):
        src = obj.detach()
        key = (src.data_ptr(), src.dtype, tuple(src.shape), src.stride(), src.device)
        if key not in memo:
            # a buffer is filled once per copy (two keys tied before may not be now)
            reusable = (torch.is_tensor(into) and into.device.type == "cpu" and into.dtype == src.dtype
                        and into.shape == src.shape and into.stride() == src.stride() and into.numel() > 0
                        and into.data_ptr() != src.data_ptr() and ("into", into.data_ptr()) not in memo)
            if reusable:
                memo["into", into.data_ptr()] = True
            memo[key] = into.copy_(src) if reusable else _fresh_host_copy(src)
        return memo[key]
    if isinstance(obj, dict):
        old = into if isinstance(into, dict) else {}
        return type(obj)((k, host_copy(v, old.get(k), memo)) for k, v in obj.items())  # OrderedDict stays ordered
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        old = into if isinstance(into, (list, tuple)) and len(into) == len(obj) else (None,) * len(obj)
        return type(obj)(host_copy(v, o, memo) for v, o in zip(obj, old))
    return copy.deepcopy(obj)


@contextlib.contextmanager
def captured_checkpoint_writes(engine, reuse: Optional[dict[str, object]] = None) -> Iterator[list[tuple[str, object]]]:
    """Within the block, `engine.save_checkpoint` writes nothing: every file it would `torch.save`
    through its checkpoint engine is captured as (path, host copy of the state dict) in the list
    yielded. Directories are still made, and DeepSpeed's direct file copies (zero_to_fp32.py) still
    happen. The caller writes the captured files (`train.checkpoint.AsyncWrite`).

    `reuse`: {file name: its host copy from an earlier save} whose tensors may be overwritten
    (`host_copy(into=...)`); the caller guarantees that no writer still reads them."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    captured: list[tuple[str, object]] = []
    reuse = reuse or {}

    class Capturing(TorchCheckpointEngine):
        def save(self, state_dict, path: str):
            captured.append((str(path), host_copy(state_dict, into=reuse.get(os.path.basename(path)))))

        def preserves_storage_sharing(self):  # host_copy makes compact copies: DeepSpeed need not clone first
            return False

    previous = engine.checkpoint_engine
    engine.checkpoint_engine = Capturing()
    try:
        yield captured
    finally:
        engine.checkpoint_engine = previous
