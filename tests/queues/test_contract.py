"""The queue contract (studio_runner/queues/base.py), checked the same way on every backend.

Each backend gets a small adapter that publishes the way that backend's clients do, inspects what was set
aside, deletes a queue and takes a claim away the way that backend loses one; every check below then runs
unchanged on the in-memory queue, the local directory queue (real files) and RabbitMQ (the real broker,
through the fixtures in tests/support/rabbitmq.py). Backend-specific behaviour (where a handed-back message
goes in line, how a dead runner's message is found) stays in the per-backend test files.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio
from support.pubsub_emulator import NEEDS as PUBSUB_NEEDS
from support.pubsub_emulator import PubSubEmulator, pubsub_emulator_fixture  # noqa: F401
from support.rabbitmq import (  # noqa: F401
    close_connection_named,
    declare_like_studioml,
    delete_queue,
    get_one,
    publish_like_studioml,
    rabbitmq_url_fixture,
    ready_count,
    unique_queue_fixture,
)
from support.s3server import MotoS3

from studio_runner.queues.base import Delivery, QueueBackend
from studio_runner.queues.localdir import LOCK_NAME, LocalDirQueue
from studio_runner.queues.memory import MemoryQueue
from studio_runner.queues.pubsub import REASON_ATTR, PubSubDelivery, PubSubQueue
from studio_runner.queues.rabbitmq import RabbitMQQueue
from studio_runner.queues.rmq_link import REASON_HEADER
from studio_runner.queues.sqs import ORIGIN_QUEUE_ATTR as SQS_ORIGIN_ATTR
from studio_runner.queues.sqs import REASON_ATTR as SQS_REASON_ATTR
from studio_runner.queues.sqs import SqsQueue

PROMPT = 2.0
"""Seconds within which receive() on an empty queue must answer (RabbitMQ answers from a passive declare)."""
PICKUP = 0.3
"""Seconds within which wait_for_work must report a message that arrived in a queue it waits on (the target
is work starting within 0.2 s of its arrival; the rest is the test's own publishing and scheduling)."""


class Adapter:
    """One backend's way of publishing, inspecting and losing; ``queue`` is the queue every check uses."""

    queue: str
    missing_queue: str
    handback_reaches_others_uncounted = True
    """False where the broker numbers deliveries and another runner cannot tell a hand-back without an
    attempt (release, an unclaimed wait) from a counted one: Pub/Sub's delivery_attempt."""

    def __init__(self) -> None:
        self._backends: list[QueueBackend] = []

    def new_backend(self) -> QueueBackend:
        """Another runner's view of the same queues (memory: the one shared in-memory 'broker')."""
        raise NotImplementedError

    async def publish(self, body: bytes) -> None:
        raise NotImplementedError

    async def create_queue(self) -> None:
        """Make ``queue`` exist, empty."""
        raise NotImplementedError

    async def waiting(self) -> int:
        """Messages waiting in ``queue`` (not counting claimed ones)."""
        raise NotImplementedError

    async def set_aside_messages(self) -> list[tuple[bytes, str]]:
        """(body, reason) of every message set aside from ``queue``."""
        raise NotImplementedError

    async def delete_queue(self) -> None:
        raise NotImplementedError

    async def lose(self, backend: QueueBackend, delivery: Delivery) -> None:
        """Take the claim away the way this backend loses one; the message is then waiting again."""
        raise NotImplementedError

    def run(self, scenario: Callable[[Adapter], Awaitable[None]]) -> None:
        """Run ``scenario`` under trio, closing every backend it made."""

        async def main() -> None:
            try:
                await scenario(self)
            finally:
                for backend in self._backends:
                    await backend.aclose()

        trio.run(main)


class MemoryAdapter(Adapter):
    queue = "local_t"
    missing_queue = "local_nothing"

    def __init__(self, tmp_path: Path) -> None:
        super().__init__()
        self.broker = MemoryQueue()

    def new_backend(self) -> QueueBackend:
        self._backends.append(self.broker)
        return self.broker

    async def publish(self, body: bytes) -> None:
        self.broker.publish(self.queue, body)

    async def create_queue(self) -> None:
        self.broker.create_queue(self.queue)

    async def waiting(self) -> int:
        return len(self.broker.pending(self.queue))

    async def set_aside_messages(self) -> list[tuple[bytes, str]]:
        return [(r.body, r.reason or "") for r in self.broker.set_aside_items if r.queue == self.queue]

    async def delete_queue(self) -> None:
        self.broker.delete_queue(self.queue)

    async def lose(self, backend: QueueBackend, delivery: Delivery) -> None:
        assert isinstance(backend, MemoryQueue)
        backend.lose(delivery, reason="test: the broker took the message back")  # type: ignore[arg-type]


class LocalAdapter(Adapter):
    queue = "local_t"
    missing_queue = "local_nothing"

    def __init__(self, tmp_path: Path) -> None:
        super().__init__()
        self.root = tmp_path / "queue"
        self._publisher = LocalDirQueue(self.root, "publisher")
        self._age = 1000.0
        self._runners = 0

    def new_backend(self) -> QueueBackend:
        self._runners += 1
        backend = LocalDirQueue(self.root, f"runner-{self._runners}", settle_after=0.0)
        self._backends.append(backend)
        return backend

    async def publish(self, body: bytes) -> None:
        name = await self._publisher.enqueue(self.queue, body)
        self._age -= 1  # file timestamps may be coarse: one second apart, in publish order
        when = time.time() - self._age
        os.utime(self.root / self.queue / name, (when, when))

    async def create_queue(self) -> None:
        (self.root / self.queue).mkdir(parents=True, exist_ok=True)

    async def waiting(self) -> int:
        qdir = self.root / self.queue
        return len([n for n in os.listdir(qdir) if n != LOCK_NAME]) if qdir.is_dir() else 0

    async def set_aside_messages(self) -> list[tuple[bytes, str]]:
        adir = self.root / ".set-aside" / self.queue
        if not adir.is_dir():
            return []
        return [((adir / n).read_bytes(), (adir / f"{n}.reason.txt").read_text())
                for n in sorted(os.listdir(adir)) if not n.endswith(".reason.txt")]

    async def delete_queue(self) -> None:
        shutil.rmtree(self.root / self.queue)

    async def lose(self, backend: QueueBackend, delivery: Delivery) -> None:
        # someone else (a person, a confused tool) puts the in-flight file back; the next probe notices
        path = Path(delivery.path)  # type: ignore[attr-defined]
        os.rename(path, self.root / self.queue / delivery.message_id)
        await backend.exists(self.queue)


class RabbitAdapter(Adapter):
    def __init__(self, amqp_url: str, queue: str) -> None:
        super().__init__()
        self.url = amqp_url
        self.queue = queue
        self.missing_queue = f"rmq_missing_{uuid.uuid4().hex}"
        self.aside = f"studio-runner.set-aside.test-{uuid.uuid4().hex}"

    def new_backend(self) -> QueueBackend:
        backend = RabbitMQQueue(self.url, set_aside_queue=self.aside)
        self._backends.append(backend)
        return backend

    async def publish(self, body: bytes) -> None:
        await trio.to_thread.run_sync(lambda: publish_like_studioml(self.url, self.queue, body))

    async def create_queue(self) -> None:
        await trio.to_thread.run_sync(declare_like_studioml, self.url, self.queue)

    async def waiting(self) -> int:
        return await trio.to_thread.run_sync(ready_count, self.url, self.queue) or 0

    async def set_aside_messages(self) -> list[tuple[bytes, str]]:
        found: list[tuple[bytes, str]] = []
        if await trio.to_thread.run_sync(ready_count, self.url, self.aside) is None:
            return found  # declared on first use: nothing was ever set aside
        while (got := await trio.to_thread.run_sync(get_one, self.url, self.aside)) is not None:
            _method, props, body = got
            found.append((body, str((props.headers or {}).get(REASON_HEADER, ""))))
        return found

    async def delete_queue(self) -> None:
        await trio.to_thread.run_sync(delete_queue, self.url, self.queue)

    async def lose(self, backend: QueueBackend, delivery: Delivery) -> None:
        # a network drop: the broker closes the connection and takes back every unacknowledged message
        assert isinstance(backend, RabbitMQQueue)
        await trio.to_thread.run_sync(close_connection_named, backend.connection_name)
        with trio.fail_after(15):
            await delivery.lost.wait()

    def cleanup(self) -> None:
        delete_queue(self.url, self.aside)


class PubSubAdapter(Adapter):
    handback_reaches_others_uncounted = False
    LEASE = 10.0

    def __init__(self, emulator: PubSubEmulator) -> None:
        super().__init__()
        self.emulator = emulator
        self.queue = emulator.unique()
        self.missing_queue = emulator.unique("pubsub_missing")
        self._created = False

    def new_backend(self) -> QueueBackend:
        backend = PubSubQueue(project=self.emulator.project, lease=self.LEASE, watch_window=5.0)
        self._backends.append(backend)
        return backend

    async def create_queue(self) -> None:
        if not self._created:
            await trio.to_thread.run_sync(lambda: self.emulator.create(self.queue))
            self._created = True

    async def publish(self, body: bytes) -> None:
        await self.create_queue()
        await trio.to_thread.run_sync(self.emulator.publish, self.queue, body)

    async def waiting(self) -> int:
        # a pull claims what it returns; hand it straight back (the emulator's counts are not exposed)
        return len(await trio.to_thread.run_sync(lambda: self.emulator.pull_all(self.queue, ack=False)))

    async def set_aside_messages(self) -> list[tuple[bytes, str]]:
        found = await trio.to_thread.run_sync(self.emulator.pull_all, self.queue + "_set_aside")
        return [(bytes(m.data), m.attributes.get(REASON_ATTR, "")) for m in found]

    async def delete_queue(self) -> None:
        await trio.to_thread.run_sync(self.emulator.delete_subscription, self.queue)

    async def lose(self, backend: QueueBackend, delivery: Delivery) -> None:
        # the runner stalls past its lease: Pub/Sub hands the message out again, the next renewal notices
        assert isinstance(delivery, PubSubDelivery)
        await trio.sleep(self.LEASE + 1)
        await delivery.keep_alive()

    def cleanup(self) -> None:
        for name in (self.queue, self.queue + "_set_aside"):
            self.emulator.delete_subscription(name)


class SqsAdapter(Adapter):
    """SQS on the moto server over HTTP; a claim is lost the SQS way: its visibility timeout runs out."""

    VISIBILITY = 5.0

    def __init__(self, server: MotoS3, tmp_path: Path) -> None:
        super().__init__()
        self.client = server.client("sqs")
        self.queue = f"sqs_t_{uuid.uuid4().hex[:16]}"
        self.missing_queue = f"sqs_missing_{uuid.uuid4().hex[:16]}"
        self.aside = f"studio-runner-set-aside-test-{uuid.uuid4().hex[:12]}"
        self.certs = tmp_path / "sqs-certs"
        server.write_aws_account(self.certs / "main")

    def new_backend(self) -> QueueBackend:
        backend = SqsQueue(self.certs, visibility_timeout=self.VISIBILITY, long_poll=5,
                           set_aside_queue=self.aside)
        self._backends.append(backend)
        return backend

    def _url(self, name: str) -> str:
        return str(self.client.create_queue(QueueName=name)["QueueUrl"])

    async def publish(self, body: bytes) -> None:
        await trio.to_thread.run_sync(lambda: self.client.send_message(QueueUrl=self._url(self.queue),
                                                                       MessageBody=body.decode()))

    async def create_queue(self) -> None:
        await trio.to_thread.run_sync(self._url, self.queue)

    async def waiting(self) -> int:
        def count() -> int:
            attrs = self.client.get_queue_attributes(QueueUrl=self._url(self.queue),
                                                     AttributeNames=["ApproximateNumberOfMessages"])
            return int(attrs["Attributes"]["ApproximateNumberOfMessages"])

        return await trio.to_thread.run_sync(count)

    async def set_aside_messages(self) -> list[tuple[bytes, str]]:
        def drain() -> list[tuple[bytes, str]]:
            urls = self.client.list_queues(QueueNamePrefix=self.aside).get("QueueUrls", [])
            found: list[tuple[bytes, str]] = []
            while urls and (got := self.client.receive_message(
                    QueueUrl=urls[0], MaxNumberOfMessages=10, MessageAttributeNames=["All"]).get("Messages")):
                for m in got:
                    attrs = {k: v["StringValue"] for k, v in m.get("MessageAttributes", {}).items()}
                    assert attrs[SQS_ORIGIN_ATTR] == self.queue
                    found.append((m["Body"].encode(), attrs.get(SQS_REASON_ATTR, "")))
                    self.client.delete_message(QueueUrl=urls[0], ReceiptHandle=m["ReceiptHandle"])
            return found

        return await trio.to_thread.run_sync(drain)

    async def delete_queue(self) -> None:
        await trio.to_thread.run_sync(lambda: self.client.delete_queue(QueueUrl=self._url(self.queue)))

    async def lose(self, backend: QueueBackend, delivery: Delivery) -> None:
        # nobody renewed the claim in time: the message is visible again, the next renewal notices
        await trio.sleep(self.VISIBILITY + 0.5)
        await delivery.keep_alive()

    def cleanup(self) -> None:
        for name in (self.queue, self.aside):
            for url in self.client.list_queues(QueueNamePrefix=name).get("QueueUrls", []):
                self.client.delete_queue(QueueUrl=url)


@pytest.fixture(params=["memory", "localdir", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
                        pytest.param("pubsub", marks=pytest.mark.expected_skip(PUBSUB_NEEDS)), "sqs"])
def adapter(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Adapter]:
    if request.param == "memory":
        yield MemoryAdapter(tmp_path)
    elif request.param == "localdir":
        yield LocalAdapter(tmp_path)
    elif request.param == "sqs":
        sqs = SqsAdapter(request.getfixturevalue("s3_server"), tmp_path)
        yield sqs
        sqs.cleanup()
    elif request.param == "pubsub":
        pubsub = PubSubAdapter(request.getfixturevalue("pubsub_emulator"))
        yield pubsub
        pubsub.cleanup()
    else:
        url, queue = request.getfixturevalue("rabbitmq_url"), request.getfixturevalue("unique_queue")
        rabbit = RabbitAdapter(url, queue)
        yield rabbit
        rabbit.cleanup()


async def receive_soon(backend: QueueBackend, queue: str, timeout: float = 10.0) -> Delivery:
    """The next delivery of ``queue``, polling while a handed-back message is on its way back."""
    with trio.fail_after(timeout):
        while (delivery := await backend.receive(queue)) is None:
            await trio.sleep(0.1)
    return delivery


async def settle_every_way(delivery: Delivery) -> None:
    """Every settle call there is; none may raise."""
    await delivery.keep_alive()
    await delivery.ack()
    await delivery.nack()
    await delivery.release()
    await delivery.set_aside("must not be recorded")
    await delivery.ack()


# --- the checks ------------------------------------------------------------------------------------------


def test_implements_the_protocol_and_start_is_idempotent(adapter: Adapter) -> None:
    async def scenario(a: Adapter) -> None:
        await a.publish(b'{"n": 1}')
        backend = a.new_backend()
        assert isinstance(backend, QueueBackend)
        assert isinstance(backend.kind, str) and backend.kind
        await backend.start()
        await backend.start()
        assert backend.deadline_warning(60) is None  # a minute never outlives any broker's hold
        d = await receive_soon(backend, a.queue)
        assert isinstance(d, Delivery)
        assert (d.queue, d.body, d.attempt) == (a.queue, b'{"n": 1}', 1)
        assert isinstance(d.message_id, str) and d.message_id
        assert not d.lost.is_set() and d.lost_reason is None
        await d.keep_alive()
        assert not d.lost.is_set()
        await d.ack()

    adapter.run(scenario)


def test_publish_receive_ack_removes_the_message(adapter: Adapter) -> None:
    async def scenario(a: Adapter) -> None:
        await a.publish(b'{"n": 1}')
        backend = a.new_backend()
        d = await receive_soon(backend, a.queue)
        assert await backend.receive(a.queue) is None  # the only message is claimed
        assert await a.waiting() == 0
        await d.ack()
        assert await a.waiting() == 0
        assert await backend.receive(a.queue) is None
        await backend.aclose()  # an unacknowledged message would be handed back now
        other = a.new_backend()
        assert await other.receive(a.queue) is None
        assert await a.waiting() == 0 and await a.set_aside_messages() == []

    adapter.run(scenario)


def test_nack_counts_an_attempt(adapter: Adapter) -> None:
    async def scenario(a: Adapter) -> None:
        await a.publish(b'{"n": 1}')
        backend = a.new_backend()
        first = await receive_soon(backend, a.queue)
        for expected in (1, 2, 3):
            d = first if expected == 1 else await receive_soon(backend, a.queue)
            assert (d.body, d.message_id, d.attempt) == (b'{"n": 1}', first.message_id, expected)
            await d.nack()
        last = await receive_soon(backend, a.queue)
        assert last.attempt == 4
        await last.ack()
        assert await backend.receive(a.queue) is None

    adapter.run(scenario)


def test_release_does_not_count_an_attempt(adapter: Adapter) -> None:
    async def scenario(a: Adapter) -> None:
        await a.publish(b'{"n": 1}')
        backend = a.new_backend()
        seen = []
        for settle in ("release", "nack", "release", "release", "ack"):
            d = await receive_soon(backend, a.queue)
            assert d.body == b'{"n": 1}'
            seen.append(d.attempt)
            await getattr(d, settle)()
        assert seen == [1, 1, 2, 2, 2]
        assert await backend.receive(a.queue) is None
        assert await a.set_aside_messages() == []

    adapter.run(scenario)


def test_set_aside_removes_the_message_and_keeps_it_with_its_reason(adapter: Adapter) -> None:
    async def scenario(a: Adapter) -> None:
        await a.publish(b'{"n": "bad"}')
        await a.publish(b'{"n": 2}')
        backend = a.new_backend()
        bad = await receive_soon(backend, a.queue)
        assert bad.body == b'{"n": "bad"}'
        await bad.set_aside("malformed: n must be a number")
        good = await receive_soon(backend, a.queue)
        assert good.body == b'{"n": 2}'
        await good.ack()
        assert await backend.receive(a.queue) is None
        [(body, reason)] = await a.set_aside_messages()
        assert body == b'{"n": "bad"}'
        assert reason.startswith("malformed: n must be a number")

    adapter.run(scenario)


def test_receive_on_an_empty_or_unknown_queue_returns_none_promptly(adapter: Adapter) -> None:
    async def scenario(a: Adapter) -> None:
        await a.create_queue()
        backend = a.new_backend()
        await backend.start()
        for queue in (a.queue, a.missing_queue, a.queue):
            started = time.monotonic()
            assert await backend.receive(queue) is None
            assert time.monotonic() - started < PROMPT, queue
        assert await backend.exists(a.queue)
        assert not await backend.exists(a.missing_queue)

    adapter.run(scenario)


def test_publish_order_and_handed_back_messages_are_neither_lost_nor_duplicated(adapter: Adapter) -> None:
    async def scenario(a: Adapter) -> None:
        bodies = [b'{"n": 1}', b'{"n": 2}', b'{"n": 3}']
        for body in bodies:
            await a.publish(body)
        backend = a.new_backend()
        held = [await receive_soon(backend, a.queue) for _ in bodies]
        assert [d.body for d in held] == bodies
        assert len({d.message_id for d in held}) == 3
        assert await backend.receive(a.queue) is None
        await held[0].nack()
        await held[1].release()
        await held[2].ack()
        again = []
        while len(again) < 2:
            d = await receive_soon(backend, a.queue)
            again.append((d.body, d.attempt))
            await d.ack()
        assert sorted(again) == [(b'{"n": 1}', 2), (b'{"n": 2}', 1)]
        assert await backend.receive(a.queue) is None

    adapter.run(scenario)


def test_a_delivery_held_at_close_comes_back_to_a_new_backend_counted(adapter: Adapter) -> None:
    async def scenario(a: Adapter) -> None:
        await a.publish(b'{"n": 1}')
        dying = a.new_backend()
        held = await receive_soon(dying, a.queue)
        await dying.aclose()  # the runner goes away holding the message
        await settle_every_way(held)  # too late: none of this may remove or count anything
        survivor = a.new_backend()
        d = await receive_soon(survivor, a.queue)
        assert (d.body, d.message_id, d.attempt) == (b'{"n": 1}', held.message_id, 2)
        await d.release()  # a release after a crash keeps the crash's count
        d = await receive_soon(survivor, a.queue)
        assert d.attempt == 2
        await d.ack()
        assert await survivor.receive(a.queue) is None
        assert await a.set_aside_messages() == []

    adapter.run(scenario)


def test_exists_and_discover_see_the_queue_deleted(adapter: Adapter) -> None:
    async def scenario(a: Adapter) -> None:
        await a.publish(b'{"n": 1}')
        backend = a.new_backend()
        assert await backend.exists(a.queue)
        assert a.queue in await backend.discover()
        await a.delete_queue()
        assert not await backend.exists(a.queue)
        assert a.queue not in await backend.discover()
        assert await backend.receive(a.queue) is None

    adapter.run(scenario)


def test_settle_calls_on_a_lost_delivery_do_nothing(adapter: Adapter) -> None:
    async def scenario(a: Adapter) -> None:
        await a.publish(b'{"n": 1}')
        backend = a.new_backend()
        d = await receive_soon(backend, a.queue)
        await a.lose(backend, d)
        assert d.lost.is_set()
        assert isinstance(d.lost_reason, str) and d.lost_reason
        await settle_every_way(d)
        again = await receive_soon(backend, a.queue, timeout=20)  # RabbitMQ reconnects first
        assert again.body == b'{"n": 1}' and not again.lost.is_set()
        await again.ack()
        assert await backend.receive(a.queue) is None
        assert await a.set_aside_messages() == []

    adapter.run(scenario)


def test_settling_twice_neither_raises_nor_acts_again(adapter: Adapter) -> None:
    async def scenario(a: Adapter) -> None:
        await a.publish(b'{"n": 1}')
        await a.publish(b'{"n": 2}')
        backend = a.new_backend()
        acked = await receive_soon(backend, a.queue)
        await acked.ack()
        await settle_every_way(acked)  # a second ack, nack, release or set_aside changes nothing
        handed_back = await receive_soon(backend, a.queue)
        assert handed_back.body == b'{"n": 2}'
        await handed_back.nack()
        await settle_every_way(handed_back)  # must not remove (ack) the copy that went back
        d = await receive_soon(backend, a.queue)
        assert (d.body, d.attempt) == (b'{"n": 2}', 2)
        await d.ack()
        assert await backend.receive(a.queue) is None
        assert await a.set_aside_messages() == []

    adapter.run(scenario)


# --- wait_for_work ---------------------------------------------------------------------------------------


async def serve_until_received(backend: QueueBackend, queue: str, timeout: float) -> tuple[Delivery, int]:
    """The supervisor's idle loop on one queue: receive, and wait_for_work after finding nothing. Returns
    the delivery and the number of waits it took."""
    waits = 0
    while (delivery := await backend.receive(queue)) is None:
        await backend.wait_for_work([queue], timeout)
        waits += 1
    return delivery, waits


def test_wait_for_work_wakes_promptly_when_a_message_arrives(adapter: Adapter) -> None:
    async def scenario(a: Adapter) -> None:
        await a.create_queue()
        backend = a.new_backend()
        await backend.start()
        found: list[tuple[Delivery, int]] = []
        received = trio.Event()

        async def serve() -> None:
            found.append(await serve_until_received(backend, a.queue, timeout=30))
            received.set()

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve)
                await trio.sleep(1.0)  # the loop settles into waiting
                assert not received.is_set()
                await a.publish(b'{"n": 1}')
                published = time.monotonic()
                await received.wait()
                latency = time.monotonic() - published
        [(delivery, waits)] = found
        assert delivery.body == b'{"n": 1}' and delivery.attempt == 1
        assert latency < PICKUP
        assert waits <= 5  # it waited rather than spun (a first wait may return early while setting up)
        await delivery.ack()

    adapter.run(scenario)


def test_wait_for_work_returns_by_its_timeout_when_nothing_arrives(adapter: Adapter) -> None:
    async def scenario(a: Adapter) -> None:
        await a.create_queue()
        backend = a.new_backend()
        await backend.start()
        queues = [a.queue, a.missing_queue]  # a queue that does not exist must not break the wait
        for queue in queues:
            assert await backend.receive(queue) is None
        await backend.wait_for_work(queues, 0.5)  # the first wait may return at once (setting up)
        for _ in range(2):
            for queue in queues:
                assert await backend.receive(queue) is None
            started = time.monotonic()
            await backend.wait_for_work(queues, 1.0)
            elapsed = time.monotonic() - started
            assert 0.5 < elapsed < 1.0 + PICKUP, elapsed  # it waits, and not past its timeout
        assert await a.waiting() == 0

    adapter.run(scenario)


@pytest.mark.parametrize("warm", [False, True], ids=["first-wait", "steady-state"])
def test_a_message_published_before_wait_for_work_is_not_missed(adapter: Adapter, warm: bool) -> None:
    async def scenario(a: Adapter) -> None:
        await a.create_queue()
        backend = a.new_backend()
        await backend.start()
        assert await backend.receive(a.queue) is None
        if warm:  # the loop has been waiting already: its watcher or consumers are set up
            await backend.wait_for_work([a.queue], 0.5)
            assert await backend.receive(a.queue) is None
        await a.publish(b'{"n": 1}')  # arrives after the last receive, before the wait
        started = time.monotonic()
        await backend.wait_for_work([a.queue], 10)
        assert time.monotonic() - started < PICKUP
        d = await backend.receive(a.queue)
        assert d is not None and (d.body, d.attempt) == (b'{"n": 1}', 1)
        await d.ack()

    adapter.run(scenario)


def test_a_message_that_woke_a_wait_but_was_not_received_reaches_another_runner_uncounted(
        adapter: Adapter) -> None:
    async def scenario(a: Adapter) -> None:
        await a.create_queue()
        busy = a.new_backend()
        await busy.start()
        assert await busy.receive(a.queue) is None
        await a.publish(b'{"n": 1}')
        await busy.wait_for_work([a.queue], 10)  # woken, but its slot filled meanwhile: no receive
        other = a.new_backend()
        d = await receive_soon(other, a.queue)  # a backend never keeps what it was not asked for
        assert (d.body, d.attempt) == (b'{"n": 1}', 1 if a.handback_reaches_others_uncounted else 2)
        await d.ack()
        assert await a.waiting() == 0 and await a.set_aside_messages() == []

    adapter.run(scenario)
