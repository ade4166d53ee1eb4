"""Typed run configuration: one frozen dataclass per concern, composed into `TrainConfig`.

Each YAML section is backed by one class; the class docstring says what the section holds:

    (top level)   TrainConfig        the root: run_dir and the sections below
    model:        ModelConfig        GPT decoder shape
    memory:       MemoryConfig       the per-head associative memory
    data:         DataConfig         prepared shards, the corpus mix and the K curriculum
    optim:        OptimConfig        AdamW and its learning-rate schedule
    parallel:     ParallelConfig     ZeRO / tensor / pipeline layout and precision
    checkpoint:   CheckpointConfig   how often checkpoints are written and kept
    log:          LogConfig          console and TensorBoard logging
    train:        TrainingConfig     the training loop: length, validation, stop rules
    perf:         PerfConfig         throughput and MFU accounting
    init:         InitConfig         where the initial weights come from (a Hugging Face checkpoint)

Every field carries a one-line doc (`doc_field`, read back by `field_doc`), which
`describe_config` prints with the key's type and default for `--help-config`; a test keeps
every field documented. Enum-like fields are `Literal[...]` and checked against the Literal's
values at load. `data.mix`, `data.n_segments_schedule` and `memory.layers` keep their YAML/CLI
spelling as strings (that is what `to_json` stores) and are parsed once, when their section is built.

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
from typing import Any, Iterator, Literal, Optional

import yaml

Position = Literal["rope", "learned"]
Norm = Literal["layernorm", "rmsnorm"]
Mlp = Literal["gelu", "gelu_tanh", "swiglu"]
MemoryKind = Literal["head", "delta"]
Attention = Literal["segment", "window", "full"]
ZeroStage = Literal[0, 1, 2, 3]
PipelinePartition = Literal["parameters", "uniform"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the key."""


def doc_field(default: Any, doc: str) -> Any:
    """A dataclass field with default `default` and a one-line `doc` (`--help-config` prints it)."""
    return field(default=default, metadata={"doc": doc})


def section_field(cls: type) -> Any:
    """A root field holding section `cls`, documented by the first line of its docstring."""
    return field(default_factory=cls, metadata={"doc": _first_line(cls)})


def _first_line(cls: type) -> str:
    return (cls.__doc__ or "").strip().partition("\n")[0]


def field_doc(f: dataclasses.Field) -> str:
    """The one-line doc of a config field ('' when it has none)."""
    return f.metadata.get("doc", "")


@dataclass(frozen=True)
class ModelConfig:
    """GPT decoder shape. Attention is causal within a segment of `segment_len` tokens."""

    vocab_size: int = doc_field(4096, "rows of the token embedding; must be >= the tokenizer's vocabulary size")
    n_layer: int = doc_field(2, "transformer blocks")
    n_head: int = doc_field(4, "attention heads per block, each with its own memory")
    n_embd: int = doc_field(128, "width of the residual stream; a multiple of model.n_head")
    segment_len: int = doc_field(64, "N: tokens per segment; positions restart in every segment")
    position: Position = doc_field("rope", "positions in attention: rotary ('rope') or a learned embedding ('learned')")
    # 'window' is Transformer-XL's / ARMT's prev_seg_kv: no token is blind at a segment start;
    # 'full' is the plain GPT a user would otherwise train, for side-by-side runs.
    attention: Attention = doc_field("segment", "'segment': causal within a segment; 'window': also over the "
                                                "previous segment's keys/values (carried like the memory); "
                                                "'full': causal over the whole sample, continuous positions")
    rope_theta: float = doc_field(10000.0, "base of the rotary frequencies (model.position='rope')")
    mlp_ratio: int = doc_field(4, "MLP hidden width as a multiple of model.n_embd (swiglu: 2/3 of it, rounded up "
                                  "to model.mlp_multiple_of, as Llama)")
    dropout: float = doc_field(0.0, "dropout on embeddings, attention and residual branches, in [0, 1)")
    bias: bool = doc_field(True, "biases in every attention and MLP linear layer and in the layer norms (rmsnorm and "
                                 "the memory projections have none)")
    init_std: float = doc_field(0.02, "std of the normal weight init (output projections: / sqrt(2 * n_layer))")
    # Modern blocks (Llama family): rmsnorm + swiglu + grouped-query attention + an untied head.
    norm: Norm = doc_field("layernorm", "the blocks' and the final norm: 'layernorm' or 'rmsnorm' (no bias)")
    norm_eps: float = doc_field(1e-5, "epsilon of the norms (Llama checkpoints use 1e-5 or 1e-6)")
    mlp: Mlp = doc_field("gelu", "feed-forward: 'gelu' (erf), 'gelu_tanh' (GPT-2's gelu_new) or 'swiglu' "
                                 "(down(silu(gate(x)) * up(x)))")
    mlp_hidden: int = doc_field(0, "MLP hidden width, overriding the model.mlp_ratio rule (an imported model's exact "
                                   "size); 0: from the rule")
    mlp_multiple_of: int = doc_field(256, "swiglu: the derived hidden width is rounded up to a multiple of this")
    # The memory stays per query head: only the attention keys and values are shared by a group.
    n_kv_head: int = doc_field(0, "key/value heads of attention (grouped-query attention; divides model.n_head); "
                                  "0: model.n_head. The memory stays per query head")
    tie_embeddings: bool = doc_field(True, "the LM head is the token embedding (true) or a separate matrix")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads of attention: model.n_kv_head, or n_head when it is 0."""
        return self.n_kv_head or self.n_head

    @property
    def mlp_hidden_size(self) -> int:
        """The MLP's hidden width: model.mlp_hidden, else mlp_ratio * n_embd (gelu) or Llama's
        rule for swiglu: 2/3 of that, rounded up to a multiple of mlp_multiple_of."""
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp != "swiglu":
            return self.mlp_ratio * self.n_embd
        hidden = int(2 * self.mlp_ratio * self.n_embd / 3)
        return self.mlp_multiple_of * -(-hidden // self.mlp_multiple_of)

    def validate(self) -> None:
        _check(self.n_embd % self.n_head == 0,
               f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}")
        _check(self.position != "rope" or self.head_dim % 2 == 0,
               f"model.position='rope' needs an even head_dim, got {self.head_dim}")
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "segment_len", "mlp_ratio", "mlp_multiple_of"):
            _check(getattr(self, name) > 0, f"model.{name} must be > 0")
        _check(self.mlp_hidden >= 0, "model.mlp_hidden must be >= 0 (0: from model.mlp_ratio)")
        _check(self.norm_eps > 0, "model.norm_eps must be > 0")
        _check(self.n_kv_head >= 0 and self.n_head % self.kv_heads == 0,
               f"model.n_kv_head={self.n_kv_head} must divide model.n_head={self.n_head} (each key/value head serves "
               f"a group of query heads); 0: one per query head")
        _check(0.0 <= self.dropout < 1.0, "model.dropout must be in [0, 1)")
        _check(self.attention != "full" or self.position == "rope",
               "model.attention='full' needs model.position='rope' (learned positions cover one segment only)")


@dataclass(frozen=True)
class MemoryConfig:
    """Per-layer, per-head associative memory (DPFP features, gated delta-rule write)."""

    enabled: bool = doc_field(True, "false: the plain GPT with segment-local attention (the baseline)")
    kind: MemoryKind = doc_field("head", "'head': DPFP keys, delta rule against earlier segments; "
                                         "'delta': DeltaNet's delta rule, exact per token")
    nu: int = doc_field(3, "DPFP order: keys have 2*nu*head_dim features (0: raw unit-length keys, 'delta' only)")
    eps: float = doc_field(1e-5, "denominator guard of the normalised read")
    gate_init: float = doc_field(0.0, "initial beta_h; the mix gate is g_h = sigmoid(beta_h)")
    write_gate_bias_init: float = doc_field(0.0, "initial bias of the per-token write gate b_t")
    # With >= 2 taps a token's memory key can hold the token before it (a key written at its
    # value), the short convolution that DeltaNet-style recall depends on.
    conv: int = doc_field(4, "taps of a causal depthwise convolution (within a segment) on the memory q, k, v; "
                             "0 or 1: none")

    # Gated DeltaNet's alpha_t; sigmoid(7) = 0.9991 per token, about 0.94 over a 64-token segment.
    decay: bool = doc_field(False, "a per-head, data-dependent forgetting gate alpha_t in (0, 1) on the memory state "
                                   "(Gated DeltaNet), so old associations fade")
    decay_bias_init: float = doc_field(7.0, "initial bias of the forgetting gate's logit: alpha_t starts near "
                                            "sigmoid(decay_bias_init)")
    # A lever on the memory's cost: the blocks without it are plain segment-local blocks (no mem_*
    # parameters, no carried memory). A YAML integer or list of integers is taken as this string.
    layers: str = field(default="", metadata={
        "doc": "blocks that have the memory: '' every block; 'I,J,...' those indices; 'every:K' blocks "
               "0, K, 2K, ... (n_layer 8, every:4: blocks 0 and 4)", "int_list": True})

    def __post_init__(self) -> None:
        # parsed once; a plain attribute, not a field (equality and to_json see only the string)
        object.__setattr__(self, "_layers", _parse_layers(self.layers))

    def has_memory(self, layer: int) -> bool:
        """Whether block `layer` has the memory: memory.enabled, and memory.layers selects it (the
        one home of this fact: the model, FLOPs, estimates and export all ask here)."""
        if not self.enabled:
            return False
        selected = self._layers
        if selected is None:
            return True
        if isinstance(selected, int):  # every:K, from the first block on: on the recall task the memory
            return layer % selected == 0  # in block 0 of 2 alone recalls as well as in both, in block 1 alone not
        return layer in selected

    def memory_layers(self, n_layer: int) -> tuple[int, ...]:
        """The blocks of an `n_layer` model that have the memory, in order (empty when disabled)."""
        return tuple(i for i in range(n_layer) if self.has_memory(i))

    def validate_for_model(self, model: ModelConfig) -> None:
        """memory.layers against model.n_layer: indices in range (every:K always selects block 0);
        memory.nu against the head size when the memory is on: DPFP pairs the 2 * head_dim entries
        of r at offsets 1..nu, which must stay within r."""
        _check(not self.enabled or self.nu <= 2 * model.head_dim,
               f"memory.nu={self.nu} exceeds 2 * head_dim = {2 * model.head_dim} (model.n_embd / model.n_head "
               f"= {model.head_dim}): lower memory.nu")
        selected = self._layers
        if isinstance(selected, tuple):
            bad = [i for i in selected if i >= model.n_layer]
            _check(not bad, f"memory.layers={self.layers!r} names block(s) {', '.join(map(str, bad))}; "
                            f"model.n_layer={model.n_layer} has blocks 0..{model.n_layer - 1}")

    def validate(self) -> None:
        _check(self.nu >= 1 or (self.kind == "delta" and self.nu == 0),
               "memory.nu must be >= 1 (0, raw unit-length keys, only with memory.kind='delta')")
        _check(self.eps > 0, "memory.eps must be > 0")
        _check(self.conv >= 0, "memory.conv must be >= 0 (0: no convolution)")


def _parse_layers(text: str) -> Optional[int | tuple[int, ...]]:
    """memory.layers: '' -> None (every block); 'every:K' -> K (>= 1); 'I,J,...' -> (I, J, ...),
    distinct non-negative integers (their range is checked against model.n_layer by TrainConfig)."""
    text = text.strip()
    if not text:
        return None
    if text.startswith("every:"):
        k = text[len("every:"):].strip()
        _check(k.isdigit() and int(k) >= 1, f"memory.layers={text!r}: write every:K with an integer K >= 1")
        return int(k)
    items = [x.strip() for x in text.split(",")]
    _check(all(x.isdigit() for x in items),
           f"memory.layers={text!r}: write '' (every block), block indices 'I,J,...' (integers >= 0) or every:K")
    indices = tuple(int(x) for x in items)
    _check(len(set(indices)) == len(indices), f"memory.layers={text!r} names a block twice")
    return tuple(sorted(indices))


@dataclass(frozen=True)
class DataConfig:
    """Where the prepared shards are and how samples are cut from them.

    `mix` and `n_segments_schedule` stay the strings written in YAML or on the command line (what
    `to_json` stores); `__post_init__` parses them once into tuples held outside the dataclass
    fields, so equality, `to_dict` and `to_json` see only the strings.
    """

    path: str = doc_field("data/default", "corpus written by memgpt-prepare: a directory, an http(s) base, a "
                                          "'pipe:COMMAND' with {name}, or a brace list of shards")
    n_segments: int = doc_field(4, "K: consecutive segments per sample (BPTT depth); validation always uses it")
    seed: int = doc_field(1234, "shard permutation seed (with the epoch)")
    num_workers: int = doc_field(0, "shard-reading worker processes per rank")
    max_skip_fraction: float = doc_field(0.01, "fail when more than this fraction of samples is skipped")
    tokenizer: str = doc_field("", "optional tokenizer.json whose hash must match the shards'")
    verify_checksums: bool = doc_field(True, "sha256 of every shard against the manifest when first opened")
    # Blends other prepared corpora (same tokenizer) into training, e.g. "data/recall:0.05" for
    # 95% text and 5% recall.
    mix: str = doc_field("", "corpora blended in, 'PATH:WEIGHT[,PATH:WEIGHT]' (locations as data.path); data.path "
                             "gets the remaining weight")
    # e.g. "0:2,500:4,1000:8"; validation always uses data.n_segments
    n_segments_schedule: str = doc_field("", "curriculum over K, 'STEP:K[,STEP:K]': K segments per training sample "
                                             "from STEP on; empty: data.n_segments")
    cache_dir: str = doc_field("", "local directory for sha256-verified copies of remote shards (the ranks of a "
                                   "node may share it); empty: no cache; ignored for local corpora")
    cache_max_gb: float = doc_field(100.0, "size bound of data.cache_dir; least recently used shards are evicted")
    open_retries: int = doc_field(3, "further attempts after a failed read of a remote file (dropped connection, "
                                     "failed pipe command, bytes not matching the manifest); a 404 is not retried")
    retry_backoff_s: float = doc_field(1.0, "wait before retry i of a remote read: retry_backoff_s * 2**i seconds")

    def __post_init__(self) -> None:
        # object.__setattr__: the dataclass is frozen; plain attributes, not fields (see above)
        object.__setattr__(self, "_mix_sources", _with_main_corpus(self.path, _parse_mix(self.mix)))
        object.__setattr__(self, "_schedule", _parse_schedule(self.n_segments_schedule))

    def n_segments_at(self, step: int) -> int:
        """Segments per training sample for the optimizer step with 0-based index `step`."""
        k = self.n_segments
        for start, value in self._schedule:
            if step >= start:
                k = value
        return k

    def mix_sources(self) -> list[tuple[str, float]]:
        """[(path, weight)] of data.mix, main corpus first with the remaining weight."""
        return list(self._mix_sources)

    def validate(self) -> None:
        _check(self.n_segments >= 1, "data.n_segments must be >= 1")
        _check(self.cache_max_gb > 0, "data.cache_max_gb must be > 0")
        _check(self.open_retries >= 0, "data.open_retries must be >= 0")
        _check(self.retry_backoff_s >= 0, "data.retry_backoff_s must be >= 0")
        _check(self.num_workers >= 0, "data.num_workers must be >= 0")
        _check(0.0 <= self.max_skip_fraction < 1.0, "data.max_skip_fraction must be in [0, 1)")


def _parse_mix(text: str) -> tuple[tuple[str, float], ...]:
    """'PATH:WEIGHT,...' (data.mix) -> ((path, weight), ...), each weight in (0, 1)."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        path, sep, weight = item.rpartition(":")
        try:
            w = float(weight)
        except ValueError:
            w = -1.0
        _check(bool(sep) and bool(path) and 0.0 < w < 1.0,
               f"data.mix item {item!r}: write PATH:WEIGHT with 0 < WEIGHT < 1")
        out.append((path, w))
    return tuple(out)


def _with_main_corpus(path: str, extra: tuple[tuple[str, float], ...]) -> tuple[tuple[str, float], ...]:
    """The main corpus `path` first, with the weight data.mix leaves."""
    rest = 1.0 - sum(w for _, w in extra)
    _check(rest > 0.0, f"data.mix weights sum to {1 - rest:g}; they must leave weight for data.path")
    return ((path, rest), *extra)


def _parse_schedule(text: str) -> tuple[tuple[int, int], ...]:
    """'STEP:K,...' (data.n_segments_schedule) -> ((step, k), ...), steps increasing, k >= 1."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        start, sep, k = item.partition(":")
        _check(sep == ":" and start.isdigit() and k.isdigit() and int(k) >= 1,
               f"data.n_segments_schedule item {item!r}: write STEP:K with integers, K >= 1")
        out.append((int(start), int(k)))
    _check([s for s, _ in out] == sorted({s for s, _ in out}),
           "data.n_segments_schedule steps must be distinct and increasing")
    return tuple(out)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup + cosine decay; the memory mix gates get their own group."""

    lr: float = doc_field(1e-3, "peak learning rate, reached at the end of the warmup")
    min_lr: float = doc_field(1e-4, "learning rate at the end of the cosine decay (at train.max_steps)")
    weight_decay: float = doc_field(0.1, "AdamW weight decay of the matrices (not biases, norms, convolutions, gates)")
    beta1: float = doc_field(0.9, "AdamW beta1")
    beta2: float = doc_field(0.95, "AdamW beta2")
    eps: float = doc_field(1e-8, "AdamW epsilon")
    warmup_steps: int = doc_field(10, "steps of linear warmup from 0 to optim.lr (DeepSpeed uses at least 2)")
    grad_clip: float = doc_field(1.0, "maximum global gradient norm (0 disables clipping)")
    # HF Infini lesson: the gates learn faster and get no weight decay
    mem_gate_lr_mult: float = doc_field(5.0, "learning-rate multiplier of the memory mix gates (no weight decay)")

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

    zero_stage: ZeroStage = doc_field(3, "DeepSpeed ZeRO stage (pipelines: 0 or 1)")
    micro_batch_size: int = doc_field(4, "samples per rank per micro-step")
    grad_accum: int = doc_field(1, "micro-steps per optimizer step (also the pipeline's micro-batches)")
    tp: int = doc_field(1, "tensor-parallel degree: splits attention heads (and their memory) and the MLP")
    pp: int = doc_field(1, "pipeline-parallel degree: stages of consecutive blocks")
    # When set, a check that the layout gives this batch at the world size it runs with.
    global_batch_size: int = doc_field(0, "samples per optimizer step over all ranks; "
                                          "0: micro_batch_size * grad_accum * dp")
    pp_partition: PipelinePartition = doc_field("parameters", "how blocks are split into pipeline stages "
                                                              "(DeepSpeed's partition_method)")
    precision: Precision = doc_field("auto", "'auto': bf16 on GPUs that have it, else fp32")
    activation_checkpointing: bool = doc_field(False, "recompute each block's activations in the backward pass")
    # ZeRO-3 only: without it every rank builds the whole fp32 model before DeepSpeed partitions it
    # With bf16/fp16, zero.Init creates the parameters in that dtype, so the fp32 master copy starts
    # from the rounded init (as Hugging Face's ZeRO-3 loading does); off keeps an fp32 init.
    zero_init: bool = doc_field(True, "with zero_stage 3 and tp 1: build the model partitioned (deepspeed.zero.Init), "
                                      "so no rank holds all the weights; in fp32 the same weights as a whole build")
    # The process-group timeout (torch.distributed / deepspeed init_distributed): how long a rank
    # waits in a collective for a peer that died or hangs before it fails. Long enough for the
    # slowest legitimate wait on a cluster (a rank saving or evaluating while the others wait).
    collective_timeout_s: float = doc_field(1800.0, "seconds a collective waits for a lost or hung peer before "
                                                    "the run fails (exit 76); tests use a few seconds")

    def validate(self) -> None:
        _check(self.micro_batch_size >= 1, "parallel.micro_batch_size must be >= 1")
        _check(self.grad_accum >= 1, "parallel.grad_accum must be >= 1")
        _check(self.tp >= 1 and self.pp >= 1, f"parallel.tp={self.tp}, parallel.pp={self.pp}: degrees must be >= 1")
        _check(self.global_batch_size >= 0, "parallel.global_batch_size must be >= 0 (0 derives it)")
        _check(self.collective_timeout_s > 0, f"parallel.collective_timeout_s={self.collective_timeout_s} must be > 0 "
                                              f"(seconds; 1800 suits clusters)")
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
        _check(model.kv_heads % self.tp == 0,
               f"parallel.tp={self.tp} does not divide model.n_kv_head={model.kv_heads}: tensor parallelism gives "
               f"each rank whole key/value heads with their group of query heads; use a parallel.tp that divides "
               f"{model.kv_heads}")
        _check(model.mlp_hidden_size % self.tp == 0,
               f"parallel.tp={self.tp} does not divide the MLP hidden width {model.mlp_hidden_size} "
               f"(model.mlp_hidden / model.mlp_ratio); choose a width divisible by parallel.tp")
        _check(self.pp <= model.n_layer,
               f"parallel.pp={self.pp} exceeds model.n_layer={model.n_layer}: every pipeline stage needs at "
               f"least one block; use parallel.pp={model.n_layer} or fewer")

    def dp(self, world_size: int) -> int:
        """Data-parallel degree for a world size; raises when the layout does not fit."""
        return dp_degree(world_size, self.tp, self.pp)


def dp_degree(world_size: int, tp: int, pp: int) -> int:
    """dp = world / (tp * pp): the one place the data-parallel degree is computed."""
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tp x parallel.pp = {tp} x {pp}; "
                          f"launch a multiple of {tp * pp} ranks")
    return world_size // (tp * pp)


def _nearest_divisors(n: int, k: int) -> str:
    """'parallel.tp=A or parallel.tp=B': the divisors of n just below and above k."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    below = max(d for d in divisors if d < k)
    above = [d for d in divisors if d > k]
    return " or ".join(f"parallel.tp={d}" for d in [below, *above[:1]])


@dataclass(frozen=True)
class CheckpointConfig:
    """When and how many checkpoints are written under `<run_dir>/checkpoints`."""

    every: int = doc_field(50, "steps between checkpoints (0: only at the end)")
    keep_last: int = doc_field(3, "checkpoints kept; older ones are deleted, the newest never")
    save_at_end: bool = doc_field(True, "save a checkpoint after the last step (a run stopped early always saves)")
    # The step boundary only copies each rank's state to host memory (RAM for one more copy of the
    # rank's share, kept for the run: every save copies into the same buffers); a low-priority thread
    # writes the files and the ranks commit at a later boundary once all are written. The next save,
    # a stop and the end wait for a pending one; they save synchronously.
    async_save: bool = doc_field(False, "write periodic checkpoints in the background while training continues "
                                        "(same files and commit marker)")
    export_hf_at_end: bool = doc_field(False, "after the last checkpoint, write its Hugging Face export (memgpt-export) "
                                              "to <run_dir>/hf")

    def validate(self) -> None:
        _check(self.every >= 0, "checkpoint.every must be >= 0")
        _check(self.keep_last >= 1, "checkpoint.keep_last must be >= 1 (the newest is never deleted)")


@dataclass(frozen=True)
class LogConfig:
    """Console and TensorBoard logging."""

    every: int = doc_field(10, "steps between log lines / scalars")
    tensorboard: bool = doc_field(True, "write TensorBoard scalars under <run_dir>/tensorboard")

    def validate(self) -> None:
        _check(self.every >= 1, "log.every must be >= 1")


@dataclass(frozen=True)
class TrainingConfig:
    """The training loop (`train:`): length of the run, in-loop validation and when to stop."""

    max_steps: int = doc_field(100, "optimizer steps of the run")
    seed: int = doc_field(42, "RNG seed of the model init; each dp rank then reseeds with seed + 1000 * dp_rank")
    eval_every: int = doc_field(50, "steps between in-loop validations (0 disables them)")
    eval_batches: int = doc_field(4, "validation batches per evaluation")
    # Truncated BPTT over data.n_segments per step, so documents longer than one sample are read
    # whole. Off: every sample starts from an empty memory (episodic).
    carry_memory: bool = doc_field(False, "stream training: each stream's memory carries, detached, into its "
                                          "next sample")
    # At the last step boundary that leaves time for one more step and a save, the run saves a
    # checkpoint and exits with code 75 (memgpt_dist.train.stopping.EXIT_PREEMPTED), like a
    # preempted run: resume with --resume auto.
    max_minutes: float = doc_field(0.0, "wall-clock budget of the process in minutes (0: none)")
    # A step whose loss or gradient is NaN/Inf on any rank is skipped by every rank (weights,
    # optimizer state and LR schedule untouched); the run stops with exit code 3.
    max_nan_skips: int = doc_field(5, "consecutive non-finite steps skipped before the run stops "
                                      "(0: stop at the first)")
    # Job scripts touch it when the scheduler warns the batch shell (Slurm `--signal=B:USR1@T`), and
    # a user can touch it to stop a run cleanly. Only a file newer than the process counts, so a
    # stale one left by a preempted job cannot stop its requeued successor.
    stop_file: str = doc_field("", "a file whose appearance acts like SIGUSR1 (save, commit, exit 75); "
                                   "empty: none")
    # A watchdog thread (train.heartbeat) on every rank: when no step (with its callbacks: logging,
    # validation, a save) finished for this long, it dumps every thread's stack to stderr and ends
    # the process with exit code 76 (stopping.EXIT_LOST_RANK), which job scripts requeue. It must
    # exceed the longest step plus a save and a validation.
    hang_timeout_s: float = doc_field(3600.0, "seconds without a finished step before a rank dumps its stacks and "
                                              "exits 76 (0: no watchdog)")
    # torch.compile of each block (inductor), applied in parallel/plan.py after tensor parallelism
    # and activation checkpointing, before DeepSpeed wraps the model (torchtitan's order). The first
    # step pays the compilation (tens of seconds on CPU, once per sample length and train/eval mode).
    compile: bool = doc_field(False, "torch.compile each transformer block (ZeRO-0..3 without tp or pp)")

    def validate(self) -> None:
        _check(self.max_steps >= 1, "train.max_steps must be >= 1")
        _check(self.eval_every >= 0, "train.eval_every must be >= 0")
        _check(self.eval_batches >= 1, "train.eval_batches must be >= 1")
        _check(self.max_minutes >= 0, "train.max_minutes must be >= 0 (0: no time budget)")
        _check(self.max_nan_skips >= 0, "train.max_nan_skips must be >= 0 (0: stop at the first non-finite step)")
        _check(self.hang_timeout_s >= 0, f"train.hang_timeout_s={self.hang_timeout_s} must be >= 0 (0: no watchdog)")


@dataclass(frozen=True)
class PerfConfig:
    """Throughput and MFU accounting (`perf/*` scalars; memgpt_dist/perf)."""

    # The table holds dense bf16 tensor-core peaks of common GPUs (memgpt_dist/perf/device.py); on a
    # CPU there is none: `python benchmarks/matmul_peak.py` measures one to put here.
    peak_tflops: float = doc_field(0.0, "peak TFLOP/s of one device, the denominator of perf/mfu; "
                                        "0: from the GPU table (no MFU on CPU or an unknown device)")

    def validate(self) -> None:
        _check(self.peak_tflops >= 0, "perf.peak_tflops must be >= 0 (0: from the device table)")


@dataclass(frozen=True)
class InitConfig:
    """Where the initial weights come from (`init:`): the seeded init, or a Hugging Face checkpoint.

    With `from_hf`, the model.* keys the checkpoint fixes (widths, heads, norm, MLP, positions, tied
    head) are taken from its config.json at load (`memgpt_dist.hf.convert.model_fields`); giving one
    of them another value is an error naming the key. Prepare the corpus with its tokenizer
    (`memgpt-prepare --tokenizer DIR`). The weights are loaded at a fresh start, never on resume.
    """

    from_hf: str = doc_field("", "a local GPT2LMHeadModel or LlamaForCausalLM directory (save_pretrained) to start "
                                 "from, with the memory added so step 0 equals it; empty: random init")

    def validate(self) -> None:
        pass  # the directory and its config.json are read, and checked, when the config is loaded


@dataclass(frozen=True)
class TrainConfig:
    """Root of the run configuration: `run_dir` and one section per concern."""

    run_dir: str = doc_field("runs/tiny", "directory of the run: train.log, config, metrics, checkpoints")
    model: ModelConfig = section_field(ModelConfig)
    memory: MemoryConfig = section_field(MemoryConfig)
    data: DataConfig = section_field(DataConfig)
    optim: OptimConfig = section_field(OptimConfig)
    parallel: ParallelConfig = section_field(ParallelConfig)
    checkpoint: CheckpointConfig = section_field(CheckpointConfig)
    log: LogConfig = section_field(LogConfig)
    train: TrainingConfig = section_field(TrainingConfig)
    perf: PerfConfig = section_field(PerfConfig)
    init: InitConfig = section_field(InitConfig)

    def validate(self) -> None:
        for f in fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.validate()
        _check(not self.train.carry_memory or self.memory.enabled or self.model.attention == "window",
               "train.carry_memory=true needs memory.enabled=true or model.attention='window' (there is no state "
               "to carry)")
        _check(self.optim.warmup_steps < self.train.max_steps or self.train.max_steps == 1,
               f"optim.warmup_steps={self.optim.warmup_steps} must be below train.max_steps={self.train.max_steps}")
        self.parallel.validate_for_model(self.model)
        self.memory.validate_for_model(self.model)
        self._validate_compile()

    def _validate_compile(self) -> None:
        """train.compile runs where it is tested: without tensor or pipeline parallelism (AutoTP
        swaps the Linear layers inside deepspeed.initialize, after compile; pipeline stages are
        untested with compiled blocks)."""
        if not self.train.compile:
            return
        _check(self.parallel.pp == 1 and self.parallel.tp == 1,
               f"train.compile=true is not supported with parallel.tp={self.parallel.tp}, "
               f"parallel.pp={self.parallel.pp} yet (only tp=1, pp=1: ZeRO-0..3 data parallel); set "
               f"train.compile=false or parallel.tp=1 parallel.pp=1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# --------------------------------------------------------------------------- describing


def describe_config(cfg: Optional[TrainConfig] = None) -> str:
    """Every section and key with its type, default and doc: the text of `--help-config`.

    With `cfg`, keys whose value differs from the default also show the value in `cfg`.
    """
    head = ["Run configuration: dataclass defaults, then the YAML file (--config), then --section.key=value.",
            "Each key: TYPE = DEFAULT" + ("  (this run: VALUE, where it differs)" if cfg is not None else ""),
            "", f"top level:  (TrainConfig) {_first_line(TrainConfig)}"]
    return "\n".join([*head, *_describe(TrainConfig, TrainConfig(), cfg, prefix="")]) + "\n"


def _describe(cls: type, default: Any, value: Any, prefix: str) -> Iterator[str]:
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        key, tp, d = prefix + f.name, hints[f.name], getattr(default, f.name)
        v = None if value is None else getattr(value, f.name)
        if dataclasses.is_dataclass(tp):
            yield from ("", f"{key}:  ({tp.__name__}) {field_doc(f)}")
            yield from _describe(tp, d, v, key + ".")
            continue
        changed = f"  (this run: {json.dumps(v)})" if value is not None and v != d else ""
        yield f"  {key}: {_type_name(tp)} = {json.dumps(d)}{changed}"
        yield f"      {field_doc(f)}"


def _type_name(tp: Any) -> str:
    """A field's type as a user writes it: int, str, ..., or the Literal's values."""
    if typing.get_origin(tp) is Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


# --------------------------------------------------------------------------- loading


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> TrainConfig:
    """Build a validated `TrainConfig` from an optional YAML file and dotted overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides or []:
        _apply_override(raw, item)
    _take_model_from_hf(raw)
    cfg = from_dict(TrainConfig, raw, prefix="")
    cfg.validate()
    return cfg


def _take_model_from_hf(raw: dict[str, Any]) -> None:
    """With init.from_hf, fill raw's model section from the checkpoint's config.json; a model key
    given with another value is an error naming it (the checkpoint's weights fix it)."""
    init = raw.get("init")
    path = init.get("from_hf") if isinstance(init, dict) else None
    if not path:
        return
    from memgpt_dist.hf.convert import HFImportError, check_segment_len, model_fields  # json only, no torch

    try:
        derived = model_fields(path)
    except (HFImportError, KeyError, ValueError) as exc:
        raise ConfigError(str(exc) if not isinstance(exc, KeyError) else
                          f"init.from_hf={path}: config.json lacks {exc}") from exc
    model = raw.setdefault("model", {})
    if not isinstance(model, dict):
        return  # from_dict names the problem
    for key, value in derived.items():
        if key in model and model[key] != value and not _same_number(model[key], value):
            raise ConfigError(f"model.{key}={model[key]!r} differs from the checkpoint in init.from_hf={path} "
                              f"({value!r}); remove model.{key} or set it to {value!r}")
        model[key] = value
    try:
        check_segment_len(path, model.get("segment_len", ModelConfig.segment_len))
    except HFImportError as exc:
        raise ConfigError(str(exc)) from exc


def _same_number(a: Any, b: Any) -> bool:
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and float(a) == float(b)


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
    int_lists = {f.name for f in fields(cls) if f.metadata.get("int_list")}
    kwargs = {name: _coerce(hints[name], _int_list_text(value) if name in int_lists else value, prefix + name)
              for name, value in data.items()}
    return cls(**kwargs)


def _int_list_text(value: Any) -> Any:
    """A YAML integer (`--memory.layers=1`) or list of integers (`layers: [3, 7]`) as the string
    a comma-list field holds ("1", "3,7"); anything else unchanged (a string, or a wrong type
    that `_coerce` names)."""
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if is_int(value):
        return str(value)
    if isinstance(value, list) and value and all(is_int(v) for v in value):
        return ",".join(str(v) for v in value)
    return value


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    origin = typing.get_origin(tp)
    if origin is Literal:
        return _choice(typing.get_args(tp), value, key)
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


def _choice(choices: tuple[Any, ...], value: Any, key: str) -> Any:
    """`value` if it is one of a Literal's `choices`, of the same type (YAML's true is not 1)."""
    if any(type(value) is type(c) and value == c for c in choices):
        return value
    names = [repr(c) for c in choices]
    valid = " or ".join(names) if len(names) <= 2 else f"one of {', '.join(names[:-1])} or {names[-1]}"
    raise ConfigError(f"{key}={value!r}: use {valid}")
