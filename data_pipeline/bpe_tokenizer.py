"""Byte-level BPE with the Hugging Face `tokenizers` library: train, load, hash, and encode on
every core."""
from __future__ import annotations

import hashlib
import multiprocessing as mp
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


def _encode_chunk(args: tuple[list[str], int, str]) -> list[bytes]:
    texts, eos, dtype = args
    assert _WORKER_TOKENIZER is not None
    return [np.asarray(e.ids + [eos], dtype=dtype).tobytes() for e in _WORKER_TOKENIZER.encode_batch(texts)]


def encode_all(tok: Tokenizer, texts: list[str], workers: int, chunk: int = 64) -> Iterator[bytes]:
    """Token ids (+ EOS) of every text as compact little-endian bytes, in order, on `workers` processes."""
    eos, _ = special_ids(tok)
    dtype = token_dtype(tok.get_vocab_size()).str
    jobs = [(texts[i:i + chunk], eos, dtype) for i in range(0, len(texts), chunk)]
    bar = tqdm(total=len(texts), desc="tokenize", unit="doc", mininterval=1.0)
    if workers <= 1:
        _init_worker(tok.to_str())
        results: Iterable[list[bytes]] = map(_encode_chunk, jobs)
        pool = None
    else:
        pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(tok.to_str(),))
        results = pool.imap(_encode_chunk, jobs)
    try:
        for encoded in results:
            bar.update(len(encoded))
            yield from encoded
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
