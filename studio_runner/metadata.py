"""Experiment metadata: the JSON lines the runner writes into the output, and the scrape that folds them.

Experiments add metadata by printing one-line JSON (shared/spec/metadata.md). The Go runner re-read the whole
output file at every checkpoint; :class:`MetadataScraper` is fed each line once, as it is produced, so a
checkpoint only has to serialise the current document (:func:`write_document`).

Deliberate differences from Go, all taken from the spec's **Recommended** notes or forced by scraping
incrementally:

* a forbidden or failing patch skips only that directive (Go dropped the whole scrape) and is remembered in
  :attr:`MetadataScraper.problems`; a JSON array that is not a patch is ignored (Go replaced the document);
* the ``ts`` of a plain output line is the time the line was seen, not the (repeated) scrape time;
* the scrape is bounded: over-long lines are ignored and plain lines stop being logged once the document is
  over its size cap;
* besides Go's rule (no operation other than ``add`` under ``/studioml``), a patch may not replace the whole
  document, the ``/studioml`` block itself, or ``move`` anything out of it: each would erase runner facts.

Timestamps written by the runner lines use UTC, also where Go used the host's local zone (``T`` stamps).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonpatch

__all__ = [
    "MetadataScraper",
    "attempt_id",
    "base62",
    "deep_merge",
    "identity_lines",
    "init_lines",
    "note_line",
    "scrape_file_name",
    "start_lines",
    "stop_lines",
    "write_document",
    "write_document_text",
]

Instant = datetime | float | int | None
"""A moment for the runner lines: aware datetime (naive means UTC), Unix seconds, or None for now."""

SEED: dict[str, Any] = {"studioml": {"log": [{"ts": "0", "msg": "Init"}, {"ts": "1", "msg": ""}]}}
MAX_PROBLEMS = 100
_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_NS = 1_000_000_000
# Experiment input must never crash the runner: these are what jsonpatch/jsonpointer raise on bad patches.
_PATCH_ERRORS = (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError, ValueError,
                 KeyError, IndexError, RecursionError)


# --- identities --------------------------------------------------------------------------------------------

def base62(n: int) -> str:
    """Base-62 digits ``0-9A-Za-z``, most significant first: Go's attempt-id suffix, which sorts by time."""
    if n < 0:
        raise ValueError(f"base62 of a negative number: {n}")
    digits = []
    while True:
        n, rest = divmod(n, 62)
        digits.append(_B62[rest])
        if n == 0:
            return "".join(reversed(digits))


def attempt_id(host: str, when: float) -> str:
    """``<host>-<base62(unix seconds)>``: names an attempt in reports and scrape files (lifecycle.md §2)."""
    return f"{host}-{base62(int(when))}"


def scrape_file_name(host: str, when: float, experiment_key: str = "", attempt: str = "") -> str:
    """File name of an attempt's scrape under ``_metadata/``; re-scrapes of one attempt overwrite it.

    Go names it ``scrape-host-<host>-<base62 secs>.json``; every experiment of a bucket shares ``metadata/``,
    so two experiments starting in the same second on one host would overwrite each other's document, and so
    would two attempts of one experiment (a quick retry, or two runners on hosts of the same name). With
    ``experiment_key`` (and the attempt's id) a short hash of them is appended (the name still sorts by
    time)."""
    suffix = ""
    if experiment_key:
        unique = experiment_key + ("\0" + attempt if attempt else "")
        suffix = "-" + hashlib.blake2b(unique.encode(), digest_size=4).hexdigest()
    return f"scrape-host-{attempt_id(host, when)}{suffix}.json"


# --- timestamps --------------------------------------------------------------------------------------------

def _ns(now: Instant) -> int:
    if now is None:
        return time.time_ns()
    if isinstance(now, datetime):
        if now.tzinfo is None:
            now = now.replace(tzinfo=timezone.utc)
        delta = now - datetime(1970, 1, 1, tzinfo=timezone.utc)
        return (delta.days * 86_400 + delta.seconds) * _NS + delta.microseconds * 1000
    # repr() keeps the digits a caller wrote (1631664007.5), which float arithmetic would blur.
    return int(Decimal(repr(now)) * _NS)


def _utc(ns: int, fmt: str) -> tuple[str, int]:
    secs, frac = divmod(ns, _NS)
    return time.strftime(fmt, time.gmtime(secs)), frac


def log_stamp(now: Instant = None) -> str:
    """``L`` stamp of runner log entries, like ``date -u -Ins``: ``2021-09-15T00:00:07,123456789+00:00``."""
    head, frac = _utc(_ns(now), "%Y-%m-%dT%H:%M:%S")
    return f"{head},{frac:09d}+00:00"


def time_stamp(now: Instant = None) -> str:
    """``T`` stamp of ``load_time``/``start_time``/``stop_time``: ``2021-09-15T00:00:07.123456789+00:00``."""
    head, frac = _utc(_ns(now), "%Y-%m-%dT%H:%M:%S")
    return f"{head}.{frac:09d}+00:00"


def scrape_stamp(ns: int) -> str:
    """Go layout ``2006-01-02T15:04:05.999999999-0700`` in UTC: trailing zeros of the fraction dropped."""
    head, frac = _utc(ns, "%Y-%m-%dT%H:%M:%S")
    tail = f".{frac:09d}".rstrip("0").rstrip(".")
    return f"{head}{tail}+0000"


# --- runner lines (metadata.md §2) -------------------------------------------------------------------------

def _line(value: object) -> str:
    """Compact JSON like ``jq -c``."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _studioml(**fields: object) -> str:
    return _line({"studioml": fields})


def _log_patch(msg: str, now: Instant) -> str:
    return _line([{"op": "add", "path": "/studioml/log/-", "value": {"ts": log_stamp(now), "msg": msg}}])


def init_lines(host: str, now: Instant = None) -> list[str]:
    """First lines of an attempt's output: ``Init`` log (replacing the seed's), ``load_time``, ``host``."""
    return [
        _studioml(log=[{"ts": log_stamp(now), "msg": "Init"}, {"ts": "0", "msg": ""}]),
        _studioml(load_time=time_stamp(now)),
        _studioml(host=host),
    ]


def start_lines(
    experiment_key: str, project: str | None, artifacts: Mapping[str, str | None], now: Instant = None
) -> list[str]:
    """Lines written once the environment is ready, ending with the ``Start`` log patch just before python.

    A null project is written as Go's template rendered it, ``<no value>``; artifacts without a qualified
    locator get an empty string.
    """
    lines = identity_lines(experiment_key, project)
    lines += [_studioml(artifacts={label: artifacts[label] or ""}) for label in sorted(artifacts)]
    lines += [_studioml(start_time=time_stamp(now)), _log_patch("Start", now)]
    return lines


def identity_lines(experiment_key: str, project: str | None) -> list[str]:
    """The experiment's key and project: the head of :func:`start_lines`, and written on their own at the end
    of an attempt that never started its process, so every scrape document names its experiment."""
    return [
        _studioml(experiment={"key": experiment_key}),
        _studioml(experiment={"project": "<no value>" if project is None else project}),
    ]


def stop_lines(now: Instant = None) -> list[str]:
    """Lines written after python exited 0: the ``Stop`` log patch, then ``stop_time``."""
    return [_log_patch("Stop", now), _studioml(stop_time=time_stamp(now))]


def note_line(key: str, value: object) -> str:
    """An extra runner fact as a merge fragment, e.g. ``note_line("python", {"requested": "3.7", ...})``.

    A fragment only sets ``studioml.<key>``; ``log`` is refused because a fragment would replace the log.
    """
    if key == "log":
        raise ValueError("studioml.log grows only through add patches")
    return _studioml(**{key: value})


# --- the scrape (metadata.md §3) ---------------------------------------------------------------------------

def deep_merge(target: dict[str, Any], fragment: Mapping[str, Any]) -> None:
    """Fold ``fragment`` into ``target`` in place, the fragment winning, as the Go runner's merge does.

    Objects merge key by key; arrays and scalars replace. Unlike RFC 7386 merge patch, ``null`` is *stored*
    rather than deleting the key, except that ``null`` over an existing object leaves the object alone. That
    difference is why this is a few hand-written lines and not a merge-patch library. Iterative, so deeply
    nested fragments cannot exhaust the stack.
    """
    pending: list[tuple[dict[str, Any], Mapping[str, Any]]] = [(target, fragment)]
    while pending:
        dst, src = pending.pop()
        for key, value in src.items():
            old = dst.get(key)
            if isinstance(old, dict):
                if isinstance(value, dict):
                    pending.append((old, value))
                    continue
                if value is None:
                    continue
            dst[key] = value


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # NaN/Infinity: Go's decoder rejects them too


def _forbidden(op: Mapping[str, Any]) -> str | None:
    """Why an operation may not run, or None. Experiments may only ``add`` below ``/studioml``."""
    kind, path, source = op.get("op"), op.get("path"), op.get("from")
    if not isinstance(path, str):
        return None  # malformed: jsonpatch rejects it with a better message
    low = path.lower()
    if kind != "add" and low.startswith("/studioml"):
        return f"{kind} {path}: only add is allowed under /studioml"
    if kind != "test" and low in ("", "/studioml"):
        return f"{kind} {path!r}: would replace the runner's block"
    if kind == "move" and isinstance(source, str) and source.lower().startswith("/studioml"):
        return f"move from {source}: would remove runner metadata"
    return None


def _is_patch(value: list[Any]) -> bool:
    return bool(value) and all(isinstance(op, dict) and "op" in op for op in value)


class MetadataScraper:
    """Folds output lines, in order, into the attempt's metadata document.

    ``feed`` is called with every output line (the runner's own lines included); plain text lines, the common
    case, cost one strip, two character tests and a list append. The document size is tracked approximately
    (bytes fed since the last exact measurement) and measured exactly only when the estimate passes the cap.
    """

    def __init__(
        self,
        schema_logs: bool = True,
        max_line_bytes: int = 1 << 20,
        max_doc_bytes: int = 16 << 20,
        *,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.schema_logs = schema_logs
        self.max_line_bytes = max_line_bytes
        self.max_doc_bytes = max_doc_bytes
        self.problems: list[str] = []
        self.directives = 0  # directives applied; none means there is nothing worth writing
        self._clock = clock_ns
        self._doc: dict[str, Any] = json.loads(json.dumps(SEED))
        self._size = len(_line(SEED))
        self._unmeasured = self._recheck = max(max_doc_bytes // 16, 4096)
        self._log_full = False

    # public ---------------------------------------------------------------------------------------------

    def feed(self, line: str) -> None:
        """Take one output line (already masked like the output log); never raises on experiment input."""
        text = line.strip()
        size = len(text)
        if size <= 2 and len(text.encode("utf-8", "surrogatepass")) <= 2:
            return
        if size * 4 > self.max_line_bytes:
            size = len(text.encode("utf-8", "surrogatepass"))
            if size > self.max_line_bytes:
                self._problem(f"ignored an output line of {size} bytes (limit {self.max_line_bytes})")
                return
        first, last = text[0], text[-1]
        if (first == "{" and last == "}") or (first == "[" and last == "]"):
            self._directive(text)
        elif self.schema_logs:
            self._log(text)

    def document(self) -> dict[str, Any]:
        """A copy of the current document (callers may keep or change it freely)."""
        return json.loads(self.to_json())

    def to_json(self) -> str:
        """The document as one line of compact JSON (may hold lone surrogates from undecodable output)."""
        return _line(self._doc)

    @property
    def empty(self) -> bool:
        """True while no line has contributed anything: then no scrape file should exist (metadata.md §3)."""
        return self.directives == 0

    # internals ------------------------------------------------------------------------------------------

    def _problem(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)
        elif len(self.problems) == MAX_PROBLEMS:
            self.problems.append("further metadata problems not recorded")

    def _grew(self, size: int) -> None:
        self._size += size
        self._unmeasured += size

    def _directive(self, text: str) -> None:
        try:
            value = json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            return  # not JSON: dropped silently, as in Go
        if isinstance(value, dict):
            deep_merge(self._doc, value)
        elif _is_patch(value):
            if not self._patch(value, text):
                return
        else:
            return  # a JSON array that is not a patch is ignored
        self.directives += 1
        self._grew(len(text))

    def _patch(self, ops: list[dict[str, Any]], text: str) -> bool:
        for op in ops:
            why = _forbidden(op)
            if why:
                self._problem(f"skipped a forbidden patch ({why}): {text[:200]}")
                return False
        try:
            # atomic: a failing operation undoes the earlier ones without copying the whole document.
            jsonpatch.JsonPatch(ops).apply(self._doc, in_place=True, atomic=True)
        except _PATCH_ERRORS as exc:
            self._problem(f"skipped a failing patch ({exc}): {text[:200]}")
            return False
        return True

    def _log(self, text: str) -> None:
        if self._log_full or self._over_cap():
            return
        log = self._doc.get("studioml")
        log = log.get("log") if isinstance(log, dict) else None
        if not isinstance(log, list):
            self._problem("plain output line not logged: studioml.log is not an array")
            return
        log.append({"ts": scrape_stamp(self._clock()), "msg": text})
        self.directives += 1
        self._grew(len(text) + 48)  # 48 ~ the entry's keys, quotes and timestamp

    def _over_cap(self) -> bool:
        """True once the document is over ``max_doc_bytes``; closes the log for good, noting it once.

        Exact measurement (a full serialisation) happens only after ``_recheck`` bytes of growth since the
        previous one, so near the cap the cost stays proportional to what was fed; in between, the estimate
        (which over-counts replaced values by at most ``_recheck`` bytes) decides. A ``copy`` patch can grow
        the document by more than its own length; that growth is only seen at the next measurement.
        """
        if self._size <= self.max_doc_bytes:
            return False
        if self._unmeasured >= self._recheck:
            self._size = len(self.to_json().encode("utf-8", "surrogatepass"))
            self._unmeasured = 0
            if self._size <= self.max_doc_bytes:
                return False
        self._log_full = True
        self._problem(f"metadata document over {self.max_doc_bytes} bytes: plain lines no longer logged")
        return True


# --- storage -----------------------------------------------------------------------------------------------

def write_document_text(text: str | None, path: Path) -> None:
    """Atomically make ``path`` hold ``text`` plus a newline, or remove it when there is no text.

    The temporary file is a dot-file beside ``path`` (same filesystem, so ``os.replace`` is atomic); uploaders
    of ``_metadata/`` should skip dot-files. Lone surrogates (undecodable output bytes) are written as JSON
    ``\\udcXX`` escapes, which keeps the file valid UTF-8 and valid JSON.
    """
    if not text:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (text + "\n").encode("utf-8", "backslashreplace")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_document(scraper: MetadataScraper, path: Path) -> None:
    """Write the scrape file; blocking I/O, so trio callers serialise first and write in a thread.

    Serialising must happen on the thread that feeds the scraper: use
    ``text = None if scraper.empty else scraper.to_json()`` and then
    ``trio.to_thread.run_sync(write_document_text, text, path)``; this helper does both for sync callers.
    """
    write_document_text(None if scraper.empty else scraper.to_json(), path)
