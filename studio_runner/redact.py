"""The one place secrets are masked: experiment output, runner logs, error messages, logged configs.

Two kinds of rules, both replacing the secret with ``****``:

* Pattern rules (spec lifecycle.md §6), applied to every line whatever the request:
  - URL userinfo: ``amqp://user:pass@host`` -> ``amqp://user:****@host``; a userinfo without a password
    (``//token@host``) and any userinfo in a pip VCS URL (``git+https://user:tok@host``) -> ``//****@host``.
  - ``NAME=value`` where NAME is an upper-case word containing CREDENTIAL, PASSWORD, PASSWD, TOKEN, SECRET or
    KEY (``AWS_SECRET_ACCESS_KEY=abc`` -> ``AWS_SECRET_ACCESS_KEY=****``); quotes around the value are kept.
* Literal rules: the exact secret strings a request carries (``Request.secrets()``). Literals shorter than
  :data:`MIN_LITERAL` characters are ignored when passed as ``secrets`` (masking every ``abc`` in the output
  would destroy it and protect nothing); values passed as ``credentials`` are masked at any length, because
  the caller knows they are real credentials.

Speed: ``mask`` runs on every output line of every experiment. Pattern rules are one module-level compiled
regex, skipped for lines with neither ``=`` nor ``@``; literals are one compiled alternation, longest first.
Patterns run before literals, so a literal inside a name or user part that a pattern keeps is still masked.

Streams: :class:`StreamMasker` turns an experiment's raw output bytes into masked lines. It masks *before* it
cuts an over-long line into pieces, so no secret escapes by straddling a cut (see its docstring).
:func:`runner_secrets` picks the runner's own secrets out of its environment, so they are masked too.
"""

from __future__ import annotations

import codecs
import re
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote

MASK = "****"
MIN_LITERAL = 4
"""Shorter ``secrets`` literals are not masked (``credentials`` are, at any length)."""

_MAX_DEPTH = 64
"""mask_mapping stops descending here; deeper content is replaced, never shown."""

_SECRET_WORDS = r"CREDENTIAL|PASSWORD|PASSWD|TOKEN|SECRET|KEY"
_NAME_AFFIX = 64
"""How many name characters the ``NAME=value`` rule allows on each side of the secret word."""

_NAME_RE = re.compile(_SECRET_WORDS, re.IGNORECASE)
_FIELD_RE = re.compile(
    r"credential|password|passwd|passphrase|token|secret|access_?key|private_?key|api_?key", re.IGNORECASE
)

# The name is bounded (64 + word + 64) so a long upper-case run cannot make the scan quadratic.
_RULES_RE = re.compile(
    rf"(?<![A-Z0-9_])(?P<name>[A-Z0-9_]{{0,{_NAME_AFFIX}}}?(?:{_SECRET_WORDS})[A-Z0-9_]{{0,{_NAME_AFFIX}}})="
    r"""(?P<value>"[^"\n]*"|'[^'\n]*'|\S+)"""
    r"|//(?P<user>[^\s/@:]*)(?::(?P<pw>[^\s/]*))?@"
)
_VCS_SCHEME_RE = re.compile(r"git\+[A-Za-z]+:$")


def is_secret_name(name: str) -> bool:
    """Whether an environment-style name (``AWS_SECRET_ACCESS_KEY``) names a secret; case-insensitive."""
    return _NAME_RE.search(name) is not None


def looks_secret(key: str) -> bool:
    """Whether a document field name holds a secret: ``password``, ``access_key``, ``credentials``,
    or an upper-case env-style name containing KEY/TOKEN/... (plain ``key``, the experiment id, is not)."""
    return _FIELD_RE.search(key) is not None or (key.isupper() and is_secret_name(key))


def _mask_rule(match: re.Match[str]) -> str:
    name = match.group("name")
    if name is not None:
        value = match.group("value")
        if value[0] in "'\"" and len(value) > 1 and value[-1] == value[0]:
            return f"{name}={value[0]}{MASK}{value[0]}"
        if value[-1] in "'\"" and value[0] not in "'\"":
            return f"{name}={MASK}{value[-1]}"  # the closing quote of an outer quoted word
        return f"{name}={MASK}"
    password = match.group("pw")
    before = match.string[max(0, match.start() - 16) : match.start()]
    if password is None or _VCS_SCHEME_RE.search(before):
        return f"//{MASK}@"
    return f"//{match.group('user')}:{MASK}@"


def mask_patterns(text: str) -> str:
    """Apply only the pattern rules (URL userinfo, ``SECRET_NAME=value``)."""
    if "=" not in text and "@" not in text:
        return text
    return _RULES_RE.sub(_mask_rule, text)


class Redactor:
    """Masks one experiment's secrets in text. Build once per request, call :meth:`mask` per line."""

    def __init__(self, secrets: Iterable[str] = (), *, credentials: Iterable[str] = ()) -> None:
        literals = {s for s in secrets if isinstance(s, str) and len(s) >= MIN_LITERAL}
        literals.update(c for c in credentials if isinstance(c, str) and c)
        ordered = sorted(literals, key=lambda s: (-len(s), s))
        self._literals: re.Pattern[str] | None = (
            re.compile("|".join(re.escape(s) for s in ordered)) if ordered else None
        )
        self._longest = len(ordered[0]) if ordered else 0

    @property
    def longest_literal(self) -> int:
        """Length of the longest literal secret masked (0 if none): how much text a stream must hold back so
        that a secret arriving in two parts is still seen whole."""
        return self._longest

    def mask(self, line: str) -> str:
        """``line`` with every known secret and every pattern-rule match replaced by ``****``."""
        line = mask_patterns(line)
        if self._literals is not None:
            line = self._literals.sub(MASK, line)
        return line

    def _mask_after(self, text: str, start: int) -> str:
        """``mask(text)[start:]`` as if ``text[start:]`` were masked on its own, ``text[:start]`` (already
        shown) serving only as look-behind context for the pattern rules."""
        if start == 0:
            return self.mask(text)
        return _Scan(self, text, start).masked(None)


def _mask_all(value: Any, depth: int) -> Any:
    """Keep the shape (which fields exist is useful in a log), hide every scalar except null."""
    if depth > _MAX_DEPTH:
        return MASK
    if isinstance(value, Mapping):
        return {k: _mask_all(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mask_all(v, depth + 1) for v in value]
    return None if value is None else MASK


def _mask_tree(value: Any, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        return "<too deeply nested>"
    if isinstance(value, Mapping):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            name = str(key)
            if name == "env" or looks_secret(name):
                out[key] = _mask_all(item, depth + 1)
            else:
                out[key] = _mask_tree(item, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_mask_tree(v, depth + 1) for v in value]
    if isinstance(value, str):
        return mask_patterns(value)
    return value


def mask_mapping(d: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``d`` that is safe to log.

    Values under a secret-looking key (:func:`looks_secret`, so also under any ``credentials``) and every
    value under an ``env`` key become ``****`` (nulls stay null, containers keep their shape); the pattern
    rules are applied to all other strings (``amqp://u:p@h`` -> ``amqp://u:****@h``).
    """
    return _mask_tree(d, 0)


_SHOWN_MAX = 60


def describe(value: Any, *, secret: bool = False) -> str:
    """A short, safe rendering of a rejected value for an error message.

    Secret values become ``****``; containers are described by size, never shown (they may hold
    credentials); strings pass the pattern rules and are cut at 60 characters.
    """
    if secret:
        return MASK
    if isinstance(value, Mapping):
        return f"an object with {len(value)} keys"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} items"
    if isinstance(value, str):
        value = mask_patterns(value)
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        return f"a {type(value).__name__} too long to show"
    return text if len(text) <= _SHOWN_MAX else text[: _SHOWN_MAX - 3] + "..."


# --- the runner's own secrets ---------------------------------------------------------------------------

_URL_PASSWORD_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s/@:]*:(?P<pw>[^\s/]*)@")
_NOT_SECRETS = frozenset({"true", "false", "none", "null"})
"""Values a secret-named flag often holds (``USE_TOKEN=true``): masking every ``true`` in the output would
break the experiment's JSON metadata lines and hide nothing."""


def runner_secrets(environ: Mapping[str, str]) -> list[str]:
    """Values of the runner's secret-looking variables (names matching is_secret_name, values of at least
    MIN_LITERAL chars) and passwords found in URL-valued variables (scheme://user:pass@host), to be masked in
    every experiment's output and in the runner's own logs.

    A runner started with ``AWS_SECRET_ACCESS_KEY`` or ``GITHUB_TOKEN`` must not show them even if an
    experiment prints them. URL passwords come both as written and percent-decoded (a program may print
    either); ``true``/``false``/``none``/``null`` are never taken, nor is anything under MIN_LITERAL chars.
    """
    found: list[str] = []
    for name, value in environ.items():
        if not isinstance(value, str):
            continue
        if is_secret_name(name) and value.lower() not in _NOT_SECRETS:
            found.append(value)
        if "://" in value:
            for match in _URL_PASSWORD_RE.finditer(value):
                password = match.group("pw")
                found += [password, unquote(password)]
    return list(dict.fromkeys(s for s in found if len(s) >= MIN_LITERAL))


# --- streams ----------------------------------------------------------------------------------------------

_PATTERN_REACH = 2 * _NAME_AFFIX + len("CREDENTIAL") + 2
"""The most text the ``NAME=value`` rule needs to decide whether a match starts somewhere: the longest name,
``=`` and the value's first character."""
_CONTEXT = _PATTERN_REACH
"""Characters of already emitted (or dropped) text a stream keeps as context: the rules look back 16 at most
(``git+https:`` before a userinfo), and a secret name before ``="`` may have to be seen in dropped text."""
_MARGIN = 64
"""Slack on top of the exact reach, so that no off-by-one in reasoning about the rules can leak."""
_SLICE = 1 << 16
"""Bytes decoded at a time, so one huge ``feed`` never makes one huge string."""

_SPACE = re.compile(r"\s")
_URL_TAIL = re.compile(r"[^\s/]*\Z")
_RUN = "run"
"""Dropping state: the rest of a ``NAME=value`` value, ended by white space."""
_URL = "url"
"""Dropping state: the rest of a userinfo-like run (``//...``), ended by white space, except that a quoted
value opened in it (``SECRET_NAME="``) is dropped to its closing quote first. The other states are a quote
character, ended by that quote."""
_QUOTE_OPEN = re.compile(
    rf"(?<![A-Z0-9_])[A-Z0-9_]{{0,{_NAME_AFFIX}}}?(?:{_SECRET_WORDS})[A-Z0-9_]{{0,{_NAME_AFFIX}}}=([\"'])"
)


class _Scan:
    """One masking pass over ``text[start:]`` (``text[:start]`` is look-behind only) that remembers where each
    rule matched, so a stream can cut the masked text only where no match is cut in two.

    Positions are *raw* (in ``text``) or *p* (in ``p``, the pattern-masked ``text[start:]``, on which the
    literal pass runs, as in :meth:`Redactor.mask`).
    """

    def __init__(self, redactor: Redactor, text: str, start: int) -> None:
        self.redactor = redactor
        self.text = text
        self.start = start
        self.matches = list(_RULES_RE.finditer(text, start)) if "=" in text or "@" in text else []
        self.raw_starts: list[int] = []
        self.raw_ends: list[int] = []
        self.p_starts: list[int] = []
        self.p_ends: list[int] = []
        pieces: list[str] = []
        last, size = start, 0
        for match in self.matches:
            s, e = match.span()
            replacement = _mask_rule(match)
            pieces += [text[last:s], replacement]
            self.raw_starts.append(s)
            self.raw_ends.append(e)
            self.p_starts.append(size + s - last)
            size += s - last + len(replacement)
            self.p_ends.append(size)
            last = e
        pieces.append(text[last:])
        self.p = "".join(pieces)
        literals = redactor._literals
        spans = [m.span() for m in literals.finditer(self.p)] if literals is not None else []
        self.lit_starts = [a for a, _ in spans]
        self.lit_ends = [b for _, b in spans]

    def masked(self, p_end: int | None) -> str:
        """The fully masked text up to ``p_end`` (a p position no literal match crosses; None: all)."""
        end = len(self.p) if p_end is None else p_end
        out: list[str] = []
        last = 0
        for a, b in zip(self.lit_starts, self.lit_ends, strict=True):
            if b > end:
                break
            out += [self.p[last:a], MASK]
            last = b
        out.append(self.p[last:end])
        return "".join(out)

    def _covering(self, c: int) -> int | None:
        """The pattern match with start <= c < end."""
        i = bisect_right(self.raw_starts, c) - 1
        return i if i >= 0 and c < self.raw_ends[i] else None

    def _crossing(self, c: int) -> int | None:
        """The pattern match with start < c < end (one that a cut at raw ``c`` would split)."""
        i = bisect_left(self.raw_starts, c) - 1
        return i if i >= 0 and c < self.raw_ends[i] else None

    def _literal_crossing(self, cp: int) -> int | None:
        i = bisect_left(self.lit_starts, cp) - 1
        return i if i >= 0 and cp < self.lit_ends[i] else None

    def to_p(self, c: int) -> int:
        """p position of raw ``c`` (not inside a pattern match)."""
        i = bisect_right(self.raw_ends, c)
        return c - self.start if i == 0 else self.p_ends[i - 1] + c - self.raw_ends[i - 1]

    def to_raw(self, cp: int, *, up: bool = False) -> int:
        """Raw position of p ``cp``; inside a pattern's replacement: that match's start (end if ``up``)."""
        i = bisect_left(self.p_starts, cp) - 1
        if i >= 0 and cp < self.p_ends[i]:
            return self.raw_ends[i] if up else self.raw_starts[i]
        i = bisect_right(self.p_ends, cp)
        return self.start + cp if i == 0 else self.raw_ends[i - 1] + cp - self.p_ends[i - 1]

    def clean_cut(self, limit: int) -> int:
        """The raw position after ``start`` closest below ``limit`` that splits no match; if there is none,
        the closest above it (the end of the match that covers ``limit``)."""
        c = limit
        while c > self.start:
            i = self._crossing(c)
            if i is not None:
                c = self.raw_starts[i]
                continue
            j = self._literal_crossing(self.to_p(c))
            if j is None:
                return c
            c = self.to_raw(self.lit_starts[j])
        c = limit
        while True:  # ends at len(text) at the latest, which no match crosses
            i = self._crossing(c)
            if i is not None:
                c = self.raw_ends[i]
                continue
            j = self._literal_crossing(self.to_p(c))
            if j is None:
                return c
            c = self.to_raw(self.lit_ends[j], up=True)

    def ongoing(self, limit: int) -> tuple[int, str, list[str]] | None:
        """The first possible secret starting before ``limit`` (the cut) that text still to come could
        lengthen or change: a ``NAME=value`` whose value runs to the end, a quoted value not yet closed, a URL
        userinfo running to the end. Returns its start, the part of it to show, and the dropping states (see
        :data:`_RUN`) that the text after the held text must go through before it is shown again."""
        text, end = self.text, len(self.text)
        found: list[tuple[int, str, str]] = []  # start, part shown, dropping state
        quotes: list[tuple[int, str]] = []  # quoted values not closed in the held text, wherever they start
        for match in self.matches:
            s = match.start()
            name = match.group("name")
            if name is not None:
                value = match.group("value")
                first = value[0]
                if first in "'\"" and not (len(value) > 1 and value[-1] == first):
                    quotes.append((s, first))
                    if s < limit:
                        found.append((s, f"{name}={first}", first))
                elif s < limit and match.end() == end and first not in "'\"":
                    found.append((s, f"{name}=", _RUN))
            elif s < limit and match.group("pw") is not None and _URL_TAIL.match(text, match.end()):
                found.append((s, "//", _URL))
        slash = text.rfind("/", self.start)
        s = slash - 1
        if (self.start <= s < limit and text[s] == "/" and self._covering(s) is None
                and not _SPACE.search(text, slash + 1)):
            found.append((s, "//", _URL))
        if not found:
            return None
        start, kept, state = min(found)
        if state != _URL:
            return start, kept, [state]  # as the rule: a value ends at white space, a quoted one at its quote
        # A userinfo-like run: hide it to its white space. A quoted value opened in it and not closed yet
        # (a value of its own, should the run turn out to be no userinfo) must close first.
        inside = [quote for at, quote in quotes if at > start]
        return start, kept, [inside[0], _URL] if inside else [_URL]

    def forced(self, s: int, kept: str) -> str:
        """The masked text up to raw ``s``, then ``kept`` (raw, masked by literals too) and ``****``."""
        head = self.p[: self.to_p(s)] + kept
        literals = self.redactor._literals
        return (literals.sub(MASK, head) if literals is not None else head) + MASK


class StreamMasker:
    """Turns the raw bytes of an experiment's (merged stdout+stderr) output into masked text lines.

    Why not split lines and mask each: a line longer than the limit must be cut, and a secret straddling the
    cut would be masked in neither piece. So this masks *before* it cuts:

    * Bytes are decoded as UTF-8 incrementally (a character split between chunks decodes whole; invalid
      bytes become U+FFFD). Lines end at ``\\n``, ``\\r\\n`` or a lone ``\\r`` (each progress-bar refresh is
      a line of its own; a ``\\r`` ending one chunk and a ``\\n`` starting the next are one terminator).
    * A line up to ``max_line_chars`` long is masked whole with :meth:`Redactor.mask`, however many chunks it
      came in.
    * A longer line is held until :attr:`overlap` characters past ``max_line_chars`` have arrived; the whole
      held text is masked and a piece is emitted up to the point nearest ``max_line_chars`` (before it if
      possible) that no match straddles. The unemitted rest (at least :attr:`overlap` characters, raw) is
      masked again with what follows. The overlap is longer than the longest literal secret and than the
      longest text the ``NAME=value`` rule needs to decide where a match starts, so every match before the
      cut is final: a secret arriving across a chunk or piece boundary is seen whole. The last emitted
      characters stay as look-behind context (the rules look back up to 16).
    * What the overlap cannot settle is a secret that may run on without bound and started before the cut:
      a ``NAME=value`` value running to the end of the held text, a quoted value not yet closed, a URL
      userinfo-like run (``//user:pass@...``) running to the end. It is emitted as ``NAME=****``
      (``NAME="****``, ``//****``) and the rest of it is dropped as it arrives, up to what ends it: white
      space, as the rule would; the closing quote, as the rule would (to the end of the line if it never
      comes); for a ``//`` run, white space, after the closing quote of any ``SECRET_NAME="`` opened in it.
      Ordinary text (words, JSON, base64) never needs this: it takes a run of more than :attr:`overlap`
      characters without white space after ``NAME=`` or ``//``, still running at the cut.

    A line within ``max_line_chars`` comes out exactly as ``Redactor.mask`` makes it; a longer line's pieces,
    joined, are exactly the whole masked line unless a secret had to be dropped as above (then more is
    hidden; one known limit: a literal secret containing white space that starts inside dropped text shows
    its part after the white space, as ``Redactor.mask`` does when a ``NAME=value`` takes its first word).
    Each piece covers at most ``max_line_chars`` characters of the line, unless one masked secret alone is
    longer (masking changes lengths); memory stays below :attr:`bound` characters whatever the input.
    """

    def __init__(self, redactor: Redactor, max_line_chars: int = 1 << 20) -> None:
        if max_line_chars < 1:
            raise ValueError(f"max_line_chars must be positive, got {max_line_chars}")
        self._redactor = redactor
        self._max = max_line_chars
        self._overlap = max(redactor.longest_literal, _PATTERN_REACH) + _MARGIN
        self._cap = max_line_chars + self._overlap
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._parts: list[str] = []  # the raw, unemitted text of the current line
        self._size = 0
        self._ctx = ""  # look-behind: the last emitted (or dropped) raw characters of the current line
        self._shown = False  # part of the current line was emitted already
        self._drop: list[str] = []  # dropping the rest of long secrets: states to go through (see _RUN)
        self._skip_lf = False  # the last text ended with "\r": a "\n" starting the next one is its pair
        self._forced = 0

    @property
    def overlap(self) -> int:
        """Characters held back past each cut: longest literal or pattern reach, plus a margin."""
        return self._overlap

    @property
    def bound(self) -> int:
        """The most characters ever held: ``max_line_chars`` + :attr:`overlap` + the look-behind context."""
        return self._cap + _CONTEXT

    @property
    def buffered(self) -> int:
        """Characters held now (for tests and monitoring)."""
        return self._size + len(self._ctx)

    def feed(self, data: bytes | bytearray) -> list[str]:
        """Masked complete lines (without terminators) found so far."""
        out: list[str] = []
        if len(data) <= _SLICE:
            self._text(self._decoder.decode(data), out)
        else:
            view = memoryview(data)
            for i in range(0, len(data), _SLICE):
                self._text(self._decoder.decode(view[i : i + _SLICE]), out)
        return out

    def close(self) -> list[str]:
        """Masked rest at EOF (a last partial line, if any)."""
        out: list[str] = []
        self._text(self._decoder.decode(b"", True), out)
        if self._size or self._shown:
            self._end_line(out)
        self._decoder.reset()
        self._skip_lf = False
        return out

    def _text(self, text: str, out: list[str]) -> None:
        if self._skip_lf and text:
            self._skip_lf = False
            if text[0] == "\n":
                text = text[1:]
        if not text:
            return
        if "\r" in text:
            self._skip_lf = text[-1] == "\r"
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        lines = text.split("\n")
        partial = lines.pop()
        mask = self._redactor.mask
        for line in lines:
            if len(line) <= self._max and not (self._size or self._shown or self._drop):
                out.append(mask(line))  # the common case: a whole line in one piece of text
            else:
                self._add(line, out)
                self._end_line(out)
        if partial:
            self._add(partial, out)

    def _add(self, text: str, out: list[str]) -> None:
        """Append text (no terminators) to the current line, emitting pieces as the held text fills up."""
        while text:
            if self._drop:
                text = self._dropping(text)
                continue
            room = self._cap - self._size
            if len(text) > room:
                piece, text = text[:room], text[room:]
            else:
                piece, text = text, ""
            self._parts.append(piece)
            self._size += len(piece)
            if self._size >= self._cap:
                self._cut(out, final=False)

    def _dropping(self, text: str) -> str:
        """Drop the start of ``text`` that still belongs to the secrets being dropped; return the rest."""
        state = self._drop[0]
        if state == _RUN or state == _URL:
            found = _SPACE.search(text)
            end = len(text) if found is None else found.start()
            if state == _URL:
                window, base = self._ctx + text, len(self._ctx)
                for opened in _QUOTE_OPEN.finditer(window, 0, base + end):
                    if opened.end() > base:  # a quote opened here, not in text seen before
                        self._drop.insert(0, opened.group(1))
                        return self._dropped(text, opened.end() - base)
            if found is None:
                return self._dropped(text, len(text))
            self._drop.pop(0)
            return self._dropped(text, end)  # the white space is shown
        at = text.find(state)
        if at < 0:
            return self._dropped(text, len(text))
        self._drop.pop(0)
        return self._dropped(text, at + 1 if self._drop else at)  # a value's closing quote is shown

    def _dropped(self, text: str, stop: int) -> str:
        self._ctx = (self._ctx + text[max(0, stop - _CONTEXT) : stop])[-_CONTEXT:]
        return text[stop:]

    def _cut(self, out: list[str], *, final: bool) -> None:
        """Emit one piece of the held text (``final``: the line is complete, nothing can lengthen a match)."""
        held = "".join(self._parts)
        text = self._ctx + held
        start = len(self._ctx)
        scan = _Scan(self._redactor, text, start)
        self._shown = True
        self._parts, self._size = [], 0
        c = scan.clean_cut(start + self._max)
        found = None if final else scan.ongoing(c)
        if found is not None:
            s, kept, self._drop = found
            out.append(scan.forced(s, kept))
            self._forced += 1
            self._ctx = text[-_CONTEXT:]  # the rest of the held text belongs to what is dropped
            return
        out.append(scan.masked(scan.to_p(c)))
        self._ctx = text[max(0, c - _CONTEXT) : c]
        rest = text[c:]
        if rest:
            self._parts, self._size = [rest], len(rest)

    def _end_line(self, out: list[str]) -> None:
        """The current line is complete: emit its rest and start a new one."""
        self._drop = []
        while self._size > self._max:
            self._cut(out, final=True)
        if self._size or not self._shown:
            out.append(self._redactor._mask_after(self._ctx + "".join(self._parts), len(self._ctx)))
        self._parts, self._size, self._ctx, self._shown = [], 0, "", False
