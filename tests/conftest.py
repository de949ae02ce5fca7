"""Shared test set-up. Fixture modules live in tests/support/ and are imported by the tests that use them.

Skips fail the run unless declared. A test that may legitimately skip on some machines says so with
``@pytest.mark.expected_skip("why")``; any other skip (no broker, no client venv, a missing tool) is listed at
the end and turns the exit status into a failure, so that a run cannot go green by silently not testing what
it was meant to test. ``.ci/run`` starts every service the suite needs, so CI has no reason to skip.
"""

from __future__ import annotations

import os

import pytest

# Tests must never wait on a managed interpreter download or an index we cannot reach by accident.
os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")

# Fixtures shared across test modules (tests/ is on sys.path: pytest inserts this conftest's directory).
pytest_plugins = ["support.studioml_client", "support.runner", "support.s3server", "support.rabbitmq"]

_unexpected_skips: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "expected_skip(reason): this test may skip, for the reason given; "
                            "other skips fail the run")


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Record skips of tests without the expected_skip marker (xfail results are not skips)."""
    if report.skipped and not hasattr(report, "wasxfail") and "expected_skip" not in report.keywords:
        _unexpected_skips.append(f"{report.nodeid}: {_skip_reason(report)}")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    """A whole module skipped at import (``pytest.importorskip``, a module-level skip) is never expected."""
    if report.skipped:
        _unexpected_skips.append(f"{report.nodeid}: {_skip_reason(report)}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _unexpected_skips and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _unexpected_skips:
        return
    terminalreporter.section("unexpected skips", sep="=", red=True, bold=True)
    terminalreporter.line(f"{len(_unexpected_skips)} skipped without @pytest.mark.expected_skip, so this run "
                          "fails:", red=True)
    for line in _unexpected_skips:
        terminalreporter.line(f"  {line}")
    terminalreporter.line("Provide what they need (.ci/run starts the services the suite uses) or, if the "
                          "skip is legitimate on some machines, mark the test "
                          '@pytest.mark.expected_skip("why").')
