"""The GPT with per-head associative memory. Imports torch only (see tests/model/test_layering.py)."""
from memgpt_dist.model.gpt import GATE_SUFFIX, GPT, ModelOutput
from memgpt_dist.model.memory import (LayerState, MemoryState, detach_state, move_state, state_from_dict,
                                      state_to_dict, zero_state)

__all__ = ["GATE_SUFFIX", "GPT", "LayerState", "MemoryState", "ModelOutput", "detach_state", "move_state",
           "state_from_dict", "state_to_dict", "zero_state"]
