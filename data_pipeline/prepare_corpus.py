"""`memgpt-prepare`: documents -> dedup -> train/validation split -> BPE -> WebDataset shards + manifest.

Output directory:
    tokenizer.json
    train-000000.tar ...   one sample per document: __key__ "doc%09d", ids.u16|ids.u32, source.txt
    val-000000.tar ...     (from a Slurm array: train-tTTTT-000000.tar ..., one run per task)
    manifest.json          written last (atomically): a directory without it is not a corpus

The corpus is streamed, never held: `data_pipeline.prepare_stages` runs scan -> plan -> encode ->
merge, here one after the other in one process, on a cluster as the tasks of a Slurm array. The
output equals the old in-memory prepare's for the same input and seed (same shards, document ids
and tokens), so corpora made before stay valid.
"""
from __future__ import annotations

import functools
import json
import re
import os
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from data_pipeline.bpe_tokenizer import file_sha256
from data_pipeline.corpus_sources import Decoding, check_input
from data_pipeline.errors import DataError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SPLITS = {"train": "train", "validation": "val"}
# the names this tool writes in OUT: its shards (`-tTTTT` from an array task) and the tokenizer
OUR_NAMES = re.compile(r"tokenizer\.json|(" + "|".join(SPLITS.values()) + r")(-t\d{4})?-\d{6}\.tar")


@dataclass(frozen=True)
class PrepareConfig:
    """Options of one `memgpt-prepare` run."""

    out: Path
    inputs: tuple[str, ...] = ()
    text_field: str = "text"
    format: Optional[str] = None
    tokenizer: Optional[Path] = None  # None: train a byte-level BPE
    vocab_size: int = 4096
    val_fraction: float = 0.02
    shard_max_mb: float = 64.0
    min_shards: int = 64  # train shards at least (validation: at least min(4, docs))
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_docs: Optional[int] = None
    overwrite: bool = False
    seed: int = 0
    # the BPE is trained on at most this much training text (MB), a deterministic sample by a hash
    # of each document; a corpus whose training text fits is used whole (as before)
    tokenizer_sample_mb: float = 1024.0
    partitions: int = 16  # hash partitions of the exact dedup (one is in memory at a time)
    jsonl_slice_mb: float = 256.0  # Slurm arrays: a JSONL file is cut into line-aligned slices of this size
    scrub: bool = False  # replace secrets and personal data (data_pipeline.scrub) before anything else
    encoding: str = "utf-8"  # of text and JSONL files
    on_decode_error: str = "skip"  # skip the document | replace the bad bytes | fail; counted and named


@dataclass
class Document:
    """One document of a task corpus (data_pipeline.prepare_tasks)."""

    doc_id: int
    source: str
    text: str


def shard_limits(n_docs: int, total_bytes: int, min_shards: int, shard_max_mb: float) -> tuple[int, int]:
    """(maxcount, maxsize) for ShardWriter so a split gets >= min_shards shards when it can."""
    target = max(1, min(min_shards, n_docs))
    maxcount = max(1, n_docs // target)  # floor: at least `target` shards
    maxsize = int(min(shard_max_mb * 2**20, max(total_bytes / target, 1)))
    return maxcount, max(maxsize, 1)


def write_split(out: Path, prefix: str, docs: list[Document], encoded: list[bytes], suffix: str,
                min_shards: int, shard_max_mb: float, masks: Optional[list[bytes]] = None) -> list[dict]:
    """Write one split of documents held in memory (task corpora); see `write_shards`."""
    samples = ((d.doc_id, d.source, ids) for d, ids in zip(docs, encoded))
    return write_shards(out, prefix, samples, len(docs), sum(len(e) for e in encoded), suffix, min_shards,
                        shard_max_mb, masks)


def write_shards(out: Path, prefix: str, samples: Iterable[tuple[int, str, bytes]], n_docs: int, ids_bytes: int,
                 suffix: str, min_shards: int, shard_max_mb: float,
                 masks: Optional[list[bytes]] = None) -> list[dict]:
    """Write one split's (doc id, source, token bytes) samples, `n_docs` of them holding
    `ids_bytes` of tokens, to `out/prefix-NNNNNN.tar`; returns their manifest entries. `masks` (one
    uint8 byte per token, 1 = supervised) restricts the loss to those tokens, for task corpora."""
    maxcount, maxsize = shard_limits(n_docs, ids_bytes + 1024 * n_docs, min_shards, shard_max_mb)
    itemsize = 2 if suffix == "u16" else 4
    stats: dict[str, dict] = {}
    writer = ShardTarWriter(out, prefix, maxcount, maxsize)
    try:
        for i, (doc_id, source, ids) in enumerate(samples):
            members = {f"ids.{suffix}": ids, "source.txt": source.encode("utf-8")}
            if masks is not None:
                members["mask.u8"] = masks[i]
            name = writer.write(f"doc{doc_id:09d}", members)
            entry = stats.setdefault(name, {"documents": 0, "tokens": 0})
            entry["documents"] += 1
            entry["tokens"] += len(ids) // itemsize
    finally:
        writer.close()
    return [{"file": name, **s, "sha256": file_sha256(out / name)} for name, s in sorted(stats.items())]


class ShardTarWriter:
    """`out/prefix-NNNNNN.tar` shards, the next one begun when the current one holds `maxcount`
    samples or `maxsize` bytes of member data: the files webdataset's ShardWriter writes (members
    `key.ext` in sorted order, PAX, mode 0444, owner bigdata, the first shard opened at once),
    without importing webdataset (it imports torch: seconds of every prepare process's start, and
    a few hundred MB). The headers are built by `tar_header` (through tarfile, a PAX header per
    member for its float mtime, they were most of the shard writing's time); the first member of
    each process is also built by tarfile and compared, and tarfile is used if they differ."""

    def __init__(self, out: Path, prefix: str, maxcount: int, maxsize: int):
        self.out, self.prefix, self.maxcount, self.maxsize = out, prefix, maxcount, maxsize
        self.shard, self.file = 0, None
        self._next()

    def _next(self) -> None:
        self._finish()
        self.name = f"{self.prefix}-{self.shard:06d}.tar"
        self.file = open(self.out / self.name, "wb")
        self.shard, self.count, self.size, self.offset = self.shard + 1, 0, 0, 0

    def write(self, key: str, members: dict[str, bytes]) -> str:
        """Append one sample; returns the name of the shard it went to."""
        if self.count >= self.maxcount or self.size >= self.maxsize:
            self._next()
        for ext in sorted(members):
            data = members[ext]
            # a float mtime, as webdataset's: a PAX header each
            header = tar_header(f"{key}.{ext}", len(data), time.time())
            pad = -len(data) % tarfile.BLOCKSIZE
            self.file.write(b"".join((header, data, tarfile.NUL * pad)))
            self.offset += len(header) + len(data) + pad
            self.size += len(data)
        self.count += 1
        return self.name

    def _finish(self) -> None:
        if self.file is not None:
            # tarfile's end: two zero blocks, then zeros up to a whole record
            end = 2 * tarfile.BLOCKSIZE
            end += -(self.offset + end) % tarfile.RECORDSIZE
            self.file.write(tarfile.NUL * end)
            self.file.close()
            self.file = None

    def close(self) -> None:
        self._finish()


def tarfile_header(name: str, size: int, mtime: float) -> bytes:
    """The header blocks the standard library's tarfile (PAX format) writes for one of our members."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o444
    info.uname = info.gname = "bigdata"
    return info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")


def _ustar_block(name: bytes, mode: int, size: int, mtime: int, kind: bytes, owner: bytes) -> bytes:
    # the POSIX ustar header: name 100, mode/uid/gid 8, size/mtime 12 (octal, NUL-ended),
    # checksum 8 (spaces while summing), type 1, linkname 100, magic 8, uname/gname 32,
    # devmajor/devminor 8, prefix 155, zeros to 512
    block = b"".join((name.ljust(100, b"\0"), b"%07o\0" % mode, b"0000000\0" * 2, b"%011o\0" % size,
                      b"%011o\0" % mtime, b" " * 8, kind, b"\0" * 100, tarfile.POSIX_MAGIC,
                      owner.ljust(32, b"\0") * 2)).ljust(tarfile.BLOCKSIZE, b"\0")
    return block[:148] + b"%06o\0" % sum(block) + block[155:]


@functools.lru_cache(maxsize=8)
def _pax_block(size: int) -> bytes:
    return _ustar_block(b"././@PaxHeader", 0, size, 0, tarfile.XHDTYPE, b"")


def _fast_header(name: str, size: int, mtime: float) -> bytes:
    """`tarfile_header` for ASCII names of at most 100 characters, sizes below 8 GiB and a positive
    float mtime, built directly: a PAX extended header holding the full mtime, then the ustar header."""
    value = str(mtime).encode("ascii")
    n = length = len(value) + len(b" mtime=\n")
    while length != n + len(str(length)):  # the record's length counts its own digits
        length = n + len(str(length))
    record = b"%d mtime=%s\n" % (length, value)
    pax = _pax_block(len(record))
    body = record.ljust(-(-len(record) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE, b"\0")
    return pax + body + _ustar_block(name.encode("ascii"), 0o444, size, round(mtime), tarfile.REGTYPE, b"bigdata")


_FAST_OK: Optional[bool] = None  # whether _fast_header matched tarfile on this Python (checked once)


def tar_header(name: str, size: int, mtime: float) -> bytes:
    """The header of one member: `_fast_header` when it applies and matched tarfile's once."""
    global _FAST_OK
    if not (name.isascii() and len(name) <= 100 and size < 8**11 and 0 < mtime < 8**11):
        return tarfile_header(name, size, mtime)
    if _FAST_OK is None:
        _FAST_OK = _fast_header(name, size, mtime) == tarfile_header(name, size, mtime)
    return _fast_header(name, size, mtime) if _FAST_OK else tarfile_header(name, size, mtime)


def refuse_input_overlap(cfg: PrepareConfig) -> None:
    """--out may not be, contain or lie inside an input: writing there (or --overwrite) would
    destroy the input, or mix the corpus into it."""
    out = cfg.out.resolve()
    for p in cfg.inputs:
        inp = Path(p).resolve()
        if inp == out or out in inp.parents:
            raise DataError(f"--out {cfg.out} is or contains the input {p}; choose an --out outside the inputs")
        if inp in out.parents:
            raise DataError(f"--out {cfg.out} lies inside the input {p}; choose an --out outside the inputs")


def is_our_corpus(out: Path) -> bool:
    """Whether `out` holds a manifest that this tool wrote (so --overwrite may replace it)."""
    try:
        m = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and "format_version" in m and "splits" in m and "tokenizer" in m


def prepare_output_dir(cfg: PrepareConfig) -> None:
    """Make `cfg.out` ready for a new corpus. Only ever removes the files of a corpus this tool
    wrote (its manifest, tokenizer and shards), and only with --overwrite."""
    out = cfg.out
    refuse_input_overlap(cfg)
    if out.exists() and any(out.iterdir()):
        if not is_our_corpus(out):
            raise DataError(f"{out} is not empty and holds no corpus made by memgpt-prepare (no valid {MANIFEST}); "
                            f"choose an empty or new --out directory")
        if not cfg.overwrite:
            raise DataError(f"{out} already holds a prepared corpus ({out / MANIFEST}); pass --overwrite to replace it")
        remove_corpus(out)
    out.mkdir(parents=True, exist_ok=True)


def remove_corpus(out: Path) -> None:
    """Delete the files our manifest lists (its tokenizer and shards), the manifest first so the
    directory stops being a corpus. Anything the manifest does not name, a user's own
    `train-mine.tar` included, stays where it is."""
    m = json.loads((out / MANIFEST).read_text())
    names = {m["tokenizer"]["file"]} | {s["file"] for split in m["splits"].values() for s in split}
    # only names of the kind prepare writes (ShardTarWriter's, `-tTTTT` from an array task, and the
    # tokenizer's), plain names in OUT: a hand-edited manifest naming a user's file, or a path
    # elsewhere, deletes nothing
    (out / MANIFEST).unlink()
    for name in sorted(names):
        path = out / name
        if OUR_NAMES.fullmatch(name) and path.parent == out and path.is_file():
            path.unlink()


def load_scrubber(enabled: bool):
    """`data_pipeline.scrub.scrub_text`, imported only when scrubbing (it may not be installed)."""
    if not enabled:
        return None
    try:
        from data_pipeline.scrub import scrub_text
    except ImportError as exc:
        raise DataError(f"--scrub needs data_pipeline/scrub.py (scrub_text), which cannot be imported ({exc}); "
                        f"update the checkout or pass --no-scrub") from exc
    return scrub_text


def prepare(cfg: PrepareConfig) -> dict:
    """Run the whole prepare step on this machine; returns the manifest (also in OUT/manifest.json).
    The work files live in a hidden directory beside OUT and are removed at the end."""
    from data_pipeline.prepare_stages import WorkDir, encode, merge, plan, scan

    for p in cfg.inputs:
        check_input(Path(p))
    refuse_input_overlap(cfg)
    Decoding(cfg.encoding, cfg.on_decode_error)  # a bad --encoding fails here, before any reading
    scrub = load_scrubber(cfg.scrub)
    cfg.out.absolute().parent.mkdir(parents=True, exist_ok=True)
    work = WorkDir(Path(tempfile.mkdtemp(prefix=f".{cfg.out.name}.prepare-", dir=cfg.out.absolute().parent)))
    try:
        scan(cfg, work, 0, 1, scrub)
        plan(cfg, work, 1, scrub)
        prepare_output_dir(cfg)
        encode(cfg, work, 0, 1, cfg.out, scrub)
        return merge(cfg, work, 1, cfg.out)
    finally:
        shutil.rmtree(work.root, ignore_errors=True)


def summary_lines(m: dict, cfg: PrepareConfig) -> list[str]:
    """What `memgpt-prepare` prints when done; lines starting "warning:" go to stderr."""
    lines = [f"{split}: {t['documents']:,} documents, {t['tokens']:,} tokens, {t['shards']} shards"
             for split, t in m["totals"].items()]
    skipped = m.get("skipped", {})
    skip_text = ", ".join(f"{n:,} {reason}" for reason, n in skipped.items() if reason != "decode_replaced")
    lines.append(f"vocab {m['tokenizer']['vocab_size']}, {m['duplicates_dropped']} duplicates dropped, "
                 f"skipped: {skip_text or 'none'}, {m['seconds']}s -> {cfg.out}/{MANIFEST}")
    if "scrubbed" in m:
        kinds = ", ".join(f"{n:,} {kind}" for kind, n in m["scrubbed"].items())
        lines.append(f"scrubbed: {kinds or 'nothing found'}")
    for reason, names in m.get("skipped_examples", {}).items():
        if reason != "empty":
            what = "kept with undecodable bytes replaced" if reason == "decode_replaced" else f"skipped as {reason}"
            lines.append(f"warning: {skipped.get(reason, len(names)):,} document(s) {what}, e.g. {', '.join(names)}")
    vocab = m["tokenizer"]["vocab_size"]
    if m["tokenizer"]["trained"] and vocab < cfg.vocab_size:
        lines.append(f"warning: the trained vocabulary has {vocab:,} tokens, fewer than --vocab-size "
                     f"{cfg.vocab_size:,}: the training text has no more merges to learn; give more text or set "
                     f"--vocab-size {vocab} (and model.vocab_size to match)")
    return lines


def build_manifest(cfg: PrepareConfig, shards: dict, dupes: int, vocab: int, eos: int, pad: int,
                   suffix: str, seconds: float) -> dict:
    totals = {split: {"shards": len(s), "documents": sum(x["documents"] for x in s),
                      "tokens": sum(x["tokens"] for x in s)} for split, s in shards.items()}
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": {"file": "tokenizer.json", "sha256": file_sha256(cfg.out / "tokenizer.json"),
                      "vocab_size": vocab, "eos_id": eos, "pad_id": pad, "trained": cfg.tokenizer is None},
        "dtype": suffix,
        "splits": shards,
        "totals": totals,
        "duplicates_dropped": dupes,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "inputs": list(cfg.inputs) or ["<default: python stdlib sources>"],
        "command": sys.argv,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(seconds, 1),
    }


def _atomic_write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def read_manifest(data_dir: str | Path) -> dict:
    """The manifest of a prepared corpus, or a DataError that says how to make one."""
    path = Path(data_dir) / MANIFEST
    if not Path(data_dir).is_dir():
        raise DataError(f"data directory {data_dir} does not exist; run memgpt-prepare --out {data_dir} first")
    if not path.is_file():
        raise DataError(f"{path} is missing: {data_dir} is not a prepared corpus (or its prepare step did not "
                        f"finish); run memgpt-prepare --out {data_dir}")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); re-run memgpt-prepare --out {data_dir} --overwrite") from exc


def config_from_args(a) -> PrepareConfig:
    """The PrepareConfig of parsed `memgpt-prepare` arguments (launch/prepare.py, submit.py prepare)."""
    return PrepareConfig(out=Path(a.out), inputs=tuple(a.inputs), text_field=a.text_field, format=a.format,
                         tokenizer=a.tokenizer, vocab_size=a.vocab_size, val_fraction=a.val_fraction,
                         shard_max_mb=a.shard_max_mb, min_shards=a.min_shards, workers=a.workers,
                         max_docs=a.max_docs, overwrite=a.overwrite, seed=a.seed,
                         tokenizer_sample_mb=a.tokenizer_sample, partitions=a.partitions,
                         jsonl_slice_mb=a.jsonl_slice_mb, scrub=a.scrub, encoding=a.encoding,
                         on_decode_error=a.on_decode_error)
