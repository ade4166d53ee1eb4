"""Write the golden corpora of tests/data/test_prepare_golden.py: small inputs (text files and a
JSONL with duplicates, empty documents and one document shared between the two) and, for a few
option sets, what `memgpt-prepare` made of them (each shard's file name and its documents' keys,
sources and token ids) with the code of commit c8771de, before prepare was made to stream.

    python tests/data/golden/make_golden.py   # only to re-create the golden set on purpose
"""
from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

import webdataset as wds
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

# name -> PrepareConfig options besides out and inputs (the tokenizer of "given_tokenizer" is
# the one "default" trained)
CASES = {
    "default": {"vocab_size": 300, "min_shards": 8, "val_fraction": 0.1, "workers": 1},
    "max_docs_val_fallback": {"vocab_size": 280, "min_shards": 4, "val_fraction": 0.001, "max_docs": 25,
                              "seed": 3, "workers": 1},
    "given_tokenizer_small_shards": {"min_shards": 3, "val_fraction": 0.2, "shard_max_mb": 0.002, "workers": 2,
                                     "tokenizer": "default/tokenizer.json"},
}


def make_inputs(root: Path) -> list[Path]:
    """A text directory (with an empty file and a repeated file) and a JSONL (with a blank line,
    a whitespace-only document, repeats and one text that is also a file)."""
    rng = random.Random(7)
    words = [f"w{i}" for i in range(40)] + ["def", "return", "(", ")", ":", "=", "é", "数据"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.choice([5, 30, 120, 400]))) + "\n" for _ in range(40)]
    text_dir = root / "text"
    text_dir.mkdir(parents=True)
    for i, t in enumerate(texts[:30]):
        (text_dir / f"d{i:02d}.txt").write_text(t, encoding="utf-8")
    (text_dir / "empty.txt").write_text("  \n")
    (text_dir / "z_copy.txt").write_text(texts[3], encoding="utf-8")
    rows = texts[25:40] + [texts[30], "   ", texts[31]]
    jsonl = root / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" + ("\n" if i == 4 else "") for i, t in enumerate(rows)),
                     encoding="utf-8")
    return [text_dir, jsonl]


def read_corpus(out: Path, input_root: Path) -> dict:
    """What a corpus holds, with input paths relative to `input_root`."""
    m = json.loads((out / "manifest.json").read_text())
    splits = {}
    for split, shards in m["splits"].items():
        splits[split] = [{"file": s["file"], "docs": list(read_shard_docs(out / s["file"], m["dtype"], input_root))}
                         for s in shards]
    return {"splits": splits, "totals": m["totals"], "duplicates_dropped": m["duplicates_dropped"],
            "dtype": m["dtype"], "vocab_size": m["tokenizer"]["vocab_size"],
            "tokenizer_sha256": hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()}


def read_shard_docs(path: Path, dtype: str, input_root: Path):
    np_dtype = "<u2" if dtype == "u16" else "<u4"
    for sample in wds.WebDataset(str(path), shardshuffle=False, nodesplitter=None, workersplitter=None):
        source = sample["source.txt"].decode()
        yield [sample["__key__"], source.replace(str(input_root) + "/", ""),
               np.frombuffer(sample[f"ids.{dtype}"], np_dtype).tolist()]


def main() -> None:
    import tempfile

    from data_pipeline.prepare_corpus import PrepareConfig, prepare

    inputs_dir = HERE / "prepare_inputs"
    if not inputs_dir.exists():
        make_inputs(inputs_dir)
    inputs = (str(inputs_dir / "text"), str(inputs_dir / "docs.jsonl"))
    expected = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, opts in CASES.items():
            opts = dict(opts)
            if "tokenizer" in opts:
                opts["tokenizer"] = Path(tmp) / opts["tokenizer"]
            prepare(PrepareConfig(out=Path(tmp) / name, inputs=inputs, **opts))
            expected[name] = read_corpus(Path(tmp) / name, inputs_dir)
    (HERE / "prepare_expected.json").write_text(json.dumps(expected, separators=(",", ":")))


if __name__ == "__main__":
    main()
