"""The whole runner against the real Pub/Sub emulator: the CLI (``runner.py run``) as a subprocess.

Requests are published the way StudioML's Pub/Sub client does (the JSON request as the message data, on a
topic with a subscription of the same name); the runner is told ``PUBSUB_EMULATOR_HOST`` (inherited) and
``STUDIO_RUNNER_PUBSUB_PROJECT`` or ``STUDIO_RUNNER_CERTS_DIR``. The checks are what an experimenter sees: the
output in storage (local ``file://`` or GCS), the subscription empty afterwards, a subscription that does not
match untouched (its message's ``delivery_attempt`` is still 1), credentials added and removed at run time.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import tarfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from support.gcs_emulator import GcsBucket, gcs_bucket, gcs_emulator  # noqa: F401
from support.pubsub_emulator import NEEDS, PubSubEmulator, pubsub_emulator_fixture  # noqa: F401
from support.runner import Sandbox

from studio_runner.submit import Submission, build_request, pack_workspace

pytestmark = [pytest.mark.slow, pytest.mark.expected_skip(NEEDS)]

WAIT = 120.0
LEASE = 30.0
"""The runner's Pub/Sub lease (PubSubQueue's default): a killed runner's message is back after this."""
WATCH_WINDOW = 10.0
"""The longest pull of an idle runner (PubSubQueue's default)."""


def write_script(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "main.py"
    script.write_text(body)
    return script


def request_bytes(box: Sandbox, script: Path, queue: str, key: str) -> bytes:
    workspace_key = pack_workspace(script.resolve().parent, box.store)
    request = build_request(Submission(script=script, queue=queue, experiment=key), box.store, workspace_key)
    return json.dumps(request).encode()


def wait_for(predicate: Any, timeout: float, what: str, proc: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"the runner exited while waiting for {what}:\n{out[-4000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM, wait, and return the runner's output (for failure messages)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


def waiting_attempts(em: PubSubEmulator, name: str, project: str | None = None) -> list[int]:
    """delivery_attempt of every message waiting in ``name`` (handed straight back): 1 = never pulled."""
    _, subscriber = em.clients()
    path = em.subscription(name, project)
    request = {"subscription": path, "max_messages": 100, "return_immediately": True}
    received = subscriber.pull(request=request, timeout=10).received_messages
    found = [r.delivery_attempt for r in received]
    if received:
        subscriber.modify_ack_deadline(subscription=path, ack_ids=[r.ack_id for r in received],
                                       ack_deadline_seconds=0)
    return found


def runner_env(**extra: str) -> dict[str, str]:
    return dict(STUDIO_RUNNER_QUEUE_MATCH="^pubsub_", STUDIO_RUNNER_RESCAN_INTERVAL="1s", **extra)


def test_an_experiment_on_a_matching_subscription_runs_and_its_message_is_gone(
        pubsub_emulator: PubSubEmulator, sandbox: Sandbox, tmp_path: Path) -> None:
    em = pubsub_emulator
    name, other = em.unique("pubsub_run"), em.unique("other_run")
    em.create(name)
    em.create(other)
    script = write_script(tmp_path / "exp", "print('hello from pubsub')\n")
    em.publish(name, request_bytes(sandbox, script, name, "pubsub-exp-1"))
    em.publish(other, request_bytes(sandbox, script, other, "pubsub-not-mine"))
    proc = sandbox.start(**runner_env(STUDIO_RUNNER_PUBSUB_PROJECT=em.project))
    try:
        wait_for(lambda: sandbox.artifact("pubsub-exp-1", "output").exists(), WAIT, "the output", proc)
        wait_for(lambda: "hello from pubsub" in sandbox.output_text("pubsub-exp-1"), 30, "complete output",
                 proc)
        time.sleep(2)  # the ack follows the final upload
    finally:
        out = stop(proc)
    assert waiting_attempts(em, name) == [], out[-3000:]  # acked: nothing came back when the runner left
    assert waiting_attempts(em, other) == [1]  # never pulled by anyone
    assert not sandbox.artifact("pubsub-not-mine", "output").exists()


def test_a_runner_killed_mid_experiment_lets_another_finish_it(
        pubsub_emulator: PubSubEmulator, sandbox: Sandbox, tmp_path: Path) -> None:
    em = pubsub_emulator
    name = em.unique("pubsub_kill")
    em.create(name)
    marker = tmp_path / "started"
    script = write_script(tmp_path / "exp", f"""
import os, time
from pathlib import Path
Path({str(marker)!r}).mkdir(exist_ok=True)
(Path({str(marker)!r}) / str(os.getpid())).touch()
time.sleep(4)
print('finished after a crash')
""")
    em.publish(name, request_bytes(sandbox, script, name, "pubsub-kill-1"))
    env = runner_env(STUDIO_RUNNER_PUBSUB_PROJECT=em.project)
    first = sandbox.start(**env)
    try:
        wait_for(lambda: marker.exists() and any(marker.iterdir()), WAIT, "the experiment to start", first)
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.communicate(timeout=30)
    killed_at = time.monotonic()
    second = sandbox.start(**env)
    try:
        wait_for(lambda: "finished after a crash" in (sandbox.output_text("pubsub-kill-1")
                                                      if sandbox.artifact("pubsub-kill-1", "output").exists()
                                                      else ""), LEASE + WAIT, "the second runner", second)
        assert time.monotonic() - killed_at > 5  # it waited for the dead runner's lease, not less
        assert len(list(marker.iterdir())) == 2  # started twice: once per runner
        time.sleep(2)
    finally:
        out = stop(second)
    assert waiting_attempts(em, name) == [], out[-3000:]


def test_credentials_added_and_removed_at_run_time_start_and_stop_new_work(
        pubsub_emulator: PubSubEmulator, sandbox: Sandbox, tmp_path: Path) -> None:
    em = pubsub_emulator
    project = f"proj-{uuid.uuid4().hex[:8]}"
    name = em.unique("pubsub_certs")
    em.create(name, project=project)
    certs = tmp_path / "certs"
    certs.mkdir()
    script = write_script(tmp_path / "exp", "print('served through a credentials file')\n")
    em.publish(name, request_bytes(sandbox, script, name, "pubsub-certs-1"), project=project)
    proc = sandbox.start(**runner_env(STUDIO_RUNNER_CERTS_DIR=str(certs)))
    try:
        time.sleep(4)  # several rescans without the file: nothing of that project is touched
        assert waiting_attempts(em, name, project) == [1]
        (certs / "team.json").write_text(json.dumps({"type": "service_account", "project_id": project}))
        added = time.monotonic()
        wait_for(lambda: sandbox.artifact("pubsub-certs-1", "output").exists(), WAIT, "the output", proc)
        assert time.monotonic() - added < 60
        time.sleep(2)
        (certs / "team.json").unlink()
        time.sleep(3 + WATCH_WINDOW)  # the next rescan drops the project; long pulls begun before it end
        em.publish(name, request_bytes(sandbox, script, name, "pubsub-certs-2"), project=project)
        time.sleep(5)
        assert not sandbox.artifact("pubsub-certs-2", "output").exists()
    finally:
        out = stop(proc)
    assert "served through a credentials file" in sandbox.output_text("pubsub-certs-1"), out[-3000:]
    assert waiting_attempts(em, name, project) == [1], out[-3000:]  # the second one was never pulled


def test_end_to_end_the_output_of_a_pubsub_experiment_lands_in_gcs(
        pubsub_emulator: PubSubEmulator, sandbox: Sandbox, tmp_path: Path,
        gcs_bucket: GcsBucket) -> None:  # noqa: F811
    em = pubsub_emulator
    name = em.unique("pubsub_gcs")
    em.create(name)
    script = write_script(tmp_path / "exp", "print('to google cloud storage')\n")
    staging = tmp_path / "staging"
    workspace_key = pack_workspace(script.resolve().parent, staging)
    gcs_bucket.bucket().blob(workspace_key).upload_from_filename(str(staging / workspace_key))
    request = build_request(Submission(script=script, queue=name, experiment="pubsub-gcs-1"), staging,
                            workspace_key)
    for artifact in request["experiment"]["artifacts"].values():
        artifact["qualified"] = gcs_bucket.url(artifact["key"])
        artifact["bucket"] = gcs_bucket.name
    storage = {"type": "gs", "bucket": gcs_bucket.name}
    request["config"].update(storage=storage, database=dict(storage, bucket=f"{gcs_bucket.name}-db"))
    em.publish(name, json.dumps(request).encode())
    blob = gcs_bucket.bucket().blob("experiments/pubsub-gcs-1/output.tar")
    proc = sandbox.start(**runner_env(STUDIO_RUNNER_PUBSUB_PROJECT=em.project,
                                      STORAGE_EMULATOR_HOST=gcs_bucket.emulator.host))
    try:
        wait_for(blob.exists, WAIT, "the output in GCS", proc)
        time.sleep(2)
    finally:
        out = stop(proc)
    with tarfile.open(fileobj=io.BytesIO(blob.download_as_bytes())) as tar:
        handle = tar.extractfile("output")
        assert handle is not None
        assert "to google cloud storage" in handle.read().decode(), out[-3000:]
    assert waiting_attempts(em, name) == [], out[-3000:]
