"""What memgpt-prepare does with careless commands and awkward files (issue 13 items 1, 6 and 11,
issue 17 item 7): --overwrite never destroys what it did not write, undecodable files are
counted and named under a chosen policy, a huge one-line document is tokenized in bounded pieces,
and the summary says what was skipped and when the vocabulary came out smaller than asked."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from data_pipeline.bpe_tokenizer import safe_pieces
from data_pipeline.errors import DataError
from data_pipeline.prepare_encode import encode_texts
from helpers import make_text_corpus, prepare_dir
from launch.prepare import main as prepare_main

LATIN1 = "café au lait, déjà vu\n".encode("latin-1")


# ------------------------------------------------------------------ --overwrite (13.1)
def test_overwrite_refuses_an_out_that_is_the_input(tmp_path):
    src = make_text_corpus(tmp_path / "src", n_docs=6)
    before = sorted(p.name for p in src.iterdir())
    with pytest.raises(DataError, match="is or contains the input"):
        prepare_dir(src, src, overwrite=True)
    with pytest.raises(DataError, match="is or contains the input"):
        prepare_dir(src, tmp_path, overwrite=True)  # tmp_path contains src
    assert sorted(p.name for p in src.iterdir()) == before


def test_a_directory_that_is_no_corpus_is_never_offered_for_overwrite(tmp_path):
    src = make_text_corpus(tmp_path / "src", n_docs=6)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"\xff\xd8")
    for overwrite in (False, True):
        with pytest.raises(DataError, match="holds no corpus made by memgpt-prepare") as err:
            prepare_dir(src, other, overwrite=overwrite)
        assert "--overwrite" not in str(err.value)
    assert (other / "holiday.jpg").read_bytes() == b"\xff\xd8"


def test_overwrite_replaces_only_the_corpus_files(tmp_path):
    src = make_text_corpus(tmp_path / "src", n_docs=12)
    out = tmp_path / "out"
    prepare_dir(src, out, min_shards=4)
    (out / "NOTES.md").write_text("mine")
    (out / "train-mine.tar").write_bytes(b"a user's own archive, named like a shard")
    (out / "train-000003.tar").unlink()  # a different shard layout this time must not leave stale shards
    m = prepare_dir(src, out, min_shards=2, overwrite=True)
    assert (out / "NOTES.md").read_text() == "mine"
    assert (out / "train-mine.tar").read_bytes() == b"a user's own archive, named like a shard"
    shards = sorted(p.name for p in out.glob("*.tar") if p.name != "train-mine.tar")
    assert shards == sorted(s["file"] for split in m["splits"].values() for s in split)


def test_overwrite_never_deletes_a_file_a_hand_edited_manifest_names(tmp_path):
    src = make_text_corpus(tmp_path / "src", n_docs=12)
    out = tmp_path / "out"
    prepare_dir(src, out, min_shards=2)
    (out / "NOTES.md").write_text("mine")
    (tmp_path / "elsewhere.tar").write_text("mine too")
    m = json.loads((out / "manifest.json").read_text())
    m["splits"]["train"] += [{"file": "NOTES.md"}, {"file": "../elsewhere.tar"}]
    (out / "manifest.json").write_text(json.dumps(m))
    prepare_dir(src, out, min_shards=2, overwrite=True)
    assert (out / "NOTES.md").read_text() == "mine" and (tmp_path / "elsewhere.tar").read_text() == "mine too"


# ------------------------------------------------------------------ decoding (13.6)
def mixed_dir(tmp_path: Path) -> Path:
    src = make_text_corpus(tmp_path / "src", n_docs=6)
    for i in range(3):
        (src / f"latin{i}.txt").write_bytes(LATIN1 * (i + 1))
    return src


def test_undecodable_files_are_skipped_counted_and_named(tmp_path):
    m = prepare_dir(mixed_dir(tmp_path), tmp_path / "out", val_fraction=0.0, min_shards=2)
    assert m["totals"]["train"]["documents"] == 6
    assert m["skipped"]["decode_error"] == 3
    assert [Path(p).name for p in m["skipped_examples"]["decode_error"]] == ["latin0.txt", "latin1.txt", "latin2.txt"]


def test_the_right_encoding_reads_them(tmp_path):
    m = prepare_dir(mixed_dir(tmp_path), tmp_path / "out", val_fraction=0.0, min_shards=2, encoding="latin-1")
    assert m["totals"]["train"]["documents"] == 9 and "decode_error" not in m["skipped"]


def test_replace_keeps_the_document(tmp_path):
    out = tmp_path / "out"
    m = prepare_dir(mixed_dir(tmp_path), out, val_fraction=0.0, min_shards=2, on_decode_error="replace")
    assert m["totals"]["train"]["documents"] == 9 and m["skipped"]["decode_replaced"] == 3


def test_fail_names_the_file_and_the_byte(tmp_path):
    with pytest.raises(DataError, match=r"latin0.txt: byte 3 is not valid utf-8.*--encoding"):
        prepare_dir(mixed_dir(tmp_path), tmp_path / "out", on_decode_error="fail")


def test_a_latin1_line_in_jsonl_is_skipped_not_a_crash(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b"".join(json.dumps({"text": f"row {i} " * 20}).encode() + b"\n" for i in range(8))
                  + b'{"text": "caf\xe9"}\n')
    m = prepare_dir(f, tmp_path / "out", val_fraction=0.0, min_shards=2)
    assert m["totals"]["train"]["documents"] == 8 and m["skipped_examples"]["decode_error"] == [f"{f}:9"]


def test_only_undecodable_files_says_why(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(LATIN1)
    with pytest.raises(DataError, match="no non-empty documents") as err:
        prepare_dir(src, tmp_path / "out")
    assert "decode" in str(err.value) and "a.txt" in str(err.value) and "--encoding" in str(err.value)


def test_an_unknown_encoding_is_refused_before_reading(tmp_path):
    with pytest.raises(DataError, match="--encoding 'klingon' is not an encoding"):
        prepare_dir(make_text_corpus(tmp_path / "src", n_docs=3), tmp_path / "out", encoding="klingon")


# ------------------------------------------------------------------ the summary (17.7)
def test_summary_names_skips_by_reason_and_warns_of_a_small_vocabulary(tmp_path, capsys):
    src = mixed_dir(tmp_path)
    (src / "blank.txt").write_text("  \n")
    rc = prepare_main([str(src), "--out", str(tmp_path / "out"), "--vocab-size", "32000", "--workers", "1",
                       "--min-shards", "2"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "skipped: 3 decode_error, 1 empty" in out
    assert "warning: 3 document(s) skipped as decode_error, e.g." in err and "latin0.txt" in err
    vocab = json.loads((tmp_path / "out" / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    assert f"warning: the trained vocabulary has {vocab:,} tokens, fewer than --vocab-size 32,000" in err


def test_no_vocabulary_warning_when_it_is_reached(tmp_path, capsys):
    assert prepare_main([str(make_text_corpus(tmp_path / "src", n_docs=20)), "--out", str(tmp_path / "out"),
                         "--vocab-size", "270", "--workers", "1", "--min-shards", "2"]) == 0
    assert "vocabulary" not in capsys.readouterr().err


# ------------------------------------------------------------------ one huge line (13.11)
AWKWARD = "x = f(a,  b)\t# comment  \n\n   indented 123 4567 éé 数据 'quoted' it's done;;  \r\n" \
          "   <|endoftext|> tail   "


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    out = tmp_path_factory.mktemp("tok") / "corpus"
    src = make_text_corpus(out.parent / "src", n_docs=20)
    (src / "awkward.txt").write_text(AWKWARD * 20)
    prepare_dir(src, out)
    return Tokenizer.from_file(str(out / "tokenizer.json"))


def test_pieces_of_a_long_text_tokenize_like_the_whole(tok):
    text = (AWKWARD + " ".join(f"w{i}" for i in range(50))) * 300
    pieces = list(safe_pieces(text, max_chars=500))
    assert len(pieces) > 10 and "".join(pieces) == text and max(map(len, pieces)) <= 600
    whole = tok.encode(text).ids
    assert [i for e in tok.encode_batch(pieces) for i in e.ids] == whole
    eos = tok.token_to_id("<|endoftext|>")
    got = next(encode_texts(tok, [text], workers=1, piece_chars=500))
    import numpy as np

    assert np.frombuffer(got, "<u2").tolist() == whole + [eos]


def test_a_text_without_spaces_is_left_whole(tok):
    assert list(safe_pieces("a" * 5000, max_chars=100)) == ["a" * 5000]


def test_threads_give_every_text_its_ids_in_order(tok):
    """encode_texts (prepare's tokenizer path: threads, encode_batch_fast) returns, in input order,
    what the plain single-text encode gives, plus EOS; chunks cut by count and by size."""
    import numpy as np

    texts = [AWKWARD[: 1 + i % len(AWKWARD)] * (1 + i % 7) for i in range(300)]
    eos = tok.token_to_id("<|endoftext|>")
    got = list(encode_texts(tok, iter(texts), workers=3, chunk=16, chunk_bytes=2000))
    assert [np.frombuffer(g, "<u2").tolist() for g in got] == [tok.encode(t).ids + [eos] for t in texts]
