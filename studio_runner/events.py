"""The attempts a runner holds, and the stream of events about them that other parts subscribe to.

The supervisor and the executor only report facts here (a message was claimed, a phase changed, bytes moved,
an attempt finished, its message was settled); status pages, metrics, the TUI and reports subscribe to the
:class:`EventBus` or read the :class:`Registry`, so none of them needs a hook inside the lifecycle.

Subscribers are plain callables run synchronously by :meth:`EventBus.publish`: they must be quick and must
not block (hand work to a channel of their own if needed). An exception in one is logged and never reaches
the attempt. The registry is bounded: finished attempts are kept only in a short ring (``keep_finished``), so
a runner that runs for months holds memory for what runs now, not for everything it ever ran.
"""

from __future__ import annotations

import collections
import contextvars
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from studio_runner.attempt import Action, Outcome, Phase, Status
from studio_runner.metadata import base62

log = logging.getLogger(__name__)


@dataclass
class AttemptRecord:
    """One message in this runner's hands, from claim to settlement. Read it; only the registry writes."""

    attempt_id: str
    queue: str
    backend: str
    message_id: str
    attempt: int
    claimed_at: float
    key: str = ""
    """The experiment key, once the message parsed."""
    project: str = ""
    phase: Phase = Phase.CLAIMED
    phase_since: float = 0.0
    phases: list[tuple[Phase, float]] = field(default_factory=list)
    bytes_downloaded: int = 0
    bytes_uploaded: int = 0
    pid: int | None = None
    cores: int = 0
    """Cores reserved for the attempt (0 until admitted)."""
    ram: int = 0
    gpus: str = ""
    """The cards it was given (``CUDA_VISIBLE_DEVICES``), empty for none."""
    cpu_percent: float = 0.0
    """CPU of its process tree over the last sample, in percent of one core."""
    rss: int = 0
    """Resident memory of its process tree at the last sample."""
    pids: set[int] = field(default_factory=set)
    """Every process id its tree ran (GPU cards are released once none of them holds memory)."""
    status: Status | None = None
    action: Action | None = None
    reason: str = ""
    finished_at: float | None = None
    settled_at: float | None = None


@dataclass(frozen=True)
class AttemptStarted:
    record: AttemptRecord


@dataclass(frozen=True)
class PhaseChanged:
    record: AttemptRecord
    phase: Phase
    at: float


@dataclass(frozen=True)
class OutputLine:
    """One masked line of an experiment's output (or a runner note in it)."""

    record: AttemptRecord
    text: str


@dataclass(frozen=True)
class Transferred:
    """Bytes moved to or from storage for an attempt (one object)."""

    record: AttemptRecord
    direction: str
    """``down`` or ``up``."""
    nbytes: int
    url: str


@dataclass(frozen=True)
class Checkpointed:
    record: AttemptRecord
    at: float
    final: bool


@dataclass(frozen=True)
class Finished:
    record: AttemptRecord
    outcome: Outcome


@dataclass(frozen=True)
class Settled:
    """The message of an attempt was acknowledged, handed back, released or set aside (or, when the claim
    was lost, left to the broker: ``action`` is None)."""

    record: AttemptRecord
    action: Action | None
    at: float


@dataclass(frozen=True)
class QueuesListed:
    """One backend's queues were listed (a rescan): ``ok`` False when listing failed (``reason`` says why)."""

    backend: str
    location: str
    """Where the queues live: the queue root, the broker URL (masked)."""
    ok: bool
    queues: tuple[str, ...]
    """The queues served from this backend after the runner's name filter (the previous list on failure)."""
    reason: str = ""


@dataclass(frozen=True)
class QueueChecked:
    """Intake looked at a queue for work, or (``ignored``) skipped it on purpose: intake suspended, the
    queue paused, its last request does not fit now."""

    backend: str
    location: str
    queue: str
    ignored: bool = False


@dataclass(frozen=True)
class IntakeChanged:
    """The runner's intake state changed (Running, DrainAndSuspend, DrainAndTerminate, ShuttingDown)."""

    state: str
    reason: str
    at: float


Event = (AttemptStarted | PhaseChanged | OutputLine | Transferred | Checkpointed | Finished | Settled
         | QueuesListed | QueueChecked | IntakeChanged)
Subscriber = Callable[[Event], None]


class EventBus:
    """Synchronous fan-out of events to subscribers; see the module docstring for the rules."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Add ``subscriber``; returns the function that removes it."""
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber) if subscriber in self._subscribers else None

    @property
    def has_subscribers(self) -> bool:
        return bool(self._subscribers)

    def publish(self, event: Event) -> None:
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception:
                log.exception("event subscriber %r failed on %s", subscriber, type(event).__name__)


_current: contextvars.ContextVar[AttemptRecord | None] = contextvars.ContextVar("attempt", default=None)


def current_attempt() -> AttemptRecord | None:
    """The attempt the calling task works for (storage transfers are counted against it), if any."""
    return _current.get()


def bind_attempt(record: AttemptRecord | None) -> contextvars.Token[AttemptRecord | None]:
    """Make ``record`` the current attempt of this task and the tasks and threads it starts from now on."""
    return _current.set(record)


def new_attempt_id(host: str, when: float | None = None) -> str:
    """``<host>-<base62 unix seconds>-<4 hex>``: Go's ``<host>-<base62>`` plus a random part, because two
    attempts of one message can start within the same second and each needs its own id."""
    when = time.time() if when is None else when
    return f"{host}-{base62(int(when))}-{secrets.token_hex(2)}"


class Registry:
    """The attempts this runner holds now, plus a short ring of finished ones; publishes every change."""

    def __init__(self, host: str, bus: EventBus | None = None, keep_finished: int = 50) -> None:
        self.host = host
        self.bus = bus if bus is not None else EventBus()
        self._live: dict[str, AttemptRecord] = {}
        self._finished: collections.deque[AttemptRecord] = collections.deque(maxlen=keep_finished)

    # -- reading ----------------------------------------------------------------------------------------
    def live(self) -> list[AttemptRecord]:
        """Attempts held now (claimed, running, uploading, backing off), oldest first."""
        return sorted(self._live.values(), key=lambda r: r.claimed_at)

    def finished(self) -> list[AttemptRecord]:
        """The most recently settled attempts, oldest first (bounded)."""
        return list(self._finished)

    def __iter__(self) -> Iterator[AttemptRecord]:
        return iter(self.live())

    def __len__(self) -> int:
        return len(self._live)

    def get(self, attempt_id: str) -> AttemptRecord | None:
        return self._live.get(attempt_id)

    # -- writing ----------------------------------------------------------------------------------------
    def claim(self, queue: str, backend: str, message_id: str, attempt: int) -> AttemptRecord:
        now = time.time()
        record = AttemptRecord(attempt_id=new_attempt_id(self.host, now), queue=queue, backend=backend,
                               message_id=message_id, attempt=attempt, claimed_at=now, phase_since=now,
                               phases=[(Phase.CLAIMED, now)])
        self._live[record.attempt_id] = record
        self.bus.publish(AttemptStarted(record))
        return record

    def identify(self, record: AttemptRecord, key: str, project: str | None) -> None:
        record.key, record.project = key, project or ""

    def phase(self, record: AttemptRecord, phase: Phase) -> None:
        if record.phase is phase:
            return
        now = time.time()
        record.phase, record.phase_since = phase, now
        record.phases.append((phase, now))
        self.bus.publish(PhaseChanged(record, phase, now))

    def output(self, record: AttemptRecord, text: str) -> None:
        if self.bus.has_subscribers:
            self.bus.publish(OutputLine(record, text))

    def reserved(self, record: AttemptRecord, cores: int, ram: int, gpus: str) -> None:
        record.cores, record.ram, record.gpus = cores, ram, gpus

    def usage(self, record: AttemptRecord, cpu_percent: float, rss: int, pids: set[int]) -> None:
        record.cpu_percent, record.rss = cpu_percent, rss
        record.pids |= pids

    def transferred(self, record: AttemptRecord, direction: str, nbytes: int, url: str) -> None:
        if direction == "down":
            record.bytes_downloaded += nbytes
        else:
            record.bytes_uploaded += nbytes
        self.bus.publish(Transferred(record, direction, nbytes, url))

    def checkpointed(self, record: AttemptRecord, final: bool) -> None:
        self.bus.publish(Checkpointed(record, time.time(), final))

    def finish(self, record: AttemptRecord, outcome: Outcome) -> None:
        record.status, record.action, record.reason = outcome.status, outcome.action, outcome.reason
        record.finished_at = time.time()
        self.bus.publish(Finished(record, outcome))

    def settle(self, record: AttemptRecord, action: Action | None) -> None:
        """The message left our hands: the record moves to the finished ring."""
        now = time.time()
        record.action = action
        record.settled_at = now
        self.phase(record, Phase.DONE)
        self._live.pop(record.attempt_id, None)
        self._finished.append(record)
        self.bus.publish(Settled(record, action, now))
