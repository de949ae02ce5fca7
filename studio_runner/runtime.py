"""Build a ready-to-run runner (backends, stores, caches, registry, executor, supervisor) from Settings.

Kept apart from the CLI so tests, the demo and benchmarks assemble exactly what ``studio-runner run`` does.
Event subscribers (metrics, status pages, the TUI) attach to ``supervisor.registry.bus``.

Start-up also begins what the first experiment would otherwise pay for (:func:`start_warm_up`: storage
clients and the interpreter discovery, about a second in all), in the background.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from studio_runner import isolation, pythons
from studio_runner.attempt import Outcome
from studio_runner.config import Settings
from studio_runner.envs import EnvCache
from studio_runner.errors import ConfigError
from studio_runner.events import Registry, current_attempt
from studio_runner.executor import Executor, ExecutorSettings
from studio_runner.gate import RequestGate
from studio_runner.gpus import GpuPool, open_gpu_backend, visible_from_environ
from studio_runner.keyring import Keyring
from studio_runner.logs import configure_logging
from studio_runner.policies import Backoff, Checkpoints, Deadline, Retries
from studio_runner.queues.base import QueueBackend
from studio_runner.redact import runner_secrets
from studio_runner.resources import Ledger, host_capacity
from studio_runner.storage import StorageHealth, Stores
from studio_runner.supervisor import IntakeSettings, Supervisor
from studio_runner.sweep import claim_root, release_root, sweep_dead_roots
from studio_runner.units import format_size

if TYPE_CHECKING:
    from studio_runner.reports import ResponseReporter
    from studio_runner.slack import SlackNotifier

log = logging.getLogger("studio_runner")

__all__ = ["build_backends", "build_stores", "configure_logging", "open_runner", "serve", "start_warm_up"]


def build_backends(settings: Settings, runner_id: str) -> list[QueueBackend]:
    """RabbitMQ (--amqp-url), SQS (--sqs-certs) and Pub/Sub (--certs-dir, --pubsub-project) when
    configured; the local directory queue when no broker is configured, or when --queue-root is given
    explicitly next to one."""
    backends: list[QueueBackend] = []
    if settings.amqp_url:
        from studio_runner.queues.rabbitmq import RabbitMQQueue

        backends.append(RabbitMQQueue(settings.amqp_url, settings.amqp_mgt_url or None,
                                      consumer_timeout_limit=settings.amqp_consumer_timeout))
    if settings.sqs_certs:
        from studio_runner.queues.sqs import SqsQueue

        backends.append(SqsQueue(settings.sqs_certs, timeout=settings.sqs_timeout))
    if settings.certs_dir or settings.pubsub_project:
        from studio_runner.queues.pubsub import PubSubQueue

        backends.append(PubSubQueue(certs_dir=settings.certs_dir, project=settings.pubsub_project))
    if not backends or settings.explicitly_set("queue-root"):
        from studio_runner.queues.localdir import LocalDirQueue

        backends.append(LocalDirQueue(settings.queue_root, runner_id, watch=settings.queue_watch,
                                      poll_interval=settings.poll_interval))
    return backends


def build_stores(settings: Settings, registry: Registry | None = None,
                 health: StorageHealth | None = None) -> Stores:
    s3_options: dict[str, object] = {}
    if settings.s3_ca:
        s3_options["ca_bundle"] = str(settings.s3_ca)
    if settings.s3_cert:
        s3_options["client_cert"] = (str(settings.s3_cert), str(settings.s3_key))

    def count(direction: str, nbytes: int, url: str) -> None:
        record = current_attempt()
        if registry is not None and record is not None:
            registry.transferred(record, direction, nbytes, url)

    # a request's file:// and plain-path locators may name only these (and the artifact cache)
    local_roots: list[str | Path] = [*settings.local_storage_roots]
    if settings.cache_dir:
        local_roots.append(settings.cache_dir)
    return Stores(s3_options=s3_options, local_roots=local_roots, health=health, on_transfer=count)


def build_ledger(settings: Settings) -> Ledger:
    """The machine's cores, RAM, disk and GPUs as the options bound them; logged once at start-up."""
    capacity = host_capacity(settings.max_cores, settings.max_mem, settings.max_disk, settings.disk_reserve)
    backend = open_gpu_backend(settings.cpu_only, str(settings.gpu_fake) if settings.gpu_fake else None,
                               visible_from_environ(os.environ))
    pool = GpuPool(backend)
    ledger = Ledger(capacity, settings.working_dir, pool)
    log.info("resources: %s", ledger.describe())
    gpus = pool.snapshot()
    if pool.reason:
        log.info("GPUs: %s; only CPU work is taken", pool.reason)
    for card in gpus.cards:
        log.info("GPU %d %s (%s): %s memory, %d slot(s)%s", card.index, card.name, card.uuid,
                 format_size(card.memory_total), card.slots, ", fenced (ECC errors)" if card.fenced else "")
    return ledger


def expected_storage(settings: Settings) -> tuple[str, ...]:
    """The storage kinds this runner's experiments will most likely use, the costliest to prepare first: S3
    (and plain http inputs) behind a broker, as in the reference deployment, or when S3 TLS material is
    configured; else local files only (StudioML's local mode), for which loading boto3 would cost 35 MB of
    memory for nothing. Google Cloud Storage (its import and client, with ADC maybe a metadata-server probe)
    where Pub/Sub serves the work or a GCS emulator is configured."""
    kinds: tuple[str, ...] = ("local",)
    if settings.amqp_url or settings.sqs_certs or settings.s3_ca or settings.s3_cert:
        kinds = ("s3", "http", "local")
    if settings.pubsub_project or settings.certs_dir or os.environ.get("STORAGE_EMULATOR_HOST"):
        kinds = ("gcs", *kinds)
    return kinds


def start_warm_up(stores: Stores, settings: Settings) -> list[threading.Thread]:
    """Start creating the storage backends this runner expects to use (boto3's S3 model, the TLS context)
    and discovering the interpreter for its own Python version, in background threads; returns them.

    Start-up does not wait: the broker connects and the first message is taken meanwhile, and an
    experiment that needs a piece before it is ready waits for that piece alone (the same locks), never
    builds it twice. Failures are logged, never fatal: the first experiment that needs the piece retries."""

    def interpreters() -> None:
        try:
            pythons.warm_up([pythons.runner_version()], settings.python_search_path,
                            settings.python_downloads)
        except Exception as exc:
            log.warning("interpreter discovery at start-up failed (the first experiment retries): %s", exc)

    threads = [
        threading.Thread(target=stores.warm_up, args=(expected_storage(settings),), daemon=True,
                         name="warm-up storage"),
        threading.Thread(target=interpreters, daemon=True, name="warm-up interpreters"),
    ]
    for thread in threads:
        thread.start()
    return threads


@asynccontextmanager
async def open_runner(settings: Settings) -> AsyncIterator[Supervisor]:
    """A Supervisor wired from ``settings``; its runner root is removed on exit (kept with --debug).

    Start-up sweeps the roots of runners that died without cleaning up (kill -9, power loss), so a disk
    does not fill over weeks of restarts.
    """
    for warning in settings.warnings:
        log.warning("%s", warning)
    await trio.to_thread.run_sync(isolation.check, settings.isolate)  # never run unisolated when asked
    registry = Registry(settings.hostname)
    health = StorageHealth()
    stores = build_stores(settings, registry, health)
    start_warm_up(stores, settings)  # first, so that it is done by the time the first message arrives
    runner_id = f"{settings.hostname}-{os.getpid()}-{secrets.token_hex(3)}"
    root = await trio.to_thread.run_sync(partial(claim_root, settings.working_dir, runner_id,
                                                 keep=settings.debug))
    for removed in await trio.to_thread.run_sync(sweep_dead_roots, settings.working_dir):
        log.info("removed %s, left behind by a runner that is no longer running", removed)
    env_cache = EnvCache(
        settings.env_cache_dir, settings.env_cache_size,
        uv_cache_dir=settings.uv_cache_dir, allow_downloads=settings.python_downloads,
        search_paths=settings.python_search_path, strict_python=settings.strict_python,
        index_url=settings.index_url or None,
    )
    await env_cache.start()
    artifact_cache = None
    if settings.cache_dir:
        from studio_runner.cache import ArtifactCache

        artifact_cache = ArtifactCache(settings.cache_dir, settings.cache_size)
    ledger = build_ledger(settings)
    executor = Executor(ExecutorSettings(
        root=root, hostname=settings.hostname, stores=stores,
        env_cache=env_cache, artifact_cache=artifact_cache,
        deadline=Deadline(settings.max_lifetime),
        checkpoints=Checkpoints(settings.min_checkpoint_interval, settings.default_checkpoint_interval),
        grace_period=settings.grace_period, keep_dirs=settings.debug, schema_logs=settings.schema_logs,
        allow_env_secrets=settings.allow_env_secrets, pass_env=tuple(settings.pass_env),
        runner_secrets=tuple(runner_secrets(os.environ)), upload_window=settings.upload_retry_window,
        isolate=settings.isolate,
    ), registry)
    backends = build_backends(settings, runner_id)
    intake = IntakeSettings(
        queue_match=settings.queue_match, queue_mismatch=settings.queue_mismatch,
        poll_interval=settings.poll_interval, rescan_interval=settings.rescan_interval,
        abort_check_interval=settings.abort_check_interval, drain_timeout=settings.drain_timeout,
        retries=Retries(settings.max_attempts, Backoff(settings.retry_delay, settings.retry_delay_max)),
        ledger=ledger, max_running=settings.max_running,
        gate=RequestGate(clear_text=settings.clear_text_messages, max_size=settings.max_message_size,
                         keyring=Keyring(settings.encrypt_dir, settings.request_signatures_dir,
                                         settings.response_signatures_dir)),
    )
    try:
        for backend in backends:  # connect early so configuration mistakes show at start-up
            await backend.start()
        yield Supervisor(backends, executor, intake, registry=registry, health=health,
                         hostname=settings.hostname)
    finally:
        for backend in backends:
            try:
                await backend.aclose()
            except Exception as exc:
                log.warning("closing %s backend: %s", backend.kind, exc)
        if ledger.gpus is not None:
            ledger.gpus.close()  # NVML shut down
        release_root(root, keep=settings.debug)


async def serve(settings: Settings, *, once: bool = False, handle_signals: bool = True,
                reload: Callable[[], Settings] | None = None) -> list[Outcome]:
    """What ``studio-runner run`` does: open the runner, serve its status endpoint, obey the state file and
    SIGHUP reloads (``reload`` re-resolves the settings), and serve queues until shut down (or drained with
    ``once``); returns the outcomes."""
    started_at = time.time()
    async with open_runner(settings) as supervisor, trio.open_nursery() as nursery:
        address = await start_status_server(nursery, settings, supervisor, started_at)
        from studio_runner.console import banner_lines

        for line in banner_lines(settings, address):
            log.info("%s", line)
        if settings.state_file:
            from studio_runner.statefile import watch_state_file

            nursery.start_soon(watch_state_file, settings.state_file, supervisor.set_intake_state)
        if reload is not None:
            from studio_runner.reload import Reloader

            supervisor.on_reload = Reloader(supervisor, settings, reload)
        reports = await start_reports(nursery, supervisor, settings)
        outcomes = await supervisor.run(once=once, handle_signals=handle_signals)
        for sink in reports:  # what is still due (the last Success, the finish post), briefly
            await sink.flush(5)
        nursery.cancel_scope.cancel()
    return outcomes


async def start_reports(nursery: trio.Nursery, supervisor: Supervisor,
                        settings: Settings) -> list[ResponseReporter | SlackNotifier]:
    """Response-queue reports and Slack posts: subscribers started before the first message is taken."""
    from studio_runner.reports import start_reporter
    from studio_runner.slack import start_slack

    sinks: list[ResponseReporter | SlackNotifier] = []
    reporter = await start_reporter(nursery, supervisor.registry, supervisor.backends,
                                    supervisor.s.gate.keyring, settings)
    slack = await start_slack(nursery, supervisor.registry, settings)
    sinks += [sink for sink in (reporter, slack) if sink is not None]
    return sinks


async def start_status_server(nursery: trio.Nursery, settings: Settings, supervisor: Supervisor,
                              started_at: float) -> str | None:
    """Serve /metrics, /status and /healthz on --prom-address; returns the bound ``host:port`` or None.

    An address the user chose that cannot be bound stops the start (ConfigError); the default one being
    taken (another runner on this machine) only costs the endpoint, with a warning."""
    if not settings.prom_address:
        return None
    from studio_runner.status import StatusApp
    from studio_runner.statusserver import serve_status

    # subscribes metrics, output tails and totals to the registry's bus before the supervisor runs
    app = StatusApp(supervisor, host=settings.hostname, started_at=started_at)
    try:
        address: str = await nursery.start(serve_status, settings.prom_address, app)
    except OSError as exc:
        app.close()
        if settings.explicitly_set("prom-address"):
            raise ConfigError(f"--prom-address {settings.prom_address}: cannot listen there: {exc}") from None
        log.warning("status endpoint off: %s is taken (%s); set --prom-address to another HOST:PORT",
                    settings.prom_address, exc.strerror or exc)
        return None
    return address
