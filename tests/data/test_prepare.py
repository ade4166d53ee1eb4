"""The prepare step: every input kind, the manifest's facts, the tokenizer, and bad input."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from data_pipeline.bpe_tokenizer import token_dtype
from data_pipeline.corpus_sources import stdlib_root
from data_pipeline.errors import DataError
from data_pipeline.prepare_corpus import PrepareConfig, prepare, read_manifest
from data_pipeline.segment_stream import read_shard
from helpers import bin_path, make_text_corpus, prepare_dir, run_cmd

TEXTS = [f"document {i}: " + " ".join(f"tok{(i * 7 + j) % 23}" for j in range(5 + 3 * i)) for i in range(12)]


def all_docs(data: Path, split: str = "train") -> dict[int, np.ndarray]:
    """doc id -> token ids of every document in a split, read back from the shards."""
    m = read_manifest(data)
    out = {}
    for s in m["splits"][split]:
        docs = read_shard(str(data / s["file"]), m["dtype"], s["documents"], s["sha256"])
        assert docs.error == "" and docs.skipped == 0
        out.update(zip(docs.doc_ids, docs.tokens))
    return out


def test_manifest_counts_hashes_and_command(corpus):
    m = read_manifest(corpus)
    assert m["dtype"] == "u16" and m["tokenizer"]["vocab_size"] <= 300
    assert len(m["splits"]["train"]) >= 8 and len(m["splits"]["validation"]) >= 1
    for split, shards in m["splits"].items():
        for s in shards:
            path = corpus / s["file"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == s["sha256"]
            docs = read_shard(str(path), m["dtype"], s["documents"], None)
            assert len(docs.tokens) == s["documents"]
            assert sum(len(t) for t in docs.tokens) == s["tokens"]
        assert m["totals"][split]["documents"] == sum(s["documents"] for s in shards)
    assert m["totals"]["train"]["documents"] + m["totals"]["validation"]["documents"] == 80
    tok_sha = hashlib.sha256((corpus / "tokenizer.json").read_bytes()).hexdigest()
    assert m["tokenizer"]["sha256"] == tok_sha and m["tokenizer"]["trained"] is True
    assert m["command"] and m["inputs"]


def test_tokens_decode_back_to_the_documents(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, t in enumerate(TEXTS):
        (src / f"{i:02d}.txt").write_text(t)
    prepare_dir(src, tmp_path / "out", val_fraction=0.0, min_shards=3)
    tok = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    docs = all_docs(tmp_path / "out")
    assert sorted(docs) == list(range(len(TEXTS)))
    for doc_id, ids in docs.items():
        assert ids[-1] == eos  # every document ends with EOS
        assert tok.decode(ids[:-1].tolist()) == TEXTS[doc_id]


def test_exact_duplicates_are_dropped_and_counted(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, t in enumerate(TEXTS + TEXTS[:3]):
        (src / f"{i:02d}.txt").write_text(t)
    m = prepare_dir(src, tmp_path / "out", val_fraction=0.0, min_shards=2)
    assert m["duplicates_dropped"] == 3
    assert m["totals"]["train"]["documents"] == len(TEXTS)


def test_split_is_deterministic_and_disjoint(corpus, tmp_path):
    again = tmp_path / "again"
    prepare_dir(corpus.parent / "text", again)
    for split in ("train", "validation"):
        assert all_docs(corpus, split).keys() == all_docs(again, split).keys()
    assert not all_docs(corpus, "train").keys() & all_docs(corpus, "validation").keys()


def _write_inputs(tmp_path: Path) -> dict[str, tuple[Path, dict]]:
    """The same 12 documents as every input kind prepare accepts."""
    import datasets

    ds = datasets.Dataset.from_dict({"body": TEXTS, "n": list(range(len(TEXTS)))})
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t}) + "\n" for t in TEXTS))
    parquet = tmp_path / "docs.parquet"
    ds.to_parquet(str(parquet))
    json_file = tmp_path / "docs.json"
    ds.to_json(str(json_file))
    saved = tmp_path / "saved"
    ds.save_to_disk(str(saved))
    return {"jsonl": (jsonl, {}), "parquet": (parquet, {}), "json": (json_file, {"format": "json"}),
            "save_to_disk": (saved, {})}


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "json", "save_to_disk"])
def test_every_input_kind_gives_the_same_documents(kind, tmp_path):
    path, kw = _write_inputs(tmp_path)[kind]
    prepare_dir(path, tmp_path / "out", text_field="body", val_fraction=0.0, min_shards=2, **kw)
    tok = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    docs = all_docs(tmp_path / "out")
    assert sorted(tok.decode(d[:-1].tolist()) for d in docs.values()) == sorted(TEXTS)


def test_text_file_through_datasets_is_one_document(tmp_path):
    f = tmp_path / "book.txt"
    f.write_text("line one\nline two\n")
    m = prepare(PrepareConfig(out=tmp_path / "out", inputs=(str(f),), format="text", vocab_size=280,
                              val_fraction=0.0, min_shards=1, workers=1))
    assert m["totals"]["train"]["documents"] == 1


def test_default_corpus_is_the_standard_library(tmp_path):
    m = prepare(PrepareConfig(out=tmp_path / "out", max_docs=12, vocab_size=400, min_shards=4, workers=1))
    assert m["inputs"] == ["<default: python stdlib sources>"]
    assert m["totals"]["train"]["documents"] + m["totals"]["validation"]["documents"] == 12
    assert stdlib_root().joinpath("os.py").is_file()
    first = read_manifest(tmp_path / "out")["splits"]["train"][0]
    import webdataset as wds

    sample = next(iter(wds.WebDataset(str(tmp_path / "out" / first["file"]), shardshuffle=False,
                                      nodesplitter=None, workersplitter=None)))
    assert sample["source.txt"].decode().startswith("stdlib/")


def test_given_tokenizer_is_reused_and_parallel_encoding_matches(corpus, tmp_path):
    out = tmp_path / "reuse"
    m = prepare_dir(corpus.parent / "text", out, tokenizer=corpus / "tokenizer.json", workers=2)
    assert m["tokenizer"]["trained"] is False
    assert m["tokenizer"]["sha256"] == read_manifest(corpus)["tokenizer"]["sha256"]
    a, b = all_docs(corpus), all_docs(out)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_shards_are_the_files_webdatasets_writer_wrote(tmp_path, monkeypatch):
    """ShardTarWriter (stdlib tarfile, so prepare does not import torch) writes byte for byte the
    shards webdataset's ShardWriter wrote before, rollover by count and by size included."""
    import time

    import webdataset as wds

    from data_pipeline.prepare_corpus import ShardTarWriter

    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.25)  # both stamp every member with time.time()
    samples = [(f"doc{i:09d}", bytes(range(i % 200)) * 3, f"src/{i}.py".encode()) for i in range(60)]
    ref = wds.ShardWriter(str(tmp_path / "ref-%06d.tar"), maxcount=7, maxsize=500, verbose=0)
    ours = ShardTarWriter(tmp_path, "ours", 7, 500)
    for key, ids, src in samples:
        ref.write({"__key__": key, "ids.u16": ids, "source.txt": src, "mask.u8": ids[:3]})
        ours.write(key, {"ids.u16": ids, "source.txt": src, "mask.u8": ids[:3]})
    ref.close()
    ours.close()
    a, b = sorted(tmp_path.glob("ref-*.tar")), sorted(tmp_path.glob("ours-*.tar"))
    assert len(a) == len(b) > 2 and [f.read_bytes() for f in a] == [f.read_bytes() for f in b]


def test_member_headers_are_tarfiles_own():
    """ShardTarWriter builds its headers itself (tarfile's were most of the shard writing's time);
    they are tarfile's bytes for any name, size and float mtime, non-ASCII and long names (which go
    through tarfile) included."""
    import random
    import tarfile

    from data_pipeline.prepare_corpus import _fast_header, tar_header, tarfile_header

    rng = random.Random(0)
    names = [f"doc{i:09d}.{ext}" for i in range(0, 10**9, 9_999_991) for ext in ("ids.u16", "source.txt")]
    names += ["dóc000000001.ids.u16", "d" * 101 + ".ids.u16"]
    for name in names:
        size = rng.choice([0, 1, 511, 512, 513, rng.randrange(8**11)])
        mtime = rng.choice([rng.uniform(1, 8**11 - 1), 1_700_000_000.25, 2.5, 99_999.5])
        assert tar_header(name, size, mtime) == tarfile_header(name, size, mtime), (name, size, mtime)
        if name.isascii() and len(name) <= 100:
            assert _fast_header(name, size, mtime) == tarfile_header(name, size, mtime)
    assert tarfile.BLOCKSIZE == 512


def test_token_dtype_widens_for_large_vocabularies():
    assert token_dtype(50_257) == np.dtype("<u2") and token_dtype(65_536) == np.dtype("<u4")


# ------------------------------------------------------------------ bad input
def test_missing_input_names_the_path(tmp_path):
    with pytest.raises(DataError, match="nowhere.*does not exist"):
        prepare_dir(tmp_path / "nowhere", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_empty_corpus_is_an_error(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("   \n")
    with pytest.raises(DataError, match="no non-empty documents"):
        prepare_dir(src, tmp_path / "out")


def test_jsonl_without_the_text_field_names_the_field(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:1 has no field 'text'.*--text-field.*content"):
        prepare_dir(f, tmp_path / "out")


def test_bad_tokenizer_file_is_named(tmp_path):
    with pytest.raises(DataError, match="tokenizer .*missing.json not found"):
        prepare_dir(make_text_corpus(tmp_path / "t", n_docs=5), tmp_path / "out", tokenizer=tmp_path / "missing.json")


def test_existing_corpus_is_never_overwritten_silently(corpus, tmp_path):
    before = {p.name: p.read_bytes() for p in corpus.iterdir()}
    with pytest.raises(DataError, match="--overwrite"):
        prepare_dir(corpus.parent / "text", corpus)
    assert {p.name: p.read_bytes() for p in corpus.iterdir()} == before


def test_cli_reports_errors_with_exit_code_2(tmp_path):
    proc = run_cmd([bin_path("memgpt-prepare"), str(tmp_path / "nope"), "--out", str(tmp_path / "o")], check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: input") and "nope" in proc.stderr
    assert "Traceback" not in proc.stderr
