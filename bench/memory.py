"""Memory probe: does the runner's RSS stay flat over many chatty experiments?

Starts the real runner (``runner.py run``) as a subprocess on a temporary local queue root and local
storage, submits ``--count`` experiments (each prints ``--lines`` lines of ~90 bytes as fast as it can),
keeping ``--max-running`` of them queued behind those running, and every ``--every`` settled experiments
prints the runner's VmRSS, RssAnon, VmHWM, thread count and open fds.

Reading it: a rise over the first rows that then stays flat is warm-up; a column that keeps rising row after
row at the same slope is a leak; a sawtooth that climbs for dozens of experiments and then drops at once is
per-attempt state left in reference cycles, freed only by Python's occasional full garbage collection.

Figures only, no assertions. Each settled experiment's results are deleted from the store as it goes, so
disk use stays small however long it runs. ``--runner`` starts another script in place of ``runner.py``
(e.g. a wrapper that imports ``studio_runner.cli`` with tracemalloc or gc instrumentation).

    python bench/memory.py [--count 300] [--every 20] [--lines 20000] [--max-running 1] [--mix]
                           [--runner-env MALLOC_ARENA_MAX=2] ...
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from studio_runner.submit import Submission, submit  # noqa: E402

CHATTY = """\
import sys, time
lines, kind = int(sys.argv[1]), sys.argv[2]
for n in range(lines):
    print("line", n, "x" * 80)
print("done", kind, flush=True)
if kind == "fail":
    raise SystemExit("failing on purpose")
if kind == "timeout":
    time.sleep(600)
"""
KINDS = ("ok", "fail", "timeout")


def proc_figures(pid: int) -> dict[str, float]:
    """VmRSS, RssAnon, VmHWM in MB; Threads; open fds."""
    wanted = {"VmRSS", "RssAnon", "VmHWM", "Threads"}
    figures: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in wanted:
            number = int(value.split()[0])
            figures[name] = number if name == "Threads" else number / 1024
    figures["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return figures


def settled(queue_root: Path, queue: str) -> bool:
    waiting = [p for p in (queue_root / queue).iterdir() if p.name != "lock.lock"]
    inflight_dir = queue_root / ".inflight" / queue
    inflight = list(inflight_dir.iterdir()) if inflight_dir.exists() else []
    return not waiting and not inflight


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=300, help="experiments to run")
    parser.add_argument("--every", type=int, default=20, help="print a row after this many experiments")
    parser.add_argument("--lines", type=int, default=20000, help="lines each experiment prints")
    parser.add_argument("--mix", action="store_true",
                        help="cycle through experiments that succeed, fail (exit 1) and time out (stopped "
                        "by the runner after 2 s); default: all succeed")
    parser.add_argument("--max-running", type=int, default=1,
                        help="experiments the runner runs at once (this many are kept queued)")
    parser.add_argument("--env-cache-dir", default=None,
                        help="environment cache (default: ~/.cache/studio-runner-tests/envs, shared with "
                        "the tests, so the environment is built once)")
    parser.add_argument("--runner-env", action="append", default=[], metavar="K=V",
                        help="extra environment variable for the runner (repeatable), e.g. "
                        "MALLOC_ARENA_MAX=2 or PYTHONMALLOC=malloc")
    parser.add_argument("--runner", type=Path, default=REPO / "runner.py",
                        help="script started as the runner, with the argument 'run' (default: runner.py; "
                        "an instrumented wrapper can be put here)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="studio-runner-memory-"))
    queue = "local_memory"
    queue_root, store, work = base / "queue", base / "storage" / "studioml", base / "work"
    for folder in (queue_root / queue, work):
        folder.mkdir(parents=True)
    script_dir = base / "script"
    script_dir.mkdir()
    (script_dir / "chatty.py").write_text(CHATTY)
    cache = args.env_cache_dir or str(Path(os.environ.get("STUDIO_RUNNER_TEST_CACHE")
                                           or Path.home() / ".cache" / "studio-runner-tests") / "envs")
    env = dict(os.environ, STUDIO_RUNNER_QUEUE_ROOT=str(queue_root), STUDIO_RUNNER_WORKING_DIR=str(work),
               STUDIO_RUNNER_LOCAL_STORAGE_ROOTS=str(base),  # its store lives under base
               STUDIO_RUNNER_LOG_LEVEL="warning", STUDIO_RUNNER_ENV_CACHE_DIR=cache,
               STUDIO_RUNNER_POLL_INTERVAL="0.05s", STUDIO_RUNNER_MAX_RUNNING=str(args.max_running),
               PYTHONPATH=str(REPO))
    for item in args.runner_env:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--runner-env expects K=V, got {item!r}")
        env[name] = value
    extra = " ".join(args.runner_env) or "none"
    mixed = "mixed " if args.mix else ""
    print(f"{args.count} {mixed}experiments x {args.lines} lines, {args.max_running} at once, extra runner "
          f"env: {extra}, dir {base}", flush=True)
    log_path = base / "runner.log"
    with open(log_path, "wb") as log_file:
        runner = subprocess.Popen([sys.executable, str(args.runner), "run"], env=env,
                                  stdout=log_file, stderr=subprocess.STDOUT)
    submitted = done = 0
    start = time.monotonic()
    try:
        time.sleep(1.5)
        idle = proc_figures(runner.pid)
        print(f"{'exps':>5} {'secs':>6} {'RSS MB':>7} {'anon MB':>7} {'HWM MB':>7} {'thr':>4} {'fds':>4}")

        def row(label: str, figures: dict[str, float]) -> None:
            print(f"{label:>5} {time.monotonic() - start:6.0f} {figures['VmRSS']:7.1f} "
                  f"{figures['RssAnon']:7.1f} {figures['VmHWM']:7.1f} {figures['Threads']:4.0f} "
                  f"{figures['fds']:4.0f}", flush=True)

        row("idle", idle)

        def enqueue() -> None:
            nonlocal submitted
            kind = KINDS[submitted % len(KINDS)] if args.mix else "ok"
            submit(Submission(script=script_dir / "chatty.py", args=[str(args.lines), kind], queue=queue,
                              experiment=f"mem-{submitted}",
                              max_duration="2s" if kind == "timeout" else None), queue_root, store)
            submitted += 1

        def waiting() -> int:
            return sum(1 for p in (queue_root / queue).iterdir() if p.name != "lock.lock")

        def inflight() -> int:
            folder = queue_root / ".inflight" / queue
            return sum(1 for _ in folder.iterdir()) if folder.exists() else 0

        removed = 0
        while done < args.count:
            # keep the runner busy: max_running waiting behind the ones it runs
            while submitted < args.count and waiting() < args.max_running:
                enqueue()
            if runner.poll() is not None:
                raise SystemExit(f"the runner exited with {runner.returncode}; see {log_path}")
            settled_now = submitted - waiting() - inflight()  # acknowledged (or set aside)
            while done < settled_now:
                done += 1
                if done % args.every == 0 or done == args.count:
                    row(str(done), proc_figures(runner.pid))
            # results are not needed: keep the disk small (only of experiments surely settled)
            while removed < done - 2 * args.max_running:
                shutil.rmtree(store / "experiments" / f"mem-{removed}", ignore_errors=True)
                removed += 1
            time.sleep(0.02)
        while not settled(queue_root, queue):
            if runner.poll() is not None:
                break
            time.sleep(0.05)
        time.sleep(2.0)
        row("rest", proc_figures(runner.pid))
        problems = [line for line in log_path.read_text(errors="replace").splitlines()
                    if " WARNING " in line or " ERROR " in line]
        print(f"runner log: {len(problems)} warning/error lines" + "".join(f"\n  {p}" for p in problems[:5]))
    finally:
        if runner.poll() is None:
            runner.terminate()
            try:
                runner.wait(60)
            except subprocess.TimeoutExpired:
                runner.kill()
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
