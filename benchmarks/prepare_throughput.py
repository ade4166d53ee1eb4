"""Throughput and memory of `memgpt-prepare` (issue 17 items 1 and 6).

1. tokens/s per core of our prepare (the whole CLI in a fresh process: scan, dedup, split,
   tokenize, shards, manifest, with a given tokenizer) against `datasets.Dataset.map` with the same
   `tokenizers` tokenizer (batched, num_proc = cores, one tokenizer per worker process, ids + EOS
   per document as ours writes) on the same documents; target ratio >= 1.0 against the map call
   alone (the baseline's clock starts after load_dataset has read the JSONL; its load + map is
   printed too). The baseline runs with `encode_batch` (what HF pipelines call) and with
   `encode_batch_fast` (the call ours makes: same ids, no offsets), so neither side has a cheaper
   tokenizer call than the other. `--rounds` rounds, the order reversed every other round (the
   load of a shared machine drifts within minutes), the median ratio reported; also tokens per CPU
   second of each process tree, which contention moves much less than wall time;
2. peak RSS of the prepare process tree on the stdlib corpus as a JSONL of 1 and of 8 distinct
   variants of each file (trained tokenizer, default options); target 8x / 1x <= 1.2;
3. with --slurm, the wall time of a 4-task Slurm array prepare against a 1-task one on the local
   two-node cluster (launch/slurm/local_cluster.py; needs root);
4. with --huge-doc-mb N, wall time and peak RSS of a JSONL holding one single-line document of
   N MB (issue 13 item 11: a 26 MB line took 4.4 GiB and 91 s before it was tokenized in pieces).

    python benchmarks/prepare_throughput.py                 # 1 and 2
    python benchmarks/prepare_throughput.py --scales 1,8 --slurm --json prepare.json
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.corpus_sources import iter_stdlib  # noqa: E402


@contextlib.contextmanager
def scratch(parent: Path, prefix: str):
    """A new directory under `parent`, made here (mkdtemp: it cannot be an existing one) and
    removed afterwards with what the benchmark wrote into it; nothing else is ever deleted."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_variants(path: Path, variants: int, max_files: Optional[int] = None) -> tuple[int, int]:
    """The stdlib corpus (its first `max_files` files) as JSONL, each file in `variants` distinct
    variants (a first line naming the variant, so exact dedup keeps them all); returns (documents,
    bytes). A new file only: an existing `path` is never overwritten."""
    n = 0
    with open(path, "x", encoding="utf-8") as f:
        for _, text in itertools.islice(iter_stdlib(), max_files):
            for k in range(variants):
                f.write(json.dumps({"text": f"# variant {k}\n{text}"}) + "\n")
                n += 1
    return n, path.stat().st_size


def cpu_seconds(who: int = resource.RUSAGE_CHILDREN) -> float:
    """User + system CPU seconds of this process (RUSAGE_SELF) or of its reaped descendants."""
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def run_measured(cmd: list[str], poll_s: float = 0.05) -> tuple[float, int, int, float]:
    """(wall seconds, peak RSS of the process tree summed, peak RSS of the biggest process, CPU
    seconds of the whole tree: every process in it is reaped by its parent, so RUSAGE_CHILDREN
    counts them all)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    cpu0, t0 = cpu_seconds(), time.time()
    log = tempfile.TemporaryFile("w+")  # not a pipe: progress output would fill it and block the child
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    peak_tree = peak_one = 0
    while proc.poll() is None:
        try:
            rss = [p.memory_info().rss for p in [root, *root.children(recursive=True)]]
        except psutil.Error:
            rss = []
        peak_tree, peak_one = max(peak_tree, sum(rss)), max([peak_one, *rss])
        time.sleep(poll_s)
    if proc.returncode:
        log.seek(0)
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{log.read()[-3000:]}")
    return time.time() - t0, peak_tree, peak_one, cpu_seconds() - cpu0


def prepare_cmd(inputs: list[str], out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "launch.prepare", *inputs, "--out", str(out), *extra]


_BASELINE_TOKENIZER = None  # one per datasets worker process, built on its first batch


def datasets_map(jsonl: Path, tokenizer: Path, cores: int, tmp: Path, api: str = "encode_batch") -> dict:
    """The baseline: datasets.load_dataset of the JSONL (into a fresh cache under `tmp`, so it really reads it)
    and Dataset.map(batched, num_proc=cores) calling the same tokenizer's `api`, ids + one EOS per
    document as ours writes. Wall and CPU seconds of the map alone and of load + map."""
    import datasets
    from tokenizers import Tokenizer

    tok_json = tokenizer.read_text()
    eos = Tokenizer.from_str(tok_json).token_to_id("<|endoftext|>")
    datasets.disable_caching()

    def encode(batch):
        global _BASELINE_TOKENIZER
        if _BASELINE_TOKENIZER is None:
            _BASELINE_TOKENIZER = Tokenizer.from_str(tok_json)
        return {"ids": [e.ids + [eos] for e in getattr(_BASELINE_TOKENIZER, api)(batch["text"])]}

    with scratch(tmp, "hf-cache-") as cache:
        cpu0, t0 = cpu_seconds(resource.RUSAGE_SELF) + cpu_seconds(), time.time()
        ds = datasets.load_dataset("json", data_files=str(jsonl), split="train", cache_dir=str(cache))
        cpu1, t1 = cpu_seconds(resource.RUSAGE_SELF) + cpu_seconds(), time.time()
        out = ds.map(encode, batched=True, batch_size=64, num_proc=cores, remove_columns=["text"])
        cpu2, t2 = cpu_seconds(resource.RUSAGE_SELF) + cpu_seconds(), time.time()
        tokens = sum(len(x) for x in out["ids"])
    return {"tokens": tokens, "map_s": t2 - t1, "load_map_s": t2 - t0, "map_cpu_s": cpu2 - cpu1,
            "load_map_cpu_s": cpu2 - cpu0}


def measure_rss(tmp: Path, scales: list[int], tokenizer_sample_mb: Optional[float] = None) -> dict:
    """Peak RSS of a prepare (BPE trained too) of each scale. `tokenizer_sample_mb`: the BPE's
    bounded sample (`--tokenizer-sample`); below the smallest corpus, every scale trains on a
    sample of the same size, as a corpus larger than the default 1 GB sample does. None: the
    default, under which these small corpora are trained on whole (the trainer grows with them)."""
    rows = {}
    extra = () if tokenizer_sample_mb is None else ("--tokenizer-sample", str(tokenizer_sample_mb))
    for k in scales:
        with scratch(tmp, f"rss-x{k}-") as work:
            jsonl = work / f"stdlib-x{k}.jsonl"
            docs, size = write_variants(jsonl, k)
            wall, tree, one, _ = run_measured(prepare_cmd([str(jsonl)], work / "corpus", *extra))
            m = json.loads((work / "corpus" / "manifest.json").read_text())
        rows[k] = {"documents": docs, "input_mb": round(size / 2**20, 1), "seconds": round(wall, 1),
                   "peak_rss_tree_mb": round(tree / 2**20, 1), "peak_rss_one_process_mb": round(one / 2**20, 1),
                   "tokens": sum(t["tokens"] for t in m["totals"].values())}
        print(f"x{k}: {docs:,} docs, {size / 2**20:.0f} MB in, {wall:.0f}s, peak RSS {tree / 2**20:.0f} MB "
              f"(process tree), {one / 2**20:.0f} MB (largest process)", flush=True)
    return rows


def ours(jsonl: Path, tokenizer: Path, cores: int, tmp: Path) -> dict:
    """Our whole prepare CLI (a fresh process: scan, dedup, split, tokenize, shards, manifest),
    into a new directory under `tmp`."""
    with scratch(tmp, "ours-") as work:
        wall, _, _, cpu = run_measured(prepare_cmd([str(jsonl)], work / "corpus", "--tokenizer", str(tokenizer),
                                                   "--workers", str(cores)))
        m = json.loads((work / "corpus" / "manifest.json").read_text())
    return {"tokens": sum(t["tokens"] for t in m["totals"].values()), "wall_s": wall, "cpu_s": cpu,
            "encode_s": m["stage_seconds"]["encode"]}


def measure_throughput(tmp: Path, cores: int, max_files: Optional[int], rounds: int, apis: list[str]) -> dict:
    """`rounds` rounds of ours and each baseline, the order reversed every other round (on a shared
    machine the load drifts within minutes; one run of each, always in the same order, measured
    the drift as much as the code). Ratios per round, and their median."""
    jsonl = tmp / "stdlib-x1.jsonl"
    write_variants(jsonl, 1, max_files)
    base = tmp / "tok"
    subprocess.run(prepare_cmd([str(jsonl)], base, "--max-docs", "200"), cwd=ROOT, check=True, capture_output=True)
    tok = base / "tokenizer.json"
    per_round = []
    for r in range(rounds):
        runs = [("ours", lambda: ours(jsonl, tok, cores, tmp))]
        runs += [(api, lambda api=api: datasets_map(jsonl, tok, cores, tmp, api)) for api in apis]
        got = {name: fn() for name, fn in (runs if r % 2 == 0 else runs[::-1])}
        per_round.append(_round_ratios(got, cores))
        print(f"round {r + 1}: " + "; ".join(f"{k} {v:.2f}" for k, v in per_round[-1].items() if "ratio" in k),
              flush=True)
    summary = {k: statistics.median(p[k] for p in per_round) for k in per_round[0]}
    _print_throughput(summary, cores, apis, rounds)
    return {"cores": cores, "rounds": per_round, "median": summary}


def _round_ratios(got: dict, cores: int) -> dict:
    o = got["ours"]
    row = {"ours_tokens": o["tokens"], "ours_tokens_per_s_per_core": o["tokens"] / o["wall_s"] / cores,
           "ours_encode_stage_tokens_per_s_per_core": o["tokens"] / o["encode_s"] / cores,
           "ours_tokens_per_cpu_s": o["tokens"] / o["cpu_s"]}
    for api, b in got.items():
        if api == "ours":
            continue
        row[f"{api}_tokens"] = b["tokens"]  # every line: ours drops the empty ones and duplicates (a few)
        row[f"{api}_map_tokens_per_s_per_core"] = b["tokens"] / b["map_s"] / cores
        row[f"{api}_load_map_tokens_per_s_per_core"] = b["tokens"] / b["load_map_s"] / cores
        row[f"{api}_map_tokens_per_cpu_s"] = b["tokens"] / b["map_cpu_s"]
        row[f"ratio_vs_{api}_map"] = row["ours_tokens_per_s_per_core"] / row[f"{api}_map_tokens_per_s_per_core"]
        row[f"ratio_vs_{api}_load_map"] = (row["ours_tokens_per_s_per_core"]
                                          / row[f"{api}_load_map_tokens_per_s_per_core"])
        row[f"cpu_ratio_vs_{api}_map"] = row["ours_tokens_per_cpu_s"] / row[f"{api}_map_tokens_per_cpu_s"]
    return row


def _print_throughput(m: dict, cores: int, apis: list[str], rounds: int) -> None:
    print(f"median of {rounds} round(s), {cores} cores: ours {m['ours_tokens_per_s_per_core']:,.0f} tokens/s per "
          f"core (whole prepare; encode stage alone {m['ours_encode_stage_tokens_per_s_per_core']:,.0f}), "
          f"{m['ours_tokens_per_cpu_s']:,.0f} tokens per CPU second", flush=True)
    for api in apis:
        print(f"  datasets.map with {api}: {m[f'{api}_map_tokens_per_s_per_core']:,.0f} tokens/s per core (map "
              f"only), {m[f'{api}_load_map_tokens_per_s_per_core']:,.0f} (load_dataset + map), "
              f"{m[f'{api}_map_tokens_per_cpu_s']:,.0f} per CPU second (map) -> ratio "
              f"{m[f'ratio_vs_{api}_map']:.2f} vs map only (target >= 1.0), {m[f'ratio_vs_{api}_load_map']:.2f} "
              f"vs load + map, {m[f'cpu_ratio_vs_{api}_map']:.2f} per CPU second", flush=True)


def measure_slurm(tmp: Path) -> dict:
    """Wall time of a 4-task and a 1-task array prepare of the same inputs on the local cluster."""
    from launch.slurm.local_cluster import LocalCluster, down, install, up

    install()
    cluster = LocalCluster(Path(tempfile.mkdtemp(prefix="slurm", dir="/tmp")))
    jsonl = tmp / "stdlib-x1.jsonl"
    write_variants(jsonl, 1)
    env = {**os.environ, "SLURM_CONF": str(cluster.conf), "VENV": sys.prefix,
           "TOKENIZERS_PARALLELISM": "false", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    walls = {}
    try:
        up(cluster)
        for tasks in (1, 4):
            t0 = time.time()
            proc = subprocess.run([sys.executable, "launch/slurm/submit.py", "prepare", "--tasks", str(tasks),
                                   "--cpus-per-task", "1", "--wait", "--", str(jsonl), "--out",
                                   str(tmp / f"slurm-{tasks}"), "--jsonl-slice-mb", "4"],
                                  cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(proc.stdout + proc.stderr)
            walls[tasks] = time.time() - t0
            print(f"Slurm array prepare, {tasks} task(s): {walls[tasks]:.0f}s", flush=True)
    finally:
        down(cluster)
    return {"wall_s": walls, "speedup_4_vs_1": walls[1] / walls[4]}


def measure_huge_doc(tmp: Path, mb: float) -> dict:
    import random

    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)] + ["def", "(", ")", "=", "{", "}", ";"]
    text, size = [], 0
    while size < mb * 2**20:
        text.append(rng.choice(words))
        size += len(text[-1]) + 1
    jsonl, sample = tmp / "huge.jsonl", tmp / "huge-sample.jsonl"
    jsonl.write_text(json.dumps({"text": " ".join(text)}) + "\n")
    sample.write_text("".join(json.dumps({"text": " ".join(text[i:i + 500])}) + "\n" for i in range(0, 100_000, 500)))
    base = tmp / "huge-tok"
    subprocess.run(prepare_cmd([str(sample)], base, "--vocab-size", "2000"), cwd=ROOT, check=True,
                   capture_output=True)
    wall, tree, one, _ = run_measured(prepare_cmd([str(jsonl)], tmp / "huge", "--tokenizer",
                                               str(base / "tokenizer.json")))
    print(f"one {mb:g} MB line: {wall:.0f}s, peak RSS {tree / 2**20:.0f} MB (process tree), "
          f"{one / 2**20:.0f} MB (largest process)", flush=True)
    return {"mb": mb, "seconds": wall, "peak_rss_tree_mb": tree / 2**20, "peak_rss_one_process_mb": one / 2**20}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scales", default="1,8", help="corpus sizes for the RSS figures, in stdlib copies")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--throughput-files", type=int, default=None, help="only the first N stdlib files (default all)")
    p.add_argument("--rounds", type=int, default=2, help="throughput rounds (order alternated), median reported")
    p.add_argument("--baseline-api", default="encode_batch,encode_batch_fast",
                   help="tokenizer calls the datasets.map baseline is run with (comma-separated)")
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--rss-tokenizer-sample", type=float, default=None, metavar="MB",
                   help="--tokenizer-sample of the RSS runs (e.g. 16: below the 1x corpus, so every scale "
                        "trains its BPE on an equal bounded sample, the regime of corpora above the default 1 GB)")
    p.add_argument("--slurm", action="store_true", help="also time a 4-task vs 1-task Slurm array (root)")
    p.add_argument("--huge-doc-mb", type=float, default=0, help="also measure one single-line document this big")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="prepare-bench") as tmp:
        if not args.skip_throughput:
            results["throughput"] = measure_throughput(Path(tmp), args.cores, args.throughput_files, args.rounds,
                                                       args.baseline_api.split(","))
        if not args.skip_rss:
            scales = [int(x) for x in args.scales.split(",")]
            results["rss"] = measure_rss(Path(tmp), scales, args.rss_tokenizer_sample)
            if len(scales) > 1:
                lo, hi = results["rss"][scales[0]], results["rss"][scales[-1]]
                ratio = hi["peak_rss_tree_mb"] / lo["peak_rss_tree_mb"]
                print(f"{'PASS' if ratio <= 1.2 else 'FAIL'}  peak RSS x{scales[-1]} / x{scales[0]} = {ratio:.2f} "
                      f"(target <= 1.2)")
        if args.slurm:
            results["slurm"] = measure_slurm(Path(tmp))
        if args.huge_doc_mb:
            results["huge_doc"] = measure_huge_doc(Path(tmp), args.huge_doc_mb)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
