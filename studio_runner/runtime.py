"""Build a ready-to-run runner (backends, stores, caches, executor, supervisor) from resolved Settings.

Kept apart from the CLI so tests, the demo and benchmarks assemble exactly what ``studio-runner run`` does.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from studio_runner.config import Settings
from studio_runner.envs import EnvCache
from studio_runner.executor import Executor, ExecutorSettings
from studio_runner.policies import Checkpoints, Deadline, Retries
from studio_runner.queues.base import QueueBackend
from studio_runner.storage import Stores
from studio_runner.supervisor import IntakeSettings, Supervisor

log = logging.getLogger("studio_runner")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # pika logs every failed reconnect with a traceback and every closed channel; the RabbitMQ backend
    # reports those events itself, once and in plain words
    logging.getLogger("pika").setLevel(logging.DEBUG if level == "DEBUG" else logging.CRITICAL)


def build_backends(settings: Settings, runner_id: str) -> list[QueueBackend]:
    """RabbitMQ when --amqp-url is set; the local directory queue when no broker is configured, or when
    --queue-root is given explicitly next to one."""
    backends: list[QueueBackend] = []
    if settings.amqp_url:
        from studio_runner.queues.rabbitmq import RabbitMQQueue

        backends.append(RabbitMQQueue(settings.amqp_url, settings.amqp_mgt_url or None,
                                      consumer_timeout_limit=settings.amqp_consumer_timeout))
    if not backends or settings.explicitly_set("queue-root"):
        from studio_runner.queues.localdir import LocalDirQueue

        root: Path = settings.queue_root
        root.mkdir(parents=True, exist_ok=True)
        backends.append(LocalDirQueue(root, runner_id))
    return backends


def build_stores(settings: Settings) -> Stores:
    s3_options: dict[str, object] = {}
    if settings.s3_ca:
        s3_options["ca_bundle"] = str(settings.s3_ca)
    if settings.s3_cert:
        s3_options["client_cert"] = (str(settings.s3_cert), str(settings.s3_key))
    return Stores(s3_options=s3_options)


@asynccontextmanager
async def open_runner(settings: Settings) -> AsyncIterator[Supervisor]:
    """A Supervisor wired from ``settings``; its runner root is removed on exit (kept with --debug)."""
    runner_id = f"{settings.hostname}-{os.getpid()}-{secrets.token_hex(3)}"
    working_dir: Path = settings.working_dir
    root = working_dir / f"studio-runner-{runner_id}"
    root.mkdir(parents=True)
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
    executor = Executor(ExecutorSettings(
        root=root, hostname=settings.hostname, stores=build_stores(settings), env_cache=env_cache,
        artifact_cache=artifact_cache,
        deadline=Deadline(settings.max_lifetime),
        checkpoints=Checkpoints(settings.min_checkpoint_interval, settings.default_checkpoint_interval),
        grace_period=settings.grace_period, keep_dirs=settings.debug, schema_logs=settings.schema_logs,
        allow_env_secrets=settings.allow_env_secrets,
    ))
    backends = build_backends(settings, runner_id)
    for backend in backends:
        start = getattr(backend, "start", None)
        if start is not None:  # connect early so configuration mistakes show at start-up
            await start()
    intake = IntakeSettings(
        queue_match=settings.queue_match, queue_mismatch=settings.queue_mismatch,
        poll_interval=settings.poll_interval, rescan_interval=settings.rescan_interval,
        abort_check_interval=settings.abort_check_interval, drain_timeout=settings.drain_timeout,
        retries=Retries(settings.max_attempts),
    )
    try:
        yield Supervisor(backends, executor, intake)
    finally:
        for backend in backends:
            try:
                await backend.aclose()
            except Exception as exc:
                log.warning("closing %s backend: %s", backend.kind, exc)
        if not settings.debug:
            shutil.rmtree(root, ignore_errors=True)
