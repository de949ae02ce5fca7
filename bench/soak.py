"""Soak: mixed experiments through RabbitMQ and S3 with two runners, while runners are killed with -9 and
the broker restarts. Not a test: it prints figures (and exits 1 if an experiment was lost).

What runs (defaults; see --help):

* an S3-protocol server (moto, on a free loopback port) and a durable ``rmq_soak_<id>`` queue on the broker at
  127.0.0.1:5672 (management API on :15672), declared and published to exactly like ``studio run`` with
  ``cloud.queue.persistent: true`` (persistent messages, so a broker restart keeps them);
* two runners (``runner.py run``), each allowed two experiments at once, checkpointing every 5 s;
* experiments submitted at random for ``--minutes`` (20): sleepers of seconds to minutes printing every few
  seconds, some that fail, some that print thousands of lines fast, some that write checkpoints;
* chaos at random moments: kill -9 of a runner (restarted a few seconds later: its start-up sweep removes the
  dead runner's directory) and a broker restart (``rabbitmqctl stop_app`` / ``start_app``).

At the end (after every experiment reached a final state, or ``--drain-minutes``) it stops the runners with
SIGTERM and prints: experiments submitted, completed (by outcome), lost (no final outcome and no message
left: must be 0), run more than once, the runners' peak RSS and open file count over time, and leftover
processes and directories (must be 0).

    python bench/soak.py [--minutes 20] [--runners 2] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import pika  # noqa: E402
import psutil  # noqa: E402
from support.rabbitmq import AMQP_URL, EXCHANGE, declare_like_studioml, delete_queue, mgmt_get  # noqa: E402
from support.s3server import start_moto  # noqa: E402
from support.studioml_client import cache_root  # noqa: E402

from studio_runner.submit import Submission, build_request, pack_workspace  # noqa: E402

MIX = """\
import itertools, os, pathlib, sys, time
kind, seconds = sys.argv[1], float(sys.argv[2])
start = time.time()
if kind == "chatty":
    for n in range(int(seconds * 4000)):
        print("line", n, "x" * 80)
elif kind == "checkpoint":
    os.makedirs("../modeldir", exist_ok=True)
    for epoch in itertools.count():
        if time.time() - start > seconds:
            break
        pathlib.Path(f"../modeldir/epoch{epoch}.txt").write_text(str(epoch))
        print("epoch", epoch, flush=True)
        time.sleep(2)
else:
    while time.time() - start < seconds:
        print("working", round(time.time() - start), flush=True)
        time.sleep(3)
if kind == "fail":
    raise SystemExit("failing on purpose")
print("done", kind)
"""

KINDS = [("sleep", 0.45, (5, 150)), ("fail", 0.15, (2, 20)), ("chatty", 0.15, (1, 5)),
         ("checkpoint", 0.25, (10, 90))]


@dataclass
class Runner:
    index: int
    workdir: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None
    samples: list[tuple[float, float, int, int]] = field(default_factory=list)
    """(elapsed s, RSS MB, open fds, pid)."""
    kills: int = 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0,
                        help="how long to submit work and inject faults")
    parser.add_argument("--drain-minutes", type=float, default=10.0, help="how long to wait for the rest")
    parser.add_argument("--runners", type=int, default=2)
    parser.add_argument("--per-runner", type=int, default=2, help="experiments each runner runs at once")
    parser.add_argument("--kills", type=int, default=3, help="kill -9 of a runner, this many times")
    parser.add_argument("--broker-restarts", type=int, default=1)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the soak directory")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    base = Path(tempfile.mkdtemp(prefix="studio-runner-soak-"))
    queue = f"rmq_soak_{uuid.uuid4().hex[:8]}"
    print(f"soak {args.minutes:g} min, {args.runners} runners x {args.per_runner}, seed {seed}, dir {base}, "
          f"queue {queue}", flush=True)
    server = start_moto()
    runners: list[Runner] = []
    try:
        return soak(args, rng, seed, base, queue, server, runners)
    finally:
        for runner in runners:
            if runner.process and runner.process.poll() is None:
                runner.process.kill()
        delete_queue(AMQP_URL, queue)
        server.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


def soak(args: argparse.Namespace, rng: random.Random, seed: int, base: Path, queue: str, server: Any,
         runners: list[Runner]) -> int:
    client = server.client()
    bucket = f"soak-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "us-west-1"})
    declare_like_studioml(AMQP_URL, queue, persistent=True)
    workspace = base / "workspace"
    workspace.mkdir()
    (workspace / "mix.py").write_text(MIX)
    staging = base / "staging"
    workspace_key = pack_workspace(workspace, staging)
    client.upload_file(str(staging / workspace_key), bucket, workspace_key)
    creds = {"aws": {"access_key": server.credentials.access_key,
                     "secret_access_key": server.credentials.secret_key}}

    runners.extend(Runner(i, base / f"work{i}", base / f"runner{i}.log") for i in range(args.runners))
    env = dict(os.environ, PYTHONPATH=str(REPO), STUDIO_RUNNER_ENV_CACHE_DIR=str(cache_root() / "envs"),
               STUDIO_RUNNER_MAX_RUNNING=str(args.per_runner), STUDIO_RUNNER_MIN_CHECKPOINT_INTERVAL="5s",
               STUDIO_RUNNER_GRACE_PERIOD="3s", STUDIO_RUNNER_RETRY_DELAY="2s",
               STUDIO_RUNNER_RESCAN_INTERVAL="5s", QUEUE_MATCH=f"^{queue}$")

    def start(runner: Runner) -> None:
        runner.workdir.mkdir(exist_ok=True)
        handle = open(runner.log, "ab")
        runner.process = subprocess.Popen(
            [sys.executable, str(REPO / "runner.py"), "run", "--amqp-url", AMQP_URL,
             "--working-dir", str(runner.workdir)], env=env, stdout=handle, stderr=subprocess.STDOUT)
        handle.close()

    expected: dict[str, str] = {}
    submitted_at: dict[str, float] = {}

    def submit_one(n: int) -> None:
        kind = rng.choices([k for k, _, _ in KINDS], [w for _, w, _ in KINDS])[0]
        low, high = next(r for k, _, r in KINDS if k == kind)
        seconds = round(rng.uniform(low, high), 1)
        key = f"soak_{n:04d}_{kind}"
        request = build_request(Submission(script=workspace / "mix.py", queue=queue, experiment=key,
                                           args=[kind, str(seconds)], save_workspace_frequency="5s"),
                                staging, workspace_key)
        for artifact in request["experiment"]["artifacts"].values():
            artifact["qualified"] = f"s3://{server.endpoint}/{bucket}/{artifact['key']}"
            artifact["bucket"] = bucket
            artifact["credentials"] = creds
        with pika.BlockingConnection(pika.URLParameters(AMQP_URL)) as connection:
            ch = connection.channel()
            ch.confirm_delivery()
            ch.basic_publish(EXCHANGE, f"StudioML.{queue}", json.dumps(request),
                             pika.BasicProperties(delivery_mode=2, content_type="text/plain"))
        expected[key] = "failed" if kind == "fail" else "success"
        submitted_at[key] = time.monotonic()

    for runner in runners:
        start(runner)
    t0 = time.monotonic()
    end = t0 + args.minutes * 60
    kill_times = sorted(rng.uniform(0.1, 0.9) * (end - t0) + t0 for _ in range(args.kills))
    restart_times = sorted(rng.uniform(0.2, 0.8) * (end - t0) + t0 for _ in range(args.broker_restarts))
    pending_restart: list[tuple[float, Runner]] = []
    next_submit = t0
    n = 0
    next_sample = t0
    broker_restarts = 0

    def sample() -> None:
        for runner in runners:
            proc = runner.process
            if proc is None or proc.poll() is not None:
                continue
            try:
                p = psutil.Process(proc.pid)
                rss_mb = p.memory_info().rss / 1e6
                runner.samples.append((time.monotonic() - t0, rss_mb, p.num_fds(), proc.pid))
            except psutil.Error:
                pass

    def outcomes() -> dict[str, list[str]]:
        found: dict[str, list[str]] = defaultdict(list)
        token = None
        while True:
            kwargs = {"Bucket": bucket, "Prefix": "metadata/"}
            if token:
                kwargs["ContinuationToken"] = token
            page = client.list_objects_v2(**kwargs)
            for obj in page.get("Contents", []):
                doc = json.loads(client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
                studioml = doc.get("studioml", {})
                key = studioml.get("experiment", {}).get("key")
                status = studioml.get("outcome", {}).get("status")
                if key:
                    found[key].append(status)
            token = page.get("NextContinuationToken")
            if not token:
                return found

    seen_docs: dict[str, list[str]] = {}
    while time.monotonic() < end:
        now = time.monotonic()
        busy = args.runners * args.per_runner
        if now >= next_submit:
            submit_one(n)
            n += 1
            next_submit = now + rng.uniform(0.3, 1.6) * 60 / busy * 1.0
        if kill_times and now >= kill_times[0]:
            kill_times.pop(0)
            victim = rng.choice([r for r in runners if r.process and r.process.poll() is None] or runners)
            if victim.process and victim.process.poll() is None:
                victim.process.send_signal(signal.SIGKILL)
                victim.process.wait()
                victim.kills += 1
                print(f"[{now - t0:6.0f}s] kill -9 runner {victim.index}", flush=True)
                pending_restart.append((now + rng.uniform(2, 8), victim))
        for when, runner in list(pending_restart):
            if now >= when:
                pending_restart.remove((when, runner))
                start(runner)
                print(f"[{now - t0:6.0f}s] runner {runner.index} restarted", flush=True)
        if restart_times and now >= restart_times[0]:
            restart_times.pop(0)
            print(f"[{now - t0:6.0f}s] broker restart (stop_app/start_app)", flush=True)
            subprocess.run(["rabbitmqctl", "stop_app"], capture_output=True, check=False)
            time.sleep(5)
            subprocess.run(["rabbitmqctl", "start_app"], capture_output=True, check=False)
            broker_restarts += 1
        if now >= next_sample:
            sample()
            next_sample = now + 10
        time.sleep(0.2)
    for _when, runner in pending_restart:
        start(runner)
    print(f"[{time.monotonic() - t0:6.0f}s] submitted {n}; waiting for the rest", flush=True)
    drain_end = time.monotonic() + args.drain_minutes * 60
    def messages_left() -> int:
        try:
            return int(mgmt_get(f"/api/queues/%2f/{queue}").json().get("messages", 1))
        except Exception:
            return 1

    while time.monotonic() < drain_end:
        seen_docs = outcomes()
        final = [k for k in expected if any(s in ("success", "failed") for s in seen_docs.get(k, []))]
        if len(final) == len(expected) and messages_left() == 0:  # duplicates from requeues ran too
            break
        if time.monotonic() >= next_sample:
            sample()
            next_sample = time.monotonic() + 10
        time.sleep(5)
    seen_docs = outcomes()
    for runner in runners:
        if runner.process and runner.process.poll() is None:
            runner.process.send_signal(signal.SIGTERM)
    for runner in runners:
        if runner.process:
            try:
                runner.process.wait(120)
            except subprocess.TimeoutExpired:
                runner.process.kill()
    time.sleep(1)
    leftover_procs = [p for p in psutil.process_iter(["cmdline", "cwd"])
                      if str(base) in " ".join(p.info.get("cmdline") or []) + str(p.info.get("cwd") or "")]
    leftover_dirs = [d for r in runners if r.workdir.exists() for d in r.workdir.iterdir()]
    with pika.BlockingConnection(pika.URLParameters(AMQP_URL)) as connection:
        left_in_queue = connection.channel().queue_declare(queue, passive=True).method.message_count

    statuses = Counter()
    lost, twice = [], []
    for key, want in expected.items():
        docs = seen_docs.get(key, [])
        finals = [s for s in docs if s in ("success", "failed", "timeout")]
        if not finals:
            lost.append(key)
        else:
            statuses[finals[-1] if finals[-1] == want else f"{finals[-1]} (expected {want})"] += 1
        if len([s for s in docs if s not in ("deferred",)]) > 1:
            twice.append(key)

    print()
    print(f"seed                         {seed}")
    print(f"experiments submitted        {len(expected)}")
    by_outcome = ", ".join(f"{k} {v}" for k, v in sorted(statuses.items()))
    print(f"completed                    {sum(statuses.values())}  ({by_outcome})")
    print(f"lost                         {len(lost)}  {lost[:10]}")
    print(f"run more than once           {len(twice)}  (at-least-once after kill -9 / broker restart)")
    print(f"still queued at the end      {left_in_queue}")
    kills = sum(r.kills for r in runners)
    print(f"faults injected              kill -9 x{kills}, broker restarts x{broker_restarts}")
    for runner in runners:
        if not runner.samples:
            continue
        settled = [s for s in runner.samples if s[0] >= 60] or runner.samples  # past start-up
        rss = [s[1] for s in settled]
        fds = [s[2] for s in settled]
        quarter = max(1, len(settled) // 4)
        print(f"runner {runner.index} RSS MB               at 1 min {rss[0]:.0f}, "
              f"median {statistics.median(rss):.0f}, last quarter max {max(rss[-quarter:]):.0f}, "
              f"peak {max(rss):.0f}  ({len(settled)} samples, 10 s apart, restarts included)")
        series, last_pid, next_t = [], None, 0.0
        for t, mb, _fds, pid in runner.samples:
            if t >= next_t or pid != last_pid:
                series.append(f"{t / 60:.0f}m{'*' if last_pid not in (None, pid) else ''}:{mb:.0f}")
                next_t, last_pid = t + 120, pid
        print(f"runner {runner.index} RSS series MB        {' '.join(series)}  (* = restarted after kill -9)")
        print(f"runner {runner.index} open files           at 1 min {fds[0]}, "
              f"median {statistics.median(fds):.0f}, last quarter max {max(fds[-quarter:])}, peak {max(fds)}")
    print(f"leftover processes           {len(leftover_procs)}")
    print(f"leftover directories         {len(leftover_dirs)}  {[str(d) for d in leftover_dirs[:5]]}")
    return 1 if lost or leftover_procs or leftover_dirs else 0


if __name__ == "__main__":
    sys.exit(main())
