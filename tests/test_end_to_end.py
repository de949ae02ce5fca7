"""The whole runner as a user runs it: the real CLI in a subprocess, the local queue, local storage, real
virtualenvs and real experiment processes."""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from support.runner import Sandbox, metadata_documents, read_member

from studio_runner.submit import Submission, submit


def write_script(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / name
    script.write_text(textwrap.dedent(body))
    return script


def queue(box: Sandbox, script: Path, key: str, **kwargs) -> dict:
    return submit(Submission(script=script, queue="local_e2e", experiment=key, **kwargs),
                  box.queue_root, box.store)


def test_success_failure_and_metadata(sandbox: Sandbox, tmp_path):
    ok = write_script(tmp_path / "ok", "train.py", """\
        import json, os, sys
        print("args", sys.argv[1:])
        print(json.dumps({"experiment": {"name": "trial-3", "epochs": 10}}))
        print(json.dumps([{"op": "replace", "path": "/experiment/epochs", "value": 12}]))
        print(json.dumps({"experiment": {"accuracy": 0.97}}))
        print("secret is", os.environ["MY_TOKEN"])
        print("expanded", os.environ["RUNNER_API_TOKEN"])
        print("cuda", repr(os.environ["CUDA_VISIBLE_DEVICES"]), os.environ["STUDIOML_EXPERIMENT"])
        os.makedirs("../modeldir/sub", exist_ok=True)
        open("../modeldir/sub/weights.txt", "w").write("42")
        """)
    bad = write_script(tmp_path / "bad", "fails.py", """\
        import sys
        print("before the failure")
        print("to stderr", file=sys.stderr)
        raise ValueError("broken on purpose")
        """)
    queue(sandbox, ok, "exp_ok", args=["a b", "it's"],
          env={"MY_TOKEN": "tok-very-secret-123", "RUNNER_API_TOKEN": "%HOST_SIDE_TOKEN%"})
    queue(sandbox, bad, "exp_bad")
    result = sandbox.run_once(HOST_SIDE_TOKEN="from-the-runner-env-456")
    assert result.returncode == 1, result.stdout + result.stderr  # one experiment failed

    output = sandbox.output_text("exp_ok")
    assert "args ['a b', \"it's\"]" in output  # shell-quoted args are split back exactly
    assert "tok-very-secret-123" not in output and "secret is ****" in output
    assert "from-the-runner-env-456" not in output and "expanded ****" in output
    assert "cuda ''" in output
    modeldir = sandbox.artifact("exp_ok", "modeldir")
    assert read_member(modeldir, "sub/weights.txt") == "42"

    docs = {json.loads(p.read_text())["studioml"]["experiment"]["key"]: json.loads(p.read_text())
            for p in metadata_documents(sandbox.store)}
    doc = docs["exp_ok"]
    assert doc["experiment"] == {"name": "trial-3", "epochs": 12, "accuracy": 0.97}
    messages = [entry["msg"] for entry in doc["studioml"]["log"]]
    assert messages[:2] == ["Init", ""] and "Start" in messages and messages[-1] == "Stop"
    assert messages.index("Start") < messages.index("secret is ****") < messages.index("Stop")
    assert doc["studioml"]["outcome"]["status"] == "success"
    assert "tok-very-secret-123" not in json.dumps(doc)

    failed = sandbox.output_text("exp_bad")
    assert "before the failure" in failed and "to stderr" in failed
    assert "Traceback" in failed and "ValueError: broken on purpose" in failed
    assert docs["exp_bad"]["studioml"]["outcome"]["status"] == "failed"
    assert sandbox.pending("local_e2e") == [] and sandbox.set_aside("local_e2e") == []
    assert "tok-very-secret-123" not in result.stdout + result.stderr


def test_timeout_kills_the_whole_process_tree(sandbox: Sandbox, tmp_path):
    script = write_script(tmp_path / "slow", "slow.py", """\
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        grandchild_cmd = "import os, time; os.setsid(); time.sleep(300)"
        escaped = subprocess.Popen([sys.executable, "-c", grandchild_cmd])
        print("pids", child.pid, escaped.pid, flush=True)
        time.sleep(300)
        """)
    queue(sandbox, script, "exp_slow", max_duration="2s")
    started = time.monotonic()
    result = sandbox.run_once()
    assert time.monotonic() - started < 60
    output = sandbox.output_text("exp_slow")
    assert "timeout: stopped after" in output and "max_duration" in output
    pids = [int(p) for p in output.split("pids ", 1)[1].split()[:2]]
    time.sleep(0.5)
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid
    assert sandbox.pending("local_e2e") == []
    assert result.returncode == 1


def test_malformed_message_is_set_aside_and_the_next_runs(sandbox: Sandbox, tmp_path):
    script = write_script(tmp_path / "ok", "ok.py", "print('good message ran')\n")
    qdir = sandbox.queue_root / "local_e2e"
    qdir.mkdir(parents=True)
    (qdir / "garbage").write_text('{"experiment": {"key": 12, "secret_access_key": "SHOULD-NOT-LEAK"}}')
    old = time.time() - 60
    os.utime(qdir / "garbage", (old, old))
    queue(sandbox, script, "exp_after_garbage")
    result = sandbox.run_once()
    assert "good message ran" in sandbox.output_text("exp_after_garbage")
    aside = sandbox.set_aside("local_e2e")
    assert [p.name for p in aside if not p.name.endswith(".txt")] == ["garbage"]
    reason = next(p for p in aside if p.name.endswith(".reason.txt")).read_text()
    assert "experiment.key" in reason
    assert "SHOULD-NOT-LEAK" not in reason and "SHOULD-NOT-LEAK" not in result.stderr
    assert sandbox.pending("local_e2e") == []


def test_kill_9_mid_experiment_then_another_runner_completes_it(sandbox: Sandbox, tmp_path):
    marker = tmp_path / "started"
    script = write_script(tmp_path / "long", "long.py", f"""\
        import pathlib, time
        print("working", flush=True)
        pathlib.Path({str(marker)!r}).write_text("x")
        time.sleep(4)
        print("finished the work")
        """)
    queue(sandbox, script, "exp_crash")
    first = sandbox.start()
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert first.poll() is None, first.stdout.read() if first.stdout else ""
            assert time.monotonic() < deadline, "the first runner never started the experiment"
            time.sleep(0.05)
        experiment_pids = [p.pid for p in psutil.Process(first.pid).children(recursive=True)]
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    time.sleep(0.3)
    assert all(not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
               for pid in experiment_pids), "the experiment outlived its runner"
    second = sandbox.run_once()
    assert second.returncode == 0, second.stdout + second.stderr
    output = sandbox.output_text("exp_crash")
    assert "finished the work" in output
    assert "attempt 2" in output
    assert sandbox.pending("local_e2e") == []


def test_sigterm_hands_the_running_experiment_back(sandbox: Sandbox, tmp_path):
    marker = tmp_path / "started"
    script = write_script(tmp_path / "long", "long.py", f"""\
        import os, pathlib, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        pathlib.Path({str(marker)!r} + ".tmp").write_text(f"{{os.getpid()}} {{child.pid}}")
        os.rename({str(marker)!r} + ".tmp", {str(marker)!r})
        print("started", flush=True)
        time.sleep(120)
        """)
    queue(sandbox, script, "exp_term")
    runner = sandbox.start()
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert runner.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    pids = [int(p) for p in marker.read_text().split()]
    signalled = time.monotonic()
    runner.send_signal(signal.SIGTERM)
    out, _ = runner.communicate(timeout=60)
    assert runner.returncode == 0, out
    # the grace period is 2 s: stopping, the final upload and the hand-back take a few seconds, not minutes
    assert time.monotonic() - signalled < 20, out
    for pid in pids:  # the experiment and its own child are gone, not orphaned
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid
    assert sandbox.pending("local_e2e"), "the message must be back on its queue"
    assert "started" in sandbox.output_text("exp_term")  # output so far was uploaded


def test_expired_request_is_set_aside_without_running(sandbox: Sandbox, tmp_path):
    marker = tmp_path / "ran"
    script = write_script(tmp_path / "x", "x.py", f"open({str(marker)!r}, 'w').write('ran')\n")
    request = queue(sandbox, script, "exp_expired", lifetime="1s")
    assert request["config"]["experimentLifetime"] == "1s"
    time.sleep(1.2)
    sandbox.run_once()
    assert not marker.exists()
    assert [p.name for p in sandbox.set_aside("local_e2e") if p.suffix != ".txt"]


@pytest.mark.slow
def test_demo_command(tmp_path):
    """The README's first command ends with the demo's four experiments in their expected states."""
    import subprocess
    import sys

    from support.runner import REPO
    from support.studioml_client import cache_root

    env = dict(os.environ, PYTHONPATH=str(REPO), STUDIO_RUNNER_ENV_CACHE_DIR=str(cache_root() / "envs"))
    result = subprocess.run([sys.executable, str(REPO / "runner.py"), "demo", "--demo-dir", str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all experiments ended as expected" in result.stdout
    for name, status in [("metadata", "success"), ("pythonenv", "success"), ("fails", "failed"),
                         ("timeout", "timeout")]:
        assert any(line.startswith(f"demo_{name} ") and f" {status} " in line
                   for line in result.stdout.splitlines()), (name, result.stdout)
    store = tmp_path / "storage" / "studioml"
    fails = read_member(store / "experiments" / "demo_fails" / "output.tar", "output")
    assert "ValueError: this experiment fails on purpose" in fails
    docs = [json.loads(p.read_text()) for p in metadata_documents(store)]
    train = next(d for d in docs if d["studioml"]["experiment"]["key"] == "demo_metadata")
    assert train["experiment"]["epoch"] == 3 and train["experiment"]["finished"] is True


def test_artifact_cache_serves_the_second_experiment(sandbox: Sandbox, tmp_path):
    script = write_script(tmp_path / "same", "same.py", "print('from the cached workspace')\n")
    queue(sandbox, script, "exp_cache_1")
    queue(sandbox, script, "exp_cache_2")  # same directory: the same content-addressed workspace blob
    cache = tmp_path / "artifact-cache"
    result = sandbox.run_once(STUDIO_RUNNER_CACHE_DIR=str(cache), STUDIO_RUNNER_CACHE_SIZE="1GiB")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("artifact cache hit") == 1
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1
    for key in ("exp_cache_1", "exp_cache_2"):
        assert "from the cached workspace" in sandbox.output_text(key)


def test_missing_workspace_is_retried_then_set_aside(sandbox: Sandbox, tmp_path):
    script = write_script(tmp_path / "gone", "gone.py", "print('never runs')\n")
    request = queue(sandbox, script, "exp_missing_input")
    workspace = request["experiment"]["artifacts"]["workspace"]["qualified"]
    Path(workspace.removeprefix("file://")).unlink()  # the input vanished from storage
    result = sandbox.run_once(STUDIO_RUNNER_MAX_ATTEMPTS="3")
    assert result.stderr.count("experiment exp_missing_input from local local_e2e (attempt") == 3
    aside = sandbox.set_aside("local_e2e")
    reason = next(p for p in aside if p.name.endswith(".reason.txt")).read_text()
    assert "not found" in reason and "gave up after 3 attempts" in reason
    output = sandbox.output_text("exp_missing_input")
    assert "failed when downloading user data" in output and "never runs" not in output
    assert sandbox.pending("local_e2e") == []


def test_checkpoints_upload_output_while_the_experiment_runs(sandbox: Sandbox, tmp_path):
    release = tmp_path / "release"
    script = write_script(tmp_path / "ckpt", "ckpt.py", f"""\
        import os, pathlib, time
        print("first half", flush=True)
        os.makedirs("../modeldir", exist_ok=True)
        pathlib.Path("../modeldir/epoch1.txt").write_text("1")
        while not pathlib.Path({str(release)!r}).exists():
            time.sleep(0.05)
        print("second half")
        """)
    queue(sandbox, script, "exp_ckpt", save_workspace_frequency="1s")
    runner = sandbox.start(STUDIO_RUNNER_MIN_CHECKPOINT_INTERVAL="1s")
    try:
        output_tar = sandbox.artifact("exp_ckpt", "output")
        deadline = time.monotonic() + 120
        while not (output_tar.exists() and "first half" in sandbox.output_text("exp_ckpt")):
            assert runner.poll() is None and time.monotonic() < deadline, "no checkpoint while running"
            time.sleep(0.1)
        assert "second half" not in sandbox.output_text("exp_ckpt")  # uploaded mid-run
        assert read_member(sandbox.artifact("exp_ckpt", "modeldir"), "epoch1.txt") == "1"
        release.write_text("go")
        while "second half" not in sandbox.output_text("exp_ckpt"):
            assert runner.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        release.write_text("go")
        runner.terminate()
        runner.communicate(timeout=60)


def test_a_queue_created_after_start_is_served(sandbox: Sandbox, tmp_path):
    runner = sandbox.start(STUDIO_RUNNER_RESCAN_INTERVAL="1s")
    try:
        time.sleep(1.0)  # the runner has listed the (empty) queue root by now
        script = write_script(tmp_path / "late", "late.py", "print('late queue served')\n")
        submit(Submission(script=script, queue="local_late", experiment="exp_late"), sandbox.queue_root,
               sandbox.store)
        deadline = time.monotonic() + 60
        while not sandbox.artifact("exp_late", "output").exists():
            assert runner.poll() is None and time.monotonic() < deadline, "the new queue was not served"
            time.sleep(0.1)
        assert "late queue served" in sandbox.output_text("exp_late")
    finally:
        runner.terminate()
        runner.communicate(timeout=60)
