"""`memgpt-prepare --scrub` wiring (issue 17 item 5): every document goes through
`data_pipeline.scrub.scrub_text` before dedup, the tokenizer and the shards; the counts per kind
are summed into the manifest and the summary; a found secret is never printed. The real scrubber
is another module (merged separately); here a stand-in with the same signature replaces it."""
from __future__ import annotations

import re
import sys
import types
from collections import Counter

import pytest
from tokenizers import Tokenizer

from data_pipeline.errors import DataError
from launch.prepare import main as prepare_main
from helpers import make_text_corpus, prepare_dir
from test_prepare import all_docs

KEYS = ["AKIAABCDEFGHIJKLMNOP", "AKIAQRSTUVWXYZ234567"]
EMAIL = "alice.secret@corp.example.org"
PATTERNS = {"aws_access_key": re.compile(r"AKIA[0-9A-Z]{16}"), "email": re.compile(r"[\w.]+@[\w.]+\.\w+")}


def stand_in_scrub_text(text: str) -> tuple[str, dict[str, int]]:
    counts = {}
    for kind, pattern in PATTERNS.items():
        text, n = pattern.subn(f"<{kind.upper()}>", text)
        if n:
            counts[kind] = n
    return text, counts


@pytest.fixture
def scrubber(monkeypatch):
    module = types.ModuleType("data_pipeline.scrub")
    module.scrub_text = stand_in_scrub_text
    monkeypatch.setitem(sys.modules, "data_pipeline.scrub", module)


@pytest.fixture
def src(tmp_path):
    root = make_text_corpus(tmp_path / "src", n_docs=10)
    (root / "a_key.txt").write_text(f"aws_access_key_id = {KEYS[0]}\nmail {EMAIL} or {EMAIL}\n")
    (root / "b_key.txt").write_text(f"aws_access_key_id = {KEYS[1]}\nmail {EMAIL} or {EMAIL}\n")  # same once scrubbed
    (root / "c_key.txt").write_text(f"backup key {KEYS[1]} here\n")
    return root


def texts(out) -> list[str]:
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    return [tok.decode(ids[:-1].tolist()) for ids in all_docs(out).values()]


def test_documents_are_scrubbed_before_dedup_tokenizer_and_shards(scrubber, src, tmp_path):
    out = tmp_path / "out"
    m = prepare_dir(src, out, val_fraction=0.0, min_shards=2, scrub=True)
    assert m["duplicates_dropped"] == 1  # a_key and b_key differ only in their secret
    assert m["scrubbed"] == {"aws_access_key": 2, "email": 2}  # of the documents kept: a_key and c_key
    corpus = texts(out)
    assert "aws_access_key_id = <AWS_ACCESS_KEY>\nmail <EMAIL> or <EMAIL>\n" in corpus
    assert "backup key <AWS_ACCESS_KEY> here\n" in corpus
    blob = "\n".join(corpus) + (out / "tokenizer.json").read_text() + (out / "manifest.json").read_text()
    assert not any(k in blob for k in KEYS) and EMAIL not in blob


def test_counts_are_summed_over_every_document(scrubber, src, tmp_path):
    m = prepare_dir(src, tmp_path / "out", val_fraction=0.0, min_shards=2, scrub=True)
    want = Counter()
    for p in sorted(src.iterdir()):
        if p.name != "b_key.txt":
            want.update(stand_in_scrub_text(p.read_text())[1])
    assert m["scrubbed"] == dict(want)


def test_the_summary_counts_kinds_and_never_prints_a_secret(scrubber, src, tmp_path, capsys):
    assert prepare_main([str(src), "--out", str(tmp_path / "out"), "--scrub", "--workers", "1",
                         "--vocab-size", "300", "--min-shards", "2"]) == 0
    out, err = capsys.readouterr()
    assert "scrubbed: 2 aws_access_key, 2 email" in out
    assert not any(k in out + err for k in KEYS) and EMAIL not in out + err


def test_no_scrub_is_the_default_and_leaves_text_alone(scrubber, src, tmp_path):
    out = tmp_path / "out"
    m = prepare_dir(src, out, val_fraction=0.0, min_shards=2)
    assert "scrubbed" not in m and m["duplicates_dropped"] == 0
    assert any(KEYS[0] in t for t in texts(out))


def test_scrub_without_the_module_says_what_to_do(monkeypatch, src, tmp_path):
    monkeypatch.setitem(sys.modules, "data_pipeline.scrub", None)  # as in a checkout without scrub.py
    with pytest.raises(DataError, match="--scrub needs data_pipeline/scrub.py.*--no-scrub"):
        prepare_dir(src, tmp_path / "out", scrub=True)
    assert not (tmp_path / "out").exists()

