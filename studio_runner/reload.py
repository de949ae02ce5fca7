"""SIGHUP: read the configuration again and apply what can change while experiments run.

Why only some options: a queue filter, a concurrency cap, a drain timeout or the log level can change between
two intake rounds without touching anything in flight. Storage roots, caches, the working directory, the
broker URL or the status address are held open by running experiments or connections; changing those needs a
restart (SIGTERM drains, the next runner starts with the new file), and the reload says so by name instead of
half-applying them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from studio_runner.config import OPTIONS, Settings
from studio_runner.errors import ConfigError
from studio_runner.logs import configure_logging
from studio_runner.redact import runner_secrets
from studio_runner.supervisor import Supervisor

log = logging.getLogger("studio_runner.reload")

LIVE_OPTIONS = ("queue-match", "queue-mismatch", "max-running", "drain-timeout", "log-level", "log-format",
                "log-libraries", "clear-text-messages", "max-message-size")
"""Options a reload applies at once; every other changed option is reported as needing a restart."""

_LOGGING = ("log-level", "log-format", "log-libraries")


class Reloader:
    """Re-resolves the settings with ``resolve`` (flags and environment as at start, the file as it is now)
    and applies the live options to ``supervisor``; keeps the settings in force for the next reload."""

    def __init__(self, supervisor: Supervisor, settings: Settings, resolve: Callable[[], Settings]) -> None:
        self.supervisor = supervisor
        self.settings = settings
        self._resolve = resolve

    def __call__(self) -> list[str]:
        """Reload; returns the names of the options applied (also logged)."""
        try:
            new = self._resolve()
        except ConfigError as exc:
            log.error("configuration not reloaded, the running one stays in force: %s", exc)
            return []
        changed = [o.name for o in OPTIONS if getattr(new, o.attr) != getattr(self.settings, o.attr)]
        live = [name for name in changed if name in LIVE_OPTIONS]
        later = [name for name in changed if name not in LIVE_OPTIONS]
        intake = self.supervisor.s
        intake.queue_match, intake.queue_mismatch = new.queue_match, new.queue_mismatch
        intake.max_running, intake.drain_timeout = new.max_running, new.drain_timeout
        intake.gate.clear_text, intake.gate.max_size = new.clear_text_messages, new.max_message_size
        if any(name in _LOGGING for name in live):
            configure_logging(new.log_level, runner_secrets(os.environ), log_format=new.log_format,
                              libraries=new.log_libraries)
        if "queue-match" in live or "queue-mismatch" in live:
            self.supervisor.rescan_soon()
        self.supervisor.wake()
        for name in later:  # keep the old value in force, so the next reload compares against what runs
            setattr(new, name.replace("-", "_"), getattr(self.settings, name.replace("-", "_")))
        self.settings = new
        if live:
            log.info("configuration reloaded: applied %s", ", ".join(live))
        else:
            log.info("configuration reloaded: no option that can change at run time changed")
        if later:
            log.warning("configuration reloaded: %s changed; %s effect only after a restart",
                        ", ".join(later), "it takes" if len(later) == 1 else "they take")
        return live
