"""Slack posts (``--slack-hook``): a local HTTP server in the test plays the incoming webhook and records
every post. The real runner (in-process, local directory queue, wired as ``runtime.serve`` wires it) runs a
succeeding and a failing experiment that both carry a secret: start and finish posts arrive with the key,
queue, host, duration, exit status and output URL, and no secret. A failing webhook suppresses Slack for the
window and then posts resume; a webhook that never answers does not delay the experiment."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trio
from support.studioml_client import cache_root

from studio_runner import config, runtime
from studio_runner.attempt import Action, Outcome, Phase, Status
from studio_runner.events import Registry
from studio_runner.slack import SlackNotifier, start_slack
from studio_runner.submit import Submission, submit

SECRET = "slack-Secret-v4lue-77q"
HOOK_TOKEN = "T000/B000/hooksecretXYZ"


class Webhook:
    """A loopback HTTP server that records JSON posts; ``status`` and ``delay`` say how it answers."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.requests = 0
        self.status = 200
        self.delay = 0.0
        self.closing = threading.Event()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hook.requests += 1
                if hook.delay:
                    hook.closing.wait(hook.delay)
                if hook.status == 200:
                    hook.posts.append(json.loads(body))
                self.send_response(hook.status)
                self.end_headers()
                self.wfile.write(b"ok" if hook.status == 200 else b"server_error")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/{HOOK_TOKEN}"

    def texts(self) -> list[str]:
        return [a["text"] for post in self.posts for a in post["attachments"]]

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


def submit_experiment(tmp_path: Path, queue: str, key: str, code: str) -> None:
    script = tmp_path / f"ws_{key}" / "train.py"
    script.parent.mkdir(parents=True)
    script.write_text(code)
    submit(Submission(script=script, queue=queue, experiment=key, hdd="10m", ram="64m",
                      env={"MY_API_TOKEN": SECRET}), tmp_path / "queue", tmp_path / "store")


def settings_for(tmp_path: Path, hook: str) -> config.Settings:
    (tmp_path / "work").mkdir(exist_ok=True)
    (tmp_path / "queue").mkdir(exist_ok=True)
    return config.resolve({"queue_root": str(tmp_path / "queue"), "working_dir": str(tmp_path / "work"),
                           "env_cache_dir": str(cache_root() / "envs"), "poll_interval": "0.05s",
                           "local_storage_roots": str(tmp_path), "slack_hook": hook,
                           "slack_room": "#experiments"}, environ={})


def test_posts_for_start_and_finish_carry_the_facts_and_no_secret(webhook: Webhook, tmp_path: Path) -> None:
    queue = f"local_slack_{uuid.uuid4().hex[:6]}"
    good, bad = f"exp_slack_ok_{uuid.uuid4().hex[:6]}", f"exp_slack_bad_{uuid.uuid4().hex[:6]}"
    submit_experiment(tmp_path, queue, good, "print('fine')\n")
    submit_experiment(tmp_path, queue, bad, "import os, sys\n"
                      "print('the token is', os.environ['MY_API_TOKEN'])\n"
                      "print(f\"MY_API_TOKEN={os.environ['MY_API_TOKEN']}\")\nsys.exit(4)\n")
    settings = settings_for(tmp_path, webhook.url)

    async def main() -> list[Outcome]:
        async with runtime.open_runner(settings) as supervisor, trio.open_nursery() as nursery:
            notifier = await start_slack(nursery, supervisor.registry, settings)
            assert notifier is not None
            notifier.min_interval = 0.05
            with trio.fail_after(300):
                outcomes = await supervisor.run(once=True, handle_signals=False)
            await notifier.flush(30)
            nursery.cancel_scope.cancel()
        return outcomes

    outcomes = trio.run(main)
    assert sorted(o.status for o in outcomes) == sorted([Status.SUCCESS, Status.FAILED])
    assert len(webhook.posts) == 4, webhook.texts()
    raw = json.dumps(webhook.posts)
    assert SECRET not in raw and HOOK_TOKEN not in raw
    for post in webhook.posts:
        assert post["channel"] == "#experiments"
        assert post["attachments"][0]["footer"] == settings.hostname
    texts = webhook.texts()
    host = settings.hostname
    by_key = {o.key: o for o in outcomes}
    for key in (good, bad):
        assert any(f"`{key}` started on {host} (queue {queue}" in t for t in texts), texts
    ok = next(t for t in texts if f"`{good}` succeeded" in t)
    assert f"queue {queue}" in ok and "exit status 0" in ok and by_key[good].output_url in ok
    failed_post = next(p for p in webhook.posts if f"`{bad}` failed" in p["attachments"][0]["text"])
    first = failed_post["attachments"][0]
    assert first["color"] == "#FF0000" and "exit status 4" in first["text"]
    assert by_key[bad].output_url in first["text"]
    assert "the token is ****" in failed_post["attachments"][1]["text"]  # the tail, masked


def registry_run(registry: Registry, key: str, ok: bool = True) -> None:
    """One attempt's events, as the supervisor and executor publish them."""
    record = registry.claim("local_q", "local", f"m-{key}", 1)
    registry.identify(record, key, None)
    registry.phase(record, Phase.RUNNING)
    registry.output(record, "some output")
    status = Status.SUCCESS if ok else Status.FAILED
    registry.finish(record, Outcome(key=key, status=status, action=Action.ACK, exit_code=0 if ok else 1,
                                    queue="local_q"))
    registry.settle(record, Action.ACK)


def test_a_failing_webhook_suppresses_slack_for_the_window(webhook: Webhook) -> None:
    webhook.status = 500
    registry = Registry("host-s")
    notifier = SlackNotifier(registry, webhook.url, host="host-s", min_interval=0.0, retries=2, backoff=0.05,
                             suppress_for=1.5)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.run)
            registry_run(registry, "exp_a")  # start + finish: the first fails 3 times, the second is dropped
            await notifier.flush(10)
            assert webhook.requests == 3 and notifier.dropped == 2
            webhook.status = 200
            registry_run(registry, "exp_b")  # still inside the window: dropped without a request
            await notifier.flush(10)
            assert webhook.requests == 3
            await trio.sleep(1.6)
            registry_run(registry, "exp_c")
            await notifier.flush(10)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert webhook.requests == 5
    assert [p["attachments"][0]["text"].split(" ")[1] for p in webhook.posts] == ["`exp_c`", "`exp_c`"]


def test_a_client_error_is_not_retried(webhook: Webhook, caplog: pytest.LogCaptureFixture) -> None:
    webhook.status = 404
    registry = Registry("host-s")
    notifier = SlackNotifier(registry, webhook.url, host="host-s", min_interval=0.0, backoff=0.05)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.run)
            registry_run(registry, "exp_a")
            await notifier.flush(10)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert webhook.requests == 1
    assert "HTTP 404" in caplog.text and HOOK_TOKEN not in caplog.text


def test_posts_are_rate_limited_and_the_backlog_is_bounded(webhook: Webhook) -> None:
    registry = Registry("host-s")
    notifier = SlackNotifier(registry, webhook.url, host="host-s", min_interval=0.2, backlog=3)

    async def main() -> float:
        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.run)
            for n in range(5):
                registry_run(registry, f"exp_{n}")  # 10 posts due at once
            began = trio.current_time()
            await notifier.flush(20)
            nursery.cancel_scope.cancel()
        return trio.current_time() - began

    took = trio.run(main)
    assert notifier.dropped == 7 and len(webhook.posts) == 3
    assert took >= 0.35  # three posts, 0.2 s apart
    assert "`exp_4`" in webhook.texts()[-1]  # the newest are kept


def test_a_webhook_that_never_answers_does_not_delay_the_experiment(webhook: Webhook, tmp_path: Path) -> None:
    webhook.delay = 60
    queue = f"local_slack_{uuid.uuid4().hex[:6]}"
    key = f"exp_slack_slow_{uuid.uuid4().hex[:6]}"
    submit_experiment(tmp_path, queue, key, "print('quick')\n")
    settings = settings_for(tmp_path, webhook.url)

    async def main() -> tuple[list[Outcome], float]:
        async with runtime.open_runner(settings) as supervisor, trio.open_nursery() as nursery:
            await start_slack(nursery, supervisor.registry, settings)
            began = time.monotonic()
            with trio.fail_after(120):
                outcomes = await supervisor.run(once=True, handle_signals=False)
            took = time.monotonic() - began
            nursery.cancel_scope.cancel()
        return outcomes, took

    outcomes, took = trio.run(main)
    assert [o.status for o in outcomes] == [Status.SUCCESS]
    assert webhook.requests >= 1 and webhook.posts == []  # the start post is still waiting for its answer
    assert took < 30, took


def test_no_hook_no_slack(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, "")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            assert await start_slack(nursery, Registry("h"), settings) is None

    trio.run(main)
