"""Read one shard: fetch its bytes (local, http(s) or pipe:, through the cache), verify its sha256,
decode its documents. Kept free of torch so that the loader's spawned worker processes, which
import this module to run `load_shard`, start in a fraction of a second.

Damage. A sha256 mismatch (with verification on) is an error naming the shard. Without
verification a shard that fails to read is cut where the tar breaks: its later documents are
skipped and counted. A member that reads but does not decode (no token member, token bytes of
the wrong length, a token id >= the vocabulary size) skips that document alone. A remote shard
that cannot be fetched after its retries is an error with verification on; without it the whole
shard is skipped (where a connection broke varies from run to run, so cutting at the break would
make the run depend on the network). A missing shard (HTTP 404) is always an error.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from data_pipeline.errors import DataError
from data_pipeline.remote import FetchError, FetchPolicy, ShardCache, fetch


@dataclass(frozen=True)
class ShardDocs:
    """Decoded documents of one shard, plus how many members failed to read."""

    doc_ids: list[int]
    tokens: list[np.ndarray]
    skipped: int
    error: str
    masks: Optional[list[np.ndarray]] = None  # task corpora: 1 where the token is supervised


@dataclass(frozen=True)
class ShardRequest:
    """Everything needed to read one shard, as plain data (it is pickled to worker processes)."""

    url: str
    dtype: str  # "u16" or "u32", from the manifest
    documents: int  # as the manifest counts them
    sha256: str  # from the manifest ("" when unknown)
    verify: bool = True
    vocab_size: Optional[int] = None  # token ids at or above it mark a damaged document
    remote: bool = False
    policy: FetchPolicy = field(default_factory=FetchPolicy)
    cache: Optional[ShardCache] = None


def load_shard(req: ShardRequest) -> ShardDocs:
    """Fetch, verify and decode the shard `req` names."""
    try:
        data, matches = _shard_bytes(req)
    except FetchError as exc:
        if exc.permanent:
            raise DataError(f"shard {req.url} listed in the manifest is missing ({exc}); restore it or re-run "
                            f"memgpt-prepare") from exc
        if req.verify:
            raise DataError(f"shard {req.url} could not be read: {exc}; check the storage and the network, "
                            f"raise data.open_retries, or set data.verify_checksums=false to skip such shards") from exc
        return ShardDocs([], [], req.documents, f"not readable: {exc}")
    if req.verify and not matches and _sha256(data) != req.sha256:
        raise DataError(f"shard {req.url} does not match the sha256 in its manifest (corrupted or replaced); "
                        f"re-run memgpt-prepare or restore the file (or set data.verify_checksums=false to "
                        f"skip its bad documents)")
    return decode_shard(data, req.url, req.dtype, req.documents, req.vocab_size)


def _shard_bytes(req: ShardRequest) -> tuple[bytes, bool]:
    """(the shard's bytes, whether they are known to match the manifest's sha256): from the cache
    when it holds a verified copy, else fetched (a verified remote fetch retries bytes that do not
    match) and then cached if they match, so the cache never holds a damaged shard."""
    use_cache = req.cache is not None and req.remote and bool(req.sha256)
    if use_cache:
        cached = req.cache.get(req.sha256)
        if cached is not None:
            return cached, True
    checked = req.remote and req.verify
    data = fetch(req.url, req.policy, req.sha256 if checked else "")
    matches = checked or (use_cache and _sha256(data) == req.sha256)
    if use_cache and matches:
        req.cache.put(req.sha256, data)
    return data, matches


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_shard(path: str, dtype: str, expected_docs: int, sha256: Optional[str],
               vocab_size: Optional[int] = None) -> ShardDocs:
    """Decode one local shard, verifying it when `sha256` is given (for tools and tests)."""
    return load_shard(ShardRequest(path, dtype, expected_docs, sha256 or "", sha256 is not None, vocab_size))


def decode_shard(data: bytes, name: str, dtype: str, expected_docs: int, vocab_size: Optional[int]) -> ShardDocs:
    """The documents of a shard's bytes, with webdataset's tar reader and sample grouping."""
    from webdataset import tariterators as wti

    doc_ids, tokens, masks, error = [], [], [], ""
    try:
        # Straight from memory: the bytes are already here (read once for the checksum), and a
        # whole WebDataset pipeline per shard costs more than the reading itself. These two stages
        # draw no randomness (a WebDataset pipeline without a seed would advance the run's Python
        # RNG at every shard opened, so a resumed run would end in another state).
        files = wti.tar_file_expander([{"url": name, "stream": io.BytesIO(data)}])
        for sample in wti.group_by_keys(files):
            try:
                doc_id, toks, mask = _decode_member(sample, dtype, vocab_size)
            except ValueError as exc:  # this document alone is bad: skip it, read on
                error = error or f"member {sample.get('__key__')}: {exc}"
                continue
            doc_ids.append(doc_id)
            tokens.append(toks)
            if mask is not None:
                masks.append(mask)
    except Exception as exc:  # tar errors: the archive is broken from here on
        error = f"{type(exc).__name__}: {exc.args[0] if exc.args else exc}"
    if masks and len(masks) != len(tokens):
        error = error or "some documents have a mask.u8 and some do not"
        tokens, doc_ids, masks = tokens[:len(masks)], doc_ids[:len(masks)], masks[:len(tokens)]
    return ShardDocs(doc_ids, tokens, max(0, expected_docs - len(doc_ids)), error, masks or None)


def _decode_member(sample: dict, dtype: str, vocab_size: Optional[int]) -> tuple[int, np.ndarray, Optional[np.ndarray]]:
    """(document id, tokens, optional loss mask) of one tar member; ValueError if it does not decode."""
    key = f"ids.{dtype}"
    if key not in sample:
        raise ValueError(f"no {key} in it")
    doc_id = int(str(sample["__key__"]).removeprefix("doc"))
    toks = np.frombuffer(sample[key], dtype="<u2" if dtype == "u16" else "<u4").astype(np.int64)
    # Flipped bytes that the checksum did not catch (verification off) would index past the
    # embedding table far from here; name them now, as a damaged document.
    if vocab_size is not None and len(toks) and int(toks.max()) >= vocab_size:
        raise ValueError(f"token id {int(toks.max())} >= the vocabulary size {vocab_size}")
    mask = np.frombuffer(sample["mask.u8"], dtype=np.uint8) if "mask.u8" in sample else None
    if mask is not None and len(mask) != len(toks):
        raise ValueError(f"mask.u8 has {len(mask)} entries for {len(toks)} tokens")
    return doc_id, toks, mask
