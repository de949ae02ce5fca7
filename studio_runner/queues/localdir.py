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
   A file that cannot be checked or claimed (unreadable, replaced mid-check, too deeply nested for the
   JSON scanner) never holds up the files behind it: it is skipped (reported once) or, if it is complete
   but can never parse, delivered at once to be set aside. An unfinished file is re-read only when its
   (inode, size, mtime, ctime) changed, so a huge truncated file is not read on every poll.
2. Lock it (``flock`` LOCK_EX|LOCK_NB on an open descriptor), then ``rename`` it into ``.inflight``: the
   rename picks the single winner, and the lock travels with the file because it belongs to the inode.
3. The open, locked descriptor is the lease. Only a lock holder moves or deletes a message file: ack deletes
   it, nack and release rename it back with its name and mtime (it keeps its place in line; nack also counts
   the attempt in ``.attempts``), set_aside moves it aside. A lease whose file someone else moved or deleted
   is lost: its descriptor is closed and settling it does nothing.
4. A dead runner's locks die with it: every discover() and every scan of a queue probes in-flight files;
   one whose lock can be taken goes back to its queue, counted as an attempt (or aside, "queue deleted", if
   it is gone).
5. Bookkeeping stays in hidden sibling directories, so neither the client's ``has_next()`` nor discover()
   mistakes it for messages or queues.

Waiting: an idle runner does not poll. :class:`~studio_runner.queues.fswatch.RootWatch` watches the root
for changes (inotify), ``wait_for_work`` returns when a waited-for queue changed, and ``receive`` skips the
scan of a queue found idle (no message file, nothing of another runner's in flight) that has not changed
since. Queues that are not idle (a file still being written, a client's lock, another runner's claim whose
runner may die) are scanned on every round, which the supervisor runs at least every ``timeout`` of its wait.
Where the root cannot be watched, or turns out not to report changes, ``wait_for_work`` polls every
``poll_interval`` as before (``watch=False`` forces that).

Needs a local filesystem with real ``flock(2)`` semantics (not NFS, where Linux emulates it with per-process
POSIX locks). A delivery still held when the runner closes stays in flight and is recovered by the next
discover() or receive() of any runner on the root. Claims never expire while their runner lives, so
``keep_alive`` has nothing to renew and ``deadline_warning`` nothing to warn about.
"""

from __future__ import annotations

import collections
import datetime
import errno
import fcntl
import json
import logging
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from studio_runner.errors import ConfigError
from studio_runner.queues.fswatch import RootWatch

if TYPE_CHECKING:
    from studio_runner.queues.base import Delivery, QueueBackend

log = logging.getLogger(__name__)

LOCK_NAME = "lock.lock"
INFLIGHT = ".inflight"
ATTEMPTS = ".attempts"
SET_ASIDE = ".set-aside"
TMP = ".tmp"
# O_NONBLOCK: a name swapped for a FIFO between listing and open must not hang the worker thread
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_ORPHAN_SIDECAR_AGE = 3600.0
_MEMO_MAX = 4096
"""At most this many files are remembered as unfinished or as already reported (oldest forgotten first)."""
_TAIL = 4096
_JSON_LAST = frozenset(b'}]"0123456789elNy')
"""Bytes a JSON text can end with (Python's json also takes NaN and Infinity); \\0 and whitespace trail."""
LOST_MOVED = "the in-flight file was moved or deleted by someone else"
LOST_CLOSED = ("the runner closed its local queue while holding the message: it stays in flight until a "
               "runner recovers it (counted as an attempt)")

Identity = tuple[int, int, int, int]
"""(inode, size, mtime_ns, ctime_ns): any write, truncation, utime or replacement changes it."""


def _message_files(qdir: Path) -> list[tuple[str, os.stat_result]]:
    """The message files of a queue directory with their stat; files gone meanwhile are skipped (anything
    else shows when one is claimed). Raises OSError when the directory cannot be listed."""
    files = []
    for entry in list(os.scandir(qdir)):
        if not _is_message_name(entry.name):
            continue
        try:
            if entry.is_file(follow_symlinks=False):
                files.append((entry.name, entry.stat(follow_symlinks=False)))
        except OSError:
            continue
    return files


def _identity(st: os.stat_result) -> Identity:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


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


def _may_end_json(fd: int, size: int) -> bool:
    """Cheap test on the file's tail: False when it cannot be a complete JSON text, so a truncated file (even
    a huge one) is rejected without reading it whole."""
    if size == 0:
        return False
    tail = os.pread(fd, min(size, _TAIL), max(0, size - _TAIL)).rstrip(b" \t\r\n\0")
    if not tail:
        return size > _TAIL  # only trailing blanks in the window: let the full parse decide
    return tail[-1] in _JSON_LAST


def _is_unfinished_json(body: bytes) -> bool:
    """Whether ``body`` looks like JSON still being written (not yet decodable).

    Anything else counts as finished, including bodies that can never parse: too deeply nested for the
    scanner (RecursionError) or holding an unusable number. The request parser sets those aside; waiting for
    them would only hold up the queue.
    """
    try:
        json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return True
    except (RecursionError, ValueError):
        return False
    return False


class LocalDelivery:
    """A claimed local message; the open locked descriptor ``_fd`` is its lease."""

    def __init__(self, backend: LocalDirQueue, queue: str, name: str, path: str, fd: int, body: bytes,
                 attempt: int, st: os.stat_result) -> None:
        self.queue = queue
        self.message_id = name
        self.body = body
        self.attempt = attempt
        self.lost = trio.Event()
        self.lost_reason: str | None = None
        """Why the lease was lost (file moved or deleted by someone else, runner closed); None while held."""
        self.path = path
        """Where the message lies while in flight (for logs and tests)."""
        self._backend = backend
        self._fd: int | None = fd
        self._stat = st
        self._settled = False

    def __repr__(self) -> str:
        return f"<LocalDelivery {self.queue}/{self.message_id} attempt={self.attempt}>"

    async def ack(self) -> None:
        """Delete the message and its attempt count."""
        await self._settle("ack", self._ack_sync)

    async def nack(self) -> None:
        """Count this attempt and put the message back under its own name and mtime."""
        await self._settle("nack", self._nack_sync)
        self._backend._watch.changed(self.queue)  # after the rename, so no scan can outrun it

    async def release(self) -> None:
        """Put the message back under its own name and mtime without counting an attempt."""
        await self._settle("release", self._release_sync)
        self._backend._watch.changed(self.queue)

    async def set_aside(self, reason: str) -> None:
        """Move the message to ``.set-aside/<queue>/`` with a ``.reason.txt`` beside it."""
        await self._settle("set_aside", lambda: self._set_aside_sync(reason))

    async def keep_alive(self) -> None:
        """Nothing to renew: the lease is a lock that lasts as long as this process holds the descriptor."""
        await trio.lowlevel.checkpoint()

    async def _settle(self, op: str, action: Callable[[], None]) -> None:
        """Run ``action`` once, with the lease held; a lost lease or a second settle is logged, not raised
        (at-least-once: whoever has the file now decides its fate)."""
        if not self._begin_settle(op):
            await trio.lowlevel.checkpoint()
            return
        vanished = await trio.to_thread.run_sync(self._finish, action)
        if vanished:
            log.warning("%s of %r skipped: %s", op, self, LOST_MOVED)
            if self.lost_reason is None:
                self.lost_reason = LOST_MOVED
            self.lost.set()

    def _begin_settle(self, op: str) -> bool:
        with self._backend._guard:  # aclose and the loss probe take the descriptor under the same guard
            lost = self.lost_reason is not None or self.lost.is_set() or (
                self._fd is None and not self._settled)
            repeated = not lost and self._settled
            if not lost and not repeated:
                self._settled = True
                return True
        if lost:
            log.info("%s of %r skipped: the claim was lost (%s)", op, self,
                     self.lost_reason or "lease released")
        else:
            log.warning("%s of %r ignored: it was already settled", op, self)
        return False

    def _finish(self, action: Callable[[], None]) -> bool:
        """Worker thread: run ``action`` unless the in-flight file is no longer ours (then return True)."""
        assert self._fd is not None
        try:
            if not _same_file(self._fd, self.path):
                return True
            action()
            return False
        finally:
            self._drop_lease()

    def _drop_lease(self) -> None:
        with self._backend._guard:  # _lost_sync reads _fd under the same guard
            fd, self._fd = self._fd, None
            self._backend._held.pop(self.path, None)
        if fd is not None:
            os.close(fd)  # drops the flock: from here on the file is anyone's

    def _ack_sync(self) -> None:
        Path(self.path).unlink(missing_ok=True)
        self._backend._attempts_path(self.queue, self.message_id).unlink(missing_ok=True)

    def _restore_times(self) -> None:
        assert self._fd is not None
        os.utime(self._fd, ns=(self._stat.st_atime_ns, self._stat.st_mtime_ns))

    def _nack_sync(self) -> None:
        self._restore_times()
        self._backend._write_attempts(self.queue, self.message_id, self.attempt)
        self._backend._return_or_set_aside(self.queue, self.message_id, self.path, self.attempt)

    def _release_sync(self) -> None:
        self._restore_times()  # the attempts file is left as it is: the next delivery has this attempt
        self._backend._return_or_set_aside(self.queue, self.message_id, self.path, self.attempt - 1)

    def _set_aside_sync(self, reason: str) -> None:
        self._backend._move_aside(self.queue, self.message_id, self.path, reason, self.attempt)


class LocalDirQueue:
    """The StudioML local queue root (``~/.studioml/queue``) served with the claim scheme above."""

    kind = "local"

    def __init__(self, root: Path, runner_id: str, stale_after: float = 60.0, *, settle_after: float = 0.0,
                 malformed_after: float = 30.0, watch: bool = True, poll_interval: float = 0.2) -> None:
        """``stale_after``: age at which a client's lock.lock is ignored (its writer died).
        ``settle_after``: minimum file age before a message is taken. 0 by default: the client writes while
        holding lock.lock, and a file is only taken once it parses as complete JSON, so waiting would only
        add latency to every experiment (with more, a file is taken at the next round after it settled).
        ``malformed_after``: age at which a file still not JSON is delivered anyway, to be set aside.
        ``watch``: wait for file system events; False polls every ``poll_interval`` instead (also the
        fallback where the root cannot be watched)."""
        self.root = Path(root)
        self.runner_id = runner_id
        self.stale_after = stale_after
        self.settle_after = settle_after
        self.malformed_after = malformed_after
        self._token = f"{re.sub(r'[^A-Za-z0-9._-]', '_', runner_id)}.{os.getpid()}"
        self._guard = threading.Lock()
        self._held: dict[str, LocalDelivery | None] = {}
        """In-flight paths this process holds (None while a claim is being completed)."""
        self._memo_lock = threading.Lock()
        self._unfinished: collections.OrderedDict[tuple[str, str], Identity] = collections.OrderedDict()
        """Files last seen not (yet) complete JSON, by identity: re-read only once they change."""
        self._reported: collections.OrderedDict[tuple[str, str], tuple[Identity | None, str]] = \
            collections.OrderedDict()
        """Files whose problem was logged, so a file that fails on every poll is reported once."""
        self._watch = RootWatch(self.root, enabled=watch, poll_interval=poll_interval)

    # -- public API -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the root if missing and check it is a writable directory, so a wrong --queue-root shows
        at start-up rather than as an empty queue list."""
        await trio.to_thread.run_sync(self._start_sync)

    def deadline_warning(self, seconds: float) -> str | None:
        """None: a local claim lasts as long as its runner, whatever the experiment's deadline."""
        return None

    async def discover(self) -> list[str]:
        """Queue directories under the root; also recovers orphaned in-flight messages."""
        names, lost = await trio.to_thread.run_sync(self._discover_sync)
        self._mark_lost(lost)
        return names

    async def receive(self, queue: str) -> LocalDelivery | None:
        """Claim the oldest settled message of ``queue``, or None. A file that cannot be checked or claimed
        is skipped (and reported once), never raised: it must not hold up the messages behind it."""
        _check_queue_name(queue)
        if self._watch.known_idle(queue):  # found idle, and no change since: no need to look again
            await trio.lowlevel.checkpoint()
            return None
        started = self._watch.scan_started()
        delivery, idle = await trio.to_thread.run_sync(self._receive_sync, queue)
        self._watch.scan_finished(queue, started, idle)
        return delivery

    async def wait_for_work(self, queues: Sequence[str], timeout: float) -> None:
        """Return when one of ``queues`` changed (a file written, renamed, removed), or after ``timeout``;
        after ``poll_interval`` where the root cannot be watched."""
        for queue in queues:
            _check_queue_name(queue)
        await self._watch.wait(queues, timeout, self._probe_sync)

    async def exists(self, queue: str) -> bool:
        """The queue directory still exists (the client deletes it to abort)."""
        _check_queue_name(queue)
        present, lost = await trio.to_thread.run_sync(
            lambda: ((self.root / queue).is_dir(), self._lost_sync()))
        self._mark_lost(lost)
        return present

    async def aclose(self) -> None:
        """Release every lease still held; those messages are recovered by the next runner's probe, and the
        deliveries are lost (settling them does nothing). Stop watching the root."""
        self._watch.close()
        with self._guard:
            live = [d for d in self._held.values() if d is not None and d._fd is not None and not d._settled]
            fds = []
            for d in live:
                fds.append(d._fd)
                d._fd = None
                d.lost_reason = LOST_CLOSED
                self._held.pop(d.path, None)
        for fd in fds:
            if fd is not None:
                os.close(fd)
        for d in live:
            log.info("%r: releasing lease at shutdown, message stays in flight for recovery", d)
            d.lost.set()
        await trio.lowlevel.checkpoint()

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
            name = await trio.to_thread.run_sync(self._write_message, qdir, body)
            self._watch.changed(queue)
            return name
        finally:
            if owned:
                lock.unlink(missing_ok=True)

    def _start_sync(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise ConfigError(f"queue root (--queue-root) {self.root} is not a directory") from None
        except OSError as exc:
            raise ConfigError(f"queue root (--queue-root) {self.root} cannot be created: "
                              f"{exc.strerror or exc}") from None
        if not self.root.is_dir():
            raise ConfigError(f"queue root (--queue-root) {self.root} is not a directory")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise ConfigError(f"queue root (--queue-root) {self.root} is not writable: messages could not "
                              "be claimed")

    # -- claim ------------------------------------------------------------------------------------------

    def _receive_sync(self, queue: str) -> tuple[LocalDelivery | None, bool]:
        """The claimed delivery, and whether the queue was idle: no message file at all and nothing of
        another runner in flight (so nothing can turn up without a change event)."""
        others_in_flight = self._recover_queue(queue)
        qdir = self.root / queue
        if self._lock_is_fresh(qdir / LOCK_NAME):
            return None, False
        try:
            files = _message_files(qdir)
        except (FileNotFoundError, NotADirectoryError):
            return None, not others_in_flight
        candidates = [(st.st_mtime_ns, name, _identity(st)) for name, st in files]
        self._forget_others(queue, [name for _, name, _ in candidates])
        if not candidates:
            return None, not others_in_flight
        for mtime_ns, name, ident in sorted(candidates):
            age = time.time() - mtime_ns / 1e9
            if age < self.settle_after:
                break  # sorted by age: every later file is younger still
            if age < self.malformed_after and self._known_unfinished(queue, name, ident):
                continue  # unchanged since it was last found unfinished: not worth reading again
            try:
                delivery = self._try_claim(queue, name)
            except Exception as exc:  # one bad file must never hold up the rest of the queue
                self._report_once(queue, name, ident, exc)
                continue
            if delivery is not None:
                return delivery, False
        return None, False

    def _probe_sync(self, queues: list[str]) -> dict[str, float]:
        """For each of ``queues`` holding message files, the age (s) of the newest (by ctime, which a rename
        into the queue updates too): the watcher's check that no file arrived unannounced."""
        now = time.time()
        found: dict[str, float] = {}
        for queue in queues:
            try:
                files = _message_files(self.root / queue)
            except OSError:
                continue
            if files:
                found[queue] = min(now - max(st.st_ctime, st.st_mtime) for _, st in files)
        return found

    def _try_claim(self, queue: str, name: str) -> LocalDelivery | None:
        src = str(self.root / queue / name)
        try:
            fd = os.open(src, _OPEN_FLAGS)
        except FileNotFoundError:  # another runner or the client took it first
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # replaced by a symlink: not a message
                return None
            raise
        dst = str(self.root / INFLIGHT / queue / f"{name}~{self._token}")
        delivery = None
        try:
            if not (_try_lock(fd) and _same_file(fd, src)):
                return None
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # replaced by a directory or a device since the listing
                return None
            body = self._settled_body(queue, name, fd, st)
            if body is None:
                return None
            attempt = self._read_attempts(queue, name) + 1  # before the rename: nothing may fail after it
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with self._guard:
                self._held[dst] = None
            try:
                os.rename(src, dst)
            except BaseException:
                self._forget_path(dst)
                raise
            delivery = LocalDelivery(self, queue, name, dst, fd, body, attempt, st)
            with self._guard:
                self._held[dst] = delivery
        except FileNotFoundError:  # another runner or the client took it first
            return None
        finally:
            if delivery is None:
                os.close(fd)
        self._forget(queue, name)
        log.debug("claimed %s/%s as %s (attempt %d)", queue, name, dst, delivery.attempt)
        return delivery

    def _settled_body(self, queue: str, name: str, fd: int, st: os.stat_result) -> bytes | None:
        """The body of a file ready to be taken (settled, and complete JSON or too old to wait for), else
        None. An unfinished file is remembered by identity so that it is not read again until it changes."""
        age = time.time() - st.st_mtime
        if age < self.settle_after:
            return None
        ident = _identity(st)
        if age >= self.malformed_after:
            if self._known_unfinished(queue, name, ident):
                log.info("%s/%s is still not complete JSON after %.0f s: taking it to be set aside",
                         queue, name, age)
            return _read_fd(fd)
        if self._known_unfinished(queue, name, ident):
            return None
        body = _read_fd(fd) if _may_end_json(fd, st.st_size) else None
        if body is None or _is_unfinished_json(body):
            log.debug("%s/%s is not complete JSON yet (%d bytes); waiting for it to change", queue, name,
                      st.st_size)
            self._remember_unfinished(queue, name, ident)
            return None
        return body

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

    def _recover_queue(self, queue: str) -> int:
        """Return dead runners' messages to ``queue``; the count of in-flight files left to live runners."""
        idir = self.root / INFLIGHT / queue
        others = 0
        for entry in self._listdir(idir):
            path = str(idir / entry)
            with self._guard:
                if path in self._held:
                    continue
            try:
                if not self._recover_one(queue, entry, path):
                    others += 1
            except Exception as exc:  # one stuck file must not stop the probe (nor the receive behind it)
                self._report_once(f"{INFLIGHT}/{queue}", entry, None, exc)
                others += 1
        return others

    def _recover_one(self, queue: str, entry: str, path: str) -> bool:
        """Recover one in-flight file if its runner is gone; False when it is still held (or in the way)."""
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        try:
            if not (_try_lock(fd) and _same_file(fd, path)):
                return False  # its runner is alive, or someone else is recovering it right now
            name = entry.rsplit("~", 1)[0]
            handed_back = self._read_attempts(queue, name) + 1  # the interrupted run counts
            self._write_attempts(queue, name, handed_back)
            log.warning("recovering %s/%s from a runner that went away (%s)", queue, name, entry)
            self._return_or_set_aside(queue, name, path, handed_back)
            return True
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
        """Leases whose in-flight file someone else moved or deleted: their descriptors are closed at once,
        so our lock cannot keep whoever has the file now from claiming it."""
        lost = []
        with self._guard:  # held throughout, so no descriptor is closed (and reused) under our feet
            for d in list(self._held.values()):
                if d is None or d._fd is None or d._settled or _same_file(d._fd, d.path):
                    continue
                fd, d._fd = d._fd, None
                d.lost_reason = LOST_MOVED
                self._held.pop(d.path, None)
                os.close(fd)
                lost.append(d)
        return lost

    @staticmethod
    def _mark_lost(lost: list[LocalDelivery]) -> None:
        for d in lost:
            log.error("%r: in-flight file %s disappeared; the claim is lost", d, d.path)
            d.lost.set()

    # -- per-file memory ----------------------------------------------------------------------------------

    def _known_unfinished(self, queue: str, name: str, ident: Identity) -> bool:
        with self._memo_lock:
            return self._unfinished.get((queue, name)) == ident

    def _remember_unfinished(self, queue: str, name: str, ident: Identity) -> None:
        with self._memo_lock:
            self._unfinished[(queue, name)] = ident
            self._unfinished.move_to_end((queue, name))
            while len(self._unfinished) > _MEMO_MAX:
                self._unfinished.popitem(last=False)

    def _report_once(self, queue: str, name: str, ident: Identity | None, exc: Exception) -> None:
        """Log why a file was skipped, once per file and problem (again only if the file or problem
        changes): a file that fails on every poll must not flood the log."""
        what = f"{type(exc).__name__}: {exc}"
        with self._memo_lock:
            repeated = self._reported.get((queue, name)) == (ident, what)
            self._reported[(queue, name)] = (ident, what)
            self._reported.move_to_end((queue, name))
            while len(self._reported) > _MEMO_MAX:
                self._reported.popitem(last=False)
        if repeated:
            log.debug("%s/%s skipped again: %s", queue, name, what)
            return
        log.warning("%s/%s skipped: it cannot be checked or claimed (%s); the rest of the queue is served, "
                    "and this file is tried again on every poll", queue, name, what,
                    exc_info=not isinstance(exc, OSError))

    def _forget(self, queue: str, name: str) -> None:
        with self._memo_lock:
            self._unfinished.pop((queue, name), None)
            self._reported.pop((queue, name), None)

    def _forget_others(self, queue: str, names: Iterable[str]) -> None:
        """Drop what is remembered about files of ``queue`` that are no longer in it."""
        present = set(names)
        with self._memo_lock:
            for memo in (self._unfinished, self._reported):
                for key in [k for k in memo if k[0] == queue and k[1] not in present]:
                    del memo[key]

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
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
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


if TYPE_CHECKING:  # mypy proves that this backend honours the protocol; nothing runs

    def _honours_the_protocol(backend: LocalDirQueue,
                              delivery: LocalDelivery) -> tuple[QueueBackend, Delivery]:
        return backend, delivery
