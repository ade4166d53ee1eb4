"""Issue 15's question: is the memory GPT better than an ordinary GPT of the same size, trained on
the same tokens, with full causal attention over the same context?

Arms, each a set of config overrides on one base config (`--config`), trained through the real
CLI (`launch/train.py`) with the same data order, optimizer, steps and tokens per step:

  a  model.attention=full,    no memory     the ordinary GPT at context C = K x N
  b  model.attention=window,  no memory     own + previous segment's keys/values
  c  model.attention=segment, memory        today's memory GPT
  d  model.attention=window,  memory
  e  model.attention=window,  memory, memory.decay=true

Arms are made equal in parameter count (within 2%) by widening model.n_embd of the smaller ones
(in steps of 2 x n_head). Where the model has no `model.attention` option (before issue 15's
model change), arm a is stood in for by `a*`: no memory, one segment of C tokens
(model.segment_len=C, data.n_segments=1), and arms b, d, e are reported as not available.

Evaluation on long held-out documents (`--data`'s validation split), loss by token position in
the document, buckets [0, C), [C, 4C), [4C, 16C) and overall:
  - arm a as a fixed-context model is: a sliding window of C tokens with stride C/2 (each window
    scores its last C/2 tokens, the first window all of them), and non-overlapping chunks of C;
  - arms b-e stream each whole document segment by segment, carrying the state between forwards.
Cost: tokens/s reading one document of each `--cost-lengths` length (fresh weights, forward only):
streamed for b-e (benchmarks/streaming.py, a fresh process each), sliding window for a.

  python benchmarks/long_context_lm.py                                  # tiny config, default corpus
  python benchmarks/long_context_lm.py --data data/pydoc --out runs/lclm-pydoc
  python benchmarks/long_context_lm.py --steps 2000 --model.n_embd=256  # trailing args: overrides
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/streaming.py
PARAM_TOLERANCE = 0.02  # arms' parameter counts within 2% of the largest


@dataclass(frozen=True)
class Arm:
    """One model of the comparison: its config overrides and how it reads a long document."""

    name: str
    label: str
    overrides: tuple[str, ...]
    read: str  # "sliding": fixed-context windows; "stream": segment by segment with the state carried


ARMS = {
    "a": Arm("a", "full attention", ("--model.attention=full", "--memory.enabled=false"), "sliding"),
    "b": Arm("b", "window", ("--model.attention=window", "--memory.enabled=false"), "stream"),
    "c": Arm("c", "segment + memory", ("--model.attention=segment", "--memory.enabled=true"), "stream"),
    "d": Arm("d", "window + memory", ("--model.attention=window", "--memory.enabled=true"), "stream"),
    "e": Arm("e", "window + memory + decay",
             ("--model.attention=window", "--memory.enabled=true", "--memory.decay=true"), "stream"),
}


def arm_of(name: str) -> Arm:
    """The arm called `name`: a letter of ARMS, or `X@LAYERS` for arm X with its memory in the
    blocks `memory.layers=LAYERS` names ('+' between indices, since --arms splits on commas):
    `c@every:4`, `c@0`, `c@0+2`."""
    letter, _, layers = name.partition("@")
    if letter not in ARMS:
        raise ValueError(f"--arms: unknown arm {letter!r}; choose from {', '.join(ARMS)} (optionally X@LAYERS)")
    arm = ARMS[letter]
    if not layers:
        return arm
    if "--memory.enabled=true" not in arm.overrides:
        raise ValueError(f"--arms {name}: arm {letter} has no memory, so @{layers} has nothing to place")
    spec = layers.replace("+", ",")
    return Arm(name, f"{arm.label} in blocks {spec}", (*arm.overrides, f"--memory.layers={spec}"), arm.read)


# --------------------------------------------------------------------------- equal parameters


def count_params(config: str, overrides: list[str]) -> int:
    """Parameters of the model these overrides build (on the meta device: no memory, no time)."""
    from memgpt_dist.config import load_config
    from memgpt_dist.model import GPT

    cfg = load_config(config, overrides)
    with torch.device("meta"):
        return GPT(cfg.model, cfg.memory).num_params()


def match_width(config: str, overrides: list[str], target: int, tol: float = PARAM_TOLERANCE,
                max_steps: int = 64) -> tuple[list[str], int]:
    """Overrides with model.n_embd widened (in steps of 2 x n_head, so heads keep an even
    head_dim) to the parameter count closest to `target`; where no width comes within `tol`
    (small models: one step is several percent), model.mlp_ratio +-1 or 2 too.
    Returns the overrides and their count."""
    from memgpt_dist.config import load_config

    cfg = load_config(config, overrides)
    step, ratio = 2 * cfg.model.n_head, cfg.model.mlp_ratio
    candidates = []  # (outside tolerance, mlp_ratio changed, distance, overrides, count)
    for r in sorted({ratio, *(x for x in range(ratio - 2, ratio + 3) if x >= 1)}, key=lambda x: abs(x - ratio)):
        for i in range(max_steps + 1):
            trial = [*overrides, f"--model.n_embd={cfg.model.n_embd + i * step}"] + (
                [f"--model.mlp_ratio={r}"] if r != ratio else [])
            n = count_params(config, trial)
            candidates.append((abs(n - target) > tol * target, r != ratio, abs(n - target), trial, n))
            if n > target:
                break
        if min(candidates)[0] is False:
            break
    best = min(candidates, key=lambda c: c[:3])
    return best[3], best[4]


def equal_size_arms(config: str, base: list[str], arms: list[Arm], tol: float = PARAM_TOLERANCE
                    ) -> dict[str, tuple[list[str], int]]:
    """Every arm's full overrides and parameter count, the smaller arms widened to the largest;
    a ValueError when some arm cannot be brought within `tol` (a fraction) of it."""
    plain = {a.name: [*base, *a.overrides] for a in arms}
    target = max(count_params(config, o) for o in plain.values())
    out = {}
    for name, overrides in plain.items():
        n = count_params(config, overrides)
        if abs(n - target) > tol * target:
            overrides, n = match_width(config, overrides, target, tol)
        if abs(n - target) > tol * target:
            raise ValueError(f"arm {name}: {n:,} parameters, not within {tol:.0%} of {target:,}; "
                             f"change model.n_embd or model.n_layer")
        out[name] = (overrides, n)
    return out


# --------------------------------------------------------------------------- reading documents


def bucket_edges(C: int) -> list[tuple[str, int, int]]:
    """(name, first, end) of the token-position buckets."""
    return [("[0,C)", 0, C), ("[C,4C)", C, 4 * C), ("[4C,16C)", 4 * C, 16 * C)]


@torch.no_grad()
def streamed_losses(model, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Next-token loss at every position of one document (L + 1,) read `chunk` tokens per
    forward with the model's state carried from forward to forward: (L,)."""
    state, out = None, []
    inputs, targets = ids[:-1].unsqueeze(0), ids[1:].unsqueeze(0)  # (1, L) each
    for x, y in zip(inputs.split(chunk, dim=1), targets.split(chunk, dim=1)):
        o = model(x, state=state)
        state = o.state
        out.append(F.cross_entropy(o.logits[0].float(), y[0], reduction="none"))  # (chunk,)
    return torch.cat(out)


@torch.no_grad()
def sliding_losses(model, ids: torch.Tensor, window: int, stride: int, batch: int = 8) -> torch.Tensor:
    """Next-token loss at every position of one document (L + 1,) read as a fixed-context model
    reads it: windows of `window` tokens starting every `stride`; the first window scores all its
    tokens, each later one its last `stride` (the ones no earlier window scored). L - window must
    be a multiple of stride. (L,)."""
    L = ids.numel() - 1
    if L < window or (L - window) % stride:
        raise ValueError(f"a document of {L} tokens does not tile into windows of {window} every {stride}")
    starts = list(range(0, L - window + 1, stride))
    out = torch.empty(L)
    for i in range(0, len(starts), batch):
        s = starts[i:i + batch]
        x = torch.stack([ids[j:j + window] for j in s])  # (b, window)
        y = torch.stack([ids[j + 1:j + window + 1] for j in s])  # (b, window)
        loss = F.cross_entropy(model(x).logits.float().transpose(1, 2), y, reduction="none")  # (b, window)
        for row, j in zip(loss, s):
            keep = window if j == 0 else stride
            out[j + window - keep:j + window] = row[window - keep:]
    return out


@torch.no_grad()
def chunk_losses(model, ids: torch.Tensor, window: int) -> torch.Tensor:
    """Next-token loss at every position of one document (L + 1,) read in non-overlapping chunks
    of `window` tokens, each from an empty context (the last chunk may be shorter): (L,)."""
    out = []
    for j in range(0, ids.numel() - 1, window):
        x, y = ids[j:j + window].unsqueeze(0), ids[j + 1:j + window + 1].unsqueeze(0)  # (1, <= window) each
        x = x[:, :y.shape[1]]
        out.append(F.cross_entropy(model(x).logits[0].float(), y[0], reduction="none"))
    return torch.cat(out)


def bucket_means(losses: list[torch.Tensor], C: int) -> dict[str, float]:
    """Mean loss per position bucket and overall, over documents of any lengths, with token counts."""
    sums = {name: 0.0 for name, _, _ in bucket_edges(C)}
    counts = dict.fromkeys(sums, 0)
    for loss in losses:
        for name, lo, hi in bucket_edges(C):
            part = loss[lo:hi]
            sums[name] += float(part.double().sum())
            counts[name] += part.numel()
    total = sum(float(x.double().sum()) for x in losses)
    n = sum(x.numel() for x in losses)
    out = {name: sums[name] / counts[name] if counts[name] else float("nan") for name in sums}
    out["overall"] = total / n
    out["tokens"] = {**counts, "overall": n}
    return out


def eval_documents(data: Path, C: int, unit: int, min_tokens: int, limit: int) -> list[torch.Tensor]:
    """Held-out documents of at least `min_tokens` + 1 tokens, cut to at most 16C + 1 and to a
    whole number of `unit`s (+1 for the last label), so every reading scores the same tokens."""
    from data_pipeline.eval_data import long_documents

    docs = long_documents(data, "validation", min_tokens + 1, limit)
    if not docs:
        raise SystemExit(f"no validation document of {data} has {min_tokens + 1} tokens; lower --min-doc-tokens")
    out = []
    for d in docs:
        L = min(len(d) - 1, 16 * C) // unit * unit
        out.append(torch.from_numpy(np.asarray(d[:L + 1], dtype=np.int64)))
    return out


def evaluate_arm(run: Path, arm: Arm, docs: list[torch.Tensor], C: int) -> dict:
    """Bucketed losses of one trained arm (a: sliding window and non-overlapping chunks)."""
    from memgpt_dist.generate import find_checkpoint, load_model

    model, cfg = load_model(find_checkpoint(run, None))
    model.eval()
    if arm.read == "sliding":
        return {"sliding": bucket_means([sliding_losses(model, d, C, C // 2) for d in docs], C),
                "chunks": bucket_means([chunk_losses(model, d, C) for d in docs], C)}
    return {"stream": bucket_means([streamed_losses(model, d, C) for d in docs], C)}


# --------------------------------------------------------------------------- cost


@torch.no_grad()
def sliding_cost(config: str, overrides: list[str], length: int, C: int, repeats: int = 2) -> float:
    """Tokens/s of a fixed-context model of these overrides reading one random document of
    `length` tokens with a sliding window of C, stride C/2 (fresh weights)."""
    from memgpt_dist.config import load_config
    from memgpt_dist.model import GPT

    cfg = load_config(config, overrides)
    torch.manual_seed(0)
    model = GPT(cfg.model, cfg.memory)
    model.init_weights()
    model.eval()
    ids = torch.randint(0, cfg.model.vocab_size, (length + 1,))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        sliding_losses(model, ids, C, C // 2)
        best = min(best, time.perf_counter() - t0)
    return length / best


def stream_cost(config: str, overrides: list[str], length: int, C: int, threads: int) -> float:
    """Tokens/s streaming one random document of `length` tokens, C per forward (own process)."""
    from memgpt_dist.config import load_config
    from streaming import measure_in_subprocess

    cfg = load_config(config, overrides)
    K = C // cfg.model.segment_len
    return measure_in_subprocess(cfg.model, cfg.memory, "memory", length, threads=threads,
                                 segments_per_call=K, repeats=2).tokens_per_s


# --------------------------------------------------------------------------- report


def format_table(results: dict, C: int) -> str:
    """One row per arm and reading: parameters, training time, loss by bucket, cost."""
    names = [n for n, _, _ in bucket_edges(C)] + ["overall"]
    lengths = sorted({int(k) for r in results.values() for k in r.get("cost", {})})
    wa = max(4, *(len(n) for n in results))  # arm variants (c@every:4) are longer than a letter
    wl = max(26, *(len(r["label"]) for r in results.values()))
    head = (f"{'arm':{wa}s} {'model':{wl}s} {'reading':9s} {'params':>10s} {'n_embd':>6s} {'train s':>7s} "
            + " ".join(f"{n:>9s}" for n in names) + "".join(f" {f'tok/s@{n}':>11s}" for n in lengths))
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        for reading, losses in r["losses"].items():
            cost = "".join(f" {r['cost'].get(str(n), float('nan')):>11,.0f}" for n in lengths)
            lines.append(f"{name:{wa}s} {r['label']:{wl}s} {reading:9s} {r['params']:>10,d} {r['n_embd']:>6d} "
                         f"{r['train_s']:>7.0f} " + " ".join(f"{losses[n]:>9.4f}" for n in names) + cost)
    tokens = next(iter(next(iter(results.values()))["losses"].values()))["tokens"]
    lines.append("scored tokens per bucket: " + ", ".join(f"{k} {v:,}" for k, v in tokens.items()))
    return "\n".join(lines)


def targets(results: dict, C: int) -> list[tuple[str, Optional[bool], str]]:
    """(target, met or None when its arms did not run, figures) for issue 15's loss and cost targets."""
    base = next((results[k]["losses"]["sliding"] for k in ("a", "a*") if k in results), None)
    ours = {k: results[k]["losses"]["stream"] for k in ("d", "e") if k in results}
    out: list[tuple[str, Optional[bool], str]] = []
    if base is None or not ours:
        return [("(d) or (e) against (a)", None, "arms a and d/e did not both run")]
    rel = {k: (v["[0,C)"] - base["[0,C)"]) / base["[0,C)"] for k, v in ours.items()}
    out.append(("(d) or (e) within 1% of (a) on [0,C)", min(rel.values()) <= 0.01,
                ", ".join(f"{k} {x:+.2%}" for k, x in rel.items())))
    far = {k: (v["[4C,16C)"] - base["[4C,16C)"]) / base["[4C,16C)"] for k, v in ours.items()}
    out.append(("(d) or (e) >= 3% lower than (a) on [4C,16C)", min(far.values()) <= -0.03,
                ", ".join(f"{k} {x:+.2%}" for k, x in far.items())))
    if "b" in results:
        b = results["b"]["losses"]["stream"]["[4C,16C)"]
        best = min(ours, key=lambda k: ours[k]["[4C,16C)"])
        out.append(("the better of (d), (e) lower than (b) on [4C,16C)", ours[best]["[4C,16C)"] < b,
                    f"{best} {ours[best]['[4C,16C)']:.4f} vs b {b:.4f}"))
    for k in ours:
        cost = {int(n): v for n, v in results[k].get("cost", {}).items()}
        if len(cost) >= 2:
            flat = cost[max(cost)] / cost[min(cost)]
            out.append((f"({k}) streamed tok/s at {max(cost):,} within 15% of {min(cost):,}", flat >= 0.85,
                        f"{flat:.2f}"))
    return out


def format_targets(rows) -> str:
    mark = {True: "PASS", False: "FAIL", None: "n/a "}
    return "\n".join(f"{mark[met]}  {t}: {fig}" for t, met, fig in rows)


# --------------------------------------------------------------------------- driver


def _run(cmd: list[str], log: Path) -> None:
    """Run `cmd` with its output written to `log` as it comes (a long arm can be watched)."""
    # One thread per training process on a shared 2-core machine (see benchmarks/long_range.py).
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"{' '.join(cmd)} failed ({code}); see {log}\n{log.read_text()[-2000:]}")


def train_arm(args, name: str, overrides: list[str], out: Path) -> tuple[Path, float]:
    """Train one arm through launch/train.py (reused when an earlier run reached --steps)."""
    safe = name.replace("*", "_star").replace("@", "_at_").replace(":", "-")
    run = out / "runs" / safe
    if (run / "checkpoints" / f"step_{args.steps:08d}").exists():
        return run, json.loads((run / "bench_train.json").read_text())["seconds"]
    t0 = time.time()
    _run([sys.executable, "launch/train.py", "--config", args.config, f"--data.path={args.data}",
          f"--run_dir={run}", f"--train.max_steps={args.steps}", f"--checkpoint.every={args.steps}",
          "--checkpoint.keep_last=1", "--train.eval_every=0", "--log.every=50",
          f"--optim.warmup_steps={max(1, min(args.steps // 12, 100))}", *overrides], out / f"train-{safe}.log")
    seconds = time.time() - t0
    (run / "bench_train.json").write_text(json.dumps({"seconds": seconds}))
    print(f"[{name}] trained {args.steps} steps in {seconds:.0f} s", flush=True)
    return run, seconds


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml", help="base config every arm overrides")
    p.add_argument("--data", default="data/default", help="prepared corpus (train and held-out documents)")
    p.add_argument("--out", default="runs/long_context_lm", help="runs, logs and results.json go here")
    p.add_argument("--arms", default="a,b,c,d,e",
                   help="arms to train (letters of ARMS; X@LAYERS: arm X with memory.layers=LAYERS, e.g. c@every:4)")
    p.add_argument("--steps", type=int, default=600, help="training steps of every arm")
    p.add_argument("--docs", type=int, default=24, help="held-out documents")
    p.add_argument("--min-doc-tokens", type=int, default=0, help="shortest document scored (default 4C)")
    p.add_argument("--cost-lengths", default="2048,65536", help="document lengths for tokens/s ('' : none)")
    p.add_argument("--param-tolerance", type=float, default=PARAM_TOLERANCE,
                   help="largest relative difference of the arms' parameter counts (tiny test models: more)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of evaluation and cost")
    return p.parse_known_args(argv)


def main(argv=None) -> int:
    from memgpt_dist.config import load_config

    args, base = _parse(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(args.config, base)
    N, K = cfg.model.segment_len, cfg.data.n_segments
    C = N * K
    unit = C // 2 if (C // 2) % N == 0 else C  # windows of stride C/2 and streamed segments both tile it
    arms = [arm_of(n) for n in args.arms.split(",")]
    sizes = equal_size_arms(args.config, base, arms, args.param_tolerance)
    docs = eval_documents(Path(args.data), C, unit, args.min_doc_tokens or 4 * C, args.docs)
    print(f"C = K x N = {K} x {N} = {C}; {len(docs)} held-out documents of {args.data}", flush=True)
    lengths = [int(x) for x in args.cost_lengths.split(",") if x]
    results = {}
    for arm in arms:
        overrides, n_params = sizes[arm.name]
        run, seconds = train_arm(args, arm.name, overrides, out)
        arm_cfg = load_config(args.config, overrides)
        cost = {str(n): (sliding_cost(args.config, overrides, n, C) if arm.read == "sliding" else
                         stream_cost(args.config, overrides, n, C, args.threads)) for n in lengths}
        results[arm.name] = {"label": arm.label, "overrides": overrides, "params": n_params,
                             "n_embd": arm_cfg.model.n_embd, "train_s": seconds,
                             "losses": evaluate_arm(run, arm, docs, C), "cost": cost}
        (out / "results.json").write_text(json.dumps({"C": C, "arms": results}, indent=1))
    print(f"\n## long-context LM, {args.config} {' '.join(base)}, {args.steps} steps, data {args.data}")
    print(format_table(results, C))
    print(format_targets(targets(results, C)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
