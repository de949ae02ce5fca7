"""Masking a byte stream (an experiment's output) into lines, with the rules of :mod:`studio_runner.redact`.

Why its own module: a stream must mask *before* it cuts an over-long line into pieces (or a secret straddling
the cut would escape), and must keep just enough context to decide whether a rule matches across two reads.
That bookkeeping (:class:`_Scan`, the dropping states) is independent of the rules themselves, which stay in
:mod:`studio_runner.redact`.
"""

from __future__ import annotations

import codecs
import re
from bisect import bisect_left, bisect_right

from studio_runner.redact import _NAME_AFFIX, _RULES_RE, _UPPER_NAME, MASK, Redactor, _mask_rule

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
_QUOTE_OPEN = re.compile(rf"(?<![A-Z0-9_])(?:{_UPPER_NAME})=([\"'])")


def _mask_after(redactor: Redactor, text: str, start: int) -> str:
    """``redactor.mask(text)[start:]`` as if ``text[start:]`` were masked on its own, ``text[:start]``
    (already shown) serving only as look-behind context for the pattern rules."""
    if start == 0:
        return redactor.mask(text)
    return _Scan(redactor, text, start).masked(None)


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
            out.append(_mask_after(self._redactor, self._ctx + "".join(self._parts), len(self._ctx)))
        self._parts, self._size, self._ctx, self._shown = [], 0, "", False
