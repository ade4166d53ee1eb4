"""The streaming prepare gives exactly what the in-memory prepare gave (tests/data/golden, made by
the code before the rewrite): the same shards, document ids, sources, tokens and tokenizer."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from data_pipeline.prepare_corpus import PrepareConfig, prepare

GOLDEN = Path(__file__).parent / "golden"
sys.path.insert(0, str(GOLDEN))
from make_golden import CASES, read_corpus  # noqa: E402

EXPECTED = json.loads((GOLDEN / "prepare_expected.json").read_text())
INPUTS = (str(GOLDEN / "prepare_inputs" / "text"), str(GOLDEN / "prepare_inputs" / "docs.jsonl"))


def run_case(name: str, tmp: Path, **extra) -> dict:
    opts = dict(CASES[name], **extra)
    if "tokenizer" in opts:
        tok_dir = tmp / "default"
        if not (tok_dir / "tokenizer.json").exists():
            prepare(PrepareConfig(out=tok_dir, inputs=INPUTS, **CASES["default"]))
        opts["tokenizer"] = tmp / opts["tokenizer"]
    prepare(PrepareConfig(out=tmp / name, inputs=INPUTS, **opts))
    return read_corpus(tmp / name, GOLDEN / "prepare_inputs")


@pytest.mark.parametrize("name", list(CASES))
def test_same_corpus_as_the_in_memory_prepare(name, tmp_path):
    got = run_case(name, tmp_path)
    want = EXPECTED[name]
    for key in ("totals", "duplicates_dropped", "dtype", "vocab_size", "tokenizer_sha256"):
        assert got[key] == want[key], key
    assert got["splits"] == want["splits"]


def test_a_sample_smaller_than_the_corpus_changes_only_the_tokenizer(tmp_path):
    """With --tokenizer-sample below the training text the BPE sees part of it; the documents,
    split and duplicates stay those of the golden corpus."""
    got = run_case("default", tmp_path, tokenizer_sample_mb=0.004)
    want = EXPECTED["default"]
    assert got["tokenizer_sha256"] != want["tokenizer_sha256"]
    keys = lambda c: {s: [d[:2] for sh in c["splits"][s] for d in sh["docs"]] for s in c["splits"]}  # noqa: E731
    assert keys(got) == keys(want) and got["duplicates_dropped"] == want["duplicates_dropped"]


def test_a_budget_below_every_document_still_trains_on_one(tmp_path):
    m = prepare(PrepareConfig(out=tmp_path / "o", inputs=INPUTS, tokenizer_sample_mb=1e-6, **CASES["default"]))
    assert m["tokenizer_sample"]["documents"] == 1 and m["tokenizer_sample"]["rate"] < 1e-3
    assert m["tokenizer"]["vocab_size"] > 258  # merges were learned: the sample was not empty
