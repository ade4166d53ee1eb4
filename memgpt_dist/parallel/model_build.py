"""Building only what a rank holds: ZeRO-3 partitions at construction, a pipeline stage its layers.

Without this every rank builds the whole model in fp32 before it keeps its share: at 7B that is
28 GB on each of a node's ranks before training starts. Two builds avoid it, each giving exactly
the weights of a whole build:

* **Partitioned (`zero.Init`)**, ZeRO-3 without TP (`parallel.zero_stage: 3`, `parallel.tp: 1`,
  `parallel.zero_init: true`, the default): each module's parameters are partitioned over the
  data-parallel ranks as soon as the module is built (DeepSpeed's own path, the one Hugging Face's
  `from_pretrained` takes under ZeRO-3), so a rank's peak is its partition plus one module whole.
  `GPT.init_weights` and the Hugging Face import (`memgpt_dist.hf.convert`) then set one module
  (or one tensor) at a time inside `GatheredParameters(modifier_rank=0)`, every rank drawing the
  same values in the same order; on leaving, rank 0's values are partitioned again. (AutoTP splits
  whole Linear layers inside `deepspeed.initialize`, so TP layouts build whole.) With bf16 or fp16
  zero.Init creates the parameters in that dtype: the weights are the whole build's rounded, and
  the fp32 master copy starts from them (Hugging Face's ZeRO-3 loading does the same); in fp32 they
  are the whole build's exactly.
* **Stage only (meta device)**, pipelines: the model is built on the meta device and only the
  parameters of the rank's stage (`shares.stage_parameter_names`, the split DeepSpeed's
  PipelineModule makes) get storage. `init_weights` gives every other module storage for the
  moment it is initialised (`on_host_while`), so the random draws, and the stage's weights, are
  those of a whole build; the import skips what the stage does not hold.

In both, the init is drawn from the run seed reseeded after construction, so it does not depend on
what construction drew.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import math
from typing import TYPE_CHECKING, Any, ContextManager, Iterable, Iterator

from memgpt_dist.config import ParallelConfig

if TYPE_CHECKING:  # torch and deepspeed are imported only where used: the dry run needs neither
    from torch import nn


def builds_partitioned(par: ParallelConfig) -> bool:
    """Whether the model is built under `zero.Init` in this layout (see the module docstring)."""
    return par.zero_init and par.zero_stage == 3 and par.tp == 1 and par.pp == 1


@contextlib.contextmanager
def partitioned_construction(ds_config: dict[str, Any]) -> Iterator[None]:
    """The context to build the model in: modules built inside it are partitioned at once."""
    import deepspeed
    from torch.nn.modules.module import register_module_module_registration_hook

    # a module's whole tensors are freed once partitioned; hand their pages back before the next
    hook = register_module_module_registration_hook(lambda *args: _release_free_memory())
    try:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            yield
    finally:
        hook.remove()
        _release_free_memory()


def whole_module(module: nn.Module) -> ContextManager:
    """`module`'s own parameters gathered whole; rank 0's values are kept on leaving."""
    return whole_parameters(module.parameters(recurse=False))


def whole_parameters(params: Iterable[nn.Parameter]) -> ContextManager:
    """Partitioned parameters among `params` gathered whole; others are left as they are."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    return _gathered(partitioned) if partitioned else contextlib.nullcontext()


@contextlib.contextmanager
def _gathered(params: list[nn.Parameter]) -> Iterator[None]:
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        yield
    _release_free_memory()


def _release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc `malloc_trim`; a no-op elsewhere). The
    whole tensors a gather or a module's construction freed otherwise stay resident in malloc's
    arenas (gloo's threads allocate in their own), and the build's peak grew to the whole model's
    (benchmarks/zero_init_memory.py: 0.95x of the whole build without this)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _find_malloc_trim():
    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None


_MALLOC_TRIM = _find_malloc_trim()


def full_shape(p: nn.Parameter) -> tuple[int, ...]:
    """The shape of parameter `p` whole (a partitioned one's local tensor is empty)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def held_share(model: nn.Module) -> str:
    """'N of M parameters' this rank holds of a model built partitioned (for the log)."""
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    whole = sum(math.prod(full_shape(p)) for p in model.parameters())
    return f"{held:,} of {whole:,} parameters"


# ------------------------------------------------------------------------------- stage only
def hold_only(model: nn.Module, held: frozenset[str]) -> None:
    """Give storage (host memory, uninitialised) to the parameters named in `held` of a model built
    on the meta device; the others stay on meta. A module is held whole or not at all."""
    for prefix, module in model.named_modules():
        own = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)]
        kept = [n for n in own if n in held]
        if kept and len(kept) != len(own):
            raise RuntimeError(f"{prefix} is split between pipeline stages ({sorted(set(own) - set(kept))} elsewhere)")
        if kept:
            module.to_empty(device="cpu", recurse=False)


@contextlib.contextmanager
def on_host_while(module: nn.Module) -> Iterator[None]:
    """`module`'s own parameters with storage for the block when they are on the meta device (a
    module another stage holds: it is initialised for the random draws, then dropped again)."""
    if not any(p.is_meta for p in module.parameters(recurse=False)):
        yield
        return
    module.to_empty(device="cpu", recurse=False)
    try:
        yield
    finally:
        module.to_empty(device="meta", recurse=False)


def require_held(net: nn.Module, what: str) -> None:
    """Every parameter of the built stage has storage (the split `hold_only` used was DeepSpeed's)."""
    meta = [n for n, p in net.named_parameters() if p.is_meta]
    if meta:
        raise RuntimeError(f"{what}: parameters {meta[:4]} were not built on this rank; the stage split of "
                           f"memgpt_dist/parallel/shares.py:stage_parameter_names differs from DeepSpeed's")
