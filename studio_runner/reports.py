"""Report messages on ``<queue>_response`` (spec/queues.md §4): an experimenter follows an experiment's
states, the runner's remarks about it and the JSON progress lines it prints, without reading the output
artifact.

Why it is built this way:

* It is an :class:`~studio_runner.events.EventBus` subscriber, so the lifecycle has no hook for it. The
  subscriber only filters and appends to a bounded buffer (a deque: the one structure that drops its *oldest*
  item when full, which a trio memory channel cannot); one task publishes the buffer in order, so reports of
  one experiment keep their order. A full buffer drops the oldest event, counted, with one warning. Nothing
  here can block or fail an experiment: a report that cannot be sent within ``publish_timeout`` is dropped,
  and failures are logged once per queue per minute.
* Only queues of a backend that is a :class:`~studio_runner.queues.base.Responder` (RabbitMQ, SQS) are
  considered; the local directory queue has no response queues. Whether ``<queue>_response`` exists is asked
  once per queue and again every ``recheck`` seconds (5 min, as Go re-lists queues; 1 min after an error).
* What is sent, one report per event, in the protobuf JSON mapping of Go's ``proto/reports.proto``
  (lowerCamelCase, enums by name, RFC 3339 UTC times)::

      accepted (downloads start)   progress{state: Prestart} + logging{Info, "start", fields: queue, attempt…}
      process started              progress{state: Started}
      a runner note in the output  logging{Info|Warning|Error, <note>}   ("studio-runner: …" lines)
      a JSON line it printed       progress{state: <current>, json: <the line>}
      final uploads begin          progress{state: Stopping}
      attempt finished             logging{Info|Error, "stop", fields: success, status, exit_code, error…}
      message acknowledged         progress{state: Success} or progress{state: Failed, error{msg, code}}
      message set aside            progress{state: Failed, error{msg}}   (also a request that never ran)
      handed back / taken back     logging{Warning, …}   (another attempt follows: no final state)

  "Progress lines" are the lines the metadata scrape reads as directives: a JSON object or array on one line,
  except the runner's own ``{"studioml": …}`` fragments and ``/studioml`` patches. Plain output lines are not
  sent (the output artifact has them; Go's per-line reports were broken anyway). JSON lines are limited per
  attempt (``line_burst``, then ``line_rate`` a second); the number dropped is in the ``stop`` record. Unlike
  Go's protojson, ``state`` is always written, also ``Prestart`` (its zero value), so a reader needs no
  schema to tell the states apart.
* Encryption: with a key for ``<queue>_response`` in ``--response-signatures-dir`` (longest prefix) a report
  is sealed exactly like Go's: ``b64(RSA-OAEP-SHA256(k)) "," b64(nonce ‖ secretbox(k, json))``, a fresh key
  each (:func:`studio_runner.crypto.seal`). Without a key it goes as clear JSON (Go sent nothing), unless the
  runner refuses clear-text requests (``--clear-text-messages=false``): a queue that must be encrypted one
  way must be the other way too, so then reports need a key or are not sent.
* Every text goes through :func:`studio_runner.redact.scrub` (output lines were already masked with the
  request's own secrets; this adds the runner's and every recent request's).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import trio

from studio_runner import crypto
from studio_runner.attempt import Action, Outcome, Phase, Status
from studio_runner.events import (
    AttemptRecord,
    AttemptStarted,
    Event,
    Finished,
    OutputLine,
    PhaseChanged,
    Registry,
    Settled,
)
from studio_runner.queues.base import QueueBackend, Responder
from studio_runner.redact import scrub

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

    from studio_runner.config import Settings
    from studio_runner.keyring import Keyring

log = logging.getLogger(__name__)

NOTE_PREFIX = "studio-runner: "
"""How the executor marks its own remarks in an experiment's output (OutputLog.note)."""

_STATE_OF_PHASE = {Phase.RUNNING: "Started", Phase.UPLOADING: "Stopping"}
_ANNOUNCING = (Phase.DOWNLOADING, Phase.BUILDING_ENV, Phase.RUNNING, Phase.UPLOADING)


def rfc3339(when: float) -> str:
    """``Timestamp`` in protojson: UTC, ``Z``, microseconds."""
    return datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def is_progress_line(text: str) -> bool:
    """A JSON object or array the experiment printed on one line (what the metadata scrape reads), not one of
    the runner's own metadata lines."""
    stripped = text.strip()
    if len(stripped) < 2 or (stripped[0], stripped[-1]) not in (("{", "}"), ("[", "]")):
        return False
    try:
        value = json.loads(stripped)
    except (ValueError, RecursionError):
        return False
    if isinstance(value, dict):
        return bool(value) and set(value) != {"studioml"}
    if isinstance(value, list):
        paths = [op.get("path") for op in value if isinstance(op, dict)]
        return not (paths and len(paths) == len(value)
                    and all(isinstance(p, str) and p.startswith("/studioml") for p in paths))
    return False


def note_severity(note: str) -> str:
    lowered = note.lower()
    if lowered.startswith(("internal runner error", "error")) or "exited with status" in lowered:
        return "Error"
    if lowered.startswith("warning") or "lost the claim" in lowered or "took its message back" in lowered:
        return "Warning"
    return "Info"


@dataclass
class _Bucket:
    """Token bucket for one attempt's JSON lines."""

    tokens: float
    stamp: float
    dropped: int = 0


@dataclass
class _Attempt:
    announced: bool = False
    state: str = "Prestart"
    outcome: Outcome | None = None
    finished: bool = False


@dataclass
class _Target:
    responder: Responder | None
    recheck_at: float


@dataclass
class _Item:
    at: float
    event: Event
    extra: dict[str, Any] = field(default_factory=dict)


class ResponseReporter:
    """The event subscriber and publishing task; see the module docstring. Start it with :meth:`run` (in a
    nursery, via ``nursery.start``) or :func:`start_reporter`."""

    def __init__(self, registry: Registry, backends: Sequence[QueueBackend],
                 key_for: Callable[[str], RSAPublicKey | None] | None = None, *, host: str = "",
                 require_encryption: bool = False, capacity: int = 10_000, recheck: float = 300.0,
                 error_recheck: float = 60.0, publish_timeout: float = 10.0, line_rate: float = 10.0,
                 line_burst: int = 100, warn_every: float = 60.0) -> None:
        """``backends`` is read on every lookup (the supervisor's own list may change); ``key_for`` maps a
        response queue name to its RSA key (``Keyring.response_key``)."""
        self.registry = registry
        self.backends = backends
        self.key_for = key_for
        self.host = host or registry.host
        self.require_encryption = require_encryption
        self.recheck, self.error_recheck = recheck, error_recheck
        self.publish_timeout = publish_timeout
        self.line_rate, self.line_burst = line_rate, line_burst
        self.warn_every = warn_every
        self._buffer: collections.deque[_Item] = collections.deque(maxlen=capacity)
        self._wake = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self._token: trio.lowlevel.TrioToken | None = None
        self._trio_thread: int | None = None
        self._attempts: dict[str, _Attempt] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._targets: dict[tuple[str, str], _Target] = {}
        self._warned: dict[str, float] = {}
        self.dropped = 0
        """Events dropped because the buffer was full."""
        self.sent = 0
        self.failed = 0

    # -- the subscriber (quick, never blocks) ----------------------------------------------------------------
    def __call__(self, event: Event) -> None:
        if not isinstance(event, (AttemptStarted, PhaseChanged, OutputLine, Finished, Settled)):
            return  # Transferred may come from worker threads; nothing else matters here
        record = event.record
        if isinstance(event, OutputLine) and not event.text.startswith((NOTE_PREFIX, "{", "[", " ", "\t")):
            return  # the common case, a plain output line, costs one test
        if not self._may_respond(record):
            return
        extra: dict[str, Any] = {}
        if isinstance(event, OutputLine):
            if not self._wanted_line(record, event.text):
                return
        elif isinstance(event, Finished):
            bucket = self._buckets.get(record.attempt_id)
            extra["lines_dropped"] = bucket.dropped if bucket else 0
        elif isinstance(event, Settled):
            self._buckets.pop(record.attempt_id, None)
        item = _Item(time.time(), event, extra)
        if self._trio_thread is not None and threading.get_ident() != self._trio_thread:
            if self._token is not None:
                self._token.run_sync_soon(self._push, item)
            return
        self._push(item)

    def _may_respond(self, record: AttemptRecord) -> bool:
        if not any(b.kind == record.backend and isinstance(b, Responder) for b in self.backends):
            return False
        target = self._targets.get((record.backend, record.queue))
        # known to have no response queue (until the recheck): only the attempt's end is needed, to forget it
        return target is None or target.responder is not None or time.monotonic() >= target.recheck_at \
            or record.attempt_id in self._attempts

    def _wanted_line(self, record: AttemptRecord, text: str) -> bool:
        if text.startswith(NOTE_PREFIX):
            return True
        head = text.lstrip()[:1]
        if head not in ("{", "[") or not is_progress_line(text):
            return False
        now = time.monotonic()
        bucket = self._buckets.get(record.attempt_id)
        if bucket is None:
            bucket = self._buckets[record.attempt_id] = _Bucket(float(self.line_burst), now)
        bucket.tokens = min(float(self.line_burst), bucket.tokens + (now - bucket.stamp) * self.line_rate)
        bucket.stamp = now
        if bucket.tokens < 1.0:
            bucket.dropped += 1
            return False
        bucket.tokens -= 1.0
        return True

    def _push(self, item: _Item) -> None:
        if len(self._buffer) == self._buffer.maxlen:
            self.dropped += 1
            if self.dropped == 1:
                log.warning("response reports are produced faster than the broker takes them: the oldest "
                            "are dropped (%d buffered at most)", self._buffer.maxlen)
        self._buffer.append(item)
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._wake.set()

    # -- the publishing task --------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Subscribe and publish until cancelled."""
        self._token = trio.lowlevel.current_trio_token()
        self._trio_thread = threading.get_ident()
        unsubscribe = self.registry.bus.subscribe(self)
        task_status.started()
        try:
            while True:
                if not self._buffer:
                    self._idle.set()
                    self._wake = trio.Event()
                    await self._wake.wait()
                    continue
                item = self._buffer.popleft()
                try:
                    await self._handle(item)
                except Exception:  # a bug here must never stop the reports of everything else
                    log.exception("response report for %s failed", type(item.event).__name__)
        finally:
            unsubscribe()

    async def flush(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds until all buffered reports are sent (or dropped): before exit."""
        with trio.move_on_after(timeout):
            while self._buffer or not self._idle.is_set():
                await self._idle.wait()

    async def _handle(self, item: _Item) -> None:
        event = item.event
        record = event.record  # type: ignore[union-attr]
        attempt = self._attempts.setdefault(record.attempt_id, _Attempt())
        reports = self._reports(item, record, attempt)
        if isinstance(event, Settled):
            self._attempts.pop(record.attempt_id, None)
        if not reports:
            return
        responder = await self._responder(record)
        if responder is None:
            return
        queue = record.queue
        key = self.key_for(f"{queue}_response") if self.key_for is not None else None
        if key is None and self.require_encryption:
            self._warn(queue, f"no key for {queue}_response in --response-signatures-dir and clear-text "
                              "messages are off: its reports are not sent")
            return
        for report in reports:
            body = json.dumps(report, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "replace")
            if key is not None:
                body = crypto.seal(key, body).encode("ascii")
            with trio.move_on_after(self.publish_timeout) as scope:
                try:
                    await responder.publish_response(queue, body)
                    self.sent += 1
                    continue
                except Exception as exc:
                    why = str(exc) or type(exc).__name__
            if scope.cancelled_caught:
                why = f"no confirmation within {self.publish_timeout:.0f} s"
            self.failed += 1
            self._warn(queue, f"report to {queue}_response dropped: {scrub(why)}")

    async def _responder(self, record: AttemptRecord) -> Responder | None:
        where = (record.backend, record.queue)
        target = self._targets.get(where)
        now = time.monotonic()
        if target is not None and now < target.recheck_at:
            return target.responder
        found: Responder | None = None
        failed = False
        for backend in list(self.backends):
            if backend.kind != record.backend or not isinstance(backend, Responder):
                continue
            with trio.move_on_after(self.publish_timeout) as scope:
                try:
                    if await backend.response_queue_exists(record.queue):
                        found = backend
                        break
                except Exception as exc:
                    failed = True
                    self._warn(record.queue, f"cannot tell whether {record.queue}_response exists: "
                                             f"{scrub(str(exc) or type(exc).__name__)}")
            if scope.cancelled_caught:
                failed = True
        before = target.responder if target is not None else None
        if (found is None) != (before is None) or target is None:
            log.info("%s_response %s: reports %s", record.queue, "found" if found else "absent",
                     "are published there" if found else "are not sent")
        recheck = self.error_recheck if failed and found is None else self.recheck
        self._targets[where] = _Target(found, now + recheck)
        return found

    def _warn(self, queue: str, text: str) -> None:
        now = time.monotonic()
        if now - self._warned.get(queue, -1e9) >= self.warn_every:
            self._warned[queue] = now
            log.warning("%s", text)

    # -- what to send ---------------------------------------------------------------------------------------
    def _reports(self, item: _Item, record: AttemptRecord, attempt: _Attempt) -> list[dict[str, Any]]:
        event, at = item.event, item.at
        out: list[dict[str, Any]] = []

        def announce() -> None:
            if not attempt.announced:
                attempt.announced = True
                out.append(self._progress(record, at, "Prestart"))
                out.append(self._logging(record, at, "Info", "start", {
                    "queue": record.queue, "attempt": str(record.attempt), "attempt_id": record.attempt_id,
                    "host": self.host}))

        if isinstance(event, PhaseChanged):
            if event.phase in _ANNOUNCING:
                announce()
            state = _STATE_OF_PHASE.get(event.phase)
            if state is not None and state != attempt.state:
                attempt.state = state
                out.append(self._progress(record, event.at, state))
        elif isinstance(event, OutputLine):
            announce()
            if event.text.startswith(NOTE_PREFIX):
                note = event.text[len(NOTE_PREFIX):]
                out.append(self._logging(record, at, note_severity(note), note))
            else:
                out.append(self._progress(record, at, attempt.state, json_line=event.text.strip()))
        elif isinstance(event, Finished):
            attempt.outcome = event.outcome
            if attempt.announced:
                out.append(self._stop(record, at, event.outcome, item.extra.get("lines_dropped", 0)))
        elif isinstance(event, Settled):
            out.extend(self._settled(record, at, attempt, event.action))
        return out

    def _stop(self, record: AttemptRecord, at: float, outcome: Outcome, lines_dropped: int) -> dict[str, Any]:
        success = outcome.status is Status.SUCCESS
        fields = {"success": "True" if success else "False", "status": str(outcome.status),
                  "seconds": f"{outcome.seconds:.1f}"}
        if outcome.exit_code is not None:
            fields["exit_code"] = str(outcome.exit_code)
        if outcome.reason:
            fields["error"] = outcome.reason
        if outcome.output_url:
            fields["output"] = outcome.output_url
        if lines_dropped:
            fields["progress_lines_dropped"] = str(lines_dropped)
        return self._logging(record, at, "Info" if success else "Error", "stop", fields)

    def _settled(self, record: AttemptRecord, at: float, attempt: _Attempt,
                 action: Action | None) -> list[dict[str, Any]]:
        outcome = attempt.outcome
        reason = (outcome.reason if outcome is not None else "") or record.reason
        status = outcome.status if outcome is not None else record.status
        if action is Action.ACK:
            if status is Status.SUCCESS:
                return [self._progress(record, at, "Success")]
            code = outcome.exit_code if outcome is not None else None
            return [self._progress(record, at, "Failed", error=reason or str(status), code=code)]
        if action is Action.SET_ASIDE:
            return [self._progress(record, at, "Failed", error=f"{status}: {reason}" if status else reason)]
        if not attempt.announced:
            return []  # released before it started here, or lost before anything was said: nothing to add
        if action is Action.HAND_BACK:
            return [self._logging(record, at, "Warning", f"attempt {record.attempt} ended on the runner's "
                                  f"side ({reason or status}); the message goes back for another attempt")]
        if action is Action.RELEASE:
            return [self._logging(record, at, "Info", f"released without running here ({reason})")]
        return [self._logging(record, at, "Warning", "the queue took the message back while it was held "
                              "here; it may run again elsewhere")]

    def _envelope(self, record: AttemptRecord, at: float) -> dict[str, Any]:
        report: dict[str, Any] = {"time": rfc3339(at)}
        if record.key:
            report["experimentId"] = scrub(record.key)
        report["uniqueId"] = record.attempt_id
        report["executorId"] = self.host
        return report

    def _progress(self, record: AttemptRecord, at: float, state: str, *, json_line: str | None = None,
                  error: str | None = None, code: int | None = None) -> dict[str, Any]:
        progress: dict[str, Any] = {"time": rfc3339(at)}
        if json_line is not None:
            progress["json"] = scrub(json_line)
        progress["state"] = state
        if error is not None or code:
            failure: dict[str, Any] = {}
            if error:
                failure["msg"] = scrub(error)
            if code:
                failure["code"] = code
            progress["error"] = failure
        report = self._envelope(record, at)
        report["progress"] = progress
        return report

    def _logging(self, record: AttemptRecord, at: float, severity: str, message: str,
                 fields: dict[str, str] | None = None) -> dict[str, Any]:
        entry: dict[str, Any] = {"time": rfc3339(at), "severity": severity, "message": scrub(message)}
        if fields:
            entry["fields"] = {name: scrub(value) for name, value in fields.items()}
        report = self._envelope(record, at)
        report["logging"] = entry
        return report


async def start_reporter(nursery: trio.Nursery, registry: Registry, backends: Sequence[QueueBackend],
                         keyring: Keyring | None, settings: Settings) -> ResponseReporter | None:
    """Start the reporter in ``nursery`` when ``--response-queues`` is on and some backend has response
    queues; returns it (call ``flush`` before exiting to send what is buffered), else None."""
    if not settings.response_queues or not any(isinstance(b, Responder) for b in backends):
        return None
    if keyring is None:
        from studio_runner.keyring import Keyring

        keyring = Keyring(settings.encrypt_dir, settings.request_signatures_dir,
                          settings.response_signatures_dir)
    reporter = ResponseReporter(registry, backends, keyring.response_key, host=settings.hostname,
                                require_encryption=not settings.clear_text_messages)
    await nursery.start(reporter.run)
    return reporter
