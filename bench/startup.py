"""Start-up benchmark: from exec to a runner waiting for work, for the one-file build and `python runner.py`.

Why: people start the one-file executable by hand and Kubernetes restarts it; the target is a ready runner
in under 1.5 s. "Ready" is the runner's ``serving N queue(s)`` log line on an empty local queue (it has listed
its queues and waits for work); the time ``GET /healthz`` first answers on ``--prom-address`` is printed
beside it, and ``--version`` (interpreter start, plus the one-file build's unpacking, without the runner's
imports) as the floor. Each start gets a fresh queue root and working directory, and a clean environment
(``PATH=/usr/bin:/bin``, ``HOME`` in a temporary directory), as a user's first start would.

    .venv/bin/python bench/startup.py                      # dist/studio-runner (if built) and runner.py
    .venv/bin/python bench/startup.py --runs 10 --exe dist/studio-runner-dir/studio-runner
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
READY = re.compile(r"serving \d+ queue\(s\)")
TARGET_S = 1.5
TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(home: Path) -> dict[str, str]:
    """The environment of a first start: nothing of ours, no Python variables; network CA settings kept."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home)}
    env.update({k: v for k, v in os.environ.items() if k in ("SSL_CERT_FILE", "SSL_CERT_DIR", "TMPDIR")})
    return env


def healthz(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=0.2) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def time_version(argv: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([*argv, "--version"], env=clean_env(Path(tmp)), check=True, capture_output=True)
        return time.perf_counter() - start


def time_ready(argv: list[str]) -> tuple[float, float | None]:
    """(seconds to the ready log line, seconds to the first /healthz answer or None if it never answered)."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "queue" / "local_default").mkdir(parents=True)
        (base / "home").mkdir()
        port = free_port()
        command = [*argv, "run", "--queue-root", str(base / "queue"), "--working-dir", str(base / "work"),
                   "--prom-address", f"127.0.0.1:{port}"]
        ready = threading.Event()
        lines: list[str] = []
        start = time.perf_counter()
        proc = subprocess.Popen(command, env=clean_env(base / "home"), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

        def read() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                lines.append(line)
                if READY.search(line):
                    ready.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        ready_at: float | None = None
        health_at: float | None = None
        try:
            while time.perf_counter() - start < TIMEOUT_S and proc.poll() is None:
                if health_at is None and healthz(port):
                    health_at = time.perf_counter() - start
                if ready_at is None and ready.is_set():
                    ready_at = time.perf_counter() - start
                if ready_at is not None and health_at is not None:
                    break
                time.sleep(0.005)
            if ready_at is None:
                raise RuntimeError(f"{' '.join(command)} was not ready in {TIMEOUT_S:.0f}s:\n"
                                   + "".join(lines[-20:]))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            reader.join(timeout=5)
        return ready_at, health_at


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def measure(name: str, argv: list[str], runs: int, size: int | None) -> bool:
    version = [time_version(argv) for _ in range(runs)]
    starts = [time_ready(argv) for _ in range(runs)]
    ready = [r for r, _ in starts]
    health = [h for _, h in starts if h is not None]
    median = statistics.median(ready)
    print(f"{name}")
    if size is not None:
        print(f"  size            {human(size)}")
    print(f"  --version       median {statistics.median(version):.2f}s  (min {min(version):.2f}s)")
    print(f"  /healthz answers median {statistics.median(health):.2f}s" if health
          else "  /healthz        never answered (no --prom-address support?)")
    print(f"  ready (serving) median {median:.2f}s  (min {min(ready):.2f}s, max {max(ready):.2f}s, "
          f"{runs} runs)  target {TARGET_S}s: {'met' if median < TARGET_S else 'MISSED'}")
    return median < TARGET_S


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exe", type=Path, action="append",
                        help="a built studio-runner executable (repeatable; default: dist/studio-runner and "
                        "dist/studio-runner-dir/studio-runner where built)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for runner.py (default: this)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-python", action="store_true", help="measure the executables only")
    args = parser.parse_args()
    exes = args.exe or [p for p in (REPO / "dist" / "studio-runner",
                                    REPO / "dist" / "studio-runner-dir" / "studio-runner") if p.is_file()]
    met = True
    for exe in exes:
        exe = exe.resolve()
        bundle = exe.parent if exe.parent.name == "studio-runner-dir" else exe
        met &= measure(f"{exe.relative_to(REPO) if exe.is_relative_to(REPO) else exe}", [str(exe)],
                       args.runs, size_of(bundle))
    if not exes:
        print("no executable built (bash build/onefile.sh): measuring runner.py only")
    if not args.skip_python:
        met &= measure(f"{Path(args.python).name} runner.py", [args.python, str(REPO / "runner.py")],
                       args.runs, None)
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
