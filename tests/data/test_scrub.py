"""scrub_text: planted secrets of every kind are replaced and counted; hashes, versions, example
addresses, placeholders and ordinary stdlib code are left alone; scrubbing is idempotent and
deterministic; found values never reach a log or stdout."""
from __future__ import annotations

import logging
import subprocess
import sys
from collections import Counter

import pytest

from data_pipeline.corpus_sources import iter_stdlib, stdlib_root
from data_pipeline.scrub import KINDS, placeholder, scrub_text

JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
       ".eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ"
       ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")
RSA_BODY = ("MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n"
            "VTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK\n")

# (kind, document with one planted value, the planted value)
PLANTED = [
    ("email", "Contact jane.doe@corp-mail.io for access.", "jane.doe@corp-mail.io"),
    ("email", "__author__ = 'Ann Smith <ann.smith+py@uni-heidelberg.de>'", "ann.smith+py@uni-heidelberg.de"),
    ("ip_address", "the server at 93.184.216.34 answered", "93.184.216.34"),
    ("ip_address", "curl http://8.8.4.4:8080/health", "8.8.4.4"),
    ("ip_address", "resolver 2606:4700:4700::1111 is up", "2606:4700:4700::1111"),
    ("aws_access_key", "export AWS_ACCESS_KEY_ID=AKIAQ3EGRZ7WMPL4XT2N", "AKIAQ3EGRZ7WMPL4XT2N"),
    ("aws_secret_key", 'aws_secret_access_key = "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"',
     "Zx9Kq2Lm8Np4Rt6Vw1Yb3Cd5Ef7Gh0Jk2Mn4Pq6S"),
    ("private_key", f"key = '''-----BEGIN RSA PRIVATE KEY-----\n{RSA_BODY}-----END RSA PRIVATE KEY-----'''",
     RSA_BODY[:40]),
    ("private_key", "-----BEGIN OPENSSH PRIVATE KEY-----\n"
     "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtz\n"
     "-----END OPENSSH PRIVATE KEY-----\n", "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ"),
    ("private_key", "truncated:\n-----BEGIN EC PRIVATE KEY-----\n"
     "MHcCAQEEIIrYSSNQFaA2Hwf1duRSxKtLYX5CB04fSeQ6tF1aY/PuoAoGCCqGSM49\n",
     "MHcCAQEEIIrYSSNQFaA2Hwf1duRSxKtLYX5CB04fSeQ6tF1aY"),
    ("api_token", 'headers = {"Authorization": "Bearer 8f3kQ9zX2mL5pR7tV1wY4bN6cJ0hG3dS"}',
     "8f3kQ9zX2mL5pR7tV1wY4bN6cJ0hG3dS"),
    ("api_token", "git clone https://x:ghp_Ab3dE5gH7jK9mN1pQ3sT5vW7yZ0bC2dF4gH6@github.com/o/r",
     "ghp_Ab3dE5gH7jK9mN1pQ3sT5vW7yZ0bC2dF4gH6"),
    ("api_token", "SLACK = 'xoxb-1234567890-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx'",
     "xoxb-1234567890-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"),
    ("api_token", "stripe.api_key = 'sk_live_4eC39HqLyjWDarjtT1zdp7dc'", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
    ("api_token", f"cookie: session={JWT}; Path=/", JWT),
    ("api_token", 'api_key = "9f8e7d6c5b4a39281706f5e4d3c2b1a0"', "9f8e7d6c5b4a39281706f5e4d3c2b1a0"),
    ("api_token", "GITHUB_TOKEN=Ab3dE5gH7jK9mN1pQ3sT5vW7\n", "Ab3dE5gH7jK9mN1pQ3sT5vW7"),
    ("password", "DATABASE_URL = 'postgres://admin:Xq7vR2pK9w@db.corp.io:5432/app'", "Xq7vR2pK9w"),
    ("password", 'DB_PASSWORD = "Tr0ub4dor&3x"', "Tr0ub4dor&3x"),
    ("password", '{"user": "svc", "passwd": "h7Gk2Lp9Qz"}', "h7Gk2Lp9Qz"),
    ("secret", "client_secret: 'q8Zr3Xv7Lp2Wn9Ks'", "q8Zr3Xv7Lp2Wn9Ks"),
    ("secret", 'config["secretKey"] = "nF4tY8wQ2zL6vB0m"', "nF4tY8wQ2zL6vB0m"),
]


@pytest.mark.parametrize("kind,text,value", PLANTED, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(PLANTED)])
def test_planted_value_is_replaced_and_counted(kind, text, value):
    out, counts = scrub_text(text)
    assert value not in out
    assert placeholder(kind) in out
    assert counts == {kind: 1}


def test_url_password_keeps_user_and_host():
    out, _ = scrub_text("postgres://admin:Xq7vR2pK9w@db.corp.io:5432/app")
    assert out == "postgres://admin:<PASSWORD>@db.corp.io:5432/app"


def test_every_kind_is_planted():
    assert sorted({kind for kind, _, _ in PLANTED}) == sorted(KINDS)


def test_counts_cover_every_replacement_in_a_mixed_document():
    doc = "\n".join(text for _, text, _ in PLANTED)
    out, counts = scrub_text(doc)
    assert counts == dict(sorted(Counter(kind for kind, _, _ in PLANTED).items()))
    assert all(value not in out for _, _, value in PLANTED)


UNTOUCHED = [
    'digest = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"',  # sha256 in code
    "commit 9fceb02d0ae598e95dc970b74767f19372d61af8 (HEAD -> main)",  # git hash
    'md5 = hashlib.md5(b"").hexdigest()  # d41d8cd98f00b204e9800998ecf8427e',
    'request_id = "123e4567-e89b-12d3-a456-426614174000"',  # UUID
    "blob = 'aGVsbG8gd29ybGQgdGhpcyBpcyBiYXNlNjQgZGF0YQ=='",  # base64 not assigned to a secret name
    '__version__ = "1.2.3.4"',
    "Version: 2.7.0.40",
    "setup(version='10.0.0.1')",
    "LooseVersion('3.1.1.6') < LooseVersion('3.2')",
    "see section 8.2.4.44 of the HTML spec",
    "build 1.2.300.4 and v1.2.3.4 and 1.2.3.4.5",  # octet > 255, v-prefix, five parts
    "1.0.0.127.in-addr.arpa",
    "route 8.8.8.0/24 via the gateway",  # a network, not a host
    "mail user@example.com or admin@lists.example.org or ci@build.test or dev@localhost",
    "git@github.com:org/repo.git",
    "y = x@self.weight",
    "@property\ndef name(self):",
    "192.0.2.1 198.51.100.23 203.0.113.9 10.0.0.1 127.0.0.1 192.168.1.1 172.16.0.5 0.0.0.0 224.0.0.251",
    "::1 fe80::1%eth0 2001:db8::1 x[1::2] std::vector 12:30:45 00:1a:2b:3c:4d:5e",
    'password = "..."',
    'password = "<password>"',
    'token = "${GITHUB_TOKEN}"',
    'secret = "changeme"',
    'password = "********"',
    'password = os.environ["DB_PASSWORD"]',
    "api_key = get_api_key(user)",
    'tokenizer = "EleutherAI/gpt-neox-20b"',
    'token_type = "Bearer"',
    'secret_file = "/etc/secrets/k8s-prod.yaml"',
    'PKCS8_PRIV_KEY_INFO = pkcs8_priv_key_info_st',
    'ALPHABET_TOKEN = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"',
    "https://docs.python.org/3/library/re.html?x=1#section",
    "ftp://anonymous@ftp.python.org/pub",
    "http://joe:password@proxy.example.com/ and http://user:%s@%s/ and https://u:<pw>@host.io/",
    "Authorization: Bearer <token>",
    "a Bearer token is sent in the Authorization header",
]


@pytest.mark.parametrize("text", UNTOUCHED)
def test_text_that_must_not_be_touched(text):
    assert scrub_text(text) == (text, {})


# Stdlib modules full of passwords, tokens, secrets, hashes and addresses in code, and no real one
CLEAN_MODULES = ["os.py", "difflib.py", "secrets.py", "getpass.py", "ipaddress.py", "ftplib.py", "hmac.py",
                 "base64.py", "netrc.py", "urllib/parse.py", "http/cookiejar.py", "ssl.py"]


@pytest.mark.parametrize("module", CLEAN_MODULES)
def test_ordinary_stdlib_code_is_unchanged(module):
    path = stdlib_root() / module
    assert path.is_file(), f"{module} is part of every CPython >= 3.10 stdlib; the corpus root is wrong"
    text = path.read_text(encoding="utf-8")
    assert scrub_text(text) == (text, {})


def _stdlib_sample(n: int = 200) -> list[tuple[str, str]]:
    docs = list(iter_stdlib())
    return docs[::max(1, len(docs) // n)][:n]


def test_stdlib_sample_report_idempotent_and_counts_match_placeholders():
    """Run over ~200 real files: print what was replaced (kinds only), check the counts."""
    sample = _stdlib_sample()
    total: Counter = Counter()
    per_file: dict[str, dict[str, int]] = {}
    for source, text in sample:
        out, counts = scrub_text(text)
        assert scrub_text(out) == (out, {}), source
        for kind, n in counts.items():
            assert out.count(placeholder(kind)) - text.count(placeholder(kind)) == n, (source, kind)
        total.update(counts)
        if counts:
            per_file[source] = counts
    print(f"\nscrubbed {len(sample)} stdlib files: {len(per_file)} changed, replacements {dict(sorted(total.items()))}")
    for source, counts in sorted(per_file.items()):
        print(f"  {source}: {counts}")
    credentials = {"aws_access_key", "aws_secret_key", "private_key", "api_token", "secret"}
    assert not {k for s, c in per_file.items() if "/test" not in s for k in c} & credentials
    assert len(per_file) < len(sample) // 2


def test_scrubbing_scrubbed_planted_text_changes_nothing():
    for _, text, _ in PLANTED:
        once, _ = scrub_text(text)
        assert scrub_text(once) == (once, {})


def test_output_is_deterministic_and_stateless():
    docs = [text for _, text, _ in PLANTED]
    first = [scrub_text(d) for d in docs]
    assert [scrub_text(d) for d in reversed(docs)][::-1] == first


def test_found_values_never_reach_logs_or_stdout(caplog, capfd):
    """capfd (file descriptors): detect-secrets' logger writes to the stderr it saw at import."""
    caplog.set_level(logging.DEBUG)
    scrub_text("\n".join(text for _, text, _ in PLANTED))
    captured = capfd.readouterr()
    for _, _, value in PLANTED:
        assert value not in caplog.text
        assert value not in captured.out and value not in captured.err


def test_missing_detect_secrets_names_the_pip_install():
    code = ("import sys; sys.modules['detect_secrets'] = None\n"
            "try:\n    import data_pipeline.scrub\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'detect-secrets" in out
