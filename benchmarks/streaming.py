"""Cost of reading long documents: a memory model streamed segment by segment next to a
full-causal-attention model of the same size over the whole document.

Each measurement runs in a fresh process (`python benchmarks/streaming.py SPEC`), so the peak
resident memory it reports belongs to that one model and length (on CUDA: peak allocated
bytes). Forward only, as in evaluation or prefill; weights are freshly initialised, since the
cost does not depend on their values. The memory model's cost per token must stay flat in
document length (its state has a fixed size); full attention's grows with it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
from pathlib import Path
import time
from dataclasses import dataclass
from typing import Optional

import torch

from memgpt_dist.config import MemoryConfig, ModelConfig


@dataclass(frozen=True)
class StreamCost:
    """One model reading one document."""

    kind: str  # "memory": streamed with the memory; "off": same shape, memory off, streamed alike;
    # "full": full causal attention, one pass
    length: int  # document tokens
    tokens_per_s: float
    seconds: float
    peak_mb: float  # peak resident memory of the process (CPU) or peak allocated (CUDA)


def full_attention_twin(model: ModelConfig, length: int) -> tuple[ModelConfig, MemoryConfig]:
    """The same shape without memory and with one segment spanning the whole document."""
    return dataclasses.replace(model, segment_len=length, dropout=0.0), MemoryConfig(enabled=False)


@torch.no_grad()
def measure(model_cfg: ModelConfig, mem_cfg: MemoryConfig, kind: str, length: int, device: str = "cpu",
            segments_per_call: int = 16, repeats: int = 3) -> StreamCost:
    """Time one forward read of a random document of `length` tokens (best of `repeats`)."""
    from memgpt_dist.model import GPT

    torch.manual_seed(0)
    if kind == "full":
        model_cfg, mem_cfg = full_attention_twin(model_cfg, length)
    if kind == "off":
        mem_cfg = MemoryConfig(enabled=False)
    model = GPT(model_cfg, mem_cfg).to(device)
    model.init_weights()
    model.eval()
    ids = torch.randint(0, model_cfg.vocab_size, (1, length), device=device)
    chunk = length if kind == "full" else model_cfg.segment_len * segments_per_call
    _read(model, ids[:, :min(chunk, model_cfg.segment_len)], chunk)  # warm-up: allocations, kernel choice
    times = []
    for _ in range(repeats):  # short documents take a fraction of a second
        _sync(device)
        t0 = time.perf_counter()
        _read(model, ids, chunk)
        _sync(device)
        times.append(time.perf_counter() - t0)
    dt = min(times)
    return StreamCost(kind, length, length / dt, dt, _peak_mb(device))


def _read(model, ids: torch.Tensor, chunk: int) -> None:
    """Read `ids` in chunks of `chunk` tokens, carrying the memory state from chunk to chunk."""
    state = None
    for part in ids.split(chunk, dim=1):
        state = model(part, state=state).state  # (1, chunk) -> memory after the chunk


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure_in_subprocess(model_cfg: ModelConfig, mem_cfg: MemoryConfig, kind: str, length: int,
                          device: str = "cpu", threads: int = 0, segments_per_call: int = 16,
                          repeats: int = 3) -> StreamCost:
    """`measure` in a fresh process, so its peak memory is its own."""
    spec = {"model": dataclasses.asdict(model_cfg), "memory": dataclasses.asdict(mem_cfg), "kind": kind,
            "length": length, "device": device, "threads": threads, "segments_per_call": segments_per_call,
            "repeats": repeats}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"streaming measurement {kind}:{length} failed:\n{proc.stderr[-2000:]}")
    return StreamCost(**json.loads(proc.stdout.strip().splitlines()[-1]))


def streaming_costs(model_cfg: ModelConfig, mem_cfg: MemoryConfig, lengths: list[int], full_max: int,
                    memory_off: bool = False, **kw) -> list[StreamCost]:
    """The memory model at every length, full attention up to `full_max` tokens; with
    `memory_off` also the same model without memory, streamed in the same chunks."""
    rows = []
    for length in lengths:
        rows.append(measure_in_subprocess(model_cfg, mem_cfg, "memory", length, **kw))
        if memory_off:
            rows.append(measure_in_subprocess(model_cfg, mem_cfg, "off", length, **kw))
        if length <= full_max:
            rows.append(measure_in_subprocess(model_cfg, mem_cfg, "full", length, **kw))
    return rows


def summary(rows: list[StreamCost]) -> dict:
    """Flatness (memory tok/s at the longest / at the shortest length), the speed-up over full
    attention at the longest length it ran and at every length (`vs_full`), and the memory
    model's tok/s over the memory-off model's at every length where both ran (`vs_off`)."""
    mem, full, off = ({r.length: r.tokens_per_s for r in rows if r.kind == k} for k in ("memory", "full", "off"))
    lo, hi = min(mem), max(mem)
    vs_full = {n: mem[n] / full[n] for n in sorted(full) if n in mem}
    out = {"flatness": mem[hi] / mem[lo], "shortest": lo, "longest": hi, "full_longest": None,
           "speedup_vs_full": None, "vs_full": vs_full, "vs_off": {n: mem[n] / off[n] for n in sorted(off) if n in mem}}
    if vs_full:
        top = max(vs_full)
        out.update(full_longest=top, speedup_vs_full=vs_full[top])
    return out


def targets(rows: list[StreamCost], off_ratio: float = 0.7, flat: float = 0.85,
            beat_full_from: int = 16384) -> list[tuple[bool, str]]:
    """Issue 16's targets, each (passed, line): at the shortest length the memory model reads
    >= `off_ratio` x the memory-off model's tok/s; its tok/s at the longest length is within
    1 - `flat` of the shortest; it reads more tok/s than full attention at every length from
    `beat_full_from` on (where full attention ran)."""
    s = summary(rows)
    out = []
    if s["shortest"] in s["vs_off"]:
        r = s["vs_off"][s["shortest"]]
        out.append((r >= off_ratio, f"at {s['shortest']:,} tokens memory on / memory off = {r:.2f} (>= {off_ratio})"))
    out.append((s["flatness"] >= flat, f"memory tok/s at {s['longest']:,} / at {s['shortest']:,} = "
                                       f"{s['flatness']:.2f} (>= {flat})"))
    beat = {n: r for n, r in s["vs_full"].items() if n >= beat_full_from}
    if beat:
        cells = ", ".join(f"{n:,}: {r:.2f}x" for n, r in beat.items())
        out.append((min(beat.values()) > 1, f"memory / full attention tok/s from {beat_full_from:,} on: {cells} (> 1)"))
    return out


def format_streaming_table(rows: list[StreamCost]) -> str:
    """One line per document length: memory model, memory-off model (where run) and full
    attention side by side."""
    lengths = sorted({r.length for r in rows})
    by = {(r.kind, r.length): r for r in rows}
    kinds = ["memory"] + (["off"] if any(r.kind == "off" for r in rows) else []) + ["full"]
    titles = {"memory": "memory, streamed", "off": "memory off, streamed", "full": "full causal attention"}
    head = f"{'tokens':>8s}" + "".join(f"  {titles[k]:>26s}" for k in kinds)
    lines = [head, "-" * len(head)]
    for n in lengths:
        cells = []
        for kind in kinds:
            r = by.get((kind, n))
            cells.append(f"{r.tokens_per_s:>10,.0f} tok/s {r.peak_mb:>7,.0f} MB" if r else f"{'(not run)':>26s}")
        lines.append(f"{n:>8,d}" + "".join(f"  {c:>26s}" for c in cells))
    s = summary(rows)
    lines.append(f"memory model tok/s at {s['longest']:,} / at {s['shortest']:,} tokens = {s['flatness']:.2f}")
    if s["full_longest"]:
        lines.append(f"at {s['full_longest']:,} tokens the memory model reads {s['speedup_vs_full']:.2f}x as many "
                     f"tokens/s as full attention")
    return "\n".join(lines)


def checkpoint_streaming_cost(ckpt: Path, name: str, lengths: list[int], full_max: int, device: str) -> dict:
    """`memgpt-eval --streaming`: the cost for a model of this checkpoint's shape (the cost does
    not depend on the weights); prints the table and returns its rows and summary."""
    from memgpt_dist.generate import checkpoint_config

    cfg = checkpoint_config(ckpt)
    mem = cfg.memory if cfg.memory.enabled else dataclasses.replace(cfg.memory, enabled=True)
    rows = streaming_costs(cfg.model, mem, lengths, full_max, device=device)
    print(f"\nstreaming cost, {name} shape\n{format_streaming_table(rows)}")
    return {"rows": [dataclasses.asdict(r) for r in rows], "summary": summary(rows)}


def _child(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="one streaming measurement (used by measure_in_subprocess)")
    p.add_argument("spec", help="JSON: model, memory, kind, length, device, threads, segments_per_call, repeats")
    spec = json.loads(p.parse_args(argv).spec)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    r = measure(ModelConfig(**spec["model"]), MemoryConfig(**spec["memory"]), spec["kind"], spec["length"],
                spec["device"], spec["segments_per_call"], spec["repeats"])
    print(json.dumps(dataclasses.asdict(r)))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
