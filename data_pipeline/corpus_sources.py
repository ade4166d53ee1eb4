"""Where documents come from: the embedded default corpus, text directories, JSONL, and files
or saved datasets that Hugging Face `datasets` reads. Every source yields (source, text) pairs
in a deterministic order.

For streaming and for Slurm arrays the inputs are cut into *units* (one text file, one byte range
of a JSONL file, one `datasets` file or saved dataset): `list_units` gives them in corpus order,
`iter_unit` reads one, and the concatenation of every unit's documents is `iter_documents`.
Files that cannot be read or decoded are skipped and counted in a `SkipLog` (never silently)."""
from __future__ import annotations

import codecs
import json
import sysconfig
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from data_pipeline.errors import DataError

TEXT_SUFFIXES = (".txt", ".py", ".md")
DATASETS_FORMATS = {".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


def stdlib_root() -> Path:
    """The Python standard library's source directory: present on every machine with Python."""
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass
class SkipLog:
    """Documents (or whole files) left out, counted per reason, with the first few sources named."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def add(self, reason: str, source: str) -> None:
        self.counts[reason] += 1
        names = self.examples.setdefault(reason, [])
        if len(names) < self.max_examples:
            names.append(source)

    def merge(self, other: "SkipLog") -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
            for name in other.examples.get(reason, []):
                if len(self.examples.setdefault(reason, [])) < self.max_examples:
                    self.examples[reason].append(name)

    def to_dict(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())), "examples": self.examples}

    @classmethod
    def from_dict(cls, d: dict) -> "SkipLog":
        return cls(Counter(d.get("counts", {})), {k: list(v) for k, v in d.get("examples", {}).items()})


@dataclass(frozen=True)
class Decoding:
    """How a file's bytes become text: the encoding, and what to do where they do not decode."""

    encoding: str = "utf-8"
    on_error: str = "skip"  # skip the document | replace bad bytes with U+FFFD | fail (stop, naming it)

    def __post_init__(self):
        if self.on_error not in ("skip", "replace", "fail"):
            raise DataError(f"--on-decode-error {self.on_error!r} must be skip, replace or fail")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise DataError(f"--encoding {self.encoding!r} is not an encoding Python knows (e.g. utf-8, latin-1, "
                            f"cp1252)") from None

    def decode(self, data: bytes, source: str, skips: Optional[SkipLog]) -> Optional[str]:
        """The text of `data`, or None when it is skipped (counted in `skips` either way)."""
        try:
            return data.decode(self.encoding)
        except UnicodeDecodeError as exc:
            if self.on_error == "fail":
                raise DataError(f"{source}: byte {exc.start} is not valid {self.encoding} ({exc.reason}); pass "
                                f"--encoding with the file's encoding, or --on-decode-error skip|replace") from None
            if skips is not None:
                skips.add("decode_error" if self.on_error == "skip" else "decode_replaced", source)
            return data.decode(self.encoding, errors="replace") if self.on_error == "replace" else None


UTF8 = Decoding()


def stdlib_files() -> list[Path]:
    root = stdlib_root()
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def iter_stdlib(skips: Optional[SkipLog] = None) -> Iterator[tuple[str, str]]:
    for path in stdlib_files():
        yield from _iter_file(path, f"stdlib/{path.relative_to(stdlib_root())}", skips, UTF8)


def _read_text(path: Path, source: str, skips: Optional[SkipLog], decoding: Decoding) -> Optional[str]:
    try:
        data = path.read_bytes()
    except OSError:
        if skips is not None:
            skips.add("unreadable", source)
        return None
    text = decoding.decode(data, source, skips)
    # universal newlines, as Path.read_text gives them (corpora made before read files that way)
    return None if text is None else text.replace("\r\n", "\n").replace("\r", "\n")


def _iter_file(path: Path, source: str, skips: Optional[SkipLog], decoding: Decoding) -> Iterator[tuple[str, str]]:
    text = _read_text(path, source, skips, decoding)
    if text is not None:
        yield source, text


def text_dir_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)


def iter_text_dir(root: Path, skips: Optional[SkipLog] = None, decoding: Decoding = UTF8) -> Iterator[tuple[str, str]]:
    for path in text_dir_files(root):
        yield from _iter_file(path, str(path), skips, decoding)


def iter_jsonl(path: Path, text_field: str, start: int = 0, end: Optional[int] = None, first_lineno: int = 1,
               skips: Optional[SkipLog] = None, decoding: Decoding = UTF8) -> Iterator[tuple[str, str]]:
    """The documents of the lines of `path` that begin in bytes [start, end) (`start` is the
    beginning of a line, numbered `first_lineno`); a line that does not decode is one document."""
    with open(path, "rb") as f:
        f.seek(start)
        offset, lineno = start, first_lineno
        for raw in f:
            if end is not None and offset >= end:
                break
            offset += len(raw)
            line = decoding.decode(raw, f"{path}:{lineno}", skips)
            if line is not None and line.strip():
                yield f"{path}:{lineno}", _jsonl_text(path, lineno, line, text_field)
            lineno += 1


def _jsonl_text(path: Path, lineno: int, line: str, text_field: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{lineno} is not valid JSON ({exc}); fix or remove that line") from exc
    if text_field not in row:
        raise DataError(f"{path}:{lineno} has no field {text_field!r}; pass --text-field with the right name "
                        f"(fields: {', '.join(sorted(row))})")
    return str(row[text_field])


def iter_hf_dataset(ds, name: str, text_field: str) -> Iterator[tuple[str, str]]:
    if text_field not in ds.column_names:
        raise DataError(f"{name} has no column {text_field!r}; pass --text-field (columns: {', '.join(ds.column_names)})")
    i = 0
    for batch in ds.iter(batch_size=1024):  # a column at a time would hold the whole dataset in memory
        for text in batch[text_field]:
            yield f"{name}#{i}", str(text)
            i += 1


def iter_datasets_file(path: Path, fmt: str, text_field: str) -> Iterator[tuple[str, str]]:
    from datasets import load_dataset

    kwargs = {"sample_by": "document"} if fmt == "text" else {}
    ds = load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    yield from iter_hf_dataset(ds, str(path), text_field)


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
                              or (path / "state.json").is_file())


def iter_saved_dataset(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        for split in sorted(ds):
            yield from iter_hf_dataset(ds[split], f"{path}[{split}]", text_field)
    else:
        yield from iter_hf_dataset(ds, str(path), text_field)


# ------------------------------------------------------------------ units
@dataclass(frozen=True)
class Unit:
    """One piece of the inputs that one task reads whole, in corpus order."""

    kind: str  # "file" (one text document), "jsonl" (a line-aligned byte range), "datasets", "saved"
    path: str
    source: str = ""  # the name of a "file" document (stdlib files are named stdlib/...)
    start: int = 0  # jsonl: first byte (the beginning of a line) ...
    end: Optional[int] = None  # ... and the end of the range (None: end of file)
    first_lineno: int = 1  # jsonl: the number of the line at `start`
    nbytes: int = 0  # size on disk, for balancing units over tasks
    fmt: Optional[str] = None  # datasets: the loader name


def check_input(path: Path) -> None:
    if not path.exists():
        raise DataError(f"input {path} does not exist; pass a directory of .txt/.py/.md files, a .jsonl file, a "
                        f"json/parquet/text file or a save_to_disk dataset directory (or no input for the default corpus)")


def list_units(inputs: list[str], fmt: Optional[str] = None, jsonl_slice_bytes: Optional[int] = None) -> list[Unit]:
    """Every unit of `inputs` in corpus order (the default corpus when `inputs` is empty). A JSONL
    file larger than `jsonl_slice_bytes` is cut into line-aligned ranges of about that size."""
    if not inputs:
        root = stdlib_root()
        return [Unit("file", str(p), f"stdlib/{p.relative_to(root)}", nbytes=_size(p)) for p in stdlib_files()]
    units: list[Unit] = []
    for p in inputs:
        units.extend(_path_units(Path(p), fmt, jsonl_slice_bytes))
    return units


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _path_units(path: Path, fmt: Optional[str], jsonl_slice_bytes: Optional[int]) -> list[Unit]:
    check_input(path)
    if is_saved_dataset(path):
        return [Unit("saved", str(path))]
    if path.is_dir():
        return [Unit("file", str(f), str(f), nbytes=_size(f)) for f in text_dir_files(path)]
    if fmt is None and path.suffix == ".jsonl":
        return jsonl_ranges(path, jsonl_slice_bytes)
    chosen = fmt or DATASETS_FORMATS.get(path.suffix)
    if chosen is None:
        raise DataError(f"cannot tell the format of {path}; pass --format json|parquet|text|csv")
    return [Unit("datasets", str(path), fmt=chosen, nbytes=_size(path))]


def jsonl_ranges(path: Path, slice_bytes: Optional[int]) -> list[Unit]:
    """`path` as line-aligned byte ranges of about `slice_bytes` (one range when None), each with
    the number of its first line (counted here once, so a task never re-reads the file's head)."""
    size = _size(path)
    if not slice_bytes or size <= slice_bytes:
        return [Unit("jsonl", str(path), nbytes=size)]
    cuts, linenos = [0], [1]
    with open(path, "rb") as f:
        lineno, offset = 1, 0
        for raw in f:  # one sequential pass: cut at the first line start past each slice boundary
            if offset >= cuts[-1] + slice_bytes:
                cuts.append(offset)
                linenos.append(lineno)
            offset += len(raw)
            lineno += 1
    cuts.append(size)
    return [Unit("jsonl", str(path), start=a, end=b, first_lineno=n, nbytes=b - a)
            for a, b, n in zip(cuts, cuts[1:], linenos)]


def iter_unit(unit: Unit, text_field: str, skips: Optional[SkipLog] = None,
              decoding: Decoding = UTF8) -> Iterator[tuple[str, str]]:
    """The (source, text) documents of one unit, in order."""
    if unit.kind == "file":
        yield from _iter_file(Path(unit.path), unit.source, skips, decoding)
    elif unit.kind == "jsonl":
        yield from iter_jsonl(Path(unit.path), text_field, unit.start, unit.end, unit.first_lineno, skips, decoding)
    elif unit.kind == "saved":
        yield from iter_saved_dataset(Path(unit.path), text_field)
    else:
        yield from iter_datasets_file(Path(unit.path), unit.fmt, text_field)


def split_units(units: list[Unit], n_tasks: int) -> list[list[Unit]]:
    """`units` in `n_tasks` contiguous runs of about equal bytes (a unit goes to the task its
    byte midpoint falls in), so task 0's documents, then task 1's, ... are the corpus order."""
    total = sum(max(u.nbytes, 1) for u in units)
    tasks: list[list[Unit]] = [[] for _ in range(n_tasks)]
    done = 0
    for u in units:
        size = max(u.nbytes, 1)
        tasks[min(n_tasks - 1, int((done + size / 2) * n_tasks / total))].append(u)
        done += size
    return tasks


def iter_documents(inputs: list[str], text_field: str = "text", fmt: Optional[str] = None,
                   skips: Optional[SkipLog] = None, decoding: Decoding = UTF8) -> Iterator[tuple[str, str]]:
    """All documents of `inputs` in order (the default corpus when `inputs` is empty)."""
    for unit in list_units(inputs, fmt):
        yield from iter_unit(unit, text_field, skips, decoding)
