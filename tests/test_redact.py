"""Masking of secrets in output lines, logged mappings and error messages (spec lifecycle.md §6)."""

from __future__ import annotations

import copy
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from studio_runner import redact
from studio_runner.redact import (
    MASK,
    MIN_LITERAL,
    Redactor,
    describe,
    forget_remembered,
    is_placeholder,
    is_secret_name,
    looks_secret,
    mask_mapping,
    mask_patterns,
    remember,
    runner_secrets,
    scrub,
    scrub_tree,
)
from studio_runner.streammask import StreamMasker


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


def test_short_secrets_are_masked_as_whole_words_and_short_credentials_everywhere() -> None:
    redactor = Redactor(["abc", "", "four"], credentials=["pw", ""])
    assert redactor.mask("abc four pw") == "**** **** ****"
    # a short secret is not cut out of ordinary words; a credential is, wherever it is
    assert redactor.mask("abcdef xabc abc. (abc) pwd") == "abcdef xabc ****. (****) ****d"
    assert redactor.longest_literal == 4


def test_placeholders_are_never_literals() -> None:
    redactor = Redactor(["true", "None", "8", "42", " ", "-", "1234"])
    assert redactor.mask("true None 8 42 - 1234") == "true None 8 42 - ****"
    assert redactor.longest_literal == 4


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("DB_PWD", True), ("API_PASS", True), ("MY_PASSWD", True), ("SSH_KEY", True), ("X_TOKEN", True),
        ("MY_SECRET", True), ("AWS_SECRET_ACCESS_KEY", True), ("DB_PASSWORD_FILE", True),
        ("GCP_CREDENTIALS", True), ("GPG_PASSPHRASE", True), ("db_pwd", True), ("Api_Pass", True),
        ("PASS", True), ("PWD", False), ("OLDPWD", False), ("BYPASS", False), ("COMPASS", False),
        ("PASSENGERS", False), ("HOME", False), ("PATH", False), ("LD_LIBRARY_PATH", False),
    ],
)
def test_secret_names(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret
    line = f"{name.upper()}=abc other"
    masked = Redactor().mask(line)
    assert masked == (f"{name.upper()}=**** other" if secret else line)


def test_secret_field_names_in_documents() -> None:
    assert looks_secret("db_pwd") and looks_secret("api_pass") and looks_secret("DB_PWD")
    assert not looks_secret("pwd") and not looks_secret("bypass") and not looks_secret("key")
    assert mask_mapping({"db_pwd": "abc", "pwd": "/home/u"}) == {"db_pwd": MASK, "pwd": "/home/u"}


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


_SAFE = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="*"), min_size=4,
                max_size=12).filter(lambda s: not is_placeholder(s))
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


# --- StreamMasker ---------------------------------------------------------------------------------------

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


def _stream(masker: StreamMasker, data: bytes, chunk: int = 65536) -> list[str]:
    out: list[str] = []
    for i in range(0, len(data), chunk):
        out += masker.feed(data[i : i + chunk])
    return out + masker.close()


def _cut_then_mask(data: bytes, redactor: Redactor, max_bytes: int) -> list[str]:
    """What the runner did before StreamMasker (process.lines, then Redactor.mask on each piece)."""
    pieces: list[str] = []
    for line in data.split(b"\n"):
        while len(line) > max_bytes:
            pieces.append(line[:max_bytes].decode("utf-8", "replace"))
            line = line[max_bytes:]
        pieces.append(line.decode("utf-8", "replace"))
    return [redactor.mask(piece) for piece in pieces]


def test_a_secret_split_between_two_feeds_is_masked_at_every_position() -> None:
    redactor = Redactor([SECRET])
    data = f"loading key {SECRET} from env\n".encode()
    for cut in range(len(data) + 1):
        masker = StreamMasker(redactor)
        out = masker.feed(data[:cut]) + masker.feed(data[cut:]) + masker.close()
        assert out == ["loading key **** from env"], cut


def test_a_secret_straddling_the_cut_of_a_3_mib_line_is_masked() -> None:
    redactor = Redactor([SECRET])
    limit = 1 << 20
    line = "x" * (limit - 17) + SECRET + "y" * (2 * limit)  # 3 MiB, no newline; the cut falls in SECRET
    data = line.encode()
    old = _cut_then_mask(data, redactor, limit)
    assert old[0].endswith(SECRET[:17]) and old[1].startswith(SECRET[17:])  # the old way leaked it, halved

    pieces = _stream(StreamMasker(redactor), data)
    assert len(pieces) >= 3 and all(len(piece) <= limit for piece in pieces)
    assert "".join(pieces) == redactor.mask(line) == "x" * (limit - 17) + MASK + "y" * (2 * limit)
    assert not any(SECRET[:8] in piece or SECRET[-8:] in piece for piece in pieces)


@pytest.mark.parametrize("offset", range(len(SECRET) + 1))
def test_a_secret_straddling_a_piece_cut_is_masked_at_every_offset(offset: int) -> None:
    redactor = Redactor([SECRET])
    size = 50
    line = "a" * (size - offset) + SECRET + "b" * 500
    masker = StreamMasker(redactor, max_line_chars=size)
    pieces = _stream(masker, line.encode(), chunk=7)
    assert "".join(pieces) == "a" * (size - offset) + MASK + "b" * 500
    assert all(len(piece) <= size for piece in pieces) and len(pieces) > 5
    if 0 < offset < len(SECRET):
        old = _cut_then_mask(line.encode(), redactor, size)  # the old way showed the secret, in two halves
        assert old[0].endswith(SECRET[:offset]) and old[1].startswith(SECRET[offset:])


@pytest.mark.parametrize("offset", [1, 5, 19, 21, 22, 23, 30, len(SECRET) + 21])
def test_a_pattern_secret_split_across_a_piece_cut_is_masked(offset: int) -> None:
    redactor = Redactor()  # no literal: only the NAME=value rule can catch it
    size = 100
    assignment = f"AWS_SECRET_ACCESS_KEY={SECRET}"
    line = ("x " * size)[: size - offset] + assignment + " done" + " ." * 300
    assert line.index(assignment) == size - offset  # the cut falls inside the assignment
    pieces = _stream(StreamMasker(redactor, max_line_chars=size), line.encode(), chunk=13)
    joined = "".join(pieces)
    assert joined == redactor.mask(line)
    assert "AWS_SECRET_ACCESS_KEY=**** done" in joined and SECRET[-6:] not in joined
    old = _cut_then_mask(line.encode(), redactor, size)
    if offset >= len("AWS_SECRET_ACCESS_K"):  # the old way: the rest of the value, alone, matched no rule
        assert old[1].startswith(assignment[offset:] + " done")


def test_an_endless_pattern_value_is_masked_to_its_end_in_bounded_memory() -> None:
    redactor = Redactor()
    size = 1000
    line = ("start GITHUB_TOKEN=" + "Z" * 200_000 + " shown AMQP=amqp://u:" + "J" * 5000 + "@h/ end "
            + 'DB_PASSWORD="' + "V V " * 1000 + '" after')
    whole = 'start GITHUB_TOKEN=**** shown AMQP=amqp://u:****@h/ end DB_PASSWORD="****" after'
    assert redactor.mask(line) == whole
    masker = StreamMasker(redactor, max_line_chars=size)
    peak = 0
    out: list[str] = []
    data = line.encode()
    for i in range(0, len(data), 4096):
        out += masker.feed(data[i : i + 4096])
        peak = max(peak, masker.buffered)
    out += masker.close()
    joined = "".join(out)
    assert "Z" not in joined and "J" not in joined and "V" not in joined
    # values and quoted values end where the rule ends them; a userinfo-like run hides up to white space
    assert joined == 'start GITHUB_TOKEN=**** shown AMQP=amqp://**** end DB_PASSWORD="****" after'
    assert peak <= masker.bound and masker._forced == 3


def test_carriage_returns_make_progress_lines() -> None:
    masker = StreamMasker(Redactor(), max_line_chars=1000)
    bar = b"".join(f"\r{i:3d}%|{'#' * (i // 10):10s}| {i}/100".encode() for i in range(101)) + b"\n"
    out = _stream(masker, bar * 50, chunk=4096)  # 5050 refreshes, no newline but one per bar
    assert len(out) == 50 * 102  # each bar: "" before its first \r, 101 refreshes
    assert out[1] == "  0%|          | 0/100" and out[101] == "100%|##########| 100/100"
    assert max(len(line) for line in out) < 30


def test_crlf_split_between_feeds_is_one_terminator() -> None:
    masker = StreamMasker(Redactor())
    assert masker.feed(b"first\r") == ["first"]  # a \r ends the line at once...
    assert masker.feed(b"\nsecond\r\n") == ["second"]  # ...and the \n that completes \r\n adds no line
    assert masker.feed(b"\r") == [""]
    assert masker.feed(b"") == []
    assert masker.feed(b"\n") == []
    assert masker.feed(b"third\r") == ["third"]
    assert masker.feed(b"fourth") == []  # a lone \r
    assert masker.close() == ["fourth"]
    assert masker.close() == []


def test_multibyte_utf8_split_between_feeds() -> None:
    text = "héllo wörld — 日本語 🎉 done"
    data = (text + "\n").encode()
    for cut in range(len(data) + 1):
        masker = StreamMasker(Redactor(["日本語 🎉"]))
        out = masker.feed(data[:cut]) + masker.feed(data[cut:]) + masker.close()
        assert out == ["héllo wörld — **** done"], cut
    masker = StreamMasker(Redactor())
    assert masker.feed(b"bad \xff byte\nhalf \xe6\x97") == ["bad \ufffd byte"]
    assert masker.close() == ["half \ufffd"]


def test_a_50_mib_line_without_newline_stays_in_bounded_memory() -> None:
    masker = StreamMasker(Redactor([SECRET], credentials=["pw"]))
    assert masker.bound <= (1 << 20) + 1024
    peak = 0
    real_cut = masker._cut

    def watched(out: list[str], *, final: bool) -> None:
        nonlocal peak
        peak = max(peak, masker.buffered)  # the most ever held: just before a piece is cut off
        real_cut(out, final=final)

    masker._cut = watched  # type: ignore[method-assign]
    chunk = (b"0123456789abcdef" * 4096)[:-len(SECRET)] + SECRET.encode()  # 64 KiB, a secret in each
    total = pieces = 0
    for _ in range(50 * 16):
        for piece in masker.feed(chunk):
            assert len(piece) <= 1 << 20 and SECRET not in piece
            total += len(piece)
            pieces += 1
        peak = max(peak, masker.buffered)
    for piece in masker.close():
        total += len(piece)
        pieces += 1
    assert (1 << 20) < peak <= masker.bound
    assert pieces == 50 and total == 50 * 16 * (65536 - len(SECRET) + len(MASK))


def test_stream_throughput(capsys: pytest.CaptureFixture[str]) -> None:
    redactor = Redactor([f"secret-value-{i:03d}-xyzzy" for i in range(20)], credentials=["AKIA1234567890"])
    lines = [f"epoch {i} step {i * 7} loss=0.{i:04d} acc=0.9 path=/data/{i}/x.npz" for i in range(100_000)]
    data = ("\n".join(lines) + "\n").encode()
    masker = StreamMasker(redactor)
    start = time.perf_counter()
    out = _stream(masker, data)
    elapsed = time.perf_counter() - start
    start = time.perf_counter()
    for line in lines:
        redactor.mask(line)
    per_line = time.perf_counter() - start
    assert out == lines
    with capsys.disabled():
        print(f"\nStreamMasker: 100k lines ({len(data) / 1e6:.1f} MB) in {elapsed:.3f} s "
              f"({len(data) / 1e6 / elapsed:.1f} MB/s); Redactor.mask per line alone: {per_line:.3f} s")


_PLAIN = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="*\r\n"), min_size=4,
                 max_size=12).filter(lambda s: not is_placeholder(s))
_STUFF = st.sampled_from(["a", "b", " ", "=", "@", "/", ":", "'", '"', "_", "KEY", "TOKEN", "AWS_SECRET_KEY=",
                          "//u:", "git+https://", "é", "\r", "\n", "\r\n", "x" * 40])


@given(
    secrets=st.lists(_PLAIN, min_size=1, max_size=3),
    picks=st.lists(st.tuples(_STUFF, st.booleans()), max_size=60),
    size=st.integers(1, 40),
    chunks=st.lists(st.integers(1, 64), min_size=1, max_size=8),
)
@settings(max_examples=300, deadline=None)
def test_streaming_masks_like_whole_lines(
    secrets: list[str], picks: list[tuple[str, bool]], size: int, chunks: list[int]
) -> None:
    text = "".join(stuff + (secrets[i % len(secrets)] if with_secret else "")
                   for i, (stuff, with_secret) in enumerate(picks))
    redactor = Redactor(secrets)
    masker = StreamMasker(redactor, max_line_chars=size)
    data, out, i = text.encode(), [], 0
    while i < len(data):
        step = chunks[len(out) % len(chunks)]
        out += masker.feed(data[i : i + step])
        i += step
    out += masker.close()
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines[-1] == "":
        lines.pop()
    expected = [redactor.mask(line) for line in lines]
    for secret in secrets:
        if len(secret) >= MIN_LITERAL and not any(secret in line for line in expected):
            assert not any(secret in piece for piece in out)
    assert masker.buffered == 0
    if masker._forced == 0:  # nothing had to be cut inside an endless value: exactly the whole-line masking
        assert "".join(out) == "".join(expected)


# --- runner_secrets ---------------------------------------------------------------------------------------


def test_runner_secrets() -> None:
    environ = {
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "GITHUB_TOKEN": "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
        "HOME": "/root",
        "PATH": "/usr/local/bin:/usr/bin",
        "SHORT_KEY": "abc",
        "USE_TOKEN": "true",
        "DB_PASSWORD": "None",
        "MAX_KEYS": "8",
        "DB_PWD": "xyz",
        "PWD": "/home/runner",
        "AMQP_URL": "amqp://runner:p%40ssw0rd@rabbit:5672/%2f",
        "HTTP_PROXY": "http://proxy:3128",
        "PIP_EXTRA_INDEX_URL": "https://u:tok12345@a.example/simple https://v:x@b.example/simple",
        "NO_PROXY": "localhost,127.0.0.1",
    }
    assert runner_secrets(environ) == [
        SECRET,
        "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
        "abc",
        "xyz",
        "p%40ssw0rd",
        "p@ssw0rd",
        "tok12345",
        "x",
    ]
    redactor = Redactor(runner_secrets(environ))
    leaked = f"env: {SECRET} ghp_16C7e42F292c6912E7710c838347Ae178B4a password p@ssw0rd, true, /root"
    assert redactor.mask(leaked) == "env: **** **** password ****, true, /root"
    masker = StreamMasker(redactor)
    assert masker.feed(leaked.encode()) == [] and masker.close() == [redactor.mask(leaked)]
    assert runner_secrets({}) == []


# --- the literal trie, remember and scrub -----------------------------------------------------------------


def _plain_mask(literals: list[str], line: str) -> str:
    """The literal pass as one plain alternation, longest first: what the trie must match exactly."""
    ordered = sorted(set(literals), key=lambda s: (-len(s), s))
    return re.sub("|".join(re.escape(s) for s in ordered), MASK, line) if ordered else line


@given(literals=st.lists(st.text(alphabet="ab.c*", min_size=4, max_size=7), max_size=12),
       line=st.text(alphabet="ab.c* ", max_size=60))
@settings(max_examples=400, deadline=None)
def test_the_literal_trie_masks_exactly_like_a_plain_alternation(literals: list[str], line: str) -> None:
    assert Redactor(credentials=literals).mask(line) == _plain_mask(literals, line)


def test_a_deep_trie_falls_back_to_a_plain_alternation() -> None:
    literals = ["x" * n + "y" for n in range(4, 400)]  # every literal a branch point of the next
    redactor = Redactor(credentials=literals)
    assert redactor.mask("a " + "x" * 300 + "y b") == "a **** b"


def test_thousands_of_remembered_secrets_stay_fast() -> None:
    import secrets as random_secrets

    redactor = Redactor([random_secrets.token_hex(8) for _ in range(4096)])
    line = "epoch 12 step 3400 loss=0.1234 acc=0.98 path=/data/shard-0012/x.npz lr=0.001 " * 2
    start = time.perf_counter()
    for _ in range(2000):
        redactor.mask(line)
    # about 0.1 s here; a plain alternation of 4096 literals took 4 s
    assert time.perf_counter() - start < 2.0


@pytest.fixture
def clean_memory(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SCRUB_TEST_TOKEN", "runner-env-token-0042")
    monkeypatch.setenv("SCRUB_TEST_PWD", "q7z")
    forget_remembered()
    yield
    forget_remembered()


def test_scrub_masks_remembered_request_secrets_and_the_runner_s_own(clean_memory: None) -> None:
    line = "failed: pw hunter22 short k9q token runner-env-token-0042 q7z amqp://u:p@h DB_PWD=x"
    assert scrub(line) == "failed: pw hunter22 short k9q token **** **** amqp://u:****@h DB_PWD=****"
    remember(["hunter22", "k9q", "true"], ["AKIA0001"])
    assert scrub(line + " AKIA0001x true") == (
        "failed: pw **** short **** token **** **** amqp://u:****@h DB_PWD=**** ****x true")


def test_remember_is_bounded_oldest_forgotten_first(clean_memory: None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redact, "REMEMBERED_MAX", 3)
    remember(["first-secret", "second-secret", "third-secret"])
    remember(["first-secret"])  # refreshed
    remember(["fourth-secret"])
    assert scrub("first-secret second-secret third-secret fourth-secret") == "**** second-secret **** ****"


def test_scrub_tree_keeps_the_shape(clean_memory: None) -> None:
    remember(["hunter22"])
    doc = {"running": [{"key": "k", "output_tail": ["pw hunter22", "ok"], "cores": 2, "rss": None}],
           "reason": "X_TOKEN=abc", "nested": {"list": ("hunter22",)}}
    assert scrub_tree(doc) == {"running": [{"key": "k", "output_tail": ["pw ****", "ok"], "cores": 2,
                                            "rss": None}],
                               "reason": "X_TOKEN=****", "nested": {"list": ["****"]}}
