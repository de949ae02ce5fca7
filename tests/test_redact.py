"""Masking of secrets in output lines, logged mappings and error messages (spec lifecycle.md §6)."""

from __future__ import annotations

import copy
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from studio_runner.redact import (
    MASK,
    Redactor,
    describe,
    is_secret_name,
    looks_secret,
    mask_mapping,
    mask_patterns,
)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        # pip VCS URLs: the whole userinfo goes, user included.
        (
            "pip install git+https://user:ghp_tok@github.com/org/repo@v1#egg=x",
            "pip install git+https://****@github.com/org/repo@v1#egg=x",
        ),
        ("-e git+https://oauth2token@gitlab.com/a/b.git", "-e git+https://****@gitlab.com/a/b.git"),
        ("cloning //deploytoken@github.com/x", "cloning //****@github.com/x"),
        # Other URLs keep the user name, lose the password.
        (
            "connecting to amqp://alice:secret@10.0.0.6:5672/%2f",
            "connecting to amqp://alice:****@10.0.0.6:5672/%2f",
        ),
        ("amqp://guest:p@ss@127.0.0.1:5672/", "amqp://guest:****@127.0.0.1:5672/"),
        ("postgres://u:pw@db/x and https://v:pw2@h/y", "postgres://u:****@db/x and https://v:****@h/y"),
        # Upper-case NAME=value where NAME holds a secret word.
        ("export AWS_SECRET_ACCESS_KEY=abc123", "export AWS_SECRET_ACCESS_KEY=****"),
        (
            "AWS_ACCESS_KEY_ID=AKIA0000 AWS_DEFAULT_REGION=us-east-1",
            "AWS_ACCESS_KEY_ID=**** AWS_DEFAULT_REGION=us-east-1",
        ),
        ("+ export 'GITHUB_TOKEN=ghp_x'", "+ export 'GITHUB_TOKEN=****'"),
        ('DB_PASSWORD="two words" next', 'DB_PASSWORD="****" next'),
        ("MY_PASSWD='a b'", "MY_PASSWD='****'"),
        ("SERVICE_CREDENTIALS={json}", "SERVICE_CREDENTIALS=****"),
        ("SSH_KEY=abc", "SSH_KEY=****"),
        ("myAPI_KEY=abc", "myAPI_KEY=****"),
        # Left alone.
        ("learning_rate=0.01 epochs=10", "learning_rate=0.01 epochs=10"),
        ("aws_secret_access_key=lowercase-is-not-a-rule", "aws_secret_access_key=lowercase-is-not-a-rule"),
        ("HOME=/root", "HOME=/root"),
        ("KEY=", "KEY="),
        ("see https://github.com/foo@bar", "see https://github.com/foo@bar"),
        ("http://host:8080/path", "http://host:8080/path"),
        ("mail me: alice@example.com", "mail me: alice@example.com"),
        ("", ""),
        ("epoch 3 loss 0.25\n", "epoch 3 loss 0.25\n"),
    ],
)
def test_pattern_rules(line: str, expected: str) -> None:
    assert Redactor().mask(line) == expected
    assert mask_patterns(line) == expected


def test_literals_longest_first() -> None:
    redactor = Redactor(["abcd", "abcdefgh"])
    assert redactor.mask("x abcdefgh y abcd z") == "x **** y **** z"


def test_literals_are_escaped() -> None:
    redactor = Redactor(["a.b*c+d(e)"])
    assert redactor.mask("a.b*c+d(e) axbbbcd(e)") == "**** axbbbcd(e)"


def test_short_secrets_are_ignored_but_short_credentials_are_not() -> None:
    redactor = Redactor(["abc", "", "four"], credentials=["pw", ""])
    assert redactor.mask("abc four pw") == "abc **** ****"


def test_literal_inside_a_kept_user_name_or_variable_name_is_masked() -> None:
    redactor = Redactor(credentials=["AKIAXYZ", "HUSH"])
    assert redactor.mask("s3://AKIAXYZ:pw@host/bucket") == "s3://****:****@host/bucket"
    assert redactor.mask("HUSH_KEY=1") == "****_KEY=****"


def test_real_request_secrets_in_output() -> None:
    redactor = Redactor(
        ["AKIAHARNESS000000000", "harness/secret/key/not/real"], credentials=["AKIAHARNESS000000000"]
    )
    line = "boto3 used AKIAHARNESS000000000 / harness/secret/key/not/real for s3://127.0.0.1:9000/bucket"
    assert redactor.mask(line) == "boto3 used **** / **** for s3://127.0.0.1:9000/bucket"


def test_redactor_is_fast_on_output() -> None:
    secrets = [f"secret-value-{i:03d}-xyzzy" for i in range(20)]
    redactor = Redactor(secrets, credentials=["AKIA1234567890", "pw"])
    lines = [f"epoch {i} step {i * 7} loss=0.{i:04d} acc=0.9 path=/data/{i}/x.npz" for i in range(20_000)]
    start = time.perf_counter()
    for line in lines:
        redactor.mask(line)
    elapsed = time.perf_counter() - start
    # About 0.2 s on a quiet laptop; the bound leaves room for a loaded CI machine.
    assert elapsed < 5.0


@pytest.mark.parametrize(
    "line",
    ["KEY" * 20_000, "A" * 100_000 + "=x", "//" + "a" * 100_000, "//a:" + "b" * 100_000, "x=" * 50_000],
)
def test_pathological_lines_stay_linear(line: str) -> None:
    start = time.perf_counter()
    Redactor(["abcd"]).mask(line)
    assert time.perf_counter() - start < 1.0


_SAFE = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="*"), min_size=4, max_size=12)
_NOISE = st.text(alphabet="ab AB=@/:'\"_KEYTOKEN\n*", max_size=20)


@given(secrets=st.lists(_SAFE, min_size=1, max_size=4), pieces=st.lists(_NOISE, min_size=1, max_size=5))
@settings(max_examples=300, deadline=None)
def test_no_secret_survives(secrets: list[str], pieces: list[str]) -> None:
    line = "".join(p + secrets[i % len(secrets)] for i, p in enumerate(pieces))
    masked = Redactor(secrets).mask(line)
    for secret in secrets:
        assert secret not in masked


def test_mask_mapping() -> None:
    config = {
        "database": {
            "type": "s3",
            "endpoint": "http://10.0.0.5:9000",
            "credentials": {
                "aws": {"access_key": "AKEXAMPLE", "secret_access_key": "s3cr3t", "region": None}
            },
        },
        "env": {"AWS_DEFAULT_REGION": "us-west-2", "OMP_NUM_THREADS": 4, "FLAGS": ["a"]},
        "cloud": {"queue": {"rmq": "amqp://alice:secret@10.0.0.6:5672/%2f"}},
        "experiment": {"key": "1631664000_x", "password": "hunter2", "args": ["--token=abc", "DB_TOKEN=abc"]},
        "signing_key_path": "/home/alice/.ssh/id",
        "AWS_SECRET_ACCESS_KEY": "top",
        "SSH_KEY": "id",
    }
    original = copy.deepcopy(config)
    assert mask_mapping(config) == {
        "database": {
            "type": "s3",
            "endpoint": "http://10.0.0.5:9000",
            "credentials": {"aws": {"access_key": MASK, "secret_access_key": MASK, "region": None}},
        },
        "env": {"AWS_DEFAULT_REGION": MASK, "OMP_NUM_THREADS": MASK, "FLAGS": [MASK]},
        "cloud": {"queue": {"rmq": "amqp://alice:****@10.0.0.6:5672/%2f"}},
        "experiment": {"key": "1631664000_x", "password": MASK, "args": ["--token=abc", "DB_TOKEN=****"]},
        "signing_key_path": "/home/alice/.ssh/id",
        "AWS_SECRET_ACCESS_KEY": MASK,
        "SSH_KEY": MASK,
    }
    assert config == original


def test_mask_mapping_survives_deep_nesting() -> None:
    doc: dict = {"leaf": "x"}
    for _ in range(2000):
        doc = {"a": doc}
    masked = mask_mapping(doc)
    depth = 0
    while isinstance(masked, dict):
        masked = masked["a"] if "a" in masked else masked["leaf"]
        depth += 1
    assert masked == "<too deeply nested>"
    assert depth < 100


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("AWS_SECRET_ACCESS_KEY", True),
        ("GITHUB_TOKEN", True),
        ("db_password", True),
        ("Passwd", True),
        ("GOOGLE_APPLICATION_CREDENTIALS", True),
        ("monkey", True),
        ("AWS_DEFAULT_REGION", False),
        ("PATH", False),
    ],
)
def test_is_secret_name(name: str, expected: bool) -> None:
    assert is_secret_name(name) is expected


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("credentials", True),
        ("access_key", True),
        ("secret_access_key", True),
        ("session_token", True),
        ("password", True),
        ("apiKey", True),
        ("SSH_KEY", True),
        ("key", False),
        ("public_key_path", False),
        ("signing_key_path", False),
        ("region", False),
        ("authentication", False),
    ],
)
def test_looks_secret(key: str, expected: bool) -> None:
    assert looks_secret(key) is expected


def test_describe() -> None:
    assert describe("hunter2", secret=True) == MASK
    assert describe({"aws": {"secret_access_key": "x"}}) == "an object with 1 keys"
    assert describe(["a", "b"]) == "a list of 2 items"
    assert describe("lots") == "'lots'"
    assert describe(1.5) == "1.5"
    assert describe("AWS_SECRET_ACCESS_KEY=abc") == "'AWS_SECRET_ACCESS_KEY=****'"
    assert describe("amqp://u:pw@h") == "'amqp://u:****@h'"
    long = describe("x" * 500)
    assert len(long) == 60 and long.endswith("...")
