"""Hypothesis strategies for hostile envelopes (issue 9's intake fuzz test).

Each case is a real envelope (support/envelope_builder.py, spec/message.md §7) for some clear body (a client
message, or one of hostile_json's mutations), with parts damaged: the wrapped key, the sealed box, the base64,
the comma count, the signature, the fingerprint, the clear header, the queue it arrives on. Each case says
what a correct runner must do with it, so the test checks more than "no crash":

* ``SAME_AS_CLEAR``: nothing that matters was damaged (the header is advisory, the fingerprint only logged),
  so the gate must give exactly what the parser gives for the clear body.
* ``REFUSED``: the signature cannot verify, no key serves the queue, or the payload cannot decrypt: a
  RequestRefused.
* ``ANY``: either way is defensible (a lenient base64 reading, say); only the error types and time count.
"""

from __future__ import annotations

import base64
import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

import nacl.secret
from hypothesis import strategies as st
from support.envelope_builder import KeySet, b64, header
from support.hostile_json import DOCS, JSON_VALUES, RAW_BYTES, damaged_bytes, mutated_documents

MAX_MESSAGE_SIZE = 4 << 20
"""The documented default of --max-message-size (spec/options.md)."""
QUEUE_PREFIX = "rmq_fuzz"
QUEUE = "rmq_fuzz_queue"
"""The queue the envelopes arrive on: the key file ``rmq_fuzz`` is the longest prefix of its name."""


class Expect(enum.Enum):
    SAME_AS_CLEAR = "same as the clear body"
    REFUSED = "refused"
    ANY = "any verdict"


@dataclass(frozen=True)
class Case:
    body: bytes
    queue: str
    clear: bytes
    """The plaintext sealed inside."""
    expect: Expect
    damage: tuple[str, ...]

    def __repr__(self) -> str:  # what hypothesis prints for a failing example: short and useful
        return (f"Case(expect={self.expect.name}, damage={self.damage}, queue={self.queue!r}, "
                f"clear={self.clear[:120]!r}..., body={self.body[:300]!r}...)")


def _worse(a: Expect, b: Expect) -> Expect:
    """REFUSED beats ANY beats SAME_AS_CLEAR: one fatal damage decides."""
    order = [Expect.SAME_AS_CLEAR, Expect.ANY, Expect.REFUSED]
    return max(a, b, key=order.index)


_FIXTURE_BODIES = st.sampled_from(sorted(DOCS)).map(lambda name: json.dumps(DOCS[name]).encode())
CLEAR_BODIES = st.one_of(
    _FIXTURE_BODIES,
    _FIXTURE_BODIES,
    mutated_documents(),
    damaged_bytes(_FIXTURE_BODIES),
    RAW_BYTES,
    st.just(b'{"message": {"payload": "a,b", "signature": "x", "fingerprint": "y"}}'),  # an envelope inside
)
"""Plaintexts to seal: mostly real messages (so decryption success is common), then hostile ones."""

_HEADER_VALUES = st.one_of(
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.text(st.characters(codec=None), max_size=20).map(lambda t: json.dumps(t).encode()),
    st.sampled_from([b"1" + b"0" * 4000, b"-1e308", b"[[[[[[[[[[]]]]]]]]]]", b'{"cpus":"1e999"}',
                     b'{"cpus":-1,"ram":"-3g","gpus":99999999999999999999}', b'"\\u0000"', b'{"a":1,"a":2}']),
)
"""Valid JSON only: a broken header breaks the whole document, which is another test's business."""

_QUEUES = st.one_of(
    st.just(QUEUE),
    st.sampled_from([QUEUE_PREFIX, QUEUE_PREFIX + "x" * 300, "rmq_fuz", "rmq_", "", "other", "../" + QUEUE,
                     "rmq_fuzz/../../etc/passwd", "rmq_fuzz\x00", "RMQ_FUZZ_QUEUE", "\udc80", ".rmq_fuzz"]),
    st.text(max_size=30),
)


def _serves(queue: str) -> bool:
    return queue.startswith(QUEUE_PREFIX)


@st.composite
def envelopes(draw: st.DrawFn, keys: KeySet, stranger: KeySet, clear_bodies: st.SearchStrategy[bytes]
              = CLEAR_BODIES, max_damage: int = 3, kind: str | None = None) -> Case:
    """A sealed, signed envelope for a drawn plaintext, then up to ``max_damage`` damages; with ``kind``
    (one of DAMAGE_KINDS, ``family`` or ``family:detail``) exactly that one. Hypothesis favours a list's
    first choices, so a test that must see every kind of damage asks for each by name."""
    clear = draw(clear_bodies)
    key = draw(st.binary(min_size=32, max_size=32))
    nonce = draw(st.binary(min_size=24, max_size=24))
    wrapped = keys.wrap(key)
    sealed = bytes(nacl.secret.SecretBox(key).encrypt(clear, nonce))
    pristine = b64(wrapped) + "," + b64(sealed)
    expect, damage = Expect.SAME_AS_CLEAR, []

    def damaged(what: str, verdict: Expect) -> None:
        nonlocal expect
        damage.append(what)
        expect = _worse(expect, verdict)

    family, _, detail = (kind or "").partition(":")
    choice = detail or None
    ops = [family] if kind else draw(st.lists(st.sampled_from(_OPS), max_size=max_damage, unique=True))
    # (unique: a later op must not undo an earlier one's damage, a fingerprint emptied then replaced, or the
    # verdicts would lie)
    # the payload's bytes first, then its text, then the signature over the result
    resign = draw(st.integers(0, 9)) < 7  # usually: so that verification passes and decryption must cope
    for op in ops:
        if op == "wrapped":
            wrapped, what, verdict = _damage_bytes(draw, wrapped, "wrapped", choice)
            damaged(what, verdict)
        elif op == "sealed":
            sealed, what, verdict = _damage_bytes(draw, sealed, "sealed", choice)
            damaged(what, verdict)
        elif op == "wrong-key-size":
            size = draw(st.sampled_from([0, 1, 16, 31, 33, 64, 190]))
            wrapped = keys.wrap(draw(st.binary(min_size=size, max_size=size)))
            damaged(f"wrapped a {size}-byte key", Expect.REFUSED)
        elif op == "other-runner":
            wrapped = stranger.wrap(key)
            damaged("wrapped for another runner", Expect.REFUSED)
    payload = b64(wrapped) + "," + b64(sealed)
    for op in ops:
        if op == "text":
            payload, what, verdict = _damage_text(draw, payload, choice)
            damaged(what, verdict)
    signature: Any = keys.sign(payload if resign else pristine)
    if payload != pristine and not resign and "signature" not in ops:  # (a signature op replaces it)
        damaged("signature over the undamaged payload", Expect.REFUSED)
    fingerprint: Any = keys.fingerprint
    message: dict[str, Any] = header(_loads(clear))
    fragments: dict[str, bytes] = {}
    for op in ops:
        if op == "signature":
            signature, what, verdict = _damage_signature(draw, keys, stranger, payload, choice)
            damaged(what, verdict)
        elif op == "fingerprint":
            fingerprint, what, verdict = _damage_fingerprint(draw, stranger, choice)
            damaged(what, verdict)
        elif op == "header":
            name = draw(st.sampled_from(["experiment", "time_added", "experiment_lifetime",
                                         "resources_needed", "extra"]))
            fragments[f"@@slot-{name}@@"] = draw(_HEADER_VALUES)
            message[name] = f"@@slot-{name}@@"
            damaged(f"header {name}", Expect.SAME_AS_CLEAR)
    message.update(payload=payload, signature=signature, fingerprint=fingerprint)
    for name in ("payload", "signature", "fingerprint"):
        if message[name] is _MISSING:
            del message[name]
    if "not-a-string" in ops:
        name = draw(st.sampled_from(["payload", "signature", "fingerprint"]))
        fragments[f"@@slot-{name}@@"] = draw(_HEADER_VALUES.filter(lambda b: not b.startswith(b'"')))
        message[name] = f"@@slot-{name}@@"
        damaged(f"{name} not a string", Expect.REFUSED)
    queue = QUEUE
    if "queue" in ops:
        queue = draw(_QUEUES)
        damaged(f"queue {queue[:40]!r}", Expect.SAME_AS_CLEAR if _serves(queue) else Expect.REFUSED)
    order = draw(st.permutations(list(message)))
    doc: dict[str, Any] = {"message": {k: message[k] for k in order}}
    if "outer" in ops:
        doc = {**doc, **{k: v for k, v in draw(st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=3))
                         .items() if k != "message"}}
        damaged("extra top-level keys", Expect.ANY)
    body = json.dumps(doc, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    for slot, fragment in fragments.items():
        body = body.replace(json.dumps(slot).encode(), fragment, 1)
    if "bytes" in ops:
        body = draw(damaged_bytes(st.just(body)))
        damaged("envelope bytes", Expect.ANY)
    if len(body) > MAX_MESSAGE_SIZE:
        damaged("larger than the size limit", Expect.REFUSED)
    if not _valid_utf8(body):  # a lone surrogate in a fingerprint, say: the body is no longer UTF-8 JSON
        damaged("not UTF-8", Expect.ANY)
    return Case(body, queue, clear, expect, tuple(damage))


_MISSING = object()
_OPS = ["wrapped", "sealed", "wrong-key-size", "other-runner", "text", "signature", "fingerprint", "header",
        "not-a-string", "queue", "outer", "bytes"]
BYTE_DAMAGE = ["flip", "truncate", "extend", "random", "empty", "nonce-only"]
TEXT_DAMAGE = ["no-comma", "two-commas", "three-parts", "swap", "empty", "trailing-comma", "leading-comma",
               "bad-char", "urlsafe", "unpadded", "whitespace", "non-ascii", "huge", "lower"]
SIGNATURE_DAMAGE = ["flip", "length", "stranger", "ssh-wire", "ssh-wire-bad", "not-base64", "empty",
                    "missing", "over-json", "urlsafe"]
FINGERPRINT_DAMAGE = ["stranger", "garbage", "empty", "missing"]
DAMAGE_KINDS = [
    *(f"wrapped:{d}" for d in BYTE_DAMAGE), *(f"sealed:{d}" for d in BYTE_DAMAGE),
    *(f"text:{d}" for d in TEXT_DAMAGE), *(f"signature:{d}" for d in SIGNATURE_DAMAGE),
    *(f"fingerprint:{d}" for d in FINGERPRINT_DAMAGE),
    "wrong-key-size", "other-runner", "header", "not-a-string", "queue", "outer", "bytes",
]
"""Every kind of damage :func:`envelopes` knows, by name."""


def _loads(body: bytes) -> Any:
    """The clear body as the header's source, when copying from it cannot itself break the envelope (no
    NaN/Infinity, no deep nesting): the header must stay harmless unless a test damages it on purpose."""
    try:
        doc = json.loads(body)
        json.dumps(doc, allow_nan=False)
    except (ValueError, RecursionError):
        return None
    return doc if _depth(doc) < 40 else None


def _depth(node: Any) -> int:
    deepest, stack = 0, [(node, 1)]
    while stack:
        value, level = stack.pop()
        deepest = max(deepest, level)
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, level + 1) for child in children)
    return deepest


def _valid_utf8(body: bytes) -> bool:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _damage_bytes(draw: st.DrawFn, data: bytes, name: str, choice: str | None) -> tuple[bytes, str, Expect]:
    """Every one of these changes the bytes, and any change breaks OAEP or the MAC."""
    before = data
    op = choice or draw(st.sampled_from(BYTE_DAMAGE))
    if not data and op in ("flip", "truncate"):
        op = "extend"
    if op == "flip":
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    elif op == "truncate":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif op == "extend":
        data = data + draw(st.binary(min_size=1, max_size=600))
    elif op == "random":
        data = draw(st.binary(min_size=0, max_size=700))
    elif op == "empty":
        data = b""
    else:
        data = data[:draw(st.sampled_from([23, 24, 39, 40]))]
    if data == before:  # a 40-byte box cut to 40, an empty part emptied: no damage at all
        return data, f"{name} {op} (unchanged)", Expect.SAME_AS_CLEAR
    return data, f"{name} {op}", Expect.REFUSED


def _damage_text(draw: st.DrawFn, payload: str, choice: str | None) -> tuple[str, str, Expect]:
    wrapped, _, sealed = payload.partition(",")
    op = choice or draw(st.sampled_from(TEXT_DAMAGE))
    refused = Expect.REFUSED
    if op == "no-comma":
        payload = wrapped + sealed
    elif op == "two-commas":
        payload = wrapped + ",," + sealed
    elif op == "three-parts":
        payload = f"{wrapped},{sealed},{sealed}"
    elif op == "swap":
        payload = f"{sealed},{wrapped}"
    elif op == "empty":
        payload = draw(st.sampled_from(["", ",", ",,", " "]))
    elif op == "trailing-comma":
        payload = payload + ","
    elif op == "leading-comma":
        payload = "," + payload
    elif op == "bad-char":
        at = draw(st.integers(0, len(payload) - 1))
        bad = draw(st.sampled_from(["*", "!", "\x00", "\\", '"', "%", "."]))
        payload = payload[:at] + bad + payload[at + 1:]
    elif op == "urlsafe":
        changed = payload.replace("+", "-").replace("/", "_")
        refused = Expect.ANY if changed == payload else Expect.REFUSED
        payload = changed
    elif op == "unpadded":
        changed = ",".join(part.rstrip("=") for part in payload.split(","))
        refused = Expect.ANY  # a lenient decoder reads unpadded base64 right (or nothing was stripped)
        payload = changed
    elif op == "whitespace":
        at = draw(st.integers(0, len(payload)))
        payload = payload[:at] + draw(st.sampled_from([" ", "\n", "\r\n", "\t"])) + payload[at:]
        refused = Expect.ANY  # base64 decoders may skip whitespace
    elif op == "non-ascii":
        at = draw(st.integers(0, len(payload)))
        payload = payload[:at] + draw(st.sampled_from(["é", "\u2028", "\ud800", "\U0001f600", "\uff21"])) \
            + payload[at:]
    elif op == "huge":
        payload = payload + "A" * draw(st.sampled_from([4, 4000, 400_000]))
        refused = Expect.REFUSED  # a longer part is another key (or box) than the one sealed
    else:
        changed = payload.lower()
        refused = Expect.ANY if changed == payload else Expect.REFUSED
        payload = changed
    return payload, f"payload {op}", refused


def _damage_signature(draw: st.DrawFn, keys: KeySet, stranger: KeySet, payload: str,
                      choice: str | None) -> tuple[Any, str, Expect]:
    """Replaces the signature: with a valid one in another encoding (ANY), or with one that cannot verify."""
    raw = base64.b64decode(keys.sign(payload))
    op = choice or draw(st.sampled_from(SIGNATURE_DAMAGE))
    if op == "flip":
        at = draw(st.integers(0, 63))
        flipped = raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1:]
        return b64(flipped), "signature flip", Expect.REFUSED
    if op == "length":
        size = draw(st.integers(0, 130).filter(lambda n: n != 64))
        return b64((raw * 3)[:size]), f"signature of {size} bytes", Expect.REFUSED
    if op == "stranger":
        return stranger.sign(payload), "signed by a key not in the directory", Expect.REFUSED
    if op == "ssh-wire":  # accepted by the Go runner, and a valid signature: either verdict is defensible
        wire = struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 64) + raw
        return b64(wire), "signature in SSH wire format", Expect.ANY
    if op == "ssh-wire-bad":
        kind = draw(st.sampled_from([b"ssh-rsa", b"", b"ssh-ed25519\x00"]))
        claimed = draw(st.sampled_from([63, 64, 2**32 - 1]))
        cut = draw(st.integers(0, 64))
        wire = struct.pack(">I", len(kind)) + kind + struct.pack(">I", claimed) + raw[:cut]
        return b64(wire), "broken SSH wire signature", Expect.REFUSED
    if op == "not-base64":
        return draw(st.sampled_from(["***", "a", "====", "\u00e9" * 88, b64(raw)[:-2] + "!!"])), \
            "signature not base64", Expect.REFUSED
    if op == "empty":
        return "", "signature empty", Expect.REFUSED
    if op == "missing":
        return _MISSING, "signature missing", Expect.REFUSED
    if op == "over-json":
        return keys.sign(json.dumps({"payload": payload})), "signature over other bytes", Expect.REFUSED
    # a valid signature in the URL-safe alphabet: refusing it (Go's StdEncoding) or reading it is defensible
    return b64(raw).replace("+", "-").replace("/", "_"), "signature urlsafe", Expect.ANY


def _damage_fingerprint(draw: st.DrawFn, stranger: KeySet, choice: str | None) -> tuple[Any, str, Expect]:
    """Only a missing or empty fingerprint refuses: a wrong one is logged, the signature decides (spec §7)."""
    op = choice or draw(st.sampled_from(FINGERPRINT_DAMAGE))
    if op == "stranger":
        return stranger.fingerprint, "fingerprint of another key", Expect.SAME_AS_CLEAR
    if op == "garbage":
        return draw(st.text(st.characters(codec=None), min_size=1, max_size=80)), "fingerprint garbage", \
            Expect.SAME_AS_CLEAR
    if op == "empty":
        return "", "fingerprint empty", Expect.REFUSED
    return _MISSING, "fingerprint missing", Expect.REFUSED


@st.composite
def random_envelopes(draw: st.DrawFn, keys: KeySet) -> Case:
    """Envelope-shaped junk: random parts, sometimes validly signed (then decryption must refuse it)."""
    wrapped = draw(st.one_of(st.binary(max_size=300), st.binary(min_size=256, max_size=256)))
    sealed = draw(st.binary(max_size=200))
    payload = draw(st.one_of(st.just(b64(wrapped) + "," + b64(sealed)), st.text(max_size=200)))
    signed = draw(st.booleans())
    signature = keys.sign(payload) if signed else b64(draw(st.binary(min_size=64, max_size=64)))
    message = draw(st.fixed_dictionaries(
        {"payload": st.just(payload), "signature": st.just(signature)},
        optional={"fingerprint": st.one_of(st.just(keys.fingerprint), st.text(max_size=50)),
                  "experiment": JSON_VALUES, "resources_needed": JSON_VALUES, "time_added": JSON_VALUES}))
    body = json.dumps({"message": message}).encode()
    return Case(body, QUEUE, b"", Expect.REFUSED, ("random parts",) + (("re-signed",) if signed else ()))
