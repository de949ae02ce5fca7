"""The TUI under Textual's pilot against a real HTTP server (a thread running http.server) whose status
document the test changes: rows appear, phases change, the log follows the selected experiment, `d` and `r`
POST the intake state, a vanished server shows the banner and a restarted one is picked up again."""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tui import render
from tui.app import RunnerApp
from tui.client import StatusClient, Unreachable

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # Textual runs on asyncio only


def document() -> dict[str, Any]:
    now = time.time()
    return {
        "schema": 1, "version": "0.1.0", "host": "test-box", "pid": 1, "started_at": now - 65, "now": now,
        "uptime_s": 65.0,
        "intake": {"state": "Running", "reason": "", "since": now - 65},
        "queues": [{"backend": "local", "name": "local_default", "paused_for_s": None, "note": ""}],
        "running": [], "finished": [],
        "resources": {"cores": {"total": 16, "free": 16}, "ram": {"total": 2**36, "free": 2**35},
                      "disk": {"total": None, "free": 5 * 10**11}},
        "gpus": {"backend": "fake", "reason": "", "cards": [
            {"index": 0, "uuid": "GPU-0", "name": "NVIDIA H200", "memory_total": 150 * 2**30,
             "memory_used": 120 * 2**30, "utilisation": 37, "slots": 8, "state": "allocated",
             "owner": "a-1"}]},
        "caches": {"artifacts": {"dir": "/var/cache/x", "bytes": 123, "limit": 10 * 2**30, "hits": 3,
                                 "misses": 1},
                   "envs": {"dir": "/root/.cache/envs", "limit": 20 * 2**30}},
        "totals": {"completed": 0, "succeeded": 0, "failed": 0},
    }


def attempt(attempt_id: str, key: str, phase: str = "claimed",
            tail: list[str] | None = None) -> dict[str, Any]:
    return {"attempt_id": attempt_id, "queue": "local_default", "backend": "local", "key": key, "project": "",
            "attempt": 1, "phase": phase, "phase_since": time.time(), "elapsed_s": 3.2, "cores": 2,
            "ram": 3 * 2**30, "gpus": "0", "cpu_percent": 97.5, "rss": 200 * 2**20, "pid": 4321,
            "bytes_downloaded": 0, "bytes_uploaded": 0, "output_tail": tail or []}


class FakeRunner:
    """A real HTTP server on a fixed port serving ``self.status``; ``stop``/``start`` mimic a restart."""

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.status = document()
        self.posts: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, code: int, body: dict[str, Any] | str) -> None:
                data = (json.dumps(body) if isinstance(body, dict) else body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path == "/status":
                    with fake.lock:
                        self._send(200, copy.deepcopy(fake.status))
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.posts.append({"path": self.path, "body": body})
                    fake.status["intake"] = {"state": body["state"], "reason": "asked by the TUI",
                                             "since": time.time()}
                self._send(200, {"state": body["state"], "reason": "asked by the TUI"})

        return Handler

    def start(self) -> None:
        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        assert self.server is not None and self.thread is not None
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
        self.server = None

    def change(self, edit: Callable[[dict[str, Any]], None]) -> None:
        with self.lock:
            edit(self.status)


@pytest.fixture
def fake() -> Iterator[FakeRunner]:
    runner = FakeRunner()
    runner.start()
    yield runner
    if runner.server is not None:
        runner.stop()


async def wait_for(pilot: Any, check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await pilot.pause(0.05)


def header_text(app: RunnerApp) -> str:
    return str(app.query_one("#header").render())


def log_lines(app: RunnerApp) -> list[str]:
    from textual.widgets import Log
    return list(app.query_one(Log).lines)


def cell(app: RunnerApp, attempt_id: str, column: str) -> str:
    from textual.widgets import DataTable
    return str(app.query_one(DataTable).get_cell(attempt_id, column))


async def test_rows_phases_log_follow_keys_and_reconnect(fake: FakeRunner, tmp_path: Path) -> None:
    app = RunnerApp(fake.url, interval=0.1)
    async with app.run_test(size=(150, 42)) as pilot:
        await wait_for(pilot, lambda: "test-box" in header_text(app), "the first status")
        assert "connected" in header_text(app) and "Running" in header_text(app)
        assert "120 GiB / 150 GiB" in str(app.query_one("#gpus").render())
        assert "hits 3 misses 1" in str(app.query_one("#caches").render())
        assert "local:local_default" in str(app.query_one("#queues").render())

        # Rows appear, keyed by attempt id.
        fake.change(lambda s: s["running"].extend([attempt("a-1", "exp_one", "claimed", ["one: line 1"]),
                                                   attempt("a-2", "exp_two", "building_env", ["two: x"])]))
        from textual.widgets import DataTable
        table = app.query_one(DataTable)
        await wait_for(pilot, lambda: table.row_count == 2, "two rows")
        assert cell(app, "a-1", "phase") == "claimed" and cell(app, "a-1", "ram") == "3 GiB"
        assert cell(app, "a-2", "key") == "exp_two"
        await wait_for(pilot, lambda: "allocated exp_one" in str(app.query_one("#gpus").render()),
                       "the card's owner by experiment key")
        # The log follows the selected (first) row.
        await wait_for(pilot, lambda: log_lines(app) == ["one: line 1"], "exp_one's output")

        # Select the second row: the log switches to its output; refreshes keep the selection.
        await pilot.press("down")
        await wait_for(pilot, lambda: log_lines(app) == ["two: x"], "exp_two's output")
        assert app.selected_attempt() == "a-2"

        # Phases change in place and new output lines are appended, not repeated.
        def progress(s: dict[str, Any]) -> None:
            s["running"][0]["phase"] = "running"
            s["running"][1]["phase"] = "running"
            s["running"][1]["output_tail"] = ["two: x", "two: y", "two: z"]
        fake.change(progress)
        await wait_for(pilot, lambda: log_lines(app) == ["two: x", "two: y", "two: z"], "appended lines")
        # A tail longer than the pane: the pane shows its end.
        from textual.widgets import Log
        long_tail = [f"one: line {i}" for i in range(1, 41)]
        fake.change(lambda s: s["running"][0].update(output_tail=long_tail))
        await pilot.press("up")
        await wait_for(pilot, lambda: log_lines(app) == long_tail, "the long tail")
        await pilot.pause(0.3)
        pane = app.query_one(Log)
        assert 0 < pane.max_scroll_y == pane.scroll_y, (pane.scroll_y, pane.max_scroll_y)
        await pilot.press("down")
        await wait_for(pilot, lambda: log_lines(app) == ["two: x", "two: y", "two: z"], "back to a-2")
        assert cell(app, "a-1", "phase") == "running" and cell(app, "a-2", "phase") == "running"
        assert app.selected_attempt() == "a-2", "a refresh must not move the cursor"

        # The first attempt finishes: its row stays with an outcome; the cursor stays on a-2.
        def finish(s: dict[str, Any]) -> None:
            done = s["running"].pop(0)
            s["finished"].append({"attempt_id": done["attempt_id"], "queue": done["queue"],
                                  "backend": "local", "key": done["key"], "project": "", "status": "success",
                                  "action": "ack", "reason": "", "elapsed_s": 12.0,
                                  "finished_at": time.time()})
        fake.change(finish)
        await wait_for(pilot, lambda: cell(app, "a-1", "outcome") == "success/ack", "the outcome")
        assert cell(app, "a-1", "phase") == "done" and table.row_count == 2
        assert app.selected_attempt() == "a-2"
        # A new attempt goes above the finished ones; the cursor still follows a-2.
        fake.change(lambda s: s["running"].append(attempt("a-3", "exp_three", "downloading")))
        await wait_for(pilot, lambda: table.row_count == 3, "the third row")
        assert [row.key.value for row in table.ordered_rows] == ["a-2", "a-3", "a-1"]
        assert app.selected_attempt() == "a-2" and log_lines(app) == ["two: x", "two: y", "two: z"]
        fake.change(lambda s: s["running"].pop())

        # d drains, r resumes: real POSTs, and the header shows the new state.
        await pilot.press("d")
        await wait_for(pilot, lambda: len(fake.posts) == 1, "the drain POST")
        assert fake.posts[0] == {"path": "/intake", "body": {"state": "DrainAndSuspend"}}
        await wait_for(pilot, lambda: "DrainAndSuspend" in header_text(app), "drained in the header")
        await pilot.press("r")
        await wait_for(pilot, lambda: len(fake.posts) == 2, "the resume POST")
        assert fake.posts[1]["body"] == {"state": "Running"}
        await wait_for(pilot, lambda: "DrainAndSuspend" not in header_text(app), "running again")

        # The runner goes away: banner, the last figures stay; it comes back: recovered by itself.
        fake.stop()
        await wait_for(pilot, lambda: "disconnected — retrying" in header_text(app), "the banner")
        assert table.row_count == 2
        fake.change(lambda s: s.update(host="restarted-box", running=[], finished=[]))
        fake.start()
        await wait_for(pilot, lambda: "restarted-box" in header_text(app), "the reconnect")
        assert "disconnected" not in header_text(app)
        await wait_for(pilot, lambda: table.row_count == 0, "rows of the old runner gone")

        app.save_screenshot("tui-pilot.svg", str(tmp_path))
        await pilot.press("q")
    assert app.return_value == 0


async def test_refused_control_is_reported_not_raised(tmp_path: Path) -> None:
    """A runner that is down when `d` is pressed: a notification, the app keeps running."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = RunnerApp(f"http://127.0.0.1:{port}", interval=0.1)
    async with app.run_test() as pilot:
        await wait_for(pilot, lambda: app.polls >= 2, "two failed polls")
        assert "disconnected — retrying" in header_text(app)
        await pilot.press("d")
        await wait_for(pilot, lambda: any("could not set intake" in str(n.message)
                                          for n in app._notifications), "the error notification")
        assert app.is_running


async def test_client_raises_unreachable_and_checks_states() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with StatusClient(f"http://127.0.0.1:{port}") as client:
        with pytest.raises(Unreachable):
            await client.fetch()
        with pytest.raises(ValueError):
            await client.set_intake("Paused")


def test_new_lines_of_a_sliding_tail() -> None:
    assert render.new_lines([], ["a", "b"]) == ["a", "b"]
    assert render.new_lines(["a", "b"], ["a", "b", "c"]) == ["c"]
    assert render.new_lines(["a", "b", "c"], ["b", "c", "d", "e"]) == ["d", "e"]  # window slid
    assert render.new_lines(["a"], ["a", "a"]) == ["a"]  # repeated lines while the window fills
    assert render.new_lines(["a", "b"], ["x", "y"]) == ["x", "y"]  # more than a window between polls
    assert render.new_lines(["a", "b"], ["a", "b"]) == []


def test_bars_and_missing_figures() -> None:
    assert render.bar(0.5, 10).plain == "█████░░░░░"
    assert render.bar(None, 4).plain == "····"
    assert render.bar(1.7, 4).plain == "████"
    cells = render.running_cells({"attempt_id": "x"})  # a runner that reports nothing yet
    assert cells["ram"] == render.DASH and cells["cpu"] == render.DASH
    assert "no cards" in render.gpu_panel(None).plain
    assert "artifacts off" in render.caches_panel({"artifacts": None}).plain
    cards = [{"index": 0, "uuid": "GPU-aaaa"}, {"index": 1, "uuid": "GPU-bbbb"}]
    assert render.card_names("GPU-bbbb,GPU-aaaa", cards) == "1,0"
    assert render.card_names("GPU-12345678-1111-2222", []) == "GPU-12345678"
    assert render.card_names("", cards) == render.DASH and render.card_names("0", cards) == "0"


async def test_a_long_tail_at_start_is_shown_from_its_end(fake: FakeRunner) -> None:
    """The first document arrives before the pane has its size; the pane must still end at the last line."""
    from textual.widgets import Log
    tail = [f"epoch {i}" for i in range(50)]
    fake.change(lambda s: s["running"].append(attempt("a-1", "exp_long", "running", tail)))
    app = RunnerApp(fake.url, interval=0.1)
    async with app.run_test(size=(150, 42)) as pilot:
        await wait_for(pilot, lambda: log_lines(app) == tail, "the tail")
        await pilot.pause(0.5)
        pane = app.query_one(Log)
        assert 0 < pane.max_scroll_y == pane.scroll_y, (pane.scroll_y, pane.max_scroll_y)
