"""No experiment lost, however long it runs and however the machine misbehaves (issue 6).

The real runner CLI in a subprocess, real experiment processes, the local queue, local storage or a real
S3-protocol server behind a TCP proxy that can cut every connection, and a real full filesystem (tmpfs).
Each test reproduces one defect found on the runner before this issue and checks the fixed behaviour.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from support.runner import Sandbox, metadata_documents
from support.s3server import S3Bucket, s3_bucket, s3_server  # noqa: F401

from studio_runner.resources import usable_cores
from studio_runner.submit import Submission, build_request, pack_workspace, submit

QUEUE = "local_faults"


def write_script(folder: Path, body: str, name: str = "main.py") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / name
    script.write_text(body)
    return script


def enqueue(box: Sandbox, script: Path, key: str, **kwargs: object) -> dict:
    return submit(Submission(script=script, queue=QUEUE, experiment=key, **kwargs),  # type: ignore[arg-type]
                  box.queue_root, box.store)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"the runner exited while waiting for {what}:\n{out[-4000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def outcome_of(box: Sandbox, key: str) -> list[dict]:
    docs = [json.loads(p.read_text()) for p in metadata_documents(box.store)]
    return [d["studioml"]["outcome"] for d in docs if d["studioml"]["experiment"]["key"] == key]


# --------------------------------------------------------------------------- item 1: long runs, kill -9


def test_a_60s_experiment_in_an_idle_runner_succeeds(sandbox: Sandbox, tmp_path: Path) -> None:
    """Trio's idle worker threads exit after ~10 s; the experiment must not die with the thread that
    forked it (it used to get SIGKILL at about 20 s and be reported as failed)."""
    script = write_script(tmp_path / "long", """\
import time
for n in range(12):
    print("tick", n, flush=True)
    time.sleep(5)
print("done after a minute")
""")
    enqueue(sandbox, script, "exp_minute")
    result = sandbox.run_once(timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    output = sandbox.output_text("exp_minute")
    assert "done after a minute" in output and "status -9" not in output
    assert [o["status"] for o in outcome_of(sandbox, "exp_minute")] == ["success"]


def test_kill_9_of_the_runner_ends_the_experiment_within_two_seconds(sandbox: Sandbox,
                                                                     tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    script = write_script(tmp_path / "sleeper", f"""\
import os, pathlib, time
pathlib.Path({str(pidfile)!r}).write_text(str(os.getpid()))
time.sleep(600)
""")
    enqueue(sandbox, script, "exp_orphan")
    runner = sandbox.start()
    try:
        wait_for(lambda: pidfile.exists() and pidfile.read_text(), 120, "the experiment to start", runner)
        time.sleep(15)  # past the worker threads' idle timeout, the old mechanism's failure point
        pid = int(pidfile.read_text())
        assert not gone(pid)
        runner.send_signal(signal.SIGKILL)
        runner.wait(10)
        killed_at = time.monotonic()
        wait_for(lambda: gone(pid), 5, "the experiment to end after its runner was killed")
        assert time.monotonic() - killed_at < 2.5
    finally:
        if runner.poll() is None:
            runner.kill()


def test_a_double_forked_daemon_does_not_outlive_its_experiment(sandbox: Sandbox, tmp_path: Path) -> None:
    pidfile = tmp_path / "daemon.pid"
    script = write_script(tmp_path / "daemon", f"""\
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        open({str(pidfile)!r}, "w").write(str(os.getpid()))
        time.sleep(600)
    os._exit(0)
time.sleep(1)
print("parent done")
""")
    enqueue(sandbox, script, "exp_daemon")
    result = sandbox.run_once()
    assert result.returncode == 0, result.stderr[-4000:]
    daemon = int(pidfile.read_text())
    wait_for(lambda: gone(daemon), 5, "the daemonised grandchild to be killed")


# --------------------------------------------------------------------------- item 2: who killed it


def test_a_signal_the_runner_did_not_send_is_the_experiments_result(sandbox: Sandbox, tmp_path: Path) -> None:
    script = write_script(tmp_path / "suicide", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    enqueue(sandbox, script, "exp_suicide")
    result = sandbox.run_once()
    assert result.returncode == 1
    assert "killed by SIGKILL, which the runner did not send" in sandbox.output_text("exp_suicide")
    assert [o["status"] for o in outcome_of(sandbox, "exp_suicide")] == ["failed"]
    assert sandbox.pending(QUEUE) == [] and sandbox.set_aside(QUEUE) == []  # a result: acknowledged


def test_sigterm_is_the_runners_doing_and_hands_the_message_back(sandbox: Sandbox, tmp_path: Path) -> None:
    marker = tmp_path / "started"
    script = write_script(tmp_path / "term", f"""\
import pathlib, time
pathlib.Path({str(marker)!r}).write_text("x")
time.sleep(120)
""")
    enqueue(sandbox, script, "exp_term")
    runner = sandbox.start()
    wait_for(marker.exists, 120, "the experiment to start", runner)
    runner.send_signal(signal.SIGTERM)
    out, _ = runner.communicate(timeout=60)
    assert runner.returncode == 0, out
    assert [o["status"] for o in outcome_of(sandbox, "exp_term")] == ["interrupted"]
    assert sandbox.pending(QUEUE), "the message must be back on its queue"
    assert "handed back for another attempt" in out


# --------------------------------------------------------------------------- item 3: stored work


def _store_modeldir(box: Sandbox, request: dict, data: bytes) -> Path:
    path = Path(request["experiment"]["artifacts"]["modeldir"]["qualified"].removeprefix("file:/"))
    path = Path("/" + str(path).lstrip("/"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _tar_bytes(files: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


@pytest.mark.parametrize("case", ["corrupt gzip", "plain file", "over budget"])
def test_a_failed_restore_never_replaces_the_stored_artifact(sandbox: Sandbox, tmp_path: Path,
                                                              case: str) -> None:
    marker = tmp_path / "ran"
    script = write_script(tmp_path / "restore", f"open({str(marker)!r}, 'w').write('ran')\n")
    hdd = "2g"
    if case == "corrupt gzip":
        data = _tar_bytes({"weights.bin": os.urandom(200_000)})[:50_000]
    elif case == "plain file":
        data = b"these are not the weights you are looking for\n" * 1000
    else:
        data = _tar_bytes({"weights.bin": os.urandom(3_000_000)}, mode="w")
        hdd = "1mb"
    request = enqueue(sandbox, script, f"exp_{case.replace(' ', '_')}", hdd=hdd)
    stored = _store_modeldir(sandbox, request, data)
    result = sandbox.run_once(STUDIO_RUNNER_RETRY_DELAY="0.1s")
    assert stored.read_bytes() == data, "the stored modeldir was overwritten"
    assert not marker.exists()
    key = request["experiment"]["key"]
    statuses = [o["status"] for o in outcome_of(sandbox, key)]
    assert statuses == ["failed"], (statuses, result.stderr[-3000:])  # deterministic: not retried
    assert "failed when downloading user data" in sandbox.output_text(key)


def test_sigterm_mid_download_leaves_the_stored_artifact_alone(sandbox: Sandbox, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    script = write_script(tmp_path / "big", f"open({str(marker)!r}, 'w').write('ran')\n")
    request = enqueue(sandbox, script, "exp_big_restore")
    data = _tar_bytes({f"part{n}.bin": os.urandom(1 << 20) for n in range(300)}, mode="w")
    stored = _store_modeldir(sandbox, request, data)
    before = stored.stat().st_mtime_ns
    runner = sandbox.start()
    try:
        def downloading() -> bool:
            return any(p.name == "object" for p in sandbox.work.rglob("object"))

        wait_for(downloading, 120, "the modeldir download to start", runner)
        runner.send_signal(signal.SIGTERM)
        out, _ = runner.communicate(timeout=60)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert stored.stat().st_mtime_ns == before and stored.read_bytes() == data
    assert not marker.exists(), "the download finished before the signal: the test proves nothing"
    assert sandbox.pending(QUEUE), out[-3000:]


# --------------------------------------------------------------------------- item 4: full disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs: a real filesystem that fills up."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.expected_skip("needs root to mount a tmpfs")
def test_a_full_disk_ends_the_attempt_not_the_runner(sandbox: Sandbox, tmp_path: Path,
                                                     small_disk: Path) -> None:
    filler = write_script(tmp_path / "fill", """\
import itertools
try:
    with open("big.bin", "wb") as f:
        while True:
            f.write(b"x" * (1 << 20))
except OSError as exc:
    print("the disk is full:", exc, flush=True)
for n in itertools.count():
    print("still printing", n, "x" * 200, flush=True)
""")
    fine = write_script(tmp_path / "fine", "print('the next experiment runs')\n")
    enqueue(sandbox, filler, "exp_fill", hdd="1mb")
    enqueue(sandbox, fine, "exp_fine", hdd="1mb")
    # one at a time: run beside the filler, the other experiment could meet the full disk too (and, when the
    # machine is slow, on both of its attempts); this test is about the filler's attempts
    result = sandbox.run_once(timeout=300, STUDIO_RUNNER_WORKING_DIR=str(small_disk),
                              STUDIO_RUNNER_DISK_RESERVE="1mb", STUDIO_RUNNER_MAX_RUNNING="1",
                              STUDIO_RUNNER_RETRY_DELAY="0.2s", STUDIO_RUNNER_MAX_ATTEMPTS="2")
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    assert sandbox.artifact("exp_fine", "output").exists(), result.stderr[-4000:]
    assert "the next experiment runs" in sandbox.output_text("exp_fine")
    statuses = [o["status"] for o in outcome_of(sandbox, "exp_fill")]
    assert statuses == ["fault", "fault"], (statuses, result.stderr[-4000:])
    assert "the disk is full" in sandbox.output_text("exp_fill")  # what it could, it uploaded
    reason = next(p for p in sandbox.set_aside(QUEUE) if p.name.endswith(".reason.txt")).read_text()
    assert "no space left" in reason and "gave up after 2 attempts" in reason
    assert not [p for p in small_disk.iterdir() if p.name.startswith("studio-runner-")]  # root removed


@pytest.mark.expected_skip("needs root to mount a tmpfs")
def test_work_that_does_not_fit_the_disk_is_not_taken(sandbox: Sandbox, tmp_path: Path,
                                                      small_disk: Path) -> None:
    """Bigger than the whole disk: never taken (and its queue skipped); bigger than what is free now, after
    another program filled the disk: released uncounted, the queue retried later."""
    script = write_script(tmp_path / "x", "print('should not run')\n")
    enqueue(sandbox, script, "exp_too_big", hdd="100mib")
    result = sandbox.run_once(STUDIO_RUNNER_WORKING_DIR=str(small_disk), STUDIO_RUNNER_DISK_RESERVE="1mb")
    assert "exp_too_big from local_faults can never run on this runner" in result.stderr
    assert "released (no attempt counted)" in result.stderr
    assert len(sandbox.pending(QUEUE)) == 1 and not sandbox.set_aside(QUEUE)
    assert outcome_of(sandbox, "exp_too_big") == []
    (small_disk / "filler").write_bytes(b"x" * (40 << 20))  # someone else's file
    for name in sandbox.pending(QUEUE):
        (sandbox.queue_root / QUEUE / name).unlink()
    enqueue(sandbox, script, "exp_not_now", hdd="30mib")
    result = sandbox.run_once(STUDIO_RUNNER_WORKING_DIR=str(small_disk), STUDIO_RUNNER_DISK_RESERVE="1mb")
    assert "exp_not_now from local_faults does not fit now (asks for 30 MiB of disk" in result.stderr
    assert len(sandbox.pending(QUEUE)) == 1 and outcome_of(sandbox, "exp_not_now") == []


# --------------------------------------------------------------------------- item 6: storage outages


@pytest.fixture
def read_only_store(sandbox: Sandbox) -> Iterator[Path]:
    """The sandbox's store on a tmpfs that is remounted read-only after the workspace was uploaded."""
    sandbox.store.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(sandbox.store)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); needs root")
    try:
        yield sandbox.store
    finally:
        subprocess.run(["umount", "-l", str(sandbox.store)], check=False)


@pytest.mark.expected_skip("needs root to mount a tmpfs")
def test_read_only_storage_backs_off_and_gives_every_attempt_its_own_id(
        sandbox: Sandbox, tmp_path: Path, read_only_store: Path) -> None:
    script = write_script(tmp_path / "ro", "print('ran')\n")
    enqueue(sandbox, script, "exp_read_only")
    subprocess.run(["mount", "-o", "remount,ro", str(read_only_store)], check=True)
    started = time.monotonic()
    result = sandbox.run_once(STUDIO_RUNNER_RETRY_DELAY="1s", STUDIO_RUNNER_RETRY_DELAY_MAX="10s",
                              STUDIO_RUNNER_UPLOAD_RETRY_WINDOW="2s", STUDIO_RUNNER_MAX_ATTEMPTS="3")
    log = result.stderr
    starts = re.findall(r"experiment exp_read_only from local \S+ \(attempt (\d)\) starting, "
                        r"attempt id (\S+)", log)
    assert [n for n, _ in starts] == ["1", "2", "3"], log[-4000:]
    assert len({attempt_id for _, attempt_id in starts}) == 3
    assert time.monotonic() - started > 1.5 + 3  # back-offs (>= 0.5 s, >= 1 s) and upload retry windows
    assert "handing it back in" in log and "gave up after 3 attempts" in log
    assert "results not saved" in log


class FlakyProxy:
    """A TCP proxy to a real server that can be told to reset every connection (``down = True``)."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.down = False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.resets = 0
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down:
                self.resets += 1
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                client.close()
                continue
            threading.Thread(target=self._pipe_pair, args=(client,), daemon=True).start()

    def _pipe_pair(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if self.down:
                    raise OSError("reset")
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self.listener.close()


def s3_submit(box: Sandbox, bucket: S3Bucket, endpoint: str, script: Path, key: str,
              **kwargs: object) -> dict:
    """Like ``studio run`` with S3 storage: the workspace in the bucket, every locator an s3:// URL."""
    client = bucket.server.client()
    staging = box.base / "staging"
    staging.mkdir(exist_ok=True)
    workspace_key = pack_workspace(script.resolve().parent, staging)
    client.upload_file(str(staging / workspace_key), bucket.name, workspace_key)
    request = build_request(Submission(script=script, queue=QUEUE, experiment=key, **kwargs),  # type: ignore[arg-type]
                            staging, workspace_key)
    creds = {"aws": {"access_key": bucket.credentials.access_key,
                     "secret_access_key": bucket.credentials.secret_key}}
    for artifact in request["experiment"]["artifacts"].values():
        artifact["qualified"] = f"s3://{endpoint}/{bucket.name}/{artifact['key']}"
        artifact["bucket"] = bucket.name
        artifact["credentials"] = creds
    qdir = box.queue_root / QUEUE
    qdir.mkdir(parents=True, exist_ok=True)
    (qdir / key).write_text(json.dumps(request))
    return request


def test_a_storage_outage_does_not_throw_finished_work_away(sandbox: Sandbox, tmp_path: Path,
                                                            s3_bucket: S3Bucket) -> None:  # noqa: F811
    """Every connection to S3 is reset for 20 s while several experiments (one per core, up to four) finish:
    their results are kept and uploaded once S3 answers again, without running anything twice."""
    proxy = FlakyProxy(s3_bucket.server.endpoint)
    release = tmp_path / "release"
    running = tmp_path / "running"
    running.mkdir()
    try:
        script = write_script(tmp_path / "quick", f"""\
import os, pathlib, time
pathlib.Path({str(running)!r}, os.environ["STUDIOML_EXPERIMENT"]).write_text("x")
while not pathlib.Path({str(release)!r}).exists():
    time.sleep(0.05)
print("finished while storage was down")
""")
        keys = [f"exp_outage_{n}" for n in range(min(4, usable_cores()))]
        for key in keys:
            s3_submit(sandbox, s3_bucket, proxy.endpoint, script, key)
        runner = sandbox.start(STUDIO_RUNNER_UPLOAD_RETRY_WINDOW="5m")
        try:
            wait_for(lambda: len(list(running.iterdir())) == len(keys), 120, "the experiments to run", runner)
            proxy.down = True
            release.write_text("go")
            time.sleep(20)
            assert proxy.resets > 0
            proxy.down = False
            client = s3_bucket.server.client()

            def uploaded() -> bool:
                names = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket.name).get("Contents", [])}
                return all(f"experiments/{key}/output.tar" in names for key in keys)

            wait_for(uploaded, 180, "the results to be uploaded after the outage", runner)
            wait_for(lambda: not sandbox.pending(QUEUE) and not list(
                (sandbox.queue_root / ".inflight").rglob("*~*")), 60, "the acknowledgements", runner)
        finally:
            runner.send_signal(signal.SIGTERM)
            out, _ = runner.communicate(timeout=60)
        for key in keys:
            assert out.count(f"experiment {key} from local") == 1, out[-4000:]  # ran once, never re-run
        assert "cannot save results" in out and "takes uploads again" in out
        assert not sandbox.set_aside(QUEUE)
    finally:
        proxy.close()


# --------------------------------------------------------------------------- item 7: the runner's secrets


def test_the_runners_secrets_never_reach_experiments(sandbox: Sandbox, tmp_path: Path) -> None:
    script = write_script(tmp_path / "env", """\
import os
print("aws", os.environ.get("AWS_SECRET_ACCESS_KEY"))
print("gh", os.environ.get("GITHUB_TOKEN"))
print("home", bool(os.environ.get("HOME")), "path", bool(os.environ.get("PATH")))
print("echo the-runners-own-secret-value ghp_notreallyatoken1234")
""")
    enqueue(sandbox, script, "exp_env")
    result = sandbox.run_once(AWS_SECRET_ACCESS_KEY="the-runners-own-secret-value",
                              GITHUB_TOKEN="ghp_notreallyatoken1234")
    output = sandbox.output_text("exp_env")
    assert "aws None" in output and "gh None" in output and "home True path True" in output
    assert "the-runners-own-secret-value" not in output and "ghp_notreallyatoken1234" not in output
    assert "echo **** ****" in output  # masked like any other secret
    assert "the-runners-own-secret-value" not in result.stderr  # the debug log is masked too
    assert "ghp_notreallyatoken1234" not in result.stderr
    shutil.rmtree(sandbox.work, ignore_errors=True)
