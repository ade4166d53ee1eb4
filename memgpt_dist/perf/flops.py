"""FLOPs of the model from its config: every matmul of a forward pass, term by term.

A matmul of (m, k) by (k, n) costs 2 m k n FLOPs. Per layer and sample of T tokens cut into
segments of n tokens (N = `segment_len`, the last one possibly shorter; C = n_embd, H heads of
hd, Hkv key/value heads (C_kv = Hkv hd), F = `mlp_hidden_size`, V = vocab_size):

    attention projections  q, o; k, v          2 * 2 T C^2 + 2 * 2 T C C_kv
    attention scores       Q K^T and P V        2 * 2 n^2 C per segment (the whole n x n square:
                                                the causal half is computed and masked, and this
                                                is what FlopCounterMode and PaLM's MFU count);
                                                'window': 2 * 2 N (2N) C per (padded) segment, its
                                                queries over its own and the previous segment's
                                                keys; 'full': 2 * 2 T^2 C, one causal square
    MLP                    up, down            2 * 2 T C F (SwiGLU: gate, up, down: 3 * 2 T C F)
    memory projections     q, k, v             3 * 2 T C^2
    memory write gate      (C -> H)            2 T C H (and as much for the forgetting gate, memory.decay)
    memory read + write    ('head')            per head and (padded) segment, dk = 2 nu hd features,
                                                the normaliser z as an extra column of A: the read of
                                                q and the retrieval of k (2n, dk) x (dk, hd + 1), the
                                                write (dk, n) x (n, hd + 1): 6 n dk (hd + 1); the
                                                first segment of a sample only writes (2 n dk (hd + 1))
                                                unless a memory is carried in
    memory read + write    ('delta')           phi(q) A, phi(k) A, the (n, n) Gram matrix of the keys
                                                and the update K^T U: 2 n dk (3 hd + n) per segment
    LM head                (tied or not)       2 T C V

The memory terms count once per block that has the memory (`memory.layers`), the others once per block.

More terms are counted but are not matmuls (torch's FlopCounterMode does not see them):
the DPFP features (one multiply per feature of q and k), the memory's three depthwise causal
convolutions (a multiply-add per tap, channel and token: 3 * 2 T C taps) and, for 'delta', the triangular solve
(n^2 hd per segment and head). Norms, softmax, GELU, rotary and the gates' mixing are not counted,
as is the convention (Kaplan et al. 2020; PaLM's MFU).

Training is 3x the forward (the backward computes a gradient for the input and one for the
weight of every matmul). That is model FLOPs, the numerator of MFU: the recomputation of
activation checkpointing is not added (that would be hardware FLOPs, HFU).

`memory_scan` ('head') skips the read of an empty memory (exactly zero): the first segment of a
sample reads only when a memory is carried in (`carried`, `train.carry_memory`; the first
micro-batch of a stream reads nothing either, not worth a term). 'delta' reads every segment. The
padding of a ragged last segment is computed and counted. Pure arithmetic on the config: no torch.
"""
from __future__ import annotations

from dataclasses import dataclass

from memgpt_dist.config import MemoryConfig, ModelConfig, TrainConfig

TRAIN_MULTIPLIER = 3  # forward + backward (2x: input and weight gradients)


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs of one sample, by term; `matmul` terms are what torch's FlopCounterMode sees."""

    matmul: dict[str, int]
    other: dict[str, int]
    tokens: int

    @property
    def forward(self) -> int:
        return sum(self.matmul.values()) + sum(self.other.values())

    @property
    def forward_matmul(self) -> int:
        return sum(self.matmul.values())

    @property
    def per_token(self) -> float:
        """Forward FLOPs per token."""
        return self.forward / self.tokens

    @property
    def train_per_token(self) -> float:
        """Training (forward + backward) FLOPs per token: the numerator of MFU."""
        return TRAIN_MULTIPLIER * self.per_token


def segment_lengths(T: int, segment_len: int) -> list[int]:
    """Lengths of the segments of T tokens: full ones, then a shorter last one if T is ragged."""
    full, rest = divmod(T, segment_len)
    return [segment_len] * full + ([rest] if rest else [])


def count_flops(model: ModelConfig, memory: MemoryConfig, T: int, carried: bool = False) -> FlopCount:
    """Forward FLOPs of one sample of T tokens; `carried`: a memory state is passed in (stream
    training, `train.carry_memory`), so the first segment reads it too."""
    C, V = model.n_embd, model.vocab_size
    C_kv = model.kv_heads * model.head_dim
    lengths = segment_lengths(T, model.segment_len)
    mlp_matrices = 3 if model.mlp == "swiglu" else 2
    matmul = {
        "attn_proj": 2 * 2 * T * C * C + 2 * 2 * T * C * C_kv,
        "attn_scores": _score_flops(model, T, lengths),
        "mlp": mlp_matrices * 2 * T * C * model.mlp_hidden_size,
    }
    matmul = {k: v * model.n_layer for k, v in matmul.items()}
    other: dict[str, int] = {}
    n_memory = len(memory.memory_layers(model.n_layer))  # memory.layers: the blocks that have it
    if n_memory:
        mem_matmul, mem_other = _memory_flops(model, memory, T, lengths, carried)
        matmul.update({k: v * n_memory for k, v in mem_matmul.items()})
        other = {k: v * n_memory for k, v in mem_other.items()}
    matmul["lm_head"] = 2 * T * C * V
    return FlopCount(matmul=matmul, other=other, tokens=T)


def _score_flops(model: ModelConfig, T: int, lengths: list[int]) -> int:
    """One layer's Q K^T and P V over one sample, by `model.attention` (gpt.py, window.py)."""
    C, N = model.n_embd, model.segment_len
    if model.attention == "full":
        return 2 * 2 * T * T * C
    if model.attention == "window":  # every segment padded to N queries, over 2N keys
        return len(lengths) * 2 * 2 * N * (2 * N) * C
    return sum(2 * 2 * n * n * C for n in lengths)


def _memory_flops(model: ModelConfig, memory: MemoryConfig, T: int, lengths: list[int],
                  carried: bool) -> tuple[dict[str, int], dict[str, int]]:
    """(matmul terms, other terms) of one layer's memory over one sample."""
    C, H, hd = model.n_embd, model.n_head, model.head_dim
    dk = 2 * memory.nu * hd if memory.nu > 0 else hd  # memory.feature_dim, without importing torch
    matmul = {"mem_proj": 3 * 2 * T * C * C, "mem_write_gate": 2 * T * C * H}
    if memory.decay:
        matmul["mem_decay_gate"] = 2 * T * C * H
    other = {"mem_dpfp": 2 * T * H * dk} if memory.nu > 0 else {}
    if memory.conv >= 2:
        # a multiply-add per tap over whole padded segments (SegmentConv): a ragged last one costs a full one
        other["mem_conv"] = 3 * 2 * len(lengths) * model.segment_len * C * memory.conv
    if memory.kind == "head":
        # padded to whole segments too (memory._segments)
        n, S = model.segment_len, len(lengths)
        reading = S if carried else S - 1  # an empty memory is not read (memory_scan)
        matmul["mem_read_write"] = H * 2 * n * dk * (hd + 1) * (S + 2 * reading)
    else:
        n, S = model.segment_len, len(lengths)
        matmul["mem_read_write"] = H * S * 2 * n * dk * (3 * hd + n)
        other["mem_solve"] = H * S * n * n * hd
    return matmul, other


def train_flops_per_token(cfg: TrainConfig, n_segments: int | None = None) -> float:
    """Training FLOPs per input token of a sample of K = `n_segments` segments (default
    data.n_segments)."""
    K = n_segments if n_segments is not None else cfg.data.n_segments
    count = count_flops(cfg.model, cfg.memory, K * cfg.model.segment_len, cfg.train.carry_memory)
    return count.train_per_token


def format_count(count: FlopCount) -> str:
    """One line per term with its share of the forward, for the dry run."""
    total = count.forward
    terms = [*count.matmul.items(), *((f"{k} (not a matmul)", v) for k, v in count.other.items())]
    return "\n".join(f"#   {name:<28s} {v / count.tokens:>16,.0f} per token  {100 * v / total:5.1f}%"
                     for name, v in terms)
