"""The local directory queue against real files, real runner processes and the real StudioML client."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from studio_runner.errors import ConfigError, RequestInvalid
from studio_runner.queues import localdir
from studio_runner.queues.localdir import LOST_MOVED, LocalDirQueue
from studio_runner.request import parse_request

REPO = Path(__file__).resolve().parents[2]

MESSAGE = {"experiment": {"key": "1631664000_abc", "resources_needed": {"cpus": 1}}, "config": {}}


def client(studioml_bin: Path, root: Path, code: str) -> str:
    """Run ``code`` in the real client (the suite's studioml 0.0.49 venv, fixture ``studioml_bin``) with
    ``q = LocalQueue('local_t', path=root)``; return its stdout."""
    prog = "from studio.queues.local_queue import LocalQueue\n"
    prog += f"q = LocalQueue('local_t', path={str(root)!r})\n"
    done = subprocess.run([str(studioml_bin / "python"), "-c", prog + code],
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


def test_a_message_written_by_the_real_client_is_received(tmp_path: Path, studioml_bin: Path) -> None:
    client(studioml_bin, tmp_path, f"q.enqueue({json.dumps(json.dumps(MESSAGE))})")
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


def test_the_client_reads_our_enqueue_and_never_sees_our_bookkeeping(tmp_path: Path,
                                                                      studioml_bin: Path) -> None:
    q = LocalDirQueue(tmp_path, "runner-a", settle_after=0.0)
    body = json.dumps(MESSAGE).encode()
    first = trio.run(q.enqueue, "local_t", body)
    assert client(studioml_bin, tmp_path, "print(q.dequeue(acknowledge=True)[0])").strip() == body.decode()
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
    status = client(studioml_bin, tmp_path, "print(q.has_next(), q._get_queue_status())")
    assert status.strip() == "False (True, [])"
    trio.run(held.nack)
    assert client(studioml_bin, tmp_path, "print(q.has_next())").strip() == "True"


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
    assert d.lost.is_set() and d.lost_reason == LOST_MOVED
    trio.run(d.ack)  # nothing left to delete; must not fail


def test_start_creates_the_root_and_refuses_one_that_is_not_a_directory(tmp_path: Path) -> None:
    q = LocalDirQueue(tmp_path / "a" / "queue", "runner-a")
    trio.run(q.start)
    trio.run(q.start)  # idempotent
    assert (tmp_path / "a" / "queue").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        trio.run(LocalDirQueue(tmp_path / "file", "runner-a").start)
    assert q.deadline_warning(10 * 24 * 3600) is None


def test_release_keeps_name_mtime_place_and_attempt_count(tmp_path: Path) -> None:
    put(tmp_path, "older", '{"n": 1}', age=20)
    put(tmp_path, "newer", '{"n": 2}', age=10)
    mtime = (tmp_path / "local_t" / "older").stat().st_mtime_ns
    attempts = tmp_path / ".attempts" / "local_t" / "older"
    q = LocalDirQueue(tmp_path, "runner-a")
    trio.run(receive(q).nack)
    d = receive(q)
    assert (d.message_id, d.attempt) == ("older", 2)
    trio.run(d.release)
    assert waiting(tmp_path) == ["newer", "older"]
    assert (tmp_path / "local_t" / "older").stat().st_mtime_ns == mtime
    assert attempts.read_text().strip() == "1"  # unchanged: the release was not an attempt
    d = receive(q)
    assert (d.message_id, d.attempt) == ("older", 2)


def test_a_lost_lease_lets_go_of_the_file_so_whoever_has_it_can_claim_it(tmp_path: Path) -> None:
    put(tmp_path, "m", json.dumps(MESSAGE), age=20)
    a = LocalDirQueue(tmp_path, "runner-a")
    d = receive(a)
    os.rename(d.path, tmp_path / "local_t" / "m")  # someone puts the in-flight file back by hand
    b = LocalDirQueue(tmp_path, "runner-b")
    assert trio.run(a.exists, "local_t")  # a's probe notices the loss
    assert d.lost.is_set() and d.lost_reason == LOST_MOVED
    d2 = receive(b)  # a's lock is gone with its lease
    assert d2 is not None and d2.message_id == "m"
    trio.run(d.ack)  # a no-op: it must not delete b's claim
    trio.run(d.set_aside, "late")
    assert os.path.exists(d2.path) and not (tmp_path / ".set-aside").exists()


def test_a_settle_that_finds_its_file_gone_marks_the_delivery_lost(tmp_path: Path) -> None:
    put(tmp_path, "m", "{}", age=20)
    q = LocalDirQueue(tmp_path, "runner-a")
    d = receive(q)
    os.unlink(d.path)  # no probe in between: the nack itself finds out
    trio.run(d.nack)
    assert d.lost.is_set() and d.lost_reason == LOST_MOVED
    assert waiting(tmp_path) == [] and not (tmp_path / ".attempts" / "local_t" / "m").exists()


def test_a_late_nack_after_the_queue_was_deleted_sets_the_message_aside(tmp_path: Path) -> None:
    put(tmp_path, "m", '{"n": 1}', age=20)
    q = LocalDirQueue(tmp_path, "runner-a")
    d = receive(q)
    shutil.rmtree(tmp_path / "local_t")
    trio.run(d.nack)
    assert not (tmp_path / "local_t").exists()  # the runner never recreates a client's queue
    assert (tmp_path / ".set-aside" / "local_t" / "m").read_text() == '{"n": 1}'
    assert (tmp_path / ".set-aside" / "local_t" / "m.reason.txt").read_text().startswith("queue deleted")


# --- files that are not (yet) messages never stall the queue (issue item 10) ------------------------------

DEEP = b"[" * 100_000 + b"]" * 100_000
"""200 KB of nesting: complete, but past the JSON scanner's recursion limit."""


class ReadCounter:
    """Bytes read from one file (by inode). The local queue reads message files only with ``os.pread``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
        self.ino = path.stat().st_ino
        self.bytes = 0
        real = os.pread

        def counting(fd: int, n: int, offset: int) -> bytes:
            data = real(fd, n, offset)
            if os.fstat(fd).st_ino == self.ino:
                self.bytes += len(data)
            return data

        monkeypatch.setattr(os, "pread", counting)


def test_deeply_nested_json_is_delivered_at_once_to_be_set_aside(tmp_path: Path) -> None:
    put(tmp_path, "deep", DEEP, age=2)
    put(tmp_path, "good", json.dumps(MESSAGE), age=1)
    q = LocalDirQueue(tmp_path, "runner-a")  # malformed_after: 30 s, which the deep file must not wait
    started = time.monotonic()
    d = receive(q)
    assert d is not None and (d.message_id, d.body) == ("deep", DEEP)
    with pytest.raises(RequestInvalid, match="nested too deeply"):
        parse_request(d.body)
    trio.run(d.set_aside, "invalid: nested too deeply")
    assert receive(q).message_id == "good"
    assert time.monotonic() - started < 5


def test_valid_message_behind_broken_files_comes_in_the_same_call_and_each_is_reported_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    qdir = tmp_path / "local_t"
    put(tmp_path, "a-unfinished", '{"experiment": {"key": ', age=9)
    eio = put(tmp_path, "b-eio", json.dumps(MESSAGE), age=8)
    racy = put(tmp_path, "c-racy", json.dumps(MESSAGE), age=7)
    denied = put(tmp_path, "d-denied", json.dumps(MESSAGE), age=6)
    put(tmp_path, "e-good", json.dumps(MESSAGE), age=5)

    real_read = localdir._read_fd
    eio_ino = eio.stat().st_ino

    def failing_read(fd: int) -> bytes:  # a disk error under one file
        if os.fstat(fd).st_ino == eio_ino:
            raise OSError(errno.EIO, "Input/output error")
        return real_read(fd)

    monkeypatch.setattr(localdir, "_read_fd", failing_read)
    real_scandir = os.scandir

    def racy_scandir(path):  # c-racy is replaced by a directory between the listing and the claim
        if Path(path) != qdir:
            return real_scandir(path)
        entries = list(real_scandir(path))
        if racy.is_file():
            racy.unlink()
            racy.mkdir()
        return iter(entries)

    monkeypatch.setattr(os, "scandir", racy_scandir)
    if os.geteuid() != 0:
        denied.chmod(0)
    else:  # root reads anything: play the kernel's answer for an unreadable file
        real_open = os.open

        def denying_open(path, flags, *args, **kwargs):
            if os.fspath(path) == str(denied):
                raise PermissionError(errno.EACCES, "Permission denied", str(denied))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", denying_open)

    q = LocalDirQueue(tmp_path, "runner-a")
    with caplog.at_level(logging.DEBUG, logger="studio_runner.queues.localdir"):
        d = receive(q)
        assert d is not None and d.message_id == "e-good"
        trio.run(d.ack)
        for _ in range(10):
            assert receive(q) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, warnings
    assert any("b-eio" in m and "Input/output error" in m for m in warnings)
    assert any("d-denied" in m and "Permission denied" in m for m in warnings)
    assert sorted(waiting(tmp_path)) == ["a-unfinished", "b-eio", "c-racy", "d-denied"]


def test_a_failing_recovery_does_not_block_the_queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    orphan = tmp_path / ".inflight" / "local_t" / "dead~runner-x.1"
    orphan.parent.mkdir(parents=True)
    orphan.write_text("{}")  # a dead runner's message, unlocked
    put(tmp_path, "good", json.dumps(MESSAGE), age=1)

    def disk_full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LocalDirQueue, "_write_attempts", disk_full)
    q = LocalDirQueue(tmp_path, "runner-a")
    with caplog.at_level(logging.WARNING, logger="studio_runner.queues.localdir"):
        assert receive(q).message_id == "good"
        assert receive(q) is None
    assert len([r for r in caplog.records if "dead~runner-x.1" in r.getMessage()]) == 1
    assert orphan.exists()  # still in flight: recovered once the disk has room
    monkeypatch.undo()
    d = receive(q)
    assert (d.message_id, d.attempt) == ("dead", 2)


def test_a_truncated_big_file_is_read_once_and_again_only_when_it_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # cut off right after a "}" inside a string, so only a full parse can tell that it is unfinished
    head = b'{"experiment": {"key": "k"}, "pad": "'
    big = put(tmp_path, "big", head + b"x" * 50_000_000 + b"}", age=5)
    put(tmp_path, "good", json.dumps(MESSAGE), age=1)
    reads = ReadCounter(monkeypatch, big)
    q = LocalDirQueue(tmp_path, "runner-a")
    d = receive(q)
    assert d.message_id == "good"  # served behind it, in the same call
    assert reads.bytes >= 50_000_000
    trio.run(d.ack)
    reads.bytes = 0
    for _ in range(5):
        assert receive(q) is None
    assert reads.bytes == 0  # unchanged since it was found unfinished: not even opened
    with open(big, "ab") as f:
        f.write(b'"}')  # its writer finishes it
    d = receive(q)
    assert d.message_id == "big" and json.loads(d.body)["pad"].endswith("x}")


def test_a_huge_file_cut_mid_token_is_never_read_whole(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    big = put(tmp_path, "big", b'{"pad": "' + b"x" * 50_000_000, age=5)
    reads = ReadCounter(monkeypatch, big)
    q = LocalDirQueue(tmp_path, "runner-a")
    assert receive(q) is None
    assert 0 < reads.bytes <= 4096  # its tail alone shows it cannot be complete JSON
    assert receive(q) is None
    assert reads.bytes <= 4096


def test_an_unfinished_file_is_delivered_once_unchanged_for_malformed_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = put(tmp_path, "junk", '{"experiment": {"key": "k", "pad": [1, 2]', age=0)
    reads = ReadCounter(monkeypatch, path)
    q = LocalDirQueue(tmp_path, "runner-a", malformed_after=1.0)
    assert receive(q) is None
    first = reads.bytes
    assert first >= path.stat().st_size  # read whole once, to find it unfinished
    assert receive(q) is None and reads.bytes == first  # not again while unchanged
    time.sleep(1.1)
    d = receive(q)  # unchanged for malformed_after: taken, to be set aside by the parser
    assert d is not None and d.message_id == "junk"
    with pytest.raises(RequestInvalid):
        parse_request(d.body)


def test_what_is_remembered_about_unfinished_files_is_bounded(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(localdir, "_MEMO_MAX", 3)
    for i in range(5):
        put(tmp_path, f"u{i}", '{"n": ', age=10 - i)
    q = LocalDirQueue(tmp_path, "runner-a")
    assert receive(q) is None
    assert len(q._unfinished) == 3
    for i in range(5):
        (tmp_path / "local_t" / f"u{i}").unlink()
    put(tmp_path, "good", "{}", age=1)
    assert receive(q).message_id == "good"
    assert len(q._unfinished) == 0  # files that left the queue are forgotten


# --- wait_for_work: watching the root ----------------------------------------------------------------------


class ScanCounter:
    """Counts the directory scans of ``receive`` (the idle fast path makes none)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = LocalDirQueue._receive_sync

        def counting(q: LocalDirQueue, queue: str):  # type: ignore[no-untyped-def]
            self.count += 1
            return real(q, queue)

        monkeypatch.setattr(LocalDirQueue, "_receive_sync", counting)


async def settle_into_waiting(q: LocalDirQueue, queues: list[str]) -> None:
    """What the supervisor does: a round, a wait (the first starts the watcher), a round, a timed-out wait."""
    for wait in (0.3, 0.4):
        for queue in queues:
            assert await q.receive(queue) is None
        await q.wait_for_work(queues, wait)


def test_an_idle_queue_is_not_scanned_again_until_it_changes(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for queue in ("local_t", "local_u"):
        (tmp_path / queue).mkdir()
    scans = ScanCounter(monkeypatch)
    q = LocalDirQueue(tmp_path, "runner-a")

    async def main() -> None:
        await settle_into_waiting(q, ["local_t"])
        before = scans.count
        for _ in range(3):
            assert await q.receive("local_t") is None
        assert scans.count == before  # found idle and unchanged: not listed again
        put(tmp_path, "other", json.dumps(MESSAGE), age=1, queue="local_u")  # a queue nobody waits on
        started = time.monotonic()
        await q.wait_for_work(["local_t"], 0.8)
        assert time.monotonic() - started > 0.5  # its change does not wake a wait for local_t
        assert await q.receive("local_t") is None and scans.count == before
        async with trio.open_nursery() as nursery:
            nursery.start_soon(q.wait_for_work, ["local_t"], 10)
            await trio.sleep(0.3)
            put(tmp_path, "mine", json.dumps(MESSAGE), age=1)
            published = time.monotonic()
        assert time.monotonic() - published < 0.3
        d = await q.receive("local_t")
        assert d is not None and d.message_id == "mine" and scans.count == before + 1
        await d.ack()
        await q.aclose()

    trio.run(main)


def test_a_queue_with_another_runners_claim_is_scanned_every_round(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    put(tmp_path, "m", json.dumps(MESSAGE), age=1)
    holder = LocalDirQueue(tmp_path, "runner-a")
    held = receive(holder)
    assert held is not None
    scans = ScanCounter(monkeypatch)
    q = LocalDirQueue(tmp_path, "runner-b")

    async def main() -> None:
        await settle_into_waiting(q, ["local_t"])
        before = scans.count
        assert await q.receive("local_t") is None
        assert scans.count == before + 1  # its runner may die without a file event: keep looking
        await holder.aclose()  # ... as it does now, leaving the file in flight
        await q.wait_for_work(["local_t"], 0.5)  # no event: the round after the timeout finds it
        d = await q.receive("local_t")
        assert d is not None and (d.message_id, d.attempt) == ("m", 2)
        await d.ack()
        await q.aclose()

    trio.run(main)


async def polls_three_times(q: LocalDirQueue) -> None:
    """Three rounds of receive (nothing) and a wait that returns after poll_interval, not the timeout."""
    for _ in range(3):
        assert await q.receive("local_t") is None
        started = time.monotonic()
        await q.wait_for_work(["local_t"], 10)
        assert time.monotonic() - started < 0.3


def test_watch_false_polls_every_poll_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "local_t").mkdir()
    scans = ScanCounter(monkeypatch)
    q = LocalDirQueue(tmp_path, "runner-a", watch=False, poll_interval=0.1)

    async def main() -> None:
        await polls_three_times(q)
        assert scans.count == 3  # every round lists the directory

    trio.run(main)


def test_a_watcher_that_cannot_start_falls_back_to_polling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    import watchfiles._rust_notify

    def no_watcher(*args: object) -> None:
        raise OSError(errno.ENOSPC, "OS file watch limit reached")

    monkeypatch.setattr(watchfiles._rust_notify, "RustNotify", no_watcher)
    (tmp_path / "local_t").mkdir()
    q = LocalDirQueue(tmp_path, "runner-a", poll_interval=0.1)

    async def main() -> None:
        await polls_three_times(q)
        put(tmp_path, "m", json.dumps(MESSAGE), age=1)
        d = await q.receive("local_t")
        assert d is not None and d.message_id == "m"
        await d.ack()

    with caplog.at_level(logging.WARNING, logger="studio_runner.queues.fswatch"):
        trio.run(main)
    [warning] = [r.getMessage() for r in caplog.records]
    assert "cannot watch it" in warning and "polling every 0.1 s" in warning


def test_a_file_system_that_reports_no_changes_is_detected_and_polled(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from studio_runner.queues.fswatch import RootWatch

    monkeypatch.setattr(RootWatch, "_queue_of", lambda self, path: None)  # every event is lost
    (tmp_path / "local_t").mkdir()
    q = LocalDirQueue(tmp_path, "runner-a", poll_interval=0.1)

    async def main() -> None:
        await settle_into_waiting(q, ["local_t"])
        put(tmp_path, "m", json.dumps(MESSAGE), age=5)  # written by another host, say: no event here
        assert await q.receive("local_t") is None  # believed idle, not listed
        await trio.sleep(1.2)
        await q.wait_for_work(["local_t"], 0.5)  # the timed-out wait lists the idle queues
        d = await q.receive("local_t")
        assert d is not None and d.message_id == "m"
        await d.ack()
        started = time.monotonic()
        await q.wait_for_work(["local_t"], 10)
        assert time.monotonic() - started < 0.3  # polling from now on

    with caplog.at_level(logging.WARNING, logger="studio_runner.queues.fswatch"):
        trio.run(main)
    [warning] = [r.getMessage() for r in caplog.records]
    assert "was never announced" in warning and "polling" in warning


def test_a_cancelled_wait_distrusts_every_idle_finding(tmp_path: Path) -> None:
    (tmp_path / "local_t").mkdir()
    q = LocalDirQueue(tmp_path, "runner-a")

    async def main() -> None:
        await settle_into_waiting(q, ["local_t"])
        assert await q.receive("local_t") is None
        assert q._watch.known_idle("local_t")
        with trio.move_on_after(0.3):  # another backend's work or a freed slot woke the supervisor
            await q.wait_for_work(["local_t"], 10)
        assert not q._watch.known_idle("local_t")  # the stopped pull dropped what it had gathered
        await q.aclose()

    trio.run(main)


@pytest.mark.parametrize("settle", ["nack", "release"])
def test_a_message_this_runner_puts_back_is_seen_by_the_next_receive(tmp_path: Path, settle: str) -> None:
    """``run --once`` never waits for file events: a message handed back (or released) must be found by the
    very next receive, even though the queue was known idle and no pull has seen the rename yet."""

    async def main() -> None:
        queue = LocalDirQueue(tmp_path, "runner-a", settle_after=0.0)
        try:
            await queue.enqueue("local_q", b'{"x": 1}')
            delivery = await queue.receive("local_q")
            assert delivery is not None
            assert await queue.receive("local_q") is None
            await queue.wait_for_work(["local_q"], 0.3)  # pulls: the queue is now known idle
            assert await queue.receive("local_q") is None
            await getattr(delivery, settle)()
            again = await queue.receive("local_q")
            assert again is not None and again.body == b'{"x": 1}'
            await again.ack()
        finally:
            await queue.aclose()

    trio.run(main)
