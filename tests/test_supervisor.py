"""The supervisor's decisions, fast and in-process: the memory queue (contract-tested like the real backends)
and a scripted executor that plays outcomes, under trio's mock clock so back-offs take no real time.

What is checked here is the supervisor's own logic (exact concurrency, ack / hand back / release / set
aside, back-off, shutdown, lost claims, storage outages, admission); the real executor, processes and
backends are exercised end to end in test_end_to_end.py and test_rabbitmq_runner.py.
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
import trio
import trio.testing

from studio_runner.attempt import Abort, Action, Outcome, Phase, Status, StopCause
from studio_runner.events import AttemptRecord, Finished, PhaseChanged, Registry, Settled
from studio_runner.policies import Backoff, Retries
from studio_runner.queues.memory import MemoryQueue
from studio_runner.request import Request
from studio_runner.resources import Capacity, Ledger, Reservation
from studio_runner.storage import StorageHealth
from studio_runner.supervisor import IntakeSettings, Supervisor

QUEUE = "local_sup"


def body(key: str, hdd: str | None = None, **needs: object) -> bytes:
    resources: dict[str, object] = {"hdd": hdd} if hdd else {}
    resources.update(needs)
    return json.dumps({"experiment": {"key": key, "filename": "x.py", "artifacts": {},
                                      "resources_needed": resources}, "config": {}}).encode()


class ScriptedExecutor:
    """Plays ``script[key]`` (a list of (seconds, status, action), one per call for that key; the last one
    repeats) and records concurrency, attempt numbers and attempt ids."""

    max_seconds = 3600.0

    def __init__(self, script: dict[str, list[tuple[float, Status, Action]]] | None = None,
                 default: tuple[float, Status, Action] = (0.5, Status.SUCCESS, Action.ACK),
                 rng: random.Random | None = None) -> None:
        self.script = script or {}
        self.default = default
        self.rng = rng
        self.running = 0
        self.peak = 0
        self.calls: list[tuple[str, int, str, float]] = []
        self.reservations: list[Reservation | None] = []
        self._count: Counter[str] = Counter()

    async def run(self, request: Request, *, queue: str = "", attempt: int = 1, abort: Abort | None = None,
                  record: AttemptRecord | None = None, last_attempt: bool = False,
                  reservation: Reservation | None = None) -> Outcome:
        key = request.experiment.key
        self.reservations.append(reservation)
        plays = self.script.get(key, [self.default])
        seconds, status, action = plays[min(self._count[key], len(plays) - 1)]
        self._count[key] += 1
        if self.rng is not None:
            seconds *= self.rng.uniform(0.1, 2.0)
        assert record is not None and abort is not None
        self.calls.append((key, attempt, record.attempt_id, trio.current_time()))
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            with trio.move_on_after(seconds):
                await abort.event.wait()
            if abort.cause is StopCause.SHUTDOWN:
                status, action = Status.INTERRUPTED, Action.HAND_BACK
        finally:
            self.running -= 1
        return Outcome(key=key, status=status, action=action, attempt_id=record.attempt_id, attempt=attempt,
                       queue=queue, finished=trio.current_time())


def make(executor: ScriptedExecutor, queue: MemoryQueue, **settings: object) -> Supervisor:
    options: dict[str, object] = {"poll_interval": 0.05, "rescan_interval": 1.0, "abort_check_interval": 1.0,
                                  "retries": Retries(3, Backoff(1.0, 8.0))}
    options.update(settings)
    return Supervisor([queue], executor, IntakeSettings(**options))  # type: ignore[arg-type]


def run_once(supervisor: Supervisor, seed: int = 0) -> list[Outcome]:
    clock = trio.testing.MockClock(autojump_threshold=0, rate=0)
    random.seed(seed)
    return trio.run(lambda: supervisor.run(once=True), clock=clock)


@pytest.mark.parametrize("limit", [1, 3])
def test_concurrency_limit_is_exact_under_randomised_scheduling(limit: int) -> None:
    """Issue item 5: eight short experiments, many schedules, never more than ``limit`` at once."""
    for seed in range(40):
        queue = MemoryQueue([QUEUE])
        for n in range(8):
            queue.publish(QUEUE, body(f"k{n}"))
        executor = ScriptedExecutor(rng=random.Random(seed))
        run_once(make(executor, queue, max_running=limit), seed)
        assert executor.peak == limit, (seed, executor.peak)
        assert len(queue.acked) == 8 and not queue.pending(QUEUE)


def test_each_action_is_carried_out() -> None:
    queue = MemoryQueue([QUEUE])
    for key in ("ok", "failed", "aside", "released"):
        queue.publish(QUEUE, body(key))
    queue.publish(QUEUE, b"{not json")
    executor = ScriptedExecutor({
        "failed": [(1, Status.FAILED, Action.ACK)],
        "aside": [(1, Status.INVALID, Action.SET_ASIDE)],
        "released": [(1, Status.DEFERRED, Action.RELEASE), (1, Status.SUCCESS, Action.ACK)],
    })
    outcomes = run_once(make(executor, queue))
    acked = sorted(json.loads(r.body)["experiment"]["key"] for r in queue.acked)
    assert acked == ["failed", "ok", "released"]
    released = [r for r in queue.acked if b"released" in r.body][0]
    assert released.attempt == 1  # a release does not count an attempt
    assert [r.body for r in queue.set_aside_items] == [body("aside"), b"{not json"]
    assert "not JSON" in (queue.set_aside_items[1].reason or "")
    assert {c[0] for c in executor.calls} == {"ok", "failed", "aside", "released"}  # never for bad JSON
    assert sorted(o.status.value for o in outcomes) == sorted(
        ["success", "failed", "invalid", "deferred", "success", "invalid"])


def test_hand_backs_back_off_and_give_up_after_max_attempts() -> None:
    """Issue item 6: attempts of one message are spaced by the back-off, each with its own id."""
    queue = MemoryQueue([QUEUE])
    queue.publish(QUEUE, body("flaky"))
    queue.publish(QUEUE, body("broken"))
    executor = ScriptedExecutor({
        "flaky": [(0.1, Status.FAULT, Action.HAND_BACK), (0.1, Status.SUCCESS, Action.ACK)],
        "broken": [(0.1, Status.FAULT, Action.HAND_BACK)],
    })
    supervisor = make(executor, queue, max_running=2, retries=Retries(3, Backoff(4.0, 100.0)))
    run_once(supervisor)
    assert [r.attempt for r in queue.acked] == [2]
    assert [(r.attempt, "gave up after 3 attempts" in (r.reason or "")) for r in queue.set_aside_items] == \
        [(3, True)]
    broken = [c for c in executor.calls if c[0] == "broken"]
    assert [c[1] for c in broken] == [1, 2, 3]
    gaps = [later[3] - earlier[3] for earlier, later in zip(broken, broken[1:], strict=False)]
    assert 2.0 <= gaps[0] <= 4.5 and 4.0 <= gaps[1] <= 8.5, gaps  # 4 s then 8 s, jittered to [50%, 100%]
    ids = [c[2] for c in executor.calls]
    assert len(set(ids)) == len(ids)


def test_backoff_frees_the_slot_for_other_work() -> None:
    queue = MemoryQueue([QUEUE])
    queue.publish(QUEUE, body("flaky"))
    queue.publish(QUEUE, body("other"))
    executor = ScriptedExecutor({"flaky": [(0.1, Status.FAULT, Action.HAND_BACK),
                                           (0.1, Status.SUCCESS, Action.ACK)]})
    run_once(make(executor, queue, max_running=1, retries=Retries(3, Backoff(50.0, 100.0))))
    order = [(c[0], c[1]) for c in executor.calls]
    assert order == [("flaky", 1), ("other", 1), ("flaky", 2)]
    other_start = executor.calls[1][3]
    assert other_start < 1.0  # ran while the flaky message waited out its back-off


def test_hard_shutdown_stops_running_experiments_and_hands_back_at_once() -> None:
    queue = MemoryQueue([QUEUE])
    for key in ("long1", "long2", "waiting"):
        queue.publish(QUEUE, body(key))
    executor = ScriptedExecutor(default=(1000.0, Status.SUCCESS, Action.ACK))
    supervisor = make(executor, queue, max_running=2, retries=Retries(3, Backoff(500.0, 500.0)))

    async def scenario() -> list[Outcome]:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervisor.run)
            await trio.sleep(5)
            assert supervisor.running == 2
            supervisor.shutdown(hard=True)
        return list(supervisor.results)

    outcomes = trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    assert sorted(o.status.value for o in outcomes) == ["interrupted", "interrupted"]
    assert sorted(r.attempt for r in queue.nacked) == [1, 1]  # handed back (counted), without a back-off
    assert queue.pending(QUEUE) == [body("long1"), body("long2"), body("waiting")]  # places kept
    assert executor.peak == 2


def test_lost_claim_is_never_settled() -> None:
    queue = MemoryQueue([QUEUE])
    queue.publish(QUEUE, body("lost"))
    executor = ScriptedExecutor(default=(10.0, Status.SUCCESS, Action.ACK))
    supervisor = make(executor, queue)

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervisor.run)
            await trio.sleep(2)
            queue.lose(queue.in_flight[0], reason="consumer timeout")
            await trio.sleep(20)
            supervisor.shutdown()

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    # the broker took the first delivery back: it is never settled; the requeued copy runs and is acked
    assert [r.attempt for r in queue.acked] == [2] and not queue.set_aside_items and not queue.nacked
    assert [c[1] for c in executor.calls] == [1, 2]
    first = supervisor.registry.finished()[0]
    assert first.key == "lost" and first.status is Status.SUCCESS and first.action is None


def test_intake_pauses_while_results_cannot_be_saved() -> None:
    queue = MemoryQueue([QUEUE])
    health = StorageHealth()
    executor = ScriptedExecutor(default=(1.0, Status.SUCCESS, Action.ACK))
    supervisor = Supervisor([queue], executor, IntakeSettings(poll_interval=0.05, rescan_interval=1.0),
                            health=health)

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervisor.run)
            await trio.sleep(1)
            health.upload_failed("s3://minio:9000/bucket/k/output.tar", OSError("connection reset"))
            for n in range(3):
                queue.publish(QUEUE, body(f"k{n}"))
            await trio.sleep(60)
            assert executor.calls == [] and len(queue.pending(QUEUE)) == 3  # nothing taken meanwhile
            health.upload_succeeded("s3://minio:9000/bucket/other")
            await trio.sleep(10)
            supervisor.shutdown()

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(queue.acked) == 3


def test_requests_that_do_not_fit_are_released_uncounted(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    queue = MemoryQueue(["local_a", "local_b"])
    huge = body("huge", hdd=f"{free * 4}")
    queue.publish("local_a", huge)
    queue.publish("local_b", body("small", hdd="1mb"))
    executor = ScriptedExecutor()
    ledger = Ledger(Capacity(cores=1, ram=1 << 40), tmp_path)
    run_once(make(executor, queue, ledger=ledger, max_running=0))
    assert [c[0] for c in executor.calls] == ["small"]
    assert queue.pending("local_a") == [huge]  # back in line, not set aside, no attempt counted
    assert not queue.nacked and [json.loads(r.body)["experiment"]["key"] for r in queue.acked] == ["small"]
    assert queue.released and queue.released[0].attempt == 1


def test_registry_stamps_phases_and_stays_bounded() -> None:
    queue = MemoryQueue([QUEUE])
    for n in range(30):
        queue.publish(QUEUE, body(f"k{n}"))
    executor = ScriptedExecutor(default=(0.1, Status.SUCCESS, Action.ACK))
    supervisor = make(executor, queue, max_running=4, keep_results=10)
    supervisor.registry = Registry("test-host", keep_finished=5)
    events: list[object] = []
    supervisor.registry.bus.subscribe(events.append)
    outcomes = run_once(supervisor)
    assert len(outcomes) == 10 and len(supervisor.registry.finished()) == 5
    assert len(supervisor.registry) == 0  # nothing left live
    assert sum(isinstance(e, Settled) for e in events) == 30
    assert sum(isinstance(e, Finished) for e in events) == 30
    last = supervisor.registry.finished()[-1]
    assert [p for p, _ in last.phases] == [Phase.CLAIMED, Phase.SETTLING, Phase.DONE]
    assert last.key and last.status is Status.SUCCESS and last.action is Action.ACK
    assert any(isinstance(e, PhaseChanged) and e.phase is Phase.SETTLING for e in events)


def cores_ledger(tmp_path: Path, cores: int) -> Ledger:
    return Ledger(Capacity(cores=cores, ram=1 << 40), tmp_path)


@pytest.mark.parametrize(("cpus", "peak"), [(1, 2), (2, 1), (0, 2)])
def test_as_many_run_at_once_as_their_cores_allow(tmp_path: Path, cpus: int, peak: int) -> None:
    """Two cores: one-core requests run two at a time, two-core requests one at a time (and a request
    naming no cores holds one), over many randomised schedules; every reservation is given back."""
    for seed in range(15):
        queue = MemoryQueue([QUEUE])
        for n in range(6):
            queue.publish(QUEUE, body(f"k{n}", cpus=cpus))
        executor = ScriptedExecutor(rng=random.Random(seed))
        ledger = cores_ledger(tmp_path, 2)
        run_once(make(executor, queue, ledger=ledger, max_running=0), seed)
        assert executor.peak == peak, (seed, executor.peak)
        assert len(queue.acked) == 6 and not queue.nacked and ledger.held == {}
        assert all(r is not None and r.cores == max(1, cpus) for r in executor.reservations)


def test_a_request_that_does_not_fit_now_waits_its_turn_without_spinning(tmp_path: Path) -> None:
    """A two-core request behind one-core work is released uncounted, its queue is skipped while that
    demand would not fit (no release loop), and it runs once the cores are free."""
    queue = MemoryQueue(["local_a", "local_b"])
    for n in range(3):
        queue.publish("local_b", body(f"small{n}", cpus=1))
    queue.publish("local_a", body("big", cpus=2))
    executor = ScriptedExecutor(default=(5.0, Status.SUCCESS, Action.ACK))
    run_once(make(executor, queue, ledger=cores_ledger(tmp_path, 2), max_running=0))
    assert sorted(c[0] for c in executor.calls) == ["big", "small0", "small1", "small2"]
    assert len(queue.acked) == 4 and not queue.nacked
    assert all(r.attempt == 1 for r in queue.released)
    assert len(queue.released) <= 3, [r.attempt for r in queue.released]  # not once per poll


def test_a_demand_that_can_never_fit_is_released_and_its_queue_skipped(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture
                                                                      ) -> None:
    queue = MemoryQueue(["local_a", "local_b"])
    giant = body("giant", cpus=8)
    queue.publish("local_a", giant)
    for n in range(4):
        queue.publish("local_b", body(f"k{n}"))
    executor = ScriptedExecutor(default=(2.0, Status.SUCCESS, Action.ACK))
    supervisor = make(executor, queue, ledger=cores_ledger(tmp_path, 2), max_running=0)

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervisor.run)
            await trio.sleep(120)
            supervisor.shutdown()

    with caplog.at_level("INFO"):
        trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    assert [c[0] for c in executor.calls if c[0] == "giant"] == []  # never run
    assert queue.pending("local_a") == [giant] and len(queue.acked) == 4  # never lost; the rest ran
    assert len(queue.released) == 1 and queue.released[0].attempt == 1  # skipped, not polled again
    assert "can never run on this runner (asks for 8 cores; this runner has 2)" in caplog.text


def test_reservations_are_given_back_on_every_exit(tmp_path: Path) -> None:
    """Success, failure, a hand-back, an internal error in the executor and a hard shutdown mid-run."""

    class Exploding(ScriptedExecutor):
        async def run(self, request: Request, **kwargs: object) -> Outcome:  # type: ignore[override]
            if request.experiment.key == "bug":
                raise RuntimeError("a bug of ours")
            return await super().run(request, **kwargs)  # type: ignore[arg-type]

    queue = MemoryQueue([QUEUE])
    for key in ("ok", "fails", "back", "bug", "long"):
        queue.publish(QUEUE, body(key))
    executor = Exploding({"fails": [(1.0, Status.FAILED, Action.ACK)],
                          "back": [(1.0, Status.FAULT, Action.HAND_BACK), (1.0, Status.SUCCESS, Action.ACK)],
                          "long": [(10_000.0, Status.SUCCESS, Action.ACK)]})
    ledger = cores_ledger(tmp_path, 2)
    supervisor = make(executor, queue, ledger=ledger, max_running=0)
    seen: list[int] = []

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervisor.run)
            await trio.sleep(100)
            seen.append(len(ledger.held))
            supervisor.shutdown(hard=True)

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    assert seen == [1]  # only "long" held cores after everything else ended
    assert ledger.held == {} and ledger.cores_free == 2


def test_one_experiment_never_runs_twice_at_once_on_one_runner(tmp_path: Path) -> None:
    """A copy of a running experiment (redelivered after its claim was lost, or resubmitted under the same
    key) is released uncounted and waits until the running attempt has ended, though cores are free."""
    queue = MemoryQueue([QUEUE, "local_other"])
    queue.publish(QUEUE, body("dup"))
    queue.publish(QUEUE, body("dup"))
    queue.publish("local_other", body("other"))
    executor = ScriptedExecutor(default=(5.0, Status.SUCCESS, Action.ACK))
    run_once(make(executor, queue, ledger=cores_ledger(tmp_path, 3), max_running=0))
    dup_starts = [c[3] for c in executor.calls if c[0] == "dup"]
    assert len(dup_starts) == 2 and dup_starts[1] - dup_starts[0] >= 5.0  # one after the other
    assert executor.peak == 2  # "other" ran beside the first "dup"
    assert len(queue.acked) == 3 and not queue.nacked
    assert [r.attempt for r in queue.released] == [1]
