"""The vocabulary of one attempt: what happened (Status), what to do with its message (Action), where it is
(Phase), why it was stopped early (StopCause), and the record of it all (Outcome).

One spelling for each: the executor decides Status and Action, the supervisor carries out the Action (after
its own retry rules), and reports, metrics and the TUI read the same enums. A kill the runner caused is
never the experiment's result: it has its own StopCause, and only signals the runner did not send (the OOM
killer, the experiment's own) end in ``Status.FAILED``.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio


class Status(str, enum.Enum):
    """What happened to one attempt."""

    SUCCESS = "success"
    FAILED = "failed"
    """The experiment's own result: non-zero exit, a signal the runner did not send, a failed environment
    build, an unusable input (bad archive, over its disk budget)."""
    TIMEOUT = "timeout"
    """Stopped at its deadline (max_duration, experimentLifetime, --max-lifetime): a result."""
    ABORTED = "aborted"
    """Its queue was deleted: the experimenter's abort."""
    EXPIRED = "expired"
    """Its lifetime ended before it could start."""
    INVALID = "invalid"
    """The message is not a runnable request."""
    INTERRUPTED = "interrupted"
    """The runner stopped it (shutdown): not a result, the message goes back."""
    DEFERRED = "deferred"
    """Not started here (it did not fit this machine now): released without counting an attempt."""
    FAULT = "fault"
    """The runner could not do its job (storage, disk full, a bug of ours): the message goes back."""

    def __str__(self) -> str:
        return self.value


class Action(str, enum.Enum):
    """What to do with the message after an attempt."""

    ACK = "ack"
    """Done, successfully or not: remove it."""
    HAND_BACK = "hand_back"
    """Another attempt, counting this one (after a back-off; set aside after --max-attempts)."""
    RELEASE = "release"
    """Back to the queue without counting an attempt: it never started here."""
    SET_ASIDE = "set_aside"
    """It can never run: quarantine it with the reason."""

    def __str__(self) -> str:
        return self.value


class Phase(str, enum.Enum):
    """Where a running attempt is; the registry stamps each change."""

    CLAIMED = "claimed"
    DOWNLOADING = "downloading"
    BUILDING_ENV = "building_env"
    RUNNING = "running"
    UPLOADING = "uploading"
    SETTLING = "settling"
    BACKOFF = "backoff"
    """Finished with a runner-side fault; the message is held until its retry delay is over."""
    DONE = "done"

    def __str__(self) -> str:
        return self.value


class StopCause(str, enum.Enum):
    """Why the runner stops an experiment before it ends on its own; decides Status and Action."""

    SHUTDOWN = "shutdown"
    QUEUE_DELETED = "queue_deleted"
    DISK_FULL = "disk_full"

    @property
    def status(self) -> Status:
        return {StopCause.SHUTDOWN: Status.INTERRUPTED, StopCause.QUEUE_DELETED: Status.ABORTED,
                StopCause.DISK_FULL: Status.FAULT}[self]

    @property
    def action(self) -> Action:
        return Action.ACK if self is StopCause.QUEUE_DELETED else Action.HAND_BACK


@dataclass
class Outcome:
    """What happened to one attempt and what to do with its message."""

    key: str
    status: Status
    action: Action
    reason: str = ""
    exit_code: int | None = None
    attempt_id: str = ""
    attempt: int = 1
    queue: str = ""
    output_url: str | None = None
    metadata_url: str | None = None
    started: float = field(default_factory=time.time)
    finished: float = 0.0
    env_cache_hit: bool | None = None
    ran: bool = False
    """Whether the experiment's process was started in this attempt."""

    @property
    def seconds(self) -> float:
        return max(0.0, self.finished - self.started)

    def set(self, status: Status, action: Action, reason: str = "") -> None:
        self.status, self.action, self.reason = status, action, reason


class Abort:
    """A request to stop a running attempt early, and the events noted while it runs.

    Before the process starts, an abort cancels downloads and the environment build; once it runs, the
    executor stops the process tree gracefully (SIGTERM, grace period, SIGKILL) and uploads what exists.
    """

    def __init__(self) -> None:
        self.event = trio.Event()
        self.shutdown = trio.Event()
        """Set whenever the runner is stopping at once, even after an earlier cause: retries give up."""
        self.cause: StopCause | None = None
        self.reason = ""
        self._notes: list[tuple[str, dict[str, Any]]] = []
        self._sink: Callable[[str, dict[str, Any]], None] | None = None

    def trigger(self, cause: StopCause, reason: str) -> None:
        """Ask the attempt to stop; the first cause wins (a shutdown is always noted in ``shutdown``)."""
        if cause is StopCause.SHUTDOWN:
            self.shutdown.set()
        if not self.event.is_set():
            self.cause, self.reason = cause, reason
            self.event.set()

    def note(self, text: str, **facts: Any) -> None:
        """Record an event (e.g. the broker took the message back) in the attempt's output and metadata."""
        if self._sink is None:
            self._notes.append((text, facts))
        else:
            self._sink(text, facts)

    def attach(self, sink: Callable[[str, dict[str, Any]], None]) -> None:
        self._sink = sink
        for text, facts in self._notes:
            sink(text, facts)
        self._notes.clear()
