"""Start-up warm-up (issue 7, throughput): what the first experiment of a runner used to pay for — storage
backends (boto3's S3 model, the TLS context) and the interpreter discovery — is started at runner start-up in
background threads, and a failure there is logged, never fatal."""

from __future__ import annotations

import logging

import pytest

from studio_runner import pythons, runtime, storage
from studio_runner.config import Settings, resolve
from studio_runner.storage import Stores, register_scheme
from studio_runner.storage.http import HttpStore
from studio_runner.storage.s3 import S3Store

BROKER = {"amqp_url": "amqp://guest:guest@127.0.0.1:5672/%2f"}


def warm(stores: Stores, settings: Settings) -> None:
    for thread in runtime.start_warm_up(stores, settings):
        thread.join(120)
        assert not thread.is_alive()


def test_every_backend_is_created_and_prepared_without_a_request() -> None:
    stores = Stores()
    stores.warm_up()  # the S3 warm-up client names an endpoint that does not resolve: nothing is sent
    s3 = stores.for_url("s3://127.0.0.1:9/b/k").backend  # type: ignore[attr-defined]
    http = stores.for_url("https://example.com/x").backend  # type: ignore[attr-defined]
    assert isinstance(s3, S3Store) and isinstance(http, HttpStore)
    assert http._tls is not None  # the CA bundle is loaded once, here
    assert stores.for_url("s3://other:9000/b/k") is stores.for_url("s3://127.0.0.1:9/b/k")  # the same backend


def test_a_backend_that_cannot_start_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def broken(options: object) -> object:
        raise ImportError("No module named 'google.cloud'")

    register_scheme(("gsbroken",), "gsbroken", broken)  # type: ignore[arg-type]
    try:
        with caplog.at_level(logging.WARNING):
            Stores().warm_up()
    finally:
        storage._SCHEMES.pop("gsbroken", None)
    assert "could not prepare gsbroken storage at start-up" in caplog.text
    assert "No module named 'google.cloud'" in caplog.text


def test_the_runners_own_python_is_discovered_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = pythons._discover

    def counting(request: str, *args: object) -> tuple[pythons.Interpreter | None, str]:
        calls.append(request)
        return real(request, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(pythons, "_discover", counting)
    monkeypatch.setattr(pythons, "_discovered", {})
    settings = resolve({}, environ={})
    warm(Stores(), settings)
    assert calls == [pythons.runner_version()]
    found = pythons.find_interpreter(pythons.runner_version(), settings.python_search_path,
                                     settings.python_downloads)  # what the environment cache asks
    assert calls == [pythons.runner_version()] and found.matched  # remembered: not discovered again


def test_a_failed_interpreter_discovery_does_not_stop_start_up(monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("uv is gone")

    monkeypatch.setattr(pythons, "warm_up", broken)
    with caplog.at_level(logging.WARNING):
        warm(Stores(), resolve({}, environ={}))
    assert "interpreter discovery at start-up failed" in caplog.text and "uv is gone" in caplog.text


def test_only_the_storage_a_deployment_uses_is_warmed() -> None:
    """boto3 and its model cost ~35 MB: a runner on the local queue (StudioML local mode) does not load them
    before an experiment needs them; one behind a broker (the reference deployment, S3) does."""
    assert runtime.expected_storage(resolve({}, environ={})) == ("local",)
    assert set(runtime.expected_storage(resolve(BROKER, environ={}))) == {"local", "http", "s3"}
    stores = Stores()
    warm(stores, resolve({}, environ={}))
    assert set(stores._backends) == {"local"}
    warm(stores, resolve(BROKER, environ={}))
    assert set(stores._backends) == {"local", "http", "s3"}
