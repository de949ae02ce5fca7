"""Drain and suspend: the state file, DrainAndTerminate, SIGHUP reloads, with the real CLI in a subprocess."""

from __future__ import annotations

import re
import signal
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio
from support.runner import Sandbox

from studio_runner.statefile import StateFileError, parse_state, watch_state_file
from studio_runner.submit import Submission, submit


def write_script(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "job.py"
    script.write_text(textwrap.dedent(body))
    return script


class Lines:
    """The runner's merged output, read by a thread so the test can wait for a line without blocking."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert self.process.poll() is None or predicate(), f"runner exited before {what}:\n{self.text}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.text}"
            time.sleep(0.05)


@pytest.mark.parametrize("text,state", [
    ("Running\n", "Running"), ("drainandsuspend", "DrainAndSuspend"),
    ("STATE=DrainAndTerminate\n", "DrainAndTerminate"),
    ("# written by ops\nSTATE: 'DrainAndSuspend'\n", "DrainAndSuspend"), ('"Running"', "Running"),
])
def test_state_file_forms(text, state):
    assert parse_state(text) == state


@pytest.mark.parametrize("text", ["", "Pause", "STATE=Stop", "Running\nDrainAndSuspend\n", "x" * 100])
def test_bad_state_files_are_refused_with_a_reason(text):
    with pytest.raises(StateFileError):
        parse_state(text)


def test_the_watcher_applies_changes_once_and_ignores_bad_values(tmp_path, caplog):
    path = tmp_path / "STATE"
    applied: list[str] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_state_file, path, lambda state, why: applied.append(state), 0.02)
            await trio.sleep(0.1)  # missing: nothing applied, one warning
            path.write_text("DrainAndSuspend")
            await trio.sleep(0.1)
            path.write_text("Bogus")  # unknown: no change
            await trio.sleep(0.1)
            path.write_text("STATE=Running")
            await trio.sleep(0.1)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert applied == ["DrainAndSuspend", "Running"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "studio_runner.statefile"]
    assert len([w for w in warnings if "No such file" in w or "FileNotFoundError" in w]) == 1
    assert any("unknown state 'Bogus'" in w for w in warnings)


def _queue(box: Sandbox, script: Path, key: str, queue: str = "local_state") -> None:
    submit(Submission(script=script, queue=queue, experiment=key), box.queue_root, box.store)


def _ran(box: Sandbox, key: str) -> bool:
    return box.artifact(key, "output").exists()


def test_state_file_suspends_and_resumes_intake_without_a_restart(sandbox: Sandbox, tmp_path):
    state = tmp_path / "state" / "STATE"
    state.parent.mkdir()
    state.write_text("Running\n")
    quick = write_script(tmp_path / "quick", "print('quick done')\n")
    runner = sandbox.start(STUDIO_RUNNER_STATE_FILE=str(state))
    out = Lines(runner)
    try:
        _queue(sandbox, quick, "exp_first")
        out.wait_for(lambda: _ran(sandbox, "exp_first") and not sandbox.pending("local_state"), "exp_first")
        state.write_text("DrainAndSuspend\n")
        out.wait_for(lambda: "intake DrainAndSuspend" in out.text, "the suspension")
        url = re.search(r"status: (http://\S+)", out.text)
        assert url, out.text
        intake = httpx.get(url.group(1) + "/status", timeout=10).json()["intake"]
        assert intake["state"] == "DrainAndSuspend" and str(state) in intake["reason"]
        _queue(sandbox, quick, "exp_while_suspended")
        time.sleep(3)  # several poll intervals (0.05 s) and state-file refreshes (1 s)
        assert not _ran(sandbox, "exp_while_suspended")
        assert len(sandbox.pending("local_state")) == 1
        state.write_text("STATE=Running\n")
        out.wait_for(lambda: _ran(sandbox, "exp_while_suspended"), "the resumed experiment", timeout=60)
        assert "intake resumed" in out.text
    finally:
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=60)
    assert runner.returncode == 0, out.text


def test_drain_and_terminate_finishes_the_running_experiment_then_exits(sandbox: Sandbox, tmp_path):
    state = tmp_path / "STATE"
    state.write_text("Running")
    marker = tmp_path / "started"
    slow = write_script(tmp_path / "slow", f"""\
        import pathlib, time
        pathlib.Path({str(marker)!r}).write_text("x")
        time.sleep(3)
        print("slow done", flush=True)
        """)
    quick = write_script(tmp_path / "quick", "print('quick done')\n")
    runner = sandbox.start(STUDIO_RUNNER_STATE_FILE=str(state), STUDIO_RUNNER_MAX_RUNNING="1")
    out = Lines(runner)
    try:
        _queue(sandbox, slow, "exp_slow")
        out.wait_for(marker.exists, "the slow experiment to start")
        _queue(sandbox, quick, "exp_left")
        state.write_text("DrainAndTerminate")
        runner.wait(timeout=90)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == 0, out.text
    assert "slow done" in sandbox.output_text("exp_slow")  # the running one finished and was acked
    assert not _ran(sandbox, "exp_left")
    assert len(sandbox.pending("local_state")) == 1  # the waiting one is left for another runner
    assert "drained" in out.text


def test_sighup_reloads_the_queue_filter_from_the_config_file(sandbox: Sandbox, tmp_path):
    config = tmp_path / "runner.toml"
    config.write_text('queue-mismatch = "^local_later$"\nmax-running = 2\n')
    quick = write_script(tmp_path / "quick", "print('quick done')\n")
    runner = subprocess.Popen(
        [*sandbox_command(), "run", "--config", str(config)], env=sandbox.runner_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = Lines(runner)
    try:
        _queue(sandbox, quick, "exp_later", queue="local_later")
        out.wait_for(lambda: "status: http" in out.text, "the start-up banner")
        time.sleep(1.5)
        assert not _ran(sandbox, "exp_later")  # filtered out
        config.write_text('queue-mismatch = ""\nmax-running = 2\ndisk-reserve = "2GiB"\n')
        runner.send_signal(signal.SIGHUP)
        out.wait_for(lambda: _ran(sandbox, "exp_later"), "the experiment on the newly served queue")
        assert "applied queue-mismatch" in out.text
        assert "disk-reserve changed; it takes effect only after a restart" in out.text
    finally:
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=60)
    assert runner.returncode == 0, out.text


def sandbox_command() -> list[str]:
    import sys

    from support.runner import REPO

    return [sys.executable, str(REPO / "runner.py")]
