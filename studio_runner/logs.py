"""The runner's logging set-up: one log line per record, whatever a request puts in it, and no secrets.

Why: log messages carry request-supplied text (experiment keys, queue names, error text). A key holding a
newline and a fake time stamp wrote a forged ``ERROR`` line into the log, and an ANSI escape sequence can
rewrite an operator's terminal. So the formatter escapes every control character in the formatted message
(``record.getMessage()``, %-arguments included) and in the logger name (experiment loggers are named after
their key). It also masks the runner's own secrets (:func:`studio_runner.redact.runner_secrets`) and the
redact pattern rules (``amqp://u:****@h``, ``AWS_SECRET_ACCESS_KEY=****``) in everything it writes.
Tracebacks (``exc_info``, ``stack_info``) are the runner's own text and stay multi-line, masked, with other
control characters escaped; the message of an exception in one is escaped whole, since it may quote a request.

``--log-format json`` writes one JSON object per record instead, for log shippers: the same masking, and
JSON's own escaping (ASCII only) keeps every record on one line. Libraries' internals (pika, botocore,
urllib3...) stay out of a ``--log-level debug`` log unless ``--log-libraries`` asks for them: the operator
debugging the runner wants the runner's decisions, not every HTTP header. A terminal progress bar
(:func:`set_footer`) stays below the log lines instead of being torn apart by them.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import re
import sys
import traceback
from collections.abc import Iterable
from types import TracebackType
from typing import TextIO

from studio_runner.redact import Redactor, scrub

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

_NOISY = ("botocore", "boto3", "s3transfer", "urllib3", "httpx", "httpcore", "watchfiles", "asyncio",
          "hpack", "filelock")
"""Libraries that log every request below WARNING: not heard below WARNING unless ``libraries``."""

# C0, DEL, C1, the Unicode line and paragraph separators, and lone surrogates (left by surrogateescape
# decoding of file names; they cannot even be encoded to write the log line).
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str, limit: int | None = None) -> str:
    """Text safe for one log line, a file name or a metadata key: control characters (C0, DEL, C1, and
    the Unicode line/paragraph separators U+2028/U+2029) escaped as \\n, \\r, \\t, \\x1b, \\u2028 ...;
    optionally cut.

    Lone surrogates are escaped too (``\\udc80``). Backslashes are left alone, so the result is for reading,
    not for decoding back. With ``limit``, a longer result is cut, never inside an escape, to at most
    ``limit`` characters ending with ``...``.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must not be negative, got {limit}")
    out = _CONTROL_RE.sub(_escape, text) if _CONTROL_RE.search(text) else text
    if limit is None or len(out) <= limit:
        return out
    marker = "..." if limit >= 3 else ""
    room = limit - len(marker)
    head = text[:room]  # every character becomes at least one: no more of the text can fit
    pieces: list[str] = []
    size = last = 0
    for match in _CONTROL_RE.finditer(head):
        plain = head[last : match.start()]
        escaped = _escape(match)
        if size + len(plain) + len(escaped) > room:
            break
        pieces += [plain, escaped]
        size += len(plain) + len(escaped)
        last = match.end()
    else:
        match = None
    plain = head[last : match.start()] if match is not None else head[last:]
    pieces.append(plain[: room - size])
    return "".join(pieces) + marker


def _escape_exception_messages(text: str, exc: BaseException | None) -> str:
    """``text`` (a formatted traceback) with the multi-line message of each exception in the chain escaped
    onto one line: a message may quote request text, and must not start a line of its own."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        body = "".join(traceback.format_exception_only(type(exc), exc)).rstrip("\n")
        if "\n" in body:
            text = text.replace(body, printable(body))
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return text


class SafeFormatter(logging.Formatter):
    """The runner's format, with each record's message and logger name on one line and secrets masked."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__(FORMAT)
        self._redactor = Redactor(secrets)

    def format(self, record: logging.LogRecord) -> str:
        safe = copy.copy(record)  # other handlers see the record unchanged
        safe.msg = printable(scrub(self._redactor.mask(record.getMessage())))
        safe.args = None
        safe.name = printable(record.name)
        if record.exc_info:
            safe.exc_text = None  # format again: a cached text may come from another handler, unmasked
        elif record.exc_text:
            safe.exc_text = self._multiline(record.exc_text)
        return super().format(safe)

    def formatException(
        self,
        ei: tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None],
    ) -> str:
        return self._multiline(_escape_exception_messages(super().formatException(ei), ei[1]))

    def formatStack(self, stack_info: str) -> str:
        return self._multiline(super().formatStack(stack_info))

    def _multiline(self, text: str) -> str:
        return "\n".join(printable(line) for line in scrub(self._redactor.mask(text)).split("\n"))


_ATTEMPT_FIELDS = ("experiment", "attempt_id", "queue", "attempt")
"""Fields a record may carry (``extra=``); the current attempt (:mod:`studio_runner.events`) fills the
rest."""


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (ISO-8601 UTC), level, logger, message, attempt fields, exc; masked."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._redactor = Redactor(secrets)

    def format(self, record: logging.LogRecord) -> str:
        def mask(text: str) -> str:
            return scrub(self._redactor.mask(text))

        when = datetime.datetime.fromtimestamp(record.created, tz=datetime.timezone.utc)
        doc: dict[str, object] = {
            "ts": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": mask(record.getMessage()),
        }
        doc.update(_attempt_fields(record))
        if record.exc_info:
            doc["exc"] = mask(self.formatException(record.exc_info))
        elif record.exc_text:
            doc["exc"] = mask(record.exc_text)
        if record.stack_info:
            doc["stack"] = mask(self.formatStack(record.stack_info))
        for key in ("experiment", "queue"):
            if isinstance(doc.get(key), str):
                doc[key] = mask(str(doc[key]))
        # ensure_ascii: U+2028/U+2029 and lone surrogates never reach the stream raw
        return json.dumps(doc, ensure_ascii=True, default=str)


def _attempt_fields(record: logging.LogRecord) -> dict[str, object]:
    fields = {name: getattr(record, name) for name in _ATTEMPT_FIELDS if hasattr(record, name)}
    from studio_runner.events import current_attempt  # late: events imports half the runner

    current = current_attempt()
    if current is not None:
        if current.key:
            fields.setdefault("experiment", current.key)
        fields.setdefault("attempt_id", current.attempt_id)
        if current.queue:
            fields.setdefault("queue", current.queue)
        fields.setdefault("attempt", current.attempt)
    return fields


_footer = ""
"""The progress line shown under the log on a terminal (:func:`set_footer`); empty for none."""


def set_footer(text: str) -> None:
    """Show ``text`` as a status line under the log on a terminal, redrawn after every log line; ``""``
    removes it. Does nothing unless stderr is a terminal (redirected logs get plain lines only)."""
    global _footer
    stream = sys.stderr
    if not _is_tty(stream):
        return
    _footer = printable(text)
    try:
        stream.write("\r\x1b[K" + _footer)
        stream.flush()
    except (OSError, ValueError):
        pass


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _RunnerHandler(logging.StreamHandler):
    """The runner's handler on the root logger (found again by its type, so set-up is idempotent). It
    writes to whatever ``sys.stderr`` is at the time: tests capture it by replacing it."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        if not _footer:
            super().emit(record)
            return
        stream = self.stream
        try:
            stream.write("\r\x1b[K")  # the bar's line is taken by this record, the bar drawn again below
        except (OSError, ValueError):
            pass
        super().emit(record)
        try:
            stream.write(_footer)
            stream.flush()
        except (OSError, ValueError):
            pass


def configure_logging(level: str, secrets: Iterable[str] = (), *, log_format: str = "text",
                      libraries: bool = False) -> None:
    """Log ``level`` and above to stderr, masking ``secrets`` (the runner's own, e.g.
    ``runner_secrets(os.environ)``) and the pattern rules, one line per record: ``text`` for people, ``json``
    (one object per line) for log shippers.

    Calling it again replaces the level, format and secrets; it never adds a second handler. Chatty
    libraries (botocore, boto3, s3transfer, urllib3, httpx, httpcore, watchfiles, asyncio) log at WARNING or
    above, even with DEBUG; pika, which logs every failed reconnect with a traceback, is silenced
    (CRITICAL), because the RabbitMQ backend reports those events itself, once and in plain words. With
    ``libraries`` every one of them logs at ``level`` like the runner.
    """
    number = logging.getLevelName(level.upper())
    if not isinstance(number, int):
        raise ValueError(f"unknown log level {level!r}")
    if log_format not in ("text", "json"):
        raise ValueError(f"unknown log format {log_format!r}: expected text or json")
    root = logging.getLogger()
    handler = next((h for h in root.handlers if isinstance(h, _RunnerHandler)), None)
    if handler is None:
        handler = _RunnerHandler()
        root.addHandler(handler)
    handler.setFormatter(JsonFormatter(secrets) if log_format == "json" else SafeFormatter(secrets))
    root.setLevel(number)
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(number if libraries else max(logging.WARNING, number))
    logging.getLogger("pika").setLevel(number if libraries else logging.CRITICAL)
