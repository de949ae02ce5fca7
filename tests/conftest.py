"""Shared test set-up. Fixture modules live in tests/support/ and are imported by the tests that use them."""

from __future__ import annotations

import os

# Tests must never wait on a managed interpreter download or an index we cannot reach by accident.
os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")

# Fixtures shared across test modules (tests/ is on sys.path: pytest inserts this conftest's directory).
pytest_plugins = ["support.studioml_client", "support.runner", "support.s3server", "support.rabbitmq"]
