"""Byte-level BPE with the Hugging Face `tokenizers` library: train, load, hash, and encode a long
text in pieces (prepare's threads in prepare_encode.py do the rest)."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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


# ------------------------------------------------------------------ long texts
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
