"""Resume on a different layout, per rank: what is ours and not DeepSpeed's, moved by global ids.

* Data. The run reads S = dp x micro_batch_size *streams* (rows of the global batch, see
  `data_pipeline.segment_stream`); what a stream reads depends only on its global id and S, so
  every stream continues from its saved cursor on whichever rank now holds it: the samples after
  the change are exactly the uninterrupted run's, none skipped or repeated.
* Memory state (`train.carry_memory`): each saved rank recorded its streams and heads; every
  rank assembles its streams' rows and its heads' slices from those records. Streams that no
  saved rank holds start from zero memory, with a warning that says how many.
* RNG: a rank takes the saved state of the rank at the same (dp, tp, pp) coordinates, if any.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch


def replica_states(rank_states: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One saved rank state per data-parallel replica (its TP and pipeline ranks read the same
    streams and hold the same loader cursors), in dp order."""
    firsts = [s for s in rank_states if s["coord"]["tp"] == 0 and s["coord"]["pp"] == 0]
    return sorted(firsts, key=lambda s: s["coord"]["dp"])


def state_at(rank_states: list[dict[str, Any]], coord: dict[str, int]) -> Optional[dict[str, Any]]:
    """The saved rank state at (dp, tp, pp) coordinates `coord`, if the saved layout had one."""
    return next((s for s in rank_states if s["coord"] == coord), None)


@dataclass(frozen=True)
class Redistributed:
    """This rank's memory state assembled from the saved ranks, and how many of its streams had
    none (they start from zero memory)."""

    memory: Optional[dict[str, torch.Tensor]]
    missing_streams: int


def redistribute_memory(rank_states: list[dict[str, Any]], stream_ids: list[int],
                        heads: tuple[int, int]) -> Redistributed:
    """Rows `stream_ids` and heads [heads[0], heads[1]) of every layer's memory (A (B, H, dk, hd),
    z (B, H, dk)) and window cache (k, v (B, Hkv, N, hd), kv_valid (B, Hkv, N)) from the saved
    ranks' slices, matched by global stream id and head. `heads` are query heads; a tensor with
    fewer heads per rank (grouped-query keys/values) is matched in its own head space, scaled by
    its heads per query head. A stream is missing when some of its heads are in no saved state;
    missing ones get zeros."""
    pieces: dict[str, dict[int, dict[int, torch.Tensor]]] = {}  # key -> stream -> first head -> (h, ...)
    scale: dict[str, float] = {}  # key -> its heads per query head
    for s in rank_states:
        memory = s.get("memory_state")
        if not memory:
            continue
        h0, h1 = s["heads"][0], s["heads"][1]
        for key, t in memory.items():
            scale[key] = t.shape[1] / (h1 - h0)
            for row, g in enumerate(s["stream_ids"]):
                pieces.setdefault(key, {}).setdefault(int(g), {})[round(h0 * scale[key])] = t[row]  # (h_saved, ...)
    if not pieces:
        return Redistributed(memory=None, missing_streams=len(stream_ids))
    out, missing = {}, set()
    for key, by_stream in pieces.items():
        per_head = next(iter(next(iter(by_stream.values())).values())).shape[1:]  # (...) of one head
        own = (round(heads[0] * scale[key]), round(heads[1] * scale[key]))
        rows = []
        for g in stream_ids:
            row = _heads_of(by_stream.get(g, {}), own)
            if row is None:
                missing.add(g)
                row = torch.zeros((own[1] - own[0], *per_head))
            rows.append(row)
        out[key] = torch.stack(rows).float()  # (B, H_rank, ...)
    return Redistributed(memory=out, missing_streams=len(missing))


def _heads_of(slices: dict[int, torch.Tensor], heads: tuple[int, int]) -> Optional[torch.Tensor]:
    """Heads [h0, h1) of one stream from its saved slices {first head: (h, ...)}; None if uncovered."""
    if not slices:
        return None
    whole = torch.cat([slices[h0] for h0 in sorted(slices)])  # (H_covered, ...)
    covered = sorted(slices)[0] == 0 and sum(t.shape[0] for t in slices.values()) >= heads[1]
    return whole[heads[0]:heads[1]].clone() if covered else None

