"""AWS SQS backend: the StudioML client's ``sqs_*`` queues, in every account of ``--sqs-certs``.

Why it is built this way:

* Accounts (:mod:`studio_runner.queues.sqs_accounts`): the certs directory is read again at every
  ``discover`` (the supervisor rescans every ``--rescan-interval``), so an account folder added or removed at
  run time starts or stops its queues without a restart. A folder that cannot be used, or whose ListQueues
  fails, is skipped with a warning (logged again only when the problem changes); the others are served.
  Removing an account stops new work from its queues; experiments already running from them go on
  (``exists`` still asks the removed account) and settle with its clients.
* Queue names are the bare SQS names (the last segment of the queue URL), because ``--queue-match`` and the
  rest of the runner know queues by name. A name seen in two accounts is served from the first account in
  label order only, with a warning naming both labels. Names starting with ``studio-runner-`` are the
  runner's own (set-aside and continuation queues) and are never served.
* boto3 is blocking: every call runs in a worker thread, bounded by ``--sqs-timeout``. Calls that claim or
  settle a message are never abandoned on cancellation (a received message must not vanish into an
  abandoned thread); listings are.
* receive: ReceiveMessage (one message, no wait) with visibility ``visibility_timeout`` (45 s); while the
  experiment runs the supervisor calls ``keep_alive`` every 15 s, which sets the visibility to 45 s from now.
  A failed renewal is retried at the next call; once the visibility has run out the claim is marked lost.
* Attempts: SQS messages are immutable and count their receives (``ApproximateReceiveCount``). ``attempt``
  is the message attribute ``studio-runner-attempt`` (1 when absent) plus the receives beyond the first.
  nack = ChangeMessageVisibility 0, so the next receive counts one more (and a crashed runner's message,
  coming back when its visibility runs out, is counted the same way). release cannot un-count a receive,
  so it re-publishes the body with the current attempt in the attribute and deletes the original; the
  attribute ``studio-runner-origin-id`` keeps ``message_id`` stable across copies.
* Waiting (``wait_for_work``): one long-poll thread per waited-for queue (WaitTimeSeconds ``long_poll``,
  20 s), kept while the supervisor waits and ``watch_linger`` (2 s) after. A message it gets (with a short
  visibility) wakes the wait and is kept for the queue's next ``receive``, one per queue at most; if nobody
  takes it within ``watch_hold`` (2 s) it is given back like ``release`` (re-published, not counted). A
  poll thread cannot be interrupted inside its long poll: ``aclose`` does not wait for it, and a message it
  gets after the close is given back at once (if the process exits first, that message comes back after
  ``poll_visibility``, 30 s, counted as an attempt). An idle queue costs one request per ``long_poll``.
* ack = DeleteMessage (after the final upload); set aside = SendMessage to ``studio-runner-set-aside`` in
  the same account (created on first use, 14-day retention) with the reason and origin queue as message
  attributes, then DeleteMessage. The name cannot match the default ``--queue-match``.
* Response queues: ``<queue>_response`` in the queue's account; reports are sent with SendMessage.

The 12-hour cap. SQS refuses to keep a received message invisible for more than 12 hours
(``visibility_cap``; counted from the receive on AWS, from the send on moto: the earlier is used). The Go
runner deletes the message at 11 h 50 min and keeps running, so a crash after
that loses the work. Here, when a renewal would reach ``visibility_cap - cap_margin`` (11 h 50 min), the
running delivery is *continued*: the runner creates a private queue ``studio-runner-hold-<random>`` in the
same account, sends the body there (attributes: attempt, origin queue and id, the time), deletes the
original, receives the copy from the private queue (nobody else reads it) and keeps renewing that receipt
for the next 11 h 50 min, and so on. Settling a continued delivery works on the copy: ack deletes it; nack,
release and a close send the body back to the origin queue (nack and close with the attempt counted) and
delete it; the private queue is deleted with its message. Every runner's ``discover`` sweeps the
``studio-runner-hold-`` queues of its accounts: a copy that is visible there — its holder stopped renewing,
i.e. died — and was sent more than ``hold_grace`` (5 min) ago is sent back to its origin queue counted as
an attempt (set aside when the origin queue is gone) and its private queue deleted. So a crash after the
cap loses nothing (the message is back in its queue within ``hold_grace`` + the visibility timeout), and
while the holder lives its copy stays invisible, so no one else runs it.

Residual risks, stated plainly: (1) a runner that dies in the instant between sending the copy and deleting
the original leaves both, so the work may run twice (at least once, never lost); (2) if the holder cannot
reach SQS for longer than ``hold_grace`` right after sending the copy, or longer than the visibility timeout
afterwards, a sweeper returns the copy to its queue while the first run goes on — the claim is then marked
lost (results uploaded, ack skipped), exactly as for an ordinary SQS message whose renewals fail; (3) when
the continuation itself cannot be made (no permission to create queues, SQS unreachable for the last
``cap_margin``), the message becomes visible at the cap and may run again elsewhere; the runner warns.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from studio_runner.errors import ConfigError
from studio_runner.queues.sqs_accounts import (
    ATTEMPT_ATTR,
    BAD_RECEIPT,
    CONTINUED_AT_ATTR,
    GONE,
    HOLD_PREFIX,
    ORIGIN_ID_ATTR,
    ORIGIN_QUEUE_ATTR,
    OWN_PREFIX,
    REASON_ATTR,
    RETENTION,
    SET_ASIDE_QUEUE,
    Account,
    AccountFiles,
    as_int,
    attempt_of,
    error_code,
    message_attributes,
    receive,
    scan_certs,
    send,
)
from studio_runner.redact import scrub

if TYPE_CHECKING:
    from studio_runner.queues.base import Delivery, QueueBackend, Responder

log = logging.getLogger(__name__)

@dataclass
class _Polled:
    """A message a long-poll thread got for its queue's next receive()."""

    message: dict[str, Any]
    account: Account
    url: str
    received_at: float
    taken: threading.Event = field(default_factory=threading.Event)


class SqsDelivery:
    """One message claimed from an SQS queue; see :class:`studio_runner.queues.base.Delivery`."""

    def __init__(self, backend: SqsQueue, queue: str, account: Account, url: str, message: dict[str, Any],
                 received_at: float) -> None:
        self._backend = backend
        self._account = account
        self._origin_url = url
        self._url = url
        """Where the message lives now: the origin queue, or the private queue of a continuation."""
        self._handle: str | None = message["ReceiptHandle"]
        """None while a continuation copy is sent but not yet received back from its private queue."""
        self._copy_sent_at = 0.0
        self._cap_at = _cap_at(message, received_at, backend.visibility_cap)
        self._valid_until = received_at + backend.visibility_timeout
        self._lock = trio.Lock()
        self._settled = False
        self._closed = False
        attrs = message_attributes(message)
        self.queue = queue
        self.message_id: str = attrs.get(ORIGIN_ID_ATTR) or str(message["MessageId"])
        self.body: bytes = str(message["Body"]).encode("utf-8")
        self.attempt: int = attempt_of(message)
        self.lost = trio.Event()
        self.lost_reason: str | None = None
        self.continuations = 0
        """How often the message was moved to a private queue to outlive the visibility cap."""

    @property
    def continued(self) -> bool:
        return self._url != self._origin_url

    def _lose(self, reason: str) -> None:
        if not self.lost.is_set():
            self.lost_reason = reason
            self.lost.set()
            self._backend._unsettled.discard(self)

    async def _call(self, fn: Any, *args: Any) -> Any:
        with trio.CancelScope(shield=True):
            return await trio.to_thread.run_sync(partial(fn, *args))

    def _copy_attributes(self, attempt: int) -> dict[str, object]:
        return {ATTEMPT_ATTR: attempt, ORIGIN_ID_ATTR: self.message_id}

    # -- settling -------------------------------------------------------------------------------------------
    async def ack(self) -> None:
        """Delete the message for good (after the final upload)."""
        await self._settle("ack", self._delete)

    async def nack(self) -> None:
        """Make it visible again at once; its next receive counts one more attempt."""
        await self._settle("nack", self._give_back_counted)

    async def release(self) -> None:
        """Re-publish the body with the current attempt, then delete this copy (SQS would count a plain
        visibility reset as another receive)."""
        await self._settle("release", lambda: self._move(self._origin_url, self.attempt))

    async def set_aside(self, reason: str) -> None:
        """Send the body to ``studio-runner-set-aside`` with ``reason``, then delete this copy."""
        await self._settle("set_aside", partial(self._set_aside, reason))

    async def _settle(self, op: str, action: Any) -> None:
        async with self._lock:
            if self.lost.is_set() or self._closed:
                why = self.lost_reason if self.lost.is_set() else "the backend was closed"
                log.info("%s of message %s of queue %s skipped: %s (at-least-once)", op, self.message_id,
                         self.queue, why)
                await trio.lowlevel.checkpoint()
                return
            if self._settled:
                log.warning("%s of message %s ignored: it was already settled", op, self.message_id)
                await trio.lowlevel.checkpoint()
                return
            self._settled = True
            self._backend._unsettled.discard(self)
            await self._call(action)

    def _drop_hold(self) -> None:
        if self.continued:
            try:
                self._account.client.delete_queue(QueueUrl=self._url)
            except Exception as exc:  # a sweeper removes an empty private queue later
                log.debug("deleting continuation queue %s: %s", self._url, exc)

    def _delete(self) -> None:
        if self._handle is not None:  # else: a continuation copy not received yet goes with its queue
            self._account.client.delete_message(QueueUrl=self._url, ReceiptHandle=self._handle)
        self._drop_hold()

    def _give_back_counted(self) -> None:
        if self.continued:
            self._move(self._origin_url, self.attempt + 1)
        else:
            self._account.client.change_message_visibility(QueueUrl=self._url, ReceiptHandle=self._handle,
                                                           VisibilityTimeout=0)

    def _move(self, url: str, attempt: int, extra: dict[str, object] | None = None) -> None:
        send(self._account.client, url, self.body.decode("utf-8"), {**self._copy_attributes(attempt),
                                                                      **(extra or {})})
        self._delete()

    def _set_aside(self, reason: str) -> None:
        url = self._account.set_aside_url(self._backend.set_aside_queue)
        self._move(url, self.attempt, {REASON_ATTR: scrub(reason)[:4000], ORIGIN_QUEUE_ATTR: self.queue})

    # -- keeping the claim ----------------------------------------------------------------------------------
    async def keep_alive(self) -> None:
        """Renew the visibility; near the visibility cap, continue the message in a private queue."""
        async with self._lock:
            if self._settled or self._closed or self.lost.is_set():
                await trio.lowlevel.checkpoint()
                return
            backend = self._backend
            now = time.monotonic()
            if now > self._valid_until:  # too late: someone may have received it meanwhile
                self._lose("its visibility timeout ran out before it was renewed: the message may have gone "
                           "to another runner")
                return
            try:
                if self._handle is None:
                    await self._take_copy()
                elif now + backend.visibility_timeout >= self._cap_at - backend.cap_margin:
                    await self._continue(now, self._cap_at)
                else:
                    await self._extend(backend.visibility_timeout)
            except Exception as exc:
                if error_code(exc) in BAD_RECEIPT:
                    self._lose(f"SQS no longer knows this receipt ({error_code(exc)}): the message went "
                               "back to its queue")
                elif time.monotonic() > self._valid_until:
                    self._lose("the visibility timeout ran out before it could be renewed: the message is "
                               "visible in its queue again")
                raise

    async def _extend(self, seconds: float) -> None:
        started = time.monotonic()
        await self._call(partial(self._account.client.change_message_visibility, QueueUrl=self._url,
                                 ReceiptHandle=self._handle, VisibilityTimeout=int(seconds)))
        self._valid_until = started + int(seconds)

    async def _continue(self, now: float, cap_at: float) -> None:
        try:
            url = await self._call(self._send_continuation)
        except Exception as exc:
            left = cap_at - now - 1
            log.warning("message %s of queue %s: could not continue it past the SQS visibility cap (%s); "
                        "%s", self.message_id, self.queue, scrub(str(exc)) or type(exc).__name__,
                        "retrying at the next renewal" if left > 0 else
                        "it becomes visible at the cap and may run again elsewhere")
            if left > 0:
                await self._extend(min(self._backend.visibility_timeout, left))
            return
        self._url, self._handle, self._copy_sent_at = url, None, time.monotonic()
        self._valid_until = float("inf")  # the copy is nobody's until received: a sweeper waits hold_grace
        self.continuations += 1
        await self._take_copy()

    def _send_continuation(self) -> str:
        """Create a private queue, send the copy there, delete the current message (module docstring); on
        failure the private queue goes, with the copy if it was sent. Returns the private queue's URL."""
        client = self._account.client
        attributes = {"VisibilityTimeout": str(int(self._backend.visibility_timeout)),
                      "MessageRetentionPeriod": RETENTION}
        url = client.create_queue(QueueName=f"{HOLD_PREFIX}{uuid.uuid4().hex}",
                                  Attributes=attributes)["QueueUrl"]
        try:
            send(client, url, self.body.decode("utf-8"), {
                **self._copy_attributes(self.attempt), ORIGIN_QUEUE_ATTR: self.queue,
                CONTINUED_AT_ATTR: f"{time.time():.3f}"})
            self._delete()  # the current message (and its private queue, when it is a copy already)
        except Exception:
            try:
                client.delete_queue(QueueUrl=url)
            except Exception as exc:  # residual risk (1) of the module docstring: a sweeper returns it
                log.warning("could not remove continuation queue %s after a failure: %s", url, exc)
            raise
        return url

    async def _take_copy(self) -> None:
        """Receive the continuation copy from its private queue (nobody else takes it before hold_grace)."""
        backend = self._backend
        started = time.monotonic()
        got = await self._call(receive, self._account.client, self._url, backend.visibility_timeout, 1)
        if got:
            self._handle = got[0]["ReceiptHandle"]
            self._cap_at = started + backend.visibility_cap
            self._valid_until = started + backend.visibility_timeout
            log.info("message %s of queue %s continued in %s to outlive SQS's visibility cap",
                     self.message_id, self.queue, self._url.rsplit("/", 1)[-1])
        elif time.monotonic() - self._copy_sent_at > backend.hold_grace / 2:
            self._lose("its continuation copy was not received back in time: a sweeper may return it to its "
                       "queue")

    def _close(self) -> None:
        """The backend closes: give the message back counted, like a runner that died (in a thread)."""
        self._closed = True
        try:
            self._give_back_counted()
        except Exception as exc:  # it comes back by itself when its visibility runs out
            log.info("message %s of queue %s goes back when its visibility runs out (%s)", self.message_id,
                     self.queue, exc)


def _cap_at(message: dict[str, Any], received_at: float, cap: float) -> float:
    """When the visibility cap of a message received at ``received_at`` (monotonic) is reached. SQS counts
    it from the receive; some SQS-compatible servers (moto) from the send: the earlier of the two."""
    sent_ms = as_int((message.get("Attributes") or {}).get("SentTimestamp"), 0)
    if not sent_ms:
        return received_at + cap
    age = max(time.time() - sent_ms / 1000, 0.0)
    return min(received_at + cap, received_at - age + cap)


class SqsQueue:
    """Serves the SQS queues of every account under ``--sqs-certs``; see the module docstring."""

    kind = "sqs"

    def __init__(self, certs_dir: Path | str, *, timeout: float = 15.0, visibility_timeout: float = 45.0,
                 visibility_cap: float = 12 * 3600, cap_margin: float = 600, hold_grace: float = 300,
                 long_poll: float = 20, watch_hold: float = 2.0, watch_linger: float = 2.0,
                 poll_visibility: float = 30, set_aside_queue: str = SET_ASIDE_QUEUE) -> None:
        if not 1 <= visibility_timeout <= 43200:
            raise ConfigError("the SQS visibility timeout must be between 1 s and 12 h")
        self.certs_dir = Path(certs_dir)
        self.location = f"sqs-certs {self.certs_dir}"
        self.timeout = float(timeout)
        self.visibility_timeout = float(visibility_timeout)
        self.visibility_cap = float(visibility_cap)
        self.cap_margin = float(cap_margin)
        self.hold_grace = float(hold_grace)
        self.long_poll = max(1.0, min(float(long_poll), 20.0))
        self.watch_hold = float(watch_hold)
        self.watch_linger = float(watch_linger)
        self.poll_visibility = float(max(poll_visibility, watch_hold + 5))
        self.set_aside_queue = set_aside_queue
        self._accounts: dict[str, Account] = {}
        self._problems: dict[str, str] = {}
        self._queues: dict[str, tuple[Account, str]] = {}
        self._known: dict[str, tuple[Account, str]] = {}
        """Every queue ever served, with its account, even one removed since: ``exists`` keeps answering for
        the experiments still running from it (removing an account stops new work, it aborts nothing)."""
        self._collisions: set[tuple[str, str, str]] = set()
        self._unsettled: set[SqsDelivery] = set()
        self._last_refresh = float("-inf")
        self._refreshing = trio.Lock()
        self._started = False
        self._closed = False
        # shared with the long-poll threads, under _lock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._held: dict[str, _Polled] = {}
        self._pollers: dict[str, threading.Thread] = {}
        self._waiting: dict[str, int] = {}
        self._wanted_until: dict[str, float] = {}
        self._waiters: list[tuple[frozenset[str], trio.Event]] = []
        self._token: trio.lowlevel.TrioToken | None = None

    async def __aenter__(self) -> SqsQueue:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def deadline_warning(self, seconds: float) -> str | None:
        """None: a message outlives SQS's 12-hour visibility cap by continuation (module docstring)."""
        return None

    async def start(self) -> None:
        """Check the certs directory and list every account once, so mistakes show at start-up."""
        if self._closed:
            raise RuntimeError("SqsQueue is closed")
        if self._started:
            await trio.lowlevel.checkpoint()
            return
        if not self.certs_dir.is_dir():
            raise ConfigError(f"--sqs-certs {self.certs_dir} is not a directory")
        self._started = True
        await self._refresh(sweep=False)
        log.info("SQS: %d account(s) under %s: %s", len(self._accounts), self.certs_dir,
                 ", ".join(sorted(self._accounts)) or "none yet")

    # -- accounts and queues --------------------------------------------------------------------------------
    async def discover(self) -> list[str]:
        """The queues of every usable account (bare names); also returns to their queues the continued
        messages whose runner died (module docstring)."""
        await self.start()
        return await self._refresh(sweep=True)

    async def _refresh(self, sweep: bool) -> list[str]:
        async with self._refreshing:
            files, problems = await _in_thread(scan_certs, self.certs_dir)
            for label, problem in problems.items():
                if self._problems.get(label) != problem:
                    log.warning("%s; skipped until it is fixed", problem)
                self._problems[label] = problem
            await self._update_accounts(files)
            listings: dict[str, dict[str, str]] = {}
            for label, account in sorted(self._accounts.items()):
                try:
                    listings[label] = await _in_thread(account.list_queues)
                except Exception as exc:
                    problem = f"SQS account {label}: listing its queues failed: {_describe(exc)}"
                    if self._problems.get(label) != problem:
                        log.warning("%s; its queues are not served until it lists again", problem)
                    self._problems[label] = problem
                    continue
                if self._problems.pop(label, None) is not None:
                    log.info("SQS account %s lists its queues again", label)
                if sweep:
                    await _in_thread(account.sweep_hold_queues, listings[label], self.hold_grace,
                                     self.set_aside_queue)
            for label in list(self._problems):
                if label not in problems and label not in self._accounts:
                    del self._problems[label]
            self._queues = self._name_map(listings)
            self._known.update(self._queues)
            self._last_refresh = time.monotonic()
            return sorted(self._queues)

    async def _update_accounts(self, files: dict[str, AccountFiles]) -> None:
        for label, account_files in files.items():
            known = self._accounts.get(label)
            if known is not None and known.files.fingerprint == account_files.fingerprint:
                continue
            self._accounts[label] = await trio.to_thread.run_sync(Account, account_files, self.timeout,
                                                                  self.long_poll, abandon_on_cancel=True)
            where = f", endpoint {scrub(account_files.endpoint_url)}" if account_files.endpoint_url else ""
            log.info("SQS account %s %s (region %s%s)", label, "changed" if known else "added",
                     account_files.region, where)
        for label in sorted(set(self._accounts) - set(files)):
            del self._accounts[label]  # deliveries in progress keep their own reference to it
            log.info("SQS account %s removed: its queues are no longer served", label)

    def _name_map(self, listings: dict[str, dict[str, str]]) -> dict[str, tuple[Account, str]]:
        queues: dict[str, tuple[Account, str]] = {}
        for label in sorted(listings):
            for name, url in sorted(listings[label].items()):
                if name.startswith(OWN_PREFIX):
                    continue
                if name in queues:
                    first = queues[name][0].label
                    if (name, first, label) not in self._collisions:
                        self._collisions.add((name, first, label))
                        log.warning("SQS queue %s exists in accounts %s and %s: served from %s only (queue "
                                    "names must be unique across accounts)", name, first, label, first)
                    continue
                queues[name] = (self._accounts[label], url)
        return queues

    async def _locate(self, queue: str) -> tuple[Account, str] | None:
        found = self._queues.get(queue)
        if found is None and time.monotonic() - self._last_refresh > 1.0:
            await self._refresh(sweep=False)
            found = self._queues.get(queue)
        return found

    async def exists(self, queue: str) -> bool:
        """Whether ``queue`` is still listed in its account (any account for one not seen yet). Raises
        while SQS cannot be reached: an error is not a deletion."""
        await self.start()
        located = self._queues.get(queue) or self._known.get(queue)
        accounts = [located[0]] if located else list(self._accounts.values())
        for account in accounts:
            names = await trio.to_thread.run_sync(account.list_queues, queue, abandon_on_cancel=True)
            if queue in names:
                return True
        return False

    # -- receiving ------------------------------------------------------------------------------------------
    async def receive(self, queue: str) -> SqsDelivery | None:
        """Claim one message of ``queue``: the one a long poll holds for it, else ReceiveMessage (no wait).
        None when empty, unknown or deleted."""
        await self.start()
        if self._closed:
            return None
        with self._lock:
            polled = self._held.pop(queue, None)
            if polled is not None:
                polled.taken.set()
        if polled is not None:
            delivery = SqsDelivery(self, queue, polled.account, polled.url, polled.message,
                                   polled.received_at)
            try:
                await delivery._extend(self.visibility_timeout)
            except Exception as exc:
                if error_code(exc) in BAD_RECEIPT:
                    return None  # its short poll visibility ran out: it is in the queue again
                log.warning("extending message %s of queue %s failed: %s", delivery.message_id, queue,
                            _describe(exc))
            self._unsettled.add(delivery)
            return delivery
        located = await self._locate(queue)
        if located is None:
            return None
        account, url = located
        started = time.monotonic()
        try:
            messages = await trio.to_thread.run_sync(receive, account.client, url, self.visibility_timeout)
        except Exception as exc:
            if error_code(exc) in GONE:
                if self._queues.get(queue) == located:
                    del self._queues[queue]
                return None
            raise
        if not messages:
            return None
        delivery = SqsDelivery(self, queue, account, url, messages[0], started)
        self._unsettled.add(delivery)
        return delivery

    async def wait_for_work(self, queues: Sequence[str], timeout: float) -> None:
        """Return when a long poll on one of ``queues`` got a message (kept for its receive()), or after
        ``timeout``."""
        await self.start()
        self._token = trio.lowlevel.current_trio_token()
        watched = frozenset(queues)
        entry = (watched, trio.Event())
        with trio.move_on_after(timeout):
            with self._lock:
                ready = any(q in self._held for q in watched)
                if not ready:
                    self._waiters.append(entry)
                    for q in watched:
                        self._waiting[q] = self._waiting.get(q, 0) + 1
            if ready:
                await trio.lowlevel.checkpoint()
                return
            try:
                for q in watched:
                    located = self._queues.get(q)
                    if located is not None:
                        self._ensure_poller(q, *located)
                await entry[1].wait()
            finally:
                with self._lock:
                    self._waiters.remove(entry)
                    until = time.monotonic() + self.watch_linger
                    for q in watched:
                        self._waiting[q] -= 1
                        self._wanted_until[q] = until

    def _ensure_poller(self, queue: str, account: Account, url: str) -> None:
        with self._lock:
            if queue in self._pollers or self._closed:
                return
            thread = threading.Thread(target=self._poll_loop, args=(queue, account, url),
                                      name=f"sqs-poll-{queue}", daemon=True)
            self._pollers[queue] = thread
        thread.start()

    def _poll_loop(self, queue: str, account: Account, url: str) -> None:
        """One queue's long poll, while someone waits on it (a thread; see the module docstring)."""
        gave_back = False
        me = threading.current_thread()
        try:
            while True:
                with self._lock:
                    waited = self._waiting.get(queue, 0) > 0
                    lingering = not gave_back and time.monotonic() < self._wanted_until.get(queue, 0.0)
                    if self._closed or not (waited or lingering):
                        self._pollers.pop(queue, None)
                        return
                try:
                    messages = receive(account.poll_client, url, self.poll_visibility, wait=self.long_poll)
                except Exception as exc:
                    if error_code(exc) in GONE:
                        with self._lock:
                            self._pollers.pop(queue, None)
                        return
                    log.debug("long poll of SQS queue %s failed: %s", queue, exc)
                    self._stop.wait(1.0)
                    continue
                if messages:
                    polled = _Polled(messages[0], account, url, time.monotonic())
                    gave_back = self._hold(queue, polled) or gave_back
        finally:
            with self._lock:
                if self._pollers.get(queue) is me:
                    del self._pollers[queue]

    def _hold(self, queue: str, polled: _Polled) -> bool:
        """Keep ``polled`` for the queue's next receive(); give it back if not taken soon. True if given
        back."""
        with self._lock:
            closed = self._closed
            if not closed:
                self._held[queue] = polled
        if not closed:
            token = self._token
            if token is not None:
                try:
                    token.run_sync_soon(self._wake, queue)
                except trio.RunFinishedError:
                    pass
            if polled.taken.wait(self.watch_hold):
                return False
            with self._lock:
                if self._held.get(queue) is not polled:
                    return False
                del self._held[queue]
        self._give_back_polled(polled)
        return True

    def _wake(self, queue: str) -> None:
        for watched, event in self._waiters:
            if queue in watched:
                event.set()

    def _give_back_polled(self, polled: _Polled) -> None:
        """Re-publish a message nobody took, with the attempt it had, and delete it (uncounted)."""
        message, client = polled.message, polled.account.client
        copy = {ATTEMPT_ATTR: attempt_of(message),
                ORIGIN_ID_ATTR: message_attributes(message).get(ORIGIN_ID_ATTR) or message["MessageId"]}
        try:
            send(client, polled.url, str(message["Body"]), copy)
            client.delete_message(QueueUrl=polled.url, ReceiptHandle=message["ReceiptHandle"])
        except Exception as exc:  # it comes back by itself when its short visibility runs out (counted)
            log.info("giving back an untaken message of %s failed: %s", polled.url.rsplit("/", 1)[-1], exc)

    # -- response queues ------------------------------------------------------------------------------------
    async def response_queue_exists(self, queue: str) -> bool:
        """Whether ``<queue>_response`` is listed in ``queue``'s account."""
        return await self._response_url(queue) is not None

    async def publish_response(self, queue: str, body: bytes) -> None:
        """SendMessage of one report to ``<queue>_response``; raises when it cannot be sent."""
        found = await self._response_url(queue)
        if found is None:
            raise LookupError(f"no SQS queue {queue}_response")
        account, url = found
        await trio.to_thread.run_sync(partial(send, account.client, url, body.decode("utf-8"), {}))

    async def _response_url(self, queue: str) -> tuple[Account, str] | None:
        await self.start()
        located = await self._locate(queue)
        if located is None:
            return None
        name = f"{queue}_response"
        names = await trio.to_thread.run_sync(located[0].list_queues, name, abandon_on_cancel=True)
        return (located[0], names[name]) if name in names else None

    # -- closing --------------------------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Give back what we hold (unsettled deliveries counted, like a crash; untaken long-poll messages
        uncounted). Long polls in flight are not waited for: they give back what they still get."""
        with self._lock:
            self._closed = True
            held = list(self._held.values())
            self._held.clear()
        self._stop.set()
        deliveries = [d for d in self._unsettled if not d._settled and not d.lost.is_set()]
        self._unsettled.clear()
        with trio.CancelScope(shield=True):
            for polled in held:
                polled.taken.set()
                await trio.to_thread.run_sync(self._give_back_polled, polled)
            for delivery in deliveries:
                await trio.to_thread.run_sync(delivery._close)


async def _in_thread(fn: Any, *args: Any) -> Any:
    """A read-only call: safe to abandon when cancelled."""
    return await trio.to_thread.run_sync(partial(fn, *args), abandon_on_cancel=True)


def _describe(exc: BaseException) -> str:
    return scrub(str(exc)) or type(exc).__name__

__all__ = ["ATTEMPT_ATTR", "HOLD_PREFIX", "ORIGIN_ID_ATTR", "ORIGIN_QUEUE_ATTR", "REASON_ATTR",
           "SET_ASIDE_QUEUE", "SqsDelivery", "SqsQueue"]

if TYPE_CHECKING:  # mypy proves that this backend honours the protocols; nothing runs

    def _honours_the_protocol(backend: SqsQueue,
                              delivery: SqsDelivery) -> tuple[QueueBackend, Responder, Delivery]:
        return backend, backend, delivery
