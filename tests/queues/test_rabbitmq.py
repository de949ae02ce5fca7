"""RabbitMQ backend against the real broker: discovery, claim/ack/nack/set-aside, crash, consumer timeout."""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import trio
from support.fixtures import FIXTURES
from support.rabbitmq import (  # noqa: F401
    channel,
    close_connection_named,
    declare_like_studioml,
    delete_queue,
    get_one,
    publish_like_studioml,
    publish_with_studioml_client,
    rabbitmq_url_fixture,
    ready_count,
    short_consumer_timeout,
    unique_queue_fixture,
    wait_ready_count,
)

from studio_runner.queues.base import QueueBackend
from studio_runner.queues.rabbitmq import RabbitMQDelivery, RabbitMQQueue
from studio_runner.queues.rmq_link import ATTEMPT_HEADER, QUEUE_HEADER, REASON_HEADER, attempt_of
from studio_runner.queues.rmq_mgmt import (
    MgmtError,
    derive_mgmt_url,
    honours_consumer_timeout_arg,
    mask_url,
    parse_version,
    studio_queues,
)

REPO = Path(__file__).resolve().parents[2]
FIXTURE = FIXTURES / "hello_plain.json"
BODY = FIXTURE.read_bytes() if FIXTURE.exists() else b'{"experiment": {"key": "k"}, "config": {}}'


async def receive_soon(backend: RabbitMQQueue, queue: str, timeout: float = 10.0) -> RabbitMQDelivery:
    """Receive, retrying while the message is not back yet (requeue and reconnect take a moment)."""
    with trio.fail_after(timeout):
        while True:
            delivery = await backend.receive(queue)
            if delivery is not None:
                return delivery
            await trio.sleep(0.2)


# --- pure helpers -------------------------------------------------------------------------------------


def test_url_helpers_derive_mgmt_and_mask_credentials() -> None:
    assert derive_mgmt_url("amqp://u:p@rabbit:5672/%2f") == "http://rabbit:15672"
    assert derive_mgmt_url("amqps://u:p@rabbit/vh") == "https://rabbit:15671"
    assert mask_url("amqp://user:s3cret@host:5672/%2f") == "amqp://user:****@host:5672/%2f"
    assert "s3cret" not in mask_url("amqps://user:s3cret@host/vh")


def test_version_rule_for_per_consumer_timeout() -> None:
    assert parse_version("3.10.8") == (3, 10, 8)
    assert parse_version("3.13.0-rc.1") == (3, 13, 0)
    assert not honours_consumer_timeout_arg((3, 10, 8))
    assert not honours_consumer_timeout_arg((3, 11, 14))
    assert honours_consumer_timeout_arg((3, 11, 15))
    assert honours_consumer_timeout_arg((3, 12, 0))
    assert honours_consumer_timeout_arg((4, 0, 5))


def test_attempt_counting() -> None:
    assert attempt_of(None, False) == 1
    assert attempt_of(None, True) == 2
    assert attempt_of({ATTEMPT_HEADER: 3}, False) == 3
    assert attempt_of({ATTEMPT_HEADER: 3}, True) == 4
    assert attempt_of({"x-delivery-count": 2}, True) == 3
    assert attempt_of({ATTEMPT_HEADER: "junk"}, False) == 1


def test_binding_filter() -> None:
    bindings = [
        {"source": "StudioML.topic", "destination": "rmq_a", "destination_type": "queue",
         "routing_key": "StudioML.rmq_a"},
        {"source": "StudioML.topic", "destination": "rmq_a_response", "destination_type": "queue",
         "routing_key": "StudioML.rmq_a_response"},
        {"source": "amq.topic", "destination": "rmq_b", "destination_type": "queue",
         "routing_key": "StudioML.rmq_b"},
        {"source": "StudioML.topic", "destination": "rmq_c", "destination_type": "queue",
         "routing_key": "x.c"},
        {"source": "StudioML.topic", "destination": "ex", "destination_type": "exchange",
         "routing_key": "StudioML.ex"},
        {"source": "", "destination": "rmq_a", "destination_type": "queue", "routing_key": "rmq_a"},
    ]
    assert studio_queues(bindings) == ["rmq_a"]


def test_amqps_and_env_expansion_construct_without_connecting() -> None:
    backend = RabbitMQQueue("amqps://${RMQ_USER}:${RMQ_PASS}@broker.example/team",
                            env={"RMQ_USER": "alice", "RMQ_PASS": "pw"})
    assert backend.vhost == "team"
    assert backend.mgmt_url_masked == "https://broker.example:15671"
    assert backend.amqp_url_masked == "amqps://alice:****@broker.example/team"
    assert "pw" not in backend.amqp_url_masked
    trio.run(backend.aclose)


# --- against the broker ---------------------------------------------------------------------------------


@pytest.mark.rabbitmq
def test_discovery_keeps_studioml_bindings_only(rabbitmq_url: str, unique_queue: str) -> None:
    other = f"{unique_queue}_plainbound"
    wrong_key = f"{unique_queue}_wrongkey"
    publish_like_studioml(rabbitmq_url, unique_queue, BODY)
    publish_like_studioml(rabbitmq_url, f"{unique_queue}_response", b"report")
    try:
        with channel(rabbitmq_url) as ch:
            ch.queue_declare(other)
            ch.queue_bind(other, "amq.topic", routing_key=f"StudioML.{other}")
            ch.queue_declare(wrong_key)
            ch.queue_bind(wrong_key, "StudioML.topic", routing_key=f"other.{wrong_key}")

        async def main() -> list[str]:
            async with RabbitMQQueue(rabbitmq_url) as backend:
                assert isinstance(backend, QueueBackend)
                return await backend.discover()

        names = trio.run(main)
    finally:
        delete_queue(rabbitmq_url, other)
        delete_queue(rabbitmq_url, wrong_key)
    assert unique_queue in names
    assert f"{unique_queue}_response" not in names
    assert other not in names and wrong_key not in names
    assert not any(name.endswith("_response") for name in names)


@pytest.mark.rabbitmq
def test_serves_a_message_sent_by_the_real_studioml_client(rabbitmq_url: str, unique_queue: str) -> None:
    publish_with_studioml_client(rabbitmq_url, unique_queue, BODY.decode())

    async def main() -> None:
        async with RabbitMQQueue(rabbitmq_url) as backend:
            assert unique_queue in await backend.discover()
            delivery = await backend.receive(unique_queue)
            assert delivery is not None and (delivery.body, delivery.attempt) == (BODY, 1)
            await delivery.ack()

    trio.run(main)
    assert ready_count(rabbitmq_url, unique_queue) == 0


@pytest.mark.rabbitmq
def test_nack_hands_back_with_counted_attempts(rabbitmq_url: str, unique_queue: str) -> None:
    publish_like_studioml(rabbitmq_url, unique_queue, BODY)

    async def main() -> None:
        async with RabbitMQQueue(rabbitmq_url) as backend:
            for expected in (1, 2, 3):
                delivery = await receive_soon(backend, unique_queue)
                assert (delivery.attempt, delivery.body) == (expected, BODY)
                await delivery.nack()
            assert wait_ready_count(rabbitmq_url, unique_queue, 1) == 1

    trio.run(main)
    method, props, body = get_one(rabbitmq_url, unique_queue)
    assert body == BODY
    assert props.headers[ATTEMPT_HEADER] == 4
    assert (props.app_id, props.content_type) == ("studioml", "application/json")
    assert method.routing_key == f"StudioML.{unique_queue}" and method.exchange == "StudioML.topic"


@pytest.mark.rabbitmq
def test_release_republishes_with_the_same_attempt_and_properties(rabbitmq_url: str,
                                                                  unique_queue: str) -> None:
    publish_like_studioml(rabbitmq_url, unique_queue, BODY, headers={ATTEMPT_HEADER: 2})

    async def main() -> None:
        async with RabbitMQQueue(rabbitmq_url) as backend:
            delivery = await backend.receive(unique_queue)
            assert delivery is not None and delivery.attempt == 2
            await delivery.release()
            assert wait_ready_count(rabbitmq_url, unique_queue, 1) == 1

    trio.run(main)
    method, props, body = get_one(rabbitmq_url, unique_queue)
    assert body == BODY and not method.redelivered  # a broker requeue would count as a crash
    assert props.headers[ATTEMPT_HEADER] == 2
    assert (props.app_id, props.content_type) == ("studioml", "application/json")
    assert method.routing_key == f"StudioML.{unique_queue}" and method.exchange == "StudioML.topic"


@pytest.mark.rabbitmq
def test_set_aside_moves_the_message_with_its_reason(rabbitmq_url: str, unique_queue: str) -> None:
    aside = f"studio-runner.set-aside.test-{uuid.uuid4().hex}"
    publish_like_studioml(rabbitmq_url, unique_queue, BODY)

    async def main() -> None:
        async with RabbitMQQueue(rabbitmq_url, set_aside_queue=aside) as backend:
            delivery = await backend.receive(unique_queue)
            assert delivery is not None
            await delivery.set_aside("undecryptable: no key for this queue")
            assert aside not in await backend.discover()

    try:
        trio.run(main)
        assert wait_ready_count(rabbitmq_url, unique_queue, 1, timeout=2) == 0
        got = get_one(rabbitmq_url, aside)
        assert got is not None
        _method, props, body = got
        assert body == BODY
        assert props.headers[REASON_HEADER] == "undecryptable: no key for this queue"
        assert props.headers[QUEUE_HEADER] == unique_queue
        assert props.delivery_mode == 2
    finally:
        delete_queue(rabbitmq_url, aside)


@pytest.mark.rabbitmq
def test_set_aside_that_cannot_be_stored_keeps_the_message(rabbitmq_url: str, unique_queue: str) -> None:
    # "amq." names are reserved: the declare is refused and the publish is unroutable
    publish_like_studioml(rabbitmq_url, unique_queue, BODY)

    async def main() -> None:
        async with RabbitMQQueue(rabbitmq_url, set_aside_queue=f"amq.refused-{uuid.uuid4().hex}") as backend:
            delivery = await backend.receive(unique_queue)
            assert delivery is not None
            await delivery.set_aside("malformed")

    trio.run(main)
    assert wait_ready_count(rabbitmq_url, unique_queue, 1) == 1


CHILD = """
import sys, trio
from studio_runner.queues.rabbitmq import RabbitMQQueue

async def main():
    backend = RabbitMQQueue(sys.argv[1])
    delivery = None
    while delivery is None:
        delivery = await backend.receive(sys.argv[2])
    print("claimed", delivery.attempt, flush=True)
    await trio.sleep(600)

trio.run(main)
"""


@pytest.mark.rabbitmq
def test_runner_killed_mid_run_returns_the_message(rabbitmq_url: str, unique_queue: str) -> None:
    publish_like_studioml(rabbitmq_url, unique_queue, BODY)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-c", CHILD, rabbitmq_url, unique_queue], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([child.stdout], [], [], 30)
        assert ready, f"child never claimed the message: {child.stderr.read() if child.poll() else ''}"
        assert child.stdout.readline().split() == ["claimed", "1"]
        assert ready_count(rabbitmq_url, unique_queue) == 0
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()

    async def main() -> None:
        async with RabbitMQQueue(rabbitmq_url) as backend:
            delivery = await receive_soon(backend, unique_queue)
            assert delivery.body == BODY and delivery.redelivered
            assert delivery.attempt >= 2
            await delivery.ack()

    trio.run(main)


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_consumer_timeout_marks_the_delivery_lost(rabbitmq_url: str, unique_queue: str) -> None:
    publish_like_studioml(rabbitmq_url, unique_queue, BODY)

    async def main() -> None:
        async with RabbitMQQueue(rabbitmq_url) as backend:
            with short_consumer_timeout(timeout_ms=2000, tick_ms=500) as restore_timeout:
                delivery = await backend.receive(unique_queue)
                await trio.to_thread.run_sync(restore_timeout)  # our channel keeps the short timeout
                assert delivery is not None
                started = time.monotonic()
                with trio.fail_after(90):
                    await delivery.lost.wait()
                held_for = time.monotonic() - started
            assert "timed out" in (delivery.lost_reason or ""), delivery.lost_reason
            print(f"consumer timeout closed the channel {held_for:.1f} s after the restore")
            assert wait_ready_count(rabbitmq_url, unique_queue, 1) == 1
            await delivery.ack()  # a no-op now: the broker already took it back
            again = await receive_soon(backend, unique_queue)
            assert again.attempt == 2 and again.body == BODY
            assert not again.lost.is_set()
            await again.ack()
        assert ready_count(rabbitmq_url, unique_queue) == 0

    trio.run(main)


@pytest.mark.rabbitmq
def test_connection_drop_marks_lost_and_reconnects(rabbitmq_url: str, unique_queue: str) -> None:
    publish_like_studioml(rabbitmq_url, unique_queue, BODY)

    async def main() -> None:
        async with RabbitMQQueue(rabbitmq_url) as backend:
            delivery = await backend.receive(unique_queue)
            assert delivery is not None
            await trio.to_thread.run_sync(close_connection_named, backend.connection_name)
            with trio.fail_after(10):
                await delivery.lost.wait()
            assert "connection" in (delivery.lost_reason or "")
            again = await receive_soon(backend, unique_queue, timeout=20)
            assert again.attempt == 2
            await again.ack()
            await delivery.ack()  # no-op, must not raise or remove anything else

    trio.run(main)
    assert ready_count(rabbitmq_url, unique_queue) == 0


@pytest.mark.rabbitmq
def test_cancelled_receive_gives_the_message_back(rabbitmq_url: str, unique_queue: str) -> None:
    publish_like_studioml(rabbitmq_url, unique_queue, BODY)

    async def main() -> None:
        async with RabbitMQQueue(rabbitmq_url) as backend:
            # warm up (version, durability check) so that the first checkpoint of receive() is the wait for
            # the IO thread: a cancellation then abandons a claim in flight, which must be handed back
            delivery = await backend.receive(unique_queue)
            assert delivery is not None
            await delivery.nack()
            attempt, cancelled = 2, 0
            for delay in (0.0, 0.0, 0.002, 0.005, 0.05, 0.0):
                with trio.move_on_after(delay) as scope:
                    delivery = await backend.receive(unique_queue)
                if scope.cancelled_caught:
                    cancelled += 1
                else:
                    assert delivery is not None and delivery.attempt == attempt
                    await delivery.nack()
                    attempt += 1
                assert await trio.to_thread.run_sync(wait_ready_count, rabbitmq_url, unique_queue, 1) == 1
            assert cancelled
            delivery = await receive_soon(backend, unique_queue)
            # a receive cancelled with the message in hand gives it back uncounted (it never ran)
            assert (delivery.attempt, delivery.body) == (attempt, BODY)
            await delivery.ack()

    trio.run(main)


@pytest.mark.rabbitmq
def test_management_failures_are_not_deletions(rabbitmq_url: str, unique_queue: str) -> None:
    publish_like_studioml(rabbitmq_url, unique_queue, BODY)

    async def main() -> None:
        async with RabbitMQQueue(rabbitmq_url, mgmt_url="http://127.0.0.1:1") as broken:
            assert await broken.exists(unique_queue)  # an error is not a deletion
            with pytest.raises(MgmtError):  # the supervisor keeps its last queue list
                await broken.discover()

    trio.run(main)


def test_unreachable_broker_fails_soft_and_never_logs_the_password(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        backend = RabbitMQQueue("amqp://guest:s3cretpw@127.0.0.1:1/%2f", mgmt_url="http://127.0.0.1:2")
        with trio.fail_after(20):
            with pytest.raises(MgmtError):
                await backend.discover()
            assert await backend.receive("rmq_anything") is None
            assert await backend.exists("rmq_anything")
            await backend.aclose()

    with caplog.at_level(logging.DEBUG):
        trio.run(main)
    messages = [r.getMessage() for r in caplog.records]
    assert any("cannot connect to RabbitMQ at amqp://guest:****@127.0.0.1:1" in m for m in messages), messages
    assert not any("s3cretpw" in m for m in messages)


@pytest.mark.rabbitmq
def test_broker_version_and_deadline_warning(rabbitmq_url: str, unique_queue: str,
                                             caplog: pytest.LogCaptureFixture) -> None:
    publish_like_studioml(rabbitmq_url, unique_queue, BODY)

    async def main() -> RabbitMQQueue:
        async with RabbitMQQueue(rabbitmq_url, consumer_timeout_limit=1800) as backend:
            delivery = await backend.receive(unique_queue)
            assert delivery is not None
            await delivery.ack()
            await backend.discover()
            return backend

    with caplog.at_level(logging.WARNING, logger="studio_runner.queues"):
        backend = trio.run(main)
    assert backend.broker_version is not None
    if backend.per_consumer_timeout:
        assert backend.deadline_warning(96 * 3600) is None
    else:
        warning = backend.deadline_warning(2 * 3600)
        assert warning is not None and "consumer timeout" in warning and "2h" in warning
        assert backend.deadline_warning(1800) is None
        startup = [r for r in caplog.records if "x-consumer-timeout" in r.getMessage()]
        assert len(startup) == 1
    assert [r for r in caplog.records if "not durable" in r.getMessage()]
    assert all("guest:guest" not in r.getMessage() for r in caplog.records)


@pytest.mark.rabbitmq
def test_aclose_leaves_no_threads_and_returns_held_messages(rabbitmq_url: str, unique_queue: str) -> None:
    publish_like_studioml(rabbitmq_url, unique_queue, BODY)
    before = set(threading.enumerate())

    async def main() -> RabbitMQDelivery:
        backend = RabbitMQQueue(rabbitmq_url)
        delivery = await backend.receive(unique_queue)
        assert delivery is not None
        await backend.aclose()
        with trio.fail_after(1):
            await delivery.lost.wait()
        return delivery

    trio.run(main)
    stray = [t for t in threading.enumerate()
             if t not in before and t.is_alive() and not t.name.startswith("Trio thread")]
    assert stray == []
    assert wait_ready_count(rabbitmq_url, unique_queue, 1) == 1


# --- wait_for_work: standing consumers ---------------------------------------------------------------------


@pytest.mark.rabbitmq
def test_a_waiting_consumer_holds_one_message_at_most_and_gives_it_back_uncounted(
        rabbitmq_url: str, unique_queue: str) -> None:
    declare_like_studioml(rabbitmq_url, unique_queue)

    async def main() -> None:
        async with RabbitMQQueue(rabbitmq_url, watch_hold=0.5) as backend:
            assert await backend.receive(unique_queue) is None
            publish_like_studioml(rabbitmq_url, unique_queue, b'{"n": 1}')
            publish_like_studioml(rabbitmq_url, unique_queue, b'{"n": 2}')
            await backend.wait_for_work([unique_queue], 5)
            assert ready_count(rabbitmq_url, unique_queue) == 1  # prefetch 1: the other one stays ready
            # nobody receives it (the runner's slot filled): it goes back within the hold time
            assert await trio.to_thread.run_sync(wait_ready_count, rabbitmq_url, unique_queue, 2) == 2
            assert unique_queue not in backend._link._watches  # and the consumer took nothing more

    trio.run(main)
    taken = [get_one(rabbitmq_url, unique_queue) for _ in range(2)]
    assert sorted(body for _method, _props, body in taken) == [b'{"n": 1}', b'{"n": 2}']
    for method, props, _body in taken:
        assert attempt_of(props.headers, method.redelivered) == 1  # given back as a release, not a crash


@pytest.mark.rabbitmq
def test_receive_takes_the_message_the_waiting_consumer_holds(rabbitmq_url: str, unique_queue: str) -> None:
    declare_like_studioml(rabbitmq_url, unique_queue)

    async def main() -> None:
        async with RabbitMQQueue(rabbitmq_url) as backend:
            assert await backend.receive(unique_queue) is None
            await backend.wait_for_work([unique_queue], 0.3)  # consumers set up, nothing there
            assert backend._link.watched_and_empty(unique_queue)
            publish_like_studioml(rabbitmq_url, unique_queue, BODY)
            started = time.monotonic()
            await backend.wait_for_work([unique_queue], 5)
            assert time.monotonic() - started < 0.3
            delivery = await backend.receive(unique_queue)
            assert delivery is not None and (delivery.body, delivery.attempt) == (BODY, 1)
            assert unique_queue not in backend._link._watches  # its channel now carries this delivery only
            await delivery.nack()
            again = await receive_soon(backend, unique_queue)
            assert again.attempt == 2
            await again.ack()

    trio.run(main)
    assert ready_count(rabbitmq_url, unique_queue) == 0


@pytest.mark.rabbitmq
def test_a_busy_runner_cancels_its_consumers_and_takes_nothing(rabbitmq_url: str, unique_queue: str) -> None:
    declare_like_studioml(rabbitmq_url, unique_queue)

    async def main() -> None:
        async with RabbitMQQueue(rabbitmq_url, watch_linger=0.3) as backend:
            await backend.wait_for_work([unique_queue], 0.3)
            assert unique_queue in backend._link._watches
            await trio.sleep(1.5)  # no wait: the supervisor has no free slot
            assert backend._link._watches == {}
            publish_like_studioml(rabbitmq_url, unique_queue, BODY)
            await trio.sleep(1.0)
            assert ready_count(rabbitmq_url, unique_queue) == 1  # left for other runners
            delivery = await backend.receive(unique_queue)  # a free slot again: the usual receive
            assert delivery is not None and delivery.attempt == 1
            await delivery.ack()

    trio.run(main)


@pytest.mark.rabbitmq
def test_closing_gives_back_a_held_message_uncounted(rabbitmq_url: str, unique_queue: str) -> None:
    declare_like_studioml(rabbitmq_url, unique_queue)

    async def main() -> None:
        async with RabbitMQQueue(rabbitmq_url) as backend:
            assert await backend.receive(unique_queue) is None
            publish_like_studioml(rabbitmq_url, unique_queue, BODY)
            await backend.wait_for_work([unique_queue], 5)
            assert any(w.message is not None for w in backend._link._watches.values())

    trio.run(main)
    assert wait_ready_count(rabbitmq_url, unique_queue, 1) == 1
    method, props, body = get_one(rabbitmq_url, unique_queue)
    assert body == BODY and attempt_of(props.headers, method.redelivered) == 1


@pytest.mark.rabbitmq
def test_waiting_resumes_after_a_connection_drop(rabbitmq_url: str, unique_queue: str) -> None:
    declare_like_studioml(rabbitmq_url, unique_queue)

    async def main() -> None:
        async with RabbitMQQueue(rabbitmq_url) as backend:
            assert await backend.receive(unique_queue) is None
            await backend.wait_for_work([unique_queue], 0.3)
            received = trio.Event()
            found: list[RabbitMQDelivery] = []

            async def serve() -> None:  # the supervisor's idle loop, re-polling only every 30 s
                while (delivery := await backend.receive(unique_queue)) is None:
                    await backend.wait_for_work([unique_queue], 30)
                found.append(delivery)
                received.set()

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(serve)
                    await trio.to_thread.run_sync(close_connection_named, backend.connection_name)
                    while unique_queue in backend._link._watches:  # the drop is noticed: consumers gone
                        await trio.sleep(0.05)
                    while not backend._link.watched_and_empty(unique_queue):  # reconnected, waiting again
                        await trio.sleep(0.05)
                    publish_like_studioml(rabbitmq_url, unique_queue, BODY)
                    published = time.monotonic()
                    await received.wait()
                    assert time.monotonic() - published < 0.3
            assert found[0].attempt == 1
            await found[0].ack()

    trio.run(main)
