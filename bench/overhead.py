"""Per-experiment overhead, with a warm environment cache.

``--mode local`` (default): starts the real runner (``runner.py run``) as a subprocess on a temporary queue
root, submits trivial experiments one after another and times each from enqueue until its message is
acknowledged (gone from the queue and from the in-flight area, results uploaded). Prints median, p95 and the
runner's RSS (idle, and peak from the kernel's VmHWM).

``--mode rabbitmq``: the reference deployment. The real StudioML 0.0.49 client (``studio-run``, built once
under ~/.cache/studio-runner-tests) submits each experiment to a RabbitMQ queue on 127.0.0.1:5672 and an
S3-protocol server (moto, started here on a free loopback port); times from the start of ``studio-run``
until the experiment's ``output.tar`` is visible in the bucket, and the runner's share (client returned →
output visible).

Figures only, no assertions.

    python bench/overhead.py [--count 20] [--mode local|rabbitmq]
"""

from __future__ import annotations

import argparse
import json
import os
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
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--mode", choices=("local", "rabbitmq"), default="local")
    parser.add_argument("--env-cache-dir", default=None, help="default: a temporary one (warmed first)")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}")
    if args.mode == "rabbitmq":
        rabbitmq_mode(args)
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


def rabbitmq_mode(args: argparse.Namespace) -> None:
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


if __name__ == "__main__":
    main()
