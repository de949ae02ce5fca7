"""The runner's nursery: queue discovery, intake, one task per running experiment, shutdown.

Dramatiq-style separation: queue backends only know how to claim and settle messages; the executor only
knows how to run one request; the supervisor connects them and owns every decision about a message's fate
(ack, hand back, set aside), so that no experiment is lost and none loops forever.
"""

from __future__ import annotations

import logging
import re
import signal
import time
from dataclasses import dataclass, field

import trio

from studio_runner.errors import RequestInvalid
from studio_runner.executor import Abort, Executor, Outcome
from studio_runner.policies import Retries
from studio_runner.queues.base import Delivery, QueueBackend
from studio_runner.request import Request, parse_request

log = logging.getLogger("studio_runner.supervisor")


@dataclass
class IntakeSettings:
    queue_match: str = r"^(rmq|sqs|local)_.*$"
    queue_mismatch: str = ""
    poll_interval: float = 0.2
    rescan_interval: float = 10.0
    abort_check_interval: float = 10.0
    max_running: int = 1
    drain_timeout: float = 0.0
    retries: Retries = field(default_factory=lambda: Retries(3))


def queue_selected(name: str, match: str, mismatch: str) -> bool:
    """The runner's queue filter: matches ``match``, not ``mismatch``, and is never a ``_response`` queue."""
    if name.endswith("_response"):
        return False
    if not re.search(match, name):
        return False
    return not (mismatch and re.search(mismatch, name))


class Supervisor:
    def __init__(self, backends: list[QueueBackend], executor: Executor, settings: IntakeSettings) -> None:
        self.backends = backends
        self.executor = executor
        self.s = settings
        self.results: list[Outcome] = []
        self.running: dict[int, Abort] = {}
        """The abort handle of each experiment in progress, by delivery."""
        self._queues: list[tuple[QueueBackend, str]] = []
        self._next = 0
        self._stopping = trio.Event()
        self._slot_freed = trio.Event()

    # -- public control -------------------------------------------------------------------------------------
    def shutdown(self, hard: bool = False) -> None:
        """Stop taking work; with ``hard`` (or after --drain-timeout) stop running experiments and hand
        their messages back."""
        if not self._stopping.is_set():
            log.info("shutting down: no new work is taken; %d experiment(s) running", len(self.running))
            self._stopping.set()
        if hard:
            for abort in self.running.values():
                abort.trigger("the runner is shutting down", hand_back=True)

    async def run(self, once: bool = False, handle_signals: bool = False) -> list[Outcome]:
        """Serve queues until shutdown (or, with ``once``, until every queue is empty and nothing runs)."""
        async with trio.open_nursery() as nursery:
            if handle_signals:
                nursery.start_soon(self._signals)
            await self._rescan()
            nursery.start_soon(self._rescan_loop)
            async with trio.open_nursery() as work:
                await self._intake(work, once)
                if self._stopping.is_set() and self.running:
                    await self._drain()
            nursery.cancel_scope.cancel()
        return self.results

    # -- discovery and intake -------------------------------------------------------------------------------
    async def _rescan(self) -> None:
        queues: list[tuple[QueueBackend, str]] = []
        for backend in self.backends:
            try:
                names = await backend.discover()
            except Exception as exc:  # a broker being down is not fatal: keep the last list
                log.warning("listing %s queues failed: %s", backend.kind, exc)
                queues.extend(q for q in self._queues if q[0] is backend)
                continue
            for name in sorted(names):
                if queue_selected(name, self.s.queue_match, self.s.queue_mismatch):
                    queues.append((backend, name))
        if [q[1] for q in queues] != [q[1] for q in self._queues]:
            log.info("serving %d queue(s): %s", len(queues), ", ".join(q[1] for q in queues) or "none")
        self._queues = queues

    async def _rescan_loop(self) -> None:
        while True:
            await trio.sleep(self.s.rescan_interval)
            await self._rescan()

    async def _receive_any(self) -> tuple[QueueBackend, Delivery] | None:
        """One message from the next queue that has one, round-robin so no queue starves another."""
        queues = list(self._queues)
        for offset in range(len(queues)):
            backend, name = queues[(self._next + offset) % len(queues)]
            try:
                delivery = await backend.receive(name)
            except Exception as exc:
                log.warning("receiving from %s queue %s failed: %s", backend.kind, name, exc)
                continue
            if delivery is not None:
                self._next = (self._next + offset + 1) % len(queues)
                return backend, delivery
        return None

    async def _intake(self, work: trio.Nursery, once: bool) -> None:
        while not self._stopping.is_set():
            if len(self.running) < self.s.max_running:
                got = await self._receive_any()
                if got is not None:
                    work.start_soon(self._handle, *got)
                    await trio.sleep(0)
                    continue
                if once and not self.running:
                    if self._queues or not await self._any_queue_later():
                        return
            self._slot_freed = trio.Event()
            with trio.move_on_after(self.s.poll_interval if len(self.running) < self.s.max_running else 3600):
                async with trio.open_nursery() as waiter:
                    waiter.start_soon(_wake_on, self._stopping, waiter.cancel_scope)
                    waiter.start_soon(_wake_on, self._slot_freed, waiter.cancel_scope)

    async def _any_queue_later(self) -> bool:
        """With --once and no queue yet: rescan once more so a just-created queue is not missed."""
        await self._rescan()
        return bool(self._queues)

    async def _drain(self) -> None:
        if self.s.drain_timeout > 0:
            log.info("waiting up to %.0fs for running experiments to finish", self.s.drain_timeout)
            with trio.move_on_after(self.s.drain_timeout):
                while self.running:
                    await trio.sleep(0.1)
        self.shutdown(hard=True)

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            count = 0
            async for signum in signals:
                count += 1
                name = signal.Signals(signum).name
                if count == 1:
                    log.warning("%s received: finishing up (send it again to stop experiments now)", name)
                    self.shutdown(hard=False)
                else:
                    log.warning("%s received again: stopping running experiments", name)
                    self.shutdown(hard=True)

    # -- one message ----------------------------------------------------------------------------------------
    async def _handle(self, backend: QueueBackend, delivery: Delivery) -> None:
        token = id(delivery)
        abort = Abort()
        self.running[token] = abort
        try:
            outcome = await self._process(backend, delivery, abort)
            await self._settle(delivery, outcome)
            self.results.append(outcome)
        finally:
            del self.running[token]
            self._slot_freed.set()

    async def _process(self, backend: QueueBackend, delivery: Delivery, abort: Abort) -> Outcome:
        try:
            request = parse_request(delivery.body)
        except RequestInvalid as exc:
            log.error("message %s on %s is not a valid request, setting it aside: %s",
                      delivery.message_id, delivery.queue, exc)
            return Outcome(key=delivery.message_id, status="invalid", action="set_aside", reason=str(exc),
                           queue=delivery.queue, finished=time.time())
        key = request.experiment.key
        log.info("experiment %s from %s %s (attempt %d) starting", key, backend.kind, delivery.queue,
                 delivery.attempt)
        self._warn_if_broker_may_requeue(backend, request, key)
        async with trio.open_nursery() as watchers:
            watchers.start_soon(self._watch_queue, backend, delivery.queue, abort)
            watchers.start_soon(self._watch_claim, delivery, key, abort)
            outcome = await self.executor.run(request, queue=delivery.queue, attempt=delivery.attempt,
                                              abort=abort)
            watchers.cancel_scope.cancel()
        return outcome

    async def _settle(self, delivery: Delivery, outcome: Outcome) -> None:
        action = outcome.action
        if action == "nack" and self.s.retries.gives_up(delivery.attempt):
            action = "set_aside"
            outcome.reason = f"{outcome.reason} (gave up after {delivery.attempt} attempts)"
        summary = f"{outcome.status} in {outcome.seconds:.1f}s" + (f": {outcome.reason}" if outcome.reason
                                                                    else "")
        level = logging.INFO if outcome.status == "success" else logging.WARNING
        log.log(level, "experiment %s on %s: %s", outcome.key, outcome.queue, summary)
        if delivery.lost.is_set():
            log.warning("experiment %s: the queue took its message back while it ran; not acknowledging "
                        "(it may run again elsewhere, its artifacts are overwritten atomically)", outcome.key)
            return
        with trio.CancelScope(shield=True):
            try:
                if action == "ack":
                    await delivery.ack()
                elif action == "nack":
                    await delivery.nack()
                else:
                    await delivery.set_aside(f"{outcome.status}: {outcome.reason}")
            except Exception as exc:  # the broker will redeliver: at least once, never lost
                log.error("could not %s message of %s: %s", action, outcome.key, exc)

    async def _watch_queue(self, backend: QueueBackend, queue: str, abort: Abort) -> None:
        """The experimenter deletes the queue to abort its experiments (spec queues.md §6)."""
        while True:
            await trio.sleep(self.s.abort_check_interval)
            try:
                exists = await backend.exists(queue)
            except Exception as exc:  # an error is not a deletion
                log.debug("checking queue %s failed: %s", queue, exc)
                continue
            if not exists:
                log.warning("queue %s was deleted: aborting its experiment", queue)
                abort.trigger(f"queue {queue} was deleted")
                self._queues = [q for q in self._queues if q != (backend, queue)]  # until a rescan lists it
                return

    async def _watch_claim(self, delivery: Delivery, key: str, abort: Abort) -> None:
        await delivery.lost.wait()
        why = getattr(delivery, "lost_reason", None) or "channel closed or lease expired"
        log.warning("experiment %s: the queue took its message back while it runs (%s); it keeps running, "
                    "its results are uploaded, and the requeued copy may run again elsewhere", key, why)
        abort.note(f"the queue took this experiment's message back while it ran ({why}); results are still "
                   "uploaded, and the requeued copy may run again", claim_lost=why)

    def _warn_if_broker_may_requeue(self, backend: QueueBackend, request: Request, key: str) -> None:
        """RabbitMQ before 3.11.15 closes a delivery's channel after its node-wide consumer timeout."""
        warn = getattr(backend, "deadline_warning", None)
        if warn is None:
            return
        limits = [request.experiment.max_duration, request.config.experiment_lifetime]
        known = [limit for limit in limits if limit]
        message = warn(min(known + [self.executor.s.deadline.cap_seconds]))
        if message:
            log.warning("experiment %s: %s", key, message)


async def _wake_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
