"""Secrets (issue 9, item 6) with the real runner: an experiment whose request and runner environment carry
known secrets prints its whole environment, puts them in its metadata and fails quoting them; no secret
value comes out of the runner anywhere: its log (text and JSON), the metadata documents, the output log,
/status and /metrics (polled while the experiment runs), set-aside reasons, error text. The experiment itself
still receives every one of them."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.runner import REPO, Sandbox, metadata_documents, read_member

from studio_runner.redact import is_secret_name
from studio_runner.submit import Submission, submit

pytestmark = pytest.mark.slow

QUEUE = "local_secrets"

REQUEST_SECRETS = {
    "DB_PWD": "dbpwd-Value-4417",
    "API_PASS": "apipass-Value-8821",
    "MY_SECRET": "mysecret-Value-3390",
    "X_TOKEN": "xtoken-Value-5512",
    "AWS_SECRET_ACCESS_KEY": "awsSecret/Value+7734",
    "SHORT_PWD": "k9q",  # three characters: still a secret
}
BROKER_PASSWORD = "brokerPw-Value-6603"
REQUEST_ENV = {**REQUEST_SECRETS, "BROKER_URL": f"amqp://runner:{BROKER_PASSWORD}@127.0.0.1:5672/%2f",
               "PLAIN_SETTING": "visible-value-1"}
RUNNER_SECRETS = {
    "RUNNER_API_TOKEN": "runnertoken-Value-2290",
    "RUNNER_DB_PASS": "r7x",  # short, from the runner's own environment
}
MONITOR_PASSWORD = "monitorPw-Value-1185"
RUNNER_ENV = {**RUNNER_SECRETS, "MONITOR_URL": f"https://mon:{MONITOR_PASSWORD}@127.0.0.1:9/"}
SECRETS = [*REQUEST_SECRETS.values(), BROKER_PASSWORD, *RUNNER_SECRETS.values(), MONITOR_PASSWORD]

SCRIPT = textwrap.dedent("""\
    import hashlib, json, os, sys, time
    names = sys.argv[1].split(",")
    for name, value in sorted(os.environ.items()):
        print(f"{name}={value}")
    print("bare values:", " ".join(os.environ[n] for n in names))
    print("received", hashlib.sha256("|".join(os.environ[n] for n in names).encode()).hexdigest())
    print(json.dumps({"experiment": {"token": os.environ["X_TOKEN"], "short": os.environ["SHORT_PWD"],
                                     "broker": os.environ["BROKER_URL"]}}))
    sys.stdout.flush()
    time.sleep(float(sys.argv[2]))
    print("still here", os.environ["MY_SECRET"], flush=True)
    time.sleep(float(sys.argv[2]))
    raise SystemExit(f"cannot log in with {os.environ['DB_PWD']} / {os.environ['SHORT_PWD']} / "
                     f"{os.environ['RUNNER_DB_PASS']} at {os.environ['BROKER_URL']}")
    """)


def leaks(text: str) -> list[str]:
    """The secrets found in ``text``: long ones anywhere, short ones as words (as they are masked)."""
    found = []
    for secret in SECRETS:
        if len(secret) >= 4:
            if secret in text:
                found.append(secret)
        elif re.search(rf"(?<!\w){re.escape(secret)}(?!\w)", text):
            found.append(secret)
    return found


def queue_requests(box: Sandbox, tmp_path: Path, key: str, seconds: float) -> None:
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    (project / "env.py").write_text(SCRIPT)
    names = ",".join([*REQUEST_SECRETS, "BROKER_URL", *RUNNER_SECRETS, "MONITOR_URL"])
    submit(Submission(script=project / "env.py", args=[names, str(seconds)], queue=QUEUE, experiment=key,
                      env=REQUEST_ENV), box.queue_root, box.store)
    # set aside: a locator that quotes a secret (refused: outside the storage roots)
    refused = submit(Submission(script=project / "env.py", queue=QUEUE, experiment=f"{key}_refused",
                                env=REQUEST_ENV), box.queue_root, box.store)
    qdir = box.queue_root / QUEUE
    for path in qdir.iterdir():
        if path.name != "lock.lock" and json.loads(path.read_text())["experiment"]["key"] == refused[
                "experiment"]["key"]:
            doc = json.loads(path.read_text())
            doc["experiment"]["artifacts"]["data"] = {
                "mutable": False, "unpack": False, "qualified": f"/etc/{REQUEST_SECRETS['X_TOKEN']}/passwd"}
            path.write_text(json.dumps(doc))
    # set aside: malformed, a secret in the field that is wrong
    (qdir / f"malformed_{key}").write_text(json.dumps({
        "experiment": {"key": f"{key}_malformed", "filename": "x.py", "artifacts": {}},
        "config": {"env": {"DB_PWD": [REQUEST_SECRETS["DB_PWD"]], "X_TOKEN": REQUEST_SECRETS["X_TOKEN"]}}}))


def expected_digest() -> str:
    values = [*REQUEST_SECRETS.values(), REQUEST_ENV["BROKER_URL"], *RUNNER_SECRETS.values(),
              RUNNER_ENV["MONITOR_URL"]]
    return hashlib.sha256("|".join(values).encode()).hexdigest()


def runner_env(box: Sandbox, **extra: str) -> dict[str, str]:
    return box.runner_env(**RUNNER_ENV, STUDIO_RUNNER_PASS_ENV=",".join(RUNNER_ENV), **extra)


def poll_while_running(proc: subprocess.Popen[str], lines: list[str]) -> list[str]:
    """Bodies of /status and /metrics fetched until the runner exits (its address from the banner)."""
    bodies: list[str] = []
    address = None
    while proc.poll() is None:
        if address is None:
            found = re.search(r"status: http://(\S+)", "\n".join(lines))
            if found is None:
                time.sleep(0.1)
                continue
            address = found.group(1)
        for path in ("/status", "/metrics"):
            try:
                bodies.append(httpx.get(f"http://{address}{path}", timeout=5).text)
            except httpx.HTTPError:
                pass
        time.sleep(0.3)
    return bodies


def test_no_secret_leaves_the_runner(sandbox: Sandbox, tmp_path: Path):
    assert all(is_secret_name(name) for name in [*REQUEST_SECRETS, *RUNNER_SECRETS])
    queue_requests(sandbox, tmp_path, "exp_secrets", seconds=2.5)
    env = runner_env(sandbox, STUDIO_RUNNER_LOCAL_STORAGE_ROOTS=str(sandbox.base))
    proc = subprocess.Popen([sys.executable, str(REPO / "runner.py"), "run", "--once"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:
        bodies = poll_while_running(proc, lines)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        reader.join(timeout=10)
    log = "".join(lines)

    # The experiment ran, received every secret, and failed as it meant to.
    output = sandbox.output_text("exp_secrets")
    assert f"received {expected_digest()}" in output, log[-5000:]
    assert "cannot log in with ****" in output and "DB_PWD=****" in output and "SHORT_PWD=****" in output
    assert "PLAIN_SETTING=visible-value-1" in output  # not everything is hidden
    assert "still here ****" in output

    statuses = [json.loads(body) for body in bodies if body.startswith("{")]
    tails = [line for doc in statuses for attempt in doc["running"] for line in attempt["output_tail"]]
    assert any("bare values:" in line for line in tails), "the output was never seen in /status"
    assert any("runner_experiments" in body for body in bodies), "no /metrics was read"
    reasons = [p.read_text() for p in sandbox.set_aside(QUEUE) if p.name.endswith(".reason.txt")]
    assert len(reasons) == 2 and any("/etc/****/passwd" in r for r in reasons), reasons
    documents = [p.read_text() for p in metadata_documents(sandbox.store)]
    experiments = [json.loads(doc).get("experiment", {}) for doc in documents]
    broker = "amqp://runner:****@127.0.0.1:5672/%2f"
    assert {"token": "****", "short": "****", "broker": broker} in experiments

    everything = {"runner log (text)": log, "output": output, "metadata": "\n".join(documents),
                  "/status and /metrics": "\n".join(bodies), "set-aside reasons": "\n".join(reasons)}
    for where, text in everything.items():
        assert leaks(text) == [], f"secrets in the {where}"

    # The same again, logged as JSON.
    queue_requests(sandbox, tmp_path, "exp_json", seconds=0.1)
    result = subprocess.run([sys.executable, str(REPO / "runner.py"), "run", "--once"], capture_output=True,
                            text=True, timeout=300, env={**env, "STUDIO_RUNNER_LOG_FORMAT": "json"})
    records: list[dict[str, Any]] = [json.loads(line) for line in result.stderr.splitlines()
                                     if line.startswith("{")]
    assert any("cannot log in with ****" in r["message"] for r in records), result.stderr[-3000:]
    assert leaks(result.stdout + result.stderr) == []
    assert leaks(read_member(sandbox.artifact("exp_json", "output"), "output")) == []
    reasons = [p.read_text() for p in sandbox.set_aside(QUEUE) if p.name.endswith(".reason.txt")]
    assert len(reasons) == 4 and leaks("\n".join(reasons)) == []
