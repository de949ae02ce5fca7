"""The IO thread of the RabbitMQ backend: one pika connection, owned by one thread.

pika's BlockingConnection is not thread-safe, so everything AMQP happens here: trio code queues a
:class:`Call` (woken with ``add_callback_threadsafe``) and is answered through ``TrioToken.run_sync_soon``.
The thread runs ``process_data_events`` in a short loop, so a channel the broker closes under a held
delivery (consumer timeout) or a dropped connection is noticed within a tick, and it reconnects with
bounded, jittered exponential backoff. See :mod:`studio_runner.queues.rabbitmq` for the protocol choices.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import pika
import pika.exceptions as pex
import trio

from studio_runner.queues.rmq_mgmt import describe_amqp_error

log = logging.getLogger(__name__)

ATTEMPT_HEADER = "x-studio-runner-attempt"
REASON_HEADER = "x-studio-runner-reason"
QUEUE_HEADER = "x-studio-runner-queue"
SET_ASIDE_QUEUE = "studio-runner.set-aside"
_TICK = 0.25
_BACKOFF_FIRST = 0.5
_BACKOFF_MAX = 30.0
_TEND_EVERY = 0.5
"""Seconds between checks of the standing consumers (hold and linger are seconds long; with hundreds of
consumers, checking on every tick would be the idle runner's largest cost)."""
_MAX_WATCHES = 1000
"""Standing consumers at most (one channel each), and never more than half the negotiated channel_max
(RabbitMQ's default is 2047): queues beyond that are found by the supervisor's periodic re-poll only."""
LATER = object()


def attempt_of(headers: Mapping[str, Any] | None, redelivered: bool) -> int:
    """Attempt number of a delivery: our re-publish counter plus one if the broker redelivered it."""
    headers = headers or {}
    base = headers.get(ATTEMPT_HEADER, 1)
    base = base if isinstance(base, int) and not isinstance(base, bool) and base >= 1 else 1
    quorum_count = headers.get("x-delivery-count")
    if isinstance(quorum_count, int) and not isinstance(quorum_count, bool) and quorum_count > 0:
        return base + quorum_count
    return base + (1 if redelivered else 0)


def _close_quietly(channel: Any) -> None:
    try:
        if channel.is_open:
            channel.close()
    except pex.AMQPChannelError:
        pass


class Call:
    """One request from trio to the IO thread, finished exactly once from the IO thread."""

    def __init__(self, fn: Callable[[Call], Any], token: trio.lowlevel.TrioToken | None, default: Any,
                 release: Callable[[Any], None] | None = None) -> None:
        self.fn = fn
        self.token = token
        self.default = default
        self.release = release
        self.event = trio.Event()
        self.value: Any = default
        self.done = False
        self.abandoned = False
        self._lock = threading.Lock()

    def finish(self, value: Any) -> None:
        """Hand ``value`` to the waiting trio task; if nobody waits any more, release it here (IO thread)."""
        with self._lock:
            if self.done:
                return
            self.done = True
            self.value = value
            abandoned = self.abandoned
        if not abandoned and self.token is not None:
            try:
                self.token.run_sync_soon(self.event.set)
                return
            except trio.RunFinishedError:
                pass
        if self.release is not None and value is not None and value is not self.default:
            self.release(value)

    def abandon(self) -> Any:
        """The trio waiter was cancelled: returns a value that was already delivered and must be released."""
        with self._lock:
            self.abandoned = True
            return self.value if self.done else None


class Held:
    """IO-thread record of one unacknowledged delivery and the channel that holds it."""

    def __init__(self, channel: Any, method: Any, properties: Any, body: bytes, queue: str,
                 token: trio.lowlevel.TrioToken, close_reason: list[str]) -> None:
        self.channel = channel
        self.tag = method.delivery_tag
        self.exchange = method.exchange
        self.routing_key = method.routing_key
        self.properties = properties
        self.body = body
        self.queue = queue
        self.token = token
        self.close_reason = close_reason
        self.redelivered = bool(method.redelivered)
        self.attempt = attempt_of(properties.headers, self.redelivered)
        self.lost = False
        self.settled = False
        self.delivery: Any = None


class _Pending:
    """A consumer waiting (IO thread) for the one message a receive() asked for."""

    def __init__(self, call: Call, channel: Any, queue: str, token: trio.lowlevel.TrioToken,
                 deadline: float, close_reason: list[str]) -> None:
        self.call, self.channel, self.queue, self.token = call, channel, queue, token
        self.deadline, self.close_reason = deadline, close_reason
        self.tag: str | None = None
        self.message: tuple[Any, Any, bytes] | None = None


class _Watch:
    """A standing consumer on one queue (IO thread) for ``wait_for_work``: prefetch 1, so it holds at most
    one message, which wakes the waiters and is kept, unacknowledged, for the queue's next receive()."""

    def __init__(self, queue: str, channel: Any, close_reason: list[str],
                 token: trio.lowlevel.TrioToken) -> None:
        self.queue, self.channel, self.close_reason, self.token = queue, channel, close_reason, token
        self.tag: str | None = None
        self.message: tuple[Any, Any, bytes] | None = None
        self.since = 0.0


class Waiter:
    """One ``wait_for_work`` in progress (trio side): set when a watched queue has a message held for it, or
    when the connection comes back (its consumers must be set up again)."""

    def __init__(self, queues: frozenset[str], token: trio.lowlevel.TrioToken) -> None:
        self.queues = queues
        self.token = token
        self.event = trio.Event()


def _watch_close(channel: Any) -> list[str]:
    """Record why the broker closed ``channel`` (pika's BlockingChannel has no public close callback)."""
    reason: list[str] = []
    impl = getattr(channel, "_impl", None)
    if impl is not None and hasattr(impl, "add_on_close_callback"):
        impl.add_on_close_callback(lambda _ch, exc: reason.append(str(exc)))
    return reason


class Link(threading.Thread):
    """The IO thread: owns the AMQP connection, reconnects after losing it, serves calls from trio."""

    def __init__(self, params: pika.URLParameters, display_url: str, receive_wait: float,
                 set_aside_queue: str, delivery_factory: Callable[[Held], Any], *, watch_hold: float = 2.0,
                 watch_linger: float = 2.0) -> None:
        """``watch_hold``: how long a message a standing consumer took may wait for its receive() before it
        is given back; ``watch_linger``: how long a consumer outlives the last wait for its queue."""
        super().__init__(name="studio-runner-amqp", daemon=True)
        self._params = params
        self._display = display_url
        self._receive_wait = receive_wait
        self._watch_hold = watch_hold
        self._watch_linger = watch_linger
        self._set_aside_queue = set_aside_queue
        self._delivery_factory = delivery_factory
        self._lock = threading.Lock()
        self._calls: collections.deque[Call] = collections.deque()
        self._stopping = threading.Event()
        self.first_attempt = threading.Event()
        self.connected = False
        self._conn: Any = None
        self._pub: Any = None
        self._aside_declared = False
        self._pending: list[_Pending] = []
        self._held: set[Held] = set()
        self._watches: dict[str, _Watch] = {}
        """Standing consumers by queue; changed on the IO thread, read by trio, both under ``_lock``."""
        self._waiters: list[Waiter] = []
        self._wanted_until: dict[str, float] = {}
        self._watch_limit_logged = False
        self._next_tend = 0.0

    # --- called from other threads -------------------------------------------------------------
    def submit(self, call: Call) -> bool:
        """Queue ``call`` for the IO thread; False (nothing queued) while disconnected or stopping."""
        with self._lock:
            if not self.connected or self._stopping.is_set():
                return False
            self._calls.append(call)
            conn = self._conn
        self._wake(conn)
        return True

    def stop(self) -> None:
        self._stopping.set()
        self._wake(self._conn)

    def add_waiter(self, queues: frozenset[str], token: trio.lowlevel.TrioToken) -> Waiter:
        """Register a wait_for_work; its event is set at once when a consumer already holds a message."""
        waiter = Waiter(queues, token)
        with self._lock:
            self._waiters.append(waiter)
            ready = any(w.message is not None for q in queues if (w := self._watches.get(q)) is not None)
        if ready:
            waiter.event.set()
        return waiter

    def remove_waiter(self, waiter: Waiter) -> None:
        """The wait is over; its queues' consumers stay for ``watch_linger`` (the supervisor's next wait
        usually follows within milliseconds) and are cancelled after that."""
        until = time.monotonic() + self._watch_linger
        with self._lock:
            self._waiters.remove(waiter)
            for queue in waiter.queues:
                self._wanted_until[queue] = until

    def watched_and_empty(self, queue: str) -> bool:
        """A consumer of ours is attached to ``queue`` and was given nothing: the queue has nothing for us
        (a message arriving now goes to that consumer and wakes the waiters)."""
        with self._lock:
            watch = self._watches.get(queue)
            return watch is not None and watch.tag is not None and watch.message is None

    def _wake_waiters(self, queue: str | None) -> None:
        """Set the events of the waiters for ``queue`` (all of them for None); any thread."""
        with self._lock:
            targets = [w for w in self._waiters if queue is None or queue in w.queues]
        for waiter in targets:
            try:
                waiter.token.run_sync_soon(waiter.event.set)
            except trio.RunFinishedError:
                pass

    @staticmethod
    def _wake(conn: Any) -> None:
        if conn is not None:
            try:
                conn.add_callback_threadsafe(lambda: None)
            except Exception:  # closed meanwhile: the loop notices on its own
                pass

    # --- IO thread -----------------------------------------------------------------------------
    def run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                conn = pika.BlockingConnection(self._params)
            except Exception as exc:
                failures += 1
                self.first_attempt.set()
                delay = min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)
                log.warning("cannot connect to RabbitMQ at %s (%s); retrying in %.1f s",
                            self._display, self._reason(exc), delay)
                self._stopping.wait(delay)
                continue
            if failures:
                log.info("connected to RabbitMQ at %s again", self._display)
            failures = 0
            why = "runner shutting down: closing the connection hands the message back to the broker"
            with self._lock:
                self._conn, self.connected = conn, True
                self._pub, self._aside_declared = None, False
            self.first_attempt.set()
            self._wake_waiters(None)  # a wait started while disconnected sets up its consumers now
            try:
                self._serve(conn)
            except Exception as exc:
                why = f"connection to the broker lost ({self._reason(exc)})"
                log.warning("lost the RabbitMQ connection to %s (%s); reconnecting", self._display,
                            self._reason(exc),
                            exc_info=not isinstance(exc, (pex.AMQPError, OSError)))
                failures = 1
            finally:
                self._disconnect(conn, why)
            if failures and not self._stopping.is_set():
                self._stopping.wait(_BACKOFF_FIRST * random.uniform(0.5, 1.0))
        self.first_attempt.set()

    def _reason(self, exc: BaseException) -> str:
        return describe_amqp_error(exc, self._params.host, self._params.port)

    def _disconnect(self, conn: Any, why: str) -> None:
        with self._lock:
            self.connected, self._conn = False, None
            calls = list(self._calls)
            self._calls.clear()
        for call in calls:
            call.finish(call.default)
        for pending in self._pending:
            pending.call.finish(None)
        self._pending.clear()
        with self._lock:
            self._watches.clear()  # a message a consumer held goes back with the connection
        for held in list(self._held):
            self._lose(held, why)
        try:
            if conn.is_open:
                conn.close()
        except Exception:
            pass

    def _serve(self, conn: Any) -> None:
        while not self._stopping.is_set():
            conn.process_data_events(time_limit=_TICK)
            while self._calls and not self._stopping.is_set():
                self._execute(self._calls.popleft())
            self._check_pending()
            self._tend_watches()
            for held in list(self._held):
                if held.channel.is_closed:
                    self._lose(held, held.close_reason[0] if held.close_reason else "channel closed")
        for watch in list(self._watches.values()):  # shutting down: give held messages back uncounted
            self._drop_watch(watch)

    def _execute(self, call: Call) -> None:
        try:
            value = call.fn(call)
        except (pex.AMQPConnectionError, OSError):
            call.finish(call.default)
            raise
        except Exception:
            log.exception("RabbitMQ operation failed")
            call.finish(call.default)
            return
        if value is not LATER:
            call.finish(value)

    def _lose(self, held: Held, why: str, settling: bool = False) -> None:
        self._held.discard(held)
        if held.lost or (held.settled and not settling):
            return
        held.lost = True
        delivery = held.delivery
        if delivery is None:
            return
        delivery.lost_reason = why
        if self._stopping.is_set():
            log.info("message %s of queue %s (attempt %d) goes back to the broker: the runner is shutting "
                     "down", delivery.message_id, held.queue, held.attempt)
        else:
            log.warning("lost the claim on message %s of queue %s (attempt %d): %s; the broker puts it back "
                        "on the queue and it may run again elsewhere; this experiment keeps running",
                        delivery.message_id, held.queue, held.attempt, why)
        try:
            held.token.run_sync_soon(delivery.lost.set)
        except trio.RunFinishedError:
            pass

    # wait_for_work ----------------------------------------------------------------------------------
    def ensure_watches(self, queues: list[str], arguments: dict[str, Any] | None,
                       token: trio.lowlevel.TrioToken, call: Call) -> None:
        """Attach a standing consumer (own channel, prefetch 1) to each of ``queues`` that has none; a queue
        that cannot be consumed from (deleted, exclusive) is left to the supervisor's re-poll."""
        channel_max = getattr(getattr(self._conn, "_impl", None), "params", self._params).channel_max or 65535
        limit = min(_MAX_WATCHES, max(1, channel_max // 2))
        for queue in queues:
            if queue in self._watches:
                continue
            if len(self._watches) >= limit:
                if not self._watch_limit_logged:
                    log.warning("more than %d RabbitMQ queues to wait on: the rest are polled every few "
                                "seconds only", limit)
                    self._watch_limit_logged = True
                return
            channel = self._conn.channel()
            watch = _Watch(queue, channel, _watch_close(channel), token)
            try:
                channel.basic_qos(prefetch_count=1)
                with self._lock:
                    self._watches[queue] = watch
                tag = channel.basic_consume(queue, partial(self._on_watched_message, watch), auto_ack=False,
                                            arguments=arguments)
                with self._lock:
                    watch.tag = tag
            except pex.AMQPChannelError as exc:
                log.debug("cannot wait on queue %s: %s", queue, exc)
                with self._lock:
                    self._watches.pop(queue, None)
                _close_quietly(channel)

    def _on_watched_message(self, watch: _Watch, _channel: Any, method: Any, properties: Any,
                            body: bytes) -> None:
        with self._lock:
            watch.message = (method, properties, body)
            watch.since = time.monotonic()
        self._wake_waiters(watch.queue)

    def _tend_watches(self) -> None:
        """Give back a held message nobody asked for within ``watch_hold`` (without counting an attempt),
        cancel consumers nobody waited on for ``watch_linger`` (the runner is busy: it must not take work
        it cannot start), forget consumers the broker cancelled or whose channel it closed."""
        now = time.monotonic()
        if not self._watches or now < self._next_tend:
            return
        self._next_tend = now + _TEND_EVERY
        with self._lock:
            waited = {q for waiter in self._waiters for q in waiter.queues}
            watches = list(self._watches.values())
        for watch in watches:
            if watch.channel.is_closed:
                self._forget_watch(watch)  # the broker took back whatever it held
            elif watch.message is not None:
                if now - watch.since > self._watch_hold:
                    self._drop_watch(watch)
            elif watch.tag is not None and watch.tag not in watch.channel.consumer_tags:
                self._drop_watch(watch)  # cancelled by the broker (queue deleted)
            elif watch.queue not in waited and now > self._wanted_until.get(watch.queue, 0.0):
                self._drop_watch(watch)
        with self._lock:
            for queue in [q for q, until in self._wanted_until.items() if until < now and q not in waited]:
                del self._wanted_until[queue]

    def _forget_watch(self, watch: _Watch) -> None:
        with self._lock:
            if self._watches.get(watch.queue) is watch:
                del self._watches[watch.queue]

    def _drop_watch(self, watch: _Watch) -> None:
        """Cancel the consumer, give its message back as the same attempt (re-published: a requeue would
        count as a crash), close its channel."""
        self._forget_watch(watch)
        try:
            if watch.tag is not None and watch.tag in watch.channel.consumer_tags:
                # with a message held (prefetch 1) nothing else can be in flight to be rejected; without one
                # pika rejects a delivery that crosses the cancel, which then comes back as a redelivery
                watch.channel.basic_cancel(watch.tag)
            if watch.message is not None:
                method, properties, body = watch.message
                held = Held(watch.channel, method, properties, body, watch.queue, watch.token,
                            watch.close_reason)
                log.info("giving back message %s of queue %s: the runner did not take it within %.0f s",
                         properties.message_id or "sha256:" + hashlib.sha256(body).hexdigest()[:16],
                         watch.queue, self._watch_hold)
                self._republish(held, held.attempt)
        except pex.AMQPChannelError:
            pass  # the channel is gone: the broker has the message back already
        finally:
            _close_quietly(watch.channel)

    def _claim_watched(self, watch: _Watch, token: trio.lowlevel.TrioToken) -> Any:
        """Turn a consumer's held message into a delivery; the consumer is cancelled, so the channel carries
        this one message only (as a receive()'s own channel does)."""
        self._forget_watch(watch)
        assert watch.message is not None
        try:
            if watch.tag is not None and watch.tag in watch.channel.consumer_tags:
                watch.channel.basic_cancel(watch.tag)
        except pex.AMQPChannelError:
            return None  # channel gone: the broker requeued the message
        method, properties, body = watch.message
        held = Held(watch.channel, method, properties, body, watch.queue, token, watch.close_reason)
        held.delivery = self._delivery_factory(held)
        self._held.add(held)
        return held.delivery

    # receive --------------------------------------------------------------------------------------
    def begin_receive(self, queue: str, arguments: dict[str, Any] | None, token: trio.lowlevel.TrioToken,
                      call: Call) -> Any:
        watch = self._watches.get(queue)
        if watch is not None and watch.message is not None and watch.channel.is_open:
            return self._claim_watched(watch, token)
        channel = self._conn.channel()
        reason = _watch_close(channel)
        try:
            declared = channel.queue_declare(queue, passive=True)
            if declared.method.message_count == 0:
                _close_quietly(channel)
                return None
            channel.basic_qos(prefetch_count=1)
            pending = _Pending(call, channel, queue, token, time.monotonic() + self._receive_wait, reason)
            pending.tag = channel.basic_consume(queue, partial(self._on_message, pending), auto_ack=False,
                                                arguments=arguments)
        except pex.AMQPChannelError as exc:
            log.debug("cannot consume from queue %s: %s", queue, exc)
            _close_quietly(channel)
            return None
        self._pending.append(pending)
        return LATER

    @staticmethod
    def _on_message(pending: _Pending, _channel: Any, method: Any, properties: Any, body: bytes) -> None:
        pending.message = (method, properties, body)

    def _check_pending(self) -> None:
        now = time.monotonic()
        for pending in list(self._pending):
            if pending.message is None and now < pending.deadline and pending.channel.is_open:
                continue
            self._pending.remove(pending)
            try:
                pending.channel.basic_cancel(pending.tag)
            except pex.AMQPChannelError:
                pending.call.finish(None)  # channel gone: the broker requeued anything it had sent
                continue
            if pending.message is None:
                _close_quietly(pending.channel)
                pending.call.finish(None)
                continue
            method, properties, body = pending.message
            held = Held(pending.channel, method, properties, body, pending.queue, pending.token,
                        pending.close_reason)
            held.delivery = self._delivery_factory(held)
            self._held.add(held)
            pending.call.finish(held.delivery)

    def release(self, held: Held) -> None:
        """A delivery nobody will run (its receive() was cancelled): give it back without counting an
        attempt, as :meth:`settle` does for ``release`` (a plain reject would come back ``redelivered``)."""
        self._held.discard(held)
        if held.settled or held.lost:
            return
        held.settled = True
        try:
            self._republish(held, held.attempt)
        except pex.AMQPChannelError:
            pass  # its channel is gone: the broker has already requeued it
        finally:
            _close_quietly(held.channel)

    # settle ---------------------------------------------------------------------------------------
    def settle(self, held: Held, op: str, reason: str | None) -> bool:
        """ack / nack / release / set_aside on the delivery's own channel, then close that channel."""
        name = held.delivery.message_id if held.delivery else "?"
        if held.settled:
            log.warning("%s of message %s ignored: it was already settled", op, name)
            return False
        held.settled = True
        if held.lost:
            log.info("%s of message %s of queue %s skipped: the broker already took it back (at-least-once)",
                     op, name, held.queue)
            return False
        self._held.discard(held)
        try:
            if op == "ack":
                held.channel.basic_ack(held.tag)
            elif op == "nack":
                self._republish(held, held.attempt + 1)
            elif op == "release":
                self._republish(held, held.attempt)
            else:
                self._set_aside(held, reason or "")
            return True
        except pex.AMQPChannelError as exc:
            cause = held.close_reason[0] if held.close_reason else str(exc) or type(exc).__name__
            self._lose(held, f"{op} failed: {cause}", settling=True)
            return False
        finally:
            _close_quietly(held.channel)

    def _publisher(self) -> Any:
        if self._pub is None or not self._pub.is_open:
            self._pub = self._conn.channel()
            self._pub.confirm_delivery()
        return self._pub

    def _publish_then_ack(self, held: Held, exchange: str, routing_key: str, properties: Any,
                          what: str, drop_unroutable: bool) -> None:
        """Publish the copy (confirmed), then ack the original; on failure hand the original back."""
        if not held.channel.is_open:
            raise pex.ChannelWrongStateError("the delivery's channel is closed")
        try:
            self._publisher().basic_publish(exchange, routing_key, held.body, properties, mandatory=True)
        except pex.UnroutableError as exc:
            if not drop_unroutable:
                log.error("%s failed: nothing is bound to %r; handing the message back to queue %s",
                          what, routing_key, held.queue)
                held.channel.basic_nack(held.tag, requeue=True)
                return
            log.warning("%s: nothing is bound to %s/%s any more (queue deleted?); the message goes with "
                        "it (%s)", what, exchange or "(default)", routing_key, exc)
        except pex.AMQPChannelError as exc:
            log.error("%s failed (%s); handing the message back to queue %s instead", what, exc, held.queue)
            held.channel.basic_nack(held.tag, requeue=True)
            return
        held.channel.basic_ack(held.tag)

    def _republish(self, held: Held, attempt: int) -> None:
        """Hand back by re-publishing a copy that says which ``attempt`` its next delivery is, then acking
        the original: the broker's own requeue would set ``redelivered``, which counts as a crash."""
        properties = copy.copy(held.properties)
        headers = dict(properties.headers or {})
        headers.pop("x-delivery-count", None)
        headers[ATTEMPT_HEADER] = attempt
        properties.headers = headers
        self._publish_then_ack(held, held.exchange, held.routing_key, properties,
                               f"re-publishing message for attempt {attempt}", drop_unroutable=True)

    def publish_report(self, queue: str, body: bytes, content_type: str, call: Call) -> str:
        """Publish one report to ``queue`` through the default exchange (every queue is bound to it by name,
        whatever its bindings to ``StudioML.topic``), persistent, mandatory and confirmed. Returns "" once
        the broker confirmed it, else why not (never raises: a report is dropped, never retried here)."""
        properties = pika.BasicProperties(content_type=content_type, delivery_mode=2, app_id="studio-runner")
        try:
            self._publisher().basic_publish("", queue, body, properties, mandatory=True)
        except pex.UnroutableError:
            return f"queue {queue} does not exist (any more)"
        except pex.NackError:
            return f"the broker refused the report for {queue}"
        except pex.AMQPChannelError as exc:
            return f"publishing to {queue} failed: {exc}"
        return ""

    def _set_aside(self, held: Held, reason: str) -> None:
        if not self._aside_declared:
            try:
                self._publisher().queue_declare(self._set_aside_queue, durable=True)
            except pex.ChannelClosedByBroker as exc:  # exists with other properties: use it as it is
                log.warning("set-aside queue %s: %s", self._set_aside_queue, exc)
            self._aside_declared = True
        properties = copy.copy(held.properties)
        headers = dict(properties.headers or {})
        headers.update({REASON_HEADER: reason[:4000], QUEUE_HEADER: held.queue, ATTEMPT_HEADER: held.attempt})
        properties.headers = headers
        properties.delivery_mode = 2
        self._publish_then_ack(held, "", self._set_aside_queue, properties,
                               f"setting message aside to {self._set_aside_queue}", drop_unroutable=False)


async def await_call(link: Link, fn: Callable[[Call], Any], default: Any,
                     release: Callable[[Any], None] | None = None) -> Any:
    """Run ``fn`` on the IO thread and wait for its answer; ``default`` when disconnected."""
    call = Call(fn, trio.lowlevel.current_trio_token(), default, release)
    if not link.submit(call):
        return default
    try:
        await call.event.wait()
    except BaseException:
        value = call.abandon()
        if release is not None and value is not None and value is not default:
            link.submit(Call(lambda _c: release(value), None, None))
        raise
    return call.value

