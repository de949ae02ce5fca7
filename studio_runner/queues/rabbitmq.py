"""RabbitMQ backend: the StudioML client's exchange/queue layout, consumed the way long experiments need.

Why it is built this way:

* pika is blocking and a connection belongs to one thread, so one IO thread owns the single AMQP
  connection; trio talks to it through a call queue (``add_callback_threadsafe`` wakes it).
* The AMQP side lives in :mod:`studio_runner.queues.rmq_link` (the IO thread), the HTTP side in
  :mod:`studio_runner.queues.rmq_mgmt`; this module is the trio-facing backend.
* One channel per delivery in progress: the broker's consumer timeout (or any channel error) then closes one
  experiment's claim, never all of them, and ack/nack go to the channel that received the message.
* receive = passive declare (is there anything at all?) + ``basic_consume`` with prefetch 1, wait for one
  delivery, cancel the consumer. Measured on RabbitMQ 3.10.8: after ``basic_cancel`` the delivery stays
  unacknowledged on its channel and can still be acked; the node's ``consumer_timeout`` still applies to it
  (channel closed with 406 PRECONDITION_FAILED, message requeued with ``redelivered``). The per-consumer
  ``x-consumer-timeout`` argument is passed only where the broker honours it (3.11.15+, 3.12+).
* Attempts: classic queues carry no delivery count, so nack re-publishes the body with header
  ``x-studio-runner-attempt: N+1`` (same exchange, routing key and properties, publisher-confirmed) and then
  acks the original; the copy goes to the tail of the queue. release does the same with ``N`` (the broker's
  own requeue would set ``redelivered``, which counts as a crash). A redelivery after a crash or a lost
  claim is counted via ``redelivered`` (at least 2) and quorum queues' ``x-delivery-count`` is added when
  present.
* Waiting (``wait_for_work``): one standing consumer per waited-for queue, each on its own channel with
  prefetch 1, attached while the supervisor waits and for ``watch_linger`` (2 s) after its last wait. An
  idle runner then costs nothing per queue: no polling, and ``receive`` of a queue whose consumer got nothing
  answers None without a round trip. A delivery wakes the wait and is kept, unacknowledged, for the queue's
  next ``receive`` (which cancels the consumer, so the channel carries that one delivery, as above); never
  more than one per queue. If the runner does not take it within ``watch_hold`` (2 s: its slot filled
  meanwhile) it is given back like ``release`` (re-published, no attempt counted, so it goes to the tail of
  its queue). A busy runner waits on nothing, so its consumers are cancelled after the linger and it holds
  no work it cannot start. Costs: one channel per waited-for queue (at most 1000 and half the broker's
  channel_max; the rest are only re-polled), three round trips per queue to set a consumer up again after
  each busy spell, and a rare crossing: a message arriving exactly while an idle consumer is cancelled is
  rejected by pika and comes back ``redelivered``, counted as an attempt. Rejected alternatives, measured
  on 200 queues: passive declares on one channel every 0.2 s (a thousand round trips a second, far over the
  0.5 %-of-a-core budget) or only every few seconds (misses the 0.2 s pickup target); the management API's
  queue list (its message counts lag by the stats interval, 5 s by default).
* Claims do not expire except through the broker's consumer timeout, which cannot be extended per message:
  ``keep_alive`` does nothing and ``deadline_warning`` says when an experiment may outlive its claim.
* Set aside: the body goes to the durable queue ``studio-runner.set-aside`` (default exchange, headers with
  reason and origin). The name cannot match the default ``--queue-match`` pattern and the queue is bound to
  nothing, so no runner ever serves it.
* Reports (:class:`~studio_runner.queues.base.Responder`, spec queues.md §4): ``<queue>_response`` is looked
  up through the management API (as Go did); reports go through the default exchange straight to that
  queue (Go used ``StudioML.topic``, which reaches a response queue only if the client bound it there),
  persistent and publisher-confirmed on the same IO thread. :mod:`studio_runner.reports` decides what to send.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from itertools import count
from typing import TYPE_CHECKING, Any

import pika
import trio

from studio_runner.errors import ConfigError
from studio_runner.queues.rmq_link import SET_ASIDE_QUEUE, Held, Link, await_call
from studio_runner.queues.rmq_mgmt import (
    MgmtError,
    RabbitMgmt,
    amqp_vhost,
    derive_mgmt_url,
    expand_env,
    honours_consumer_timeout_arg,
    mask_url,
    parse_version,
    studio_queues,
)
from studio_runner.units import format_duration

if TYPE_CHECKING:
    from studio_runner.queues.base import Delivery, QueueBackend, Responder

log = logging.getLogger(__name__)

_names = count(1)
_OPERATOR_FIX = ("Operator fix: raise consumer_timeout (milliseconds) in rabbitmq.conf, or at run time with "
                 "rabbitmqctl eval 'application:set_env(rabbit, consumer_timeout, N).', above the longest "
                 "experiment, and raise the runner's consumer timeout limit to match.")


class RabbitMQDelivery:
    """One message claimed from a RabbitMQ queue; see :class:`studio_runner.queues.base.Delivery`."""

    def __init__(self, link: Link, held: Held) -> None:
        self._link = link
        self._held = held
        self._settled = False
        self.queue = held.queue
        props = held.properties
        self.message_id: str = props.message_id or "sha256:" + hashlib.sha256(held.body).hexdigest()[:16]
        self.body: bytes = held.body
        self.attempt: int = held.attempt
        self.redelivered: bool = held.redelivered
        self.headers: dict[str, Any] = dict(props.headers or {})
        self.lost = trio.Event()
        self.lost_reason: str | None = None
        """Why the claim was lost (consumer timeout, connection loss, shutdown), for logs and metadata."""

    async def ack(self) -> None:
        """Remove the message for good (basic_ack on the channel that received it)."""
        await self._settle("ack", None)

    async def nack(self) -> None:
        """Hand the message back for attempt N+1 (re-published copy, then ack of this one)."""
        await self._settle("nack", None)

    async def release(self) -> None:
        """Hand the message back as attempt N again: a re-published copy carrying the current attempt, then
        ack of this one. The broker's own requeue would set ``redelivered``, which counts as a crash."""
        await self._settle("release", None)

    async def set_aside(self, reason: str) -> None:
        """Move the message to the set-aside queue with ``reason``, then ack it here."""
        await self._settle("set_aside", reason)

    async def keep_alive(self) -> None:
        """Nothing to renew: RabbitMQ's consumer timeout cannot be extended per message (see
        :meth:`RabbitMQQueue.deadline_warning` for the warning instead)."""
        await trio.lowlevel.checkpoint()

    async def _settle(self, op: str, reason: str | None) -> None:
        if self.lost.is_set():
            log.info("%s of message %s of queue %s skipped: the broker already took it back (%s; "
                     "at-least-once)", op, self.message_id, self.queue, self.lost_reason or "claim lost")
            await trio.lowlevel.checkpoint()
            return
        if self._settled:
            log.warning("%s of message %s ignored: it was already settled", op, self.message_id)
            await trio.lowlevel.checkpoint()
            return
        self._settled = True
        done = await await_call(self._link, lambda call: self._link.settle(self._held, op, reason), None)
        if done is None:
            log.info("%s of message %s of queue %s skipped: no connection to the broker, which takes the "
                     "message back (at-least-once)", op, self.message_id, self.queue)


class RabbitMQQueue:
    """Serves StudioML queues of one RabbitMQ broker (one vhost); see the module docstring for the design."""

    kind = "rabbitmq"

    def __init__(self, amqp_url: str, mgmt_url: str | None = None, consumer_timeout_limit: float = 1800,
                 *, consumer_timeout_request: float = 100 * 3600, set_aside_queue: str = SET_ASIDE_QUEUE,
                 receive_wait: float = 1.0, env: Mapping[str, str] | None = None,
                 mgmt_timeout: float = 10.0, watch_hold: float = 2.0, watch_linger: float = 2.0) -> None:
        amqp = expand_env(amqp_url, env)
        self.amqp_url_masked = mask_url(amqp)
        if not amqp.lower().startswith(("amqp://", "amqps://")):
            raise ConfigError(f"--amqp-url must start with amqp:// or amqps://, got {self.amqp_url_masked}")
        mgmt = expand_env(mgmt_url, env) if mgmt_url else derive_mgmt_url(amqp)
        self.vhost = amqp_vhost(amqp)
        self.consumer_timeout_limit = float(consumer_timeout_limit)
        """The broker's node ``consumer_timeout`` (s), as the operator told us: AMQP cannot read it."""
        self.consumer_timeout_request = float(consumer_timeout_request)
        self.set_aside_queue = set_aside_queue
        self.connection_name = f"studio-runner {socket.gethostname()} pid {os.getpid()} #{next(_names)}"
        try:
            params = pika.URLParameters(amqp)
        except ValueError as exc:
            raise ConfigError(f"--amqp-url {self.amqp_url_masked}: {exc}") from None
        params.connection_attempts = 1
        params.retry_delay = 0
        params.client_properties = {"connection_name": self.connection_name}
        if params.blocked_connection_timeout is None:  # memory/disk alarm: give up a blocked publish
            params.blocked_connection_timeout = 300
        if params.ssl_options is not None and params.ssl_options.server_hostname is None:
            params.ssl_options = pika.SSLOptions(params.ssl_options.context, server_hostname=params.host)
        self._mgmt = RabbitMgmt(mgmt, amqp, timeout=mgmt_timeout)
        self.mgmt_url_masked = mask_url(mgmt)
        self._link = Link(params, self.amqp_url_masked, receive_wait, set_aside_queue,
                          lambda held: RabbitMQDelivery(self._link, held), watch_hold=watch_hold,
                          watch_linger=watch_linger)
        self.broker_version: tuple[int, ...] | None = None
        self.per_consumer_timeout: bool | None = None
        """Whether the broker honours ``x-consumer-timeout`` (None until its version is known)."""
        self._started = False
        self._closed = False
        self._mgmt_failing = False
        self._durability_checked: set[str] = set()

    async def __aenter__(self) -> RabbitMQQueue:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Connect (first attempt awaited, up to 15 s), learn the broker version, warn about its timeout."""
        if self._closed:
            raise RuntimeError("RabbitMQQueue is closed")
        if not self._started:
            self._started = True
            self._link.start()
            await trio.to_thread.run_sync(self._link.first_attempt.wait, 15, abandon_on_cancel=True)
        if self.broker_version is None:
            await self._learn_version()

    async def _mgmt_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            result = await trio.to_thread.run_sync(partial(fn, *args), abandon_on_cancel=True)
        except MgmtError as exc:
            if not self._mgmt_failing:
                log.warning("RabbitMQ management API unavailable: %s", exc)
            self._mgmt_failing = True
            raise
        if self._mgmt_failing:
            log.info("RabbitMQ management API at %s answers again", self.mgmt_url_masked)
            self._mgmt_failing = False
        return result

    async def _learn_version(self) -> None:
        try:
            overview = await self._mgmt_call(self._mgmt.overview)
        except MgmtError:
            return
        text = str(overview.get("rabbitmq_version", ""))
        self.broker_version = parse_version(text) or (0,)
        self.per_consumer_timeout = honours_consumer_timeout_arg(self.broker_version)
        if self.per_consumer_timeout:
            log.info("RabbitMQ %s honours x-consumer-timeout: consumers ask for %s", text,
                     format_duration(self.consumer_timeout_request))
        else:
            log.warning(
                "RabbitMQ %s ignores the per-consumer x-consumer-timeout argument: a message left "
                "unacknowledged longer than the broker's consumer_timeout (assumed %s) has its channel "
                "closed and goes back to the queue while its experiment still runs, so it may run twice. %s",
                text or "(unknown version)", format_duration(self.consumer_timeout_limit), _OPERATOR_FIX)

    def deadline_warning(self, seconds: float) -> str | None:
        """A warning for an experiment whose deadline outlives the broker's hold on its message, else None."""
        limit = self.consumer_timeout_request if self.per_consumer_timeout else self.consumer_timeout_limit
        if seconds <= limit:
            return None
        if self.per_consumer_timeout:
            return (f"experiment deadline {format_duration(seconds)} exceeds the consumer timeout the runner "
                    f"asks RabbitMQ for ({format_duration(limit)}): the message may go back to the queue and "
                    "run again elsewhere while this run continues")
        return (f"experiment deadline {format_duration(seconds)} exceeds the RabbitMQ consumer timeout "
                f"({format_duration(limit)}), which this broker applies to every consumer: after that the "
                "broker takes the message back and it may run again elsewhere while this run continues "
                "(the start-up warning names the operator's fix)")

    async def discover(self) -> list[str]:
        """Queues bound to ``StudioML.topic`` in our vhost. Raises MgmtError while the management API is
        down, so the supervisor keeps serving the queues it knew rather than dropping them all."""
        await self.start()
        bindings = await self._mgmt_call(self._mgmt.bindings, self.vhost)
        return studio_queues(bindings)

    async def exists(self, queue: str) -> bool:
        """False only on a definite 404; an unreachable management API is not a deletion."""
        try:
            return await self._mgmt_call(self._mgmt.queue, self.vhost, queue) is not None
        except MgmtError:
            return True

    async def response_queue_exists(self, queue: str) -> bool:
        """Whether ``<queue>_response`` exists (management API, as the Go runner checks it). Raises
        MgmtError while the API does not answer: unknown is not "absent" (the reporter asks again soon)."""
        return await self._mgmt_call(self._mgmt.queue, self.vhost, f"{queue}_response") is not None

    async def publish_response(self, queue: str, body: bytes) -> None:
        """Publish one report on ``<queue>_response`` (persistent, confirmed). A clear report (JSON) goes as
        ``application/json``, a sealed one as ``text/plain`` like Go's. Raises when it was not confirmed."""
        await self.start()
        content_type = "application/json" if body[:1] == b"{" else "text/plain"
        target = f"{queue}_response"
        publish = partial(self._link.publish_report, target, body, content_type)
        why = await await_call(self._link, publish, None)
        if why is None:
            raise ConnectionError(f"not connected to RabbitMQ at {self.amqp_url_masked}")
        if why:
            raise RuntimeError(why)

    async def _check_durability(self, queue: str) -> None:
        if queue in self._durability_checked:
            return
        try:
            info = await self._mgmt_call(self._mgmt.queue, self.vhost, queue)
        except MgmtError:
            return
        if info is None:
            return
        self._durability_checked.add(queue)
        if info.get("durable") is False:
            log.warning("queue %s is not durable: a broker restart deletes it with every message in it. "
                        "Experimenter's fix: cloud.queue.persistent: true in the StudioML config", queue)

    async def receive(self, queue: str) -> RabbitMQDelivery | None:
        """Claim one message of ``queue`` (None when empty, missing or while disconnected): the one our
        waiting consumer holds, else by a consumer of its own (passive declare first)."""
        await self.start()
        if self._link.watched_and_empty(queue):  # our consumer is attached and was given nothing
            await trio.lowlevel.checkpoint()
            return None
        await self._check_durability(queue)
        begin = partial(self._link.begin_receive, queue, self._consume_arguments(),
                        trio.lowlevel.current_trio_token())
        return await await_call(self._link, begin, None, lambda delivery: self._link.release(delivery._held))

    async def wait_for_work(self, queues: Sequence[str], timeout: float) -> None:
        """Return when a standing consumer on one of ``queues`` got a message (kept for its receive()), when
        the connection comes back, or after ``timeout``."""
        await self.start()
        token = trio.lowlevel.current_trio_token()
        with trio.move_on_after(timeout):
            waiter = self._link.add_waiter(frozenset(queues), token)
            try:
                if not waiter.event.is_set():
                    await await_call(self._link, partial(self._link.ensure_watches, list(queues),
                                                         self._consume_arguments(), token), None)
                    await waiter.event.wait()
            finally:
                self._link.remove_waiter(waiter)

    def _consume_arguments(self) -> dict[str, Any] | None:
        if self.per_consumer_timeout:
            return {"x-consumer-timeout": int(self.consumer_timeout_request * 1000)}
        return None

    async def aclose(self) -> None:
        """Stop the IO thread and join it; closing the connection hands unsettled messages back."""
        self._closed = True
        with trio.CancelScope(shield=True):
            if self._started:
                self._link.stop()
                await trio.to_thread.run_sync(self._link.join, 30)
            self._mgmt.close()


if TYPE_CHECKING:  # mypy proves that this backend honours the protocol; nothing runs

    def _honours_the_protocol(backend: RabbitMQQueue,
                              delivery: RabbitMQDelivery) -> tuple[QueueBackend, Delivery, Responder]:
        return backend, delivery, backend
