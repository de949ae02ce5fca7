"""What an idle runner costs, and how soon it starts work that arrives while it is idle.

For each case — 1 and 200 empty local queues, 1 and 200 empty RabbitMQ queues — starts the real runner
(``runner.py run`` from this checkout, options as ``STUDIO_RUNNER_*`` variables), lets it settle, measures its
CPU time (the process and any children, with psutil) over ``--seconds``, then publishes one trivial
experiment to one of the queues ``--samples`` times and times each from publishing until the runner logs
"... starting, attempt id ...". Prints CPU as % of one core and the pickup latencies.

RabbitMQ queues (broker on 127.0.0.1:5672, guest/guest, as the tests use) get a unique ``rmq_idle_<id>_``
prefix, and the runner serves only those; they are deleted afterwards, also after a failure or Ctrl-C.

Figures only, no assertions. To compare code versions, run the script inside each checkout (it starts
the runner from the checkout it lies in).

    python bench/idle.py [--seconds 60] [--samples 3] [--cases local1,local200,rmq1,rmq200]
"""

from __future__ import annotations

import argparse
import json
import os
import queue as queue_module
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil
import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from studio_runner.queues.localdir import LocalDirQueue  # noqa: E402
from studio_runner.submit import Submission, build_request, pack_workspace  # noqa: E402

AMQP_URL = os.environ.get("STUDIO_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
EXCHANGE = "StudioML.topic"
CASES = {"local1": ("local", 1), "local200": ("local", 200), "rmq1": ("rabbitmq", 1),
         "rmq200": ("rabbitmq", 200)}
STARTING = re.compile(r"experiment (\S+) from \S+ (\S+) \(attempt \d+\) starting, attempt id")
SERVING = re.compile(r"serving (\d+) queue\(s\)")


@dataclass
class Result:
    case: str
    cpu_percent: float
    latencies: list[float] = field(default_factory=list)


class RunnerLog:
    """The runner's combined output, read by a thread: each line with the monotonic time it arrived."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: queue_module.Queue[tuple[float, str]] = queue_module.Queue()
        self.tail: list[str] = []
        assert process.stdout is not None
        self._thread = threading.Thread(target=self._read, args=(process.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put((time.monotonic(), line.rstrip("\n")))

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> tuple[float, re.Match[str]]:
        """The arrival time and match of the next line matching ``pattern``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                when, line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue_module.Empty:
                last = "\n".join(self.tail[-20:])
                raise TimeoutError(f"no line matching {pattern.pattern!r} within {timeout:.0f} s; "
                                   f"last lines:\n{last}") from None
            self.tail = (self.tail + [line])[-50:]
            if (match := pattern.search(line)) is not None:
                return when, match


def cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU time of ``process``, its reaped children and its live descendants."""
    times = process.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in process.children(recursive=True):
        try:
            child_times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += child_times.user + child_times.system
    return total


# --- the broker side ------------------------------------------------------------------------------------


@contextmanager
def _channel() -> Iterator[Any]:
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        yield connection.channel()
    finally:
        connection.close()


def create_rabbit_queues(names: list[str]) -> None:
    """Declare and bind each queue as the StudioML client does (non-durable, on StudioML.topic)."""
    with _channel() as ch:
        ch.exchange_declare(EXCHANGE, exchange_type="topic", durable=True, auto_delete=True)
        for name in names:
            ch.queue_declare(name)
            ch.queue_bind(name, EXCHANGE, routing_key=f"StudioML.{name}")


def delete_rabbit_queues(names: list[str]) -> None:
    with _channel() as ch:
        for name in names:
            ch.queue_delete(name)


def publish_rabbit(name: str, body: bytes) -> None:
    import pika

    with _channel() as ch:
        ch.confirm_delivery()
        props = pika.BasicProperties(app_id="studioml", content_type="application/json")
        ch.basic_publish(EXCHANGE, f"StudioML.{name}", body, props, mandatory=True)


@contextmanager
def rabbit_queues(count: int) -> Iterator[tuple[str, list[str]]]:
    """``count`` fresh queues with a unique prefix; deleted on the way out, whatever happened."""
    prefix = f"rmq_idle_{uuid.uuid4().hex[:8]}_"
    names = [f"{prefix}{i:03d}" for i in range(count)]
    try:
        create_rabbit_queues(names)
        yield prefix, names
    finally:
        delete_rabbit_queues(names)


# --- one case -------------------------------------------------------------------------------------------


def run_case(case: str, base: Path, args: argparse.Namespace) -> Result:
    kind, count = CASES[case]
    work = base / case / "work"
    work.mkdir(parents=True)
    store = base / case / "store"
    script_dir = base / "script"
    env = dict(os.environ, STUDIO_RUNNER_WORKING_DIR=str(work), STUDIO_RUNNER_LOG_LEVEL="info",
               STUDIO_RUNNER_LOCAL_STORAGE_ROOTS=str(base),  # its store lives under base
               STUDIO_RUNNER_ENV_CACHE_DIR=str(base / "envs"), STUDIO_RUNNER_MAX_LIFETIME="20m",
               PYTHONPATH=str(REPO))
    for name in ("STUDIO_RUNNER_POLL_INTERVAL", "STUDIO_RUNNER_AMQP_URL", "STUDIO_RUNNER_QUEUE_ROOT"):
        env.pop(name, None)  # the runner's defaults (poll interval 0.2 s) are what is measured
    workspace_key = pack_workspace(script_dir, store)

    def body(queue: str, key: str) -> bytes:
        sub = Submission(script=script_dir / "trivial.py", queue=queue, experiment=key)
        return json.dumps(build_request(sub, store.resolve(), workspace_key)).encode()

    if kind == "local":
        root = base / case / "queue"
        names = [f"local_idle_{i:03d}" for i in range(count)]
        for name in names:
            (root / name).mkdir(parents=True)
        env.update(STUDIO_RUNNER_QUEUE_ROOT=str(root), STUDIO_RUNNER_QUEUE_MATCH=r"^local_idle_")
        local = LocalDirQueue(root, "bench")

        def publish(queue: str, key: str) -> None:
            trio.run(local.enqueue, queue, body(queue, key))

        return measure(case, names, env, publish, args)
    with rabbit_queues(count) as (prefix, names):
        env.update(STUDIO_RUNNER_AMQP_URL=AMQP_URL, STUDIO_RUNNER_QUEUE_MATCH=f"^{re.escape(prefix)}")
        return measure(case, names, env, lambda queue, key: publish_rabbit(queue, body(queue, key)), args)


def measure(case: str, names: list[str], env: dict[str, str], publish: Callable[[str, str], None],
            args: argparse.Namespace) -> Result:
    runner = subprocess.Popen([sys.executable, str(REPO / "runner.py"), "run"], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        log = RunnerLog(runner)
        _, match = log.wait_for(SERVING, timeout=60)
        if int(match.group(1)) != len(names):
            raise RuntimeError(f"the runner serves {match.group(1)} queues, expected {len(names)}")
        time.sleep(args.settle)  # first rounds: durability checks, consumers set up, watcher started
        proc = psutil.Process(runner.pid)
        before, started = cpu_seconds(proc), time.monotonic()
        time.sleep(args.seconds)
        used, elapsed = cpu_seconds(proc) - before, time.monotonic() - started
        result = Result(case, 100.0 * used / elapsed)
        print(f"  {case}: idle CPU {result.cpu_percent:.2f} % of a core over {elapsed:.0f} s", flush=True)
        for i in range(args.samples):
            target = names[(i * 7919) % len(names)]  # spread over the queues, not always the first
            key = f"idle-{case}-{i}-{uuid.uuid4().hex[:6]}"
            time.sleep(args.gap)  # idle again: the runner is waiting, not in a round
            sent = time.monotonic()
            publish(target, key)
            while True:
                when, match = log.wait_for(STARTING, timeout=60)
                if match.group(1) == key:
                    break
            result.latencies.append(when - sent)
            log.wait_for(re.compile(rf"experiment {re.escape(key)} on "), timeout=300)  # settled
        print(f"  {case}: publish -> starting " + ", ".join(f"{t * 1000:.0f} ms" for t in result.latencies),
              flush=True)
        return result
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGTERM)
            try:
                runner.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(runner.pid, signal.SIGKILL)
                runner.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="CPU measurement window per case")
    parser.add_argument("--samples", type=int, default=3, help="pickup latency samples per case")
    parser.add_argument("--settle", type=float, default=8.0, help="seconds between start-up and measuring")
    parser.add_argument("--gap", type=float, default=2.0, help="idle seconds before each publish")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    args = parser.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s): {', '.join(unknown)}")
    print(f"runner from {REPO}; {os.cpu_count()} cores, python {sys.version.split()[0]}", flush=True)
    base = Path(tempfile.mkdtemp(prefix="studio-runner-bench-idle-"))
    try:
        (base / "script").mkdir()
        (base / "script" / "trivial.py").write_text("print('hello')\n")
        results = [run_case(case, base, args) for case in cases]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\n{'case':<10} {'idle CPU':>12} {'publish -> starting (median, max)':>36}")
    for r in results:
        lat = f"{statistics.median(r.latencies) * 1000:.0f} ms, {max(r.latencies) * 1000:.0f} ms" \
            if r.latencies else "-"
        print(f"{r.case:<10} {r.cpu_percent:>10.2f} % {lat:>36}")


if __name__ == "__main__":
    main()
