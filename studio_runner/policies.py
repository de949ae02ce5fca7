"""Small policies the executor and supervisor consult instead of scattering conditions through the code.

Each answers one question: is this request still worth running, when must it stop, how often are its
artifacts saved, and what happens to its message after an outcome.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from studio_runner.errors import RequestExpired
from studio_runner.request import Request


@dataclass(frozen=True)
class Lifetime:
    """``time_added + experimentLifetime``: after it the request is stale and is set aside, not run."""

    def ends_at(self, request: Request) -> float | None:
        added = request.experiment.time_added
        lifetime = request.config.experiment_lifetime
        if added is None or added <= 10 or lifetime is None or lifetime <= 0:
            return None
        return added + lifetime

    def check(self, request: Request, now: float | None = None) -> None:
        """Raise RequestExpired when the lifetime is already over (spec lifecycle.md §7)."""
        end = self.ends_at(request)
        now = time.time() if now is None else now
        if end is not None and now >= end:
            late = now - end
            raise RequestExpired(f"experimentLifetime ended {late:.0f}s before the runner could start it")


@dataclass(frozen=True)
class Deadline:
    """When the running process must be stopped: min(cap, lifetime end, start + max_duration).

    The environment build happens before the process starts, so it counts against the lifetime but not
    against ``max_duration`` (spec lifecycle.md §5, Recommended).
    """

    cap_seconds: float
    lifetime: Lifetime = Lifetime()

    def at(self, request: Request, process_start: float) -> tuple[float, str]:
        """Absolute deadline (time.time() clock) and the name of the limit that sets it."""
        candidates = [(process_start + self.cap_seconds, "the runner's --max-lifetime")]
        end = self.lifetime.ends_at(request)
        if end is not None:
            candidates.append((end, "experimentLifetime"))
        if request.experiment.max_duration is not None:
            candidates.append((process_start + request.experiment.max_duration, "max_duration"))
        return min(candidates)


@dataclass(frozen=True)
class Checkpoints:
    """Interval for uploading mutable artifacts while the experiment runs (saveWorkspaceFrequency)."""

    floor_seconds: float
    default_seconds: float

    def interval(self, request: Request) -> float:
        asked = request.config.save_workspace_frequency
        if asked is None or asked <= 0:
            return self.default_seconds
        return max(asked, self.floor_seconds)


@dataclass(frozen=True)
class Backoff:
    """Exponential back-off with jitter: try ``n`` waits ``min(cap, first * 2**(n-1))`` scaled by a random
    factor in [0.5, 1] ("equal jitter": never less than half the nominal delay, so a storm of failures still
    spreads out, and never more than the cap). A formula this small does not need a retry library."""

    first: float
    cap: float

    def delay(self, n: int, rng: random.Random | None = None) -> float:
        nominal = min(self.cap, self.first * 2 ** max(0, min(n - 1, 62)))
        return nominal * (rng or random).uniform(0.5, 1.0)


@dataclass(frozen=True)
class Retries:
    """A message handed back after a runner-side fault gets another attempt, until ``max_attempts``, each
    after a back-off (the runner holds the message meanwhile, so no other runner takes it early)."""

    max_attempts: int
    backoff: Backoff = field(default_factory=lambda: Backoff(10.0, 600.0))

    def gives_up(self, attempt: int) -> bool:
        """True when ``attempt`` was the last one: set the message aside instead of handing it back."""
        return attempt >= self.max_attempts

    def delay(self, attempt: int) -> float:
        """How long to hold the message after failed attempt ``attempt`` before handing it back."""
        return self.backoff.delay(attempt)
