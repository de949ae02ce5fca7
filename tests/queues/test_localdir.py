"""The local directory queue against real files, real runner processes and the real StudioML client."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from studio_runner.queues.localdir import LocalDirQueue

REPO = Path(__file__).resolve().parents[2]
CLIENT_PYTHON = Path(os.environ.get("STUDIOML_CLIENT_PYTHON", "/tmp/studioml-venv/bin/python"))
needs_client = pytest.mark.skipif(
    not CLIENT_PYTHON.exists(),
    reason=f"StudioML 0.0.49 client interpreter not found at {CLIENT_PYTHON} (set STUDIOML_CLIENT_PYTHON)")

MESSAGE = {"experiment": {"key": "1631664000_abc", "resources_needed": {"cpus": 1}}, "config": {}}


def client(root: Path, code: str) -> str:
    """Run ``code`` in the real client with ``q = LocalQueue('local_t', path=root)``; return its stdout."""
    prog = "from studio.queues.local_queue import LocalQueue\n"
    prog += f"q = LocalQueue('local_t', path={str(root)!r})\n"
    done = subprocess.run([str(CLIENT_PYTHON), "-c", prog + code],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def runner_process(*args: str, code: str) -> subprocess.Popen:
    """A separate runner process using the package from this tree."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, text=True)


def put(root: Path, name: str, body: bytes | str, age: float, queue: str = "local_t") -> Path:
    """Write a message file the way the client does (in place) and backdate it by ``age`` seconds."""
    path = root / queue / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body.encode() if isinstance(body, str) else body)
    when = time.time() - age
    os.utime(path, (when, when))
    return path


def receive(q: LocalDirQueue, queue: str = "local_t"):
    return trio.run(q.receive, queue)


def waiting(root: Path, queue: str = "local_t") -> list[str]:
    return sorted(n for n in os.listdir(root / queue) if n != "lock.lock")


@needs_client
def test_a_message_written_by_the_real_client_is_received(tmp_path: Path) -> None:
    client(tmp_path, f"q.enqueue({json.dumps(json.dumps(MESSAGE))})")
    [name] = waiting(tmp_path)
    q = LocalDirQueue(tmp_path, "runner-a")  # default settle time: wait until the file is old enough

    async def main():
        with trio.fail_after(10):
            while (d := await q.receive("local_t")) is None:
                await trio.sleep(0.1)
        return d

    d = trio.run(main)
    assert d.message_id == name and json.loads(d.body) == MESSAGE and d.attempt == 1
    trio.run(d.ack)
    assert waiting(tmp_path) == []


@needs_client
def test_the_client_reads_our_enqueue_and_never_sees_our_bookkeeping(tmp_path: Path) -> None:
    q = LocalDirQueue(tmp_path, "runner-a", settle_after=0.0)
    body = json.dumps(MESSAGE).encode()
    first = trio.run(q.enqueue, "local_t", body)
    assert client(tmp_path, "print(q.dequeue(acknowledge=True)[0])").strip() == body.decode()
    for age in (30, 20):
        put(tmp_path, f"m{age}", json.dumps(MESSAGE), age)

    async def bookkeeping():  # leave an attempt count, a set-aside message and a held delivery behind
        d = await q.receive("local_t")
        await d.nack()
        d = await q.receive("local_t")
        await d.set_aside("testing")
        return await q.receive("local_t")

    held = trio.run(bookkeeping)
    assert first not in waiting(tmp_path) and waiting(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == [".attempts", ".inflight", ".set-aside", ".tmp", "local_t"]
    assert client(tmp_path, "print(q.has_next(), q._get_queue_status())").strip() == "False (True, [])"
    trio.run(held.nack)
    assert client(tmp_path, "print(q.has_next())").strip() == "True"


def test_oldest_mtime_first_whatever_the_names(tmp_path: Path) -> None:
    put(tmp_path, "b", '{"n": 2}', age=20)
    put(tmp_path, "c", '{"n": 1}', age=30)
    put(tmp_path, "a", '{"n": 3}', age=10)
    q = LocalDirQueue(tmp_path, "runner-a")
    got = []
    while (d := receive(q)) is not None:
        got.append((d.message_id, json.loads(d.body)["n"]))
        trio.run(d.ack)
    assert got == [("c", 1), ("b", 2), ("a", 3)]


def test_only_regular_message_files_are_candidates(tmp_path: Path) -> None:
    put(tmp_path, ".hidden", "{}", age=50)
    put(tmp_path, "x.tmp", "{}", age=50)
    (tmp_path / "local_t" / "subdir").mkdir()
    os.symlink(tmp_path / "local_t" / "x.tmp", tmp_path / "local_t" / "link")
    put(tmp_path, "n" * 220, "{}", age=50)  # no room left for the in-flight suffix
    put(tmp_path, "real", "{}", age=10)
    q = LocalDirQueue(tmp_path, "runner-a")
    d = receive(q)
    assert d.message_id == "real"
    trio.run(d.ack)
    assert receive(q) is None
    with pytest.raises(ValueError):
        receive(q, "../elsewhere")


def test_a_client_lock_holds_the_queue_until_it_goes_or_goes_stale(tmp_path: Path) -> None:
    put(tmp_path, "m", "{}", age=10)
    lock = tmp_path / "local_t" / "lock.lock"
    lock.touch()
    q = LocalDirQueue(tmp_path, "runner-a", stale_after=60)
    assert receive(q) is None
    old = time.time() - 61
    os.utime(lock, (old, old))  # its writer died long ago
    d = receive(q)
    assert d is not None and d.message_id == "m"


def test_fresh_or_half_written_files_wait_and_old_garbage_is_delivered(tmp_path: Path) -> None:
    q = LocalDirQueue(tmp_path, "runner-a", settle_after=5.0, malformed_after=30.0)
    path = put(tmp_path, "m", json.dumps(MESSAGE), age=0)
    assert receive(q) is None  # complete, but written just now
    put(tmp_path, "m", '{"experiment": {"key": ', age=10)
    assert receive(q) is None  # settled mtime, but the client is still writing
    put(tmp_path, "m", json.dumps(MESSAGE), age=10)
    d = receive(q)
    assert d is not None and json.loads(d.body) == MESSAGE
    trio.run(d.ack)
    assert not path.exists()
    put(tmp_path, "junk", b"\xff\xfe{ never json", age=31)
    d = receive(q)
    assert d is not None and d.body == b"\xff\xfe{ never json"  # the supervisor sets it aside


RACER = """
import json, os, sys, time, trio
from pathlib import Path
from studio_runner.queues.localdir import LocalDirQueue
root, ident, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
async def main():
    q = LocalDirQueue(root, ident, settle_after=0.0)
    (go.parent / f"ready-{ident}").touch()
    while not go.exists():
        time.sleep(0.001)
    taken = []
    while True:
        d = await q.receive("local_t")
        if d is None:
            if not [n for n in os.listdir(root / "local_t") if n != "lock.lock"]:
                break
            continue
        taken.append(d.message_id)
        await d.ack()
    print(json.dumps(taken))
trio.run(main)
"""


def test_two_runner_processes_take_distinct_messages_and_all_of_them(tmp_path: Path) -> None:
    root = tmp_path / "queue"
    names = {f"msg{i:02d}" for i in range(50)}
    for i, name in enumerate(sorted(names)):
        put(root, name, json.dumps({"n": i}), age=100 - i)
    go = tmp_path / "go"
    procs = [runner_process(str(root), ident, str(go), code=RACER) for ident in ("r1", "r2")]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{ident}").exists() for ident in ("r1", "r2")):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    go.touch()
    taken = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert not set(taken[0]) & set(taken[1])
    assert set(taken[0]) | set(taken[1]) == names
    assert len(taken[0]) + len(taken[1]) == 50
    assert os.listdir(root / ".inflight" / "local_t") == []


def test_concurrent_receives_in_one_process_never_share_a_message(tmp_path: Path) -> None:
    for i in range(40):
        put(tmp_path, f"m{i:02d}", "{}", age=100 - i)
    runners = [LocalDirQueue(tmp_path, f"r{i}", settle_after=0.0) for i in range(2)]
    taken: list[str] = []

    async def drain(q: LocalDirQueue) -> None:
        while waiting(tmp_path):
            d = await q.receive("local_t")
            if d is not None:
                taken.append(d.message_id)  # held, not acked: a second claim of it would show up twice

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for q in runners * 2:
                nursery.start_soon(drain, q)

    trio.run(main)
    assert sorted(taken) == [f"m{i:02d}" for i in range(40)]


HOLDER = """
import sys, trio
from pathlib import Path
from studio_runner.queues.localdir import LocalDirQueue
async def main():
    q = LocalDirQueue(Path(sys.argv[1]), "victim", settle_after=0.0)
    d = await q.receive("local_t")
    print(d.message_id, d.attempt, flush=True)
    await trio.sleep(300)
trio.run(main)
"""


def test_kill_9_of_a_holder_returns_the_message_as_attempt_two(tmp_path: Path) -> None:
    put(tmp_path, "m1", json.dumps(MESSAGE), age=20)
    put(tmp_path, "m2", '{"n": 2}', age=10)
    mtime = (tmp_path / "local_t" / "m1").stat().st_mtime_ns
    victim = runner_process(str(tmp_path), code=HOLDER)
    try:
        assert victim.stdout.readline().split() == ["m1", "1"]
        other = LocalDirQueue(tmp_path, "survivor", settle_after=0.0)
        assert trio.run(other.discover) == ["local_t"]
        assert [n.split("~")[0] for n in os.listdir(tmp_path / ".inflight" / "local_t")] == ["m1"]
        d2 = receive(other)  # the live lease is respected: m1 stays with the victim
        assert d2.message_id == "m2"
        trio.run(d2.nack)
    finally:
        victim.kill()
        victim.wait()
    d = receive(other)
    assert (d.message_id, d.attempt, json.loads(d.body)) == ("m1", 2, MESSAGE)
    trio.run(d.nack)
    assert (tmp_path / "local_t" / "m1").stat().st_mtime_ns == mtime  # recovered into its old place
    assert receive(other).attempt == 3


def test_nack_restores_name_mtime_and_order(tmp_path: Path) -> None:
    put(tmp_path, "older", '{"n": 1}', age=20)
    put(tmp_path, "newer", '{"n": 2}', age=10)
    mtime = (tmp_path / "local_t" / "older").stat().st_mtime_ns
    q = LocalDirQueue(tmp_path, "runner-a")
    d = receive(q)
    assert waiting(tmp_path) == ["newer"] and os.path.exists(d.path) and d.message_id == "older"
    trio.run(d.nack)
    assert waiting(tmp_path) == ["newer", "older"]
    assert (tmp_path / "local_t" / "older").stat().st_mtime_ns == mtime
    assert (tmp_path / ".attempts" / "local_t" / "older").read_text().strip() == "1"
    d = receive(q)
    assert (d.message_id, d.attempt) == ("older", 2)
    trio.run(d.ack)
    assert not (tmp_path / ".attempts" / "local_t" / "older").exists()


def test_set_aside_moves_the_file_and_writes_the_reason(tmp_path: Path) -> None:
    put(tmp_path, "bad", "{}", age=20)
    q = LocalDirQueue(tmp_path, "runner-a")
    d = receive(q)
    trio.run(d.nack)
    d = receive(q)
    trio.run(d.set_aside, "signature does not verify")
    aside = tmp_path / ".set-aside" / "local_t"
    assert (aside / "bad").read_text() == "{}"
    reason = (aside / "bad.reason.txt").read_text()
    assert reason.splitlines()[0] == "signature does not verify"
    assert "attempts: 2" in reason and "runner: runner-a" in reason
    assert waiting(tmp_path) == [] and os.listdir(tmp_path / ".inflight" / "local_t") == []
    assert not (tmp_path / ".attempts" / "local_t" / "bad").exists()


def test_queue_deleted_while_in_flight_and_runner_gone_sets_aside_on_recovery(tmp_path: Path) -> None:
    put(tmp_path, "m", "{}", age=20)
    a = LocalDirQueue(tmp_path, "runner-a")
    d = receive(a)
    trio.run(a.aclose)  # a runner shutting down leaves it in flight, lease released
    assert os.path.exists(d.path)
    shutil.rmtree(tmp_path / "local_t")
    b = LocalDirQueue(tmp_path, "runner-b")
    assert trio.run(b.exists, "local_t") is False
    assert trio.run(b.discover) == []
    assert not (tmp_path / "local_t").exists()  # never recreated
    assert (tmp_path / ".set-aside" / "local_t" / "m").read_text() == "{}"
    assert (tmp_path / ".set-aside" / "local_t" / "m.reason.txt").read_text().startswith("queue deleted")


def test_discover_lists_queue_directories_only(tmp_path: Path) -> None:
    q = LocalDirQueue(tmp_path / "absent", "runner-a")
    assert trio.run(q.discover) == []
    q = LocalDirQueue(tmp_path, "runner-a", settle_after=0.0)
    trio.run(q.enqueue, "local_t", b"{}")
    trio.run(q.enqueue, "local_a", b"{}")
    (tmp_path / "stray-file").write_text("x")
    d = receive(q)
    trio.run(d.nack)
    trio.run(receive(q).set_aside, "x")
    assert {".attempts", ".inflight", ".set-aside", ".tmp"} <= set(os.listdir(tmp_path))
    assert trio.run(q.discover) == ["local_a", "local_t"]


def test_enqueue_round_trip_and_it_waits_for_the_client_lock(tmp_path: Path) -> None:
    q = LocalDirQueue(tmp_path, "runner-a", settle_after=0.0)
    lock = tmp_path / "local_t" / "lock.lock"

    async def enqueue_after_lock() -> str:
        lock.parent.mkdir(parents=True)
        lock.touch()
        result = []

        async def put_one() -> None:
            result.append(await q.enqueue("local_t", b'{"x": 1}'))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(put_one)
            await trio.sleep(0.3)
            assert waiting(tmp_path) == [] and not result
            lock.unlink()
        return result[0]

    name = trio.run(enqueue_after_lock)
    assert waiting(tmp_path) == [name] and len(name) == 36
    assert os.listdir(tmp_path / ".tmp") == []
    d = receive(q)
    assert (d.message_id, d.body) == (name, b'{"x": 1}')


def test_a_vanished_in_flight_file_marks_the_delivery_lost(tmp_path: Path) -> None:
    put(tmp_path, "m", "{}", age=20)
    q = LocalDirQueue(tmp_path, "runner-a")
    d = receive(q)
    assert trio.run(q.exists, "local_t") and not d.lost.is_set()
    os.unlink(d.path)
    assert trio.run(q.exists, "local_t")
    assert d.lost.is_set()
    trio.run(d.ack)  # nothing left to delete; must not fail
