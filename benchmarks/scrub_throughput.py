"""Throughput of `data_pipeline.scrub.scrub_text` on the stdlib corpus (the python standard library's
own .py files, prepare's default corpus), against a plain `str.encode` pass over the same documents
as the baseline, and against what prepare spends on the same bytes: one process encoding them with
a BPE trained on a sample (the work a prepare worker does per document). Optionally, the detectors
we did not adopt, on a sample of the same documents: detect-secrets' own scanner and datatrove's
PIIFormatter. Prints MB/s (UTF-8 bytes per second); never prints a found value.

    python benchmarks/scrub_throughput.py                 # scrub vs str.encode vs prepare's encode
    python benchmarks/scrub_throughput.py --compare       # also detect-secrets and datatrove
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from typing import Callable, Iterable

from data_pipeline.corpus_sources import iter_stdlib
from data_pipeline.scrub import scrub_text


def mb_per_s(fn: Callable[[str], object], docs: list[str], repeats: int) -> float:
    mb = sum(len(d.encode()) for d in docs) / 1e6
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for d in docs:
            fn(d)
        best = min(best, time.perf_counter() - t0)
    return mb / best


def prepare_encode_mb_per_s(docs: list[str]) -> float:
    """One process encoding every document with a 4096-token BPE trained on a 2 MB sample."""
    from data_pipeline.bpe_tokenizer import train_bpe

    sample, size = [], 0
    for d in docs[::7]:
        sample.append(d)
        size += len(d)
        if size > 2e6:
            break
    tok = train_bpe(sample, 4096)
    mb = sum(len(d.encode()) for d in docs) / 1e6
    t0 = time.perf_counter()
    for i in range(0, len(docs), 64):
        tok.encode_batch(docs[i:i + 64])
    return mb / (time.perf_counter() - t0)


def detect_secrets_mb_per_s(docs: list[str]) -> float:
    """detect-secrets' own scan of each document as a file (it has no in-memory document API)."""
    from detect_secrets import SecretsCollection
    from detect_secrets.settings import default_settings

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, d in enumerate(docs):
            paths.append(os.path.join(tmp, f"doc{i}.py"))
            with open(paths[-1], "w", encoding="utf-8") as f:
                f.write(d)
        mb = sum(len(d.encode()) for d in docs) / 1e6
        with default_settings():
            t0 = time.perf_counter()
            for p in paths:
                SecretsCollection().scan_file(p)
            return mb / (time.perf_counter() - t0)


def datatrove_mb_per_s(docs: list[str]) -> float:
    from datatrove.pipeline.formatters import PIIFormatter

    return mb_per_s(PIIFormatter().format, docs, repeats=1)


def kinds_found(docs: Iterable[str]) -> Counter:
    total: Counter = Counter()
    for d in docs:
        total.update(scrub_text(d)[1])
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="best of N passes for scrub and the baseline")
    p.add_argument("--no-prepare", action="store_true", help="skip prepare's BPE encode of the corpus")
    p.add_argument("--compare", action="store_true", help="also time detect-secrets' scanner and datatrove")
    p.add_argument("--sample-every", type=int, default=40, help="--compare runs on every Nth document")
    args = p.parse_args(argv)
    docs = [text for _, text in iter_stdlib()]
    mb = sum(len(d.encode()) for d in docs) / 1e6
    print(f"stdlib corpus: {len(docs)} documents, {mb:.1f} MB")
    base = mb_per_s(str.encode, docs, args.repeats)
    scrub = mb_per_s(scrub_text, docs, args.repeats)
    print(f"{'str.encode (baseline)':34s} {base:9.1f} MB/s")
    print(f"{'scrub_text':34s} {scrub:9.1f} MB/s   {scrub / base:.3f}x baseline")
    if not args.no_prepare:
        enc = prepare_encode_mb_per_s(docs)
        print(f"{'prepare BPE encode (1 process)':34s} {enc:9.1f} MB/s   scrub adds {100 * enc / scrub:.1f}% to it")
    if args.compare:
        sample = docs[::args.sample_every]
        label = f"detect-secrets scan (1/{args.sample_every} sample)"
        print(f"{label:34s} {detect_secrets_mb_per_s(sample):9.3f} MB/s")
        try:
            print(f"{'datatrove PIIFormatter':34s} {datatrove_mb_per_s(docs):9.1f} MB/s   (e-mail and IPv4 only)")
        except ImportError:
            print("datatrove PIIFormatter: not installed (pip install datatrove)")
    print("replacements by kind:", dict(sorted(kinds_found(docs).items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
