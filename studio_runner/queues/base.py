"""The contract every queue backend honours (local directory, RabbitMQ, SQS, ...).

A backend finds queues and hands out one message at a time as a :class:`Delivery`. The supervisor decides
when to ask (only while it has room for more work) and what to do with each delivery; the backend decides
how "take", "give back" and "set aside" map onto its broker. Delivery is at-least-once: a message is
removed only by :meth:`Delivery.ack` or :meth:`Delivery.set_aside`; if the runner dies before either, the
message must reach another runner.

Optional broker features are part of the protocol, with a do-nothing answer where a broker has no such
thing (``keep_alive`` for brokers without leases, ``deadline_warning`` for brokers without a delivery
timeout), so the supervisor never probes backends with ``getattr``.

An idle runner must cost next to nothing, so the supervisor does not poll ``receive`` on every queue all the
time: after a round that found nothing it calls ``wait_for_work``, which each backend answers the cheapest
way it has (file system events, a broker consumer, an event set on publish), and polls again only when that
returns. The contract suite in
``tests/queues/test_contract.py`` runs every backend through the same checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import trio


@runtime_checkable
class Delivery(Protocol):
    """One claimed message. Exactly one of ack / nack / release / set_aside is called, once."""

    queue: str
    """Bare queue name the message came from (``local_x``, ``rmq_team``)."""

    message_id: str
    """Backend-specific identifier, for logs only."""

    body: bytes
    """The raw message body, exactly as published."""

    attempt: int
    """1 for the first delivery; grows each time the message was handed back by :meth:`nack` (or its
    runner died holding it); :meth:`release` does not grow it."""

    lost: trio.Event
    """Set when the backend lost its claim (channel closed, lease expired): the message may already be
    running elsewhere. The experiment keeps going and uploads; the final ack is then skipped."""

    lost_reason: str | None
    """Why the claim was lost, in words (consumer timeout, connection lost, file moved); None until then."""

    async def ack(self) -> None:
        """The work is done (successfully or not): remove the message for good."""

    async def nack(self) -> None:
        """Hand the message back for another attempt, counting this one."""

    async def release(self) -> None:
        """Hand the message back without counting an attempt: it was never started here (it did not fit,
        intake is paused, the runner is stopping before it began)."""

    async def set_aside(self, reason: str) -> None:
        """Remove the message from the work queue but keep it (quarantine / dead letter) with the reason."""

    async def keep_alive(self) -> None:
        """Renew the claim on brokers whose claims expire (SQS visibility); a no-op elsewhere. Called
        periodically while the message is held; raising is not fatal (the claim may then be lost)."""


@runtime_checkable
class QueueBackend(Protocol):
    """Finds queues and claims messages from them."""

    kind: str
    """Short backend name used in logs and metrics labels: ``local``, ``rabbitmq``, ``sqs``."""

    async def start(self) -> None:
        """Connect and check the configuration, so mistakes show at start-up. Idempotent."""

    async def discover(self) -> list[str]:
        """Names of the queues this backend can serve now (before the runner's name filter)."""

    async def receive(self, queue: str) -> Delivery | None:
        """Claim the next message of ``queue``, or return None at once when there is none."""

    async def wait_for_work(self, queues: Sequence[str], timeout: float) -> None:
        """Return when one of ``queues`` may have a message, or after ``timeout`` seconds.

        Spurious returns are allowed (the caller just polls once more); a missed message is not: a message
        that arrived after the caller's last ``receive`` of its queue makes this return at once or within
        the backend's pickup latency (0.2 s at most). The caller polls every queue again at least every
        ``timeout``, which is the safety net for events a backend cannot see. A backend may hold a message
        for its queue's next ``receive`` (one per queue at most) and gives it back, without counting an
        attempt, if nobody asks for it soon."""

    async def exists(self, queue: str) -> bool:
        """Whether ``queue`` still exists; deleting a queue aborts its running experiments."""

    def deadline_warning(self, seconds: float) -> str | None:
        """A warning when an experiment allowed to run ``seconds`` would outlive the broker's hold on its
        message (RabbitMQ's consumer timeout), else None."""

    async def aclose(self) -> None:
        """Release connections. Unfinished deliveries go back to the broker."""


@runtime_checkable
class Responder(Protocol):
    """A backend that can carry report messages back on ``<queue>_response`` (spec/queues.md §4): RabbitMQ
    and SQS. Reports never block or fail an experiment: callers drop a report that cannot be sent."""

    async def response_queue_exists(self, queue: str) -> bool:
        """Whether ``<queue>_response`` exists now (the client creates it when it wants reports)."""

    async def publish_response(self, queue: str, body: bytes) -> None:
        """Publish one report on ``<queue>_response``; raises on failure (the caller logs and drops it)."""
