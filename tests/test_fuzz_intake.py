"""Issue 9's fuzz test: the whole intake, bytes to parsed request, for clear and enveloped messages.

The property, for every generated message: the intake (studio_runner.gate.RequestGate.open, as the supervisor
calls it, with real key files in the spec's layout) returns a Request whose derived values — secrets,
redactor, resource demand, locators — can all be computed, or raises the runner's own
:class:`~studio_runner.errors.RequestInvalid` (RequestRefused included) with a short, single-line reason that
holds no credential of the message; never KeyError, TypeError, ValueError, RecursionError, UnicodeError or a
cryptography/NaCl exception. Each message is opened within ``LIMIT_S`` seconds, timed per call.

Generation reaches deep on purpose: real client messages mutated field by field and byte by byte, plus raw
bytes (support/hostile_json.py); envelopes built in the test from the spec (support/envelope_builder.py), then
damaged part by part, or re-signed after the damage so that verification passes and decryption or parsing is
what has to cope (support/hostile_envelopes.py). Beyond "no crash", each case is checked against what a
correct runner must do: clear bodies get the parser's verdict when clear text is allowed and are always
refused when it is not; an envelope whose signature cannot verify is refused; an intact one (header and
fingerprint aside, which are advisory) gives exactly the parser's verdict on its plaintext. Each generator
test also checks that it produced accepted and refused messages alike, so a generator that only makes junk
fails.

CI runs a fixed, database-less, derandomised set of about 6,600 examples (under a minute here); set
``STUDIO_FUZZ_SCALE`` (a factor, e.g. 20) for a longer local hunt.
"""

from __future__ import annotations

import copy
import json
import os
import random
import string
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.envelope_builder import KeySet, envelope
from support.hostile_envelopes import (
    DAMAGE_KINDS,
    MAX_MESSAGE_SIZE,
    QUEUE,
    QUEUE_PREFIX,
    Case,
    Expect,
    envelopes,
    random_envelopes,
)
from support.hostile_json import DOCS, FIXTURE_FILES, RAW_BYTES, damaged_bytes, mutated_documents

from studio_runner.errors import RequestInvalid, RequestRefused
from studio_runner.gate import DEFAULT_MAX_MESSAGE_SIZE, RequestGate
from studio_runner.keyring import Keyring
from studio_runner.redact import mask_mapping
from studio_runner.request import Request, is_envelope, parse_request
from studio_runner.resources import Demand

LIMIT_S = 2.0
"""Per message. The slowest legitimate input here (a megabyte string, an RSA unwrap) takes milliseconds."""
_SCALE = float(os.environ.get("STUDIO_FUZZ_SCALE", "1"))
_FIXTURE_SECRETS = ("AKIAHARNESS000000000", "harness/secret/key/not/real")
_REDACTOR_SECRETS_MAX = 100_000
"""Beyond this many characters of secrets a request is refused at intake (request._MAX_SECRET_CHARS is 64 KiB;
the fuzz cases skip building a redactor above this, which test_the_secrets_a_message_can_carry... covers)."""
_REASON_MAX = 600
"""A refusal reason goes into one log line and the quarantine record: never the message itself."""


def guard(seconds: float) -> pytest.MarkDecorator:
    """A backstop for a real hang (a call that never returns, so the per-call bound never checks): the thread
    method, since a SIGALRM can be swallowed (it lands in hypothesis' gc callback) or wait on C code."""
    return pytest.mark.timeout(seconds * max(1.0, _SCALE), method="thread")


def fuzz(examples: int) -> settings:
    """Reproducible and bounded for CI: fixed seed, no example database, our own time bound."""
    # megabyte fragments are the point; the not-a-string damage filters header values
    quiet = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
             HealthCheck.filter_too_much]
    return settings(max_examples=max(1, int(examples * _SCALE)), deadline=None, derandomize=True,
                    database=None, suppress_health_check=quiet)


@dataclass(frozen=True)
class Gates:
    """The intake as the runner builds it (runtime.py), with keys on disk, clear text allowed or not."""

    open: RequestGate
    strict: RequestGate
    keys: KeySet
    stranger: KeySet
    """Another runner's RSA key and another experimenter's signing key: in no directory of ours."""


@pytest.fixture(scope="module")
def gates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gates]:
    root: Path = tmp_path_factory.mktemp("fuzz-keys")
    keys, stranger = KeySet.generate(), KeySet.generate()
    keys.write_runner_keys(root / "message", root / "signing", QUEUE_PREFIX)
    (root / "signing" / "rmq_other").write_text(stranger.authorized_key.replace("fuzz@test", "other"))
    (root / "signing" / "info").write_text("placeholder\n")
    keyring = Keyring(root / "message", root / "signing", root / "response")
    yield Gates(RequestGate(clear_text=True, max_size=DEFAULT_MAX_MESSAGE_SIZE, keyring=keyring),
                RequestGate(clear_text=False, max_size=DEFAULT_MAX_MESSAGE_SIZE, keyring=keyring),
                keys, stranger)


# --- the property -------------------------------------------------------------------------------------------


def _use(request: Request) -> None:
    """What the runner derives from a request once it has it (masking, admission, locators): must not raise.
    Not timed, and no redactor for megabyte secrets: that cost has its own test below."""
    if sum(map(len, request.secrets())) <= _REDACTOR_SECRETS_MAX:
        request.redactor().mask("a line of output")
    env_request = request.with_env_credentials()
    Demand.of(request.experiment.resources).describe()
    for artifact in env_request.experiment.artifacts.values():
        _ = artifact.locator, artifact.access_credentials
    mask_mapping(request.raw)


def _check_reason(error: RequestInvalid) -> None:
    reason = str(error)
    assert reason and len(reason) <= _REASON_MAX, f"reason of {len(reason)} characters: {reason[:200]!r}"
    assert "\n" not in reason and "\r" not in reason, f"a reason that can forge log lines: {reason!r}"
    assert not any(secret in reason for secret in _FIXTURE_SECRETS), f"a credential in the reason: {reason!r}"
    assert error.field is None or isinstance(error.field, str)


def take(gate: RequestGate | None, body: bytes, queue: str = QUEUE) -> Request | RequestInvalid:
    """One message through ``gate.open`` (``parse_request`` when None), timed; anything but a Request or a
    RequestInvalid propagates and fails the test with its traceback."""
    start = time.perf_counter()
    try:
        result: Request | RequestInvalid = parse_request(body) if gate is None else gate.open(body, queue)
    except RequestInvalid as error:
        result = error
    elapsed = time.perf_counter() - start
    assert elapsed < LIMIT_S, f"{elapsed:.2f}s for a {len(body)}-byte message"
    if isinstance(result, RequestInvalid):
        _check_reason(result)
    else:
        assert isinstance(result, Request)
        _use(result)
    return result


def outcome(result: Request | RequestInvalid) -> str:
    return "request" if isinstance(result, Request) else type(result).__name__


def same_verdict(got: Request | RequestInvalid, want: Request | RequestInvalid) -> None:
    """Both the same Request, or both the same refusal (type and reason)."""
    if isinstance(want, Request):
        assert isinstance(got, Request), f"refused ({got}) what the parser accepts"
        assert got == want
    else:
        assert isinstance(got, RequestInvalid), "accepted what the parser refuses"
        assert (type(got), str(got)) == (type(want), str(want))


def accepted_and_refused(seen: Counter[str]) -> None:
    """A generator that only ever makes junk, or only valid input, tests nothing: require both."""
    print(f"outcomes: {dict(seen)}")  # shown with -s / -rA
    assert seen["request"] > 0, f"nothing was accepted: {dict(seen)}"
    assert sum(seen.values()) > seen["request"], f"nothing was refused: {dict(seen)}"


# --- clear requests -----------------------------------------------------------------------------------------


def test_the_generators_use_the_runners_size_limit() -> None:
    assert MAX_MESSAGE_SIZE == DEFAULT_MAX_MESSAGE_SIZE


def _clear_case(gates: Gates, body: bytes) -> str:
    """The parser's verdict; the same from the gate when clear text is allowed; a refusal when it is not."""
    parsed = take(None, body)
    if len(body) > DEFAULT_MAX_MESSAGE_SIZE:
        refused = take(gates.open, body)
        assert isinstance(refused, RequestRefused) and "max-message-size" in str(refused)
    elif isinstance(parsed, RequestInvalid) and parsed.field == "message":  # envelope-shaped: the gate's job
        assert isinstance(take(gates.open, body), RequestInvalid), "an unsigned envelope accepted"
    else:
        same_verdict(take(gates.open, body), parsed)
    strict = take(gates.strict, body)
    assert isinstance(strict, RequestInvalid), "clear text accepted with --clear-text-messages=false"
    return outcome(parsed)


def test_the_fixtures_are_accepted_in_clear_and_sealed(gates: Gates) -> None:
    """The starting points of the mutations are real, valid client messages, and the test's envelopes are
    what the gate opens."""
    assert len(FIXTURE_FILES) >= 6
    for path in FIXTURE_FILES:
        assert _clear_case(gates, path.read_bytes()) == "request"
        sealed = json.dumps(envelope(gates.keys, path.read_bytes(), bytes(range(32)), bytes(24))).encode()
        same_verdict(take(gates.strict, sealed), parse_request(path.read_bytes()))


@guard(120)
def test_raw_bytes(gates: Gates) -> None:
    seen: Counter[str] = Counter()

    @fuzz(600)
    @given(st.one_of(RAW_BYTES, st.sampled_from(sorted(DOCS)).map(lambda n: json.dumps(DOCS[n]).encode())))
    def run(body: bytes) -> None:
        seen[_clear_case(gates, body)] += 1

    run()
    accepted_and_refused(seen)


@guard(240)
def test_mutated_client_messages(gates: Gates) -> None:
    seen: Counter[str] = Counter()

    @fuzz(2000)
    @given(mutated_documents())
    def run(body: bytes) -> None:
        seen[_clear_case(gates, body)] += 1

    run()
    accepted_and_refused(seen)


@guard(120)
def test_damaged_bytes(gates: Gates) -> None:
    seen: Counter[str] = Counter()
    fixtures = st.sampled_from(FIXTURE_FILES).map(lambda p: p.read_bytes())

    @fuzz(1000)
    @given(damaged_bytes(st.one_of(fixtures, mutated_documents())))
    def run(body: bytes) -> None:
        seen[_clear_case(gates, body)] += 1

    run()
    accepted_and_refused(seen)


# --- envelopes ----------------------------------------------------------------------------------------------


def _envelope_case(gates: Gates, case: Case) -> str:
    got = take(gates.open, case.body, case.queue)
    if case.expect is Expect.REFUSED:
        assert isinstance(got, RequestInvalid), f"accepted an envelope damaged by {case.damage}"
    elif case.expect is Expect.SAME_AS_CLEAR:
        same_verdict(got, take(None, case.clear))
    strict = take(gates.strict, case.body, case.queue)
    if _still_an_envelope(case.body):  # the clear-text policy plays no part for envelopes
        assert outcome(strict) == outcome(got) and str(strict) == str(got)
    else:  # damaged bytes can turn it into something else ("lessage": clear text)
        assert isinstance(strict, RequestInvalid)
    if isinstance(got, RequestInvalid) and not isinstance(got, RequestRefused):
        return "invalid inside" if case.expect is Expect.SAME_AS_CLEAR else "RequestInvalid"
    return outcome(got)


def _still_an_envelope(body: bytes) -> bool:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and is_envelope(doc)


@guard(240)
def test_damaged_envelopes(gates: Gates) -> None:
    """Real envelopes, parts damaged (usually re-signed so decryption is reached): refused when they must be,
    the plaintext's own verdict when the damage is only advisory."""
    seen: Counter[str] = Counter()

    @fuzz(1000)
    @given(envelopes(gates.keys, gates.stranger))
    def run(case: Case) -> None:
        seen[_envelope_case(gates, case)] += 1

    run()
    accepted_and_refused(seen)
    assert seen["RequestRefused"] > 0 and seen["invalid inside"] > 0, dict(seen)


@guard(60)
@pytest.mark.parametrize("kind", DAMAGE_KINDS)
def test_every_kind_of_damage(gates: Gates, kind: str) -> None:
    """Each damage on its own, by name (generation favours the first choices of a list, so the mixed test
    above may see some kinds rarely): 20 examples each, about 900 in all."""
    seen: Counter[str] = Counter()

    @fuzz(20)
    @given(envelopes(gates.keys, gates.stranger, kind=kind))
    def run(case: Case) -> None:
        seen[_envelope_case(gates, case)] += 1

    run()
    assert sum(seen.values()) >= min(20, int(20 * _SCALE)), dict(seen)


@guard(120)
def test_intact_envelopes_around_hostile_plaintext(gates: Gates) -> None:
    """Valid crypto around mutated client messages: whatever was sealed, the gate answers as the parser
    does on the plaintext (so the parser's hardening holds behind the decryption too)."""
    seen: Counter[str] = Counter()
    plaintexts = st.one_of(mutated_documents(), damaged_bytes(mutated_documents()), RAW_BYTES)

    @fuzz(700)
    @given(envelopes(gates.keys, gates.stranger, clear_bodies=plaintexts, max_damage=0))
    def run(case: Case) -> None:
        assert case.expect is Expect.SAME_AS_CLEAR or case.damage == ("larger than the size limit",)
        seen[_envelope_case(gates, case)] += 1

    run()
    accepted_and_refused(seen)


@guard(120)
def test_random_envelopes(gates: Gates) -> None:
    """Envelope-shaped junk, random parts, sometimes validly signed: always refused, never a crash."""
    seen: Counter[str] = Counter()

    @fuzz(400)
    @given(random_envelopes(gates.keys))
    def run(case: Case) -> None:
        seen[_envelope_case(gates, case)] += 1

    run()
    print(f"outcomes: {dict(seen)}")
    assert seen["RequestRefused"] > 0 and "request" not in seen, dict(seen)


# --- the worst cases, one by one ----------------------------------------------------------------------------


def test_the_slowest_inputs_stay_within_the_bound(gates: Gates) -> None:
    """The generators' worst cases on their own, with the same bound: nesting past and just under the
    decoder's limit, multi-megabyte strings, thousands of digits, a body just over the size limit."""
    base = json.loads(FIXTURE_FILES[0].read_bytes())
    deep = b'{"a":[' * 490 + b'{"credentials":{"aws":{"secret_access_key":"deep"}}}' + b"]}" * 490
    bodies = [
        b"[" * 2_000_000,
        b'{"experiment":' + b"[" * 900 + b"]" * 900 + b"}",
        json.dumps({**base, "config": {**base["config"], "database": "@deep@"}}).encode().replace(
            b'"@deep@"', deep),
        json.dumps({**base, "experiment": {**base["experiment"], "key": "k" * 3_000_000}}).encode(),
        b'{"experiment":{"key":"k","filename":"f","artifacts":{},"time_added":1' + b"0" * 4299 + b"}}",
        b'{"experiment":{"key":"k","filename":"f","artifacts":{},"max_duration":"' + b"1m" * 500_000 + b'"}}',
        b'{"message":{"payload":"' + b"A" * (DEFAULT_MAX_MESSAGE_SIZE - 40) + b'","signature":"x"}}',
    ]
    for body in bodies:
        for gate in (None, gates.open, gates.strict):
            take(gate, body)


def test_an_oversized_message_is_refused_before_it_is_parsed(gates: Gates) -> None:
    """Over the limit by one byte, and built so that parsing it would be slow or fail differently."""
    body = b"[" * (DEFAULT_MAX_MESSAGE_SIZE + 1)
    for gate in (gates.open, gates.strict):
        refused = take(gate, body)
        assert isinstance(refused, RequestRefused) and "max-message-size" in str(refused)


def _one_huge_secret() -> dict[str, Any]:
    doc = copy.deepcopy(DOCS["hello_plain"])
    secret = "".join(random.Random(9).choices(string.ascii_letters + string.digits, k=1_000_000))
    doc["experiment"]["artifacts"]["workspace"]["credentials"]["aws"]["secret_access_key"] = secret
    return doc


def _many_secrets() -> dict[str, Any]:
    doc = copy.deepcopy(DOCS["hello_plain"])
    chars = random.Random(9)
    doc["config"]["env"] = {f"K{i}_TOKEN": "".join(chars.choices(string.ascii_letters, k=10))
                            for i in range(100_000)}
    return doc


@pytest.mark.parametrize("build", [_one_huge_secret, _many_secrets], ids=["one-huge", "many"])
def test_the_secrets_a_message_can_carry_are_masked_within_the_bound(
        build: Callable[[], dict[str, Any]]) -> None:
    """Secrets as big or as many as a message allows are refused at intake, or get their redactor (built on
    the event loop by the executor) within the bound a message is parsed in."""
    body = json.dumps(build()).encode()
    assert len(body) <= DEFAULT_MAX_MESSAGE_SIZE
    request = take(None, body)
    if isinstance(request, RequestInvalid):
        return
    start = time.perf_counter()
    redactor = request.redactor()
    elapsed = time.perf_counter() - start
    some = max(request.secrets(), key=len)
    assert redactor.mask(f"x {some} y") == "x **** y"
    assert elapsed < LIMIT_S, f"{elapsed:.2f}s to build the redactor for {len(request.secrets())} secrets"
