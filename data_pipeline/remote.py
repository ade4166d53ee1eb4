"""Where a prepared corpus lives and how its files are read: a local directory, an http(s) base
URL or a `pipe:` command (the URL forms webdataset opens), with bounded retries and an optional
size-bounded cache of verified shards.

How a location names the corpus's files (NAME is a file name from manifest.json):

    /data/corpus                             /data/corpus/NAME
    https://host/corpus/   (slash optional)  https://host/corpus/NAME
    https://host/corpus/{name}?X-Sig=...     {name} replaced by NAME (signed URLs)
    pipe:aws s3 cp s3://bucket/corpus/{name} -
                                             the command with {name} replaced by NAME; it writes
                                             the file to stdout (a pipe: location must say {name})

`manifest.json` (and `tokenizer.json`) are NAMEs like any shard, so they are read from the same
place. A brace-expanded list in the file-name slot, e.g.
`https://host/corpus/train-{000000..000127}.tar` or
`pipe:aws s3 cp s3://bucket/corpus/train-{000000..000127}.tar -`, means the base with `{name}` in
that slot, reading only the listed shards of each split (each must be in the manifest; a split
the list names no shard of is read whole, so validation still works beside a train list).
Manifest file names are checked to be plain relative paths (letters, digits, `._-/`, no `..`)
before one is put into a shell command.

Reading. A file is read whole into memory (the loader verifies a shard's sha256 before it uses
any of it). A failed read (for a verified remote shard also bytes that do not match its sha256:
a transfer can be cut short without an error) is retried `retries` times, waiting backoff_s,
2*backoff_s, 4*backoff_s... between attempts; a missing file (HTTP 4xx, no such local file) is
not retried. http(s) goes through urllib rather than webdataset's curl pipe, so a 404 is told
apart from a dropped connection and no curl binary is needed; `pipe:` runs the command with the
shell, as webdataset does, keeping its stderr for the error message.

Cache. With a cache directory, a remote shard whose bytes match the manifest's sha256 is kept as
`<sha256>.tar` (content-addressed, so ranks of one node share it safely); a cached copy is
re-verified on every reuse and fetched again if it no longer matches. Least recently used files
(by mtime, touched on reuse) are evicted past `max_bytes`.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from braceexpand import braceexpand

from data_pipeline.errors import DataError

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
_SLOT_END = " \t\n/'\""  # what ends the file-name slot around a brace list
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*")  # no "..", no shell


class FetchError(DataError):
    """A file of a corpus could not be read; `permanent` when retrying cannot help (it is missing)."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class FetchPolicy:
    """How hard to try to read one file."""

    retries: int = 3  # further attempts after a failed one
    backoff_s: float = 1.0  # wait before retry i (0-based): backoff_s * 2**i
    timeout_s: float = 300.0  # per attempt (connect and read)


@dataclass(frozen=True)
class CorpusLocation:
    """A corpus's place: `template` holds `{name}` where a file name goes."""

    spec: str  # as the user wrote it (for messages)
    kind: str  # "local", "http" or "pipe"
    template: str
    selected: Optional[tuple[str, ...]] = None  # shard names of a brace list; None: every shard

    @property
    def is_remote(self) -> bool:
        return self.kind != "local"

    def url(self, name: str) -> str:
        """Where file `name` of the corpus is read from (a path for a local corpus)."""
        if self.kind == "pipe" and not _PLAIN_NAME.fullmatch(name):
            raise DataError(f"file name {name!r} in the manifest of {self.spec} is not a plain file name; "
                            f"refusing to put it into a pipe: command (re-run memgpt-prepare)")
        return self.template.replace("{name}", name)


def parse_location(spec: str | Path) -> CorpusLocation:
    """The CorpusLocation of `data.path` or a `data.mix` entry (see the module docstring)."""
    spec = str(spec)
    kind = "pipe" if spec.startswith("pipe:") else "http" if spec.startswith(("http://", "https://")) else "local"
    if "{name}" in spec:
        return CorpusLocation(spec, kind, spec)
    slot = _brace_slot(spec)
    if slot is not None:
        start, end = slot
        names = tuple(braceexpand(spec[start:end]))
        return CorpusLocation(spec, kind, spec[:start] + "{name}" + spec[end:], names)
    if kind == "pipe":
        raise DataError(f"data path {spec!r}: a pipe: command must say where the file name goes, as {{name}} "
                        f"(e.g. pipe:aws s3 cp s3://bucket/corpus/{{name}} -) or as a brace list of shards")
    if kind == "http":
        return CorpusLocation(spec, kind, spec.rstrip("/") + "/{name}")
    return CorpusLocation(spec, kind, str(Path(spec) / "{name}"))


def _brace_slot(spec: str) -> Optional[tuple[int, int]]:
    """(start, end) of the word holding the first brace list, or None when there is none."""
    first = spec.find("{")
    if first < 0:
        return None
    start = first
    while start > 0 and spec[start - 1] not in _SLOT_END:
        start -= 1
    end, depth = first, 0
    while end < len(spec) and (depth > 0 or spec[end] not in _SLOT_END):
        depth += {"{": 1, "}": -1}.get(spec[end], 0)
        end += 1
    return start, end


# ------------------------------------------------------------------ reading files
def fetch(url: str, policy: FetchPolicy = FetchPolicy(), sha256: str = "") -> bytes:
    """The whole file at `url`, retried with exponential backoff; FetchError naming it if it fails.
    With `sha256`, bytes that do not match it count as a failed read too (a transfer can be cut
    without an error, e.g. a server that sends no Content-Length)."""
    for attempt in range(policy.retries + 1):
        try:
            data = _fetch_once(url, policy.timeout_s)
            if sha256 and hashlib.sha256(data).hexdigest() != sha256:
                raise FetchError(f"the bytes read from {url} do not match the sha256 in its manifest")
            return data
        except FetchError as exc:
            if exc.permanent or attempt == policy.retries:
                tries = f" (after {attempt + 1} attempts)" if attempt else ""
                raise FetchError(f"{exc}{tries}", exc.permanent) from exc
            delay = policy.backoff_s * 2 ** attempt
            log.warning("%s; retry %d of %d in %.1f s", exc, attempt + 1, policy.retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _fetch_once(url: str, timeout_s: float) -> bytes:
    if url.startswith("pipe:"):
        return _run_pipe(url, timeout_s)
    if url.startswith(("http://", "https://")):
        return _get_http(url, timeout_s)
    try:
        return Path(url).read_bytes()
    except FileNotFoundError as exc:
        raise FetchError(f"{url} does not exist", permanent=True) from exc
    except OSError as exc:
        raise FetchError(f"reading {url} failed: {exc}") from exc


def _get_http(url: str, timeout_s: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.read()  # IncompleteRead when the body is shorter than its Content-Length
    except urllib.error.HTTPError as exc:
        # 4xx means the file is not there (or not ours to read): retrying cannot help, except for
        # timeouts and rate limits.
        permanent = 400 <= exc.code < 500 and exc.code not in (408, 429)
        raise FetchError(f"GET {url} answered HTTP {exc.code} {exc.reason}", permanent) from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise FetchError(f"GET {url} failed: {type(exc).__name__}: {exc}") from exc


def _run_pipe(url: str, timeout_s: float) -> bytes:
    command = url.removeprefix("pipe:")
    try:
        done = subprocess.run(command, shell=True, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise FetchError(f"`{command}` did not finish in {timeout_s:g} s") from exc
    if done.returncode != 0:
        err = done.stderr.decode("utf-8", "replace").strip()[-300:]
        raise FetchError(f"`{command}` exited with status {done.returncode}" + (f": {err}" if err else ""))
    return done.stdout


def read_corpus_manifest(location: CorpusLocation, policy: FetchPolicy = FetchPolicy()) -> dict:
    """The manifest of the corpus at `location`, or a DataError naming where and what to do."""
    if not location.is_remote:
        from data_pipeline.prepare_corpus import read_manifest  # its messages for local corpora

        return read_manifest(Path(location.url(MANIFEST)).parent)
    url = location.url(MANIFEST)
    try:
        data = fetch(url, policy)
    except FetchError as exc:
        hint = ("it is not a prepared corpus (or its upload is not finished: upload manifest.json last)"
                if exc.permanent else "check the address and the network, or raise data.open_retries")
        raise DataError(f"cannot read the manifest of {location.spec}: {exc}; {hint}") from exc
    try:
        return json.loads(data)
    except ValueError as exc:
        raise DataError(f"{url} is not valid JSON ({exc}); re-upload the manifest.json memgpt-prepare wrote") from exc


def read_corpus_file(spec: str | Path, name: str, policy: FetchPolicy = FetchPolicy()) -> bytes:
    """The bytes of file `name` (e.g. manifest.json, for fingerprinting a run's data) of the corpus
    at `spec`, local or remote."""
    return fetch(parse_location(spec).url(name), policy)


def fetch_tokenizer(spec: str | Path, policy: FetchPolicy = FetchPolicy()) -> bytes:
    """tokenizer.json of a corpus (local or remote), checked against the sha256 in its manifest;
    for copying it into a run directory."""
    location = parse_location(spec)
    info = read_corpus_manifest(location, policy)["tokenizer"]
    data = fetch(location.url(info["file"]), policy)
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise DataError(f"{location.url(info['file'])} does not match the tokenizer sha256 in the manifest of "
                        f"{spec}; re-upload the corpus as memgpt-prepare wrote it")
    return data


# ------------------------------------------------------------------ cache
@dataclass(frozen=True)
class ShardCache:
    """Verified copies of remote shards in `root`, at most `max_bytes` in all (least recently
    used evicted first). Plain data, so worker processes get it by pickling."""

    root: str
    max_bytes: int

    def _path(self, sha256: str) -> Path:
        return Path(self.root) / f"{sha256}.tar"

    def get(self, sha256: str) -> Optional[bytes]:
        """The cached bytes of the shard with this sha256, or None (absent, or damaged and removed)."""
        path = self._path(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if hashlib.sha256(data).hexdigest() != sha256:
            log.warning("cached shard %s does not match its sha256; fetching it again", path)
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)  # recency for the LRU order
        except FileNotFoundError:
            pass  # evicted by another rank meanwhile: the bytes we hold are still good
        return data

    def put(self, sha256: str, data: bytes) -> None:
        """Keep verified bytes (the caller checked them against `sha256`), then evict past the bound."""
        if len(data) > self.max_bytes:
            return
        path = self._path(sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # ranks sharing the cache never collide
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self._evict()

    def _evict(self) -> None:
        files = []
        for p in Path(self.root).glob("*.tar"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files, key=lambda f: f[0]):
            if total <= self.max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= size
