"""RabbitMQ test support: broker fixtures and helpers that behave exactly like the StudioML client.

Fixtures are named ``rabbitmq_url``, ``rabbitmq_mgmt_url`` and ``unique_queue``; their functions carry a
``_fixture`` suffix so that importing them does not clash with test parameters (ruff F811)::

    from support.rabbitmq import rabbitmq_url_fixture, unique_queue_fixture  # noqa: F401

Without a broker the fixtures skip (with the reason), unless ``CI`` is set: then a missing broker is a
failure, so a CI job cannot go green by skipping everything. Override the broker with
``STUDIO_TEST_AMQP_URL`` and ``STUDIO_TEST_RMQ_MGMT_URL``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import httpx
import pika
import pika.exceptions as pex
import pytest
from support.studioml_client import ensure_client_venv

AMQP_URL = os.environ.get("STUDIO_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
MGMT_URL = os.environ.get("STUDIO_TEST_RMQ_MGMT_URL", "http://127.0.0.1:15672")
MGMT_AUTH = ("guest", "guest")
EXCHANGE = "StudioML.topic"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so a missing broker is an error)", pytrace=False)
    pytest.skip(f"{reason} (set CI=1 to make this an error)")


@functools.lru_cache(maxsize=1)
def broker_problem() -> str | None:
    """Why the test broker cannot be used (None when AMQP and the management API both answer)."""
    try:
        pika.BlockingConnection(pika.URLParameters(AMQP_URL)).close()
    except Exception as exc:
        return f"no RabbitMQ broker answers at {AMQP_URL.split('@')[-1]}: {type(exc).__name__}"
    try:
        httpx.get(f"{MGMT_URL}/api/overview", auth=MGMT_AUTH, timeout=5).raise_for_status()
    except Exception as exc:
        return f"the RabbitMQ management API at {MGMT_URL} does not answer: {type(exc).__name__}"
    return None


@pytest.fixture(scope="session", name="rabbitmq_url")
def rabbitmq_url_fixture() -> str:
    """AMQP URL of a live test broker (skips, or fails under CI, when there is none)."""
    problem = broker_problem()
    if problem:
        _unavailable(problem)
    return AMQP_URL


@pytest.fixture(scope="session", name="rabbitmq_mgmt_url")
def rabbitmq_mgmt_url_fixture(rabbitmq_url: str) -> str:
    """Management API base URL of the test broker (credentials are guest/guest)."""
    return MGMT_URL


@pytest.fixture(name="unique_queue")
def unique_queue_fixture(rabbitmq_url: str) -> Iterator[str]:
    """A fresh ``rmq_test_<uuid>`` queue name; the queue and its ``_response`` twin are deleted afterwards."""
    name = f"rmq_test_{uuid.uuid4().hex}"
    yield name
    delete_queue(rabbitmq_url, name)
    delete_queue(rabbitmq_url, f"{name}_response")


@contextmanager
def channel(amqp_url: str = AMQP_URL) -> Iterator[Any]:
    """A short-lived blocking channel for test set-up and inspection."""
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        yield conn.channel()
    finally:
        if conn.is_open:
            conn.close()


def declare_like_studioml(amqp_url: str, queue: str, *, persistent: bool = False) -> None:
    """Declare the exchange and queue and bind them exactly as studioml 0.0.49's RMQueue does."""
    with channel(amqp_url) as ch:
        ch.exchange_declare(EXCHANGE, exchange_type="topic", durable=True, auto_delete=True)
        ch.queue_declare(queue, durable=persistent)
        ch.queue_bind(queue, EXCHANGE, routing_key=f"StudioML.{queue}")


def publish_like_studioml(amqp_url: str, queue: str, body: bytes | str | dict[str, Any], *,
                          persistent: bool = False, headers: dict[str, Any] | None = None) -> None:
    """Publish one request as the client does: declare + bind, confirms, mandatory, app_id=studioml."""
    if isinstance(body, dict):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    with channel(amqp_url) as ch:
        ch.exchange_declare(EXCHANGE, exchange_type="topic", durable=True, auto_delete=True)
        ch.queue_declare(queue, durable=persistent)
        ch.queue_bind(queue, EXCHANGE, routing_key=f"StudioML.{queue}")
        ch.confirm_delivery()
        props = pika.BasicProperties(app_id="studioml", content_type="application/json",
                                     delivery_mode=2 if persistent else None, headers=headers)
        ch.basic_publish(EXCHANGE, f"StudioML.{queue}", body, props, mandatory=True)


_CLIENT_ENQUEUE = """
import sys
from studio.queues.rabbit_queue import RMQueue
url, queue = sys.argv[1], sys.argv[2]
client = RMQueue(queue=queue, route="StudioML." + queue, amqp_url=url)
client.enqueue(sys.stdin.read())
client.shutdown(delete_queue=False)
"""


def publish_with_studioml_client(amqp_url: str, queue: str, body: str) -> None:
    """Enqueue ``body`` with the real studioml 0.0.49 client (the suite's client venv, built on demand)."""
    python = ensure_client_venv() / "python"
    done = subprocess.run([str(python), "-c", _CLIENT_ENQUEUE, amqp_url, queue], input=body,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def ready_count(amqp_url: str, queue: str) -> int | None:
    """Messages ready in ``queue`` right now (passive declare; the management stats lag by seconds)."""
    try:
        with channel(amqp_url) as ch:
            return ch.queue_declare(queue, passive=True).method.message_count
    except pex.ChannelClosedByBroker:
        return None


def wait_ready_count(amqp_url: str, queue: str, expected: int, timeout: float = 10.0) -> int | None:
    """Poll :func:`ready_count` until it equals ``expected`` or ``timeout`` passes; returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = ready_count(amqp_url, queue)
        if value == expected or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def get_one(amqp_url: str, queue: str) -> tuple[Any, Any, bytes] | None:
    """Take (and ack) one message: ``(method, properties, body)`` or None when the queue is empty."""
    with channel(amqp_url) as ch:
        method, props, body = ch.basic_get(queue, auto_ack=True)
        return None if method is None else (method, props, body)


def delete_queue(amqp_url: str, queue: str) -> None:
    """Delete ``queue`` if it exists."""
    try:
        with channel(amqp_url) as ch:
            ch.queue_delete(queue)
    except pex.AMQPError:
        pass


def mgmt_get(path: str) -> httpx.Response:
    """GET on the test broker's management API."""
    return httpx.get(f"{MGMT_URL}{path}", auth=MGMT_AUTH, timeout=10)


def close_connection_named(connection_name: str, timeout: float = 20.0) -> None:
    """Force-close the connection whose client-provided name is ``connection_name`` (a network drop)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for conn in mgmt_get("/api/connections").json():
            if conn.get("client_properties", {}).get("connection_name") == connection_name:
                response = httpx.delete(f"{MGMT_URL}/api/connections/{quote(conn['name'], safe='')}",
                                        auth=MGMT_AUTH, timeout=10)
                response.raise_for_status()
                return
        time.sleep(0.5)
    raise AssertionError(f"connection {connection_name!r} never showed up in the management API")


def rabbitmqctl_eval(expression: str) -> str:
    """``rabbitmqctl eval EXPR`` on the local node (skips, or fails under CI, without rabbitmqctl)."""
    if shutil.which("rabbitmqctl") is None:
        _unavailable("rabbitmqctl is not installed on this machine")
    done = subprocess.run(["rabbitmqctl", "eval", expression], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        _unavailable(f"rabbitmqctl eval failed: {done.stderr.strip()[:200]}")
    return done.stdout.strip()


def _restore_env(key: str, original: str) -> None:
    if original.startswith("{ok,") and original.endswith("}"):
        rabbitmqctl_eval(f"application:set_env(rabbit, {key}, {original[4:-1]}).")
    else:
        rabbitmqctl_eval(f"application:unset_env(rabbit, {key}).")


@contextmanager
def short_consumer_timeout(timeout_ms: int = 3000, tick_ms: int = 1000) -> Iterator[Callable[[], None]]:
    """Make the broker's consumer timeout fire in seconds instead of 30 min + a 1 min tick.

    RabbitMQ 3.10 reads ``consumer_timeout`` once per channel when the channel opens and re-reads
    ``channel_tick_interval`` every tick. So: open the channel under test inside this block, then call the
    yielded ``restore_timeout()`` at once, which puts the node-wide timeout back for every other channel
    while ours keeps the short one. The tick interval and anything not yet restored are put back on exit.
    """
    old_timeout = rabbitmqctl_eval("application:get_env(rabbit, consumer_timeout).")
    old_tick = rabbitmqctl_eval("application:get_env(rabbit, channel_tick_interval).")
    restored = False

    def restore_timeout() -> None:
        nonlocal restored
        if not restored:
            restored = True
            _restore_env("consumer_timeout", old_timeout)

    try:
        rabbitmqctl_eval(f"application:set_env(rabbit, channel_tick_interval, {int(tick_ms)}).")
        rabbitmqctl_eval(f"application:set_env(rabbit, consumer_timeout, {int(timeout_ms)}).")
        yield restore_timeout
    finally:
        restore_timeout()
        _restore_env("channel_tick_interval", old_tick)
