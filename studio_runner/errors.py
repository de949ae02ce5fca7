"""The runner's own exception tree.

Every error says what should happen to the message that caused it, so the supervisor never has to guess:

* ``FAIL``      the experiment itself failed (bad archive, failed install, missing input): save its output,
                report it, acknowledge the message. Retrying would fail the same way.
* ``RETRY``     the runner could not do its job this time (storage down, disk full, shutdown): hand the
                message back for another attempt, up to ``--max-attempts``.
* ``SET_ASIDE`` the message can never run (malformed, expired, undecryptable): report it, quarantine it,
                acknowledge it.
"""

from __future__ import annotations

import enum
import errno


class Disposition(enum.Enum):
    FAIL = "fail"
    RETRY = "retry"
    SET_ASIDE = "set_aside"


class RunnerError(Exception):
    """Base of every error the runner raises on purpose."""

    disposition: Disposition = Disposition.RETRY


class ConfigError(RunnerError):
    """An option or configuration file is wrong; raised at start-up, names the option."""


class RequestInvalid(RunnerError):
    """A message that does not parse or validate as a StudioML request. Never runnable."""

    disposition = Disposition.SET_ASIDE

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class RequestRefused(RequestInvalid):
    """A message the runner will not run by policy: larger than --max-message-size, clear text while
    --clear-text-messages is false, or an envelope that is unsigned, signed by no key this queue trusts, or
    that does not verify or decrypt. Its reason never holds key material or decrypted fields."""


class RequestExpired(RunnerError):
    """The request's ``experimentLifetime`` ended before it could start."""

    disposition = Disposition.SET_ASIDE


class StorageError(RunnerError):
    """Storage could not be reached or refused us: a runner-side fault, worth another attempt."""

    disposition = Disposition.RETRY


class ObjectNotFound(StorageError):
    """The object does not exist. Fatal for immutable inputs, normal for mutable outputs."""


class DiskFull(RunnerError):
    """No space (or quota) left where the runner writes: output log, unpacking, environment build, cache.

    A runner-side fault: the attempt ends, what exists is uploaded, the message is handed back, and the runner
    keeps serving (its experiment directory is removed, which frees the space).
    """

    disposition = Disposition.RETRY


def is_disk_full(exc: BaseException) -> bool:
    """Whether an OSError means "no space left" (ENOSPC) or "quota exceeded" (EDQUOT)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class ArtifactError(RunnerError):
    """An artifact could not be fetched or put in place (missing input, over budget)."""

    disposition = Disposition.RETRY


class ArchiveUnsafe(ArtifactError):
    """An archive tried to escape its directory, held a device, or broke the size budget."""

    disposition = Disposition.FAIL


class EnvBuildFailed(RunnerError):
    """uv/pip could not build the requested Python environment; the installer's error is in the output."""

    disposition = Disposition.FAIL


class InterpreterNotFound(EnvBuildFailed):
    """No interpreter matches ``pythonver`` and ``--strict-python`` is set."""


class ArtifactRejected(ArtifactError):
    """The artifact as stored can never be put in place, whoever tries and however often: fail, don't retry.

    Its message says what the experimenter has to change (re-upload, repack, raise ``hdd``).
    """

    disposition = Disposition.FAIL


class ArchiveCorrupt(ArtifactRejected):
    """Not a readable archive although ``unpack`` asked for one: truncated or corrupt data, a plain file, a
    compression this runner cannot read."""


class ArtifactTooLarge(ArtifactRejected):
    """Bigger than the request's ``hdd`` budget: the object itself, or what its archive unpacks to (every
    entry charged a fixed cost on top of its bytes, so many empty files count too)."""


class ArchiveTooManyEntries(ArtifactTooLarge):
    """More entries than any archive may hold on this runner, whatever the budget (an inode bomb)."""
