"""Hypothesis strategies for hostile request bodies (issue 9's intake fuzz test).

Random bytes rarely get past ``json.loads``, so most cases start from a real client message
(tests/fixtures/studioml) and change it in a way a hostile or broken producer could: one field replaced by a
wrong type, an absurd number, a NaN/Infinity token, deep nesting, a long or poisoned string (NUL, lone
surrogate, invalid UTF-8), a duplicate or renamed key; then, sometimes, the serialised bytes are cut, flipped
or spliced. Fragments are raw JSON *bytes*, so they can hold what ``json.dumps`` never writes.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import strategies as st
from support.fixtures import FIXTURES

FIXTURE_FILES = sorted(p for p in FIXTURES.glob("*.json") if not p.name.endswith(".envelope.json"))
DOCS: dict[str, dict[str, Any]] = {p.stem: json.loads(p.read_bytes()) for p in FIXTURE_FILES}

_SLOT = "@@fuzz-slot@@"
_KEY_SLOT = "@@fuzz-key-slot@@"
_DELETE = object()

JsonPath = tuple[str | int, ...]


def _paths(node: Any, prefix: JsonPath = ()) -> list[JsonPath]:
    """Every place in a document (lists: the first two items and the last one)."""
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        picks = sorted({i for i in (0, 1, len(node) - 1) if 0 <= i < len(node)})
        for i in picks:
            found += _paths(node[i], (*prefix, i))
    return found


def get(doc: Any, path: JsonPath) -> Any:
    for part in path:
        doc = doc[part]
    return doc


PLACES: list[tuple[str, JsonPath]] = [(name, path) for name, doc in DOCS.items() for path in _paths(doc)]
OBJECTS: list[tuple[str, JsonPath]] = [
    (name, path) for name, path in PLACES if isinstance(get(DOCS[name], path), dict)
]

# --- fragments: raw JSON bytes for one value --------------------------------------------------------------

_SCALAR = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
JSON_VALUES = st.recursive(
    _SCALAR,
    lambda children: (st.lists(children, max_size=4)
                      | st.dictionaries(st.text(max_size=6), children, max_size=4)),
    max_leaves=10,
)


def _dumped(value: Any) -> bytes:
    return json.dumps(value).encode()


_NUMBERS = st.sampled_from([
    b"NaN", b"-NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"1e-999", b"-0", b"-0.0", b"0e0",
    b"2147483648", b"-2147483649", b"9223372036854775808", b"18446744073709551616", b"1.7976931348623157e308",
    b"4.9e-324", b"1" + b"0" * 4400, b"-" + b"9" * 5000, b"0." + b"0" * 4000 + b"1", b"1e+308", b"1E400",
    b"01", b"+1", b".5", b"1.", b"0x10", b"1_000", b"3.8", b"3.10", b"1e2",
]) | st.integers().map(lambda i: str(i).encode()) | st.floats().map(lambda f: repr(f).encode())


def _nested(depth: int, kind: int) -> bytes:
    if kind == 0:
        return b"[" * depth + b"]" * depth
    if kind == 1:
        return b'{"a":' * depth + b"1" + b"}" * depth
    if kind == 2:
        return b"[" * depth  # never closed
    return b'[{"credentials":' * depth + b"null" + b"}]" * depth


_NESTING = st.builds(_nested, st.sampled_from([2, 64, 500, 990, 1000, 3000, 20_000, 200_000]),
                     st.integers(0, 3))

_POISON_STRINGS = st.sampled_from([
    b'""', b'"\\u0000"', b'"a\\u0000b"', b'"\\ud800"', b'"\\udfff"', b'"x\\udc80y"', b'"\\ud83d\\ude00"',
    b'"\\ud83d"', b'"\x00"', b'"\n"', b'"\x1b[31mred"', b'"\\u2028"', b'"\xff"', b'"\xc0\xaf"',
    b'"\xed\xa0\x80"', b'"\xf4\x90\x80\x80"', b'"\xe2\x82"', b'"\xef\xbb\xbf"', b'"\\"', b'"\\x41"',
    b'"\\u12"', b'"..\\/..\\/etc\\/passwd"', b'"/etc/shadow"', b'"file:///etc/passwd"', b'"../../x.tar"',
    b'"s3://h:9000/b/../../k.tar"', b'"s3://[::1"', b'"http://u:p@[::1]:99999/x"', b'"%2e%2e/%2e%2e"',
    b'"C:\\\\Windows"', b'"\\\\\\\\server\\\\share"', b'"~root"', b'"$(id)"', b'"`id`"', b'"; rm -rf /"',
    b'"1e999g"', b'"99999999999999999999999999g"', b'"-1g"', b'"nan"', b'"inf"', b'"1.5.5m"',
    b'"' + b"9" * 5000 + b'h"', b'"\\u0661\\u0662"', b'"\\uff11\\uff12"', b'"3g\\u0000"', b'" 3 g "',
    b'"48h2m10s"', b'"1.5h"', b'"300ms"', b'"\\u00b5s"', b'"0"', b'"-5m"', b'"1d"', b'"PT1H"',
    b'"9223372036854775807ns"', b'"1e308h"', b'"' + b"1m" * 3000 + b'"',
])
_TEXT = st.builds(
    lambda text, ascii_only: json.dumps(text, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass"),
    st.text(st.characters(codec=None), max_size=40),  # lone surrogates included
    st.booleans(),
)
_LONG = st.builds(lambda n, c: b'"' + c * n + b'"', st.sampled_from([1000, 70_000, 1_000_000]),
                  st.sampled_from([b"a", b"\\u0000", b"\xc3\xa9", b"/", b"\\\\"]))
_DUPLICATES = st.sampled_from([
    b'{"a":1,"a":2}', b'{"key":"x","key":null}', b'{"mutable":true,"mutable":"yes"}',
    b'{"aws":{"access_key":"a"},"aws":{"access_key":"a","secret_access_key":"b"}}',
    b'{"":1}', b'{"\\u0000":1}', b'{"\\ud800":1}', b'{"__proto__":{}}',
])
_BROKEN = st.sampled_from([
    b"", b"nul", b"tru", b"[1,]", b"{,}", b'{"a"}', b'{"a":}', b"[", b"}", b'"unterminated', b"'single'",
    b"undefined", b"None", b"True", b"/* c */ 1", b"1 // c", b"\x00", b"\xff\xfe", b"[1 2]",
])

FRAGMENTS = st.one_of(
    JSON_VALUES.map(_dumped),
    _NUMBERS,
    _NESTING,
    _POISON_STRINGS,
    _TEXT,
    _LONG,
    _DUPLICATES,
    _BROKEN,
)
"""One hostile JSON value, as raw bytes (often not JSON at all)."""

_KEY_FRAGMENTS = st.one_of(
    _TEXT,
    st.sampled_from([b'""', b'"."', b'".."', b'"a/b"', b'"..\\\\x"', b'"a\\u0000"', b'"\\ud800"', b'"\\n"',
                     b'"\\u001b[2J"', b'"\xff"', b'"=X"', b'"A=B"', b'"_metadata"', b'"workspace"',
                     b'"' + b"k" * 100_000 + b'"', b"1", b"null", b"[]"]),
)
"""A hostile object key, as raw bytes (a non-string key is broken JSON, on purpose)."""


def _set(doc: Any, path: JsonPath, value: Any) -> Any:
    """A copy of ``doc`` with ``value`` at ``path`` (``_DELETE`` removes it; the root can be replaced)."""
    if not path:
        return value
    doc = copy.deepcopy(doc)
    parent = get(doc, path[:-1])
    if value is _DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


def _serialise(doc: Any, compact: bool, ascii_only: bool) -> bytes:
    separators = (",", ":") if compact else (", ", ": ")
    return json.dumps(doc, separators=separators, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def _quoted(sentinel: str) -> bytes:
    return json.dumps(sentinel).encode()


@st.composite
def mutated_documents(draw: st.DrawFn) -> bytes:
    """A real client message with one or two structural changes, serialised (bytes, maybe not JSON)."""
    name, path = draw(st.sampled_from(PLACES))
    doc: Any = DOCS[name]
    op = draw(st.sampled_from(["replace", "replace", "replace", "delete", "duplicate", "rename", "add",
                               "wrap"]))
    fragment = draw(FRAGMENTS)
    key_fragment = b""
    if op == "replace" or (op == "delete" and not path):
        doc = _set(doc, path, _SLOT)
    elif op == "delete":
        doc = _set(doc, path, _DELETE)
    elif op in ("duplicate", "rename", "add"):
        name, path = draw(st.sampled_from(OBJECTS))
        target = copy.deepcopy(get(DOCS[name], path))
        existing = list(target)
        if op == "duplicate" and existing:
            key_fragment = _quoted(draw(st.sampled_from(existing)))
        else:
            key_fragment = draw(_KEY_FRAGMENTS)
        if op == "rename" and existing:
            old = draw(st.sampled_from(existing))
            value = target.pop(old)
            fragment = _serialise(value, True, True)
        first = draw(st.booleans())
        items = list(target.items())
        items = [(_KEY_SLOT, _SLOT), *items] if first else [*items, (_KEY_SLOT, _SLOT)]
        doc = _set(DOCS[name], path, dict(items))
    else:  # wrap: the document somewhere it should not be
        wrapper: Any = draw(st.sampled_from([[_SLOT], {"message": _SLOT}, {"message": {"payload": _SLOT}},
                                             {"experiment": _SLOT}, {"request": _SLOT, "experiment": None}]))
        fragment = _serialise(doc, True, True)
        doc = wrapper
    if draw(st.integers(0, 4)) == 0:  # a second, independent change somewhere else (not over the first)
        other_name, other_path = draw(st.sampled_from(PLACES))
        value = draw(JSON_VALUES)
        if other_name == name and other_path and _has(doc, other_path):
            changed = _set(doc, other_path, value)
            if json.dumps(changed).count(_SLOT) == json.dumps(doc).count(_SLOT):
                doc = changed
    body = _serialise(doc, draw(st.booleans()), draw(st.booleans()))
    body = body.replace(_quoted(_KEY_SLOT), key_fragment, 1).replace(_quoted(_SLOT), fragment, 1)
    return body


def _has(doc: Any, path: JsonPath) -> bool:
    try:
        get(doc, path)
    except (KeyError, IndexError, TypeError):
        return False
    return True


_JUNK = st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\x00", b'"', b"\\", b"{", b"]",
                        b",", b"\\u", b"\xf0\x9f\x98"])


@st.composite
def damaged_bytes(draw: st.DrawFn, bodies: st.SearchStrategy[bytes]) -> bytes:
    """``bodies``' bytes cut, flipped, spliced with invalid UTF-8, re-encoded or padded."""
    body = draw(bodies)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "bom", "utf16", "pad", "nul"]))
        at = draw(st.integers(0, max(len(body) - 1, 0)))
        if op == "truncate":
            body = body[:at]
        elif op == "flip" and body:
            body = body[:at] + bytes([body[at] ^ draw(st.integers(1, 255))]) + body[at + 1:]
        elif op == "insert":
            junk = draw(_JUNK | st.binary(max_size=8))
            body = body[:at] + junk + body[at:]
        elif op == "delete":
            body = body[:at] + body[at + draw(st.integers(1, 64)):]
        elif op == "bom":
            body = b"\xef\xbb\xbf" + body
        elif op == "utf16":
            try:
                body = body.decode("utf-8").encode(draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32"])))
            except UnicodeDecodeError:
                pass
        elif op == "pad":
            body = draw(st.sampled_from([b" ", b"\n", b"\t", b"\r\n", b"\x0b", b"\xc2\xa0"])) * draw(
                st.integers(1, 2000)) + body
        else:
            body = body.replace(b":", b"\x00:", 1)
    return body


RAW_BYTES = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=40).map(lambda b: b"{" + b),
    st.binary(max_size=40).map(lambda b: b'{"experiment":' + b),
    st.binary(max_size=40).map(lambda b: b'{"message":{"payload":' + b),
)
"""Bytes with no structure at all (and a few with a plausible start)."""
