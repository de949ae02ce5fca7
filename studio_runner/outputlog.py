"""The experiment's ``output/output`` file: the one place experiment lines are masked, written, scraped and
logged.

The process's raw bytes go through a :class:`~studio_runner.streammask.StreamMasker` (masking happens before a
long line is cut, and ``\\r`` progress output becomes lines of its own); runner notes go through the same
:class:`~studio_runner.redact.Redactor`. A write that fails (disk full, read-only or broken disk) never
escapes into the runner: the log records the failure, stops writing, and sets :attr:`OutputLog.broken` so
the executor stops the experiment and hands its message back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import IO

import trio

from studio_runner import metadata
from studio_runner.errors import DiskFull, RunnerError, is_disk_full
from studio_runner.redact import Redactor
from studio_runner.streammask import StreamMasker

log = logging.getLogger(__name__)


class OutputLog:
    """Masked, ordered lines into ``path``, the metadata scraper, the debug log and ``on_line``."""

    def __init__(self, path: Path, redactor: Redactor, scraper: metadata.MetadataScraper, key: str,
                 on_line: Callable[[str], None] | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._redactor = redactor
        self._masker: StreamMasker | None = None
        self._scraper = scraper
        self._on_line = on_line
        self._file: IO[str] | None = open(path, "a", encoding="utf-8", errors="replace")
        # one logger for all experiments: a logger per key would stay in logging's registry forever
        self._logger = logging.getLogger("studio_runner.experiment")
        self._key = key[:40]
        self.failure: RunnerError | None = None
        """Why the log could not be written (disk full, I/O error); None while it works."""
        self.broken = trio.Event()

    # -- writing ------------------------------------------------------------------------------------------
    def write(self, line: str) -> None:
        """A runner line (metadata JSON, a note): masked like experiment output."""
        self._emit(self._redactor.mask(line))

    def note(self, text: str) -> None:
        """A runner remark inside the experiment's output, recognisable by its prefix."""
        for line in text.splitlines() or [""]:
            self.write(f"studio-runner: {line}")

    def use(self, redactor: Redactor) -> None:
        """Mask with ``redactor`` from now on (set before the process starts, when all secrets are known)."""
        self._redactor = redactor
        self._masker = None

    def feed(self, data: bytes | bytearray) -> None:
        """Raw output bytes of the process."""
        if self._masker is None:
            self._masker = StreamMasker(self._redactor)
        for line in self._masker.feed(data):
            self._emit(line)

    def end_of_stream(self) -> None:
        """The process's output ended: the last partial line, if any, is written."""
        if self._masker is not None:
            for line in self._masker.close():
                self._emit(line)
            self._masker = None

    def _emit(self, masked: str) -> None:
        self._scraper.feed(masked)
        self._logger.debug("%s: %s", self._key, masked)
        if self._on_line is not None:
            self._on_line(masked)
        if self._file is not None:
            try:
                self._file.write(masked + "\n")
            except (OSError, ValueError) as exc:
                self._fail(exc)

    # -- flushing -----------------------------------------------------------------------------------------
    def flush(self) -> None:
        if self._file is not None:
            try:
                self._file.flush()
            except OSError as exc:
                self._fail(exc)

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError as exc:
                self._file = None
                self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self.failure is None:
            if is_disk_full(exc):
                self.failure = DiskFull(f"no space left for the output log on {self.path.parent}: {exc}")
            else:
                self.failure = RunnerError(f"cannot write the output log {self.path}: {exc}")
            log.error("%s", self.failure)
            self.broken.set()
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except (OSError, ValueError):
                pass  # the buffered tail could not be written either; nothing more to do
