"""The stages of `memgpt-prepare`, each a function of its options and of files in a work directory,
so that one machine runs them one after the other and a Slurm job array runs them as tasks:

    scan   (per task)  read the task's units; for each non-empty document write its digest to a
                       hash partition, and its split key, sample key and size to a record file
    plan   (once)      resolve exact duplicates one partition at a time (across every task), apply
                       --max-docs, choose the validation documents and the tokenizer sample, and
                       train the tokenizer on that sample
    encode (per task)  read the units again, tokenize the kept documents, write the task's shards
    merge  (once)      the tasks' partial manifests -> manifest.json, written last and atomically

Each task ends by writing its marker file atomically; a task whose marker exists returns at once,
so rerunning a whole job redoes only the tasks that did not finish, and gives the same files.

Why the corpus is read twice (and the tokenizer sample once more) instead of held: shard document
ids, the split and shard boundaries must equal those of the old in-memory prepare, which knew the
whole deduplicated corpus before writing anything. Reading again is cheap next to tokenizing.
Memory: the write buffers, one hash partition while planning, the tokenizer trainer's word
counts, and a bounded window of documents being tokenized; none of it grows with the corpus
except the duplicate list of one task (8 bytes per duplicate) and the record files on disk.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from data_pipeline.bpe_tokenizer import load_tokenizer, special_ids, token_dtype, train_bpe
from data_pipeline.corpus_sources import Decoding, SkipLog, Unit, iter_unit, list_units, split_units
from data_pipeline.dedup import PartitionWriter, iter_duplicates, split_position
from data_pipeline.errors import DataError
from data_pipeline.prepare_encode import encode_texts

REC = np.dtype([("split_key", "<u8"), ("sample_key", "<u8"), ("nbytes", "<u8")])  # one per non-empty document
SPOOL_HEADER = np.dtype([("doc_id", "<u8"), ("ids_len", "<u8"), ("source_len", "<u8")])
CHUNK = 1 << 20  # records read at a time while planning
Scrubber = Callable[[str], tuple[str, dict]]


@dataclass(frozen=True)
class WorkDir:
    """Where the stages leave their results for each other (on a cluster: on the shared disk)."""

    root: Path

    def units(self) -> Path:
        return self.root / "units.json"

    def scan_dir(self) -> Path:
        return self.root / "scan"

    def scan_marker(self, task: int) -> Path:
        return self.scan_dir() / f"scan-{task:04d}.json"

    def records(self, task: int) -> Path:
        return self.scan_dir() / f"recs-{task:04d}.bin"

    def plan_marker(self) -> Path:
        return self.root / "plan.json"

    def duplicates(self, task: int) -> Path:
        return self.root / "plan" / f"dups-{task:04d}.npy"

    def sample(self, task: int) -> Path:
        return self.root / "plan" / f"sample-{task:04d}.npy"

    def tokenizer(self) -> Path:
        return self.root / "tokenizer.json"

    def encode_marker(self, task: int) -> Path:
        return self.root / "encode" / f"encode-{task:04d}.json"

    def spool(self, task: int, split: str) -> Path:
        return self.root / "encode" / f"spool-{task:04d}-{split}.bin"

    def remove(self) -> list[Path]:
        """Delete the files the stages write (the names above, `OWN_FILES`, and their temporaries),
        then the directories left empty. Anything else found there (a user's file) is not ours to
        delete: it stays, with its directories, and is returned."""
        left = []
        for sub, pattern in OWN_FILES.items():
            d = self.root / sub
            for path in sorted(d.iterdir()) if d.is_dir() else []:
                if path.is_file() and re.fullmatch(pattern + r"(\.tmp\d*)?", path.name):
                    path.unlink()
                elif sub != "." or path.name not in OWN_FILES:
                    left.append(path)
            if sub != "." and d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        if self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()
        return left


# What the stages write, by directory of the work root ("." the root itself): what
# `WorkDir.remove` may delete. One place with the paths above: a stage writing a new kind of file
# adds its name here (tests/data/test_prepare_array.py checks a real array leaves nothing).
OWN_FILES = {
    ".": r"(config|units|plan|tokenizer)\.json",
    "scan": r"scan-\d{4}\.json|recs-\d{4}\.bin|part-\d{4}-[0-9a-f]{2}\.bin",
    "plan": r"(dups|sample)-\d{4}\.npy",
    "encode": r"encode-\d{4}\.json|spool-\d{4}-\w+\.bin",
}


def atomic_write_json(path: Path, obj: dict) -> None:
    """Write-then-rename: a reader sees the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


# ------------------------------------------------------------------ the documents of one task
def task_units(cfg, work: WorkDir, task: int, n_tasks: int) -> list[Unit]:
    """The units of `task` (every task computes the same list; the first to finish writes it)."""
    cached = read_json(work.units())
    if cached is None:
        slice_bytes = int(cfg.jsonl_slice_mb * 2**20) if n_tasks > 1 else None
        units = list_units(list(cfg.inputs), cfg.format, slice_bytes)
        atomic_write_json(work.units(), {"units": [asdict(u) for u in units]})
    else:
        units = [Unit(**u) for u in cached["units"]]
    return split_units(units, n_tasks)[task]


def iter_task_documents(cfg, units: list[Unit], skips: Optional[SkipLog] = None,
                        scrub: Optional[Scrubber] = None) -> Iterator[tuple[int, str, str, dict]]:
    """(ordinal, source, text, scrub counts) of every non-empty document of `units`; ordinals
    count the non-empty documents of the task from 0."""
    ordinal, decoding = 0, Decoding(cfg.encoding, cfg.on_decode_error)
    for unit in units:
        for source, text in iter_unit(unit, cfg.text_field, skips, decoding):
            if not text.strip():
                if skips is not None:
                    skips.add("empty", source)
                continue
            counts: dict = {}
            if scrub is not None:
                text, counts = scrub(text)
            yield ordinal, source, text, counts
            ordinal += 1


def split_key(seed: int, text: str) -> int:
    """The key that puts a document in a split (validation when key / 2**64 < val_fraction)."""
    return int.from_bytes(hashlib.sha1(f"{seed}:{text}".encode("utf-8")).digest()[:8], "big")


def is_validation(keys: np.ndarray, val_fraction: float) -> np.ndarray:
    # the same float the in-memory prepare compared: int / 2**64 is correctly rounded, as is u64 -> f64
    return keys.astype(np.float64) / 2.0**64 < val_fraction


# ------------------------------------------------------------------ scan
class RecordWriter:
    """Buffered appends of REC records to one file."""

    def __init__(self, path: Path, buffer_records: int = 1 << 16):
        self.path, self.buf = path, []
        self.limit = buffer_records
        path.write_bytes(b"")

    def add(self, *rec) -> None:
        self.buf.append(rec)
        if len(self.buf) >= self.limit:
            self.flush()

    def flush(self) -> None:
        with open(self.path, "ab") as f:
            np.array(self.buf, REC).tofile(f)
        self.buf = []


def scan(cfg, work: WorkDir, task: int, n_tasks: int, scrub: Optional[Scrubber] = None) -> dict:
    """Stage 1 for one task: digests to hash partitions, split/sample keys and sizes to records."""
    done = read_json(work.scan_marker(task))
    if done is not None:
        return done
    t0 = time.time()
    units = task_units(cfg, work, task, n_tasks)
    skips = SkipLog()
    parts = PartitionWriter(work.scan_dir(), task, cfg.partitions)
    recs = RecordWriter(work.records(task))
    n = 0
    for ordinal, _, text, _ in iter_task_documents(cfg, units, skips, scrub):
        data = text.encode("utf-8")
        digest = hashlib.sha1(data).digest()
        parts.add(digest, ordinal)
        recs.add(split_key(cfg.seed, text), int.from_bytes(digest[12:], "big"), len(data))
        n = ordinal + 1
    parts.flush()
    recs.flush()
    result = {"task": task, "documents": n, "units": len(units), "skipped": skips.to_dict(),
              "seconds": round(time.time() - t0, 2)}
    atomic_write_json(work.scan_marker(task), result)
    return result


# ------------------------------------------------------------------ plan
def _nothing_kept_message(cfg, scans: list[dict]) -> str:
    """Why no document is left: the skips by reason, with what to change for undecodable ones."""
    where = ", ".join(cfg.inputs) or "the default corpus"
    skips = SkipLog()
    for s in scans:
        skips.merge(SkipLog.from_dict(s["skipped"]))
    if not skips.counts:
        return f"no non-empty documents found in {where}; check the path, --format and --text-field"
    why = ", ".join(f"{n} {reason} ({', '.join(skips.examples.get(reason, [])[:3])})"
                    for reason, n in sorted(skips.counts.items()))
    return (f"no non-empty documents found in {where}: every one was skipped: {why}; for files in another "
            f"encoding pass --encoding (e.g. latin-1) or --on-decode-error replace")


def plan(cfg, work: WorkDir, n_tasks: int, scrub: Optional[Scrubber] = None) -> dict:
    """Stage 2, once: duplicates, --max-docs, the split, the tokenizer sample and the tokenizer."""
    done = read_json(work.plan_marker())
    if done is not None:
        return done
    t0 = time.time()
    scans = [_require(work.scan_marker(t), f"scan task {t}") for t in range(n_tasks)]
    write_duplicates(work, n_tasks, cfg.partitions)
    tasks, fallback = choose_documents(cfg, work, n_tasks)
    n_dupes = sum(t["duplicates"] for t in tasks)
    if sum(t["kept"] for t in tasks) == 0:
        raise DataError(_nothing_kept_message(cfg, scans))
    budget = int(cfg.tokenizer_sample_mb * 2**20)
    train_bytes = sum(t["train_bytes"] for t in tasks)
    rate = 1.0 if train_bytes <= budget else budget / train_bytes
    sample_docs = write_sample(cfg, work, tasks, fallback, rate)
    trained = maybe_train_tokenizer(cfg, work, n_tasks, rate < 1.0, scrub)
    skips = SkipLog()
    for s in scans:
        skips.merge(SkipLog.from_dict(s["skipped"]))
    result = {"tasks": tasks, "fallback": fallback, "duplicates": n_dupes, "skipped": skips.to_dict(),
              "tokenizer_sample": {"rate": rate, "documents": sample_docs, "train_bytes": train_bytes,
                                   "budget_bytes": budget, "trained": trained},
              "seconds": round(time.time() - t0 + sum(s["seconds"] for s in scans), 2),
              "stage_seconds": {"scan": round(sum(s["seconds"] for s in scans), 2),
                                "plan": round(time.time() - t0, 2)}}
    atomic_write_json(work.plan_marker(), result)
    return result


def _require(path: Path, what: str) -> dict:
    found = read_json(path)
    if found is None:
        raise DataError(f"{what} has not finished ({path} is missing); rerun that task (resubmit the same job)")
    return found


def write_duplicates(work: WorkDir, n_tasks: int, n_partitions: int) -> None:
    """Per task, the sorted ordinals of its duplicates."""
    per_task: list[list[np.ndarray]] = [[] for _ in range(n_tasks)]
    for dup in iter_duplicates(work.scan_dir(), n_tasks, n_partitions):
        task, ordinal = split_position(dup)
        for t in np.unique(task):
            per_task[int(t)].append(ordinal[task == t])
    work.duplicates(0).parent.mkdir(parents=True, exist_ok=True)
    for t, parts in enumerate(per_task):
        np.save(work.duplicates(t), np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64))


def iter_kept(work: WorkDir, task: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ordinals, records) of the task's first occurrences, a chunk at a time."""
    dups = np.load(work.duplicates(task))
    recs = np.memmap(work.records(task), REC, mode="r") if work.records(task).stat().st_size else np.zeros(0, REC)
    for start in range(0, len(recs), CHUNK):
        ordinals = np.arange(start, min(start + CHUNK, len(recs)))
        keep = ~np.isin(ordinals, dups, assume_unique=True)
        yield ordinals[keep], np.asarray(recs[start:start + CHUNK])[keep]


def choose_documents(cfg, work: WorkDir, n_tasks: int) -> tuple[list[dict], Optional[list[int]]]:
    """Per task: its documents' first id, how many it keeps (first occurrences, within --max-docs),
    the ordinal limit, and its split counts; plus the one document moved to validation when no
    key falls under --val-fraction (as the in-memory prepare did), as [task, ordinal]."""
    tasks, offset, best, reached = [], 0, None, False  # best: (split key, task, ordinal) of the lowest key kept
    for t in range(n_tasks):
        entry = {"offset": offset, "kept": 0, "limit": 0 if reached else None, "train": 0, "validation": 0,
                 "train_bytes": 0}
        last = -1  # the task's last kept ordinal
        for ordinals, recs in ([] if reached else iter_kept(work, t)):
            if cfg.max_docs is not None:
                room = cfg.max_docs - offset - entry["kept"]
                ordinals, recs = ordinals[:room], recs[:room]
            _count_split(cfg, entry, recs)
            if len(recs):
                last = int(ordinals[-1])
                i = int(np.argmin(recs["split_key"]))
                if best is None or recs["split_key"][i] < best[0]:
                    best = (int(recs["split_key"][i]), t, int(ordinals[i]))
            if cfg.max_docs is not None and offset + entry["kept"] >= cfg.max_docs:
                # the in-memory prepare stopped reading right after the last document it kept
                reached, entry["limit"] = True, last + 1
                break
        entry["duplicates"] = _count_before(np.load(work.duplicates(t)), entry["limit"])
        offset += entry["kept"]
        tasks.append(entry)
    return tasks, _fallback(cfg, tasks, best, work)


def _count_before(ordinals: np.ndarray, limit: Optional[int]) -> int:
    return len(ordinals) if limit is None else int(np.searchsorted(ordinals, limit))


def _count_split(cfg, entry: dict, recs: np.ndarray) -> None:
    val = is_validation(recs["split_key"], cfg.val_fraction)
    entry["kept"] += len(recs)
    entry["validation"] += int(val.sum())
    entry["train"] += int((~val).sum())
    entry["train_bytes"] += int(recs["nbytes"][~val].sum())


def _fallback(cfg, tasks: list[dict], best, work: WorkDir) -> Optional[list[int]]:
    kept = sum(t["kept"] for t in tasks)
    if sum(t["validation"] for t in tasks) or kept < 2 or cfg.val_fraction <= 0 or best is None:
        return None
    _, task, ordinal = best
    nbytes = int(np.memmap(work.records(task), REC, mode="r")[ordinal]["nbytes"])
    tasks[task].update(train=tasks[task]["train"] - 1, validation=1,
                       train_bytes=tasks[task]["train_bytes"] - nbytes)
    return [task, ordinal]


def in_validation(cfg, task: int, ordinals: np.ndarray, keys: np.ndarray, fallback) -> np.ndarray:
    val = is_validation(keys, cfg.val_fraction)
    if fallback is not None and fallback[0] == task:
        val |= ordinals == fallback[1]
    return val


def write_sample(cfg, work: WorkDir, tasks: list[dict], fallback, rate: float) -> int:
    """Per task, the sorted ordinals of the training documents in the tokenizer sample: every
    one when the training text fits the budget, else those whose sample key (digest bytes,
    independent of position and of the split key) falls under the rate; never none while there
    is a training document (then the one with the lowest key)."""
    total, lowest = 0, None  # lowest: (sample key, task, ordinal) of any training document
    for t, entry in enumerate(tasks):
        chosen = []
        for ordinals, recs in iter_kept(work, t):
            ok = ~in_validation(cfg, t, ordinals, recs["split_key"], fallback)
            if entry["limit"] is not None:
                ok &= ordinals < entry["limit"]
            if ok.any():
                i = int(np.argmin(np.where(ok, recs["sample_key"], np.iinfo(np.uint64).max)))
                if lowest is None or recs["sample_key"][i] < lowest[0]:
                    lowest = (int(recs["sample_key"][i]), t, int(ordinals[i]))
            if rate < 1.0:
                ok &= recs["sample_key"].astype(np.float64) / 2.0**64 < rate
            chosen.append(ordinals[ok])
        sample = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
        np.save(work.sample(t), sample)
        total += len(sample)
    if total == 0 and lowest is not None:
        np.save(work.sample(lowest[1]), np.array([lowest[2]]))
        total = 1
    return total


def maybe_train_tokenizer(cfg, work: WorkDir, n_tasks: int, capped: bool, scrub: Optional[Scrubber]) -> bool:
    """Train the BPE on the sample (in corpus order, as the in-memory prepare fed it) unless
    --tokenizer was given; the tokenizer goes to the work directory. Returns whether it trained."""
    if cfg.tokenizer is not None:
        load_tokenizer(cfg.tokenizer).save(str(work.tokenizer()))
        return False
    budget = int(cfg.tokenizer_sample_mb * 2**20) if capped else None
    tok = train_bpe(iter_sample_texts(cfg, work, n_tasks, budget, scrub), cfg.vocab_size)
    tok.save(str(work.tokenizer()))
    return True


def iter_sample_texts(cfg, work: WorkDir, n_tasks: int, budget: Optional[int],
                      scrub: Optional[Scrubber]) -> Iterator[str]:
    """The sample's texts in corpus order; stops before the budget (bytes) would be passed."""
    used = 0
    for t in range(n_tasks):
        sample = np.load(work.sample(t))
        if not len(sample):
            continue
        j = 0
        for ordinal, _, text, _ in iter_task_documents(cfg, task_units(cfg, work, t, n_tasks), scrub=scrub):
            if ordinal != sample[j]:
                continue
            used += len(text.encode("utf-8"))
            if budget is not None and used > budget and j > 0:  # the first document goes in whole
                return
            yield text
            j += 1
            if j == len(sample):
                break


# ------------------------------------------------------------------ encode
def iter_kept_documents(cfg, work: WorkDir, task: int, n_tasks: int, planned: dict, scrub: Optional[Scrubber],
                        scrubbed: Counter) -> Iterator[tuple[int, str, str, bool]]:
    """(doc id, source, text, is validation) of the task's kept documents, in order."""
    entry = planned["tasks"][task]
    dups = np.load(work.duplicates(task))
    if not entry["kept"]:
        return
    recs = np.memmap(work.records(task), REC, mode="r")
    doc_id, d = entry["offset"], 0
    for ordinal, source, text, counts in iter_task_documents(cfg, task_units(cfg, work, task, n_tasks), scrub=scrub):
        if entry["limit"] is not None and ordinal >= entry["limit"]:
            break
        while d < len(dups) and dups[d] < ordinal:
            d += 1
        if d < len(dups) and dups[d] == ordinal:
            continue
        val = bool(in_validation(cfg, task, np.array([ordinal]), recs[ordinal:ordinal + 1]["split_key"],
                                 planned["fallback"])[0])
        scrubbed.update(counts)
        yield doc_id, source, text, val
        doc_id += 1


class Spool:
    """A task's encoded documents of one split, on disk until the split's size is known (the
    shard limits depend on it)."""

    def __init__(self, path: Path):
        self.path, self.documents, self.ids_bytes = path, 0, 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "wb")

    def add(self, doc_id: int, source: str, ids: bytes) -> None:
        src = source.encode("utf-8")
        self.f.write(np.array([(doc_id, len(ids), len(src))], SPOOL_HEADER).tobytes() + ids + src)
        self.documents += 1
        self.ids_bytes += len(ids)

    def close(self) -> None:
        self.f.close()

    def __iter__(self) -> Iterator[tuple[int, str, bytes]]:
        with open(self.path, "rb") as f:
            while header := f.read(SPOOL_HEADER.itemsize):
                doc_id, ids_len, src_len = np.frombuffer(header, SPOOL_HEADER)[0].tolist()
                ids = f.read(ids_len)
                yield doc_id, f.read(src_len).decode("utf-8"), ids


def encode(cfg, work: WorkDir, task: int, n_tasks: int, out: Path, scrub: Optional[Scrubber] = None) -> dict:
    """Stage 3 for one task: tokenize its kept documents and write its shards into `out`."""
    from data_pipeline.prepare_corpus import SPLITS, write_shards

    done = read_json(work.encode_marker(task))
    if done is not None:
        return done
    t0 = time.time()
    planned = _require(work.plan_marker(), "the plan step")
    tok = load_tokenizer(work.tokenizer())
    suffix = "u16" if token_dtype(tok.get_vocab_size()).itemsize == 2 else "u32"
    spools = {split: Spool(work.spool(task, split)) for split in SPLITS}
    scrubbed: Counter = Counter()
    meta: deque = deque()  # (doc id, source, is validation) of the texts handed to the tokenizer

    def texts() -> Iterator[str]:
        for doc_id, source, text, val in iter_kept_documents(cfg, work, task, n_tasks, planned, scrub, scrubbed):
            meta.append((doc_id, source, val))
            yield text

    for ids in encode_texts(tok, texts(), cfg.workers):
        doc_id, source, val = meta.popleft()
        spools["validation" if val else "train"].add(doc_id, source, ids)
    shards = {}
    for split, prefix in SPLITS.items():
        spools[split].close()
        shards[split] = write_shards(out, shard_prefix(prefix, task, n_tasks), iter(spools[split]),
                                     spools[split].documents, spools[split].ids_bytes, suffix,
                                     _task_min_shards(cfg, split, planned, task), cfg.shard_max_mb)
        spools[split].path.unlink()
    result = {"task": task, "shards": shards, "scrubbed": dict(sorted(scrubbed.items())), "dtype": suffix,
              "seconds": round(time.time() - t0, 2)}
    atomic_write_json(work.encode_marker(task), result)
    return result


def shard_prefix(prefix: str, task: int, n_tasks: int) -> str:
    """train-000000.tar on one machine (as before); train-t0003-000000.tar from array task 3."""
    return prefix if n_tasks == 1 else f"{prefix}-t{task:04d}"


def _task_min_shards(cfg, split: str, planned: dict, task: int) -> int:
    """The task's share of the split's minimum shard count, by its share of the split's documents
    (so the tasks together make at least as many as one machine; all of them when one task)."""
    wanted = cfg.min_shards if split == "train" else min(4, cfg.min_shards)
    total = sum(t[split] for t in planned["tasks"])
    mine = planned["tasks"][task][split]
    return max(1, math.ceil(wanted * mine / total)) if mine else 1


# ------------------------------------------------------------------ merge
def merge(cfg, work: WorkDir, n_tasks: int, out: Path, extra: Optional[dict] = None) -> dict:
    """Stage 4, once: every task's shards into one manifest.json, written last, atomically."""
    from data_pipeline.prepare_corpus import MANIFEST, SPLITS, build_manifest

    planned = _require(work.plan_marker(), "the plan step")
    encoded = [_require(work.encode_marker(t), f"encode task {t}") for t in range(n_tasks)]
    shutil.copyfile(work.tokenizer(), out / "tokenizer.json")
    tok = load_tokenizer(out / "tokenizer.json")
    eos, pad = special_ids(tok)
    shards = {split: [s for e in encoded for s in e["shards"][split]] for split in SPLITS}
    scrubbed: Counter = Counter()
    for e in encoded:
        scrubbed.update(e["scrubbed"])
    seconds = planned["seconds"] + sum(e["seconds"] for e in encoded)
    manifest = build_manifest(cfg, shards, planned["duplicates"], tok.get_vocab_size(), eos, pad,
                              encoded[0]["dtype"], seconds)
    manifest.update(skipped=planned["skipped"]["counts"], skipped_examples=planned["skipped"]["examples"],
                    tokenizer_sample=planned["tokenizer_sample"], prepare_tasks=n_tasks,
                    stage_seconds={**planned["stage_seconds"],
                                   "encode": round(sum(e["seconds"] for e in encoded), 2)})  # summed over tasks
    if cfg.scrub:
        manifest["scrubbed"] = dict(sorted(scrubbed.items()))
    manifest.update(extra or {})
    atomic_write_json(out / MANIFEST, manifest)
    return manifest
