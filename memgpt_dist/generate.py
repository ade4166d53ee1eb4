"""Load a trained run for inference and sample from it, streaming through the memory.

Weights are consolidated from the DeepSpeed checkpoint with DeepSpeed's own
`get_fp32_state_dict_from_zero_checkpoint` (ZeRO-1/2/3) or read from the model-states file
(ZeRO-0); a tensor-parallel checkpoint's shards are merged by `consolidated_tp_state_dict`, and a
pipeline checkpoint's per-layer files (one set per TP rank with TP inside the stages) by
`pipeline_state_dict`. The prompt is read segment by segment: each full segment is written into
the memory state, and tokens of the current, partial segment attend locally (through a key/value
cache of that segment) and read that state.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from memgpt_dist.config import TrainConfig, config_from_json
from memgpt_dist.model import GPT
from memgpt_dist.parallel.ds_compat import torch_load_weights_only
from memgpt_dist.parallel.pipeline import pipeline_to_model_name
from memgpt_dist.train.checkpoint import (CheckpointError, committed_step_dirs, is_committed, read_marker,
                                          verify_step_dir)

log = logging.getLogger("memgpt_dist")


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 100
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 0.95
    seed: int = 0


def find_checkpoint(path: Path, step: Optional[int] = None) -> Path:
    """A committed, intact checkpoint directory from a run dir, a checkpoints dir or a step dir.
    Without `step`, the newest one whose files verify (damaged newer ones are named and skipped,
    as `--resume auto` does); a given step or step dir must verify itself."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass --checkpoint RUN_DIR of a training run")
    if is_committed(path):
        return _verified(path)
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = committed_step_dirs(root)
    if not steps:
        raise CheckpointError(f"no committed checkpoint under {root}; train with checkpoint.every > 0 or "
                              f"checkpoint.save_at_end: true first")
    if step is not None:
        if step not in steps:
            raise CheckpointError(f"no committed checkpoint for step {step} under {root}; available: {sorted(steps)}")
        return _verified(steps[step])
    for s in sorted(steps, reverse=True):
        problem = verify_step_dir(steps[s])
        if problem is None:
            return steps[s]
        log.warning("skipping checkpoint %s: %s; trying the previous one", steps[s], problem)
    raise CheckpointError(f"no intact checkpoint under {root}: every committed one is damaged (see above)")


def _verified(step_dir: Path) -> Path:
    problem = verify_step_dir(step_dir)
    if problem:
        raise CheckpointError(f"checkpoint {step_dir} is damaged: {problem}; pass another --step or the run directory")
    return step_dir


def checkpoint_config(ckpt_dir: Path) -> TrainConfig:
    """The run configuration a checkpoint was saved with (from its commit marker)."""
    return config_from_json(read_marker(ckpt_dir)["meta"]["config"])


def load_model(ckpt_dir: Path) -> tuple[GPT, TrainConfig]:
    """Rebuild the model of a checkpoint with consolidated fp32 weights, in eval mode."""
    cfg = checkpoint_config(ckpt_dir)
    model = GPT(cfg.model, cfg.memory)
    with torch_load_weights_only():  # DeepSpeed's consolidation reads with weights_only=False otherwise
        state = consolidated_state_dict(ckpt_dir, cfg.parallel.zero_stage, cfg.parallel.tp)
    model.load_state_dict(state)
    return model.eval(), cfg


def consolidated_state_dict(ckpt_dir: Path, zero_stage: int, tp: int = 1) -> dict[str, torch.Tensor]:
    """The whole model's fp32 weights under the GPT's names, from a checkpoint of any layout."""
    if any(ckpt_dir.glob("layer_*-model_states.pt")):  # written by the pipeline engine, one file per layer
        return pipeline_state_dict(ckpt_dir, tp)
    if tp > 1:  # one shard per tensor-parallel rank
        from memgpt_dist.parallel.tensor_parallel import consolidated_tp_state_dict

        return consolidated_tp_state_dict(ckpt_dir, zero_stage, tp)
    if zero_stage == 0:
        states = torch.load(ckpt_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        return states["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # DeepSpeed reports its progress with print(); keep stdout for the generated text alone.
    with contextlib.redirect_stdout(sys.stderr):
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name)


def pipeline_state_dict(ckpt_dir: Path, tp: int = 1) -> dict[str, torch.Tensor]:
    """The GPT's state dict from a pipeline checkpoint's per-layer files (fp32).

    DeepSpeed writes `layer_LL-model_TT-model_states.pt` per layer LL and TP rank TT; with TP
    inside the stages (tp > 1) each rank's file holds its heads' shards, merged by the TP rules
    (`tensor_parallel.merge_tp_shards`)."""
    shards = [_pipeline_tp_shard(ckpt_dir, t) for t in range(tp)]
    if tp == 1:
        return shards[0]
    from memgpt_dist.parallel.tensor_parallel import merge_tp_shards

    for t, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(shards[0]):
            raise CheckpointError(f"{ckpt_dir}: the layer files of TP rank {t} hold other parameters than TP rank "
                                  f"0's ({sorted(set(shard) ^ set(shards[0]))[:4]}); the checkpoint is incomplete")
    return merge_tp_shards(shards)


def _pipeline_tp_shard(ckpt_dir: Path, tp_rank: int) -> dict[str, torch.Tensor]:
    """One TP rank's parameters under the GPT's names. Layer 0 is the embedding, layer i + 1
    holds block i under "block.", the last layer the final norm and the tied head (the
    embedding's weight again, so it is read once)."""
    files = sorted(ckpt_dir.glob(f"layer_*-model_{tp_rank:02d}-model_states.pt"), key=lambda f: int(f.name[6:8]))
    if not files:
        raise CheckpointError(f"{ckpt_dir} has no layer_*-model_{tp_rank:02d}-model_states.pt for tensor-parallel "
                              f"rank {tp_rank}; the checkpoint is incomplete")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        index = int(f.name[6:8])
        for key, value in torch.load(f, map_location="cpu", weights_only=True).items():
            name = pipeline_to_model_name(f"{index}.{key}") or key  # the tied layers' keys are the GPT's
            out.setdefault(name, value.float())
    return out


def _sample_next(logits: torch.Tensor, s: SamplingConfig, gen: torch.Generator) -> torch.Tensor:
    """Sample one id per row from (B, V) logits with temperature, top-k and nucleus filtering: (B,)."""
    if s.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True, dim=-1)
        drop = sorted_p.cumsum(-1) - sorted_p > s.top_p  # keep the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate_tokens(model: GPT, prompts: torch.Tensor, s: SamplingConfig,
                    eos_id: Optional[int] = None) -> torch.Tensor:
    """Continue prompts (B, T) of one length by up to `s.max_new_tokens` tokens each: (B, new).

    The prompt is read as in training (`GPT.prefill`), then each new token costs one `GPT.step`
    against the open segment's key/value cache, O(segment) instead of re-reading the segment.
    As in training, the last token of a full segment predicts the first token of the next one,
    so a segment is committed to memory right after its last position has been read. Stops early
    once every row has sampled `eos_id`."""
    gen = torch.Generator().manual_seed(s.seed)
    if s.max_new_tokens <= 0:
        return prompts.new_zeros(prompts.shape[0], 0)
    logits, cache = model.prefill(prompts)
    new = [_sample_next(logits[:, -1], s, gen)]
    while len(new) < s.max_new_tokens and not (eos_id is not None and bool(torch.stack(new).eq(eos_id).any(0).all())):
        new.append(_sample_next(model.step(new[-1].unsqueeze(1), cache)[:, -1], s, gen))
    return torch.stack(new, dim=1)


def generate(model: GPT, prompt_ids: list[int], s: SamplingConfig, eos_id: Optional[int] = None) -> list[int]:
    """Continue one prompt by up to `s.max_new_tokens` tokens, stopping after `eos_id`; the new ids."""
    ids = list(prompt_ids) or [eos_id if eos_id is not None else 0]
    new = generate_tokens(model, torch.tensor([ids]), s, eos_id)[0].tolist()
    return new[:new.index(eos_id) + 1] if eos_id in new else new
