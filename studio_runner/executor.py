"""One experiment attempt, top to bottom, in the order of the lifecycle (spec lifecycle.md §1).

    lifetime check ▸ experiment directory ▸ artifacts ▸ Python environment ▸ process (+ checkpoints)
    ▸ final uploads (always) ▸ clean-up ▸ Outcome

The executor never touches the queue: it returns an :class:`Outcome` whose ``action`` tells the supervisor
whether to acknowledge, hand back or set aside the message. Policies (lifetime, deadline, checkpoints)
are small objects from :mod:`studio_runner.policies`; output goes through :class:`OutputLog`, the one place
where experiment lines are masked, written, scraped and logged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import trio

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import ExceptionGroup

from studio_runner import artifacts, metadata, process
from studio_runner.envs import EnvCache
from studio_runner.errors import Disposition, RequestExpired, RunnerError
from studio_runner.policies import Checkpoints, Deadline, Lifetime
from studio_runner.redact import Redactor, is_secret_name
from studio_runner.request import Artifact, Request
from studio_runner.storage import Stores

log = logging.getLogger("studio_runner.executor")

RUNNER_ENV_SECRETS = ("AMQP_URL", "AMQP_MGT_URL")
"""Runner settings that must never reach an experiment's environment."""

FINAL_UPLOAD_TIMEOUT = 600.0
PIPE_DRAIN_TIMEOUT = 5.0
"""After the process group is gone, how long to wait for the rest of its output to be read."""


@dataclass
class Outcome:
    """What happened to one attempt and what to do with its message."""

    key: str
    status: str
    """success, failed, timeout, aborted, expired, invalid, retry."""
    action: str
    """ack, nack or set_aside."""
    reason: str = ""
    exit_code: int | None = None
    attempt_id: str = ""
    queue: str = ""
    output_url: str | None = None
    metadata_url: str | None = None
    started: float = field(default_factory=time.time)
    finished: float = 0.0
    env_cache_hit: bool | None = None

    @property
    def seconds(self) -> float:
        return max(0.0, self.finished - self.started)


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


class OutputLog:
    """The experiment's ``output/output`` file: every line masked, written, scraped and debug-logged."""

    def __init__(self, path: Path, redactor: Redactor, scraper: metadata.MetadataScraper, key: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._redactor = redactor
        self._scraper = scraper
        self._file: IO[str] = open(path, "a", encoding="utf-8", errors="replace")
        self._logger = logging.getLogger(f"studio_runner.experiment.{key[:40]}")

    def write(self, line: str) -> None:
        masked = self._redactor.mask(line)
        self._file.write(masked + "\n")
        self._scraper.feed(masked)
        self._logger.debug("%s", masked)

    def use(self, redactor: Redactor) -> None:
        self._redactor = redactor

    def note(self, text: str) -> None:
        """A runner remark inside the experiment's output, recognisable by its prefix."""
        for line in text.splitlines() or [""]:
            self.write(f"studio-runner: {line}")

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class Abort:
    """Why and how a running attempt must stop early: queue deleted (ack) or runner shutdown (hand back)."""

    def __init__(self) -> None:
        self.event = trio.Event()
        self.reason = ""
        self.hand_back = False
        self.process_running = False
        self._notes: list[tuple[str, dict[str, Any]]] = []
        self._sink: Callable[[str, dict[str, Any]], None] | None = None

    def note(self, text: str, **facts: Any) -> None:
        """Record an event (e.g. the broker took the message back) in the attempt's output and metadata."""
        if self._sink is None:
            self._notes.append((text, facts))
        else:
            self._sink(text, facts)

    def attach(self, sink: Callable[[str, dict[str, Any]], None]) -> None:
        self._sink = sink
        for text, facts in self._notes:
            sink(text, facts)
        self._notes.clear()

    def trigger(self, reason: str, hand_back: bool = False) -> None:
        if not self.event.is_set():
            self.reason, self.hand_back = reason, hand_back
            self.event.set()


class Executor:
    def __init__(self, settings: ExecutorSettings) -> None:
        self.s = settings
        self.lifetime = Lifetime()

    async def run(self, request: Request, *, queue: str = "", attempt: int = 1,
                  abort: Abort | None = None) -> Outcome:
        """Run one attempt of ``request``. Never raises for experiment or runner faults: see Outcome."""
        if self.s.allow_env_secrets:
            request = request.with_env_credentials()
        exp = request.experiment
        abort = abort or Abort()
        now = time.time()
        attempt_id = metadata.attempt_id(self.s.hostname, now)
        outcome = Outcome(key=exp.key, status="failed", action="ack", attempt_id=attempt_id, queue=queue,
                          started=now)
        try:
            self.lifetime.check(request, now)
        except RequestExpired as exc:
            outcome.status, outcome.action, outcome.reason = "expired", "set_aside", str(exc)
            outcome.finished = time.time()
            return outcome

        expdir = self._make_expdir(exp.key)
        redactor = request.redactor()
        scraper = metadata.MetadataScraper(schema_logs=self.s.schema_logs)
        output = OutputLog(expdir / "output" / "output", redactor, scraper, exp.key)
        sync = ArtifactSync(self.s, request, expdir, output, scraper, attempt_id, now)
        events: dict[str, Any] = {}

        def record(text: str, facts: dict[str, Any]) -> None:
            output.note(text)
            events.update(facts)
            output.write(metadata.note_line("events", dict(events)))

        abort.attach(record)
        fault: Exception | None = None
        try:
            async with trio.open_nursery() as nursery:
                # Before the process starts, an abort simply cancels downloads and the env build; once it
                # runs, _run_process stops it gracefully instead. Errors are caught inside the nursery so
                # they are not wrapped in an exception group.
                nursery.start_soon(_cancel_unless_running, abort, nursery.cancel_scope)
                try:
                    await self._attempt(request, expdir, output, sync, outcome, attempt, abort)
                except Exception as exc:
                    fault = _unwrap(exc)
                nursery.cancel_scope.cancel()
            if isinstance(fault, RunnerError):
                self._record_fault(fault, output, outcome)
            elif fault is not None:  # a bug of ours must not lose the message: hand it back
                log.error("internal error while running %s", exp.key, exc_info=fault)
                output.note(f"internal runner error: {type(fault).__name__}: {redactor.mask(str(fault))}")
                outcome.status, outcome.action = "retry", "nack"
                outcome.reason = f"internal error: {type(fault).__name__}"
            elif abort.event.is_set() and outcome.status not in ("success", "timeout", "aborted"):
                self._record_abort(abort, output, outcome)
        finally:
            with trio.CancelScope(shield=True):
                await self._finish(sync, output, outcome, expdir)
        return outcome

    def _record_abort(self, abort: Abort, output: OutputLog, outcome: Outcome) -> None:
        outcome.status = "aborted"
        outcome.reason = f"aborted: {abort.reason}"
        outcome.action = "nack" if abort.hand_back else "ack"
        output.note(outcome.reason)

    async def _attempt(self, request: Request, expdir: Path, output: OutputLog, sync: ArtifactSync,
                       outcome: Outcome, attempt: int, abort: Abort) -> None:
        exp = request.experiment
        for line in metadata.init_lines(self.s.hostname, time.time()):
            output.write(line)
        if attempt > 1:
            output.note(f"attempt {attempt} of experiment {exp.key} on {self.s.hostname}")
        for warning in request.warnings:
            output.note(f"warning: {warning}")

        await self._download(request, expdir, output, sync)

        async with self.s.env_cache.acquire(exp.pythonver, exp.pythonenv, request.config.pip,
                                            output.write) as env:
            outcome.env_cache_hit = env.cache_hit
            if not env.interpreter.matched:
                output.note(env.interpreter.note)
                output.write(metadata.note_line("python", {"requested": exp.pythonver,
                                                           "used": env.interpreter.version}))
            labels = {label: (a.locator or "") for label, a in sorted(exp.artifacts.items())}
            for line in metadata.start_lines(exp.key, exp.project, labels, time.time()):
                output.write(line)
            output.flush()
            abort.process_running = True
            await self._run_process(request, expdir, env.path, env.python, output, sync, outcome, abort)

    async def _download(self, request: Request, expdir: Path, output: OutputLog, sync: ArtifactSync) -> None:
        budget = artifacts.DiskBudget(request.experiment.resources.hdd or _free_bytes(expdir))
        for label, artifact in sorted(request.experiment.artifacts.items()):
            if label == "output":  # output/output is this attempt's own log, already open (Go truncates it)
                continue
            try:
                placed = await artifacts.fetch_artifact(
                    artifact, expdir, self.s.stores, budget,
                    cache=None if artifact.mutable else self.s.artifact_cache)
            except RunnerError as exc:
                output.write("failed when downloading user data")
                output.note(f"artifact {label!r}: {exc}")
                raise
            if placed and artifact.mutable:
                sync.mark_downloaded(label)

    async def _run_process(self, request: Request, expdir: Path, venv: Path, python: Path,
                           output: OutputLog, sync: ArtifactSync, outcome: Outcome, abort: Abort) -> None:
        exp = request.experiment
        argv = command_line(python, exp.filename, exp.args)
        tmpdir = expdir / "_runner" / "tmp"
        tmpdir.mkdir(parents=True, exist_ok=True)
        env = experiment_environment(os.environ, request, venv, expdir, self.s.root, tmpdir)
        expanded = [env[name] for name, value in request.config.env.items()
                    if is_secret_name(name) and env.get(name) and env[name] != value]
        if expanded:  # %NAME% pulled a secret from the runner's environment: mask it too
            output.use(Redactor([*request.secrets(), *expanded], credentials=request.credential_values()))
        started = time.time()
        deadline, limit_name = self.s.deadline.at(request, started)
        interval = self.s.checkpoints.interval(request)
        proc = await process.start(argv, expdir / "workspace", env)
        stop_reason = ""
        try:
            async with trio.open_nursery() as nursery:
                pumped = trio.Event()
                nursery.start_soon(_pump, proc, output, pumped)
                nursery.start_soon(sync.periodically, interval)
                with trio.move_on_at(trio.current_time() + max(0.0, deadline - time.time())) as timer:
                    async with trio.open_nursery() as waiters:
                        waiters.start_soon(_cancel_when_set, abort.event, waiters.cancel_scope)
                        await proc.wait()
                        waiters.cancel_scope.cancel()
                if timer.cancelled_caught:
                    stop_reason = f"timeout: stopped after {time.time() - started:.1f}s by {limit_name}"
                elif abort.event.is_set():
                    stop_reason = f"aborted: {abort.reason}"
                if stop_reason:
                    output.note(f"{stop_reason}; sending SIGTERM to the process group, SIGKILL after "
                                f"{self.s.grace_period:g}s")
                await process.stop_tree(proc, self.s.grace_period)
                with trio.move_on_after(PIPE_DRAIN_TIMEOUT):  # every line, up to the last, reaches output
                    await pumped.wait()
                nursery.cancel_scope.cancel()  # the checkpointer; the final upload follows
        finally:
            await process.stop_tree(proc, self.s.grace_period)
        outcome.exit_code = proc.returncode
        if stop_reason.startswith("aborted"):
            self._record_abort(abort, output, outcome)
        elif stop_reason:
            outcome.status, outcome.reason = "timeout", stop_reason
        elif proc.returncode == 0:
            outcome.status, outcome.reason = "success", ""
            for line in metadata.stop_lines(time.time()):
                output.write(line)
        else:
            outcome.status = "failed"
            outcome.reason = f"the experiment exited with status {proc.returncode}"
            output.note(outcome.reason)

    def _record_fault(self, exc: RunnerError, output: OutputLog, outcome: Outcome) -> None:
        outcome.reason = str(exc)
        if exc.disposition is Disposition.RETRY:
            outcome.status, outcome.action = "retry", "nack"
        elif exc.disposition is Disposition.SET_ASIDE:
            outcome.status, outcome.action = "invalid", "set_aside"
        else:
            outcome.status, outcome.action = "failed", "ack"
        output.note(f"{outcome.status}: {exc}")

    async def _finish(self, sync: ArtifactSync, output: OutputLog, outcome: Outcome, expdir: Path) -> None:
        """Final uploads always run (after failures, timeouts and aborts too), then clean-up."""
        status = {"status": outcome.status, "reason": outcome.reason, "exit_code": outcome.exit_code,
                  "attempt": outcome.attempt_id}
        output.write(metadata.note_line("outcome", status))
        output.flush()
        try:
            with trio.fail_after(FINAL_UPLOAD_TIMEOUT):
                await sync.upload_all()
            outcome.output_url = sync.url_of("output")
            outcome.metadata_url = sync.metadata_url
        except (RunnerError, trio.TooSlowError, OSError) as exc:
            log.error("final upload of %s failed: %s", outcome.key, exc)
            if outcome.action == "ack":  # results not saved: the work must be done again
                outcome.status, outcome.action = "retry", "nack"
                outcome.reason = f"final upload failed: {exc}"
        finally:
            output.close()
            outcome.finished = time.time()
            if not self.s.keep_dirs:
                await trio.to_thread.run_sync(shutil.rmtree, expdir, True)

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


class ArtifactSync:
    """Uploads the mutable artifacts and the metadata document, skipping what has not changed."""

    def __init__(self, settings: ExecutorSettings, request: Request, expdir: Path, output: OutputLog,
                 scraper: metadata.MetadataScraper, attempt_id: str, started: float) -> None:
        self.s = settings
        self.request = request
        self.expdir = expdir
        self.output = output
        self.scraper = scraper
        self.fingerprints: dict[str, str | None] = {}
        self.scrape_name = metadata.scrape_file_name(settings.hostname, started, request.experiment.key)
        self.metadata_url: str | None = None
        self._lock = trio.Lock()

    def mark_downloaded(self, label: str) -> None:
        self.fingerprints[label] = artifacts.dir_fingerprint(self.expdir / label)

    def url_of(self, label: str) -> str | None:
        artifact = self.request.experiment.artifacts.get(label)
        return artifact.locator if artifact else None

    async def periodically(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            try:
                await self.upload_all()
            except (RunnerError, OSError) as exc:  # a failed checkpoint is retried at the next one
                log.warning("checkpoint of %s failed: %s", self.request.experiment.key, exc)

    async def upload_all(self) -> None:
        async with self._lock:
            self.output.flush()
            exp = self.request.experiment
            for label, artifact in sorted(exp.artifacts.items()):
                if not artifact.mutable or label == "_metadata" or not artifact.locator:
                    continue
                self.fingerprints[label] = await artifacts.upload_artifact(
                    artifact, self.expdir, self.s.stores, self.fingerprints.get(label))
            await self._upload_metadata()

    async def _upload_metadata(self) -> None:
        artifact = self.request.experiment.artifacts.get("_metadata")
        folder = self.expdir / "_metadata"
        folder.mkdir(exist_ok=True)
        text = None if self.scraper.empty else self.scraper.to_json()
        await trio.to_thread.run_sync(metadata.write_document_text, text, folder / self.scrape_name)
        if artifact is None or not artifact.mutable or not artifact.locator:
            return
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.name.startswith("."):  # dot-files are writes in progress
                url = metadata_object_url(artifact, path.relative_to(folder).as_posix())
                await self.s.stores.for_url(url).put(path, url, artifact.access_credentials)
                if path.name == self.scrape_name:
                    self.metadata_url = url


def metadata_object_url(artifact: Artifact, name: str) -> str:
    """``metadata/<name>`` at the root of the bucket the ``_metadata`` locator names (metadata.md §4)."""
    locator = artifact.locator or ""
    key = artifact.key or ""
    if key and locator.endswith(key):
        return locator[: len(locator) - len(key)] + "metadata/" + name
    match = re.match(r"^(s3://[^/]+/[^/]+/)", locator)
    if match:
        return match.group(1) + "metadata/" + name
    return locator.rsplit("/", 1)[0] + "/metadata/" + name


def command_line(python: Path, filename: str, args: list[str]) -> list[str]:
    """``python <filename> <args>``; each arg was shell-quoted by the client, so it is split again here."""
    argv = [str(python), "-u"]
    argv.append(filename)  # "-m" for module runs: the module name is the first arg
    for arg in args:
        try:
            argv.extend(shlex.split(arg))
        except ValueError:  # not valid shell quoting: pass it through untouched
            argv.append(arg)
    return argv


_PERCENT = re.compile(r"%([A-Za-z_][A-Za-z0-9_]*)%")
_DOLLAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def expand_value(value: str, runner_env: Mapping[str, str], composed: Mapping[str, str]) -> str:
    """``%NAME%`` from the runner's environment when set and non-empty (else kept verbatim), then
    ``$NAME``/``${NAME}`` from the environment composed so far. No command substitution, ever."""
    value = _PERCENT.sub(lambda m: runner_env.get(m.group(1)) or m.group(0), value)
    return _DOLLAR.sub(lambda m: composed.get(m.group(1) or m.group(2), m.group(0)), value)


def experiment_environment(runner_env: Mapping[str, str], request: Request, venv: Path, expdir: Path,
                           root: Path, tmpdir: Path) -> dict[str, str]:
    env = {k: v for k, v in runner_env.items() if k not in RUNNER_ENV_SECRETS}
    env.pop("PYTHONHOME", None)
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    for name, value in request.config.env.items():
        env[name] = expand_value(value, runner_env, env)
    env.update({
        "STUDIOML_EXPERIMENT": expdir.name,
        "STUDIOML_HOME": str(root),
        "TMPDIR": str(tmpdir),
        "PYTHONUNBUFFERED": "1",
        # no GPU is allocated (GPUs come with the resources issue): hide every card
        "CUDA_VISIBLE_DEVICES": "",
        "NVIDIA_VISIBLE_DEVICES": "",
    })
    env.pop("STUDIOML_ARTIFACT_MAPPING", None)
    cpus = request.experiment.resources.cpus
    if cpus > 1:
        threads = str(cpus - 1)
        env.update({"OPENMP": "True", "MKL_NUM_THREADS": threads, "GOTO_NUM_THREADS": threads,
                    "OMP_NUM_THREADS": threads})
    return env


async def _pump(proc: trio.Process, output: OutputLog, done: trio.Event) -> None:
    assert proc.stdout is not None
    try:
        async for line in process.lines(proc.stdout):
            output.write(line)
    finally:
        done.set()


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _cancel_unless_running(abort: Abort, scope: trio.CancelScope) -> None:
    await abort.event.wait()
    if not abort.process_running:
        scope.cancel()


def _unwrap(exc: Exception) -> Exception:
    """The one real error inside (nested) single-member exception groups, so its disposition is seen."""
    while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
        inner = exc.exceptions[0]
        if not isinstance(inner, Exception):
            break
        exc = inner
    return exc


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free
