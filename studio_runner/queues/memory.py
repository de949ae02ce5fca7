"""An in-memory queue backend with the real backends' contract, for supervisor and executor tests.

It behaves like the local directory queue where the contract leaves room: a handed-back message keeps its
place in line and counts an attempt; a delivery still held at :meth:`MemoryQueue.aclose` goes back as if its
runner had died (one attempt counted); :meth:`MemoryQueue.lose` plays a broker that took a claim back
(RabbitMQ channel closed, SQS visibility lapsed) so tests can drive ``Delivery.lost``.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

import trio


@dataclass(order=True)
class _Message:
    seq: int
    message_id: str = field(compare=False)
    body: bytes = field(compare=False)
    handed_back: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Record:
    """What happened to one delivery, for test assertions."""

    queue: str
    message_id: str
    body: bytes
    attempt: int
    reason: str | None = None


class MemoryDelivery:
    """One claimed in-memory message. A lost delivery's ack / nack / set_aside change nothing."""

    def __init__(self, backend: MemoryQueue, queue: str, message: _Message) -> None:
        self.queue = queue
        self.message_id = message.message_id
        self.body = message.body
        self.attempt = message.handed_back + 1
        self.lost = trio.Event()
        self._backend = backend
        self._message = message
        self._done = False

    def __repr__(self) -> str:
        return f"<MemoryDelivery {self.queue}/{self.message_id} attempt={self.attempt}>"

    async def ack(self) -> None:
        """Remove the message for good."""
        await trio.lowlevel.checkpoint()
        if self._finish():
            self._backend.acked.append(self._record())

    async def nack(self) -> None:
        """Put the message back in its original place, counting this attempt."""
        await trio.lowlevel.checkpoint()
        if self._finish():
            self._backend.nacked.append(self._record())
            self._backend._hand_back(self.queue, self._message, self.attempt)

    async def set_aside(self, reason: str) -> None:
        """Quarantine the message with ``reason``."""
        await trio.lowlevel.checkpoint()
        if self._finish():
            self._backend.set_aside_items.append(self._record(reason))

    def _finish(self) -> bool:
        """Mark the delivery finished; False when the claim was lost and nothing should happen."""
        if self._done:
            raise RuntimeError(f"{self!r} was already finished or released")
        self._done = True
        self._backend._live.discard(self)
        return not self.lost.is_set()

    def _record(self, reason: str | None = None) -> Record:
        return Record(self.queue, self.message_id, self.body, self.attempt, reason)


class MemoryQueue:
    """Queues as in-memory lists; inspect ``acked``, ``nacked``, ``set_aside_items`` and ``pending()``."""

    kind = "memory"

    def __init__(self, queues: Iterable[str] = ()) -> None:
        self._queues: dict[str, list[_Message]] = {q: [] for q in queues}
        self._seq = itertools.count(1)
        self._live: set[MemoryDelivery] = set()
        self.acked: list[Record] = []
        self.nacked: list[Record] = []
        self.set_aside_items: list[Record] = []

    # -- test helpers -------------------------------------------------------------------------------------

    def publish(self, queue: str, body: bytes) -> str:
        """Append a message (creating the queue, as clients do) and return its id."""
        seq = next(self._seq)
        message_id = f"m{seq}"
        self._queues.setdefault(queue, []).append(_Message(seq, message_id, bytes(body)))
        return message_id

    def create_queue(self, queue: str) -> None:
        self._queues.setdefault(queue, [])

    def delete_queue(self, queue: str) -> None:
        """What an experimenter does to abort: the queue and its waiting messages disappear."""
        self._queues.pop(queue, None)

    def pending(self, queue: str) -> list[bytes]:
        """Bodies waiting in ``queue``, in delivery order."""
        return [m.body for m in self._queues.get(queue, [])]

    @property
    def in_flight(self) -> list[MemoryDelivery]:
        return sorted(self._live, key=lambda d: d._message.seq)

    def lose(self, delivery: MemoryDelivery) -> None:
        """The broker takes the claim back: ``lost`` is set and the message is waiting again."""
        if delivery._done or delivery.lost.is_set():
            raise RuntimeError(f"{delivery!r} is not held")
        delivery.lost.set()
        self._live.discard(delivery)
        self._hand_back(delivery.queue, delivery._message, delivery.attempt)

    # -- QueueBackend -------------------------------------------------------------------------------------

    async def discover(self) -> list[str]:
        await trio.lowlevel.checkpoint()
        return sorted(self._queues)

    async def receive(self, queue: str) -> MemoryDelivery | None:
        await trio.lowlevel.checkpoint()
        waiting = self._queues.get(queue)
        if not waiting:
            return None
        delivery = MemoryDelivery(self, queue, waiting.pop(0))
        self._live.add(delivery)
        return delivery

    async def exists(self, queue: str) -> bool:
        await trio.lowlevel.checkpoint()
        return queue in self._queues

    async def aclose(self) -> None:
        """Unfinished deliveries go back, one attempt counted, as when a runner dies."""
        await trio.lowlevel.checkpoint()
        for delivery in self.in_flight:
            delivery._done = True
            self._live.discard(delivery)
            self._hand_back(delivery.queue, delivery._message, delivery.attempt)

    def _hand_back(self, queue: str, message: _Message, handed_back: int) -> None:
        message.handed_back = handed_back
        waiting = self._queues.get(queue)
        if waiting is None:
            record = Record(queue, message.message_id, message.body, handed_back, "queue deleted")
            self.set_aside_items.append(record)
            return
        bisect.insort(waiting, message)
