"""``demo`` as a person runs it: on a terminal a bar counts finished experiments under the log lines (and
is gone at the end); elsewhere plain lines say the same. The real CLI in a subprocess, with the suite's
environment cache."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

from support.runner import REPO
from support.studioml_client import cache_root

CLEAR = "\r\x1b[K"


def _demo(tmp_path: Path, *, tty: bool) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STUDIO_RUNNER_")}
    env.update(PYTHONPATH=str(REPO), STUDIO_RUNNER_ENV_CACHE_DIR=str(cache_root() / "envs"))
    argv = [sys.executable, str(REPO / "runner.py"), "demo", "--demo-dir", str(tmp_path / "demo"),
            "--prom-address", ""]
    if not tty:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        return done.returncode, done.stdout, done.stderr
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    proc.stdout.close()
    return proc.wait(timeout=120), out, b"".join(chunks).decode("utf-8", "replace")


def test_demo_on_a_terminal_draws_a_bar(tmp_path: Path) -> None:
    code, out, err = _demo(tmp_path, tty=True)
    assert code == 0, out + err
    assert f"{CLEAR}experiments [........................] 0/4" in err
    assert f"{CLEAR}experiments [########################] 4/4 " in err
    frames = [piece.split("\r")[0] for piece in err.split(CLEAR) if piece.startswith("experiments [")]
    counts = [int(frame.split("] ")[1].split("/")[0]) for frame in frames]
    assert counts == sorted(counts) and set(counts) == {0, 1, 2, 3, 4}
    assert err.endswith(CLEAR)  # the bar is removed: the table that follows starts on a clean line
    for line in err.replace("\r\n", "\n").split("\n"):
        record = line.split(CLEAR)[-1]  # the bar is cleared before each log record: never glued to it
        if " studio_runner." in record:
            assert record[:2] == "20", line
    assert "demo_fails | ValueError: this experiment fails on purpose" in err  # the failure's tail
    assert "all experiments ended as expected" in out


def test_demo_off_a_terminal_prints_plain_lines(tmp_path: Path) -> None:
    code, out, err = _demo(tmp_path, tty=False)
    assert code == 0, out + err
    assert "\x1b" not in out + err
    done = [line for line in out.splitlines() if " experiments done: " in line]
    assert [line.split(" ")[0] for line in done] == ["1/4", "2/4", "3/4", "4/4"]
    assert {line.split(": ")[1] for line in done} == {"demo_metadata success", "demo_pythonenv success",
                                                      "demo_fails failed", "demo_timeout timeout"}
