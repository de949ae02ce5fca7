"""The runner's nursery: queue discovery, intake, one task per message in hand, shutdown.

Dramatiq-style separation: queue backends only know how to claim and settle messages; the executor only
knows how to run one request; the supervisor connects them and owns every decision about a message's fate
(ack, hand back after a back-off, release, set aside), so that no experiment is lost and none loops forever.

Intake rules, in order: take nothing while stopping; take nothing while results cannot be saved
(:class:`~studio_runner.storage.StorageHealth`); take a message only when a slot is free (``max_running``,
0 = no cap) and the :class:`~studio_runner.resources.Ledger` has a core free; skip a queue whose last
request (the per-queue memory of spec/resources.md §2) does not fit now. A message is parsed and its
resources reserved in the intake loop itself, *before* its task starts and before anything is downloaded,
so neither the slot count nor the ledger can be overrun by messages taken in a burst. A request that does
not fit now is released at once without counting an attempt; one that can never fit this runner (more
cores or GPUs than it has) is released too and its queue skipped for ``never_fit_pause``, with a log line
saying why.
A message whose attempt failed on the runner's side is held for a back-off (exponential, with jitter) before
it is handed back, so a flapping store or disk does not burn all of its attempts in a second; its slot is
free meanwhile.
"""

from __future__ import annotations

import collections
import logging
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from studio_runner.admission import Admission
from studio_runner.attempt import Abort, Action, Outcome, Phase, Status, StopCause
from studio_runner.errors import RequestInvalid, RequestRefused
from studio_runner.events import AttemptRecord, IntakeChanged, QueueChecked, QueuesListed, Registry
from studio_runner.gate import RequestGate
from studio_runner.policies import Retries
from studio_runner.queues.base import Delivery, QueueBackend
from studio_runner.redact import mask_patterns, scrub
from studio_runner.request import Request
from studio_runner.resources import Demand, Ledger, Reservation
from studio_runner.storage import StorageHealth
from studio_runner.units import format_elapsed

log = logging.getLogger("studio_runner.supervisor")

_BIG_BODY = 1 << 20
"""Bodies larger than this are parsed in a worker thread, so a huge message cannot stall the nursery."""


class AttemptRunner(Protocol):
    """What the supervisor needs of the executor."""

    async def run(self, request: Request, *, queue: str = "", attempt: int = 1, abort: Abort | None = None,
                  record: AttemptRecord | None = None, last_attempt: bool = False,
                  reservation: Reservation | None = None) -> Outcome: ...

    @property
    def max_seconds(self) -> float:
        """The longest any attempt may run (the runner's --max-lifetime), for broker warnings."""
        ...


@dataclass
class IntakeSettings:
    queue_match: str = r"^(rmq|sqs|local)_.*$"
    queue_mismatch: str = ""
    poll_interval: float = 0.2
    idle_repoll: float = 5.0
    """With nothing found, intake waits on the backends (file events, broker consumers) and polls every
    queue again after this long at most (the safety net for a change a backend could not see)."""
    rescan_interval: float = 10.0
    abort_check_interval: float = 10.0
    max_running: int = 1
    """Experiments at once at most; 0 = as many as the ledger admits."""
    drain_timeout: float = 0.0
    retries: Retries = field(default_factory=lambda: Retries(3))
    keep_alive_interval: float = 15.0
    ledger: Ledger | None = None
    """Cores, RAM, disk and GPUs; None = only ``max_running`` limits intake (tests of other rules)."""
    refused_pause: float = 30.0
    """A queue whose last request did not fit is skipped until it would fit, or for at most this long
    (the next message may be smaller)."""
    never_fit_pause: float = 300.0
    """How long a queue whose request can never fit this runner is skipped."""
    gpu_refresh_interval: float = 5.0
    """How often GPU figures are re-read (ECC fencing, cards drained after an experiment)."""
    keep_results: int = 1000
    """Outcomes kept for ``run()``'s return value (the CLI's --once, the demo, tests); older ones drop."""
    gate: RequestGate = field(default_factory=RequestGate)
    """Bytes -> request: size limit, clear-text policy, envelope verification and decryption. The default
    accepts clear text only (an envelope is refused: no keys)."""


RUNNING = "Running"
DRAIN_AND_SUSPEND = "DrainAndSuspend"
DRAIN_AND_TERMINATE = "DrainAndTerminate"
SHUTTING_DOWN = "ShuttingDown"
INTAKE_STATES = (RUNNING, DRAIN_AND_SUSPEND, DRAIN_AND_TERMINATE)
"""The states an operator sets (state file, POST /intake); the spec's Kubernetes ConfigMap values.
``ShuttingDown`` is the runner's own, after a signal, and cannot be left."""


def backend_location(backend: QueueBackend) -> str:
    """Where a backend's queues live, for metrics and status: its queue root or its broker URL (masked)."""
    root = getattr(backend, "root", None)
    if root is not None:
        return str(root)
    url = getattr(backend, "amqp_url_masked", None) or getattr(backend, "location", None)
    return mask_patterns(str(url)) if url else backend.kind


def queue_selected(name: str, match: str, mismatch: str) -> bool:
    """The runner's queue filter: matches ``match``, not ``mismatch``, and is never a ``_response`` queue."""
    if name.endswith("_response"):
        return False
    if not re.search(match, name):
        return False
    return not (mismatch and re.search(mismatch, name))


@dataclass
class _Held:
    """A message in our hands, from claim to settlement."""

    backend: QueueBackend
    delivery: Delivery
    record: AttemptRecord
    abort: Abort = field(default_factory=Abort)
    request: Request | None = None
    reservation: Reservation | None = None
    early: Outcome | None = None
    """Decided at intake without running (not a request, does not fit): only settled."""


class Supervisor:
    def __init__(self, backends: list[QueueBackend], executor: AttemptRunner, settings: IntakeSettings,
                 registry: Registry | None = None, health: StorageHealth | None = None,
                 hostname: str = "runner") -> None:
        self.backends = backends
        self.executor = executor
        self.s = settings
        self.registry = registry if registry is not None else Registry(hostname)
        self.health = health if health is not None else StorageHealth()
        self.results: collections.deque[Outcome] = collections.deque(maxlen=max(1, settings.keep_results))
        self._held: dict[str, _Held] = {}
        self._running = 0
        self._queues: list[tuple[QueueBackend, str]] = []
        self.admission = Admission(settings.ledger, refused_pause=settings.refused_pause,
                                   never_fit_pause=settings.never_fit_pause)
        self._cards_released = trio.Event()
        self._next = 0
        self._stopping = trio.Event()
        self._wake = trio.Event()
        self._rescan_now = trio.Event()
        self.intake_state = RUNNING
        self.intake_reason = ""
        self.intake_since = time.time()
        self.on_reload: Callable[[], object] | None = None
        """Called on SIGHUP (with ``handle_signals``): the runtime re-reads the configuration file."""

    # -- public control -------------------------------------------------------------------------------------
    @property
    def running(self) -> int:
        """Messages occupying a slot now (claimed and not yet finished running and uploading)."""
        return self._running

    def set_intake_state(self, state: str, reason: str) -> None:
        """Obey an operator: ``Running`` takes work; ``DrainAndSuspend`` takes none while running experiments
        finish (and are acknowledged as usual), until ``Running`` again; ``DrainAndTerminate`` takes none
        and ends :meth:`run` once nothing is held. Raises ValueError for any other state. Once shutting down
        (a signal), the state no longer changes."""
        if state not in INTAKE_STATES:
            raise ValueError(f"unknown intake state {state!r}; expected one of {', '.join(INTAKE_STATES)}")
        if self.intake_state == SHUTTING_DOWN or state == self.intake_state:
            return
        self._set_state(state, reason)
        if state == RUNNING:
            log.info("intake resumed (%s)", reason)
        else:
            log.info("intake %s (%s): no new work is taken; %d experiment(s) running", state, reason,
                     self._running)
        self._notify()

    def _set_state(self, state: str, reason: str) -> None:
        self.intake_state, self.intake_reason, self.intake_since = state, reason, time.time()
        self.registry.bus.publish(IntakeChanged(state, reason, self.intake_since))

    def served_queues(self) -> list[dict[str, object]]:
        """The queues served now, for status pages: backend, name, seconds until looked at again (None
        when open) and a note saying why it is skipped."""
        now = trio.current_time()
        rows: list[dict[str, object]] = []
        for backend, name in self._queues:
            paused, note = self.admission.describe((backend.kind, name), now, self._is_held)
            rows.append({"backend": backend.kind, "name": name, "paused_for_s": paused, "note": note})
        return rows

    def _is_held(self, attempt_id: str) -> bool:
        return attempt_id in self._held

    def shutdown(self, hard: bool = False) -> None:
        """Stop taking work; with ``hard`` (or after --drain-timeout) stop running experiments and hand
        their messages back; messages waiting out a back-off are handed back at once."""
        if not self._stopping.is_set():
            log.info("shutting down: no new work is taken; %d experiment(s) running", self._running)
            self._stopping.set()
            self._set_state(SHUTTING_DOWN, "shutting down")
            self._notify()
        if hard:
            for held in list(self._held.values()):
                held.abort.trigger(StopCause.SHUTDOWN, "the runner is shutting down")

    async def run(self, once: bool = False, handle_signals: bool = False) -> list[Outcome]:
        """Serve queues until shutdown (or, with ``once``, until every queue is empty and nothing is held)."""
        async with trio.open_nursery() as nursery:
            if handle_signals:
                nursery.start_soon(self._signals)
            await self._rescan()
            nursery.start_soon(self._rescan_loop)
            ledger = self.s.ledger
            if ledger is not None and ledger.gpus is not None and ledger.gpus.backend.kind != "none":
                nursery.start_soon(self._gpu_refresh_loop, ledger)  # a runner without GPUs never gains one
            async with trio.open_nursery() as work:
                await self._intake(work, once)
                if self._stopping.is_set() and self._held:
                    await self._drain()
            nursery.cancel_scope.cancel()
        return list(self.results)

    # -- discovery ------------------------------------------------------------------------------------------
    async def _rescan(self) -> None:
        queues: list[tuple[QueueBackend, str]] = []
        publish = self.registry.bus.publish
        for backend in self.backends:
            try:
                names = await backend.discover()
            except Exception as exc:  # a broker being down is not fatal: keep the last list
                log.warning("listing %s queues failed: %s", backend.kind, exc)
                kept = [q for q in self._queues if q[0] is backend]
                queues.extend(kept)
                publish(QueuesListed(backend.kind, backend_location(backend), False,
                                     tuple(q[1] for q in kept), str(exc) or type(exc).__name__))
                continue
            mine = [name for name in sorted(names)
                    if queue_selected(name, self.s.queue_match, self.s.queue_mismatch)]
            queues.extend((backend, name) for name in mine)
            publish(QueuesListed(backend.kind, backend_location(backend), True, tuple(mine)))
        changed = [q[1] for q in queues] != [q[1] for q in self._queues]
        if changed:
            log.info("serving %d queue(s): %s", len(queues), ", ".join(q[1] for q in queues) or "none")
        self._queues = queues
        if changed:
            self._notify()  # intake may be waiting on the old list: look at the new queues now

    def wake(self) -> None:
        """Make intake look at its rules again now (a limit or filter changed)."""
        self._notify()

    def rescan_soon(self) -> None:
        """List the queues again now (the name filter changed), not at the next --rescan-interval."""
        self._rescan_now.set()

    async def _rescan_loop(self) -> None:
        while True:
            with trio.move_on_after(self.s.rescan_interval):
                await self._rescan_now.wait()
            self._rescan_now = trio.Event()
            await self._rescan()

    async def _gpu_refresh_loop(self, ledger: Ledger) -> None:
        """Re-read the cards: fence those with ECC errors, return drained ones (then intake may resume).
        Every few seconds, and at once when an experiment gave cards back."""
        while True:
            with trio.move_on_after(self.s.gpu_refresh_interval):
                await self._cards_released.wait()
            self._cards_released = trio.Event()
            try:
                changed = await trio.to_thread.run_sync(ledger.refresh)
            except Exception as exc:  # NVML hiccups must not stop the runner
                log.warning("reading GPU state failed: %s", exc)
                continue
            if changed:
                self._notify()

    # -- intake ---------------------------------------------------------------------------------------------
    async def _intake(self, work: trio.Nursery, once: bool) -> None:
        outage_logged = False
        while not self._stopping.is_set():
            if self.intake_state != RUNNING:
                if not self._held and (self.intake_state == DRAIN_AND_TERMINATE or once):
                    if self.intake_state == DRAIN_AND_TERMINATE:
                        log.info("drained: nothing is running; terminating as the state asks")
                    return
                for backend in self.backends:  # the spec's runner_queue_ignored with queue name "*"
                    self.registry.bus.publish(QueueChecked(backend.kind, backend_location(backend), "*",
                                                           ignored=True))
                with trio.move_on_after(self.s.idle_repoll):
                    await self._wake.wait()
                continue
            outage = self.health.outage
            if outage and not outage_logged:
                log.warning("not taking new work while results cannot be saved (%s)", outage)
            outage_logged = bool(outage)
            if self._has_room() and not outage:
                got = await self._receive_any()
                if got is not None:
                    await self._start(work, *got)
                    continue
                if once and not self._held and (self._queues or not await self._any_queue_later()):
                    return
            elif once and not self._held and outage:
                log.error("giving up --once: %s", outage)
                return
            idle = self._has_room() and not outage
            wait = self._idle_wait() if idle else 5.0
            with trio.move_on_after(wait):
                async with trio.open_nursery() as waiter:
                    waiter.start_soon(_wake_on, self._wake, waiter.cancel_scope)
                    waiter.start_soon(_wake_on_health, self.health, waiter.cancel_scope)
                    if idle:  # first one wins: new work, a wake event, or the re-poll deadline
                        for backend, names in self._waitable_queues():
                            waiter.start_soon(_wake_on_work, backend, names, wait, self.s.poll_interval,
                                              waiter.cancel_scope)

    def _waitable_queues(self) -> list[tuple[QueueBackend, list[str]]]:
        """Served queues intake would receive from now, by backend (a paused queue must not wake it)."""
        now = trio.current_time()
        by_backend: dict[int, tuple[QueueBackend, list[str]]] = {}
        for backend, name in self._queues:
            if not self.admission.queue_open((backend.kind, name), now, self._is_held):
                continue
            by_backend.setdefault(id(backend), (backend, []))[1].append(name)
        return list(by_backend.values())

    def _idle_wait(self) -> float:
        """Until the safety re-poll, or until the first paused queue may be served again."""
        now = trio.current_time()
        return min([self.s.idle_repoll, *self.admission.pauses(now)])

    def _has_room(self) -> bool:
        """A slot is free and the ledger has a core free (every experiment reserves at least one)."""
        if self.s.max_running and self._running >= self.s.max_running:
            return False
        return self.s.ledger is None or self.s.ledger.has_room

    def _notify(self) -> None:
        self._wake.set()
        self._wake = trio.Event()

    async def _receive_any(self) -> tuple[QueueBackend, Delivery] | None:
        """One message from the next queue that has one, round-robin so no queue starves another."""
        queues = list(self._queues)
        now = trio.current_time()
        publish = self.registry.bus.publish
        for offset in range(len(queues)):
            backend, name = queues[(self._next + offset) % len(queues)]
            if not self.admission.queue_open((backend.kind, name), now, self._is_held):
                publish(QueueChecked(backend.kind, backend_location(backend), name, ignored=True))
                continue
            publish(QueueChecked(backend.kind, backend_location(backend), name))
            try:
                delivery = await backend.receive(name)
            except Exception as exc:
                log.warning("receiving from %s queue %s failed: %s", backend.kind, name, exc)
                continue
            if delivery is not None:
                self._next = (self._next + offset + 1) % len(queues)
                return backend, delivery
        return None

    async def _any_queue_later(self) -> bool:
        """With --once and no queue yet: rescan once more so a just-created queue is not missed."""
        await self._rescan()
        return bool(self._queues)

    async def _start(self, work: trio.Nursery, backend: QueueBackend, delivery: Delivery) -> None:
        """Take the slot, parse the message and reserve its resources now, before the task runs: the count
        of running attempts and the ledger are exact however many messages arrive at once."""
        record = self.registry.claim(delivery.queue, backend.kind, delivery.message_id, delivery.attempt)
        held = _Held(backend, delivery, record)
        self._held[record.attempt_id] = held
        self._running += 1
        try:
            parsed = await self._parse(held)
            if isinstance(parsed, Outcome):
                held.early = parsed
            else:
                held.request = parsed
                exp = parsed.experiment
                self.registry.identify(record, exp.key, exp.project)
                held.early = self._hold_off_twin(held, exp.key) or self._admit(held, parsed)
        except Exception as exc:  # a bug of ours: the message goes back, the runner keeps serving
            log.error("internal error taking message %s", delivery.message_id, exc_info=exc)
            held.early = self._outcome_for(held, Status.FAULT, Action.HAND_BACK,
                                           f"internal error: {type(exc).__name__}")
        work.start_soon(self._handle, held)

    def _hold_off_twin(self, held: _Held, key: str) -> Outcome | None:
        """Never run one experiment twice at once here: a message redelivered after its claim was lost (broker
        restart, consumer timeout) while its first attempt still runs, or a resubmission under the same key,
        is released (uncounted) and its queue skipped until that attempt has ended."""
        twin = next((other for other in self._held.values()
                     if other is not held and other.early is None and other.request is not None
                     and other.request.experiment.key == key), None)
        if twin is None:
            return None
        queue = held.delivery.queue
        self.admission.hold_for_twin((held.backend.kind, queue), twin.record.attempt_id)
        log.warning("experiment %s from %s is already running on this runner (attempt id %s): released, and "
                    "%s skipped until that attempt ends", key, queue, twin.record.attempt_id, queue)
        return self._outcome_for(held, Status.DEFERRED, Action.RELEASE,
                                 f"already running here as attempt {twin.record.attempt_id}", key=key)

    def _admit(self, held: _Held, request: Request) -> Outcome | None:
        """Reserve the request's resources, or decide to release it (None: admitted)."""
        exp = request.experiment
        demand = Demand.of(exp.resources)
        verdict = self.admission.reserve((held.backend.kind, held.delivery.queue), held.record.attempt_id,
                                         exp.key, demand, trio.current_time())
        if isinstance(verdict, str):
            return self._outcome_for(held, Status.DEFERRED, Action.RELEASE, verdict, key=exp.key)
        held.reservation = verdict
        if verdict is not None:
            self.registry.reserved(held.record, demand.cores, demand.ram,
                                   verdict.gpu_env.get("CUDA_VISIBLE_DEVICES", ""))
        return None

    def _free_slot(self, held: _Held) -> None:
        self._running -= 1
        if held.reservation is not None and self.s.ledger is not None:
            self.s.ledger.release(held.record.attempt_id, held.record.pids)
            if held.reservation.gpu_env:
                self._cards_released.set()
            held.reservation = None
        self._notify()

    async def _drain(self) -> None:
        if self.s.drain_timeout > 0 and self._running:
            log.info("waiting up to %.0fs for running experiments to finish", self.s.drain_timeout)
            with trio.move_on_after(self.s.drain_timeout):
                while self._running:
                    await trio.sleep(0.1)
        self.shutdown(hard=True)

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            count = 0
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    if self.on_reload is None:
                        log.info("SIGHUP received: no configuration file to reload")
                    else:
                        log.info("SIGHUP received: reloading the configuration")
                        self.on_reload()
                    continue
                count += 1
                if count == 1:
                    log.warning("%s received: finishing up (send it again to stop experiments now)", name)
                    self.shutdown(hard=False)
                else:
                    log.warning("%s received again: stopping running experiments", name)
                    self.shutdown(hard=True)

    # -- one message ----------------------------------------------------------------------------------------
    async def _handle(self, held: _Held) -> None:
        outcome: Outcome | None = None
        try:
            async with trio.open_nursery() as watchers:
                watchers.start_soon(self._keep_alive, held)
                watchers.start_soon(self._watch_claim, held)
                try:
                    outcome = await self._process(held, watchers)
                except Exception as exc:  # a bug of ours: the message goes back, the runner keeps serving
                    log.error("internal error handling message %s", held.delivery.message_id, exc_info=exc)
                    outcome = self._outcome_for(held, Status.FAULT, Action.HAND_BACK,
                                                f"internal error: {type(exc).__name__}")
                finally:
                    self._free_slot(held)
                self.registry.finish(held.record, outcome)
                await self._back_off(held, outcome)
                watchers.cancel_scope.cancel()
            await self._settle(held, outcome)
        finally:
            self._held.pop(held.record.attempt_id, None)
            self._notify()

    async def _process(self, held: _Held, watchers: trio.Nursery) -> Outcome:
        delivery, request = held.delivery, held.request
        if held.early is not None:
            return held.early
        assert request is not None
        exp = request.experiment
        holds = f" holding {held.reservation.demand.describe()}" if held.reservation else ""
        log.info("experiment %s from %s %s (attempt %d) starting, attempt id %s%s", exp.key,
                 held.backend.kind, delivery.queue, delivery.attempt, held.record.attempt_id, holds)
        self._warn_if_broker_may_requeue(held.backend, request, exp.key)
        watchers.start_soon(self._watch_queue, held)
        return await self.executor.run(request, queue=delivery.queue, attempt=delivery.attempt,
                                       abort=held.abort, record=held.record,
                                       last_attempt=self.s.retries.gives_up(delivery.attempt),
                                       reservation=held.reservation)

    async def _parse(self, held: _Held) -> Request | Outcome:
        """The gate's verdict on the message; big bodies and envelopes (RSA, a first key load) are opened in a
        worker thread. A refusal or an invalid request is set aside once, with its reason (never a secret)."""
        body, queue, gate = held.delivery.body, held.delivery.queue, self.s.gate
        try:
            if len(body) > _BIG_BODY or gate.costly(body):
                return await trio.to_thread.run_sync(gate.open, body, queue)
            return gate.open(body, queue)
        except RequestRefused as exc:
            log.error("message %s on %s refused, setting it aside: %s", held.delivery.message_id, queue, exc)
            return self._outcome_for(held, Status.INVALID, Action.SET_ASIDE, f"refused: {exc}")
        except RequestInvalid as exc:
            log.error("message %s on %s is not a valid request, setting it aside: %s",
                      held.delivery.message_id, queue, exc)
            return self._outcome_for(held, Status.INVALID, Action.SET_ASIDE, str(exc))

    def _outcome_for(self, held: _Held, status: Status, action: Action, reason: str,
                     key: str | None = None) -> Outcome:
        outcome = Outcome(key=key or held.delivery.message_id, status=status, action=action, reason=reason,
                          attempt_id=held.record.attempt_id, attempt=held.delivery.attempt,
                          queue=held.delivery.queue, started=held.record.claimed_at, finished=time.time())
        return outcome

    async def _back_off(self, held: _Held, outcome: Outcome) -> None:
        """Hold a message that failed on our side before handing it back (not when it is the last try)."""
        if outcome.action is not Action.HAND_BACK or held.delivery.lost.is_set():
            return
        if self.s.retries.gives_up(held.delivery.attempt) or self._stopping.is_set():
            return
        delay = self.s.retries.delay(held.delivery.attempt)
        self.registry.phase(held.record, Phase.BACKOFF)
        log.info("experiment %s: attempt %d failed on the runner's side (%s); handing it back in %.0fs",
                 outcome.key, held.delivery.attempt, outcome.reason, delay)
        with trio.move_on_after(delay):
            async with trio.open_nursery() as waiter:
                waiter.start_soon(_wake_on, self._stopping, waiter.cancel_scope)
                waiter.start_soon(_wake_on, held.delivery.lost, waiter.cancel_scope)

    async def _settle(self, held: _Held, outcome: Outcome) -> None:
        delivery = held.delivery
        action = outcome.action
        if action is Action.HAND_BACK and self.s.retries.gives_up(delivery.attempt):
            action = Action.SET_ASIDE
            outcome.reason = f"{outcome.reason} (gave up after {delivery.attempt} attempts)"
        outcome.action = action
        self.results.append(outcome)
        summary = f"{outcome.status} in {format_elapsed(outcome.seconds)}" + (
            f": {outcome.reason}" if outcome.reason else "")
        level = logging.INFO if outcome.status in (Status.SUCCESS, Status.DEFERRED) else logging.WARNING
        log.log(level, "experiment %s on %s: %s (attempt %d, %s)", outcome.key, outcome.queue, summary,
                delivery.attempt, _ACTION_WORDS[action])
        if delivery.lost.is_set():
            log.warning("experiment %s: the queue took its message back while it ran; not acknowledging it "
                        "(it may run again elsewhere, its artifacts are overwritten atomically)", outcome.key)
            self.registry.settle(held.record, None)
            return
        self.registry.phase(held.record, Phase.SETTLING)
        with trio.CancelScope(shield=True):
            try:
                if action is Action.ACK:
                    await delivery.ack()
                elif action is Action.HAND_BACK:
                    await delivery.nack()
                elif action is Action.RELEASE:
                    await delivery.release()
                else:
                    await delivery.set_aside(scrub(f"{outcome.status}: {outcome.reason}"))
            except Exception as exc:  # the broker will redeliver: at least once, never lost
                log.error("could not %s message of %s: %s", action, outcome.key, exc)
        self.registry.settle(held.record, action)

    # -- watchers -------------------------------------------------------------------------------------------
    async def _watch_queue(self, held: _Held) -> None:
        """The experimenter deletes the queue to abort its experiments (spec queues.md §6)."""
        backend, queue = held.backend, held.delivery.queue
        while True:
            await trio.sleep(self.s.abort_check_interval)
            try:
                exists = await backend.exists(queue)
            except Exception as exc:  # an error is not a deletion
                log.debug("checking queue %s failed: %s", queue, exc)
                continue
            if not exists:
                log.warning("queue %s was deleted: aborting its experiment", queue)
                held.abort.trigger(StopCause.QUEUE_DELETED, f"queue {queue} was deleted")
                self._queues = [q for q in self._queues if q != (backend, queue)]  # until a rescan lists it
                return

    async def _watch_claim(self, held: _Held) -> None:
        delivery = held.delivery
        await delivery.lost.wait()
        why = delivery.lost_reason or "channel closed or lease expired"
        log.warning("experiment %s: the queue took its message back while we hold it (%s); a running "
                    "experiment keeps running, its results are uploaded, and the requeued copy may run again "
                    "elsewhere", held.record.key or delivery.message_id, why)
        held.abort.note(f"the queue took this experiment's message back while it ran ({why}); results are "
                        "still uploaded, and the requeued copy may run again", claim_lost=why)

    async def _keep_alive(self, held: _Held) -> None:
        while True:
            await trio.sleep(self.s.keep_alive_interval)
            try:
                await held.delivery.keep_alive()
            except Exception as exc:
                log.warning("renewing the claim on message %s failed: %s", held.delivery.message_id, exc)

    def _warn_if_broker_may_requeue(self, backend: QueueBackend, request: Request, key: str) -> None:
        """RabbitMQ before 3.11.15 closes a delivery's channel after its node-wide consumer timeout."""
        limits = [request.experiment.max_duration, request.config.experiment_lifetime]
        known = [limit for limit in limits if limit]
        message = backend.deadline_warning(min(known + [self.executor.max_seconds]))
        if message:
            log.warning("experiment %s: %s", key, message)


_ACTION_WORDS = {
    Action.ACK: "acknowledged",
    Action.HAND_BACK: "handed back for another attempt",
    Action.RELEASE: "released (no attempt counted)",
    Action.SET_ASIDE: "set aside",
}


async def _wake_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _wake_on_work(backend: QueueBackend, queues: list[str], timeout: float, poll_interval: float,
                        scope: trio.CancelScope) -> None:
    try:
        await backend.wait_for_work(queues, timeout)
    except Exception as exc:  # a backend that cannot wait must not stall intake: poll it instead
        log.warning("waiting for work on %s queues failed (%s: %s); polling", backend.kind,
                    type(exc).__name__, exc)
        await trio.sleep(poll_interval)
    scope.cancel()


async def _wake_on_health(health: StorageHealth, scope: trio.CancelScope) -> None:
    await health.wait_changed()
    scope.cancel()
