"""Synthetic long-range tasks, generated deterministically from a seed, as ordinary documents.

Each task document is a list of token ids laid out on segment boundaries (segment length N) plus
a supervision mask that marks the answer tokens; `memgpt-prepare --task ...` writes them as
WebDataset shards like any corpus, so they train, mix and evaluate like one.

recall   multi-query associative recall. Segment 1 holds P (key, value) pairs, then filler;
         `gap` filler segments follow; the last segment repeats the P keys in a new order, each
         followed by its value. The values of the last segment are supervised. Local attention
         never crosses a segment, so without memory the best guess is chance = 1 / n_values.
passkey  a D-digit number stated once in segment 1 inside filler, `gap` filler segments, then the
         question and the D answer digits in the last segment. Chance = 10^-D exact match.

Token ids come from a `TaskVocab`: a small word-level vocabulary of its own (keys k0.., values
v0.., filler f0.., digits), or the tokens of a real tokenizer so that task data mixes with a
real corpus (filler is then real text).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from data_pipeline.errors import DataError

TASKS = ("recall", "passkey")


@dataclass(frozen=True)
class TaskSpec:
    """What one synthetic task corpus holds."""

    kind: str = "recall"
    segment_len: int = 32  # N
    gap: int = 2  # filler segments between the fact segment and the query segment
    pairs: int = 8  # recall: P key-value pairs
    n_keys: int = 32
    n_values: int = 32
    digits: int = 5  # passkey length

    def validate(self) -> None:
        if self.kind not in TASKS:
            raise DataError(f"task {self.kind!r}: use one of {', '.join(TASKS)}")
        if self.kind == "recall" and (2 * self.pairs > self.segment_len or self.pairs > self.n_keys):
            raise DataError(f"recall: 2 * pairs ({2 * self.pairs}) must fit in segment_len ({self.segment_len}) "
                            f"and pairs <= n_keys ({self.n_keys})")
        if self.kind == "passkey" and self.digits + 4 > self.segment_len:
            raise DataError(f"passkey: {self.digits} digits and the question must fit in segment_len {self.segment_len}")
        if self.gap < 0:
            raise DataError("task gap must be >= 0 filler segments")

    @property
    def n_segments(self) -> int:
        return self.gap + 2

    @property
    def chance(self) -> float:
        """Expected accuracy per answer of a model that cannot see the fact."""
        return 1.0 / self.n_values if self.kind == "recall" else 0.1


@dataclass(frozen=True)
class TaskVocab:
    """Token ids the generators draw from."""

    keys: np.ndarray
    values: np.ndarray
    digits: np.ndarray  # ids of "0".."9"
    filler: np.ndarray  # ids filler is sampled from, when no real filler text is given
    marker: int  # "passkey is" marker token
    question: int  # question marker token


def own_vocab_tokens(spec: TaskSpec) -> list[str]:
    """The word-level vocabulary of a task corpus made without a tokenizer (after the specials)."""
    return ([f"k{i}" for i in range(spec.n_keys)] + [f"v{i}" for i in range(spec.n_values)]
            + [str(d) for d in range(10)] + [f"f{i}" for i in range(32)] + ["PASSKEY", "QUERY"])


def vocab_from_tokenizer(tok, spec: TaskSpec) -> TaskVocab:
    """Task ids from a `tokenizers.Tokenizer` that holds the word-level task vocabulary, or any
    byte-level BPE (keys and values are then its most merged tokens without digits)."""
    ids = {t: tok.token_to_id(t) for t in own_vocab_tokens(spec)}
    if all(i is not None for i in ids.values()):
        pick = lambda names: np.array([ids[n] for n in names], dtype=np.int64)  # noqa: E731
        return TaskVocab(keys=pick(f"k{i}" for i in range(spec.n_keys)),
                         values=pick(f"v{i}" for i in range(spec.n_values)),
                         digits=pick(str(d) for d in range(10)), filler=pick(f"f{i}" for i in range(32)),
                         marker=ids["PASSKEY"], question=ids["QUERY"])
    return _vocab_from_bpe(tok, spec)


def _vocab_from_bpe(tok, spec: TaskSpec) -> TaskVocab:
    digits = [tok.token_to_id(str(d)) for d in range(10)]
    if any(d is None for d in digits):
        raise DataError("the tokenizer has no single-character digit tokens; tasks need them")
    # the most merged tokens (highest ids of a BPE) that are neither special nor hold a digit
    plain = sorted((i for t, i in tok.get_vocab().items()
                    if not (t.startswith("<|") and t.endswith("|>")) and not any(c.isdigit() for c in t)), reverse=True)
    need = spec.n_keys + spec.n_values + 2
    if len(plain) < need:
        raise DataError(f"the tokenizer has {len(plain)} usable tokens; the task needs {need}")
    w = np.array(plain, dtype=np.int64)
    return TaskVocab(keys=w[:spec.n_keys], values=w[spec.n_keys:spec.n_keys + spec.n_values],
                     digits=np.array(digits, dtype=np.int64), filler=w[need:] if len(w) > need + 8 else w,
                     marker=int(w[-1]), question=int(w[-2]))


def make_document(spec: TaskSpec, vocab: TaskVocab, rng: np.random.Generator,
                  filler: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """One task document: (tokens (n_segments * N,), answer mask (same shape, 1 at answers)).

    Tokens at position t are predicted from t - 1, so the mask marks the answer tokens
    themselves; the loader turns it into a label mask.
    """
    N, S = spec.segment_len, spec.n_segments
    tokens = _filler(spec, vocab, rng, S * N, filler)
    mask = np.zeros(S * N, dtype=np.uint8)
    q = (S - 1) * N  # first position of the query segment
    if spec.kind == "recall":
        keys = rng.choice(vocab.keys, size=spec.pairs, replace=False)
        values = rng.choice(vocab.values, size=spec.pairs)
        tokens[0:2 * spec.pairs:2], tokens[1:2 * spec.pairs:2] = keys, values
        order = rng.permutation(spec.pairs)
        tokens[q:q + 2 * spec.pairs:2], tokens[q + 1:q + 2 * spec.pairs:2] = keys[order], values[order]
        mask[q + 1:q + 2 * spec.pairs:2] = 1
    else:
        digits = vocab.digits[rng.integers(0, 10, size=spec.digits)]
        at = int(rng.integers(0, N - spec.digits - 1))  # somewhere inside the first segment
        tokens[at] = vocab.marker
        tokens[at + 1:at + 1 + spec.digits] = digits
        end = S * N
        tokens[end - spec.digits - 2] = vocab.question
        tokens[end - spec.digits - 1] = vocab.marker
        tokens[end - spec.digits:end] = digits
        mask[end - spec.digits:end] = 1
    return tokens, mask


def _filler(spec: TaskSpec, vocab: TaskVocab, rng: np.random.Generator, n: int,
            filler: Optional[np.ndarray]) -> np.ndarray:
    """n filler tokens: a random window of real text when given, else random filler ids."""
    if filler is not None and len(filler) > n:
        start = int(rng.integers(0, len(filler) - n))
        return filler[start:start + n].astype(np.int64).copy()
    return rng.choice(vocab.filler, size=n)


def generate(spec: TaskSpec, vocab: TaskVocab, n_docs: int, seed: int, split: int = 0,
             filler: Optional[np.ndarray] = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`n_docs` documents; document i depends only on (seed, split, i), so train (split 0),
    validation (1) and evaluation sets never share a random stream and any one can be regenerated."""
    spec.validate()
    for i in range(n_docs):
        yield make_document(spec, vocab, np.random.default_rng([seed, split, i]), filler)
