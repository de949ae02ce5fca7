"""One experiment attempt, top to bottom, in the order of the lifecycle (spec lifecycle.md §1).

    lifetime check ▸ experiment directory ▸ artifacts ▸ Python environment ▸ process (+ checkpoints)
    ▸ final uploads (retried; always attempted) ▸ clean-up ▸ Outcome

The executor never touches the queue: it returns an :class:`~studio_runner.attempt.Outcome` whose
``action`` tells the supervisor whether to acknowledge, hand back, release or set aside the message. The
concerns around it live in their own modules: :mod:`studio_runner.launch` (command line and environment),
:mod:`studio_runner.process` (the process tree under its reaper), :mod:`studio_runner.outputlog` (masked
output), :mod:`studio_runner.sync` (checkpoints and final uploads), :mod:`studio_runner.policies`
(lifetime, deadline, checkpoint interval, back-off), :mod:`studio_runner.events` (the attempt registry),
:mod:`studio_runner.console` (what the runner's log says about the attempt: a line per phase, progress,
the output's tail on failure).

Only the experiment decides its result: a non-zero exit or a signal the runner did not send (the OOM
killer, its own) is ``failed``; a stop the runner caused (shutdown, full disk, a fault of ours) is never a
result, and the message goes back.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import ExceptionGroup

from studio_runner import artifacts, isolation, launch, metadata, process
from studio_runner.attempt import Abort, Action, Outcome, Phase, Status, StopCause
from studio_runner.console import AttemptConsole
from studio_runner.envs import EnvCache
from studio_runner.errors import Disposition, RequestExpired, RunnerError
from studio_runner.events import AttemptRecord, Registry, bind_attempt
from studio_runner.outputlog import OutputLog
from studio_runner.policies import Backoff, Checkpoints, Deadline, Lifetime
from studio_runner.redact import Redactor, remember
from studio_runner.request import Artifact, Request
from studio_runner.resources import Reservation
from studio_runner.storage import Stores
from studio_runner.sync import ArtifactSync
from studio_runner.units import format_elapsed
from studio_runner.usage import TreeSampler

log = logging.getLogger("studio_runner.executor")

PIPE_DRAIN_TIMEOUT = 5.0
"""After the process tree is gone, how long to wait for the rest of its output to be read."""
DOWNLOAD_CONCURRENCY = 4
"""Inputs of one attempt fetched at once: most mutable ones do not exist yet, each miss a round trip."""
USAGE_INTERVAL = 2.0
"""Seconds between samples of an experiment's CPU and RSS (psutil walks its whole process tree)."""


@dataclass
class ExecutorSettings:
    root: Path
    hostname: str
    stores: Stores
    env_cache: EnvCache
    artifact_cache: artifacts.DownloadCache | None = None
    deadline: Deadline = field(default_factory=lambda: Deadline(96 * 3600.0))
    checkpoints: Checkpoints = field(default_factory=lambda: Checkpoints(60.0, 600.0))
    grace_period: float = 10.0
    keep_dirs: bool = False
    schema_logs: bool = True
    allow_env_secrets: bool = False
    pass_env: Sequence[str] = ()
    """Names of runner environment variables passed to experiments on top of the base set."""
    runner_secrets: Sequence[str] = ()
    """Secret values from the runner's own environment, masked in every experiment's output."""
    upload_window: float = 1800.0
    """How long the final upload is retried before the message is handed back."""
    upload_backoff: Backoff = field(default_factory=lambda: Backoff(2.0, 60.0))
    isolate: str = "none"
    """--isolate: "none", or "bwrap" (each experiment in a bubblewrap sandbox: studio_runner.isolation)."""


class Executor:
    def __init__(self, settings: ExecutorSettings, registry: Registry | None = None) -> None:
        self.s = settings
        self.registry = registry if registry is not None else Registry(settings.hostname)
        self.lifetime = Lifetime()

    @property
    def max_seconds(self) -> float:
        """The runner's cap on any experiment's run time (--max-lifetime)."""
        return self.s.deadline.cap_seconds

    async def run(self, request: Request, *, queue: str = "", attempt: int = 1, abort: Abort | None = None,
                  record: AttemptRecord | None = None, last_attempt: bool = False,
                  reservation: Reservation | None = None) -> Outcome:
        """Run one attempt of ``request``. Never raises for experiment or runner faults: see Outcome.

        ``last_attempt``: a runner-side fault now sets the message aside instead of handing it back, so this
        attempt's log is uploaded even when the experiment never started (the experimenter's only clue).
        ``reservation``: what the ledger gave it (thread counts follow its cores; it sees only its cards);
        without one (run directly, not by the supervisor) it gets the cores it asked for and no GPU."""
        if record is None:  # run on its own (not by the supervisor): the record is ours to close
            record = self.registry.claim(queue, "direct", request.experiment.key, attempt)
            try:
                outcome = await self.run(request, queue=queue, attempt=attempt, abort=abort, record=record,
                                         last_attempt=last_attempt, reservation=reservation)
                self.registry.finish(record, outcome)
            finally:
                self.registry.settle(record, None)
            return outcome
        if self.s.allow_env_secrets:
            request = request.with_env_credentials()
        exp = request.experiment
        abort = abort if abort is not None else Abort()
        self.registry.identify(record, exp.key, exp.project)
        bind_attempt(record)  # storage transfers made from this task on are counted against the attempt
        now = time.time()
        outcome = Outcome(key=exp.key, status=Status.FAULT, action=Action.HAND_BACK,
                          attempt_id=record.attempt_id, attempt=attempt, queue=queue, started=now)
        try:
            self.lifetime.check(request, now)
        except RequestExpired as exc:
            outcome.set(Status.EXPIRED, Action.SET_ASIDE, str(exc))
            outcome.finished = time.time()
            return outcome
        try:
            expdir = await trio.to_thread.run_sync(self._make_expdir, exp.key)
        except OSError as exc:
            outcome.reason = f"cannot create the experiment directory: {exc}"  # e.g. ENOSPC: a fault
            outcome.finished = time.time()
            return outcome
        try:
            attempt_run = _Attempt(self, request, expdir, outcome, record, abort, last_attempt, reservation)
        except OSError as exc:  # the output log cannot even be created
            outcome.reason = f"cannot start the output log: {exc}"
            await trio.to_thread.run_sync(shutil.rmtree, expdir, True)
            outcome.finished = time.time()
            return outcome
        await attempt_run.run()
        return outcome

    def _make_expdir(self, key: str) -> Path:
        short = hashlib.blake2b(key.encode(), digest_size=4).hexdigest()
        parent = self.s.root / "experiments"
        parent.mkdir(parents=True, exist_ok=True)
        n = 0
        while True:
            candidate = parent / f"{short}.{n}"
            try:
                candidate.mkdir()
                return candidate
            except FileExistsError:
                n += 1


class _Attempt:
    """The state of one attempt while it runs; ``run`` reads as the lifecycle."""

    def __init__(self, executor: Executor, request: Request, expdir: Path, outcome: Outcome,
                 record: AttemptRecord, abort: Abort, last_attempt: bool,
                 reservation: Reservation | None = None) -> None:
        self.s = executor.s
        self.reservation = reservation
        self.last_attempt = last_attempt
        self.registry = executor.registry
        self.request = request
        self.expdir = expdir
        self.outcome = outcome
        self.record = record
        self.abort = abort
        self.decided = False
        self.process_started = False
        self.redactor = Redactor([*request.secrets(), *self.s.runner_secrets],
                                 credentials=request.credential_values())
        # every exit point that does not hold this redactor (runner log, /status, set-aside reasons) too
        remember(request.secrets(), request.credential_values())
        self.scraper = metadata.MetadataScraper(schema_logs=self.s.schema_logs)
        # The callbacks below must not capture ``self``: the OutputLog and ArtifactSync they are given to
        # are held by ``self``, and such a reference cycle keeps the whole attempt (its scraped metadata
        # document: megabytes for a chatty experiment) alive until the next full garbage collection.
        registry = self.registry
        self.console = console = AttemptConsole(request.experiment.key)
        self.ran_seconds: float | None = None

        def on_line(text: str) -> None:
            registry.output(record, text)
            console.output_line(text)

        self.output = OutputLog(expdir / "output" / "output", self.redactor, self.scraper,
                                request.experiment.key, on_line=on_line)
        scrape_name = metadata.scrape_file_name(self.s.hostname, outcome.started, request.experiment.key,
                                                outcome.attempt_id)
        self.sync = ArtifactSync(self.s.stores, request, expdir, self.output, self.scraper, scrape_name,
                                 on_checkpoint=lambda final: registry.checkpointed(record, final))

    def decide(self, status: Status, action: Action, reason: str = "") -> None:
        self.outcome.set(status, action, self.redactor.mask(reason))
        self.decided = True

    async def run(self) -> None:
        events: dict[str, object] = {}
        output = self.output  # not self: the abort holds this sink, and self holds the abort (a cycle)

        def record_event(text: str, facts: dict[str, object]) -> None:
            output.note(text)
            events.update(facts)
            output.write(metadata.note_line("events", dict(events)))

        self.abort.attach(record_event)
        artifacts.bind_transfer_stats(self.console.stats)  # this attempt's transfers, for its log lines
        try:
            fault: Exception | None = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.console.watch)
                # Before the process starts an abort simply cancels downloads and the env build; once it
                # runs, _run_process stops it gracefully instead. Errors are caught inside the nursery so
                # they are not wrapped in an exception group.
                nursery.start_soon(self._cancel_unless_running, nursery.cancel_scope)
                try:
                    await self._prepare_and_run()
                except Exception as exc:
                    fault = _unwrap(exc)
                nursery.cancel_scope.cancel()
            if isinstance(fault, RunnerError):
                self._record_fault(fault)
            elif fault is not None:  # a bug of ours must not lose the message: hand it back
                log.error("internal error while running %s", self.outcome.key, exc_info=fault)
                self.output.note(f"internal runner error: {type(fault).__name__}: "
                                 f"{self.redactor.mask(str(fault))}")
                self.decide(Status.FAULT, Action.HAND_BACK, f"internal error: {type(fault).__name__}")
            elif not self.decided and self.abort.cause is not None:
                self._record_stop(self.abort.cause, self.abort.reason)
            fault = None  # its traceback holds this frame, so the whole attempt: break that cycle
        finally:
            with trio.CancelScope(shield=True):
                await self._finish()

    async def _cancel_unless_running(self, scope: trio.CancelScope) -> None:
        await self.abort.event.wait()
        if not self.process_started:
            scope.cancel()

    # -- the lifecycle ------------------------------------------------------------------------------------
    async def _prepare_and_run(self) -> None:
        exp = self.request.experiment
        output = self.output
        for line in metadata.init_lines(self.s.hostname, time.time()):
            output.write(line)
        if self.outcome.attempt > 1:
            output.note(f"attempt {self.outcome.attempt} of experiment {exp.key} on {self.s.hostname} "
                        f"(attempt id {self.outcome.attempt_id})")
        for warning in self.request.warnings:
            output.note(f"warning: {warning}")

        console, redactor = self.console, self.redactor
        await self.sync.check_locators()  # a locator outside the storage roots: set aside, nothing read
        self.registry.phase(self.record, Phase.DOWNLOADING)
        console.begin("downloading")
        await self._download()
        console.inputs_ready()

        def env_line(line: str) -> None:
            output.write(line)
            console.env_line(redactor.mask(line))

        self.registry.phase(self.record, Phase.BUILDING_ENV)
        console.begin("building")
        async with self.s.env_cache.acquire(exp.pythonver, exp.pythonenv, self.request.config.pip,
                                            env_line) as env:
            console.env_ready(env.cache_hit)
            self.outcome.env_cache_hit = env.cache_hit
            if not env.interpreter.matched:
                output.note(env.interpreter.note)
                output.write(metadata.note_line("python", {"requested": exp.pythonver,
                                                           "used": env.interpreter.version}))
            labels = {label: (a.locator or "") for label, a in sorted(exp.artifacts.items())}
            for line in metadata.start_lines(exp.key, exp.project, labels, time.time()):
                output.write(line)
            output.flush()
            await self._run_process(env.path, env.python)

    async def _download(self) -> None:
        """Fetch every input, DOWNLOAD_CONCURRENCY at once. A failure cancels the other fetches (nothing runs
        after a failed download) and is reported and raised as itself (the first in label order)."""
        exp = self.request.experiment
        budget = artifacts.DiskBudget.for_request(exp.resources.hdd, self.expdir)
        output, sync, stores, cache = self.output, self.sync, self.s.stores, self.s.artifact_cache
        expdir = self.expdir

        def fetch(artifact: Artifact) -> Callable[[], Awaitable[None]]:
            async def job() -> None:
                await artifacts.fetch_artifact(artifact, expdir, stores, budget,
                                               cache=None if artifact.mutable else cache)
                if artifact.mutable:
                    sync.mark_restored(artifact.label)
            return job

        def report(label: str, error: Exception) -> None:
            output.write("failed when downloading user data")
            output.note(f"artifact {label!r}: {error}")

        # output/output is this attempt's own log, already open (Go truncates it)
        jobs = {label: fetch(artifact) for label, artifact in sorted(exp.artifacts.items())
                if label != "output"}
        await artifacts.transfer_each(jobs, DOWNLOAD_CONCURRENCY, cancel_on_failure=True, on_failure=report)

    async def _run_process(self, venv: Path, python: Path) -> None:
        request, output = self.request, self.output
        exp = request.experiment
        argv = launch.command_line(python, exp.filename, exp.args)
        tmpdir = self.expdir / "_runner" / "tmp"
        tmpdir.mkdir(parents=True, exist_ok=True)
        reservation = self.reservation
        env = launch.experiment_environment(
            os.environ, request, venv, self.expdir, self.s.root, tmpdir, self.s.pass_env,
            gpu_env=reservation.gpu_env if reservation else None,
            cores=reservation.cores if reservation else max(1, exp.resources.cpus))
        expanded = launch.expanded_secrets(request, env)
        if expanded:  # %NAME% pulled a secret from the runner's environment: mask it too
            self.redactor = Redactor([*request.secrets(), *self.s.runner_secrets, *expanded],
                                     credentials=request.credential_values())
            remember(expanded)
            output.use(self.redactor)
        started = time.time()
        deadline, limit_name = self.s.deadline.at(request, started)
        interval = self.s.checkpoints.interval(request)
        wrapper = isolation.wrapper(self.s.isolate, self.expdir, self.expdir / "workspace", venv, python, env)
        proc = await process.start(argv, self.expdir / "workspace", env, wrapper=wrapper)  # cancellable
        self.process_started = True  # from here an abort stops the process gracefully instead
        self.record.pid = proc.pid
        self.outcome.ran = self.sync.ran = True
        self.registry.phase(self.record, Phase.RUNNING)
        self.console.running(proc.pid, reservation.cores if reservation else max(1, exp.resources.cpus),
                             reservation.demand.ram if reservation else exp.resources.ram,
                             reservation.gpu_env.get("CUDA_VISIBLE_DEVICES", "") if reservation else "")
        cause: StopCause | None = None
        timed_out = ""
        try:
            async with trio.open_nursery() as nursery:
                pumped = trio.Event()
                nursery.start_soon(_pump, proc, output, pumped)
                nursery.start_soon(self.sync.periodically, interval)
                nursery.start_soon(self._sample_usage, proc)
                with trio.move_on_at(trio.current_time() + max(0.0, deadline - time.time())) as timer:
                    async with trio.open_nursery() as waiters:
                        waiters.start_soon(_cancel_when_set, self.abort.event, waiters.cancel_scope)
                        waiters.start_soon(_cancel_when_set, output.broken, waiters.cancel_scope)
                        await proc.wait()
                        waiters.cancel_scope.cancel()
                if proc.returncode is None:  # it did not end on its own: find out who stops it
                    if timer.cancelled_caught:
                        timed_out = (f"timeout: stopped after {format_elapsed(time.time() - started)} by "
                                     f"{limit_name}")
                    elif output.broken.is_set():
                        cause = StopCause.DISK_FULL
                    else:
                        cause = self.abort.cause
                why = timed_out or (self._stop_reason(cause) if cause is not None else "")
                if why:
                    output.note(f"{why}; sending SIGTERM to the process tree, SIGKILL after "
                                f"{self.s.grace_period:g}s")
                await proc.stop(self.s.grace_period)
                with trio.move_on_after(PIPE_DRAIN_TIMEOUT):  # every line, up to the last, reaches output
                    await pumped.wait()
                nursery.cancel_scope.cancel()  # the checkpointer; the final upload follows
        finally:
            await proc.stop(self.s.grace_period)  # shielded inside: also runs when we are cancelled
        self._record_exit(proc, cause, timed_out, started)

    async def _sample_usage(self, proc: process.ExperimentProcess) -> None:
        """CPU and RSS of the experiment's tree every few seconds (live figures), and every pid it ran."""
        sampler = TreeSampler(*proc.tree_root)
        while True:
            cpu, rss = await trio.to_thread.run_sync(sampler.sample)
            self.registry.usage(self.record, cpu, rss, sampler.pids)
            await trio.sleep(USAGE_INTERVAL)

    def _record_exit(self, proc: process.ExperimentProcess, cause: StopCause | None, timed_out: str,
                     started: float) -> None:
        code = proc.returncode
        self.outcome.exit_code = code
        self.ran_seconds = time.time() - started
        if timed_out:
            self.decide(Status.TIMEOUT, Action.ACK, timed_out)
        elif cause is not None:
            self._record_stop(cause, self._stop_reason(cause))
        elif self.output.failure is not None:  # it ended, but its output could not all be saved
            self._record_fault(self.output.failure)
        elif code == 0:
            self.decide(Status.SUCCESS, Action.ACK)
            for line in metadata.stop_lines(time.time()):
                self.output.write(line)
        elif code is not None and code < 0 and proc.stop_requested:
            # the runner signalled it for a reason not recorded above: a kill we caused is never a result
            self.decide(Status.INTERRUPTED, Action.HAND_BACK,
                        f"stopped by the runner ({_signal_name(-code)}) after "
                        f"{format_elapsed(time.time() - started)}")
            self.output.note(self.outcome.reason)
        else:
            if code is not None and code < 0:
                reason = (f"the experiment was killed by {_signal_name(-code)}, which the runner did not "
                          "send (the kernel's OOM killer, or the experiment itself)")
            else:
                reason = f"the experiment exited with status {code}"
            self.decide(Status.FAILED, Action.ACK, reason)
            self.output.note(reason)

    def _stop_reason(self, cause: StopCause) -> str:
        if cause is StopCause.DISK_FULL and self.output.failure is not None:
            return f"{cause.status}: {self.output.failure}"
        return f"{cause.status}: {self.abort.reason or cause.value}"

    def _record_stop(self, cause: StopCause, reason: str) -> None:
        if cause is StopCause.DISK_FULL and self.output.failure is not None:
            self._record_fault(self.output.failure)
            return
        action = cause.action
        if action is Action.HAND_BACK and not self.process_started:
            action = Action.RELEASE  # it never started here: no attempt is counted
        self.decide(cause.status, action, reason)
        self.output.note(reason)

    def _record_fault(self, exc: RunnerError) -> None:
        if exc.disposition is Disposition.RETRY:
            self.decide(Status.FAULT, Action.HAND_BACK, str(exc))
        elif exc.disposition is Disposition.SET_ASIDE:
            self.decide(Status.INVALID, Action.SET_ASIDE, str(exc))
        else:
            self.decide(Status.FAILED, Action.ACK, str(exc))
        self.output.note(f"{self.outcome.status}: {exc}")

    async def _finish(self) -> None:
        """Final uploads always run (after failures, timeouts and aborts too), then clean-up."""
        outcome, output = self.outcome, self.output
        self.registry.phase(self.record, Phase.UPLOADING)
        output.end_of_stream()
        if not self.process_started:
            exp = self.request.experiment
            for line in metadata.identity_lines(exp.key, exp.project):
                output.write(line)
        output.write(metadata.note_line("outcome", {
            "status": outcome.status.value, "reason": outcome.reason, "exit_code": outcome.exit_code,
            "attempt": outcome.attempt_id}))
        output.flush()
        final = outcome.action in (Action.ACK, Action.SET_ASIDE) or (
            outcome.action is Action.HAND_BACK and self.last_attempt)
        self.console.uploads_started()
        try:
            await self.sync.save_results(
                include_output=outcome.ran or final, window=self.s.upload_window,
                backoff=self.s.upload_backoff, wake=self.abort.shutdown,
                give_up=self.abort.shutdown.is_set)
            outcome.output_url = self.sync.url_of("output") if (outcome.ran or final) else None
            outcome.metadata_url = self.sync.metadata_url
        except RunnerError as exc:
            log.error("experiment %s: %s", outcome.key, exc)
            if outcome.action is Action.ACK:  # its results are not saved: the work must be done again
                outcome.set(Status.FAULT, Action.HAND_BACK,
                            self.redactor.mask(f"final upload failed: {exc}"))
        finally:
            output.close()
            outcome.finished = time.time()
            self.console.finished(outcome, self.ran_seconds)
            if not self.s.keep_dirs:
                await trio.to_thread.run_sync(shutil.rmtree, self.expdir, True)


async def _pump(proc: process.ExperimentProcess, output: OutputLog, done: trio.Event) -> None:
    try:
        while chunk := await proc.stdout.receive_some(65536):
            output.feed(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        output.end_of_stream()
        done.set()


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _unwrap(exc: Exception) -> Exception:
    """The one real error inside (nested) single-member exception groups, so its disposition is seen."""
    while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
        inner = exc.exceptions[0]
        if not isinstance(inner, Exception):
            break
        exc = inner
    return exc
