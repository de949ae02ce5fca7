"""Throughput of short CPU-bound experiments at concurrency 1 versus as many as the cores allow.

Submits ``--count`` experiments (each burns ``--work`` seconds of CPU on one core and asks ``cpus: 1``) to a
local queue, warms the environment cache with one experiment, then lets a fresh runner drain the queue with
``--once``: first with ``--max-running 1``, then with the default (the resource ledger decides: one per
core). Prints the drain time, the throughput, and the scheduling overhead per experiment, i.e. the wall time
not explained by the CPU work spread over the experiments running at once:
``overhead = (drain x concurrency - count x work) / count``.

Figures only, no assertions.

    python bench/concurrency.py [--count 40] [--work 0.5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from studio_runner.resources import usable_cores  # noqa: E402
from studio_runner.submit import Submission, submit  # noqa: E402

BURN = """\
import sys, time
end = time.process_time() + float(sys.argv[1])
while time.process_time() < end:
    pass
print("burned", sys.argv[1])
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--work", type=float, default=0.5, help="CPU seconds each experiment burns")
    parser.add_argument("--env-cache-dir", default=None, help="default: a temporary one (warmed first)")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="studio-runner-concurrency-"))
    queue_root, store, work = base / "queue", base / "store", base / "work"
    for folder in (queue_root / "local_conc", work):
        folder.mkdir(parents=True)
    script = base / "script" / "burn.py"
    script.parent.mkdir()
    script.write_text(BURN)
    env = dict(os.environ, STUDIO_RUNNER_QUEUE_ROOT=str(queue_root), STUDIO_RUNNER_WORKING_DIR=str(work),
               STUDIO_RUNNER_LOCAL_STORAGE_ROOTS=str(base),  # its store lives under base
               STUDIO_RUNNER_LOG_LEVEL="warning", STUDIO_RUNNER_POLL_INTERVAL="0.05s",
               STUDIO_RUNNER_ENV_CACHE_DIR=args.env_cache_dir or str(base / "envs"), PYTHONPATH=str(REPO))

    def enqueue(count: int, prefix: str) -> None:
        for i in range(count):
            submit(Submission(script=script, args=[str(args.work)], queue="local_conc",
                              experiment=f"{prefix}-{i}", cpus=1), queue_root, store)

    def drain(**options: str) -> float:
        started = time.perf_counter()
        subprocess.run([sys.executable, str(REPO / "runner.py"), "run", "--once"], env={**env, **options},
                       check=True)
        return time.perf_counter() - started

    enqueue(1, "warm")
    drain()
    cores = usable_cores()
    print(f"{args.count} experiments of {args.work:g} CPU-seconds each, one core asked; {cores} usable "
          f"core(s); runner start-up and exit included")
    for label, concurrency, options in (("--max-running 1", 1, {"STUDIO_RUNNER_MAX_RUNNING": "1"}),
                                        ("resources decide", cores, {})):
        enqueue(args.count, label.split()[0].strip("-"))
        seconds = drain(**options)
        overhead = (seconds * concurrency - args.count * args.work) / args.count
        print(f"  {label:17s} drain {seconds:6.2f} s   {args.count / seconds:5.2f} experiments/s   "
              f"overhead {overhead:.3f} s per experiment")


if __name__ == "__main__":
    main()
