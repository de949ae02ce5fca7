"""Where the Pub/Sub backend's credentials come from: files in ``--certs-dir``, or the default credentials.

Split from :mod:`studio_runner.queues.pubsub` (the trio-facing backend) because reading and watching the
credential files is a concern of its own. Each regular, non-hidden file is one service-account JSON; its
``project_id`` is the project served with it. Hidden names and folders are skipped because a Kubernetes
secret mount keeps its real files under ``..data/`` beside symlinks to them. File contents are never logged.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio_runner.errors import ConfigError
from studio_runner.redact import scrub

log = logging.getLogger(__name__)

SCOPES = ("https://www.googleapis.com/auth/pubsub",)


def gexc() -> Any:
    from google.api_core import exceptions

    return exceptions


@dataclass
class Source:
    """One credential: a project and the clients that act with it."""

    label: str
    project: str
    credentials: Any = None
    stamp: tuple[float, int] | None = None
    subscriber: Any = None
    publisher: Any = None
    retired: bool = False
    """Its file is gone: no new work. Claims in progress keep the clients for renewals and the ack."""
    names: list[str] = field(default_factory=list)
    failing: bool = False

    def connect(self) -> None:
        from google.cloud import pubsub_v1

        if self.subscriber is None:
            self.subscriber = pubsub_v1.SubscriberClient(credentials=self.credentials)
        if self.publisher is None:
            self.publisher = pubsub_v1.PublisherClient(credentials=self.credentials)

    def path(self, name: str) -> str:
        return f"projects/{self.project}/subscriptions/{name}"

    def publish(self, request: dict[str, Any], timeout: float) -> Any:
        """One synchronous publish (the GAPIC method; the wrapper's own publish batches in a thread)."""
        from google.pubsub_v1.services.publisher.client import PublisherClient as Gapic

        return Gapic.publish(self.publisher, request=request, timeout=timeout)

    def close(self) -> None:
        """Close the gRPC channels; pulls in flight end at once (CANCELLED)."""
        for client in (self.subscriber, self.publisher):
            if client is not None:
                try:
                    client.transport.close()
                except Exception:  # noqa: BLE001 - closing twice or a half-built client: nothing to release
                    pass


def read_credential(path: Path, emulator: bool) -> tuple[str, Any]:
    """(project, credentials) from a service-account JSON; the emulator needs only ``project_id``."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path.name}: not a readable JSON credentials file ({type(exc).__name__})"
                          ) from None
    project = info.get("project_id") if isinstance(info, dict) else None
    if not isinstance(project, str) or not project:
        raise ConfigError(f"{path.name}: no project_id")
    if emulator:
        return project, None
    from google.oauth2 import service_account

    try:
        return project, service_account.Credentials.from_service_account_info(info, scopes=SCOPES)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"{path.name}: not a service-account key ({scrub(str(exc))})") from None


def scan_certs(certs_dir: Path, sources: dict[str, Source], broken: dict[str, tuple[float, int]],
               emulator: bool, retire: Callable[[Source], None]) -> None:
    """Reload the certs dir (in a thread): new or changed files become sources (keyed by file name), removed
    or broken ones are retired; ``broken`` remembers files already warned about until they change."""
    present: dict[str, tuple[float, int]] = {}
    for entry in sorted(os.scandir(certs_dir), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_file():
            continue  # hidden files and folders: Kubernetes secret mounts keep their data in ..data/
        st = entry.stat()
        present[entry.name] = (st.st_mtime, st.st_size)
    for name in [n for n in broken if n not in present]:
        del broken[name]
    for name in [n for n in sources if n and n not in present]:
        log.info("Pub/Sub credentials %s removed: its subscriptions get no new work", name)
        retire(sources.pop(name))
    for name, stamp in present.items():
        old = sources.get(name)
        if (old is not None and old.stamp == stamp) or broken.get(name) == stamp:
            continue
        try:
            project, creds = read_credential(certs_dir / name, emulator)
        except ConfigError as exc:
            log.warning("Pub/Sub credentials skipped: %s", exc)
            broken[name] = stamp
            if old is not None:
                retire(sources.pop(name))
            continue
        broken.pop(name, None)
        source = Source(label=name, project=project, credentials=creds, stamp=stamp)
        source.connect()
        if old is not None:
            retire(sources.pop(name))
        sources[name] = source
        log.info("Pub/Sub credentials %s: serving project %s", name, project)
