"""Per-experiment overhead, with a warm environment cache.

``--mode local`` (default): starts the real runner (``runner.py run``) as a subprocess on a temporary queue
root, submits trivial experiments one after another and times each from enqueue until its message is
acknowledged (gone from the queue and from the in-flight area, results uploaded). Prints median, p95 and the
runner's RSS (idle, and peak from the kernel's VmHWM).

``--mode rabbitmq``: throughput of the reference deployment. Publishes ``--count`` trivial experiments (each
asking one core, and leaving a small file in modeldir, retval, tb and _metrics unless ``--bare``, so that five
archives are uploaded) to a fresh RabbitMQ queue on 127.0.0.1:5672, their artifacts in a bucket of an
S3-protocol server (moto, started here on a free loopback port, with IAM like the tests), and lets a fresh
runner drain them with ``--once``. A first drain of one experiment warms the environment and artifact caches.
Prints the drain time (runner start -> exit, first delivery -> last settlement) and each experiment's split
by phase (intake, download, env, run, upload, settle), taken from the runner's own attempt registry: the
runner is started through a small wrapper that does what ``studio-runner run --once`` does and subscribes to
``registry.bus``. Checks that every experiment succeeded with its archives in the bucket; the queue is
deleted afterwards.

``--mode client``: latency through the real StudioML 0.0.49 client (``studio-run``, built once under
~/.cache/studio-runner-tests), which submits each experiment to a RabbitMQ queue and moto; times from the
start of ``studio-run`` until the experiment's ``output.tar`` is visible in the bucket, and the runner's share
(client returned -> output visible).

Figures only, no assertions.

    python bench/overhead.py [--count 20] [--mode local|rabbitmq|client] [--max-running N] [--bare]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

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


def percentiles(times: list[float]) -> str:
    times = sorted(times)
    p95 = times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))]
    return (f"median {statistics.median(times):.3f} s   p95 {p95:.3f} s   min {times[0]:.3f} s   "
            f"max {times[-1]:.3f} s")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == RUNNER_CHILD:
        runner_child(Path(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--mode", choices=("local", "rabbitmq", "client"), default="local")
    parser.add_argument("--env-cache-dir", default=None,
                        help="default: a temporary one (local), the test suite's (rabbitmq, client); "
                        "warmed first")
    parser.add_argument("--max-running", type=int, default=None,
                        help="rabbitmq: the runner's --max-running (default: the runner's own default)")
    parser.add_argument("--no-artifact-cache", action="store_true",
                        help="rabbitmq: run without --cache-dir (every experiment downloads its workspace)")
    parser.add_argument("--bare", action="store_true",
                        help="rabbitmq: experiments only print (default: each also writes a small file into "
                        "modeldir, retval, tb and _metrics, so five archives are uploaded)")
    parser.add_argument("--verbose", action="store_true", help="rabbitmq: every experiment's phases")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}")
    if args.mode == "rabbitmq":
        rabbitmq_mode(args)
    elif args.mode == "client":
        client_mode(args)
    else:
        local_mode(args)


def local_mode(args: argparse.Namespace) -> None:

    base = Path(tempfile.mkdtemp(prefix="studio-runner-bench-"))
    queue_root, store, work = base / "queue", base / "store", base / "work"
    for folder in (queue_root / "local_bench", work):
        folder.mkdir(parents=True)
    script_dir = base / "script"
    script_dir.mkdir()
    (script_dir / "trivial.py").write_text("print('hello')\n")
    env = dict(os.environ, STUDIO_RUNNER_QUEUE_ROOT=str(queue_root), STUDIO_RUNNER_WORKING_DIR=str(work),
               STUDIO_RUNNER_LOCAL_STORAGE_ROOTS=str(base),  # its store lives under base
               STUDIO_RUNNER_LOG_LEVEL="warning",
               STUDIO_RUNNER_ENV_CACHE_DIR=args.env_cache_dir or str(base / "envs"),
               STUDIO_RUNNER_POLL_INTERVAL="0.05s",
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

    print(f"warm-up experiment (may build the env): {warm:.3f} s")
    print(f"{args.count} trivial experiments, enqueue -> acknowledged, warm env cache:")
    print(f"  {percentiles(times)}")
    print(f"runner RSS: idle {idle_rss:.1f} MB, peak {peak_rss:.1f} MB")


CLIENT_CONFIG = """\
database: {{type: s3, endpoint: {url}, bucket: {bucket}-db, authentication: none,
           credentials: {{aws: {aws}}}}}
storage: {{type: s3, endpoint: {url}, bucket: {bucket}, credentials: {{aws: {aws}}}}}
cloud: {{queue: {{rmq: "amqp://guest:guest@127.0.0.1:5672/%2f"}}}}
server: {{authentication: none}}
verbose: error
saveWorkspaceFrequency: 1m
resources_needed: {{cpus: 1, ram: 1g, hdd: 2g, gpus: 0}}
"""


def client_mode(args: argparse.Namespace) -> None:
    import uuid

    from support.s3server import REGION, start_moto
    from support.studioml_client import cache_root, ensure_client_venv

    client_bin = ensure_client_venv()
    server = start_moto(auth=True)
    base = Path(tempfile.mkdtemp(prefix="studio-runner-bench-rmq-"))
    queue = f"rmq_bench_{uuid.uuid4().hex[:8]}"
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    s3 = server.client()
    for name in (bucket, f"{bucket}-db"):
        s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": REGION})
    creds = server.credentials
    aws = f"{{access_key: '{creds.access_key}', secret_access_key: '{creds.secret_key}', region: {REGION}}}"
    config = base / "config.yaml"
    config.write_text(CLIENT_CONFIG.format(url=server.http_url, bucket=bucket, aws=aws))
    project = base / "project"
    project.mkdir()
    (project / "trivial.py").write_text("print('hello')\n")
    work = base / "work"
    work.mkdir()
    env = dict(os.environ, AMQP_URL="amqp://guest:guest@127.0.0.1:5672/%2f", QUEUE_MATCH=f"^{queue}$",
               STUDIO_RUNNER_WORKING_DIR=str(work), STUDIO_RUNNER_LOG_LEVEL="warning",
               STUDIO_RUNNER_POLL_INTERVAL="0.05s", STUDIO_RUNNER_RESCAN_INTERVAL="1s",
               STUDIO_RUNNER_ENV_CACHE_DIR=args.env_cache_dir or str(cache_root() / "envs"),
               PYTHONPATH=str(REPO))
    client_env = dict(os.environ, STUDIOML_HOME=str(base / "home"))
    client_env.pop("PYTHONPATH", None)
    runner = subprocess.Popen([sys.executable, str(REPO / "runner.py"), "run"], env=env)

    def one(key: str) -> tuple[float, float]:
        """(studio run start -> output visible, time_added -> output visible), polling while the client
        is still running: it keeps going for seconds after it has published."""
        start = time.perf_counter()
        client = subprocess.Popen([str(client_bin / "studio-run"), "--config", str(config),
                                   f"--experiment={key}", f"--queue={queue}", "trivial.py"],
                                  cwd=project, env=client_env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        while True:
            try:
                s3.head_object(Bucket=bucket, Key=f"experiments/{key}/output.tar")
                break
            except s3.exceptions.ClientError:
                if runner.poll() is not None:
                    raise SystemExit("the runner exited") from None
                if client.poll() not in (None, 0):
                    raise SystemExit(f"studio run failed:\n{client.stdout.read()[-3000:]}") from None
                time.sleep(0.01)
        visible, visible_at = time.perf_counter(), time.time()
        client.communicate(timeout=120)
        # time_added: stamped by the client just before it uploads the workspace and publishes the message
        record = json.loads(s3.get_object(Bucket=f"{bucket}-db", Key=f"experiments/{key}")["Body"].read())
        return visible - start, visible_at - float(record["time_added"])

    try:
        warm = one(f"warm_{uuid.uuid4().hex[:6]}")
        results = [one(f"bench_{i}_{uuid.uuid4().hex[:6]}") for i in range(args.count)]
        _, peak_rss = rss_mb(runner.pid)
    finally:
        runner.terminate()
        runner.wait(60)
        server.stop()
        import httpx

        httpx.delete(f"http://127.0.0.1:15672/api/queues/%2F/{queue}", auth=("guest", "guest"))
    print(f"warm-up experiment (may build the env): {warm[0]:.3f} s")
    print(f"{args.count} trivial experiments submitted by the real `studio run` client over RabbitMQ + S3:")
    print(f"  studio run start -> output.tar in the bucket: {percentiles([r[0] for r in results])}")
    print(f"  time_added (client stamps it before upload + publish) -> output.tar in the bucket: "
          f"{percentiles([r[1] for r in results])}")
    print("  (studio run itself needs ~5 s to start, upload, publish and exit; the runner works meanwhile)")
    print(f"runner peak RSS: {peak_rss:.1f} MB")



# --------------------------------------------------------------------------- --mode rabbitmq: a drain

RUNNER_CHILD = "--runner-child"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"
TRIVIAL_WITH_RESULTS = """\
from pathlib import Path
for label in ("modeldir", "retval", "tb", "_metrics"):  # beside the workspace, as the client lays them out
    Path("..", label, "result.txt").write_text(label)
print("hello")
"""
"""A trivial experiment that leaves a small result in each mutable artifact: five archives to upload."""
SPLIT = ("intake", "download", "env", "run", "upload", "settle")
"""Each attempt's time, in order: claimed -> downloading (parse, admission, experiment directory), the
downloads, environment + process launch, the run, final uploads + clean-up, acknowledgement."""


def runner_child(events_path: Path) -> None:
    """``studio-runner run --once`` (settings from the environment, like the CLI) plus a subscriber to the
    registry that writes each settled attempt's phase stamps to ``events_path``, one JSON object a line."""
    import trio

    from studio_runner import config, runtime
    from studio_runner.events import Event, Settled
    from studio_runner.redact import runner_secrets

    settings = config.resolve()
    runtime.configure_logging(settings.log_level, runner_secrets(os.environ))
    with open(events_path, "w") as out:

        def settled(event: Event) -> None:
            if isinstance(event, Settled):
                record = event.record
                out.write(json.dumps({
                    "key": record.key, "claimed_at": record.claimed_at, "finished_at": record.finished_at,
                    "settled_at": record.settled_at, "status": str(record.status),
                    "phases": [[str(phase), at] for phase, at in record.phases],
                }) + "\n")

        async def serve() -> None:
            async with runtime.open_runner(settings) as supervisor:
                out.write(json.dumps({"ready_at": time.time()}) + "\n")
                supervisor.registry.bus.subscribe(settled)
                await supervisor.run(once=True, handle_signals=True)

        trio.run(serve)


def attempt_split(record: dict) -> dict[str, float]:
    """The attempt's seconds per entry of SPLIT, from the registry's phase stamps."""
    at = {phase: stamp for phase, stamp in reversed(record["phases"])}  # first entry into each phase
    claimed, finished, settled = record["claimed_at"], record["finished_at"], record["settled_at"]
    marks = [claimed, at.get("downloading", claimed), at.get("building_env"), at.get("running"),
             at.get("uploading"), finished, settled]
    for n in range(1, len(marks)):  # a phase that never happened takes no time
        if marks[n] is None:
            marks[n] = marks[n - 1]
    return {name: marks[n + 1] - marks[n] for n, name in enumerate(SPLIT)}


def rabbitmq_mode(args: argparse.Namespace) -> None:
    import uuid

    from support.rabbitmq import delete_queue, publish_like_studioml
    from support.s3server import REGION, start_moto
    from support.studioml_client import cache_root

    from studio_runner.submit import build_request

    server = start_moto(auth=True)
    base = Path(tempfile.mkdtemp(prefix="studio-runner-bench-drain-"))
    queue = f"rmq_bench_{uuid.uuid4().hex[:8]}"
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    s3 = server.client()
    s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    creds = server.credentials
    aws = {"access_key": creds.access_key, "secret_access_key": creds.secret_key, "region": REGION}
    project = base / "project"
    project.mkdir()
    script = project / "trivial.py"
    script.write_text(TRIVIAL_WITH_RESULTS if not args.bare else "print('hello')\n")
    workspace = base / "workspace.tar"
    subprocess.run(["tar", "-cf", str(workspace), "-C", str(project), "trivial.py"], check=True)
    workspace_key = "blobstore/bench-workspace.tar"
    s3.upload_file(str(workspace), bucket, workspace_key)
    (base / "work").mkdir()
    env = dict(os.environ, AMQP_URL=AMQP_URL, QUEUE_MATCH=f"^{queue}$",
               STUDIO_RUNNER_WORKING_DIR=str(base / "work"), STUDIO_RUNNER_LOG_LEVEL="warning",
               STUDIO_RUNNER_POLL_INTERVAL="0.05s", STUDIO_RUNNER_RESCAN_INTERVAL="1s",
               STUDIO_RUNNER_ENV_CACHE_DIR=args.env_cache_dir or str(cache_root() / "envs"),
               # below the broker's 30 min consumer timeout: no per-experiment warning about it in the log
               STUDIO_RUNNER_MAX_LIFETIME="20m",
               PYTHONPATH=str(REPO))
    if not args.no_artifact_cache:
        env["STUDIO_RUNNER_CACHE_DIR"] = str(base / "artifact-cache")
    if args.max_running:
        env["STUDIO_RUNNER_MAX_RUNNING"] = str(args.max_running)

    def publish(keys: list[str]) -> None:
        for key in keys:
            request = build_request(Submission(script=script, queue=queue, experiment=key, cpus=1),
                                    project, workspace_key)
            for artifact in request["experiment"]["artifacts"].values():
                artifact["qualified"] = f"s3://{server.endpoint}/{bucket}/{artifact['key']}"
                artifact["bucket"] = bucket
                artifact["credentials"] = {"aws": aws}
            storage = {"type": "s3", "endpoint": server.http_url, "bucket": bucket,
                       "credentials": {"aws": aws}}
            request["config"].update(storage=storage, database=dict(storage, bucket=f"{bucket}-db"),
                                     queue=None, cloud={"queue": {"rmq": AMQP_URL}})
            publish_like_studioml(AMQP_URL, queue, request)

    saved = ("output",) if args.bare else ("_metrics", "modeldir", "output", "retval", "tb")

    def drain(keys: list[str]) -> tuple[float, float, list[dict]]:
        """(runner start, runner exit, settled attempts in order): publish ``keys``, run the runner --once."""
        publish(keys)
        events = base / f"events-{len(keys)}.jsonl"
        started = time.time()
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), RUNNER_CHILD, str(events)],
                              env=env, timeout=900, check=False)
        ended = time.time()
        lines = [json.loads(line) for line in events.read_text().splitlines()]
        attempts = [line for line in lines if "key" in line]
        if done.returncode != 0 or sorted(a["key"] for a in attempts) != sorted(keys):
            raise SystemExit(f"the runner exited with {done.returncode}; settled "
                             f"{[(a['key'], a['status']) for a in attempts]}")
        missing = [f"{key}/{label}.tar" for key in keys for label in saved
                   if not object_exists(s3, bucket, f"experiments/{key}/{label}.tar")]
        if missing or any(a["status"] != "success" for a in attempts):
            raise SystemExit(f"not every experiment succeeded with its results saved: {attempts}, "
                             f"missing: {missing}")
        ready = next(line["ready_at"] for line in lines if "ready_at" in line)
        return started, ended, [dict(a, ready_at=ready) for a in attempts]

    try:
        drain([f"warm_{uuid.uuid4().hex[:6]}"])  # builds or finds the env, fills the artifact cache
        keys = [f"bench_{n:03d}_{uuid.uuid4().hex[:6]}" for n in range(args.count)]
        started, ended, attempts = drain(keys)
        metadata_docs = len(list_keys(s3, bucket, "metadata/"))
    finally:
        delete_queue(AMQP_URL, queue)
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
    attempts.sort(key=lambda a: a["claimed_at"])
    first_claim, last_settle = attempts[0]["claimed_at"], max(a["settled_at"] for a in attempts)
    caches = "env" if args.no_artifact_cache else "env and artifact"
    print(f"{args.count} trivial experiments (1 core each, {len(saved)} archive(s) to upload) drained from "
          f"RabbitMQ with --once, S3 on moto, warm {caches} cache"
          f"{f', --max-running {args.max_running}' if args.max_running else ''}:")
    print(f"  runner start -> exit            {ended - started:7.3f} s")
    print(f"  runner start -> ready           {attempts[0]['ready_at'] - started:7.3f} s   "
          "(imports, broker connection)")
    print(f"  ready -> first delivery         {first_claim - attempts[0]['ready_at']:7.3f} s")
    print(f"  first delivery -> last settled  {last_settle - first_claim:7.3f} s   "
          f"({(last_settle - first_claim) / len(attempts):.3f} s per experiment)")
    print(f"  last settled -> exit            {ended - last_settle:7.3f} s")
    splits = [attempt_split(a) for a in attempts]
    print("  per experiment, seconds:   " + "".join(f"{name:>9}" for name in (*SPLIT, "total")))

    def row(title: str, values: list[float]) -> None:
        print(f"  {title:<26}" + "".join(f"{v:9.3f}" for v in values))

    row("first experiment", [*splits[0].values(), sum(splits[0].values())])
    rest = splits[1:] or splits
    row("others, median", [statistics.median(s[name] for s in rest) for name in SPLIT]
        + [statistics.median(sum(s.values()) for s in rest)])
    row("others, mean", [statistics.fmean(s[name] for s in rest) for name in SPLIT]
        + [statistics.fmean(sum(s.values()) for s in rest)])
    gaps = [b["claimed_at"] - a["finished_at"] for a, b in zip(attempts, attempts[1:], strict=False)]
    if gaps:
        print("  next delivery after the previous one finished uploading: median "
              f"{statistics.median(gaps):.3f} s (negative: they overlapped)")
    if args.verbose:
        for attempt, split in zip(attempts, splits, strict=True):
            row(attempt["key"][:26], [*split.values(), sum(split.values())])
    print(f"  checked in the bucket: {', '.join(saved)} of every experiment, {metadata_docs} metadata "
          "documents (the warm-up's included)")


def object_exists(s3: object, bucket: str, key: str) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=key)  # type: ignore[attr-defined]
    except Exception:
        return False
    return True


def list_keys(s3: object, bucket: str, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)  # type: ignore[attr-defined]
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


if __name__ == "__main__":
    main()
