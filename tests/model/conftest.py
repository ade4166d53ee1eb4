"""A tiny model factory shared by the model tests (fp32, CPU, eval mode, fixed seed)."""
from __future__ import annotations

import pytest
import torch

from memgpt_dist.config import MemoryConfig, ModelConfig
from memgpt_dist.model import GPT

SEGMENT_LEN = 8
VOCAB = 50


def build_tiny(memory: bool = True, position: str = "rope", seed: int = 0, memory_kwargs: dict | None = None,
               **model_kwargs) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{"vocab_size": VOCAB, "n_layer": 2, "n_head": 4, "n_embd": 32, "segment_len": SEGMENT_LEN,
                         "position": position, "init_std": 0.1, **model_kwargs})
    model = GPT(cfg, MemoryConfig(enabled=memory, **(memory_kwargs or {})))
    model.init_weights()
    return model.eval()


@pytest.fixture()
def make_model():
    return build_tiny


@pytest.fixture()
def tokens():
    """Four segments of two samples."""
    return torch.randint(0, VOCAB, (2, 4 * SEGMENT_LEN), generator=torch.Generator().manual_seed(7))
