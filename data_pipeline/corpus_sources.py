"""Where documents come from: the embedded default corpus, text directories, JSONL, and files
or saved datasets that Hugging Face `datasets` reads. Every source yields (source, text) pairs
in a deterministic order."""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path
from typing import Iterator, Optional

from data_pipeline.errors import DataError

TEXT_SUFFIXES = (".txt", ".py", ".md")
DATASETS_FORMATS = {".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


def stdlib_root() -> Path:
    """The Python standard library's source directory: present on every machine with Python."""
    return Path(sysconfig.get_paths()["stdlib"])


def iter_stdlib() -> Iterator[tuple[str, str]]:
    root = stdlib_root()
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)
    for path in files:
        text = _read_text(path)
        if text is not None:
            yield f"stdlib/{path.relative_to(root)}", text


def _read_text(path: Path) -> Optional[str]:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None  # unreadable or binary-ish files are not documents


def iter_text_dir(root: Path) -> Iterator[tuple[str, str]]:
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES):
        text = _read_text(path)
        if text is not None:
            yield str(path), text


def iter_jsonl(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno} is not valid JSON ({exc}); fix or remove that line") from exc
            if text_field not in row:
                raise DataError(f"{path}:{lineno} has no field {text_field!r}; pass --text-field with the right name "
                                f"(fields: {', '.join(sorted(row))})")
            yield f"{path}:{lineno}", str(row[text_field])


def iter_hf_dataset(ds, name: str, text_field: str) -> Iterator[tuple[str, str]]:
    if text_field not in ds.column_names:
        raise DataError(f"{name} has no column {text_field!r}; pass --text-field (columns: {', '.join(ds.column_names)})")
    for i, text in enumerate(ds[text_field]):
        yield f"{name}#{i}", str(text)


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


def iter_source(path: Path, text_field: str, fmt: Optional[str]) -> Iterator[tuple[str, str]]:
    """Documents of one input path, dispatched on what the path is."""
    if not path.exists():
        raise DataError(f"input {path} does not exist; pass a directory of .txt/.py/.md files, a .jsonl file, a "
                        f"json/parquet/text file or a save_to_disk dataset directory (or no input for the default corpus)")
    if is_saved_dataset(path):
        yield from iter_saved_dataset(path, text_field)
    elif path.is_dir():
        yield from iter_text_dir(path)
    elif fmt is None and path.suffix == ".jsonl":
        yield from iter_jsonl(path, text_field)
    else:
        chosen = fmt or DATASETS_FORMATS.get(path.suffix)
        if chosen is None:
            raise DataError(f"cannot tell the format of {path}; pass --format json|parquet|text|csv")
        yield from iter_datasets_file(path, chosen, text_field)


def iter_documents(inputs: list[str], text_field: str = "text", fmt: Optional[str] = None) -> Iterator[tuple[str, str]]:
    """All documents of `inputs` in order (the default corpus when `inputs` is empty)."""
    sources = [iter_stdlib()] if not inputs else [iter_source(Path(p), text_field, fmt) for p in inputs]
    for source in sources:
        yield from source
