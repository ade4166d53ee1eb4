"""What a rank records about its place in the layout, and which layout changes a resume accepts."""
import pytest
import torch

from memgpt_dist.config import ConfigError, load_config
from memgpt_dist.parallel.dist import Topology, place_record
from memgpt_dist.train.resume import check_resume_compatible


def topo(rank: int, dp: int, tp: int) -> Topology:
    return Topology(rank=rank, world_size=dp * tp, local_rank=rank, dp_rank=rank // tp, dp_size=dp,
                    device=torch.device("cpu"), tp_rank=rank % tp, tp_size=tp)


def test_rank_state_records_coordinates_streams_and_heads():
    assert place_record(topo(3, dp=2, tp=2), [2, 3], n_head=8) == {
        "layout": {"dp": 2, "tp": 2, "pp": 1}, "coord": {"dp": 1, "tp": 1, "pp": 0},
        "stream_ids": [2, 3], "heads": [4, 8]}


def test_resume_on_another_tp_degree_must_keep_the_data_streams():
    saved = load_config(None, ["parallel.tp=2"])  # dp1 x micro-batch 4: 4 streams
    with pytest.raises(ConfigError, match=r"4 data streams .* this run is dp2 .* with 8 streams.*"
                                          r"set parallel.micro_batch_size=2 and parallel.grad_accum=1"):
        check_resume_compatible(saved.to_json(), load_config(None), 2, topo(0, dp=2, tp=1))
    assert check_resume_compatible(saved.to_json(), saved, 2, topo(0, dp=1, tp=2)) is None  # same layout
    change = check_resume_compatible(saved.to_json(), load_config(None, ["parallel.micro_batch_size=2"]), 2,
                                     topo(0, dp=2, tp=1))
    assert (change.saved.tp, change.now.dp, change.now.streams) == (2, 2, 4)
