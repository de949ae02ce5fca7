"""Slack messages (``--slack-hook``, ``--slack-room``): one short post when an experiment starts, and one when
it succeeds or fails (spec/options.md §6, the Go runner of 2018), so a team sees results without a dashboard.

Why it is built this way:

* An :class:`~studio_runner.events.EventBus` subscriber, like :mod:`studio_runner.reports`: the subscriber
  only formats a few lines and appends to a bounded backlog (the oldest post is dropped when it is full,
  counted, with one warning); one task sends them with httpx's async client (trio through anyio: no
  threads), so a slow or dead Slack never delays an experiment.
* Posts are rate limited (``min_interval``, one a second: Slack's own limit for incoming webhooks). A
  transport error, a timeout, 429 or 5xx is retried ``retries`` times with doubling back-off; after that, or
  on any other non-200 answer, Slack is suppressed for ``suppress_for`` seconds (Go: one minute) and posts
  due in that window are dropped and counted, so a broken hook costs one warning a minute, not a retry storm.
* Start means the experiment's process started (a request released because it did not fit never "starts");
  the end is the settlement of its message: acknowledged (success, failure, timeout, abort) or set aside
  (refused, expired, out of attempts). A hand-back (a runner-side fault, another attempt follows) is posted
  as a warning. A failure carries the last lines of the output; the output artifact's URL says where the
  rest is.
* No secret reaches Slack: every text goes through :func:`studio_runner.redact.scrub` (output lines were
  masked with the request's secrets already), and the hook URL itself appears in no log line.
* Go's per-request ``config.runner.slack_destination`` is not honoured: the events do not carry the request,
  and a request choosing where a runner posts would let any submitter spam any channel.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import trio

from studio_runner.attempt import Action, Outcome, Phase, Status
from studio_runner.events import Event, Finished, OutputLine, PhaseChanged, Registry, Settled
from studio_runner.redact import MASK, scrub
from studio_runner.units import format_elapsed

if TYPE_CHECKING:
    from studio_runner.config import Settings

log = logging.getLogger(__name__)

COLORS = {"info": "#228B22", "warning": "#DAA520", "error": "#FF0000"}
TAIL_LINES = 10
"""Output lines quoted in a failure post."""
TAIL_CHARS = 3000


@dataclass
class _Seen:
    """What the subscriber remembers of one attempt until its message is settled."""

    started: bool = False
    outcome: Outcome | None = None
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))


@dataclass
class Post:
    """One Slack message: its level (info, warning, error), text, and optional detail (a code block)."""

    level: str
    text: str
    detail: str = ""
    at: float = field(default_factory=time.time)


class SlackNotifier:
    """Subscriber and sending task (see the module doc); start it with :meth:`run` or :func:`start_slack`."""

    def __init__(self, registry: Registry, hook: str, room: str = "", *, host: str = "",
                 min_interval: float = 1.0, backlog: int = 100, retries: int = 2, backoff: float = 1.0,
                 suppress_for: float = 60.0, timeout: float = 10.0) -> None:
        self.registry = registry
        self.hook = hook
        self.room = room
        self.host = host or registry.host
        self.min_interval, self.retries, self.backoff = min_interval, retries, backoff
        self.suppress_for, self.timeout = suppress_for, timeout
        self._backlog: collections.deque[Post] = collections.deque(maxlen=backlog)
        self._seen: dict[str, _Seen] = {}
        self._wake = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self._token: trio.lowlevel.TrioToken | None = None
        self._trio_thread: int | None = None
        self._suppressed_until = 0.0
        self._last_sent = -1e9
        self.sent = 0
        self.dropped = 0
        """Posts dropped: backlog full, or due while Slack was suppressed."""

    # -- the subscriber -------------------------------------------------------------------------------------
    def __call__(self, event: Event) -> None:
        if not isinstance(event, (PhaseChanged, OutputLine, Finished, Settled)):
            return
        if self._trio_thread is not None and threading.get_ident() != self._trio_thread:
            if self._token is not None:
                self._token.run_sync_soon(self._take, event)
            return
        self._take(event)

    def _take(self, event: PhaseChanged | OutputLine | Finished | Settled) -> None:
        record = event.record
        if isinstance(event, OutputLine):
            seen = self._seen.get(record.attempt_id)
            if seen is not None:
                seen.tail.append(event.text)
            return
        if isinstance(event, PhaseChanged):
            if event.phase is Phase.RUNNING and record.attempt_id not in self._seen:
                self._seen[record.attempt_id] = _Seen(started=True)
                self._queue(Post("info", f"experiment {_code(record.key)} started on {self.host} "
                                         f"(queue {record.queue}, attempt {record.attempt})"))
            return
        if isinstance(event, Finished):
            self._seen.setdefault(record.attempt_id, _Seen()).outcome = event.outcome
            return
        seen = self._seen.pop(record.attempt_id, None)
        if seen is None or seen.outcome is None:
            return
        post = self._ending(seen, event.action)
        if post is not None:
            self._queue(post)

    def _ending(self, seen: _Seen, action: Action | None) -> Post | None:
        outcome = seen.outcome
        assert outcome is not None
        where = f" (queue {outcome.queue}, attempt {outcome.attempt}"
        if outcome.exit_code is not None:
            where += f", exit status {outcome.exit_code}"
        where += ")"
        output = f"\noutput: {outcome.output_url}" if outcome.output_url else ""
        reason = f": {outcome.reason}" if outcome.reason else ""
        took = format_elapsed(outcome.seconds)
        key = _code(outcome.key)
        tail = "\n".join(seen.tail)[-TAIL_CHARS:] if seen.started else ""
        if action is Action.ACK and outcome.status is Status.SUCCESS:
            return Post("info", f"experiment {key} succeeded on {self.host} in {took}{where}{output}")
        if action in (Action.ACK, Action.SET_ASIDE):
            verb = "was set aside" if action is Action.SET_ASIDE else str(outcome.status)
            text = f"experiment {key} {verb} on {self.host} after {took}{where}{reason}{output}"
            return Post("error", text, tail if outcome.status is not Status.SUCCESS else "")
        if action is Action.HAND_BACK and seen.started:
            return Post("warning", f"experiment {key} stopped on {self.host} after {took}{where}{reason}; "
                                   "its message goes back for another attempt")
        return None  # released before it started, or the broker took it back: nothing to tell

    def _queue(self, post: Post) -> None:
        if len(self._backlog) == self._backlog.maxlen:
            self.dropped += 1
            if self.dropped == 1:
                log.warning("Slack posts are due faster than they can be sent: the oldest are dropped "
                            "(%d waiting at most)", self._backlog.maxlen)
        self._backlog.append(post)
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._wake.set()

    # -- the sending task -----------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Subscribe and send until cancelled."""
        self._token = trio.lowlevel.current_trio_token()
        self._trio_thread = threading.get_ident()
        unsubscribe = self.registry.bus.subscribe(self)
        client = httpx.AsyncClient(timeout=self.timeout, follow_redirects=False)
        task_status.started()
        try:
            while True:
                if not self._backlog:
                    self._idle.set()
                    self._wake = trio.Event()
                    await self._wake.wait()
                    continue
                post = self._backlog.popleft()
                if trio.current_time() < self._suppressed_until:
                    self.dropped += 1
                    continue
                await trio.sleep_until(self._last_sent + self.min_interval)
                try:
                    await self._send(client, post)
                except Exception:  # a bug here must not end Slack for the runner's life
                    log.exception("Slack post failed")
                self._last_sent = trio.current_time()
        finally:
            unsubscribe()
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await client.aclose()

    async def flush(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds until the backlog is sent (or dropped): before the runner exits."""
        with trio.move_on_after(timeout):
            while self._backlog or not self._idle.is_set():
                await self._idle.wait()

    def payload(self, post: Post) -> dict[str, Any]:
        """The webhook body (Go's layout): one attachment with the text, a second with the output tail."""
        text = scrub(post.text)
        attachments: list[dict[str, Any]] = [{
            "text": text, "fallback": text, "color": COLORS[post.level], "ts": int(post.at),
            "footer": self.host}]
        if post.detail:
            attachments.append({"text": "```" + scrub(post.detail).replace("```", "'''") + "```",
                                "fallback": "last output lines", "color": COLORS[post.level],
                                "mrkdwn_in": ["text"]})
        body: dict[str, Any] = {"attachments": attachments}
        if self.room:
            body["channel"] = self.room
        return body

    async def _send(self, client: httpx.AsyncClient, post: Post) -> None:
        body = self.payload(post)
        why = ""
        for attempt in range(self.retries + 1):
            if attempt:
                await trio.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = await client.post(self.hook, json=body)
            except httpx.HTTPError as exc:
                why = type(exc).__name__ + (f" ({exc})" if str(exc) else "")
                continue
            if response.status_code == 200:
                self.sent += 1
                return
            why = f"HTTP {response.status_code} {response.text[:200]!r}"
            if response.status_code != 429 and response.status_code < 500:
                break  # the hook or the body is wrong: retrying cannot help
        self._suppressed_until = trio.current_time() + self.suppress_for
        self.dropped += 1
        log.warning("Slack post failed (%s); Slack is off for %.0f s", self._clean(why), self.suppress_for)

    def _clean(self, text: str) -> str:
        return scrub(text.replace(self.hook, MASK) if self.hook else text)


def _code(text: str) -> str:
    return "`" + scrub(text).replace("`", "'") + "`"


async def start_slack(nursery: trio.Nursery, registry: Registry, settings: Settings) -> SlackNotifier | None:
    """Start Slack posts in ``nursery`` when ``--slack-hook`` is set; returns the notifier (call ``flush``
    before exiting to send what is due), else None."""
    if not settings.slack_hook:
        return None
    notifier = SlackNotifier(registry, settings.slack_hook, settings.slack_room, host=settings.hostname)
    await nursery.start(notifier.run)
    log.info("Slack posts on%s", f" (to {settings.slack_room})" if settings.slack_room else "")
    return notifier
