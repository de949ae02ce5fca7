"""What a person reads: the banner, a line per phase with human sizes, progress for slow work, the output's
tail on failure, and the terminal bar. Real executor runs (local store, shared env cache, real processes)
and a real, deliberately slow HTTP server."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trio
from test_executor import executor_on

from studio_runner import config, console
from studio_runner.attempt import Status
from studio_runner.request import parse_request
from studio_runner.submit import Submission, build_request, pack_workspace

SECRET = "s3cr3t-value-for-the-test"


def _records(caplog: pytest.LogCaptureFixture, key: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith(f"{key}:")
            or r.getMessage().startswith(f"{key} |")]


def _request(tmp_path: Path, key: str, code: str, *, env: dict[str, str] | None = None,
             extra: dict[str, bytes] | None = None) -> tuple[dict, Path, str]:
    """The request ``submit`` makes (as a dict, to be edited), the store, and the workspace's key."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "train.py").write_text(code)
    for name, data in (extra or {}).items():
        (ws / name).write_bytes(data)
    store = tmp_path / "store"
    workspace = pack_workspace(ws, store)
    body = build_request(Submission(script=ws / "train.py", queue="local_x", experiment=key, env=env or {}),
                         store, workspace)
    return body, store, workspace


def _run(tmp_path: Path, body: dict) -> object:
    async def main() -> object:
        executor = await executor_on(tmp_path)
        return await executor.run(parse_request(json.dumps(body)), queue="local_x")

    return trio.run(main)


# --------------------------------------------------------------------------- banner


def test_the_banner_masks_the_broker_and_names_what_matters(tmp_path: Path) -> None:
    settings = config.resolve({"amqp_url": "amqp://runner:hunter2pw@rabbit:5672/%2f",
                               "working_dir": str(tmp_path), "env_cache_dir": str(tmp_path / "envs"),
                               "max_running": "2", "max_mem": "8GiB", "log_format": "json"}, environ={})
    (tmp_path / "envs" / "0123456789abcdef").mkdir(parents=True)
    (tmp_path / "envs" / "0123456789abcdef" / ".studio-runner-size").write_text(str(3 << 20))
    lines = console.banner_lines(settings, "127.0.0.1:9091")
    text = "\n".join(lines)
    assert "hunter2pw" not in text and "RabbitMQ amqp://runner:****@rabbit:5672/%2f" in text
    assert "local queue root" not in text  # a broker alone: no local queue unless asked for
    assert f"environment cache: {tmp_path / 'envs'} (3 MiB of 20 GiB)" in lines
    assert "artifact cache: off" in lines
    assert "max-running 2" in text and "max-mem 8 GiB" in text and "max-cores machine" in text
    assert "status: http://127.0.0.1:9091 (/status /metrics /healthz)" in lines
    assert "log: info, json (libraries at warning)" in lines
    assert lines[0].startswith("studio-runner ") and f"pid {os.getpid()}" in lines[0]


def test_the_banner_of_a_local_runner(tmp_path: Path) -> None:
    settings = config.resolve({"queue_root": str(tmp_path / "q"), "working_dir": str(tmp_path),
                               "cache_dir": str(tmp_path / "cache"), "prom_address": ""}, environ={})
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / ("a" * 64)).write_bytes(b"x" * 2048)
    lines = console.banner_lines(settings, None)
    assert f"queues: local queue root {tmp_path / 'q'}" in lines
    assert f"artifact cache: {tmp_path / 'cache'} (2 KiB of 10 GiB)" in lines
    assert "status: off" in lines and "state file: off" in lines


# --------------------------------------------------------------------------- phase lines


def test_phase_lines_of_a_real_experiment(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    body, _, _ = _request(tmp_path, "exp_phases",
                          "import os\nos.makedirs('../modeldir', exist_ok=True)\n"
                          "open('../modeldir/w.bin', 'wb').write(os.urandom(300000))\nprint('trained')\n",
                          extra={"data.bin": os.urandom(200_000)})
    with caplog.at_level(logging.INFO, logger="studio_runner"):
        outcome = _run(tmp_path, body)
    assert outcome.status is Status.SUCCESS  # type: ignore[attr-defined]
    lines = [r.getMessage() for r in _records(caplog, "exp_phases")]
    assert 3 <= len(lines) <= 4, lines  # the supervisor adds "starting" and its settle line: at most ~6
    inputs, env, running, done = lines if len(lines) == 4 else (None, *lines)
    assert inputs is not None and re.fullmatch(
        r"exp_phases: inputs ready in \d+\.\ds: workspace \d+(\.\d)? KiB downloaded \(.+/s\)", inputs)
    assert re.fullmatch(r"exp_phases: environment ready in \S+ \((cached|built.*)\)", env)
    assert re.fullmatch(r"exp_phases: running \(pid \d+, 1 core, 953.7 MiB, GPUs none\)", running)  # 1g
    assert re.fullmatch(r"exp_phases: success in \d+\.\ds \(ran \d+\.\ds\); uploaded 2 artifacts, "
                        r"\d+(\.\d)? KiB in \d+\.\ds", done), done  # modeldir and output
    assert all(r.levelno == logging.INFO for r in _records(caplog, "exp_phases"))
    assert not any(re.search(r"\d{4,} bytes|\d+ bytes", line) for line in lines)


def test_an_input_from_the_artifact_cache_says_cached(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    from studio_runner.cache import ArtifactCache

    body, _, _ = _request(tmp_path, "exp_cached", "print('ok')\n", extra={"data.bin": b"x" * 5000})

    async def main() -> None:
        executor = await executor_on(tmp_path)
        executor.s.artifact_cache = ArtifactCache(tmp_path / "cache", 1 << 30)
        for key in ("exp_cached", "exp_cached_again"):
            body["experiment"]["key"] = key
            await executor.run(parse_request(json.dumps(body)), queue="local_x")

    with caplog.at_level(logging.INFO, logger="studio_runner"):
        trio.run(main)
    [first, again] = [r.getMessage() for key in ("exp_cached", "exp_cached_again")
                      for r in _records(caplog, key) if "inputs ready" in r.getMessage()]
    assert re.search(r": workspace \d+(\.\d)? KiB downloaded \(", first), first
    assert re.search(r": workspace \d+(\.\d)? KiB cached$", again), again  # nothing fetched: no rate


def test_a_failure_logs_the_output_tail_masked_and_where_output_went(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    body, store, _ = _request(tmp_path, "exp_fails",
                              "import os, sys\nfor i in range(30):\n    print('line', i)\n"
                              "print('token', os.environ['MY_TOKEN'])\nsys.exit(3)\n",
                              env={"MY_TOKEN": SECRET})
    with caplog.at_level(logging.INFO, logger="studio_runner"):
        outcome = _run(tmp_path, body)
    assert outcome.status is Status.FAILED  # type: ignore[attr-defined]
    records = _records(caplog, "exp_fails")
    text = "\n".join(r.getMessage() for r in records)
    assert SECRET not in text and "token ****" in text
    [summary] = [r for r in records if " failed in " in r.getMessage()]
    assert summary.levelno == logging.WARNING
    output_tar = (store / "experiments" / "exp_fails" / "output.tar").resolve().as_uri()
    assert re.match(r"exp_fails: failed in \S+ \(ran \S+\): the experiment exited with status 3; uploaded ",
                    summary.getMessage())
    assert summary.getMessage().endswith(f"; output: {output_tar}")
    tail = [r.getMessage().split(" | ", 1)[1] for r in records if " | " in r.getMessage()]
    assert len(tail) == console.TAIL_LINES
    assert tail[-3:] == ["line 29", "token ****", "studio-runner: the experiment exited with status 3"]
    assert not any(line.startswith(("{", "[")) for line in tail)  # metadata lines are not output


# --------------------------------------------------------------------------- progress


class _SlowHandler(BaseHTTPRequestHandler):
    """Serves one object at about ``rate`` bytes a second."""

    data = b""
    rate = 1 << 20

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.data)))
        self.end_headers()

    def do_GET(self) -> None:
        self.do_HEAD()
        step = 64 << 10
        for start in range(0, len(self.data), step):
            self.wfile.write(self.data[start:start + step])
            time.sleep(step / self.rate)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def slow_server() -> Iterator[tuple[ThreadingHTTPServer, type[_SlowHandler]]]:
    handler = type("Handler", (_SlowHandler,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()


@pytest.fixture
def quick_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console, "PROGRESS_FIRST", 0.5)
    monkeypatch.setattr(console, "PROGRESS_EVERY", 0.6)
    monkeypatch.setattr(console, "PROGRESS_TICK", 0.05)


@pytest.mark.usefixtures("quick_progress")
def test_a_slow_download_logs_progress(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                       slow_server: tuple[ThreadingHTTPServer, type[_SlowHandler]]) -> None:
    """A 3 MiB workspace served at 1.5 MiB/s over real HTTP: progress lines with bytes, total and rate, no
    more often than PROGRESS_EVERY."""
    body, store, workspace = _request(tmp_path, "exp_slow", "print('ok')\n",
                                      extra={"weights.bin": os.urandom(3 << 20)})
    server, handler = slow_server
    handler.data = (store / workspace).read_bytes()
    handler.rate = 3 << 19
    body["experiment"]["artifacts"]["workspace"]["qualified"] = (
        f"http://127.0.0.1:{server.server_address[1]}/{workspace}")
    with caplog.at_level(logging.INFO, logger="studio_runner"):
        outcome = _run(tmp_path, body)
    assert outcome.status is Status.SUCCESS  # type: ignore[attr-defined]
    progress = [r for r in _records(caplog, "exp_slow") if "downloading" in r.getMessage()]
    assert 1 <= len(progress) <= 4, [r.getMessage() for r in progress]
    pattern = (r"exp_slow: downloading workspace: \d+(\.\d)? (B|KiB|MiB) of 3 MiB \(\d+%\) "
               r"at \d+(\.\d)? (B|KiB|MiB)/s, \d\.\ds so far")
    for record in progress:
        assert re.fullmatch(pattern, record.getMessage()), record.getMessage()
    gaps = [b.created - a.created for a, b in zip(progress, progress[1:], strict=False)]
    assert all(gap >= 0.55 for gap in gaps), gaps
    [ready] = [r.getMessage() for r in _records(caplog, "exp_slow") if "inputs ready" in r.getMessage()]
    assert "workspace 3 MiB downloaded" in ready


@pytest.mark.usefixtures("quick_progress")
def test_a_slow_environment_build_logs_its_current_step(caplog: pytest.LogCaptureFixture) -> None:
    """The watcher's side of a slow build: elapsed time and uv's latest line, at the pace it promises."""
    watcher = console.AttemptConsole("exp_env")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watcher.watch)
            watcher.begin("building")
            watcher.env_line("Resolved 12 packages in 0.3s")
            await trio.sleep(0.8)
            watcher.env_line("Downloading torch (800.0MiB)")
            await trio.sleep(0.7)
            watcher.env_line("Installed 12 packages in 40ms")
            watcher.env_ready(cache_hit=False)
            await trio.sleep(0.7)  # nothing more once it is ready
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.INFO, logger="studio_runner"):
        trio.run(main)
    lines = [r.getMessage() for r in _records(caplog, "exp_env")]
    assert lines[:-1] == ["exp_env: preparing the environment, 0.5s so far; Resolved 12 packages in 0.3s",
                          "exp_env: preparing the environment, 1.1s so far; Downloading torch (800.0MiB)"]
    assert re.fullmatch(r"exp_env: environment ready in 1\.\ds \(built: 12 packages\)", lines[-1])


# --------------------------------------------------------------------------- terminal bar


class _Terminal:
    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


def test_the_terminal_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = console.TerminalBar("experiments", 4)
    assert not bar.plain
    bar.update(1, "demo_fails failed", force=True)
    bar.update(2)  # too soon after the last: not drawn
    bar.close()
    assert terminal.text == ("\r\x1b[Kexperiments [######..................] 1/4 demo_fails failed"
                             "\r\x1b[K")
    sizes = console.TerminalBar("packing", 3 << 20, sizes=True)
    sizes.update(3 << 19, force=True)
    assert terminal.text.endswith("packing [############............] 1.5 MiB / 3 MiB")
    sizes.close()


def test_no_bar_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    bar = console.TerminalBar("experiments", 4)
    assert bar.plain
    bar.update(1, force=True)
    bar.close()
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- units for log lines


@pytest.mark.parametrize(("seconds", "expected"), [
    (0, "0.0s"), (0.04, "0.0s"), (0.4, "0.4s"), (9.94, "9.9s"), (9.96, "10s"), (45, "45s"), (59.6, "1m00s"),
    (63, "1m03s"), (3599, "59m59s"), (3720, "1h02m"), (2 * 86400, "48h00m"), (-3, "-3.0s"),
])
def test_format_elapsed(seconds: float, expected: str) -> None:
    from studio_runner.units import format_elapsed

    assert format_elapsed(seconds) == expected


def test_format_rate() -> None:
    from studio_runner.units import format_rate

    assert format_rate(31_457_280, 1.0) == "30 MiB/s"
    assert format_rate(1536, 2.0) == "768 B/s"
    assert format_rate(10, 0) == "-"
