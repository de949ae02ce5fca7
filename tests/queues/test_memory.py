"""What only the in-memory backend does: its inspection helpers, ``lose``, and where handed-back messages go.
The queue contract itself is checked on every backend in test_contract.py."""

from __future__ import annotations

import trio

from studio_runner.queues.memory import MemoryQueue


def test_memory_inspection_helpers_record_every_outcome() -> None:
    q = MemoryQueue(["local_empty"])
    ids = [q.publish("local_t", body) for body in (b"a", b"b", b"c", b"d")]
    assert len(set(ids)) == 4
    assert q.pending("local_t") == [b"a", b"b", b"c", b"d"]

    async def main() -> None:
        assert await MemoryQueue().discover() == []
        assert await q.discover() == ["local_empty", "local_t"]
        a, b, c, d = [await q.receive("local_t") for _ in range(4)]
        assert q.in_flight == [a, b, c, d] and q.pending("local_t") == []
        await a.ack()
        await b.nack()
        await c.set_aside("expired")
        await d.release()
        assert q.pending("local_t") == [b"b", b"d"]
        assert [(r.body, r.attempt) for r in q.acked] == [(b"a", 1)]
        assert [(r.body, r.attempt) for r in q.nacked] == [(b"b", 1)]
        assert [(r.body, r.attempt) for r in q.released] == [(b"d", 1)]
        assert [(r.body, r.reason) for r in q.set_aside_items] == [(b"c", "expired")]
        assert q.in_flight == []

    trio.run(main)


def test_memory_handed_back_messages_keep_their_place_in_line() -> None:
    q = MemoryQueue()
    for body in (b"1", b"2", b"3"):
        q.publish("local_t", body)

    async def main() -> None:
        first = await q.receive("local_t")
        await first.nack()
        assert q.pending("local_t") == [b"1", b"2", b"3"]
        again = await q.receive("local_t")
        second = await q.receive("local_t")
        await second.release()
        await again.release()
        assert q.pending("local_t") == [b"1", b"2", b"3"]

    trio.run(main)


def test_memory_lose_sets_lost_with_its_reason_requeues_and_ignores_the_late_ack() -> None:
    q = MemoryQueue()
    q.publish("rmq_t", b"x")

    async def main() -> None:
        d = await q.receive("rmq_t")
        q.lose(d, reason="consumer timeout (simulated)")
        assert d.lost.is_set() and d.lost_reason == "consumer timeout (simulated)"
        assert q.pending("rmq_t") == [b"x"]
        await d.ack()  # the claim was gone: nothing may happen
        assert q.acked == []
        again = await q.receive("rmq_t")
        assert again.attempt == 2 and not again.lost.is_set() and again.lost_reason is None

    trio.run(main)


def test_memory_late_nack_after_the_queue_was_deleted_sets_aside() -> None:
    q = MemoryQueue()
    q.publish("local_t", b"1")

    async def main() -> None:
        d = await q.receive("local_t")
        q.delete_queue("local_t")
        await d.nack()
        assert not await q.exists("local_t")  # the runner never recreates a client's queue

    trio.run(main)
    [record] = q.set_aside_items
    assert (record.body, record.reason) == (b"1", "queue deleted")
