"""An in-memory queue backend with the real backends' contract, for supervisor and executor tests.

It behaves like the local directory queue where the contract leaves room: a handed-back message keeps its
place in line; nack counts an attempt and release does not; a delivery still held at
:meth:`MemoryQueue.aclose` goes back as if its runner had died (one attempt counted) and is lost;
:meth:`MemoryQueue.lose` plays a broker that took a claim back (RabbitMQ channel closed, SQS visibility
lapsed) so tests can drive ``Delivery.lost`` and ``Delivery.lost_reason``. Like the real backends, settling
a lost delivery does nothing, and settling twice is logged rather than raised. ``wait_for_work`` returns when
a message was published or handed back to one of the watched queues since the last return that covered it.
"""

from __future__ import annotations

import bisect
import itertools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from studio_runner.queues.base import Delivery, QueueBackend

log = logging.getLogger(__name__)


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
    """One claimed in-memory message. A lost delivery's settle calls change nothing."""

    def __init__(self, backend: MemoryQueue, queue: str, message: _Message) -> None:
        self.queue = queue
        self.message_id = message.message_id
        self.body = message.body
        self.attempt = message.handed_back + 1
        self.lost = trio.Event()
        self.lost_reason: str | None = None
        self._backend = backend
        self._message = message
        self._done = False

    def __repr__(self) -> str:
        return f"<MemoryDelivery {self.queue}/{self.message_id} attempt={self.attempt}>"

    async def ack(self) -> None:
        """Remove the message for good."""
        await trio.lowlevel.checkpoint()
        if self._finish("ack"):
            self._backend.acked.append(self._record())

    async def nack(self) -> None:
        """Put the message back in its original place, counting this attempt."""
        await trio.lowlevel.checkpoint()
        if self._finish("nack"):
            self._backend.nacked.append(self._record())
            self._backend._hand_back(self.queue, self._message, self.attempt)

    async def release(self) -> None:
        """Put the message back in its original place without counting an attempt."""
        await trio.lowlevel.checkpoint()
        if self._finish("release"):
            self._backend.released.append(self._record())
            self._backend._hand_back(self.queue, self._message, self.attempt - 1)

    async def set_aside(self, reason: str) -> None:
        """Quarantine the message with ``reason``."""
        await trio.lowlevel.checkpoint()
        if self._finish("set_aside"):
            self._backend.set_aside_items.append(self._record(reason))

    async def keep_alive(self) -> None:
        """Nothing to renew: in-memory claims never expire (use :meth:`MemoryQueue.lose` to take one)."""
        await trio.lowlevel.checkpoint()

    def _finish(self, op: str) -> bool:
        """Mark the delivery finished; False (logged) when the claim was lost or it was already finished."""
        if self.lost.is_set():
            log.info("%s of %r skipped: the claim was lost (%s)", op, self, self.lost_reason)
            return False
        if self._done:
            log.warning("%s of %r ignored: it was already settled", op, self)
            return False
        self._done = True
        self._backend._live.discard(self)
        return True

    def _record(self, reason: str | None = None) -> Record:
        return Record(self.queue, self.message_id, self.body, self.attempt, reason)


class MemoryQueue:
    """Queues as in-memory lists; inspect ``acked``, ``nacked``, ``released``, ``set_aside_items`` and
    ``pending()``."""

    kind = "memory"

    def __init__(self, queues: Iterable[str] = ()) -> None:
        self._queues: dict[str, list[_Message]] = {q: [] for q in queues}
        self._seq = itertools.count(1)
        self._live: set[MemoryDelivery] = set()
        self.acked: list[Record] = []
        self.nacked: list[Record] = []
        self.released: list[Record] = []
        self.set_aside_items: list[Record] = []
        self._unseen: set[str] = set()
        """Queues that got a message since a wait_for_work covering them last returned."""
        self._arrived = trio.Event()

    # -- test helpers -------------------------------------------------------------------------------------

    def publish(self, queue: str, body: bytes) -> str:
        """Append a message (creating the queue, as clients do) and return its id."""
        seq = next(self._seq)
        message_id = f"m{seq}"
        self._queues.setdefault(queue, []).append(_Message(seq, message_id, bytes(body)))
        self._announce(queue)
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

    def lose(self, delivery: MemoryDelivery,
             reason: str = "the broker took the message back (MemoryQueue.lose)") -> None:
        """The broker takes the claim back: ``lost`` is set with ``reason`` and the message is waiting
        again, counted as an attempt (as a redelivery after a crash is)."""
        if delivery._done or delivery.lost.is_set():
            raise RuntimeError(f"{delivery!r} is not held")
        self._take_back(delivery, reason)

    def _take_back(self, delivery: MemoryDelivery, reason: str) -> None:
        delivery.lost_reason = reason
        delivery.lost.set()
        self._live.discard(delivery)
        self._hand_back(delivery.queue, delivery._message, delivery.attempt)

    # -- QueueBackend -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Nothing to connect to."""
        await trio.lowlevel.checkpoint()

    def deadline_warning(self, seconds: float) -> str | None:
        """None: in-memory claims never expire."""
        return None

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

    async def wait_for_work(self, queues: Sequence[str], timeout: float) -> None:
        """Return once a message arrives in one of ``queues`` (or arrived since the last return that
        covered that queue), or after ``timeout``."""
        wanted = set(queues)
        with trio.move_on_after(timeout):
            while not self._unseen & wanted:
                await self._arrived.wait()
        self._unseen -= wanted
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Unfinished deliveries go back, one attempt counted, as when a runner dies; they are lost."""
        await trio.lowlevel.checkpoint()
        for delivery in self.in_flight:
            self._take_back(delivery, "the runner closed the queue backend while holding the message")

    def _hand_back(self, queue: str, message: _Message, handed_back: int) -> None:
        message.handed_back = handed_back
        waiting = self._queues.get(queue)
        if waiting is None:
            record = Record(queue, message.message_id, message.body, handed_back, "queue deleted")
            self.set_aside_items.append(record)
            return
        bisect.insort(waiting, message)
        self._announce(queue)

    def _announce(self, queue: str) -> None:
        self._unseen.add(queue)
        self._arrived.set()
        self._arrived = trio.Event()


if TYPE_CHECKING:  # mypy proves that this backend honours the protocol; nothing runs

    def _honours_the_protocol(backend: MemoryQueue,
                              delivery: MemoryDelivery) -> tuple[QueueBackend, Delivery]:
        return backend, delivery
