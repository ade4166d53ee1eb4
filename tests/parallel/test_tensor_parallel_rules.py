"""Tensor-parallel rules, in one process: which parameters AutoTP splits and how, the per-head
slicing of the rest, and that a block holding a TP rank's share of the heads computes that
share of the attention output and exactly those heads of the memory state."""
import copy

import pytest
import torch
from torch import nn

from memgpt_dist.config import load_config
from memgpt_dist.model import GPT
from memgpt_dist.parallel.shares import TP_SHARDED_SUFFIXES
from memgpt_dist.parallel.tensor_parallel import (COLUMN_PARALLEL, ROW_PARALLEL, autotp_partition_config,
                                                  head_slice, shard_head_parameters, tp_shard_dim,
                                                  tp_sharded_suffixes)
from memgpt_dist.train.run import build_model

OVR = ["model.vocab_size=97", "model.n_embd=32", "model.n_head=4", "model.n_layer=2", "model.segment_len=8",
       "model.bias=true"]


def test_the_dry_run_estimates_shard_what_execution_shards():
    names = [n for n, _ in build_model(load_config(None, OVR)).named_parameters()]
    executed = {n for n in names if n.endswith(tp_sharded_suffixes())}
    assert executed == {n for n in names if n.endswith(TP_SHARDED_SUFFIXES)}
    assert executed == {n for n in names if tp_shard_dim(n) is not None}
    assert len(executed) == 2 * 19  # per block: 8 column weights, 5 column biases, 2 row weights, 4 head-sliced


def test_deepspeed_matches_every_linear_layer_to_its_rule():
    from deepspeed.module_inject.autotp_config import AutoTPConfig, PartitionType

    rules = AutoTPConfig.from_dict(autotp_partition_config())
    model = GPT(load_config(None, OVR).model, load_config(None, OVR).memory)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 10  # q k v o, mem q k v, write gate, up, down per block
    for name in linears:
        spec = rules.find_matching_spec(name + ".weight")
        want = PartitionType.ROW if name.endswith(ROW_PARALLEL) else PartitionType.COLUMN
        assert spec is not None and spec.partition_type == want, name
    assert rules.strict_mode  # a new Linear without a rule fails at deepspeed.initialize
    assert all(rules.find_matching_spec(n) is None for n in ("wte.weight", "blocks.0.ln1.weight", "ln_f.weight"))


def test_head_parameters_keep_the_ranks_heads():
    cfg = load_config(None, OVR + ["parallel.tp=2"])
    full = dict(build_model(load_config(None, OVR)).named_parameters())
    ranks = [dict(build_model(cfg, tp_rank=r).named_parameters()) for r in range(2)]
    sliced = [n for n in full if n.endswith(("mem_beta", "_conv.weight"))]
    assert len(sliced) == 2 * 4
    for name in sliced:
        assert ranks[0][name].shape[0] == full[name].shape[0] // 2, name
        torch.testing.assert_close(torch.cat([ranks[0][name], ranks[1][name]]), full[name], rtol=0, atol=0)
    assert all(torch.equal(ranks[1][n], full[n]) for n in full if n not in sliced)  # AutoTP splits the rest


def test_head_slice_refuses_an_uneven_split():
    assert head_slice(8, 1, 2) == slice(4, 8)
    with pytest.raises(ValueError, match="parallel.tp=3"):
        head_slice(8, 0, 3)


def shard_block_like_autotp(block: nn.Module, tp_rank: int, tp: int) -> nn.Module:
    """What AutoTP's column/row layers hold on `tp_rank`, plus `shard_head_parameters`."""
    shard = copy.deepcopy(block)
    with torch.no_grad():
        for name, module in shard.named_modules():
            if name.endswith(COLUMN_PARALLEL):
                rows = head_slice(module.out_features, tp_rank, tp)
                module.weight = nn.Parameter(module.weight[rows].clone())
                module.bias = None if module.bias is None else nn.Parameter(module.bias[rows].clone())
            elif name.endswith(ROW_PARALLEL):
                module.weight = nn.Parameter(module.weight[:, head_slice(module.in_features, tp_rank, tp)].clone())
                if tp_rank > 0 and module.bias is not None:  # replicated: added once after the all-reduce
                    module.bias = nn.Parameter(torch.zeros_like(module.bias))
    shard_head_parameters(shard, tp_rank, tp)
    return shard


@pytest.mark.parametrize("tp", [2, 4])
def test_a_block_with_a_share_of_the_heads_computes_that_share(tp):
    cfg = load_config(None, OVR)
    block = build_model(cfg).blocks["0"]
    with torch.no_grad():  # distinct per-head gates and taps, as after training
        for name, p in block.named_parameters():
            if name.endswith(("mem_beta", "_conv.weight")):
                p.add_(0.1 * torch.randn(p.shape))
    x = torch.randn(2, 24, 32)
    out, state, _ = block.attn(x, None, None, None, True)
    shards = [shard_block_like_autotp(block, r, tp) for r in range(tp)]
    attn = [s.attn(x, None, None, None, True) for s in shards]
    # the row-parallel all-reduce sums the ranks' shares of o_proj (and of down_proj)
    torch.testing.assert_close(sum(o for o, _, _ in attn), out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sum(s.mlp(x) for s in shards), block.mlp(x), rtol=1e-5, atol=1e-6)
    for r, (_, rank_state, _) in enumerate(attn):
        heads = head_slice(4, r, tp)
        assert rank_state.A.shape[1] == 4 // tp
        torch.testing.assert_close(rank_state.A, state.A[:, heads], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rank_state.z, state.z[:, heads], rtol=1e-5, atol=1e-6)
