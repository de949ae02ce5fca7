"""The TUI against a live runner (the real CLI in a subprocess, the local queue, real experiments): rows
appear, the phase reaches running, the log pane follows the experiment's output, `d` stops intake (a second
experiment stays queued) and `r` resumes it. Also `run --tui` end to end (tui.together), headless."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.runner import REPO, Sandbox

from studio_runner.submit import Submission, submit
from tui import together
from tui.app import RunnerApp

pytestmark = pytest.mark.anyio

QUEUE = "local_tui"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # Textual runs on asyncio only


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_script(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "job.py"
    script.write_text(textwrap.dedent(body))
    return script


def ticking_script(folder: Path, stop: Path) -> Path:
    """Prints a line every 0.2 s until ``stop`` exists (two minutes at most)."""
    return write_script(folder, f"""\
        import pathlib, time
        for i in range(600):
            print(f"tick {{i}}", flush=True)
            if pathlib.Path({str(stop)!r}).exists():
                break
            time.sleep(0.2)
        print("ticking done", flush=True)
        """)


def queue(box: Sandbox, script: Path, key: str) -> None:
    submit(Submission(script=script, queue=QUEUE, experiment=key), box.queue_root, box.store)


async def wait_for(pilot: Any, check: Callable[[], bool], what: str, runner: subprocess.Popen[bytes],
                   log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert runner.poll() is None, f"the runner exited before {what}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text()[-4000:]}"
        await pilot.pause(0.1)


def row_of(app: RunnerApp, key: str) -> dict[str, Any] | None:
    status = app.status or {}
    for entry in [*(status.get("running") or []), *(status.get("finished") or [])]:
        if entry.get("key") == key:
            return dict(entry)
    return None


def table_cell(app: RunnerApp, key: str, column: str) -> str:
    from textual.widgets import DataTable
    entry = row_of(app, key)
    table = app.query_one(DataTable)
    if entry is None or entry["attempt_id"] not in {k.value for k in table.rows}:
        return ""
    return str(table.get_cell(entry["attempt_id"], column))


def log_text(app: RunnerApp) -> str:
    from textual.widgets import Log
    return "\n".join(app.query_one(Log).lines)


async def test_tui_follows_a_live_runner_and_drains_and_resumes_it(sandbox: Sandbox, tmp_path: Path) -> None:
    port = free_port()
    stop = tmp_path / "stop"
    ticking = ticking_script(tmp_path / "ticking", stop)
    quick = write_script(tmp_path / "quick", "print('quick done')\n")
    queue(sandbox, ticking, "exp_ticking")
    log = tmp_path / "runner.log"
    with open(log, "wb") as out:
        runner = subprocess.Popen([sys.executable, str(REPO / "runner.py"), "run"], stdout=out,
                                  stderr=subprocess.STDOUT,
                                  env=sandbox.runner_env(STUDIO_RUNNER_PROM_ADDRESS=f"127.0.0.1:{port}",
                                                         STUDIO_RUNNER_LOG_LEVEL="info"))
    try:
        url = f"http://127.0.0.1:{port}"
        problem = together.wait_ready(url, runner)
        assert not problem, problem + "\n" + log.read_text()
        app = RunnerApp(url, interval=0.2)
        async with app.run_test(size=(150, 42)) as pilot:
            def wait(check: Callable[[], bool], what: str, timeout: float = 120.0) -> Any:
                return wait_for(pilot, check, what, runner, log, timeout)

            await wait(lambda: table_cell(app, "exp_ticking", "key") == "exp_ticking", "the row")
            await wait(lambda: table_cell(app, "exp_ticking", "phase") == "running", "phase running")
            header = str(app.query_one("#header").render())
            assert "connected" in header and "Running" in header, header
            await wait(lambda: "tick 3" in log_text(app), "its output in the log pane", timeout=30)
            assert app.selected_attempt() == row_of(app, "exp_ticking")["attempt_id"]  # type: ignore[index]
            ticks = [line for line in log_text(app).splitlines() if line.startswith("tick ")]
            assert ticks == [f"tick {i}" for i in range(len(ticks))], ticks  # each line once, in order

            await pilot.press("d")
            await wait(lambda: "DrainAndSuspend" in str(app.query_one("#header").render()), "drained",
                       timeout=10)
            assert ((app.status or {}).get("intake") or {}).get("state") == "DrainAndSuspend"
            queue(sandbox, quick, "exp_after_drain")
            await pilot.pause(3)  # many polls of the queue (0.05 s) and of the status (0.2 s)
            assert row_of(app, "exp_after_drain") is None, "a drained runner must take nothing new"
            assert len(sandbox.pending(QUEUE)) == 1
            stop.write_text("x")
            await wait(lambda: table_cell(app, "exp_ticking", "outcome").startswith("success"),
                       "exp_ticking's outcome", timeout=60)
            assert "ticking done" in log_text(app) or "tick" in log_text(app)
            assert row_of(app, "exp_after_drain") is None and len(sandbox.pending(QUEUE)) == 1

            await pilot.press("r")
            await wait(lambda: table_cell(app, "exp_after_drain", "outcome").startswith("success"),
                       "the queued experiment, run after resume")
            assert sandbox.pending(QUEUE) == []
            await pilot.press("q")
        assert app.return_value == 0
    finally:
        code = together.stop_runner(runner, timeout=60)
    assert code == 0, log.read_text()[-4000:]


def test_run_tui_starts_the_runner_shows_it_and_stops_it(sandbox: Sandbox, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """tui.together end to end: runner child on a free port, the app connects, quitting stops the runner."""
    seen: dict[str, Any] = {}
    original_run = RunnerApp.run

    async def auto_pilot(pilot: Any) -> None:
        app = pilot.app
        deadline = time.monotonic() + 60
        while app.status is None and time.monotonic() < deadline:
            await pilot.pause(0.1)
        seen["status"], seen["header"] = app.status, str(app.query_one("#header").render())
        await pilot.press("q")

    def headless_run(self: RunnerApp, **kwargs: Any) -> Any:
        return original_run(self, headless=True, size=(150, 42), auto_pilot=auto_pilot)

    monkeypatch.setattr(RunnerApp, "run", headless_run)
    for name, value in sandbox.runner_env().items():
        if name.startswith("STUDIO_RUNNER_") or name == "PYTHONPATH":
            monkeypatch.setenv(name, value)
    monkeypatch.delenv("STUDIO_RUNNER_PROM_ADDRESS")  # run --tui adds --prom-address with a free port
    code = together.run_with_runner(["--queue-root", str(sandbox.queue_root)])
    assert code == 0
    assert seen["status"] is not None and seen["status"]["pid"] > 0, seen
    assert "runner log:" in seen["header"]
    err = capsys.readouterr().err
    assert "the runner exited with status 0; its log is" in err
    log = Path(err.rsplit("its log is ", 1)[1].split()[0])
    assert "status" in log.read_text() or log.stat().st_size > 0
    log.unlink()
    import psutil
    assert not psutil.pid_exists(seen["status"]["pid"]) or \
        psutil.Process(seen["status"]["pid"]).status() == psutil.STATUS_ZOMBIE


def test_status_address_and_command() -> None:
    argv, url = together.with_status_address(["--once"])
    assert argv[:1] == ["--once"] and argv[1] == "--prom-address" and url.endswith(argv[2].split(":")[1])
    assert together.with_status_address(["--prom-address", "0.0.0.0:9100"]) == \
        (["--prom-address", "0.0.0.0:9100"], "http://127.0.0.1:9100")
    assert together.with_status_address(["--prom-address=:9101", "--once"]) == \
        (["--prom-address", "127.0.0.1:9101", "--once"], "http://127.0.0.1:9101")
    for off in (["--prom-address", ""], ["--prom-address=0.0.0.0:0"]):  # off, or a port we could not know
        argv, url = together.with_status_address(off)
        port = url.rsplit(":", 1)[1]
        assert argv[0] == "--prom-address" and argv[1].endswith(f":{port}") and int(port) > 0, (off, argv)
    assert together.runner_command(["--once"]) == [sys.executable, "-m", "studio_runner", "run", "--once"]
