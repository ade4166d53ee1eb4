"""Typed run configuration: one frozen dataclass per concern, composed into `TrainConfig`.

Precedence: dataclass defaults, then the YAML file, then dotted CLI overrides
(`--model.n_layer=4` or `model.n_layer=4`). Unknown keys, wrong types and bad combinations
raise `ConfigError` at load time with a message that names the key and says what to change.
Derived values (dp degree, tokens per step) are computed by properties, never written back.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the key."""


@dataclass(frozen=True)
class ModelConfig:
    """GPT decoder shape. Attention is causal within a segment of `segment_len` tokens."""

    vocab_size: int = 4096  # must be >= the tokenizer's vocabulary size
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    segment_len: int = 64  # N: tokens per segment; positions restart in every segment
    position: str = "rope"  # "rope" or "learned"
    rope_theta: float = 10000.0
    mlp_ratio: int = 4
    dropout: float = 0.0
    bias: bool = True
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self) -> None:
        _check(self.n_embd % self.n_head == 0,
               f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}")
        _check(self.position in ("rope", "learned"),
               f"model.position={self.position!r}: use 'rope' or 'learned'")
        _check(self.position != "rope" or self.head_dim % 2 == 0,
               f"model.position='rope' needs an even head_dim, got {self.head_dim}")
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "segment_len", "mlp_ratio"):
            _check(getattr(self, name) > 0, f"model.{name} must be > 0")
        _check(0.0 <= self.dropout < 1.0, "model.dropout must be in [0, 1)")


@dataclass(frozen=True)
class MemoryConfig:
    """Per-layer, per-head associative memory (DPFP features, gated delta-rule write)."""

    enabled: bool = True  # false: the plain GPT with segment-local attention (baseline)
    kind: str = "head"  # "head": one memory per attention head
    nu: int = 3  # DPFP order: keys have 2*nu*head_dim features
    eps: float = 1e-5  # denominator guard of the normalised read
    gate_init: float = 0.0  # initial beta_h; the mix gate is g_h = sigmoid(beta_h)
    write_gate_bias_init: float = 0.0  # initial bias of the per-token write gate b_t
    # Taps of a depthwise causal convolution (inside each segment) on the memory q, k, v: with
    # >= 2 a token's memory key can hold the token before it (a key written at its value), the
    # short convolution that DeltaNet-style recall depends on. 0 or 1: no convolution.
    conv: int = 4

    def validate(self) -> None:
        _check(self.kind in ("head", "delta"), f"memory.kind={self.kind!r}: supported kinds are 'head' and 'delta'")
        _check(self.nu >= 1 or (self.kind == "delta" and self.nu == 0),
               "memory.nu must be >= 1 (0, raw unit-length keys, only with memory.kind='delta')")
        _check(self.eps > 0, "memory.eps must be > 0")
        _check(self.conv >= 0, "memory.conv must be >= 0 (0: no convolution)")


@dataclass(frozen=True)
class DataConfig:
    """Where the prepared shards are and how samples are cut from them."""

    path: str = "data/default"  # directory written by memgpt-prepare (holds manifest.json)
    n_segments: int = 4  # K: consecutive segments per sample (BPTT depth)
    seed: int = 1234  # shard permutation seed (with the epoch)
    num_workers: int = 0  # shard-reading worker processes per rank
    max_skip_fraction: float = 0.01  # fail when more than this fraction of samples is skipped
    tokenizer: str = ""  # optional tokenizer.json whose hash must match the shards'
    verify_checksums: bool = True  # sha256 of every shard against the manifest when first opened
    # Blend other prepared corpora (same tokenizer) into training: "PATH:WEIGHT[,PATH:WEIGHT]";
    # data.path gets the remaining weight. E.g. "data/recall:0.05" for 95% text, 5% recall.
    mix: str = ""
    # Curriculum over K: "STEP:K[,STEP:K]" uses K segments per training sample from STEP on,
    # e.g. "0:2,500:4,1000:8"; empty: data.n_segments throughout (validation always uses it).
    n_segments_schedule: str = ""

    def n_segments_at(self, step: int) -> int:
        """Segments per training sample for the optimizer step with 0-based index `step`."""
        k = self.n_segments
        for start, value in self._schedule():
            if step >= start:
                k = value
        return k

    def _schedule(self) -> list[tuple[int, int]]:
        out = []
        for item in filter(None, (x.strip() for x in self.n_segments_schedule.split(","))):
            start, sep, k = item.partition(":")
            _check(sep == ":" and start.isdigit() and k.isdigit() and int(k) >= 1,
                   f"data.n_segments_schedule item {item!r}: write STEP:K with integers, K >= 1")
            out.append((int(start), int(k)))
        _check([s for s, _ in out] == sorted({s for s, _ in out}),
               "data.n_segments_schedule steps must be distinct and increasing")
        return out

    def mix_sources(self) -> list[tuple[str, float]]:
        """[(path, weight)] of data.mix, main corpus first with the remaining weight."""
        extra = []
        for item in filter(None, (x.strip() for x in self.mix.split(","))):
            path, sep, weight = item.rpartition(":")
            try:
                w = float(weight)
            except ValueError:
                w = -1.0
            _check(bool(sep) and bool(path) and 0.0 < w < 1.0,
                   f"data.mix item {item!r}: write PATH:WEIGHT with 0 < WEIGHT < 1")
            extra.append((path, w))
        rest = 1.0 - sum(w for _, w in extra)
        _check(rest > 0.0, f"data.mix weights sum to {1 - rest:g}; they must leave weight for data.path")
        return [(self.path, rest), *extra]

    def validate(self) -> None:
        _check(self.n_segments >= 1, "data.n_segments must be >= 1")
        _check(self.num_workers >= 0, "data.num_workers must be >= 0")
        _check(0.0 <= self.max_skip_fraction < 1.0, "data.max_skip_fraction must be in [0, 1)")
        self.mix_sources()
        self._schedule()


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup + cosine decay; the memory mix gates get their own group."""

    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 10
    grad_clip: float = 1.0
    mem_gate_lr_mult: float = 5.0  # gates learn faster and get no weight decay (HF Infini lesson)

    def validate(self) -> None:
        _check(self.lr > 0, "optim.lr must be > 0")
        _check(0 <= self.min_lr <= self.lr, "optim.min_lr must be in [0, optim.lr]")
        _check(self.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
        _check(self.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 disables clipping)")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1/beta2 must be in [0, 1)")


@dataclass(frozen=True)
class ParallelConfig:
    """Layout and DeepSpeed engine options. dp is derived: world_size / (tp * pp).

    Two families of layouts run on DeepSpeed: ZeRO-0..3 x tensor parallel x data parallel, and
    pipeline (1F1B) x tensor parallel x data parallel with ZeRO-0/1 (DeepSpeed's PipelineEngine
    refuses ZeRO-2/3). Checks that need the model or the world size live in
    `memgpt_dist.parallel.layout.validate_layout`.
    """

    zero_stage: int = 3
    micro_batch_size: int = 4  # samples per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step (also the pipeline's micro-batches)
    tp: int = 1  # tensor-parallel degree: splits attention heads (and their memory) and the MLP
    pp: int = 1  # pipeline-parallel degree: stages of consecutive blocks
    # Samples per optimizer step over all ranks; 0: micro_batch_size * grad_accum * dp. When set
    # it is a check that the layout gives this batch at the world size it runs with.
    global_batch_size: int = 0
    pp_partition: str = "parameters"  # how blocks are split into stages: "parameters" or "uniform"
    precision: str = "auto"  # "auto" (bf16 on GPUs that have it, else fp32), "fp32", "bf16", "fp16"
    activation_checkpointing: bool = False

    def validate(self) -> None:
        _check(self.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage={self.zero_stage}: use 0, 1, 2 or 3")
        _check(self.micro_batch_size >= 1, "parallel.micro_batch_size must be >= 1")
        _check(self.grad_accum >= 1, "parallel.grad_accum must be >= 1")
        _check(self.tp >= 1 and self.pp >= 1, f"parallel.tp={self.tp}, parallel.pp={self.pp}: degrees must be >= 1")
        _check(self.global_batch_size >= 0, "parallel.global_batch_size must be >= 0 (0 derives it)")
        _check(self.pp_partition in ("parameters", "uniform"),
               f"parallel.pp_partition={self.pp_partition!r}: use 'parameters' or 'uniform'")
        _check(self.precision in ("auto", "fp32", "bf16", "fp16"),
               f"parallel.precision={self.precision!r}: use auto, fp32, bf16 or fp16")
        _check(self.pp == 1 or self.zero_stage < 2,
               f"pipeline parallelism (parallel.pp={self.pp}) runs only with ZeRO-0/1 in DeepSpeed "
               f"(PipelineEngine asserts zero_stage < 2), got parallel.zero_stage={self.zero_stage}; use "
               f"parallel.zero_stage=1 with parallel.pp={self.pp}, or parallel.pp=1 with "
               f"parallel.zero_stage={self.zero_stage} and parallel.tp for model parallelism")

    def validate_for_model(self, model: ModelConfig) -> None:
        """Checks that need the model shape: tp splits whole heads, every stage holds a block."""
        if model.n_head % self.tp:  # not _check: the advice is only computable when tp does not divide
            raise ConfigError(f"parallel.tp={self.tp} does not divide model.n_head={model.n_head}: tensor parallelism "
                              f"gives each rank whole attention heads (and their memory); use "
                              f"{_nearest_divisors(model.n_head, self.tp)}")
        _check(self.pp <= model.n_layer,
               f"parallel.pp={self.pp} exceeds model.n_layer={model.n_layer}: every pipeline stage needs at "
               f"least one block; use parallel.pp={model.n_layer} or fewer")

    def dp(self, world_size: int) -> int:
        """Data-parallel degree for a world size; raises when the layout does not fit."""
        model_parallel = self.tp * self.pp
        if world_size % model_parallel:
            raise ConfigError(f"world size {world_size} is not divisible by parallel.tp*parallel.pp={model_parallel}")
        return world_size // model_parallel


def _nearest_divisors(n: int, k: int) -> str:
    """'parallel.tp=A or parallel.tp=B': the divisors of n just below and above k."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    below = max(d for d in divisors if d < k)
    above = [d for d in divisors if d > k]
    return " or ".join(f"parallel.tp={d}" for d in [below, *above[:1]])


@dataclass(frozen=True)
class CheckpointConfig:
    """When and how many checkpoints are written under `<run_dir>/checkpoints`."""

    every: int = 50  # steps between checkpoints (0: only at the end)
    keep_last: int = 3
    save_at_end: bool = True

    def validate(self) -> None:
        _check(self.every >= 0, "checkpoint.every must be >= 0")
        _check(self.keep_last >= 1, "checkpoint.keep_last must be >= 1 (the newest is never deleted)")


@dataclass(frozen=True)
class LogConfig:
    """Console and TensorBoard logging."""

    every: int = 10  # steps between log lines / scalars
    tensorboard: bool = True

    def validate(self) -> None:
        _check(self.every >= 1, "log.every must be >= 1")


@dataclass(frozen=True)
class LoopConfig:
    """Length of the run and in-loop validation."""

    max_steps: int = 100
    seed: int = 42
    eval_every: int = 50  # 0 disables in-loop validation
    eval_batches: int = 4
    # Stream training: each stream's memory state carries, detached, into its next sample
    # (truncated BPTT over data.n_segments per step), so documents longer than one sample are
    # read whole. Off: every sample starts from an empty memory (episodic).
    carry_memory: bool = False
    # Wall-clock budget of the process in minutes (0: none). At the last step boundary that
    # leaves time for one more step and a save, the run saves a checkpoint and exits with code 75
    # (memgpt_dist.train.stopping.EXIT_PREEMPTED), like a preempted run: resume with --resume auto.
    max_minutes: float = 0.0
    # A step whose loss or gradient is NaN/Inf on any rank is skipped by every rank (weights,
    # optimizer state and LR schedule untouched). The run stops (exit code 3) when more than this
    # many consecutive steps were skipped; 0 stops at the first one.
    max_nan_skips: int = 5
    # A file whose appearance acts like SIGUSR1 (save, commit, exit 75): job scripts touch it when
    # the scheduler warns the batch shell (Slurm `--signal=B:USR1@T`), and a user can touch it to
    # stop a run cleanly. Only a file newer than the process counts, so a stale one left by a
    # preempted job cannot stop its requeued successor. Empty: no stop file.
    stop_file: str = ""

    def validate(self) -> None:
        _check(self.max_steps >= 1, "train.max_steps must be >= 1")
        _check(self.eval_every >= 0, "train.eval_every must be >= 0")
        _check(self.eval_batches >= 1, "train.eval_batches must be >= 1")
        _check(self.max_minutes >= 0, "train.max_minutes must be >= 0 (0: no time budget)")
        _check(self.max_nan_skips >= 0, "train.max_nan_skips must be >= 0 (0: stop at the first non-finite step)")


@dataclass(frozen=True)
class TrainConfig:
    """Root of the run configuration."""

    run_dir: str = "runs/tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    train: LoopConfig = field(default_factory=LoopConfig)

    def validate(self) -> None:
        for f in fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.validate()
        _check(not self.train.carry_memory or self.memory.enabled,
               "train.carry_memory=true needs memory.enabled=true (there is no state to carry)")
        _check(self.optim.warmup_steps < self.train.max_steps or self.train.max_steps == 1,
               f"optim.warmup_steps={self.optim.warmup_steps} must be below train.max_steps={self.train.max_steps}")
        self.parallel.validate_for_model(self.model)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# --------------------------------------------------------------------------- loading


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> TrainConfig:
    """Build a validated `TrainConfig` from an optional YAML file and dotted overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides or []:
        _apply_override(raw, item)
    cfg = from_dict(TrainConfig, raw, prefix="")
    cfg.validate()
    return cfg


def config_from_json(text: str) -> TrainConfig:
    """Rebuild a config saved with `TrainConfig.to_json` (checkpoints, run directories)."""
    cfg = from_dict(TrainConfig, json.loads(text), prefix="")
    cfg.validate()
    return cfg


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass --config with a YAML file from configs/")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply `section.key=value` (leading dashes allowed); the value is parsed as YAML."""
    text = item.lstrip("-")
    if "=" not in text:
        raise ConfigError(f"override {item!r} must look like --section.key=value")
    dotted, value = text.split("=", 1)
    keys = dotted.split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {key} is not a section")
    node[keys[-1]] = yaml.safe_load(value) if value != "" else ""


def from_dict(cls: type, data: Any, prefix: str) -> Any:
    """Construct dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"section {prefix.rstrip('.')!r}" if prefix else "the top level"
        raise ConfigError(f"unknown key(s) {', '.join(prefix + k for k in unknown)} in {where}; "
                          f"valid keys: {', '.join(sorted(known))}")
    kwargs = {name: _coerce(hints[name], value, prefix + name) for name, value in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(args[0], value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value
