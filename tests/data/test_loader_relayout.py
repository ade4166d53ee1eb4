"""Loader state across a change of data-parallel degree: the streams keep their global ids, so
the states of dp2 x micro-batch 2 restore dp1 x micro-batch 4 (and back) exactly."""
from __future__ import annotations

import json

import torch

from data_pipeline.segment_stream import MixedLoader, SegmentLoader

N, K = 8, 3


def loader(data, **kw) -> SegmentLoader:
    return SegmentLoader(data, "train", **{"segment_len": N, "n_segments": K, "seed": 7, **kw})


def take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def saved(ld) -> dict:
    return json.loads(json.dumps(ld.state_dict()))  # as stored in a checkpoint


def test_two_replicas_states_restore_one_rank_with_their_streams(corpus):
    ref = take(loader(corpus, micro_batch_size=4), 9)
    halves = [loader(corpus, micro_batch_size=2, dp_rank=r, dp_size=2) for r in range(2)]
    for h in halves:
        take(h, 4)
    one = loader(corpus, micro_batch_size=4)
    one.load_state_dicts([saved(h) for h in halves])
    for got, want in zip(take(one, 5), ref[4:]):
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["stream_ids"], want["stream_ids"])
    assert one.seen_samples == sum(h.seen_samples for h in halves)


def test_one_rank_state_restores_two_replicas(corpus):
    ref = take(loader(corpus, micro_batch_size=4), 9)
    one = loader(corpus, micro_batch_size=4)
    take(one, 4)
    halves = [loader(corpus, micro_batch_size=2, dp_rank=r, dp_size=2) for r in range(2)]
    for h in halves:
        h.load_state_dicts([saved(one)])
    for i, (a, b) in enumerate(zip(take(halves[0], 5), take(halves[1], 5))):
        assert torch.equal(torch.cat([a["input_ids"], b["input_ids"]]), ref[4 + i]["input_ids"])


def test_mixed_loader_moves_its_draw_counts_with_the_streams(corpus):
    def mixed(**kw):  # one corpus twice: two sources with their own cursors, drawn by weight
        return MixedLoader([loader(corpus, **kw), loader(corpus, seed=8, **kw)], [0.5, 0.5], seed=3)

    ref = take(mixed(micro_batch_size=4), 8)
    halves = [mixed(micro_batch_size=2, dp_rank=r, dp_size=2) for r in range(2)]
    for h in halves:
        take(h, 3)
    one = mixed(micro_batch_size=4)
    one.load_state_dicts([json.loads(json.dumps(h.state_dict())) for h in halves])
    for got, want in zip(take(one, 5), ref[3:]):
        assert torch.equal(got["input_ids"], want["input_ids"])
