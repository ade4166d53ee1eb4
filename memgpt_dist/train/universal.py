"""Resume on a different layout, on disk: dp, tp, pp or ZeRO stage changed since the checkpoint was written.

Each rank's DeepSpeed files hold its own shard (of the weights, of ZeRO's fp32 master weights and
Adam moments), so they fit only the layout that wrote them. On `--resume auto` with another
layout the checkpoint is converted once by DeepSpeed's Universal Checkpointing
(`deepspeed.checkpoint.ds_to_universal`: one folder of whole fp32 tensors per parameter, TP
shards merged by the AutoTP metadata the model carries) into `<step_dir>/universal/`, next to
the original files, which are never modified; the engine is then built with
`checkpoint.load_universal` and each rank slices what it needs. A finished conversion is reused.
What is per rank and not DeepSpeed's (loader cursors, memory, RNG) is redistributed by
`train.redistribute`.

A layout change keeps the run's S = dp x micro_batch_size data streams and the global batch (the
micro-batch size absorbs the change of dp: dp2 x mb 2 -> dp1 x mb 4), so every stream continues
from its saved cursor on whichever rank now holds it. A change of S would re-cut the shards
between streams mid-epoch, which cannot continue exactly, and is refused with the micro-batch
size to set.

Pipelines: a pipeline checkpoint's parameters are named by PipelineModule layer; the conversion
renames them to the GPT's names and links the GPT's names back under the pipeline's, so one
universal checkpoint loads into either (pp2 -> pp1, pp1 -> pp2).

Tensor parallelism inside pipeline stages (tp x pp): DeepSpeed's conversion takes its TP merge
rules from the first model-states file only, which describes the first stage's layers; it is
given a view of the checkpoint whose first file carries every stage's rules
(`stage_with_every_stage_info`). Loading slices each parameter by the TP metadata of the loading
model's own layers, so a universal checkpoint loads into tp x pp as into any other layout.

Not supported: ZeRO-0 on either side (DeepSpeed's conversion reads ZeRO optimizer partitions, and
its universal load restores weights only through a ZeRO optimizer).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from memgpt_dist.config import ConfigError
from memgpt_dist.parallel.layout import Layout
from memgpt_dist.parallel.pipeline import model_to_pipeline_name, pipeline_to_model_name
from memgpt_dist.parallel.ds_compat import torch_load_weights_only
from memgpt_dist.train.checkpoint import CheckpointError, fsync_dir

log = logging.getLogger("memgpt_dist")

UNIVERSAL_DIR = "universal"  # inside a checkpoint's step directory
DONE = "CONVERTED.json"  # written inside the conversion before it is renamed into place


@dataclass(frozen=True)
class LayoutChange:
    """A resume whose checkpoint was written by another layout."""

    saved: Layout
    now: Layout


def check_layout_change(saved: Layout, now: Layout) -> Optional[LayoutChange]:
    """None for the same layout; the change when it can continue the run exactly; otherwise a
    ConfigError that says what to set."""
    if saved.same_shards(now):
        if saved != now:
            raise ConfigError(_streams_message(saved, now))
        return None
    if saved.streams != now.streams or saved.grad_accum != now.grad_accum:
        raise ConfigError(_streams_message(saved, now))
    if 0 in (saved.zero_stage, now.zero_stage):
        raise ConfigError(f"--resume: the checkpoint was written by {saved}, this run is {now}; a ZeRO-0 checkpoint "
                          f"cannot be converted or loaded on another layout (DeepSpeed's universal checkpoint reads and "
                          f"restores ZeRO optimizer partitions). Resume with the saved layout, or use "
                          f"parallel.zero_stage >= 1 on both sides")
    return LayoutChange(saved=saved, now=now)


def _streams_message(saved: Layout, now: Layout) -> str:
    fix = (f"set parallel.micro_batch_size={saved.streams // now.dp} and parallel.grad_accum={saved.grad_accum}"
           if saved.streams % now.dp == 0 else
           f"launch a number of ranks whose data-parallel degree divides {saved.streams}")
    return (f"--resume: the checkpoint was written by {saved} with {saved.streams} data streams (dp x "
            f"micro_batch_size) and grad_accum {saved.grad_accum}; this run is {now} with {now.streams} streams and "
            f"grad_accum {now.grad_accum}. The streams and the global batch must stay the same for the run to "
            f"continue its data exactly: {fix}")


# ---------------------------------------------------------------------------- conversion
def universal_root(step_dir: Path) -> Path:
    """Where the universal form of a checkpoint lives; DeepSpeed loads it as tag `step_dir.name`."""
    return step_dir / UNIVERSAL_DIR


def ensure_universal(step_dir: Path, saved: Layout, topo) -> tuple[Path, Optional[float]]:
    """The universal form of checkpoint `step_dir` (collective). Rank 0 converts it when no
    finished conversion exists; returns (its root, seconds the conversion took or None when an
    earlier one was reused). Every rank raises if the conversion fails."""
    root = universal_root(step_dir)
    seconds, problem = None, None
    if topo.is_main and root.exists() and not (root / DONE).is_file():
        # not a conversion of ours (each writes its DONE record before it is renamed into place)
        problem = (f"{root} exists but was not written by memgpt-dist (it has no {DONE}); it was left untouched. "
                   f"Move it away to let the resume convert the checkpoint itself")
    elif topo.is_main and not (root / DONE).is_file():
        try:
            seconds = convert_to_universal(step_dir, saved)
        except Exception as exc:  # noqa: BLE001 - reported on every rank, or the others wait forever
            problem = f"{type(exc).__name__}: {exc}"
    problem = topo.broadcast_object(problem)
    if problem:
        raise CheckpointError(f"converting {step_dir} to a universal checkpoint failed ({problem}); the checkpoint "
                              f"itself is untouched: resume with the layout that wrote it ({saved}) or fix the above")
    topo.barrier()
    return root, seconds


def convert_to_universal(step_dir: Path, saved: Layout) -> float:
    """Run DeepSpeed's ds_to_universal on `step_dir` into `<step_dir>/universal` atomically: into
    a temporary sibling first, renamed into place with its DONE record. Returns the seconds taken."""
    from deepspeed.checkpoint import ds_to_universal

    t0 = time.perf_counter()
    root = universal_root(step_dir)
    for leftover in step_dir.glob(f"{UNIVERSAL_DIR}.tmp-*"):  # a conversion killed half-way
        shutil.rmtree(leftover, ignore_errors=True)
    work = step_dir / f"{UNIVERSAL_DIR}.tmp-{os.getpid()}"
    # only with TP inside pipeline stages do the model-states files describe different layers
    source = step_dir if saved.tp == 1 or saved.pp == 1 else stage_with_every_stage_info(step_dir, work / "source")
    args = argparse.Namespace(input_folder=str(source), output_folder=str(work / step_dir.name),
                              num_extract_workers=1, num_merge_workers=1,  # no forked pools next to gloo threads
                              keep_temp_folder=False, strict=True,
                              # ZeRO-1/2 checkpoints carry universal_checkpoint_info only when AutoTP
                              # wrote it; without TP the version stamp alone is all the merge needs
                              inject_missing_state=True)
    chatter = io.StringIO()  # its prints and progress bars; kept for the error message
    try:
        with torch_load_weights_only(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal.main(args)
    except Exception as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise RuntimeError(f"{exc}; ds_to_universal said: {chatter.getvalue()[-2000:]}") from exc
    shutil.rmtree(work / "source", ignore_errors=True)
    add_model_state_aliases(work / step_dir.name)
    complete_optimizer_state(work / step_dir.name / "zero", bare_tensors=saved.zero_stage == 3)
    if saved.pp > 1:
        rename_pipeline_parameters(work / step_dir.name / "zero")
    link_pipeline_names(work / step_dir.name / "zero")
    seconds = time.perf_counter() - t0
    (work / DONE).write_text(json.dumps({"source": str(step_dir), "layout": str(saved), "seconds": seconds}))
    os.replace(work, root)  # the caller refused an existing root that is not ours
    fsync_dir(step_dir)
    return seconds


def stage_with_every_stage_info(step_dir: Path, staged: Path) -> Path:
    """A view of checkpoint `step_dir` for DeepSpeed's conversion when TP runs inside pipeline
    stages: a symlink to every file, except the first model-states file, rewritten with the
    union of all stages' universal-checkpoint info. Returns `staged`.

    The conversion reads that info (how each TP-split parameter merges: row-parallel along dim 1,
    replicated ones from one rank) from the first model-states file alone, and each stage records
    only its own layers. Without the union the later stages' row-parallel weights were joined
    along dim 0 and their replicated norms and biases stacked tp times (tp2 x pp2: 10 of 53
    tensors with the wrong shape)."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    staged.mkdir(parents=True)
    for f in (f for f in step_dir.iterdir() if f.is_file()):
        os.symlink(f.resolve(), staged / f.name)
    model_files = sorted(step_dir.glob("mp_rank_*_model_states.pt"))  # mp rank = pp stage x tp + tp rank
    with torch_load_weights_only():
        states = [torch.load(f, map_location="cpu") for f in model_files]
    first = states[0]
    first[UNIVERSAL_CHECKPOINT_INFO] = merge_universal_info([s.get(UNIVERSAL_CHECKPOINT_INFO) or {} for s in states])
    (staged / model_files[0].name).unlink()
    torch.save(first, staged / model_files[0].name)
    return staged


def merge_universal_info(infos: list[dict[str, Any]]) -> dict[str, Any]:
    """One universal-checkpoint info describing the parameters of every stage: the pattern
    lists joined (each pattern once), the per-parameter maps (AutoTP's affine map by pattern)
    merged; a value two stages both record must agree."""
    merged: dict[str, Any] = {}
    for info in infos:
        for key, value in info.items():
            if isinstance(value, list) and isinstance(merged.get(key), list):
                merged[key] += [v for v in value if v not in merged[key]]
            else:
                _merge_mapping(merged, key, value, where=key)
    return merged


def _merge_mapping(into: dict[str, Any], key: str, value: Any, where: str) -> None:
    if key not in into:
        into[key] = copy.deepcopy(value)
    elif isinstance(value, dict) and isinstance(into[key], dict):
        for k, v in value.items():
            _merge_mapping(into[key], k, v, where=f"{where}.{k}")
    elif into[key] != value:
        raise CheckpointError(f"the pipeline stages' universal-checkpoint info disagree on {where} "
                              f"({into[key]!r} != {value!r}); resume with the layout that wrote the checkpoint")


def add_model_state_aliases(tag_dir: Path) -> None:
    """Make the converted model-state files findable by an engine of any ZeRO stage.

    A universal load reads only metadata from them (step counters, scheduler, our client state;
    the weights come from `zero/`), but under the file name of the *loading* engine's stage:
    `zero_pp_rank_0_mp_rank_XX_model_states.pt` for ZeRO-3, `mp_rank_XX_model_states.pt`
    otherwise, while the conversion copies the names of the writing stage. Each is hard-linked
    (copied where links are refused) under the other name."""
    for f in sorted(tag_dir.glob("*mp_rank_*_model_states.pt")):
        m = re.match(r"^(zero_pp_rank_(\d+)_)?(mp_rank_\d+_model_states\.pt)$", f.name)
        if m is None or (m.group(2) not in (None, "0")):
            continue
        alias = tag_dir / (m.group(3) if m.group(1) else f"zero_pp_rank_0_{m.group(3)}")
        if not alias.exists():
            try:
                os.link(f, alias)
            except OSError:
                shutil.copy2(f, alias)


def complete_optimizer_state(zero_dir: Path, bare_tensors: bool) -> None:
    """Give the converted optimizer state what the loader of the *other* ZeRO family reads.

    DeepSpeed's ZeRO-3 universal load takes Adam's step from `optimizer_state.pt`
    (["optimizer_state_dict"]["state"][0]["step"]), its ZeRO-1/2 load from a `step.pt` in every
    parameter's folder and checks `optimizer_state.pt` for a "ds_version"; a conversion writes
    only what its own stage's loader reads, so a stage change (3 -> 1, 1 -> 3) finds them
    missing. The step is the same for every parameter (one optimizer step count per run).
    Likewise the ZeRO-1/2 load reads each state file as {"param": tensor}, and the conversion of
    a ZeRO-3 checkpoint without TP writes bare tensors (`bare_tensors`: the source was ZeRO-3,
    so look; the ZeRO-3 load takes both)."""
    from deepspeed import __version__ as ds_version
    from deepspeed.checkpoint.constants import PARAM

    with torch_load_weights_only():
        state = torch.load(zero_dir / "optimizer_state.pt", map_location="cpu")
        step = _saved_step(state, zero_dir)
    state.setdefault("ds_version", ds_version)
    state.setdefault("optimizer_state_dict", {"state": {0: {"step": step}}, "param_groups": state["param_groups"]})
    torch.save(state, zero_dir / "optimizer_state.pt")
    for folder in (f for f in zero_dir.iterdir() if f.is_dir()):
        for file in (f for f in folder.glob("*.pt") if bare_tensors and f.name != "step.pt"):
            with torch_load_weights_only():
                saved = torch.load(file, map_location="cpu")
            if torch.is_tensor(saved):  # with TP, ZeRO-3 is merged by the ZeRO-1/2 code: dicts already
                torch.save({PARAM: saved}, file)
        if not (folder / "step.pt").exists():
            torch.save(step, folder / "step.pt")


def _saved_step(state: dict[str, Any], zero_dir: Path):
    inner = state.get("optimizer_state_dict", {}).get("state", {})
    if inner:
        return inner[0]["step"]
    first = next(f for f in sorted(zero_dir.glob("*/step.pt")))
    return torch.load(first, map_location="cpu")


def rename_pipeline_parameters(zero_dir: Path) -> None:
    """A pipeline checkpoint names parameters by PipelineModule layer ("3.block.attn.q_proj.weight",
    "tied_modules.embed.wte.weight"); the GPT loading it names them "blocks.2.attn.q_proj.weight",
    "wte.weight". Layer 0 is the embedding, layer i + 1 block i (`pipeline.pipeline_specs`)."""
    for folder in list(zero_dir.iterdir()):
        name = pipeline_to_model_name(folder.name)
        if name is not None and name != folder.name:
            os.replace(folder, zero_dir / name)


def link_pipeline_names(zero_dir: Path) -> None:
    """Symlink each GPT parameter folder under its PipelineModule name too, so a pipeline engine
    (which looks parameters up by those names) loads the same universal checkpoint."""
    for folder in list(zero_dir.iterdir()):
        name = model_to_pipeline_name(folder.name)
        if folder.is_dir() and name is not None and not (zero_dir / name).exists():
            os.symlink(folder.name, zero_dir / name)
