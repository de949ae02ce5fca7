"""Local file queue: StudioML's local mode and the runner's no-server default.

The client (``LocalQueue``) writes each request as a file ``<root>/<queue>/<uuid4>``, in place, while it
holds a soft lock file ``<root>/<queue>/lock.lock``; the queue exists while its directory exists, and deleting
the directory is the experimenter's abort signal. The runner adds hidden directories beside the queues::

    <root>/<queue>/<name>                          waiting messages (the client's files)
    <root>/.inflight/<queue>/<name>~<runner>.<pid>  claimed messages, one per live delivery
    <root>/.attempts/<queue>/<name>                how often the message was handed back (an integer)
    <root>/.set-aside/<queue>/<name>               quarantined messages, each with <name>.reason.txt
    <root>/.tmp/                                   staging for our own atomic writes

Claim scheme (at-least-once, no servers, any number of runner processes on one host):

1. Take the oldest regular file of ``<root>/<queue>/`` by mtime; skip the queue while the client's lock.lock
   exists (unless stale), and skip files that are not yet complete JSON (half-written) until they are old.
2. Lock it (``flock`` LOCK_EX|LOCK_NB on an open descriptor), then ``rename`` it into ``.inflight``: the
   rename picks the single winner, and the lock travels with the file because it belongs to the inode.
3. The open, locked descriptor is the lease. Only a lock holder moves or deletes a message file: ack deletes
   it, nack renames it back with its name and mtime (it keeps its place in line), set_aside moves it aside.
4. A dead runner's locks die with it: every discover() and receive() probes in-flight files, and one whose
   lock can be taken goes back to its queue, counted as an attempt (or aside, "queue deleted", if it is gone).
5. Bookkeeping stays in hidden sibling directories, so neither the client's ``has_next()`` nor discover()
   mistakes it for messages or queues.

Needs a local filesystem with real ``flock(2)`` semantics (not NFS, where Linux emulates it with per-process
POSIX locks). A delivery still held when the runner closes stays in flight and is recovered by the next
discover() or receive() of any runner on the root.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import trio

log = logging.getLogger(__name__)

LOCK_NAME = "lock.lock"
INFLIGHT = ".inflight"
ATTEMPTS = ".attempts"
SET_ASIDE = ".set-aside"
TMP = ".tmp"
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_ORPHAN_SIDECAR_AGE = 3600.0


def _is_message_name(name: str) -> bool:
    """Names the client could have written; hidden, lock and temporary files are never messages.

    Names over 200 bytes are left alone too: the in-flight name adds a runner suffix and must fit NAME_MAX.
    """
    if name.startswith(".") or name == LOCK_NAME or name.endswith((".tmp", ".part", "~")):
        return False
    return len(os.fsencode(name)) <= 200


def _check_queue_name(queue: str) -> None:
    if not queue or queue.startswith(".") or "/" in queue or "\0" in queue:
        raise ValueError(f"not a local queue name: {queue!r}")


def _same_file(fd: int, path: str) -> bool:
    """Whether ``path`` still names the inode behind ``fd`` (it was not moved or replaced meanwhile)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_fd(fd: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _is_complete_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both derive from it
        return False
    return True


class LocalDelivery:
    """A claimed local message; the open locked descriptor ``_fd`` is its lease."""

    def __init__(self, backend: LocalDirQueue, queue: str, name: str, path: str, fd: int, body: bytes,
                 attempt: int, st: os.stat_result) -> None:
        self.queue = queue
        self.message_id = name
        self.body = body
        self.attempt = attempt
        self.lost = trio.Event()
        self.path = path
        """Where the message lies while in flight (for logs and tests)."""
        self._backend = backend
        self._fd: int | None = fd
        self._stat = st

    def __repr__(self) -> str:
        return f"<LocalDelivery {self.queue}/{self.message_id} attempt={self.attempt}>"

    async def ack(self) -> None:
        """Delete the message and its attempt count; a lost file is already gone, which is fine."""
        await trio.to_thread.run_sync(self._finish, self._ack_sync)

    async def nack(self) -> None:
        """Count this attempt and put the message back under its own name and mtime."""
        await trio.to_thread.run_sync(self._finish, self._nack_sync)

    async def set_aside(self, reason: str) -> None:
        """Move the message to ``.set-aside/<queue>/`` with a ``.reason.txt`` beside it."""
        await trio.to_thread.run_sync(self._finish, lambda: self._set_aside_sync(reason))

    def _finish(self, action: Callable[[], None]) -> None:
        if self._fd is None:
            raise RuntimeError(f"{self!r} was already finished or its lease released")
        try:
            action()
        finally:
            self._release()

    def _release(self) -> None:
        with self._backend._guard:  # _lost_sync reads _fd under the same guard
            fd, self._fd = self._fd, None
            self._backend._held.pop(self.path, None)
        if fd is not None:
            os.close(fd)  # drops the flock: from here on the file is anyone's

    def _ack_sync(self) -> None:
        Path(self.path).unlink(missing_ok=True)
        self._backend._attempts_path(self.queue, self.message_id).unlink(missing_ok=True)

    def _nack_sync(self) -> None:
        b = self._backend
        assert self._fd is not None
        if not _same_file(self._fd, self.path):
            log.warning("%r: in-flight file vanished before nack", self)
            return
        os.utime(self._fd, ns=(self._stat.st_atime_ns, self._stat.st_mtime_ns))
        b._write_attempts(self.queue, self.message_id, self.attempt)
        b._return_or_set_aside(self.queue, self.message_id, self.path, self.attempt)

    def _set_aside_sync(self, reason: str) -> None:
        assert self._fd is not None
        if not _same_file(self._fd, self.path):
            log.warning("%r: in-flight file vanished before set_aside", self)
            return
        self._backend._move_aside(self.queue, self.message_id, self.path, reason, self.attempt)


class LocalDirQueue:
    """The StudioML local queue root (``~/.studioml/queue``) served with the claim scheme above."""

    kind = "local"

    def __init__(self, root: Path, runner_id: str, stale_after: float = 60.0, *, settle_after: float = 0.0,
                 malformed_after: float = 30.0) -> None:
        """``stale_after``: age at which a client's lock.lock is ignored (its writer died).
        ``settle_after``: minimum file age before a message is taken. 0 by default: the client writes while
        holding lock.lock, and a file is only taken once it parses as complete JSON, so waiting would only
        add latency to every experiment.
        ``malformed_after``: age at which a file still not JSON is delivered anyway, to be set aside."""
        self.root = Path(root)
        self.runner_id = runner_id
        self.stale_after = stale_after
        self.settle_after = settle_after
        self.malformed_after = malformed_after
        self._token = f"{re.sub(r'[^A-Za-z0-9._-]', '_', runner_id)}.{os.getpid()}"
        self._guard = threading.Lock()
        self._held: dict[str, LocalDelivery | None] = {}
        """In-flight paths this process holds (None while a claim is being completed)."""

    # -- public API -------------------------------------------------------------------------------------

    async def discover(self) -> list[str]:
        """Queue directories under the root; also recovers orphaned in-flight messages."""
        names, lost = await trio.to_thread.run_sync(self._discover_sync)
        self._mark_lost(lost)
        return names

    async def receive(self, queue: str) -> LocalDelivery | None:
        """Claim the oldest settled message of ``queue``, or None."""
        _check_queue_name(queue)
        return await trio.to_thread.run_sync(self._receive_sync, queue)

    async def exists(self, queue: str) -> bool:
        """The queue directory still exists (the client deletes it to abort)."""
        _check_queue_name(queue)
        present, lost = await trio.to_thread.run_sync(
            lambda: ((self.root / queue).is_dir(), self._lost_sync()))
        self._mark_lost(lost)
        return present

    async def aclose(self) -> None:
        """Release every lease still held; those messages are recovered by the next runner's probe."""
        with self._guard:
            live = [d for d in self._held.values() if d is not None]
        for d in live:
            log.info("%r: releasing lease at shutdown, message stays in flight for recovery", d)
            d._release()

    async def enqueue(self, queue: str, body: bytes, lock_timeout: float = 30.0) -> str:
        """Publish like the client does (under lock.lock), but never half-written: temp file + rename."""
        _check_queue_name(queue)
        qdir = self.root / queue
        await trio.to_thread.run_sync(lambda: qdir.mkdir(parents=True, exist_ok=True))
        lock = qdir / LOCK_NAME
        deadline = trio.current_time() + lock_timeout
        owned = False
        while not owned:
            try:
                os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_TRUNC, 0o644))
                owned = True
            except FileExistsError:
                if not self._lock_is_fresh(lock):
                    break  # its writer died (or it just went away); our rename is atomic anyway
                if trio.current_time() > deadline:
                    raise TimeoutError(f"{lock} held for more than {lock_timeout} s") from None
                await trio.sleep(0.05)
        try:
            return await trio.to_thread.run_sync(self._write_message, qdir, body)
        finally:
            if owned:
                lock.unlink(missing_ok=True)

    # -- claim ------------------------------------------------------------------------------------------

    def _receive_sync(self, queue: str) -> LocalDelivery | None:
        self._recover_queue(queue)
        qdir = self.root / queue
        if self._lock_is_fresh(qdir / LOCK_NAME):
            return None
        try:
            entries = list(os.scandir(qdir))
        except (FileNotFoundError, NotADirectoryError):
            return None
        candidates = []
        for e in entries:
            if not _is_message_name(e.name):
                continue
            try:
                if e.is_file(follow_symlinks=False):
                    candidates.append((e.stat(follow_symlinks=False).st_mtime_ns, e.name))
            except FileNotFoundError:
                continue
        now = time.time()
        for mtime_ns, name in sorted(candidates):
            if now - mtime_ns / 1e9 < self.settle_after:
                break  # sorted by age: every later file is younger still
            delivery = self._try_claim(queue, name)
            if delivery is not None:
                return delivery
        return None

    def _try_claim(self, queue: str, name: str) -> LocalDelivery | None:
        src = str(self.root / queue / name)
        try:
            fd = os.open(src, _OPEN_FLAGS)
        except OSError:  # gone, or a symlink
            return None
        dst = str(self.root / INFLIGHT / queue / f"{name}~{self._token}")
        try:
            if not (_try_lock(fd) and _same_file(fd, src)):
                os.close(fd)
                return None
            st = os.fstat(fd)
            body = _read_fd(fd)
            age = time.time() - st.st_mtime
            if not stat.S_ISREG(st.st_mode) or age < self.settle_after or (
                    age < self.malformed_after and not _is_complete_json(body)):
                os.close(fd)
                return None
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with self._guard:
                self._held[dst] = None
            os.rename(src, dst)
        except FileNotFoundError:  # another runner or the client took it first
            self._forget_path(dst)
            os.close(fd)
            return None
        except BaseException:
            self._forget_path(dst)
            os.close(fd)
            raise
        delivery = LocalDelivery(self, queue, name, dst, fd, body, self._read_attempts(queue, name) + 1, st)
        with self._guard:
            self._held[dst] = delivery
        log.debug("claimed %s/%s as %s (attempt %d)", queue, name, dst, delivery.attempt)
        return delivery

    # -- recovery ---------------------------------------------------------------------------------------

    def _discover_sync(self) -> tuple[list[str], list[LocalDelivery]]:
        for queue in self._listdir(self.root / INFLIGHT):
            self._recover_queue(queue)
        self._collect_orphan_attempts()
        names = []
        try:
            for e in os.scandir(self.root):
                if not e.name.startswith(".") and e.is_dir():
                    names.append(e.name)
        except FileNotFoundError:
            pass  # the client creates the root with its first queue
        return sorted(names), self._lost_sync()

    def _recover_queue(self, queue: str) -> None:
        idir = self.root / INFLIGHT / queue
        for entry in self._listdir(idir):
            path = str(idir / entry)
            with self._guard:
                if path in self._held:
                    continue
            self._recover_one(queue, entry, path)

    def _recover_one(self, queue: str, entry: str, path: str) -> None:
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except OSError:
            return
        try:
            if not (_try_lock(fd) and _same_file(fd, path)):
                return  # its runner is alive, or someone else is recovering it right now
            name = entry.rsplit("~", 1)[0]
            handed_back = self._read_attempts(queue, name) + 1  # the interrupted run counts
            self._write_attempts(queue, name, handed_back)
            log.warning("recovering %s/%s from a runner that went away (%s)", queue, name, entry)
            self._return_or_set_aside(queue, name, path, handed_back)
        finally:
            os.close(fd)

    def _return_or_set_aside(self, queue: str, name: str, path: str, attempts: int) -> None:
        """Rename an in-flight file (whose lock the caller holds) back into its queue, never over a file."""
        qdir = self.root / queue
        target = qdir / name
        if qdir.is_dir() and not os.path.lexists(target):
            try:
                os.rename(path, target)
                return
            except FileNotFoundError:
                if not os.path.lexists(path):
                    return
        reason = "queue deleted" if not qdir.is_dir() else f"a different file named {name} is in the queue"
        self._move_aside(queue, name, path, reason, attempts)

    def _move_aside(self, queue: str, name: str, path: str, reason: str, attempts: int) -> None:
        adir = self.root / SET_ASIDE / queue
        adir.mkdir(parents=True, exist_ok=True)
        os.replace(path, adir / name)
        when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        text = (f"{reason.rstrip()}\n\nqueue: {queue}\nmessage: {name}\nattempts: {attempts}\n"
                f"runner: {self.runner_id}\nset aside at: {when}\n")
        self._atomic_write(adir / f"{name}.reason.txt", text.encode())
        self._attempts_path(queue, name).unlink(missing_ok=True)
        log.warning("set aside %s/%s: %s", queue, name, reason)

    def _collect_orphan_attempts(self) -> None:
        """Drop attempt counts of messages that vanished outside our control (queue deleted, ...)."""
        now = time.time()
        for queue in self._listdir(self.root / ATTEMPTS):
            adir = self.root / ATTEMPTS / queue
            for name in self._listdir(adir):
                path = adir / name
                try:
                    if now - path.stat().st_mtime < _ORPHAN_SIDECAR_AGE:
                        continue
                except FileNotFoundError:
                    continue
                qfile = self.root / queue / name
                if qfile.exists() or self._is_in_flight(queue, name) or qfile.exists():
                    continue  # looked twice: a message moving between queue and flight is seen once
                path.unlink(missing_ok=True)

    def _is_in_flight(self, queue: str, name: str) -> bool:
        return any(e.rsplit("~", 1)[0] == name for e in self._listdir(self.root / INFLIGHT / queue))

    def _lost_sync(self) -> list[LocalDelivery]:
        with self._guard:  # held throughout, so no descriptor is closed (and reused) under our feet
            return [d for d in self._held.values()
                    if d is not None and d._fd is not None and not d.lost.is_set()
                    and not _same_file(d._fd, d.path)]

    @staticmethod
    def _mark_lost(lost: list[LocalDelivery]) -> None:
        for d in lost:
            log.error("%r: in-flight file %s disappeared; the claim is lost", d, d.path)
            d.lost.set()

    # -- small helpers ----------------------------------------------------------------------------------

    def _forget_path(self, path: str) -> None:
        with self._guard:
            self._held.pop(path, None)

    @staticmethod
    def _listdir(path: Path) -> list[str]:
        try:
            return [n for n in os.listdir(path) if not n.startswith(".")]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _lock_is_fresh(self, lock: Path) -> bool:
        """A client is writing or listing: lock.lock exists and is younger than ``stale_after``."""
        try:
            return time.time() - lock.stat().st_mtime < self.stale_after
        except FileNotFoundError:
            return False

    def _attempts_path(self, queue: str, name: str) -> Path:
        return self.root / ATTEMPTS / queue / name

    def _read_attempts(self, queue: str, name: str) -> int:
        """Times the message was handed back so far (0 when never)."""
        try:
            return max(0, int(self._attempts_path(queue, name).read_text().strip()))
        except (FileNotFoundError, ValueError):
            return 0

    def _write_attempts(self, queue: str, name: str, handed_back: int) -> None:
        path = self._attempts_path(queue, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._atomic_write(path, f"{handed_back}\n".encode())

    def _atomic_write(self, path: Path, data: bytes) -> Path:
        tmpdir = self.root / TMP
        tmpdir.mkdir(parents=True, exist_ok=True)
        tmp = tmpdir / f"{uuid.uuid4()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    def _write_message(self, qdir: Path, body: bytes) -> str:
        name = str(uuid.uuid4())
        self._atomic_write(qdir / name, body)
        return name
