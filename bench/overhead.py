"""Per-experiment overhead through the local queue, with a warm environment cache.

Starts the real runner (``runner.py run``) as a subprocess on a temporary queue root, submits trivial
experiments one after another and times each from enqueue until its message is acknowledged (gone from
the queue and from the in-flight area, results uploaded). Prints median, p95 and the runner's RSS (idle,
and peak from the kernel's VmHWM). Figures only, no assertions.

    python bench/overhead.py [--count 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from studio_runner.submit import Submission, submit  # noqa: E402


def rss_mb(pid: int) -> tuple[float, float]:
    """Current and peak resident set size of ``pid`` in MB (VmRSS, VmHWM)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def acknowledged(queue_root: Path, queue: str) -> bool:
    waiting = [p for p in (queue_root / queue).iterdir() if p.name != "lock.lock"]
    inflight_dir = queue_root / ".inflight" / queue
    inflight = list(inflight_dir.iterdir()) if inflight_dir.exists() else []
    return not waiting and not inflight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--env-cache-dir", default=None, help="default: a temporary one (warmed first)")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="studio-runner-bench-"))
    queue_root, store, work = base / "queue", base / "store", base / "work"
    for folder in (queue_root / "local_bench", work):
        folder.mkdir(parents=True)
    script_dir = base / "script"
    script_dir.mkdir()
    (script_dir / "trivial.py").write_text("print('hello')\n")
    env = dict(os.environ, QUEUE_ROOT=str(queue_root), WORKING_DIR=str(work), LOG_LEVEL="warning",
               ENV_CACHE_DIR=args.env_cache_dir or str(base / "envs"), POLL_INTERVAL="0.02s",
               PYTHONPATH=str(REPO))
    runner = subprocess.Popen([sys.executable, str(REPO / "runner.py"), "run"], env=env)
    try:
        time.sleep(1.5)
        idle_rss, _ = rss_mb(runner.pid)

        def one(key: str) -> float:
            start = time.perf_counter()
            submit(Submission(script=script_dir / "trivial.py", queue="local_bench", experiment=key),
                   queue_root, store)
            while not acknowledged(queue_root, "local_bench"):
                if runner.poll() is not None:
                    raise SystemExit("the runner exited")
                time.sleep(0.002)
            return time.perf_counter() - start

        warm = one("warm-up")  # builds (or finds) the environment
        times = [one(f"exp-{i}") for i in range(args.count)]
        _, peak_rss = rss_mb(runner.pid)
    finally:
        runner.terminate()
        runner.wait(30)

    times.sort()
    p95 = times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))]
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}")
    print(f"warm-up experiment (may build the env): {warm:.3f} s")
    print(f"{args.count} trivial experiments, enqueue -> acknowledged, warm env cache:")
    print(f"  median {statistics.median(times):.3f} s   p95 {p95:.3f} s   min {times[0]:.3f} s   "
          f"max {times[-1]:.3f} s")
    print(f"runner RSS: idle {idle_rss:.1f} MB, peak {peak_rss:.1f} MB")


if __name__ == "__main__":
    main()
