"""Corpora read from a URL: an http(s) base (a loopback server here), a pipe: command, brace
lists; the same samples and resume as the local copy; retries, broken and missing shards; the cache."""
from __future__ import annotations

import collections
import http.server
import json
import logging
import threading
from pathlib import Path

import pytest
import torch

from data_pipeline.errors import DataError
from data_pipeline.prepare_corpus import read_manifest
from data_pipeline.remote import fetch_tokenizer, parse_location
from data_pipeline.segment_stream import SegmentLoader

N, K = 8, 3


class CorpusServer:
    """Serves a corpus directory on 127.0.0.1 (port chosen by the OS), with faults on demand:
    `drops[name]` GETs of that file send half its body and close the connection (-1: every
    GET), `flips[name]` GETs send it whole with some bytes flipped, `missing` names answer 404.
    `hits` counts GETs per file."""

    def __init__(self, root: Path):
        self.root, self.drops, self.flips, self.missing = root, {}, {}, set()
        self.hits: collections.Counter = collections.Counter()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                name = self.path.lstrip("/")
                server.hits[name] += 1
                path = server.root / name
                if name in server.missing or not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if server.drops.get(name, 0):
                    server.drops[name] -= 1
                    data = data[:len(data) // 2]  # then HTTP/1.0 closes the connection: the body is short
                elif server.flips.get(name, 0):
                    server.flips[name] -= 1
                    data = data[:-600] + bytes(b ^ 0xFF for b in data[-600:-512]) + data[-512:]
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "CorpusServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """urllib honours http_proxy: a CI proxy must not stand between the loader and 127.0.0.1."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server(corpus):
    with CorpusServer(corpus) as s:
        yield s


def loader(data, split: str = "train", **kw) -> SegmentLoader:
    opts = {"segment_len": N, "n_segments": K, "micro_batch_size": 2, "seed": 7, "retry_backoff_s": 0.01, **kw}
    return SegmentLoader(data, split, **opts)


def take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def train_files(corpus: Path) -> list[str]:
    return [s["file"] for s in read_manifest(corpus)["splits"]["train"]]


# ------------------------------------------------------------------ the same samples
def test_http_corpus_gives_the_samples_of_its_local_copy(corpus, server):
    assert same_batches(take(loader(server.url), 12), take(loader(corpus), 12))
    assert same_batches(list(loader(server.url, "validation")), list(loader(corpus, "validation")))


def test_pipe_corpus_gives_the_samples_of_its_local_copy(corpus):
    assert same_batches(take(loader(f"pipe:cat {corpus}/{{name}}"), 12), take(loader(corpus), 12))


def test_mix_of_a_remote_and_a_local_corpus_blends_like_two_local_ones(corpus, server):
    from data_pipeline.segment_stream import MixedLoader

    def mixed(first):  # one corpus twice, two sources with their own cursors
        return MixedLoader([loader(first), loader(corpus, seed=8)], [0.5, 0.5], seed=3)

    assert same_batches(take(mixed(server.url), 8), take(mixed(corpus), 8))
    assert mixed(server.url).tokenizer_hash == read_manifest(corpus)["tokenizer"]["sha256"]


def test_http_corpus_resumes_a_local_run_exactly(corpus, server):
    expected = take(loader(corpus), 12)
    first = loader(corpus)
    take(first, 5)
    resumed = loader(server.url)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert same_batches(take(resumed, 7), expected[5:])


def test_relayout_moves_streams_between_remote_and_local_reads(corpus, server):
    """dp2 x micro-batch 2 over http, then one rank with micro-batch 4 through pipe:cat."""
    expected = take(loader(corpus, micro_batch_size=4), 9)
    halves = [loader(server.url, micro_batch_size=2, dp_rank=r, dp_size=2) for r in range(2)]
    for h in halves:
        take(h, 4)
    one = loader(f"pipe:cat {corpus}/{{name}}", micro_batch_size=4)
    one.load_state_dicts([json.loads(json.dumps(h.state_dict())) for h in halves])
    assert same_batches(take(one, 5), expected[4:])


def test_brace_list_reads_only_the_listed_shards(corpus, server):
    files = train_files(corpus)
    everything = f"{server.url}train-{{000000..{len(files) - 1:06d}}}.tar"
    assert parse_location(everything).template == server.url + "{name}"
    assert same_batches(take(loader(everything), 8), take(loader(corpus), 8))
    some = loader(f"{corpus}/train-{{000000..000003}}.tar", micro_batch_size=1)
    assert [s["file"] for s in some.shards] == files[:4]
    # the list names no validation shard: validation reads them all, as with the base
    assert same_batches(list(loader(everything, "validation")), list(loader(corpus, "validation")))
    with pytest.raises(DataError, match=r"names 1 shard\(s\) its manifest does not have.*train-999999.tar"):
        loader(f"{server.url}train-{{000000,999999}}.tar")


def test_tokenizer_is_fetched_and_checked_against_the_manifest(corpus, server):
    assert fetch_tokenizer(server.url) == (corpus / "tokenizer.json").read_bytes()
    server.root = corpus / "nowhere"  # manifest and tokenizer both 404 now
    with pytest.raises(DataError, match="manifest.json answered HTTP 404"):
        fetch_tokenizer(server.url)


@pytest.mark.parametrize("spec,manifest,shard", [
    ("/data/c", "/data/c/manifest.json", "/data/c/train-000001.tar"),
    ("https://h/c/", "https://h/c/manifest.json", "https://h/c/train-000001.tar"),
    ("https://h/c/{name}?sig=1", "https://h/c/manifest.json?sig=1", "https://h/c/train-000001.tar?sig=1"),
    ("pipe:aws s3 cp s3://b/c/{name} -", "pipe:aws s3 cp s3://b/c/manifest.json -",
     "pipe:aws s3 cp s3://b/c/train-000001.tar -"),
    ("pipe:aws s3 cp s3://b/c/train-{000000..000003}.tar -", "pipe:aws s3 cp s3://b/c/manifest.json -",
     "pipe:aws s3 cp s3://b/c/train-000001.tar -"),
])
def test_each_location_kind_names_the_manifest_and_shards_as_documented(spec, manifest, shard):
    loc = parse_location(spec)
    assert (loc.url("manifest.json"), loc.url("train-000001.tar")) == (manifest, shard)


def test_manifest_names_that_are_not_plain_paths_never_reach_a_shell():
    with pytest.raises(DataError, match="not a plain file name"):
        parse_location("pipe:cat /c/{name}").url("x.tar; rm -rf ~")


def test_pipe_location_without_a_name_slot_is_refused():
    with pytest.raises(DataError, match=r"pipe: command must say where the file name goes.*\{name\}"):
        parse_location("pipe:aws s3 cp s3://bucket/corpus/ -")


# ------------------------------------------------------------------ failures
def test_dropped_connection_is_retried_and_gives_the_same_samples(corpus, server, caplog):
    server.drops = {name: 1 for name in train_files(corpus)}  # every shard breaks once mid-body
    with caplog.at_level(logging.WARNING):
        batches = take(loader(server.url), 12)
    assert same_batches(batches, take(loader(corpus), 12))
    assert "IncompleteRead" in caplog.text and "retry 1 of 3" in caplog.text
    opened = [name for name in train_files(corpus) if server.hits[name]]
    assert opened and all(server.hits[name] == 2 for name in opened)  # each broken once, then read whole


def test_shard_that_arrives_damaged_is_fetched_again_with_checksums(corpus, server):
    first = train_files(corpus)[0]
    server.flips = {first: 1}
    streams = len(train_files(corpus))
    assert same_batches(take(loader(server.url, micro_batch_size=streams), 3),
                        take(loader(corpus, micro_batch_size=streams), 3))
    assert server.hits[first] == 2


def test_shard_that_never_downloads_is_skipped_without_checksums(corpus, server, caplog):
    broken = train_files(corpus)[0]
    server.drops = {broken: -1}
    ld = loader(server.url, verify_checksums=False, open_retries=2, micro_batch_size=len(train_files(corpus)))
    with caplog.at_level(logging.WARNING):
        take(ld, 3)
    assert server.hits[broken] == 3  # the first attempt and two retries
    assert ld.skipped_samples == read_manifest(corpus)["splits"]["train"][0]["documents"]
    assert ld.state_dict()["bad_files"] == [server.url + broken] and server.url + broken in caplog.text


def test_shard_that_never_downloads_is_refused_with_checksums(corpus, server):
    broken = train_files(corpus)[0]
    server.drops = {broken: -1}
    with pytest.raises(DataError, match=f"{server.url}{broken} could not be read.*after 2 attempts"):
        take(loader(server.url, open_retries=1, micro_batch_size=len(train_files(corpus))), 3)


def test_missing_shard_names_its_url(corpus, server):
    gone = train_files(corpus)[1]
    server.missing = {gone}
    with pytest.raises(DataError, match=f"shard {server.url}{gone} listed in the manifest is missing.*HTTP 404"):
        take(loader(server.url, micro_batch_size=len(train_files(corpus))), 3)
    assert server.hits[gone] == 1  # a 404 is not retried


def test_missing_manifest_names_its_url(tmp_path):
    with CorpusServer(tmp_path) as empty:
        with pytest.raises(DataError, match=f"{empty.url}manifest.json answered HTTP 404.*not a prepared corpus"):
            loader(empty.url)


# ------------------------------------------------------------------ cache
def cached(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.tar"))


def test_cache_serves_verified_copies_and_refetches_a_damaged_one(corpus, server, tmp_path):
    cache = tmp_path / "cache"
    streams = len(train_files(corpus))  # one per shard: the first batch opens them all
    expected = take(loader(server.url, cache_dir=cache, micro_batch_size=streams), 3)
    shard_gets = sum(server.hits[f] for f in train_files(corpus))
    assert len(cached(cache)) == shard_gets == streams
    cached(cache)[0].write_bytes(b"not a shard")
    again = take(loader(server.url, cache_dir=cache, micro_batch_size=streams), 3)
    assert same_batches(again, expected)
    assert sum(server.hits[f] for f in train_files(corpus)) == shard_gets + 1  # only the damaged copy
    assert cached(cache)[0].read_bytes() != b"not a shard"


def test_cache_stays_under_its_size_bound(corpus, server, tmp_path):
    sizes = sorted((corpus / f).stat().st_size for f in train_files(corpus))
    bound = sizes[-1] + sizes[-2]  # room for two shards at most
    ld = loader(server.url, cache_dir=tmp_path / "cache", cache_max_gb=bound / 2**30,
                micro_batch_size=len(train_files(corpus)))
    take(ld, 3)
    assert 1 <= len(cached(tmp_path / "cache")) <= 2
    assert sum(p.stat().st_size for p in cached(tmp_path / "cache")) <= bound
