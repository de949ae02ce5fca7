"""The ``/status`` JSON document: what the runner is doing now, for the TUI and for people with ``curl``.

The contract is the document's JSON schema, ``status_schema.json`` next to this module (the TUI is a client
of this endpoint and never shares the runner's loop). :class:`StatusApp` is everything the HTTP server
(:mod:`studio_runner.statusserver`) serves: the document, the Prometheus text, the intake control.

The document is built in the trio thread from the runner's own objects (registry, ledger, GPU pool, caches,
supervisor): they are only consistent there, and reading them costs microseconds, so polling every 0.5 s is
cheap. The only system calls are ``statvfs`` for free disk and nothing else; the artifact cache's size is the
figure it keeps (``bytes_used``), not a directory scan.

Output tails are kept by an event subscriber (:class:`OutputTails`): the last :data:`TAIL_LINES` lines of
each attempt held now, each line cut at :data:`TAIL_LINE_CHARS`, dropped when the attempt settles, so memory
is bounded by the number of attempts running.
"""

from __future__ import annotations

import collections
import json
import os
import time
from functools import cache
from importlib import resources
from typing import Any, Protocol

from studio_runner import __version__
from studio_runner.attempt import Status
from studio_runner.events import AttemptRecord, AttemptStarted, Event, Finished, OutputLine, Registry, Settled
from studio_runner.metrics import RunnerMetrics
from studio_runner.redact import scrub_tree

SCHEMA_VERSION = 1
TAIL_LINES = 50
TAIL_LINE_CHARS = 2000


class RunnerView(Protocol):
    """What the status document reads of the :class:`~studio_runner.supervisor.Supervisor`."""

    registry: Registry
    intake_state: str
    intake_reason: str
    intake_since: float

    def set_intake_state(self, state: str, reason: str) -> None: ...

    def served_queues(self) -> list[dict[str, object]]: ...


class OutputTails:
    """EventBus subscriber: the last lines of output of each attempt held now."""

    def __init__(self, lines: int = TAIL_LINES) -> None:
        self.lines = lines
        self._tails: dict[str, collections.deque[str]] = {}

    def __call__(self, event: Event) -> None:
        if isinstance(event, OutputLine):
            tail = self._tails.get(event.record.attempt_id)
            if tail is None:
                if event.record.settled_at is not None:
                    return  # a late line of an attempt already gone: never re-create its tail
                tail = self._tails[event.record.attempt_id] = collections.deque(maxlen=self.lines)
            tail.append(event.text[:TAIL_LINE_CHARS])
        elif isinstance(event, AttemptStarted):
            self._tails[event.record.attempt_id] = collections.deque(maxlen=self.lines)
        elif isinstance(event, Settled):
            self._tails.pop(event.record.attempt_id, None)

    def tail(self, attempt_id: str) -> list[str]:
        return list(self._tails.get(attempt_id, ()))

    def __len__(self) -> int:
        return len(self._tails)


class Totals:
    """EventBus subscriber: attempts that ended since start. ``completed`` leaves out attempts released
    unstarted (``deferred``: they did not run here); ``failed`` is every completed one that did not succeed
    (failed, timeout, aborted, expired, invalid, interrupted, fault)."""

    def __init__(self) -> None:
        self.completed = self.succeeded = 0

    def __call__(self, event: Event) -> None:
        if isinstance(event, Finished) and event.outcome.status is not Status.DEFERRED:
            self.completed += 1
            self.succeeded += event.outcome.status is Status.SUCCESS

    def to_dict(self) -> dict[str, int]:
        return {"completed": self.completed, "succeeded": self.succeeded,
                "failed": self.completed - self.succeeded}


@cache
def status_schema() -> dict[str, Any]:
    """The JSON schema of the document (shipped as package data)."""
    text = resources.files("studio_runner").joinpath("status_schema.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


class StatusApp:
    """The runner as the status server sees it: ``document()``, ``metrics_text()``, ``set_intake()``.

    Construct it before the supervisor runs (its subscribers must see every event), and :meth:`close` it
    when the runner stops. ``ledger``, ``env_cache`` and ``artifact_cache`` are the runner's own objects;
    when not given they are found where the runtime puts them (``supervisor.s.ledger``,
    ``supervisor.executor.s.env_cache`` / ``.artifact_cache``). ``metrics`` defaults to a new
    :class:`RunnerMetrics` on the supervisor's registry and ledger."""

    def __init__(self, supervisor: RunnerView, *, host: str | None = None, started_at: float | None = None,
                 ledger: Any = None, env_cache: Any = None, artifact_cache: Any = None,
                 metrics: RunnerMetrics | None = None) -> None:
        self.supervisor = supervisor
        registry = supervisor.registry
        self.host = host if host is not None else registry.host
        self.started_at = time.time() if started_at is None else started_at
        executor_settings = getattr(getattr(supervisor, "executor", None), "s", None)
        intake_settings = getattr(supervisor, "s", None)
        self.ledger = ledger if ledger is not None else getattr(intake_settings, "ledger", None)
        self.env_cache = env_cache if env_cache is not None else getattr(executor_settings, "env_cache", None)
        self.artifact_cache = (artifact_cache if artifact_cache is not None
                               else getattr(executor_settings, "artifact_cache", None))
        if metrics is None:
            metrics = RunnerMetrics(self.host, registry, ledger=self.ledger)
        elif metrics.ledger is None:
            metrics.ledger = self.ledger
        self.metrics = metrics
        self.tails = OutputTails()
        self.totals = Totals()
        self._detach = [registry.bus.subscribe(self.tails), registry.bus.subscribe(self.totals),
                        self.metrics.attach(registry.bus, self.artifact_cache)]

    def close(self) -> None:
        """Unsubscribe from the runner's events (idempotent)."""
        for detach in self._detach:
            detach()
        self._detach = []

    # -- what the server serves -------------------------------------------------------------------------
    def metrics_text(self) -> bytes:
        return self.metrics.render()

    def set_intake(self, state: str, reason: str) -> dict[str, str]:
        """Change the intake state (ValueError for an unknown one); returns the state now in force, which
        stays ``ShuttingDown`` once the runner is stopping."""
        self.supervisor.set_intake_state(state, reason)
        return {"state": self.supervisor.intake_state, "reason": self.supervisor.intake_reason}

    def document(self, now: float | None = None) -> dict[str, Any]:
        """The /status document (see status_schema.json); every string scrubbed (redact.scrub): it quotes
        requests (keys, reasons, output tails), and must never show a secret."""
        now = time.time() if now is None else now
        sup = self.supervisor
        document: dict[str, Any] = scrub_tree({
            "schema": SCHEMA_VERSION,
            "version": __version__,
            "host": self.host,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "now": now,
            "uptime_s": round(max(0.0, now - self.started_at), 3),
            "intake": {"state": sup.intake_state, "reason": sup.intake_reason, "since": sup.intake_since},
            "queues": [_queue(row) for row in sup.served_queues()],
            "running": [self._running(record, now) for record in sup.registry.live()],
            "finished": [_finished(record) for record in sup.registry.finished()],
            "resources": self._resources(),
            "gpus": self._gpus(),
            "caches": self._caches(),
            "totals": self.totals.to_dict(),
        })
        return document

    # -- parts --------------------------------------------------------------------------------------------
    def _running(self, record: AttemptRecord, now: float) -> dict[str, Any]:
        return {
            "attempt_id": record.attempt_id, "queue": record.queue, "backend": record.backend,
            "key": record.key, "project": record.project, "attempt": record.attempt,
            "phase": record.phase.value, "phase_since": record.phase_since,
            "elapsed_s": round(max(0.0, now - record.claimed_at), 3),
            "cores": record.cores, "ram": record.ram, "gpus": record.gpus,
            "cpu_percent": round(record.cpu_percent, 1), "rss": record.rss, "pid": record.pid,
            "bytes_downloaded": record.bytes_downloaded, "bytes_uploaded": record.bytes_uploaded,
            "output_tail": self.tails.tail(record.attempt_id),
        }

    def _resources(self) -> dict[str, Any]:
        ledger = self.ledger
        if ledger is None:
            empty = {"total": None, "free": None}
            return {"cores": dict(empty), "ram": dict(empty), "disk": dict(empty)}
        try:
            disk_free: int | None = max(0, ledger.disk_free())
        except OSError:
            disk_free = None
        cap = ledger.capacity
        return {"cores": {"total": cap.cores, "free": ledger.cores_free},
                "ram": {"total": cap.ram, "free": ledger.ram_free},
                "disk": {"total": cap.disk_cap, "free": disk_free}}

    def _gpus(self) -> dict[str, Any]:
        pool = self.ledger.gpus if self.ledger is not None else None
        if pool is None:
            return {"backend": "none", "reason": "no GPU pool", "cards": []}
        snapshot = pool.snapshot()
        cards = [{"index": c.index, "uuid": c.uuid, "name": c.name, "memory_total": c.memory_total,
                  "memory_used": c.memory_used, "utilisation": c.utilisation, "slots": c.slots,
                  "state": c.state, "owner": c.owner} for c in snapshot.cards]
        return {"backend": snapshot.backend, "reason": snapshot.reason, "cards": cards}

    def _caches(self) -> dict[str, Any]:
        artifacts = None
        cache = self.artifact_cache
        if cache is not None:
            artifacts = {"dir": str(cache.root), "bytes": cache.bytes_used, "limit": cache.max_bytes,
                         "hits": cache.hits, "misses": cache.misses}
        envs = None
        if self.env_cache is not None:
            envs = {"dir": str(self.env_cache.root), "limit": self.env_cache.max_bytes or None}
        return {"artifacts": artifacts, "envs": envs}


def _queue(row: dict[str, object]) -> dict[str, object]:
    return {"backend": row.get("backend", ""), "name": row.get("name", ""),
            "paused_for_s": row.get("paused_for_s"), "note": row.get("note", "")}


def _finished(record: AttemptRecord) -> dict[str, Any]:
    finished_at = record.finished_at if record.finished_at is not None else record.settled_at
    elapsed = None if finished_at is None else round(max(0.0, finished_at - record.claimed_at), 3)
    return {
        "attempt_id": record.attempt_id, "queue": record.queue, "backend": record.backend, "key": record.key,
        "project": record.project,
        "status": record.status.value if record.status is not None else None,
        "action": record.action.value if record.action is not None else None,
        "reason": record.reason, "elapsed_s": elapsed, "finished_at": finished_at,
    }
