"""The loader: per-rank shard assignment, sample layout, exact resume and damaged shards."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.errors import DataError
from data_pipeline.prepare_corpus import read_manifest
from data_pipeline.segment_stream import IGNORE, SegmentLoader, read_shard

N, K = 8, 3


def loader(data: Path, split: str = "train", **kw) -> SegmentLoader:
    opts = {"segment_len": N, "n_segments": K, "micro_batch_size": 2, "seed": 7, **kw}
    return SegmentLoader(data, split, **opts)


def take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def shard_docs(data: Path, split: str = "train") -> dict[int, np.ndarray]:
    m = read_manifest(data)
    out = {}
    for s in m["splits"][split]:
        d = read_shard(str(data / s["file"]), m["dtype"], s["documents"], None)
        out.update(zip(d.doc_ids, d.tokens))
    return out


# ------------------------------------------------------------------ assignment across ranks
@pytest.mark.parametrize("dp_size,mb", [(1, 1), (2, 2), (4, 2)])
def test_streams_read_disjoint_shards_that_cover_the_split(corpus, dp_size, mb):
    n_shards = len(read_manifest(corpus)["splits"]["train"])
    for epoch in (0, 1):
        plans = [loader(corpus, dp_rank=r, dp_size=dp_size, micro_batch_size=mb)._plan(g, epoch)
                 for r in range(dp_size) for g in range(r * mb, (r + 1) * mb)]
        shards = [s for plan in plans for s, _, _ in plan]
        assert sorted(shards) == list(range(n_shards))  # every shard once: disjoint and covering


def test_ranks_see_disjoint_documents(corpus):
    seen = []
    for rank in range(2):
        batches = take(loader(corpus, dp_rank=rank, dp_size=2), 6)
        seen.append({int(d) for b in batches for d in b["doc_ids"].flatten()})
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_one_epoch_of_one_stream_covers_every_train_document_once(corpus):
    ld = loader(corpus, micro_batch_size=1)
    docs, order = shard_docs(corpus), []
    while ld.cursors[0].epoch == 0:
        b = next(ld)
        for doc, reset in zip(b["doc_ids"][0].tolist(), b["reset"][0].tolist()):
            if reset and ld.cursors[0].epoch == 0:
                order.append(doc)
    assert sorted(order) == sorted(docs)


def test_data_parallel_size_does_not_change_the_streams(corpus):
    """dp=1 with micro-batch 4 reads exactly the rows of dp=2 with micro-batch 2."""
    whole = take(loader(corpus, micro_batch_size=4), 8)
    halves = [take(loader(corpus, dp_rank=r, dp_size=2, micro_batch_size=2), 8) for r in range(2)]
    for i in range(8):
        for key in ("input_ids", "labels", "reset", "doc_ids"):
            assert torch.equal(whole[i][key], torch.cat([halves[0][i][key], halves[1][i][key]])), (i, key)


def test_seed_decides_the_order_reproducibly(corpus):
    assert same_batches(take(loader(corpus), 5), take(loader(corpus), 5))
    assert not same_batches(take(loader(corpus), 5), take(loader(corpus, seed=8), 5))


# ------------------------------------------------------------------ sample layout
def test_samples_rebuild_the_documents_with_masked_padding_and_resets(corpus):
    docs, ld = shard_docs(corpus), loader(corpus)
    rebuilt: dict[tuple[int, int], list[int]] = {}
    for b in take(ld, 30):
        assert b["input_ids"].shape == (2, K * N) and b["reset"].shape == (2, K)
        inp = b["input_ids"].view(2, K, N)  # (mb, K, N)
        lab = b["labels"].view(2, K, N)
        for row in range(2):
            for k in range(K):
                doc, x, y = int(b["doc_ids"][row, k]), inp[row, k], lab[row, k]
                valid = y != IGNORE
                n = int(valid.sum())
                assert valid[:n].all(), "padding only at the end of a segment"
                assert torch.equal(x[1:n], y[:n - 1]), "labels are inputs shifted by one"
                tail = x[n:]  # the document's final EOS is an input without a target, then padding
                assert (tail[1:] == ld.pad_id).all() and (tail[:1] == ld.pad_id).logical_or(tail[:1] == ld.eos_id).all()
                if k > 0 and int(b["doc_ids"][row, k - 1]) != doc:
                    assert b["reset"][row, k], "a new document always resets the memory"
                key = (row, doc)
                if b["reset"][row, k]:
                    rebuilt[key] = []
                rebuilt.setdefault(key, []).extend(x[:n].tolist())
                if y[n - 1] == ld.eos_id:  # last segment of its document: compare whole document
                    assert rebuilt[key] + [ld.eos_id] == docs[doc].tolist()
    assert rebuilt


# ------------------------------------------------------------------ exact resume
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_batches_an_uninterrupted_run_sees(corpus, workers):
    ref = loader(corpus, num_workers=workers)
    expected = take(ref, 12)
    first = loader(corpus, num_workers=workers)
    take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint
    first.close()
    resumed = loader(corpus, num_workers=workers)
    resumed.load_state_dict(state)
    assert same_batches(take(resumed, 7), expected[5:])
    ref.close()
    resumed.close()


def test_resume_with_another_layout_is_refused(corpus):
    state = loader(corpus).state_dict()
    with pytest.raises(DataError, match="n_streams=2 but this run has 1.*micro_batch_size"):
        loader(corpus, micro_batch_size=1).load_state_dict(state)
    with pytest.raises(DataError, match="model.segment_len"):
        loader(corpus, segment_len=N * 2).load_state_dict(state)


def test_validation_is_one_finite_pass_over_every_document(corpus):
    docs, seen = shard_docs(corpus, "validation"), set()
    for b in loader(corpus, "validation"):
        seen |= {int(d) for d in b["doc_ids"].flatten() if d >= 0}
    assert seen == set(docs)


# ------------------------------------------------------------------ bad input
def _copy_with_truncated_shard(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    shard = dst / read_manifest(dst)["splits"]["train"][0]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 3])
    return shard


def test_checksum_mismatch_names_the_shard(big_corpus, tmp_path):
    shard = _copy_with_truncated_shard(big_corpus, tmp_path / "c")
    with pytest.raises(DataError, match=f"{shard.name}.*sha256"):
        take(loader(tmp_path / "c", micro_batch_size=8), 40)


def test_damaged_shard_is_skipped_with_a_counter(big_corpus, tmp_path, caplog):
    shard = _copy_with_truncated_shard(big_corpus, tmp_path / "c")
    ld = loader(tmp_path / "c", verify_checksums=False, max_skip_fraction=0.5, micro_batch_size=8)
    with caplog.at_level(logging.WARNING):
        take(ld, 40)
    assert ld.skipped_samples > 0
    assert shard.name in caplog.text
    assert ld.state_dict()["skipped_samples"] == ld.skipped_samples


def test_too_many_skipped_samples_fail_the_run(big_corpus, tmp_path):
    shard = _copy_with_truncated_shard(big_corpus, tmp_path / "c")
    ld = loader(tmp_path / "c", verify_checksums=False, micro_batch_size=8)
    with pytest.raises(DataError, match=f"max_skip_fraction.*{shard.name}"):
        take(ld, 200)


def test_missing_corpus_manifest_and_shard_are_named(corpus, tmp_path):
    with pytest.raises(DataError, match="does not exist.*memgpt-prepare"):
        loader(tmp_path / "nothing")
    shutil.copytree(corpus, tmp_path / "c")
    (tmp_path / "c" / "manifest.json").unlink()
    with pytest.raises(DataError, match="manifest.json is missing"):
        loader(tmp_path / "c")
    shutil.copytree(corpus, tmp_path / "d")
    gone = tmp_path / "d" / read_manifest(corpus)["splits"]["train"][2]["file"]
    gone.unlink()
    with pytest.raises(DataError, match=f"{gone.name}.*missing"):
        loader(tmp_path / "d")


def test_tokenizer_mismatch_is_an_error(corpus):
    with pytest.raises(DataError, match="tokenizer mismatch"):
        loader(corpus, expected_tokenizer_hash="0" * 64)
    loader(corpus, expected_tokenizer_hash=read_manifest(corpus)["tokenizer"]["sha256"])


def test_more_streams_than_shards_names_the_fix(corpus):
    with pytest.raises(DataError, match="--min-shards"):
        loader(corpus, dp_size=8, micro_batch_size=4)


# ------------------------------------------------------------------ mixing corpora
@pytest.fixture(scope="module")
def recall_corpus(corpus, tmp_path_factory):
    """A recall task corpus made with the text corpus's tokenizer, so the two can be mixed."""
    from data_pipeline.prepare_tasks import prepare_task
    from data_pipeline.tasks import TaskSpec

    out = tmp_path_factory.mktemp("mix") / "recall"
    prepare_task(out, TaskSpec("recall", segment_len=N, gap=K - 2, pairs=2), n_train=400, n_val=8, min_shards=8,
                 tokenizer=corpus / "tokenizer.json", filler_corpus=corpus)
    return out


def mixed(corpus, recall_corpus, **kw):
    from data_pipeline.segment_stream import MixedLoader

    return MixedLoader([loader(corpus, **kw), loader(recall_corpus, **kw)], [0.75, 0.25], seed=3)


def test_mix_draws_each_source_by_weight(corpus, recall_corpus):
    rows = [b["labels"][r] for b in take(mixed(corpus, recall_corpus, micro_batch_size=4), 50) for r in range(4)]
    task_rows = sum(int((row != IGNORE).sum()) == 2 for row in rows)  # a recall sample supervises 2 values
    assert 0.15 < task_rows / len(rows) < 0.35  # weight 0.25 over 200 draws


def test_mix_resumes_exactly_and_ignores_dp(corpus, recall_corpus):
    ref = take(mixed(corpus, recall_corpus, micro_batch_size=4), 10)
    first = mixed(corpus, recall_corpus, micro_batch_size=4)
    take(first, 4)
    again = mixed(corpus, recall_corpus, micro_batch_size=4)
    again.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert same_batches(take(again, 6), ref[4:])
    halves = [take(mixed(corpus, recall_corpus, dp_rank=r, dp_size=2), 10) for r in range(2)]
    for i in range(10):
        assert torch.equal(ref[i]["input_ids"], torch.cat([halves[0][i]["input_ids"], halves[1][i]["input_ids"]]))


def test_mixing_corpora_with_different_tokenizers_is_refused(corpus, big_corpus):
    from data_pipeline.segment_stream import MixedLoader

    with pytest.raises(DataError, match="different tokenizers"):
        MixedLoader([loader(corpus), loader(big_corpus)], [0.5, 0.5], seed=0)


def test_growing_k_continues_the_same_segment_stream(corpus):
    """K curriculum: changing segments per sample only re-cuts the stream, never skips or repeats."""
    one = take(loader(corpus, n_segments=1), 6)
    grown = loader(corpus, n_segments=2)
    parts = [next(grown)]
    grown.set_n_segments(4)
    parts.append(next(grown))
    assert parts[1]["input_ids"].shape == (2, 4 * N)
    seq = torch.cat([p["input_ids"].view(2, -1, N) for p in parts], dim=1)  # (mb, 6, N)
    assert torch.equal(seq, torch.stack([b["input_ids"] for b in one], dim=1))


def _rewrite_shard_with(src: Path, dst: Path, damage: str) -> Path:
    """Copy the corpus and rewrite its first train shard with its second document damaged:
    'bad-member' drops the token member, 'undecodable' cuts its token bytes to an odd length."""
    import tarfile
    import webdataset as wds

    shutil.copytree(src, dst)
    m = read_manifest(dst)
    shard = dst / m["splits"]["train"][0]["file"]
    samples = list(wds.WebDataset(str(shard), shardshuffle=False, empty_check=False, seed=0))
    key = f"ids.{m['dtype']}"
    victim = samples[1]
    if damage == "bad-member":
        victim["txt"] = victim.pop(key)
    else:
        victim[key] = victim[key][:-1]
    with wds.TarWriter(str(shard)) as out:
        for s in samples:
            out.write({k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")})
    assert tarfile.is_tarfile(shard)
    return shard


def victim_id(shard: Path) -> int:
    import webdataset as wds

    return int(list(wds.WebDataset(str(shard), shardshuffle=False, empty_check=False, seed=0))[1]["__key__"][3:])


@pytest.mark.parametrize("damage", ["bad-member", "undecodable"])
def test_bad_member_or_undecodable_sample_is_skipped_deterministically(big_corpus, tmp_path, damage):
    shard = _rewrite_shard_with(big_corpus, tmp_path / "c", damage)
    first = loader(tmp_path / "c", verify_checksums=False, max_skip_fraction=0.5, micro_batch_size=8)
    batches = take(first, 30)
    assert first.skipped_samples == 1 and str(shard) in first.state_dict()["bad_files"]  # that document alone
    docs = {int(d) for b in batches for d in b["doc_ids"].flatten() if d >= 0}
    assert victim_id(shard) not in docs and len(shard_docs(tmp_path / "c")) == len(shard_docs(big_corpus)) - 1
    again = loader(tmp_path / "c", verify_checksums=False, max_skip_fraction=0.5, micro_batch_size=8)
    assert same_batches(take(again, 30), batches) and again.skipped_samples == first.skipped_samples
    # and a loader restored mid-way continues identically
    resumed = loader(tmp_path / "c", verify_checksums=False, max_skip_fraction=0.5, micro_batch_size=8)
    mid = loader(tmp_path / "c", verify_checksums=False, max_skip_fraction=0.5, micro_batch_size=8)
    take(mid, 10)
    resumed.load_state_dict(mid.state_dict())
    assert same_batches(take(resumed, 20), batches[10:])


def test_token_ids_past_the_vocabulary_skip_their_document(big_corpus, tmp_path, caplog):
    """Flipped bytes in a token payload, checksums off: the document is skipped, counted and its
    shard named, instead of an IndexError in the embedding far from here."""
    import tarfile

    shutil.copytree(big_corpus, tmp_path / "c")
    m = read_manifest(tmp_path / "c")
    shard = tmp_path / "c" / m["splits"]["train"][0]["file"]
    with tarfile.open(shard) as tf:
        member = [x for x in tf.getmembers() if x.name.endswith(f".ids.{m['dtype']}")][1]
    raw = bytearray(shard.read_bytes())
    raw[member.offset_data:member.offset_data + 2] = b"\xff\xff"  # token id 65535 in the 2nd document
    shard.write_bytes(bytes(raw))
    ld = loader(tmp_path / "c", verify_checksums=False, max_skip_fraction=0.5, micro_batch_size=8)
    with caplog.at_level(logging.WARNING):
        batches = take(ld, 30)
    assert ld.skipped_samples == 1 and shard.name in caplog.text and "vocabulary size" in caplog.text
    assert max(int(b["input_ids"].max()) for b in batches) < ld.vocab_size
    assert victim_id(shard) not in {int(d) for b in batches for d in b["doc_ids"].flatten()}
