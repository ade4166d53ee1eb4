"""Deterministic, resumable streaming of prepared shards as memory-ready samples.

Streams. A batch row is a *stream*: the global batch has S = dp_size * micro_batch_size streams,
and global stream g lives on dp rank g // micro_batch_size, row g % micro_batch_size. What a
stream reads depends only on (seed, epoch, g, S), never on dp, so a 1-rank run with micro-batch
2m reads exactly the rows of a 2-rank run with micro-batch m.

Shards. In epoch e the train shards are permuted by a generator seeded from (seed, e); stream g
reads shards perm[g::S] in that order, each shard's documents in stored order, then moves to
epoch e+1. Streams therefore read disjoint shards that together cover the split every epoch.

Segments. A document of L tokens (EOS last) gives ceil((L-1)/N) segments; segment j has inputs
t[jN:(j+1)N] and next-token labels t[jN+1:(j+1)N+1], padded with pad id / -100. A document
always starts a new segment, flagged in `reset` so the model zeroes the memory there. A sample is
the next K segments of its stream and may run from the end of one document into the next.

Resume. All cursors (epoch, shard position, document, segment) live in this process, so
`state_dict()` / `load_state_dict()` reproduce the exact next batch; worker processes only read
and decode whole shards ahead of time, which cannot change what is produced.

Where shards come from. `data_dir` is a local directory, an http(s):// base, a `pipe:` command
with `{name}`, or any of these with a brace-expanded shard list (data_pipeline.remote says how
each names manifest.json and the shards). A shard is read once into memory, its sha256 checked,
then decoded (data_pipeline.shard_reader); a failed remote read is retried with backoff, and
remote shards can be kept in a size-bounded local cache. What a stream reads depends only on the
manifest and the shards' bytes, so a remote corpus gives exactly the samples of its local copy
and resumes the same way.

First batch. Before the first sample (at start and after `load_state_dict`) every stream's
current shard is opened at once on threads instead of one stream after another: the same shards
and bytes, only sooner.

Bad shards. With `verify_checksums` a shard whose sha256 differs from the manifest is an error
that names it. Without it (or for damage the checksum cannot see at read time) a shard that fails
to read is cut where the tar breaks (a truncated or corrupt archive): its later documents are
skipped with a warning and counted. A member that reads but does not decode (no token member,
token bytes of the wrong length, a token id >= the vocabulary size) skips that document alone.
A remote shard still unreadable after its retries is an error with verification on and skipped
whole without it. More than `max_skip_fraction` skipped documents is an error.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing as mp
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from data_pipeline.errors import DataError
from data_pipeline.remote import FetchPolicy, ShardCache, parse_location, read_corpus_manifest
from data_pipeline.shard_reader import ShardDocs, ShardRequest, load_shard, read_shard  # noqa: F401 (read_shard: API)

log = logging.getLogger(__name__)
IGNORE = -100
MIN_DOCS_FOR_SKIP_CHECK = 100
OPEN_THREADS = 8  # shards opened at once before the first sample


@dataclass
class Cursor:
    """Where one stream is: epoch, index into its shard list, document in shard, segment in document."""

    epoch: int = 0
    shard_pos: int = 0
    doc_pos: int = 0
    seg_pos: int = 0


class SegmentLoader:
    """Micro-batches for one data-parallel rank; iterate it (train: forever, validation: once).

    `data_dir` is a corpus location (a directory, an http(s) base, a pipe: command, brace lists;
    see data_pipeline.remote). For remote corpora only: `cache_dir` keeps verified shards locally,
    at most `cache_max_gb` (least recently used evicted); a failed read is retried `open_retries`
    times, waiting `retry_backoff_s` * 2**i before retry i."""

    def __init__(self, data_dir: str | Path, split: str = "train", *, segment_len: int, n_segments: int,
                 micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 1234, num_workers: int = 0,
                 max_skip_fraction: float = 0.01, expected_tokenizer_hash: Optional[str] = None,
                 verify_checksums: bool = True, cache_dir: Optional[str | Path] = None, cache_max_gb: float = 100.0,
                 open_retries: int = 3, retry_backoff_s: float = 1.0):
        if split not in ("train", "validation"):
            raise DataError(f"split {split!r}: use 'train' or 'validation'")
        self.location = parse_location(data_dir)
        self.policy = FetchPolicy(retries=open_retries, backoff_s=retry_backoff_s)
        self.cache = (ShardCache(str(cache_dir), int(cache_max_gb * 2**30))
                      if cache_dir and self.location.is_remote else None)  # local shards are read in place
        self.manifest = read_corpus_manifest(self.location, self.policy)
        self._check_tokenizer(expected_tokenizer_hash)
        self.split, self.N, self.K, self.mb = split, segment_len, n_segments, micro_batch_size
        self.seed, self.max_skip_fraction, self.verify = seed, max_skip_fraction, verify_checksums
        self.n_streams = dp_size * micro_batch_size
        self.stream_ids = [dp_rank * micro_batch_size + i for i in range(micro_batch_size)]
        self.shards = self._selected(self.manifest["splits"][split])
        self._check_shards()
        self.cursors = {g: Cursor() for g in self.stream_ids}
        self._orders: dict[int, list[int]] = {}  # epoch -> shard order, derived from (seed, epoch)
        self.skipped_samples = 0
        self.seen_samples = 0
        self._bad_files: set[str] = set()
        self._cache: dict[int, ShardDocs] = {}  # shard index -> decoded docs, for shards in use
        self._pool = _make_pool(num_workers)
        self._futures: dict[int, cf.Future] = {}
        self._opened = False  # every stream's current shard opened (at the first sample)

    # ------------------------------------------------------------------ manifest facts
    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def tokenizer_hash(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    @property
    def eos_id(self) -> int:
        return int(self.manifest["tokenizer"]["eos_id"])

    @property
    def pad_id(self) -> int:
        return int(self.manifest["tokenizer"]["pad_id"])

    def _check_tokenizer(self, expected: Optional[str]) -> None:
        if expected is not None and expected != self.manifest["tokenizer"]["sha256"]:
            raise DataError(f"tokenizer mismatch: the shards in {self.location.spec} were made with tokenizer "
                            f"sha256 {self.manifest['tokenizer']['sha256'][:12]}… but data.tokenizer has "
                            f"{expected[:12]}…; re-run memgpt-prepare with that tokenizer or point data.tokenizer "
                            f"at {self.location.url('tokenizer.json')}")

    def _selected(self, shards: list[dict]) -> list[dict]:
        """The shards of this split that a brace-expanded location lists; a split it lists none of
        (e.g. validation beside `train-{000000..000127}.tar`) is read whole."""
        names = self.location.selected
        if names is None:
            return shards
        known = {s["file"] for split in self.manifest["splits"].values() for s in split}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise DataError(f"{self.location.spec} names {len(unknown)} shard(s) its manifest does not have "
                            f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}); fix the brace list")
        chosen = [s for s in shards if s["file"] in set(names)]
        return chosen or shards

    def _check_shards(self) -> None:
        n, where = len(self.shards), self.location.spec
        if n == 0:
            raise DataError(f"{where} has no {self.split} shards; re-run memgpt-prepare with more documents"
                            + (" or a larger --val-fraction" if self.split == "validation" else ""))
        if not self.location.is_remote:  # remote: a missing shard is named when it is opened (no request per shard)
            for s in self.shards:
                if not Path(self.location.url(s["file"])).is_file():
                    raise DataError(f"shard {self.location.url(s['file'])} listed in the manifest is missing; "
                                    f"restore it or re-run memgpt-prepare")
        if self.split == "train" and n < self.n_streams:
            raise DataError(f"{where} has {n} train shards but this run reads {self.n_streams} streams "
                            f"(dp x micro_batch_size); re-run memgpt-prepare with --min-shards >= {self.n_streams}")

    # ------------------------------------------------------------------ stream plan
    def _epoch_order(self, epoch: int) -> list[int]:
        """Shard order of `epoch`; memoised because every segment of every stream looks it up."""
        if epoch not in self._orders:
            if self.split == "validation":
                order = list(range(len(self.shards)))
            else:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order = torch.randperm(len(self.shards), generator=g).tolist()
            oldest = min(c.epoch for c in self.cursors.values())
            self._orders = {e: o for e, o in self._orders.items() if e >= oldest}  # drop epochs no stream reads again
            self._orders[epoch] = order
        return self._orders[epoch]

    def _plan(self, g: int, epoch: int) -> list[tuple[int, int, int]]:
        """(shard index, first document, stride) triples that stream g reads in `epoch`."""
        order = self._epoch_order(epoch)
        if self.split == "train" or len(order) >= self.n_streams:
            return [(s, 0, 1) for s in order[g::self.n_streams]]
        # Few validation shards: deal documents round-robin over streams across all shards.
        plan, start = [], 0
        for s in order:
            count = self.shards[s]["documents"]
            plan.append((s, (g - start) % self.n_streams, self.n_streams))
            start += count
        return plan

    # ------------------------------------------------------------------ shard access
    def _request(self, s: int) -> ShardRequest:
        info = self.shards[s]
        return ShardRequest(self.location.url(info["file"]), self.manifest["dtype"], info["documents"],
                            info["sha256"], self.verify, self.vocab_size, self.location.is_remote, self.policy,
                            self.cache)

    def _prefetch(self, s: int) -> None:
        if self._pool is not None and s not in self._cache and s not in self._futures:
            self._futures[s] = self._pool.submit(load_shard, self._request(s))

    def _docs(self, s: int) -> ShardDocs:
        if s not in self._cache:
            fut = self._futures.pop(s, None)
            self._keep(s, fut.result() if fut is not None else load_shard(self._request(s)))
        return self._cache[s]

    def _open_current(self) -> None:
        """Open every stream's current shard at once, before the first sample (at start and at
        resume), on threads: reading and sha256 release the GIL and remote reads wait on the
        network, so S streams no longer wait for S opens one after another. What is read is the
        same as opening them one by one; only when differs."""
        self._opened = True
        wanted: list[int] = []
        for g, c in self.cursors.items():
            plan = self._plan(g, c.epoch)
            if c.shard_pos < len(plan):
                s = plan[c.shard_pos][0]
                if s not in self._cache and s not in self._futures and s not in wanted:
                    wanted.append(s)
        if len(wanted) < 2:
            return
        with cf.ThreadPoolExecutor(min(OPEN_THREADS, len(wanted))) as pool:
            for s, docs in zip(wanted, pool.map(load_shard, [self._request(s) for s in wanted])):
                self._keep(s, docs)

    def _keep(self, s: int, docs: ShardDocs) -> None:
        self._note_damage(s, docs)
        self._cache[s] = docs

    def _note_damage(self, s: int, docs: ShardDocs) -> None:
        if docs.skipped or docs.error:
            url = self.location.url(self.shards[s]["file"])
            self._bad_files.add(url)
            log.warning("shard %s is damaged (%s); skipping %d of its documents", url, docs.error or "short",
                        docs.skipped)

    def _release_unused(self) -> None:
        in_use = set()
        for g, c in self.cursors.items():
            plan = self._plan(g, c.epoch)
            if c.shard_pos < len(plan):
                in_use.add(plan[c.shard_pos][0])
        for s in list(self._cache):
            if s not in in_use:
                del self._cache[s]

    # ------------------------------------------------------------------ segments
    def _next_segment(self, g: int) -> Optional[tuple[np.ndarray, np.ndarray, bool, int]]:
        """(inputs (N,), labels (N,), starts_document, doc_id) of stream g, or None when a
        validation stream is exhausted."""
        c = self.cursors[g]
        while True:
            plan = self._plan(g, c.epoch)
            if c.shard_pos >= len(plan):
                if self.split == "validation":
                    return None
                c.epoch, c.shard_pos, c.doc_pos, c.seg_pos = c.epoch + 1, 0, 0, 0
                continue
            s, first, stride = plan[c.shard_pos]
            docs = self._docs(s)
            if c.doc_pos == 0 and c.seg_pos == 0:
                self._account(docs)
                if c.shard_pos + 1 < len(plan):
                    self._prefetch(plan[c.shard_pos + 1][0])
            index = first + c.doc_pos * stride
            if index >= len(docs.tokens):
                c.shard_pos, c.doc_pos, c.seg_pos = c.shard_pos + 1, 0, 0
                self._release_unused()
                continue
            seg = self._cut(docs.tokens[index], c.seg_pos, None if docs.masks is None else docs.masks[index])
            if seg is None:  # document finished
                c.doc_pos, c.seg_pos = c.doc_pos + 1, 0
                continue
            starts = c.seg_pos == 0
            c.seg_pos += 1
            return seg[0], seg[1], starts, docs.doc_ids[index]

    def _cut(self, tokens: np.ndarray, j: int, mask: Optional[np.ndarray]) -> Optional[tuple[np.ndarray, np.ndarray]]:
        N = self.N
        if j * N >= len(tokens) - 1:
            return None
        inp = np.full(N, self.pad_id, dtype=np.int64)
        lab = np.full(N, IGNORE, dtype=np.int64)
        x = tokens[j * N:(j + 1) * N]
        y = tokens[j * N + 1:(j + 1) * N + 1]
        inp[:len(x)] = x
        lab[:len(y)] = y
        if mask is not None:  # task corpora supervise only their answer tokens
            lab[:len(y)][mask[j * N + 1:(j + 1) * N + 1] == 0] = IGNORE
        return inp, lab

    def _account(self, docs: ShardDocs) -> None:
        """Count documents delivered and skipped when a stream opens a shard."""
        self.seen_samples += len(docs.tokens)
        self.skipped_samples += docs.skipped
        total = self.seen_samples + self.skipped_samples
        if total >= MIN_DOCS_FOR_SKIP_CHECK and self.skipped_samples > self.max_skip_fraction * total:
            raise DataError(f"{self.skipped_samples} of {total} documents skipped "
                            f"(> data.max_skip_fraction={self.max_skip_fraction}) because of damaged shards: "
                            f"{', '.join(sorted(self._bad_files))}; re-run memgpt-prepare or restore them")

    # ------------------------------------------------------------------ batches
    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = [self.next_sample(g) for g in self.stream_ids]
        if all(r is None for r in rows):
            raise StopIteration
        return rows_to_batch([r if r is not None else self._empty_row() for r in rows], self.stream_ids)

    def next_sample(self, g: int):
        """The next K segments of stream g as (inputs, labels, reset, doc ids), or None once a
        validation stream is exhausted."""
        if not self._opened:
            self._open_current()
        segs = []
        for _ in range(self.K):
            seg = self._next_segment(g)
            if seg is None:
                break
            segs.append(seg)
        if not segs:
            return None
        while len(segs) < self.K:  # an exhausted validation stream: pad the sample
            segs.append(self._empty_segment())
        return (np.stack([s[0] for s in segs]), np.stack([s[1] for s in segs]),
                np.array([s[2] for s in segs]), np.array([s[3] for s in segs], dtype=np.int64))

    def _empty_segment(self):
        return np.full(self.N, self.pad_id, dtype=np.int64), np.full(self.N, IGNORE, dtype=np.int64), True, -1

    def _empty_row(self):
        segs = [self._empty_segment() for _ in range(self.K)]
        return (np.stack([s[0] for s in segs]), np.stack([s[1] for s in segs]),
                np.ones(self.K, dtype=bool), np.full(self.K, -1, dtype=np.int64))

    def set_n_segments(self, k: int) -> None:
        """Segments per sample from the next sample on (K curriculum). Cursors count segments,
        so the stream continues exactly where it was, only cut into longer or shorter samples."""
        if k < 1:
            raise DataError(f"n_segments must be >= 1, got {k}")
        self.K = k

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "split": self.split, "seed": self.seed, "n_streams": self.n_streams,
                "segment_len": self.N, "n_segments": self.K,
                "streams": {str(g): asdict(c) for g, c in self.cursors.items()},
                "seen_samples": self.seen_samples, "skipped_samples": self.skipped_samples,
                "bad_files": sorted(self._bad_files)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        layout = {"split": (self.split, "the split"), "seed": (self.seed, "data.seed"),
                  "n_streams": (self.n_streams, "data-parallel size x parallel.micro_batch_size"),
                  "segment_len": (self.N, "model.segment_len"), "n_segments": (self.K, "data.n_segments")}
        for key, (now, setting) in layout.items():
            if sd[key] != now:
                raise DataError(f"loader state was saved with {key}={sd[key]!r} but this run has {now!r}; "
                                f"resume with the same {setting} (or start a new run_dir)")
        missing = [g for g in self.stream_ids if str(g) not in sd["streams"]]
        if missing:
            raise DataError(f"loader state has no cursor for streams {missing}; resume with the same dp x micro_batch")
        self.cursors = {g: Cursor(**sd["streams"][str(g)]) for g in self.stream_ids}
        self.seen_samples, self.skipped_samples = sd["seen_samples"], sd["skipped_samples"]
        self._bad_files = set(sd.get("bad_files", []))
        self._cache.clear()
        self._futures.clear()
        self._opened = False

    def load_state_dicts(self, states: list[dict[str, Any]]) -> None:
        """Restore from the states of every data-parallel replica of another layout (a resume with
        another dp, same streams): each of this rank's streams takes the cursor of the replica
        that read it. The damaged-document counters are the run's totals (their ratio is what
        `max_skip_fraction` bounds)."""
        merged = dict(states[0])
        merged["streams"] = {g: c for sd in states for g, c in sd["streams"].items()}
        merged["seen_samples"] = sum(sd["seen_samples"] for sd in states)
        merged["skipped_samples"] = sum(sd["skipped_samples"] for sd in states)
        merged["bad_files"] = sorted({f for sd in states for f in sd.get("bad_files", [])})
        self.load_state_dict(merged)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __del__(self):
        # Best effort only: at interpreter shutdown the executor module may already be torn down.
        try:
            self.close()
        except Exception:
            pass


def rows_to_batch(rows: list[tuple], stream_ids: list[int]) -> dict[str, torch.Tensor]:
    """Stack per-stream samples (inputs (K, N), labels (K, N), reset (K,), doc ids (K,)) into a batch."""
    inp, lab, reset, doc = (np.stack([r[i] for r in rows]) for i in range(4))
    mb = len(rows)
    return {"input_ids": torch.from_numpy(inp).reshape(mb, -1),  # (mb, K*N)
            "labels": torch.from_numpy(lab).reshape(mb, -1),  # (mb, K*N)
            "reset": torch.from_numpy(reset),  # (mb, K)
            "doc_ids": torch.from_numpy(doc),  # (mb, K)
            "stream_ids": torch.tensor(stream_ids, dtype=torch.long)}


class MixedLoader:
    """Blends corpora with weights: each stream draws each sample from source j with probability
    weights[j], decided by a generator seeded from (seed, stream, sample index), so the blend is
    deterministic, independent of dp, and resumes exactly (each source keeps its own cursors;
    a source only advances for the streams that drew from it). Sources must share a tokenizer."""

    def __init__(self, sources: list[SegmentLoader], weights: list[float], seed: int):
        if len(sources) != len(weights) or abs(sum(weights) - 1.0) > 1e-6:
            raise DataError(f"mix weights {weights} must give one weight per corpus and sum to 1")
        hashes = {ld.tokenizer_hash for ld in sources}
        if len(hashes) > 1:
            raise DataError(f"mixed corpora {', '.join(ld.location.spec for ld in sources)} were made with different "
                            f"tokenizers; prepare them with the same --tokenizer")
        self.sources, self.seed = sources, seed
        self.cumulative = np.cumsum(weights)
        self.stream_ids = sources[0].stream_ids
        self.drawn = {g: 0 for g in self.stream_ids}  # samples each stream has taken

    @property
    def vocab_size(self) -> int:
        return self.sources[0].vocab_size

    @property
    def tokenizer_hash(self) -> str:
        """The sources' shared tokenizer sha256 (from their manifests, local or remote)."""
        return self.sources[0].tokenizer_hash

    def __iter__(self):
        return self

    def source_of(self, g: int, n: int) -> int:
        u = np.random.default_rng([self.seed, g, n]).random()
        return int(min(np.searchsorted(self.cumulative, u, side="right"), len(self.sources) - 1))

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = []
        for g in self.stream_ids:
            rows.append(self.sources[self.source_of(g, self.drawn[g])].next_sample(g))
            self.drawn[g] += 1
        return rows_to_batch(rows, self.stream_ids)

    def set_n_segments(self, k: int) -> None:
        for ld in self.sources:
            ld.set_n_segments(k)

    def state_dict(self) -> dict[str, Any]:
        return {"mix": [ld.state_dict() for ld in self.sources], "drawn": {str(g): n for g, n in self.drawn.items()}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if "mix" not in sd or len(sd["mix"]) != len(self.sources):
            raise DataError("the checkpoint's loader state does not match data.mix; resume with the same corpora")
        for ld, st in zip(self.sources, sd["mix"]):
            ld.load_state_dict(st)
        self.drawn = {g: int(sd["drawn"][str(g)]) for g in self.stream_ids}

    def load_state_dicts(self, states: list[dict[str, Any]]) -> None:
        """`SegmentLoader.load_state_dicts` for every source; each stream's draw count likewise."""
        if any("mix" not in sd or len(sd["mix"]) != len(self.sources) for sd in states):
            raise DataError("the checkpoint's loader state does not match data.mix; resume with the same corpora")
        for j, ld in enumerate(self.sources):
            ld.load_state_dicts([sd["mix"][j] for sd in states])
        drawn = {g: n for sd in states for g, n in sd["drawn"].items()}
        self.drawn = {g: int(drawn[str(g)]) for g in self.stream_ids}

    def close(self) -> None:
        for ld in self.sources:
            ld.close()


def _make_pool(num_workers: int) -> Optional[cf.ProcessPoolExecutor]:
    if num_workers <= 0:
        return None
    # spawn: the trainer process holds threads (gloo, OpenMP) that fork would copy mid-flight.
    return cf.ProcessPoolExecutor(max_workers=num_workers, mp_context=mp.get_context("spawn"))
