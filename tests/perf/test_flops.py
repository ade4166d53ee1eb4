"""The FLOPs of `memgpt_dist.perf.flops` against torch's own count of the matmuls it runs.

`FlopCounterMode` counts mm/bmm/addmm/convolution (and the fused SDPA kernels of CUDA); on CPU
SDPA runs a kernel it does not know, so the math backend is forced: it computes the same n x n
scores with bmm, which the counter sees. The memory's short convolutions are multiply-adds (not
a matmul, counted apart as `mem_conv`).
"""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from memgpt_dist.config import load_config
from memgpt_dist.model import GPT
from memgpt_dist.perf.flops import count_flops, train_flops_per_token

BASE = ["model.vocab_size=256", "model.n_layer=2", "model.segment_len=16"]
CONFIGS = {
    "memory-off": ["memory.enabled=false", "model.n_embd=64", "model.n_head=4"],
    "memory-on": ["model.n_embd=64", "model.n_head=4"],
    "memory-no-conv-nu1": ["model.n_embd=96", "model.n_head=3", "memory.conv=0", "memory.nu=1"],
    "memory-delta": ["model.n_embd=64", "model.n_head=2", "memory.kind=delta", "memory.nu=1"],
    "wide-mlp-learned": ["model.n_embd=128", "model.n_head=8", "model.mlp_ratio=2", "model.position=learned"],
    "llama-style": ["model.n_embd=64", "model.n_head=4", "model.n_kv_head=2", "model.mlp=swiglu",
                    "model.mlp_multiple_of=32", "model.norm=rmsnorm", "model.tie_embeddings=false", "model.bias=false"],
    "gqa-1-memory-off": ["memory.enabled=false", "model.n_embd=64", "model.n_head=4", "model.n_kv_head=1",
                         "model.mlp=swiglu", "model.mlp_hidden=100"],
    # issue 15's attention modes and the forgetting gate
    "window-memory-decay": ["model.n_embd=64", "model.n_head=4", "model.attention=window", "memory.decay=true",
                            "model.segment_len=32", "model.vocab_size=64"],
    "window-memory-off-gqa": ["memory.enabled=false", "model.n_embd=64", "model.n_head=4", "model.n_kv_head=2",
                              "model.attention=window", "model.segment_len=32", "model.vocab_size=64"],
    "full-memory-off": ["memory.enabled=false", "model.n_embd=64", "model.n_head=4", "model.attention=full"],
    "full-delta-decay": ["model.n_embd=64", "model.n_head=2", "model.attention=full", "memory.kind=delta",
                         "memory.nu=1", "memory.decay=true"],
    # memory in some blocks only: its terms count once per block that has it
    "memory-every-2-of-4": ["model.n_layer=4", "model.n_embd=64", "model.n_head=4", "memory.layers=every:2"],
    "window-memory-layer-0": ["model.n_embd=64", "model.n_head=4", "model.attention=window", "memory.layers=0",
                              "model.segment_len=32", "model.vocab_size=64"],
}
TOLERANCE = 0.05


def counted(cfg, T: int, train: bool = False, carried: bool = False) -> int:
    """FLOPs torch counts for a forward (and backward) of one sample of T tokens."""
    torch.manual_seed(0)
    model = GPT(cfg.model, cfg.memory)
    model.init_weights()
    ids = torch.randint(0, cfg.model.vocab_size, (1, T))
    state = None
    if carried:
        from memgpt_dist.model.memory import zero_state

        m = cfg.model
        state = zero_state(m.n_layer, 1, m.n_head, m.head_dim, cfg.memory.nu, layers=model.memory_layers)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(ids, state=state)
        if train:
            out.logits.float().square().mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("T", [64, 56])  # 4 whole segments; a ragged last one
def test_forward_matmul_flops_match_torchs_count(name, T):
    cfg = load_config(None, BASE + CONFIGS[name])
    ours = count_flops(cfg.model, cfg.memory, T)
    ratio = ours.forward_matmul / counted(cfg, T)
    assert abs(ratio - 1) < TOLERANCE, f"{name}: ours / torch = {ratio:.4f}"


@pytest.mark.parametrize("name", ["memory-on", "memory-delta", "memory-every-2-of-4"])
def test_a_carried_memory_adds_the_first_segments_read(name):
    """'head' skips the read of an empty memory, so a carried one costs the first segment's read
    more; 'delta' reads every segment either way. Each count matches what torch sees."""
    cfg = load_config(None, BASE + CONFIGS[name])
    kind = cfg.memory.kind
    empty, carried = (count_flops(cfg.model, cfg.memory, 64, carried=c).forward_matmul for c in (False, True))
    assert abs(carried / counted(cfg, 64, carried=True) - 1) < TOLERANCE
    assert abs(empty / counted(cfg, 64) - 1) < TOLERANCE
    assert (carried > empty) == (kind == "head")


@pytest.mark.parametrize("name", ["memory-off", "memory-on"])
def test_training_is_three_forwards(name):
    cfg = load_config(None, BASE + CONFIGS[name])
    ours = count_flops(cfg.model, cfg.memory, 64)
    ratio = 3 * ours.forward_matmul / counted(cfg, 64, train=True)
    assert abs(ratio - 1) < TOLERANCE, f"{name}: 3 x forward / torch's forward + backward = {ratio:.4f}"


def test_non_matmul_terms_are_small_and_named():
    cfg = load_config(None, BASE + CONFIGS["memory-on"])
    count = count_flops(cfg.model, cfg.memory, 64)
    assert set(count.other) == {"mem_dpfp", "mem_conv"} and sum(count.other.values()) < 0.02 * count.forward
    assert train_flops_per_token(cfg, 4) == pytest.approx(3 * count.forward / 64)
