"""Byte-level BPE with the Hugging Face `tokenizers` library: train, load, hash, and encode on
every core."""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import re
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from data_pipeline.errors import DataError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained on `texts`; EOS is id 0 and PAD id 1."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: Path) -> Tokenizer:
    """A tokenizer.json file, or a local Hugging Face tokenizer directory that holds one."""
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"tokenizer {path} not found: pass a tokenizer.json file or a directory containing one")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises plain Exception on bad JSON
        raise DataError(f"{file} is not a valid tokenizers JSON file ({exc})") from exc


def special_ids(tok: Tokenizer) -> tuple[int, int]:
    """(eos_id, pad_id); a tokenizer without a pad token pads with EOS (padding is loss-masked)."""
    eos = tok.token_to_id(EOS_TOKEN)
    if eos is None:
        raise DataError(f"the tokenizer has no {EOS_TOKEN!r} token; documents need an end-of-text id")
    pad = tok.token_to_id(PAD_TOKEN)
    return eos, eos if pad is None else pad


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size < 2**16 else np.dtype("<u4")


# ------------------------------------------------------------------ parallel encoding
_WORKER_TOKENIZER: Optional[Tokenizer] = None  # per worker process, set once by the pool initializer


def _init_worker(tokenizer_json: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer.from_str(tokenizer_json)


def _encode_chunk(args: tuple[list[str], int, str, int]) -> list[bytes]:
    texts, eos, dtype, piece_chars = args
    tok = _WORKER_TOKENIZER
    assert tok is not None
    if all(len(t) <= piece_chars for t in texts):  # the usual case: one parallel batch
        return [np.asarray(e.ids + [eos], dtype=dtype).tobytes() for e in tok.encode_batch(texts)]
    return [_encode_long(tok, t, piece_chars, eos, dtype) for t in texts]


def _encode_long(tok: Tokenizer, text: str, piece_chars: int, eos: int, dtype: str) -> bytes:
    # a long text in pieces: the tokenizer's working memory is a few dozen bytes per byte of input
    # (a 26 MB line took 4.4 GiB), and pieces cut where pre-tokens begin give the same ids; each
    # piece's ids become 2-4 bytes each at once (as Python ints they take 36)
    pieces = safe_pieces(text, piece_chars) if splits_safely(tok) else [text]
    ids = [np.asarray(tok.encode(piece).ids, dtype=dtype) for piece in pieces]
    return np.concatenate(ids + [np.asarray([eos], dtype=dtype)]).tobytes()


_SAFE_CUT = re.compile(r"(?<=\S) (?=\S)")  # a space between two non-spaces: " word" starts a pre-token


def safe_pieces(text: str, max_chars: int) -> Iterator[str]:
    """`text` in consecutive pieces of about `max_chars`, each cut just before a space that sits
    between two non-space characters. Byte-level BPE pre-tokenizes with the GPT-2 pattern, whose
    pieces never span such a cut, so the pieces' ids joined are the whole text's ids."""
    start = 0
    while len(text) - start > max_chars:
        cut = _SAFE_CUT.search(text, start + max_chars)
        if cut is None:
            break
        yield text[start:cut.start()]
        start = cut.start()
    yield text[start:]


def splits_safely(tok: Tokenizer) -> bool:
    """Whether `safe_pieces` keeps this tokenizer's ids: BPE behind a plain ByteLevel pre-tokenizer
    with the GPT-2 pattern (what train_bpe makes), and no normalizer."""
    cfg = json.loads(tok.to_str())
    pre = cfg.get("pre_tokenizer") or {}
    return (cfg.get("normalizer") is None and cfg["model"].get("type") == "BPE"
            and pre.get("type") == "ByteLevel" and pre.get("use_regex", True))


def encode_all(tok: Tokenizer, texts: Iterable[str], workers: int, chunk: int = 64, chunk_bytes: int = 1 << 20,
               total_bytes: Optional[int] = None, piece_chars: int = 1 << 20) -> Iterator[bytes]:
    """Token ids (+ EOS) of every text as compact little-endian bytes, in order, on `workers`
    processes. `texts` is consumed lazily: at most 2 x workers chunks (of <= `chunk` texts and
    about `chunk_bytes`) are in flight, so memory does not grow with the corpus. A worker's peak is
    about 40x its chunk (tokenizers' Encoding objects plus the ids as Python ints), hence 1 MB. Progress is shown
    in bytes of text (of `total_bytes` when known). A text longer than `piece_chars` is tokenized
    in pieces (same ids) so one huge document does not take gigabytes."""
    eos, _ = special_ids(tok)
    dtype = token_dtype(tok.get_vocab_size()).str
    jobs = ((batch, eos, dtype, piece_chars) for batch in _chunks(texts, chunk, chunk_bytes))
    bar = tqdm(total=total_bytes, desc="tokenize", unit="B", unit_scale=True, mininterval=1.0)
    pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(tok.to_str(),)) \
        if workers > 1 else None
    if pool is None:
        _init_worker(tok.to_str())
    try:
        for batch, encoded in _bounded_map(pool, jobs, 2 * workers):
            bar.update(sum(len(t.encode("utf-8")) for t in batch))
            yield from encoded
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()


def _chunks(texts: Iterable[str], max_docs: int, max_bytes: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if len(batch) >= max_docs or size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _bounded_map(pool, jobs: Iterator[tuple], window: int) -> Iterator[tuple[list[str], list[bytes]]]:
    """(texts, encoded) per job, in order, with at most `window` jobs submitted and unfinished
    (Pool.imap would read every job up front, i.e. the whole corpus)."""
    if pool is None:
        for job in jobs:
            yield job[0], _encode_chunk(job)
        return
    pending: deque = deque()
    for job in jobs:
        pending.append((job[0], pool.apply_async(_encode_chunk, (job,))))
        if len(pending) >= window:
            texts, result = pending.popleft()
            yield texts, result.get()
    while pending:
        texts, result = pending.popleft()
        yield texts, result.get()
