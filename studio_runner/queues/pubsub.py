"""Google Cloud Pub/Sub backend: every subscription a credential can see is a queue, named by its short name.

Why it is built this way:

* Sources of credentials (seeds: ``--certs-dir``): each regular, non-hidden file in the directory is a
  service-account JSON; its ``project_id`` names the project whose subscriptions are listed and matched
  against ``--queue-match`` like queue names. Files are re-read at each ``discover()``, so a file added or
  removed at run time starts or stops new work at the next rescan (running experiments keep their claim: the
  removed credential's clients stay open until ``aclose``; a long pull begun before the removal that still
  brings a message within ``watch_window`` gives it straight back, because cutting the pull short leaves a
  message handed to the dead pull waiting out its ack deadline). Besides, ``--pubsub-project`` serves one
  project with the default credentials (``GOOGLE_APPLICATION_CREDENTIALS``). With ``PUBSUB_EMULATOR_HOST``
  set the client library talks to the emulator without credentials, so a certs-dir file needs only
  ``project_id``. The files themselves are read by :mod:`studio_runner.queues.pubsub_sources`.
* The queue name is the subscription's short name (``projects/p/subscriptions/NAME``). The same short name in
  two projects is served once, from the source listed first (``--pubsub-project``, then files by name), with
  a warning: queue names must be unique in a runner. Subscriptions ending in ``_set_aside`` are ours.
* google-cloud-pubsub's synchronous GAPIC calls run in worker threads (never the streaming-pull futures, which
  start threads of their own). ``receive`` is one pull of one message with ``return_immediately`` (the only
  way Pub/Sub answers an empty subscription at once; the real service may answer empty although a message
  waits, which the long pull of ``wait_for_work`` then picks up).
* Claims are leases: a pulled message is held for ``lease`` seconds (modify_ack_deadline right after the
  pull) and ``keep_alive`` renews it. Pub/Sub accepts a renewal or ack of an expired ack id silently, so the
  claim counts as lost once its lease passed without renewal; the settle calls then do nothing.
* ack after the final upload; nack / release give the message back at once (ack deadline 0).
* Attempts: Pub/Sub numbers deliveries (``delivery_attempt``) only on subscriptions with a dead-letter
  policy. There the attempt is that number minus the hand-backs this runner made without counting (release,
  an unclaimed ``wait_for_work`` hold): a crash or a lost lease elsewhere counts, as it should, but a release
  by *another* runner counts too (nothing tells us it was one). Without a dead-letter policy the count is
  runner-local: deliveries of that message to this runner minus its uncounted hand-backs, so a message whose
  runner died starts again at 1 elsewhere. Give such subscriptions a dead-letter policy with a generous
  ``max_delivery_attempts`` (100): the runner's own ``--retries`` decides when to give up.
* ``wait_for_work``: one pull per waited-for subscription in a thread of ours (up to ``watch_window`` s,
  restarted while the wait lasts), which returns as soon as a message arrives. The message is kept for that
  queue's next ``receive`` and given back uncounted after ``watch_hold`` (2 s) if nobody takes it.
* ``aclose`` gives back held and unsettled messages (ack deadline 0), closes the channels (which ends the long
  pulls at once; a message the service hands to a pull in that instant waits out its ack deadline) and joins
  every thread of ours.
* set_aside publishes the body (attributes kept, plus ``studio_runner_reason`` and the origin) to the topic
  ``<subscription>_set_aside`` and then acks; the topic and a subscription of the same name are created when
  missing, because Pub/Sub drops messages published to a topic nobody subscribes to. If that fails the
  message is given back rather than lost.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from studio_runner.errors import ConfigError
from studio_runner.queues.pubsub_sources import Source, gexc, scan_certs
from studio_runner.redact import scrub
from studio_runner.units import format_duration

if TYPE_CHECKING:
    from studio_runner.queues.base import Delivery, QueueBackend

log = logging.getLogger(__name__)

# receive() must answer an empty subscription at once; the flag is deprecated but still honoured.
warnings.filterwarnings("ignore", message="The return_immediately flag is deprecated",
                        category=DeprecationWarning)

SET_ASIDE_SUFFIX = "_set_aside"
REASON_ATTR = "studio_runner_reason"
ORIGIN_ATTR = "studio_runner_subscription"
MESSAGE_ID_ATTR = "studio_runner_message_id"
RETENTION_DEFAULT = 7 * 24 * 3600.0
"""Pub/Sub drops unacknowledged messages after the subscription's retention (7 days by default)."""


class PubSubDelivery:
    """One message pulled from a subscription; see :class:`studio_runner.queues.base.Delivery`."""

    def __init__(self, backend: PubSubQueue, source: Source, queue: str, received: Any, attempt: int) -> None:
        self._backend = backend
        self._source = source
        self.queue = queue
        self.ack_id: str = received.ack_id
        message = received.message
        self.message_id: str = message.attributes.get(MESSAGE_ID_ATTR) or message.message_id
        self.body: bytes = bytes(message.data)
        self.attributes: dict[str, str] = dict(message.attributes)
        self.attempt = attempt
        self.lost = trio.Event()
        self.lost_reason: str | None = None
        self.claimed_until = time.monotonic() + backend.lease
        self.settled = False

    @property
    def subscription(self) -> str:
        return self._source.path(self.queue)

    def _expired(self) -> bool:
        if not self.lost.is_set() and time.monotonic() > self.claimed_until:
            self.lost_reason = (f"lease of {format_duration(self._backend.lease)} passed without renewal: "
                                "Pub/Sub may have handed the message to another runner")
            self.lost.set()
        return self.lost.is_set()

    async def keep_alive(self) -> None:
        """Extend the ack deadline by another lease, unless the last one already ran out."""
        if self.settled or self._expired():
            await trio.lowlevel.checkpoint()
            return
        asked = time.monotonic()
        await self._backend.call(self._source.subscriber.modify_ack_deadline, subscription=self.subscription,
                                 ack_ids=[self.ack_id], ack_deadline_seconds=int(self._backend.lease))
        self.claimed_until = asked + self._backend.lease

    async def ack(self) -> None:
        """Remove the message for good."""
        await self._settle("ack", None)

    async def nack(self) -> None:
        """Give the message back at once, counting this attempt."""
        await self._settle("nack", None)

    async def release(self) -> None:
        """Give the message back at once; this runner does not count it (see the module docstring)."""
        await self._settle("release", None)

    async def set_aside(self, reason: str) -> None:
        """Publish the message to ``<subscription>_set_aside`` with the reason, then ack it."""
        await self._settle("set_aside", reason)

    async def _settle(self, op: str, reason: str | None) -> None:
        if self._expired():
            log.info("%s of message %s of subscription %s skipped: its claim was lost (%s; at-least-once)",
                     op, self.message_id, self.queue, self.lost_reason)
            await trio.lowlevel.checkpoint()
            return
        if self.settled:
            log.warning("%s of message %s ignored: it was already settled", op, self.message_id)
            await trio.lowlevel.checkpoint()
            return
        self.settled = True
        await self._backend.settle(self, self._source, op, reason)


class PubSubQueue:
    """Serves the Pub/Sub subscriptions of one or more projects; see the module docstring for the design."""

    kind = "pubsub"

    def __init__(self, *, certs_dir: Path | None = None, project: str = "", lease: float = 30.0,
                 watch_window: float = 10.0, watch_hold: float = 2.0, call_timeout: float = 15.0,
                 set_aside_suffix: str = SET_ASIDE_SUFFIX) -> None:
        if not certs_dir and not project:
            raise ConfigError("Pub/Sub needs --certs-dir or --pubsub-project")
        if not 10 <= lease <= 600:
            raise ConfigError("Pub/Sub ack deadlines must be 10 s to 10 min")
        self.certs_dir = Path(certs_dir) if certs_dir else None
        self.project = project
        self.lease = float(lease)
        self.watch_window = watch_window
        self.watch_hold = watch_hold
        self.call_timeout = call_timeout
        self.set_aside_suffix = set_aside_suffix
        self.emulator = os.environ.get("PUBSUB_EMULATOR_HOST", "")
        where = f"emulator {self.emulator}" if self.emulator else "pubsub.googleapis.com"
        what = f"certs {self.certs_dir}" if self.certs_dir else f"project {project}"
        self.location = f"pubsub {where} {what}"
        self._sources: dict[str, Source] = {}
        self._retired: list[Source] = []
        self._broken: dict[str, tuple[float, int]] = {}
        self._owner: dict[str, Source] = {}
        self._last_owner: dict[str, Source] = {}
        self._duplicates_warned: set[str] = set()
        self._seen: OrderedDict[str, list[int]] = OrderedDict()  # message id -> [deliveries, uncounted]
        self._outstanding: set[PubSubDelivery] = set()
        self._limiter = trio.CapacityLimiter(64)
        self._lock = threading.Lock()
        self._held: dict[str, tuple[Source, Any, threading.Event]] = {}
        self._watching: set[str] = set()
        self._threads: set[threading.Thread] = set()
        self._waiters: set[trio.Event] = set()
        self._token: trio.lowlevel.TrioToken | None = None
        self._closing = threading.Event()
        self._started = False
        self._listed_at = -1e9

    async def __aenter__(self) -> PubSubQueue:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- blocking calls --------------------------------------------------------------------------------------
    async def call(self, fn: Callable[..., Any], **request: Any) -> Any:
        """One GAPIC call in a worker thread, abandoned (not waited for) on cancellation."""
        timeout = request.pop("timeout", self.call_timeout)
        return await trio.to_thread.run_sync(lambda: fn(request=request, timeout=timeout),
                                             abandon_on_cancel=True, limiter=self._limiter)

    # -- sources and discovery -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Check the configuration (certs dir readable, default credentials present) and connect."""
        if self._started:
            await trio.lowlevel.checkpoint()
            return
        if self.certs_dir is not None and not self.certs_dir.is_dir():
            raise ConfigError(f"--certs-dir {self.certs_dir} is not a directory")
        if self.project and "" not in self._sources:
            source = Source(label="--pubsub-project", project=self.project)
            try:
                await trio.to_thread.run_sync(source.connect)
            except Exception as exc:
                raise ConfigError(f"Pub/Sub project {self.project}: {scrub(str(exc))}") from None
            self._sources[""] = source
        self._started = True
        log.info("Pub/Sub: %s; claims held %s at a time and renewed while experiments run", self.location,
                 format_duration(self.lease))

    def _scan_certs(self) -> None:
        assert self.certs_dir is not None
        scan_certs(self.certs_dir, self._sources, self._broken, bool(self.emulator), self._retire)

    def _retire(self, source: Source) -> None:
        """No new work from ``source``. Its long pulls are not cut short (a cancelled pull may still be handed
        a message, which then waits out its ack deadline): one that brings a message within the next
        ``watch_window`` gives it straight back."""
        source.retired = True
        self._retired.append(source)

    async def _list(self, source: Source) -> None:
        pages = await self.call(source.subscriber.list_subscriptions, project=f"projects/{source.project}")
        names = await trio.to_thread.run_sync(lambda: [s.name.rsplit("/", 1)[-1] for s in pages],
                                              abandon_on_cancel=True, limiter=self._limiter)
        source.names = [n for n in names if not n.endswith(self.set_aside_suffix)]
        if source.failing:
            log.info("Pub/Sub project %s (%s) answers again", source.project, source.label)
        source.failing = False

    async def discover(self) -> list[str]:
        """Subscription short names of every source; a source whose listing fails keeps its last list."""
        await self.start()
        if self.certs_dir is not None:
            await trio.to_thread.run_sync(self._scan_certs, limiter=self._limiter)
        errors = []
        for source in self._sources.values():
            try:
                await self._list(source)
            except Exception as exc:
                errors.append(exc)
                if not source.failing:
                    log.warning("listing Pub/Sub subscriptions of project %s (%s) failed: %s", source.project,
                                source.label, scrub(str(exc)))
                source.failing = True
        if errors and len(errors) == len(self._sources):
            raise errors[0]
        owner: dict[str, Source] = {}
        for key in sorted(self._sources):
            source = self._sources[key]
            for name in source.names:
                if name in owner:
                    if name not in self._duplicates_warned:
                        self._duplicates_warned.add(name)
                        log.warning("subscription %s exists in projects %s and %s: served from %s only; give "
                                    "it a unique name", name, owner[name].project, source.project,
                                    owner[name].project)
                    continue
                owner[name] = source
        self._owner = owner
        self._last_owner.update(owner)
        self._listed_at = time.monotonic()
        return sorted(owner)

    async def _resolve(self, queue: str) -> Source | None:
        if queue not in self._owner and time.monotonic() - self._listed_at > 1.0:
            try:
                await self.discover()
            except Exception:  # noqa: BLE001 - logged by discover; the queue stays unknown for now
                pass
        return self._owner.get(queue)

    async def exists(self, queue: str) -> bool:
        """Whether the subscription is still there; an unreachable service is not a deletion."""
        source = self._owner.get(queue) or self._last_owner.get(queue) or await self._resolve(queue)
        if source is None:
            return False
        try:
            await self.call(source.subscriber.get_subscription, subscription=source.path(queue))
        except gexc().NotFound:
            return False
        except Exception as exc:  # noqa: BLE001 - not a definite answer
            log.debug("Pub/Sub existence check of %s failed: %s", queue, scrub(str(exc)))
        return True

    def deadline_warning(self, seconds: float) -> str | None:
        """Pub/Sub discards unacknowledged messages after the subscription's retention (7 days by default)."""
        if seconds <= RETENTION_DEFAULT:
            return None
        return (f"experiment deadline {format_duration(seconds)} exceeds Pub/Sub's default message retention "
                f"({format_duration(RETENTION_DEFAULT)}): unless the subscription keeps messages longer the "
                "message may be discarded while the experiment runs, and a crash then loses the work")

    # -- receiving -------------------------------------------------------------------------------------------
    def _attempt(self, message_id: str, delivery_attempt: int) -> int:
        """The attempt number for a delivery just pulled (see the module docstring)."""
        with self._lock:
            counts = self._seen.setdefault(message_id, [0, 0])
            self._seen.move_to_end(message_id)
            while len(self._seen) > 10000:
                self._seen.popitem(last=False)
            counts[0] += 1
            return max(1, max(counts[0], delivery_attempt) - counts[1])

    def _uncounted(self, message_id: str, delivered: int = 0) -> None:
        with self._lock:
            counts = self._seen.setdefault(message_id, [0, 0])
            counts[0] += delivered
            counts[1] += 1

    def _take_held(self, queue: str) -> tuple[Source, Any] | None:
        with self._lock:
            entry = self._held.pop(queue, None)
        if entry is None:
            return None
        entry[2].set()  # the watcher thread no longer gives it back
        return entry[0], entry[1]

    async def receive(self, queue: str) -> PubSubDelivery | None:
        """Claim one message: the one a ``wait_for_work`` pull holds, else one pull that returns at once."""
        await self.start()
        taken = self._take_held(queue)
        if taken is not None:
            source, received = taken
        else:
            found = await self._resolve(queue)
            if found is None:
                return None
            source = found
            try:
                received = await self._pull_now(source, queue)
            except gexc().NotFound:
                return None
            if received is None:
                return None
        delivery = PubSubDelivery(self, source, queue, received,
                                  self._attempt(received.message.attributes.get(MESSAGE_ID_ATTR)
                                                or received.message.message_id, received.delivery_attempt))
        self._outstanding.add(delivery)
        try:
            await delivery.keep_alive()  # the subscription's own deadline may be as short as 10 s
        except Exception as exc:  # noqa: BLE001 - the lease check will tell if the claim is gone
            log.warning("extending the claim on message %s of %s failed: %s", delivery.message_id, queue,
                        scrub(str(exc)))
        return delivery

    async def _pull_now(self, source: Source, queue: str) -> Any:
        """One pull that answers at once. A message that arrives after the caller was cancelled goes back
        uncounted instead of waiting out its ack deadline."""
        lock = threading.Lock()
        box: dict[str, Any] = {"abandoned": False, "received": None}

        def pull() -> Any:
            request = {"subscription": source.path(queue), "max_messages": 1, "return_immediately": True}
            response = source.subscriber.pull(request=request, timeout=self.call_timeout)
            received = response.received_messages[0] if response.received_messages else None
            with lock:
                box["received"] = received
                late = box["abandoned"]
            if late and received is not None:
                self._give_back(source, queue, received)
            return received

        try:
            return await trio.to_thread.run_sync(pull, abandon_on_cancel=True, limiter=self._limiter)
        except trio.Cancelled:
            with lock:
                box["abandoned"] = True
                dropped = box["received"]  # the thread finished, but its answer never reached us
            if dropped is not None:
                self._spawn(self._give_back, source, queue, dropped)
            raise

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        """A thread of ours (joined by aclose)."""
        def run() -> None:
            try:
                target(*args)
            finally:
                with self._lock:
                    self._threads.discard(threading.current_thread())

        thread = threading.Thread(target=run, daemon=True, name="pubsub-" + target.__name__.strip("_"))
        with self._lock:
            self._threads.add(thread)
        thread.start()

    async def settle(self, delivery: PubSubDelivery, source: Source, op: str, reason: str | None) -> None:
        """ack / nack / release / set_aside of one delivery (called once per delivery)."""
        self._outstanding.discard(delivery)
        sub = source.subscriber
        try:
            if op == "set_aside":
                assert reason is not None
                try:
                    await self._publish_set_aside(delivery, source, reason)
                except Exception as exc:  # noqa: BLE001 - keep the message rather than lose it
                    log.error("setting message %s of %s aside failed, giving it back instead: %s",
                              delivery.message_id, delivery.queue, scrub(str(exc)))
                    op = "release"
            if op in ("ack", "set_aside"):
                await self.call(sub.acknowledge, subscription=delivery.subscription,
                                ack_ids=[delivery.ack_id])
                self._seen.pop(delivery.message_id, None)
            else:
                if op == "release":
                    self._uncounted(delivery.message_id)
                await self.call(sub.modify_ack_deadline, subscription=delivery.subscription,
                                ack_ids=[delivery.ack_id], ack_deadline_seconds=0)
        except Exception as exc:  # noqa: BLE001 - the lease runs out and Pub/Sub redelivers
            log.warning("%s of message %s of %s failed (it comes back when its lease ends): %s", op,
                        delivery.message_id, delivery.queue, scrub(str(exc)))

    async def _publish_set_aside(self, delivery: PubSubDelivery, source: Source, reason: str) -> None:
        name = delivery.queue + self.set_aside_suffix
        topic = f"projects/{source.project}/topics/{name}"
        exists_errors = (gexc().AlreadyExists,)
        try:
            await self.call(source.publisher.create_topic, name=topic)
        except exists_errors:
            pass
        try:
            await self.call(source.subscriber.create_subscription, name=source.path(name), topic=topic)
        except exists_errors:
            pass
        attributes = dict(delivery.attributes)
        attributes.update({REASON_ATTR: reason[:1000], ORIGIN_ATTR: delivery.subscription,
                           MESSAGE_ID_ATTR: delivery.message_id})
        await self.call(source.publish, topic=topic,
                        messages=[{"data": delivery.body, "attributes": attributes}])

    # -- waiting ---------------------------------------------------------------------------------------------
    def _notify_soon(self) -> None:
        token = self._token
        if token is None:
            return
        try:
            token.run_sync_soon(self._wake_waiters)
        except trio.RunFinishedError:
            pass

    def _wake_waiters(self) -> None:
        for event in self._waiters:
            event.set()

    def _watch(self, queue: str, source: Source) -> None:
        """Thread: one long pull; a message is kept for receive() and given back if not taken in time."""
        try:
            try:
                request = {"subscription": source.path(queue), "max_messages": 1}
                response = source.subscriber.pull(request=request, timeout=self.watch_window)
                received = list(response.received_messages)
            except Exception as exc:  # noqa: BLE001 - deadline (nothing came), gone, closing
                if not self._closing.is_set() and not isinstance(exc, gexc().DeadlineExceeded):
                    log.debug("Pub/Sub wait on %s: %s", queue, scrub(str(exc)))
                    self._closing.wait(1.0)  # an error answers at once: do not spin
                received = []
            if not received:
                return
            msg = received[0]
            if source.retired or self._closing.is_set():
                self._give_back(source, queue, msg)
                return
            taken = threading.Event()
            with self._lock:
                self._held[queue] = (source, msg, taken)
            self._notify_soon()
            if taken.wait(self.watch_hold) and not self._closing.is_set():
                return
            with self._lock:
                mine = self._held.get(queue, (None, None, None))[2] is taken
                if mine:
                    del self._held[queue]
            if mine:
                self._give_back(source, queue, msg)
        finally:
            with self._lock:
                self._watching.discard(queue)
                self._threads.discard(threading.current_thread())
            self._notify_soon()

    def _give_back(self, source: Source, queue: str, received: Any) -> None:
        """Thread side: an unclaimed hold goes back uncounted."""
        message = received.message
        self._uncounted(message.attributes.get(MESSAGE_ID_ATTR) or message.message_id, delivered=1)
        try:
            request = {"subscription": source.path(queue), "ack_ids": [received.ack_id],
                       "ack_deadline_seconds": 0}
            source.subscriber.modify_ack_deadline(request=request, timeout=self.call_timeout)
        except Exception as exc:  # noqa: BLE001 - its deadline ends soon anyway
            log.debug("giving back a held message of %s failed: %s", queue, scrub(str(exc)))

    async def wait_for_work(self, queues: Sequence[str], timeout: float) -> None:
        """Return when a long pull on one of ``queues`` got a message (kept for its receive), or after
        ``timeout``."""
        await self.start()
        self._token = trio.lowlevel.current_trio_token()
        with trio.move_on_after(timeout):
            while True:
                with self._lock:
                    if any(q in self._held for q in queues):
                        return
                event = trio.Event()
                self._waiters.add(event)
                try:
                    for queue in queues:
                        source = await self._resolve(queue)
                        if source is not None:
                            self._start_watch(queue, source)
                    await event.wait()
                finally:
                    self._waiters.discard(event)
        await trio.lowlevel.checkpoint()

    def _start_watch(self, queue: str, source: Source) -> None:
        with self._lock:
            if self._closing.is_set() or queue in self._watching or queue in self._held:
                return
            self._watching.add(queue)
            thread = threading.Thread(target=self._watch, args=(queue, source), daemon=True,
                                      name=f"pubsub-wait {queue}")
            self._threads.add(thread)
        thread.start()

    async def aclose(self) -> None:
        """Give back every held or unsettled message, close the clients, join the wait threads."""
        self._closing.set()
        with trio.CancelScope(shield=True):
            with self._lock:
                held = list(self._held.items())
                self._held.clear()
                threads = list(self._threads)
            for _queue, (_source, _msg, taken) in held:
                taken.set()
            for queue, (source, msg, _taken) in held:
                await trio.to_thread.run_sync(self._give_back, source, queue, msg)
            for delivery in list(self._outstanding):
                delivery.settled = True
                self._outstanding.discard(delivery)
                if not delivery._expired():
                    try:
                        await self.call(delivery._source.subscriber.modify_ack_deadline,
                                        subscription=delivery.subscription, ack_ids=[delivery.ack_id],
                                        ack_deadline_seconds=0)
                    except Exception as exc:  # noqa: BLE001 - its lease ends soon anyway
                        log.debug("giving back message %s at close failed: %s", delivery.message_id, exc)
                delivery.lost_reason = "the runner closed its Pub/Sub connection; the message went back"
                delivery.lost.set()
            for source in [*self._sources.values(), *self._retired]:
                await trio.to_thread.run_sync(source.close)
            for thread in threads:
                await trio.to_thread.run_sync(thread.join, self.watch_window + self.watch_hold + 5)


if TYPE_CHECKING:  # mypy proves that this backend honours the protocol; nothing runs

    def _honours_the_protocol(backend: PubSubQueue,
                              delivery: PubSubDelivery) -> tuple[QueueBackend, Delivery]:
        return backend, delivery
