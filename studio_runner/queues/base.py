"""The contract every queue backend honours (local directory, RabbitMQ, SQS, ...).

A backend finds queues and hands out one message at a time as a :class:`Delivery`. The supervisor decides
when to ask (only while it has room for more work) and what to do with each delivery; the backend decides
how "take", "give back" and "set aside" map onto its broker. Delivery is at-least-once: a message is
removed only by :meth:`Delivery.ack` or :meth:`Delivery.set_aside`; if the runner dies before either, the
message must reach another runner.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import trio


@runtime_checkable
class Delivery(Protocol):
    """One claimed message. Exactly one of ack / nack / set_aside is called, once."""

    queue: str
    """Bare queue name the message came from (``local_x``, ``rmq_team``)."""

    message_id: str
    """Backend-specific identifier, for logs only."""

    body: bytes
    """The raw message body, exactly as published."""

    attempt: int
    """1 for the first delivery; grows each time the message was handed back by :meth:`nack`."""

    lost: trio.Event
    """Set when the backend lost its claim (channel closed, lease expired): the message may already be
    running elsewhere. The experiment keeps going and uploads; the final ack is then skipped."""

    async def ack(self) -> None:
        """The work is done (successfully or not): remove the message for good."""

    async def nack(self) -> None:
        """Hand the message back for another attempt, counting this one."""

    async def set_aside(self, reason: str) -> None:
        """Remove the message from the work queue but keep it (quarantine / dead letter) with the reason."""


@runtime_checkable
class QueueBackend(Protocol):
    """Finds queues and claims messages from them."""

    kind: str
    """Short backend name used in logs and metrics labels: ``local``, ``rabbitmq``, ``sqs``."""

    async def discover(self) -> list[str]:
        """Names of the queues this backend can serve now (before the runner's name filter)."""

    async def receive(self, queue: str) -> Delivery | None:
        """Claim the next message of ``queue``, or return None at once when there is none."""

    async def exists(self, queue: str) -> bool:
        """Whether ``queue`` still exists; deleting a queue aborts its running experiments."""

    async def aclose(self) -> None:
        """Release connections. Unfinished deliveries go back to the broker."""
