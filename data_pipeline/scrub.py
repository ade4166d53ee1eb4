"""Replace secrets and personal data in a document with placeholder tokens before it is tokenized.

    text, counts = scrub_text(doc)      # counts: {"email": 2, "ip_address": 1}, only kinds found

Each finding becomes `<KIND>` (`<EMAIL>`, `<IP_ADDRESS>`, `<AWS_ACCESS_KEY>`, `<AWS_SECRET_KEY>`,
`<PRIVATE_KEY>`, `<API_TOKEN>`, `<PASSWORD>`, `<SECRET>`); `counts` maps the lower-case kind to
how many were replaced. Output depends only on the text (no state, no randomness, no Python
version dependent address tables), and scrubbing scrubbed text changes nothing. Nothing here logs
or prints: a found value exists only in the input string.

Detector: detect-secrets' plugin patterns, not its scanner. Measured on the stdlib corpus (1786
.py files, 31.5 MB; `benchmarks/scrub_throughput.py`, a shared 2-core machine): detect-secrets'
own scan (`SecretsCollection.scan_file`) 0.04 MB/s and `scan_line` 0.015 MB/s (per-line plugin
dispatch, filters, verification hooks; its filters also log skipped values at INFO); datatrove's
`PIIFormatter` 2.2 MB/s (an e-mail regex tried at every character; e-mails and IPv4 only, swapped
for fake addresses in rotation, so a document's output depends on the documents before it); this
module about 50 MB/s, where one prepare process BPE-encodes about 0.6 MB/s: about 1% added. So
the maintained formats (AWS, GitHub, GitLab, Slack, Stripe, OpenAI, PyPI, SendGrid, Square, Azure,
Twilio, Mailchimp; JWT validation; the URL-credentials pattern; the secret-name list) come from
detect-secrets' plugin classes, and each runs only where a scan found its literal prefix. A scan
is a regex that starts with one literal character (sre skips between its occurrences at memchr
speed; a regex with several possible first characters is tried at every position, 10-100x
slower), so the formats share ten scans. E-mails and addresses are found from literal anchors
(`@`, `.d.d.d`, `:hex:`) and checked in Python only there.

Policy: what is replaced
* e-mail addresses, except RFC 2606/6761 reserved names (`example.com|net|org` and their
  subdomains, `*.example`, `*.test`, `*.invalid`, `*.localhost`), `git@host` (an SSH remote,
  not a mailbox), and `scheme://user@host` (a URL's user name).
* IPv4 and IPv6 addresses that are globally routable: private, loopback, link-local, shared,
  multicast, reserved and documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24,
  2001:db8::/32, 3fff::/20) and IETF 2001::/23 are kept: they name no one, and code and docs are
  full of them. IPv6 is replaced only inside global unicast 2000::/3, which also keeps slices
  (`x[1::2]`), times and MAC addresses. Networks (`8.8.8.0/24`) are kept.
* private key blocks (`-----BEGIN ... PRIVATE KEY-----` through the matching END, or through
  the base64 body when the END is missing); credentials in the token formats above; a random
  value after `Bearer` or `Authorization: Basic|token`; the password of `scheme://user:pw@host`
  (user and host kept) unless it is template syntax (`<pw>`, `${PW}`, `%s`), a mask (`***`), the
  word password/pass/passwd/pwd/secret/changeme, or the host is a reserved example domain.
* a random-looking literal assigned to a name holding secret, token, password, passwd, pwd,
  api_key, access_key, private_key... (`name = "v"`, `"name": "v"`, `name: v`, `NAME=v`), the
  keyword not followed by a lower-case letter (`secretKey` yes, `tokenizer` no) and the name not
  ending in path/file/url/name/type... The value has 8+ characters, two character classes, a
  digit or symbol, Shannon entropy of at least 75% of log2(length) (at most 3 bits), no alphabet
  run (`abcdef`, `123456`), and is not template syntax, a dotted name or a URL; unquoted, it needs
  16+ characters and upper, lower and digit (or 32+ hex), since in code it is an expression. So
  `password = "..."`, `token = "<token>"`, `secret = "changeme"` stay.
Kept everywhere else: hex digests, git hashes, UUIDs and base64 blobs not assigned to a secret
name (a scanner for bare high-entropy strings would flag every sha256 in a lock file). Versions:
a dotted quad right after `version`, `__version__`, `release`, `ver`, `oid`, `section` or `rfc`,
or touching a letter or another `.digit` (`v1.2.3.4`, `1.2.3.4.5`), is not an address; a bare
quad elsewhere is (the stdlib has a few such versions: `V('3.1.1.6')`, `(2.0.0.0)`).
"""
from __future__ import annotations

import ipaddress
import math
import re
import warnings
from collections import Counter
from typing import Callable, NamedTuple, Optional

_showwarning = warnings.showwarning
try:
    from detect_secrets.plugins.aws import AWSKeyDetector
    from detect_secrets.plugins.azure_storage_key import AzureStorageKeyDetector
    from detect_secrets.plugins.basic_auth import BasicAuthDetector
    from detect_secrets.plugins.github_token import GitHubTokenDetector
    from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
    from detect_secrets.plugins.jwt import JwtTokenDetector
    from detect_secrets.plugins.keyword import DENYLIST as _DS_SECRET_NAMES
    from detect_secrets.plugins.mailchimp import MailchimpDetector
    from detect_secrets.plugins.openai import OpenAIDetector
    from detect_secrets.plugins.pypi_token import PypiTokenDetector
    from detect_secrets.plugins.sendgrid import SendGridDetector
    from detect_secrets.plugins.slack import SlackDetector
    from detect_secrets.plugins.square_oauth import SquareOAuthDetector
    from detect_secrets.plugins.stripe import StripeDetector
    from detect_secrets.plugins.twilio import TwilioKeyDetector
except ImportError as e:  # pragma: no cover - exercised only where the dependency is missing
    raise ImportError("data_pipeline.scrub needs detect-secrets: pip install 'detect-secrets>=1.5,<2'") from e
if warnings.showwarning is not _showwarning:
    # detect-secrets' logger module calls logging.captureWarnings(True) on import: undo that
    # process-wide side effect so prepare's (and pytest's) warnings behave as before.
    import logging

    logging.captureWarnings(False)


class _Span(NamedTuple):
    start: int
    end: int
    kind: str


KINDS = ("email", "ip_address", "aws_access_key", "aws_secret_key", "private_key", "api_token", "password", "secret")


def placeholder(kind: str) -> str:
    """`<EMAIL>` for "email": the token that replaces a finding of that kind."""
    return f"<{kind.upper()}>"


def scrub_text(text: str) -> tuple[str, dict[str, int]]:
    """`text` with every finding replaced by its placeholder, and the count of each kind found."""
    spans = _resolve_overlaps(_find_formats(text) + _find_assigned(text) + _find_emails(text)
                              + _find_ipv4(text) + _find_ipv6(text))
    if not spans:
        return text, {}
    out, pos = [], 0
    for s in spans:
        out.append(text[pos:s.start])
        out.append(placeholder(s.kind))
        pos = s.end
    out.append(text[pos:])
    counts = Counter(s.kind for s in spans)
    return "".join(out), {k: counts[k] for k in sorted(counts)}


def _resolve_overlaps(spans: list[_Span]) -> list[_Span]:
    """Non-overlapping spans in text order. `spans` come most specific detector first; of two that
    overlap, the earlier in that order wins (a key block over the base64 inside it, a URL's
    password over the `pw@host` e-mail it looks like)."""
    kept: list[tuple[int, _Span]] = []
    for rank, s in sorted(enumerate(spans), key=lambda rs: (rs[1].start, rs[0])):
        if kept and s.start < kept[-1][1].end:
            if rank < kept[-1][0]:
                kept[-1] = (rank, s)  # starts at or after the one it replaces: clear of those before
            continue
        kept.append((rank, s))
    return [s for _, s in kept]


# --- helpers on candidate values ---------------------------------------------------------------

_TEMPLATE = re.compile(r"^[<$%{\[]|[{}]|%\(|%s\b|^\*+$|^x+$|^\.+$", re.IGNORECASE)
_ALPHABET_RUNS = ("abcdef", "bcdefg", "uvwxyz", "012345", "123456", "456789", "qwerty", "asdfgh")
_DOTTED_NAME = re.compile(r"[A-Za-z_.\-]+")  # identifiers, dotted names, dashed words: no digit, no symbol


def shannon_entropy(value: str) -> float:
    """Bits per character (the formula of detect-secrets' HighEntropyStringsPlugin, over any charset)."""
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in Counter(value).values())


def _is_template(value: str) -> bool:
    return bool(_TEMPLATE.search(value))


def _char_classes(value: str) -> int:
    return (any(c.islower() for c in value) + any(c.isupper() for c in value)
            + any(c.isdigit() for c in value) + any(not c.isalnum() for c in value))


def looks_random(value: str, min_len: int) -> bool:
    """A credential rather than a word, a name, a template or a placeholder."""
    n = len(value)
    if n < min_len or _is_template(value) or "://" in value or _DOTTED_NAME.fullmatch(value):
        return False
    if _char_classes(value) < 2 or any(run in value.lower() for run in _ALPHABET_RUNS):
        return False
    # all-distinct characters give log2(n) bits: ask for 75% of that, at most 3 bits
    return shannon_entropy(value) >= min(3.0, 0.75 * math.log2(n))


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def _inside_run(text: str, span: _Span) -> bool:
    return (span.start > 0 and text[span.start - 1].isalnum()) or (span.end < len(text) and text[span.end].isalnum())


# --- token formats from detect-secrets ---------------------------------------------------------

class _Format(NamedTuple):
    """A detect-secrets pattern, matched `back` characters before a hint of its scan (or, with
    `search`, searched from there: prefixes of several lengths, patterns that start before a hint)."""

    kind: str
    pattern: re.Pattern
    group: int = 0  # the part replaced
    back: int = 0
    search: bool = False
    bounded: bool = False  # not inside a longer alphanumeric run (the pattern itself does not say)
    valid: Optional[Callable[[str], bool]] = None

    def span_at(self, text: str, hint: int) -> Optional[_Span]:
        if self.search:
            m = self.pattern.search(text, max(0, hint - self.back), hint + _LONGEST_TOKEN)
        else:
            m = self.pattern.match(text, max(0, hint - self.back))
        if m is None or not m.group(self.group):
            return None
        span = _Span(m.start(self.group), m.end(self.group), self.kind)
        if self.bounded and _inside_run(text, span):
            return None
        return span if self.valid is None or self.valid(m.group(self.group)) else None


_LONGEST_TOKEN = 2048  # a match starts at most `back` before its hint and ends within this after it


def _tokens(plugin, **kw) -> tuple[_Format, ...]:
    return tuple(_Format("api_token", p, **kw) for p in plugin.denylist)


_JWT = re.compile(r"eyJ[A-Za-z0-9_=-]+\.[A-Za-z0-9_=-]+(?:\.[A-Za-z0-9_=-]+)?")
_PRIVATE_KEY = re.compile(
    r"-----BEGIN ((?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?)-----"
    # through the matching END, or (a truncated block) through its header and base64 lines
    r"(?:.*?-----END \1-----|(?:\r?\n[ \t]*(?:[A-Za-z0-9+/=]{16,}|[A-Za-z-]+: [^\n]*|))*)", re.DOTALL)
_BEARER = re.compile(
    r"(?:bearer|authorization\b[\"']?\s*[:=,]\s*[\"']?(?:basic|token))\s+([A-Za-z0-9._~+/-]+=*)", re.IGNORECASE)
_BEARER_FORMAT = _Format("api_token", _BEARER, group=1, valid=lambda v: looks_random(v, 16))

_PLACEHOLDER_PASSWORDS = frozenset(("pass", "password", "passwd", "pwd", "secret", "changeme"))


def _is_url_password(value: str) -> bool:
    return not _is_template(value) and value.lower() not in _PLACEHOLDER_PASSWORDS


# Each scan is one regex that starts with a literal character: sre jumps between occurrences of
# that character at memchr speed, while a regex with several first characters (or a named group
# first) is tried at every position, 10-100x slower; so formats with a `-` share one scan that
# looks behind it. A hit runs the scan's formats near it.
_GITLAB_PREFIXES = ("glpat", "gldt", "glft", "glsoat", "glrt", "glcbt", "glimt", "glptt", "glagent", "gloas")
_DASH_SCAN = re.compile("-(?:----BEGIN [A-Z0-9 ]*PRIVATE KEY|us[0-9]|(?<=pypi-)Ag|(?<=sq0csp-)|(?<=xox[abposr]-)|"
                        + "|".join(f"(?<={p}-)" for p in _GITLAB_PREFIXES) + ")")
_SCANS: tuple[tuple[re.Pattern, tuple[_Format, ...]], ...] = (
    (_DASH_SCAN, (_Format("private_key", _PRIVATE_KEY),
                  *_tokens(MailchimpDetector, back=32, search=True, bounded=True),
                  *_tokens(PypiTokenDetector, back=4), *_tokens(SquareOAuthDetector, back=6),
                  *_tokens(SlackDetector, back=4), *_tokens(GitLabTokenDetector, back=7, search=True))),
    (re.compile(r"A(?:3T[A-Z0-9]|BIA|CCA|KIA|SIA|C[a-z0-9]{32}|ccountKey=|uthorization|UTHORIZATION)"),
     (_Format("aws_access_key", AWSKeyDetector.denylist[0], bounded=True),
      *_tokens(TwilioKeyDetector, bounded=True), *_tokens(AzureStorageKeyDetector), _BEARER_FORMAT)),
    (re.compile(r"S(?:K[a-z0-9]{32}|G\.)"), (*_tokens(TwilioKeyDetector, bounded=True), *_tokens(SendGridDetector))),
    (re.compile(r"gh[pousr]_"), _tokens(GitHubTokenDetector)),
    (re.compile(r"k_live_"), _tokens(StripeDetector, back=1)),
    (re.compile(r"T3BlbkFJ"), _tokens(OpenAIDetector, back=256, search=True)),
    (re.compile(r"yJ"), (_Format("api_token", _JWT, back=1, valid=JwtTokenDetector.is_formally_valid),)),
    (re.compile(r"B(?:earer|EARER)"), (_BEARER_FORMAT,)),
    (re.compile(r"bearer"), (_BEARER_FORMAT,)),
    (re.compile(r"://"), (_Format("password", BasicAuthDetector.denylist[0], group=1, valid=_is_url_password),
                          *_tokens(SlackDetector, back=len("https")))),
)


def _reserved_host_after(text: str, at: int) -> bool:
    """`scheme://user:pw@example.com`: credentials for a documentation host are examples."""
    host = _DOMAIN.match(text, at + 1)
    return host is not None and _is_reserved_domain(host.group(0))


def _find_formats(text: str) -> list[_Span]:
    found: dict[_Span, None] = {}  # ordered set: detector order decides overlaps, so keep it stable
    for scan, formats in _SCANS:
        for hint in scan.finditer(text):
            for f in formats:
                span = f.span_at(text, hint.start())
                if span is not None and not (span.kind == "password" and _reserved_host_after(text, span.end)):
                    found.setdefault(span)
    return list(found)


# --- values assigned to secret names -----------------------------------------------------------

_SECRET_NAME = re.compile(
    rf"(?i:{'|'.join(dict.fromkeys((*_DS_SECRET_NAMES, 'token', 'access_?key', 'secret_?key')))})"
    r"(?![a-z])")  # `tokenizer`, `secretary` are not secrets; `secretKey`, `TOKEN` are
# Names that hold something about a secret, not the secret: `token_type = "Bearer"`, `password_file = ...`
_NOT_SECRET_SUFFIXES = ("path", "file", "dir", "url", "uri", "name", "type", "field", "prefix", "len", "length",
                        "size", "count", "env", "var", "header", "format", "pattern", "regex", "class", "mode")
_VALUE = r"[ \t]*(?:[rbuRBU]{0,2}([\"'`])(?P<quoted>[^\s\"'`]{8,})\1|(?P<bare>[A-Za-z0-9+/=_~-]{16,})(?=[\s,;]|\Z))"
# The operator's last character leads (a fast scan, as above): `=`, `==`, `:=`, `!=`; `:`; `=>`
_ASSIGN_SCANS = tuple(re.compile(op + _VALUE) for op in ("=", ":", ">"))
_NAME_TAIL = re.compile(r"[\w.-]{1,64}\Z")
_HEX32 = re.compile(r"[0-9a-f]{32,}|[0-9A-F]{32,}")
_AWS_SECRET_VALUE = re.compile(r"[0-9a-zA-Z/+]{40}")  # the value part of detect-secrets' AWS secret pattern


def _find_assigned(text: str) -> list[_Span]:
    found: dict[_Span, None] = {}
    for scan in _ASSIGN_SCANS:
        for m in scan.finditer(text):
            span = _assigned_span(text, m)
            if span is not None:
                found.setdefault(span)
    return list(found)


def _assigned_span(text: str, m: re.Match) -> Optional[_Span]:
    group = "quoted" if m.group("quoted") is not None else "bare"
    value = m.group(group)
    name = _name_before(text, m.start())
    if not name or not _SECRET_NAME.search(name) or name.lower().endswith(_NOT_SECRET_SUFFIXES):
        return None
    if not (looks_random(value, 8) if group == "quoted" else _looks_like_bare_token(value)):
        return None
    return _Span(m.start(group), m.end(group), _assigned_kind(name.lower(), value))


def _looks_like_bare_token(value: str) -> bool:
    """Unquoted (`API_KEY=...` in a .env file, YAML): in code that is an expression, so ask more:
    upper and lower case and a digit, or 32+ hex digits (`PKCS8_PRIV_KEY = pkcs8_priv_key_st` stays)."""
    mixed = any(c.isupper() for c in value) and any(c.islower() for c in value) and any(c.isdigit() for c in value)
    return (mixed or bool(_HEX32.fullmatch(value))) and looks_random(value, 16)


def _name_before(text: str, op: int) -> str:
    """The name an operator assigns to: `config["api_key"] = `, `token == `, `"password": `."""
    i = op
    while i > 0 and op - i < 8 and text[i - 1] in " \t=:!\"'`]":
        i -= 1
    m = _NAME_TAIL.search(text, max(0, i - 64), i)
    return m.group(0) if m else ""


def _assigned_kind(name: str, value: str) -> str:
    if "aws" in name and _AWS_SECRET_VALUE.fullmatch(value):
        return "aws_secret_key"
    if any(w in name for w in ("pass", "pwd", "contrase")):
        return "password"
    if any(w in name for w in ("token", "api", "auth")):
        return "api_token"
    return "secret"


# --- e-mail addresses --------------------------------------------------------------------------

_LOCAL_PART = re.compile(r"[A-Za-z0-9._%+'-]{1,64}\Z")
_DOMAIN = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![A-Za-z0-9-])")
_RESERVED_DOMAINS = ("example.com", "example.net", "example.org")
_RESERVED_TLDS = ("example", "test", "invalid", "localhost")


def _find_emails(text: str) -> list[_Span]:
    spans = []
    at = text.find("@")
    while at != -1:
        span = _email_at(text, at)
        if span is not None:
            spans.append(span)
        at = text.find("@", at + 1)
    return spans


def _email_at(text: str, at: int) -> Optional[_Span]:
    local = _LOCAL_PART.search(text, max(0, at - 64), at)
    domain = _DOMAIN.match(text, at + 1)
    if local is None or domain is None or (local.start() > 0 and _LOCAL_PART.match(text, local.start() - 1, at)):
        return None  # no local part, or one longer than an address allows
    start = local.start()
    while start < at and text[start] in ".'":
        start += 1  # a local part does not start with a dot; a quote is the string's, not the address's
    if start == at or text.endswith("//", 0, start) or text[start:at] == "git" or _is_reserved_domain(domain.group(0)):
        return None
    return _Span(start, domain.end(), "email")


def _is_reserved_domain(domain: str) -> bool:
    d = domain.lower()
    if d.split(".", 1)[0] == "self":
        return True  # `x@self.weight`: a matrix product, not an address
    return d.rsplit(".", 1)[-1] in _RESERVED_TLDS or any(d == r or d.endswith("." + r) for r in _RESERVED_DOMAINS)


# --- IP addresses ------------------------------------------------------------------------------

# not followed by a word character, `.word` (`1.0.0.127.in-addr.arpa`, `1.2.3.4.5`) or `/digits` (a network)
_IPV4_TAIL = re.compile(r"\.\d{1,3}\.\d{1,3}\.\d{1,3}(?!\w|\.\w|/\d)")  # led by a literal: a fast scan
# `__version__ = "1.2.3.4"`, `Version: 1.2.3.4`, `LooseVersion('1.2.3.4')`, `section 8.2.4.44`, `OID 1.3.6.1`
_VERSION_BEFORE = re.compile(r"(?:version|release|ver|oid|section|rfc)\w*[\"'\])]*\s*[:=(,#-]?\s*[\"'(]?\s*\Z",
                             re.IGNORECASE)
# Fixed tables rather than ipaddress.is_global, whose lists change between Python versions.
_V4_KEPT = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
    "224.0.0.0/4", "240.0.0.0/4"))
_V6_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
# IETF protocol assignments (Teredo, benchmarking, ORCHID), documentation (RFC 3849, RFC 9637)
_V6_KEPT = tuple(ipaddress.ip_network(n) for n in ("2001::/23", "2001:db8::/32", "3fff::/20"))


def is_public_ipv4(s: str) -> bool:
    try:
        addr = ipaddress.IPv4Address(s)  # refuses octets > 255 and leading zeros (dates, versions)
    except ValueError:
        return False
    return not any(addr in net for net in _V4_KEPT)


def is_public_ipv6(s: str) -> bool:
    """Global unicast 2000::/3 less special ranges (and so not a slice like `x[1::2]`)."""
    try:
        addr = ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return addr in _V6_GLOBAL_UNICAST and not any(addr in net for net in _V6_KEPT)


def _find_ipv4(text: str) -> list[_Span]:
    spans = []
    for m in _IPV4_TAIL.finditer(text):
        start = m.start()
        while start > m.start() - 3 and start > 0 and text[start - 1].isdigit():
            start -= 1
        if start == m.start() or (start > 0 and (_is_word_char(text[start - 1]) or text[start - 1] == ".")):
            continue
        if is_public_ipv4(text[start:m.end()]) and not _VERSION_BEFORE.search(text, max(0, start - 40), start):
            spans.append(_Span(start, m.end(), "ip_address"))
    return spans


_V6_HINT = re.compile(r":[0-9A-Fa-f]{0,4}:")
_V6_LEFT = re.compile(r"[0-9A-Fa-f:]{0,39}\Z")
_V6_RIGHT = re.compile(r"[0-9A-Fa-f:]{0,39}")


def _find_ipv6(text: str) -> list[_Span]:
    spans, done = [], 0
    for hint in _V6_HINT.finditer(text):
        if hint.start() < done:
            continue
        start = _V6_LEFT.search(text, max(0, hint.start() - 39), hint.start()).start()
        end = _V6_RIGHT.match(text, hint.start()).end()
        done = end
        if (start > 0 and _is_word_char(text[start - 1])) or (end < len(text) and (_is_word_char(text[end])
                                                                                    or text.startswith("/", end))):
            continue  # part of a longer word, or a network (`2001:4860::/32`)
        if is_public_ipv6(text[start:end]):
            spans.append(_Span(start, end, "ip_address"))
    return spans
