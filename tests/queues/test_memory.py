"""The queue contract (base.py) checked on the in-memory backend and on the local directory backend alike,
plus the memory backend's own test helpers."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import trio

from studio_runner.queues.base import Delivery, QueueBackend
from studio_runner.queues.localdir import LocalDirQueue
from studio_runner.queues.memory import MemoryQueue


class MemoryHarness:
    def __init__(self, tmp_path: Path) -> None:
        self.backend = MemoryQueue()

    def publish(self, queue: str, body: bytes) -> None:
        self.backend.publish(queue, body)

    def delete_queue(self, queue: str) -> None:
        self.backend.delete_queue(queue)

    def set_aside_bodies(self, queue: str) -> list[tuple[bytes, str]]:
        return [(r.body, r.reason or "") for r in self.backend.set_aside_items if r.queue == queue]

    def other_runner(self) -> MemoryQueue:
        return self.backend  # one shared in-memory "broker"


class LocalHarness:
    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "queue"
        self.backend = LocalDirQueue(self.root, "runner-a", settle_after=0.0)
        self._age = 1000.0

    def publish(self, queue: str, body: bytes) -> None:
        name = trio.run(self.backend.enqueue, queue, body)
        self._age -= 1  # file timestamps are coarse: give each message its own second, in publish order
        when = time.time() - self._age
        os.utime(self.root / queue / name, (when, when))

    def delete_queue(self, queue: str) -> None:
        shutil.rmtree(self.root / queue)

    def set_aside_bodies(self, queue: str) -> list[tuple[bytes, str]]:
        adir = self.root / ".set-aside" / queue
        if not adir.is_dir():
            return []
        return [((adir / n).read_bytes(), (adir / f"{n}.reason.txt").read_text())
                for n in sorted(os.listdir(adir)) if not n.endswith(".reason.txt")]

    def other_runner(self) -> LocalDirQueue:
        return LocalDirQueue(self.root, "runner-b", settle_after=0.0)


@pytest.fixture(params=[MemoryHarness, LocalHarness], ids=["memory", "localdir"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> MemoryHarness | LocalHarness:
    return request.param(tmp_path)


def test_implements_the_protocols(harness) -> None:
    harness.publish("local_t", b"{}")

    async def main() -> None:
        assert isinstance(harness.backend, QueueBackend)
        d = await harness.backend.receive("local_t")
        assert isinstance(d, Delivery)
        assert not d.lost.is_set()
        await d.ack()

    trio.run(main)


def test_delivers_in_publish_order_with_exact_bodies(harness) -> None:
    bodies = [b'{"n": 1}', b'{"n": 2}', b'{"n": 3}']
    for body in bodies:
        harness.publish("local_t", body)

    async def main() -> None:
        got = []
        while (d := await harness.backend.receive("local_t")) is not None:
            assert (d.queue, d.attempt) == ("local_t", 1)
            assert isinstance(d.message_id, str) and d.message_id
            got.append(d.body)
            await d.ack()
        assert got == bodies
        assert await harness.backend.receive("local_t") is None

    trio.run(main)


def test_unknown_or_empty_queue_gives_none(harness) -> None:
    async def main() -> None:
        assert await harness.backend.receive("local_nothing") is None
        assert await harness.backend.exists("local_nothing") is False
        assert await harness.backend.discover() == []

    trio.run(main)


def test_nack_keeps_the_place_in_line_and_counts_the_attempt(harness) -> None:
    harness.publish("local_t", b'{"n": 1}')
    harness.publish("local_t", b'{"n": 2}')

    async def main() -> None:
        q = harness.backend
        first = await q.receive("local_t")
        assert first.body == b'{"n": 1}'
        await first.nack()
        again = await q.receive("local_t")
        assert (again.body, again.message_id, again.attempt) == (b'{"n": 1}', first.message_id, 2)
        await again.nack()
        third = await q.receive("local_t")
        assert (third.body, third.attempt) == (b'{"n": 1}', 3)
        await third.ack()
        second = await q.receive("local_t")
        assert (second.body, second.attempt) == (b'{"n": 2}', 1)
        await second.ack()
        assert await q.receive("local_t") is None

    trio.run(main)


def test_set_aside_removes_the_message_and_keeps_the_reason(harness) -> None:
    harness.publish("local_t", b"not json at all")
    harness.publish("local_t", b'{"n": 2}')

    async def main() -> None:
        bad = await harness.backend.receive("local_t")
        await bad.set_aside("malformed: not JSON")
        good = await harness.backend.receive("local_t")
        assert good.body == b'{"n": 2}'
        await good.ack()
        assert await harness.backend.receive("local_t") is None

    if isinstance(harness, LocalHarness):
        harness.backend.malformed_after = 0.0
    trio.run(main)
    [(body, reason)] = harness.set_aside_bodies("local_t")
    assert body == b"not json at all"
    assert reason.startswith("malformed: not JSON")


def test_a_delivery_is_finished_once(harness) -> None:
    harness.publish("local_t", b"{}")

    async def main() -> None:
        d = await harness.backend.receive("local_t")
        await d.ack()
        with pytest.raises(RuntimeError):
            await d.nack()
        with pytest.raises(RuntimeError):
            await d.ack()

    trio.run(main)


def test_deleting_the_queue_is_seen_and_a_late_nack_sets_aside(harness) -> None:
    harness.publish("local_t", b'{"n": 1}')
    harness.publish("local_u", b'{"n": 9}')

    async def main() -> None:
        q = harness.backend
        assert await q.discover() == ["local_t", "local_u"]
        assert await q.exists("local_t")
        d = await q.receive("local_t")
        harness.delete_queue("local_t")
        assert not await q.exists("local_t")
        assert await q.discover() == ["local_u"]
        await d.nack()
        assert not await q.exists("local_t")  # the runner never recreates a client's queue

    trio.run(main)
    [(body, reason)] = harness.set_aside_bodies("local_t")
    assert body == b'{"n": 1}'
    assert "queue deleted" in reason


def test_a_delivery_held_at_close_reaches_another_runner_as_a_new_attempt(harness) -> None:
    harness.publish("local_t", b'{"n": 1}')

    async def main() -> None:
        held = await harness.backend.receive("local_t")
        assert await harness.backend.receive("local_t") is None
        await harness.backend.aclose()
        other = harness.other_runner()
        d = await other.receive("local_t")
        assert (d.body, d.message_id, d.attempt) == (b'{"n": 1}', held.message_id, 2)
        await d.ack()
        with pytest.raises(RuntimeError):
            await held.ack()  # its lease is gone: acking now could delete someone else's claim

    trio.run(main)


# -- memory-only helpers --------------------------------------------------------------------------------


def test_memory_inspection_helpers_record_every_outcome() -> None:
    q = MemoryQueue(["local_empty"])
    ids = [q.publish("local_t", body) for body in (b"a", b"b", b"c")]
    assert len(set(ids)) == 3
    assert q.pending("local_t") == [b"a", b"b", b"c"]

    async def main() -> None:
        assert await q.discover() == ["local_empty", "local_t"]
        a, b, c = [await q.receive("local_t") for _ in range(3)]
        assert q.in_flight == [a, b, c] and q.pending("local_t") == []
        await a.ack()
        await b.nack()
        await c.set_aside("expired")
        assert q.pending("local_t") == [b"b"]
        assert [(r.body, r.attempt) for r in q.acked] == [(b"a", 1)]
        assert [(r.body, r.attempt) for r in q.nacked] == [(b"b", 1)]
        assert [(r.body, r.reason) for r in q.set_aside_items] == [(b"c", "expired")]
        assert q.in_flight == []

    trio.run(main)


def test_memory_lose_sets_lost_requeues_and_ignores_the_late_ack() -> None:
    q = MemoryQueue()
    q.publish("rmq_t", b"x")

    async def main() -> None:
        d = await q.receive("rmq_t")
        q.lose(d)
        assert d.lost.is_set()
        assert q.pending("rmq_t") == [b"x"]
        await d.ack()  # the claim was gone: nothing may happen
        assert q.acked == []
        again = await q.receive("rmq_t")
        assert again.attempt == 2 and not again.lost.is_set()

    trio.run(main)
