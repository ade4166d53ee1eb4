"""Tokenizing for `memgpt-prepare`'s encode stage: threads in the one process, each handing a chunk
of documents to the Rust tokenizer, which releases the GIL while it works.

Why threads and not a process pool (what prepare used before): the tokenizer does ~90%
of the work outside the GIL, so threads run it on every core without starting worker
interpreters, without pickling every text to a worker and its ids back, and without workers whose
memory creeps up over a long corpus (the process tree is one process). It is independent of
TOKENIZERS_PARALLELISM (which users set to false to silence the fork warning, and which turns the
tokenizer's own parallelism off). `encode_batch_fast` gives the same ids as `encode_batch` without
computing character offsets, which prepare never reads.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator, Optional

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from data_pipeline.bpe_tokenizer import _encode_long, special_ids, token_dtype


# The tokenizer's working memory is about 40 bytes per character it holds at once (the Encoding's
# tokens, offsets and masks per token, the normalized string's alignments per byte), so what one
# thread tokenizes at once is capped: a chunk of at most CHUNK_CHARS, and no single document
# longer than PIECE_CHARS (longer ones go in pieces, same ids). With 1M for both, the peak was
# set by *which* chunks happened to be tokenized together: a corpus holding its big documents
# next to each other (8 variants of each stdlib file) put two ~1 MB chunks on the threads at once
# far more often, and its peak grew with the corpus (tokenize stage alone: 210 MB for the 40
# largest stdlib files once, 284 MB for 8 variants of each). At 256K: 152 and 170 MB, the same
# speed (tokenizer calls per chunk are a few milliseconds' overhead at most).
CHUNK_CHARS = 1 << 18
PIECE_CHARS = 1 << 18


def encode_texts(tok: Tokenizer, texts: Iterable[str], workers: int, chunk: int = 64, chunk_bytes: int = CHUNK_CHARS,
                 total_bytes: Optional[int] = None, piece_chars: int = PIECE_CHARS) -> Iterator[bytes]:
    """Token ids (+ EOS) of every text as compact little-endian bytes, in order, on `workers`
    threads. `texts` is consumed lazily: at most 2 x workers chunks (of <= `chunk` texts and about
    `chunk_bytes` characters) are in flight and `workers` of them being tokenized, so memory does
    not grow with the corpus nor with how its big documents are laid out. A text longer than
    `piece_chars` is tokenized in pieces (same ids) so one huge document does not take gigabytes."""
    eos, _ = special_ids(tok)
    dtype = token_dtype(tok.get_vocab_size())
    bar = tqdm(total=total_bytes, desc="tokenize", unit="B", unit_scale=True, mininterval=1.0)
    pending: deque = deque()
    trim = MemoryTrim()
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="tokenize") as pool:
        try:
            for batch in chunks(texts, chunk, chunk_bytes):
                pending.append((batch, pool.submit(encode_chunk, tok, batch, eos, dtype, piece_chars)))
                if len(pending) >= 2 * max(1, workers):
                    yield from _finish(pending.popleft(), bar)
                    trim.maybe()
            while pending:
                yield from _finish(pending.popleft(), bar)
        finally:
            bar.close()
            for _, future in pending:  # a consumer that stops early: do not tokenize the rest
                future.cancel()


def chunks(texts: Iterable[str], max_docs: int, max_chars: int) -> Iterator[list[str]]:
    """`texts` in order, in lists of at most `max_docs` texts and `max_chars` characters; a text
    longer than that is a list of its own. A list is closed *before* the text that would overflow
    it, so that two big documents never share a chunk: the tokenizer's memory follows the text it
    holds at once, and a corpus of many big documents must not peak higher than one with a few."""
    batch: list[str] = []
    size = 0
    for text in texts:
        if batch and (len(batch) >= max_docs or size + len(text) > max_chars):
            yield batch
            batch, size = [], 0
        batch.append(text)
        size += len(text)
    if batch:
        yield batch


def _finish(job, bar) -> list[bytes]:
    batch, future = job
    encoded = future.result()
    bar.update(sum(len(t.encode("utf-8")) for t in batch))
    return encoded


def encode_chunk(tok: Tokenizer, texts: list[str], eos: int, dtype: np.dtype, piece_chars: int) -> list[bytes]:
    """The ids + EOS of each text, as bytes of `dtype`."""
    if any(len(t) > piece_chars for t in texts):  # rare: a huge document, in pieces
        return [_encode_long(tok, t, piece_chars, eos, dtype.str) for t in texts]
    out = []
    for e in tok.encode_batch_fast(texts):
        ids = e.ids
        arr = np.empty(len(ids) + 1, dtype)  # (n_tokens + 1,): the ids, then EOS
        arr[:-1] = ids
        arr[-1] = eos
        out.append(arr.tobytes())
    return out


class MemoryTrim:
    """Hands the C heap's free pages back to the OS (glibc `malloc_trim`) at most once every
    `every_s` seconds. The tokenizer allocates on its threads' own malloc arenas and the ids are
    freed on the main thread; over a long corpus the arenas fragment and the resident size creeps up
    (1.32x from the 1x to the 8x stdlib corpus without this; the process pool's workers grew the
    same way). A no-op where the C library has no malloc_trim."""

    def __init__(self, every_s: float = 1.0):
        self.every_s, self.last = every_s, time.monotonic()
        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name) if name else None
        self.fn = getattr(libc, "malloc_trim", None)

    def maybe(self) -> None:
        if self.fn is not None and time.monotonic() - self.last >= self.every_s:
            self.fn(0)
            self.last = time.monotonic()
