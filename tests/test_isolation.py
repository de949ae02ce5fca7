"""``--isolate bwrap``: experiments in a bubblewrap sandbox: real bwrap, real processes and the real runner.

Where bwrap cannot build its sandbox (not installed, user namespaces off), the sandbox tests skip with the
reason; ``.ci/run`` installs bubblewrap, and as root (CI's containers) it works without user namespaces.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest
import trio
from support.runner import Sandbox, metadata_documents, read_member

from studio_runner import isolation, process
from studio_runner.errors import ConfigError
from studio_runner.submit import Submission, submit


@functools.cache
def _bwrap_problem() -> str:
    """Why bwrap cannot isolate here ('' when it can)."""
    if not process.REAPER_AVAILABLE:
        return "isolation needs Linux"
    try:
        isolation.check("bwrap")
    except ConfigError as exc:
        return str(exc)
    return ""


skip_without_bwrap = pytest.mark.skipif(bool(_bwrap_problem()),
                                        reason=f"bwrap cannot create namespaces here: {_bwrap_problem()}")
may_skip = pytest.mark.expected_skip("bwrap cannot create namespaces here (no bwrap, or no user namespaces)")


# -- the wrapper's shape: no bwrap needed ------------------------------------------------------------------


def test_none_means_no_wrapper_and_no_check(tmp_path: Path):
    isolation.check("none")
    assert isolation.wrapper("none", tmp_path, tmp_path, tmp_path, Path(sys.executable), {}) == []


def test_missing_bwrap_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    with pytest.raises(ConfigError, match="bwrap is not installed"):
        isolation.check("bwrap")
    with pytest.raises(ConfigError, match="bwrap"):
        isolation.wrapper("bwrap", tmp_path, tmp_path, tmp_path, Path(sys.executable), {})
    with pytest.raises(ConfigError, match="expected one of"):
        isolation.check("docker")


def test_broken_bwrap_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    fake = tmp_path / "bwrap"  # a bwrap that cannot create namespaces, as in a locked-down container
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="No permissions to creating new namespace"):
        isolation.check("bwrap")


def test_wrapper_binds_only_what_the_experiment_needs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    fake = tmp_path / "bin" / "bwrap"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    expdir, venv = tmp_path / "work" / "exp1", Path(sys.prefix)
    expdir.mkdir(parents=True)
    args = isolation.wrapper("bwrap", expdir, expdir / "workspace", venv, Path(sys.executable),
                             {"HOME": "/home/someone", "CUDA_VISIBLE_DEVICES": ""})
    assert args[0] == str(fake) and args[-3:] == ["--chdir", str(expdir / "workspace"), "--"]
    triples = {(args[i], args[i + 1], args[i + 2]) for i in range(len(args) - 2)}
    assert ("--bind", str(expdir), str(expdir)) in triples  # writable
    assert ("--ro-bind", str(venv), str(venv)) in triples  # read-only
    assert ("--bind", str(expdir / "_runner" / "home"), "/home/someone") in triples
    assert (expdir / "_runner" / "home").is_dir()
    for flag in ("--unshare-pid", "--die-with-parent", "--new-session", "--proc"):
        assert flag in args
    assert "--unshare-net" not in args  # experiments download their data
    assert "--dev-bind-try" not in args  # no GPU given: no device node
    binds = [args[i + 1] for i, word in enumerate(args) if word in ("--bind", "--ro-bind", "--ro-bind-try")]
    assert "/" not in binds and str(Path.home()) not in binds and str(tmp_path) not in binds
    assert "/etc" not in binds and "/etc/resolv.conf" in binds  # a subset of /etc, never all of it


# -- real processes in the sandbox ----------------------------------------------------------------------

PROBE = """
import json, os, sys
planted = sys.argv[1:]
report = {"visible": [p for p in planted if os.path.exists(p)], "cwd": os.getcwd(),
          "siblings": sorted(os.listdir("..")), "above": os.listdir("../.."),
          "procs": sorted(int(p) for p in os.listdir("/proc") if p.isdigit())}
open("written.txt", "w").write("from the sandbox")
try:
    open(os.path.join(sys.prefix, "planted-by-experiment"), "w")
    report["env"] = "writable"
except OSError as exc:
    report["env"] = exc.errno
print(json.dumps(report), flush=True)
"""


async def _run(argv: list[str], cwd: Path, env: dict[str, str], wrapper: list[str]) -> tuple[int, str]:
    proc = await process.start(argv, cwd, env, wrapper=wrapper)
    data = bytearray()
    while chunk := await proc.stdout.receive_some(65536):
        data += chunk
    return await proc.wait(), data.decode()


@skip_without_bwrap
@may_skip
def test_sandbox_hides_the_file_system_and_keeps_the_env_read_only(tmp_path: Path):
    expdir = tmp_path / "work" / "exp1"
    (expdir / "workspace").mkdir(parents=True)
    secrets = [tmp_path / "home" / "secret.txt", tmp_path / "work" / "exp2" / "secret.txt",
               tmp_path / "queue" / "secret.txt"]
    for path in secrets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("secret")
    host_tmp = Path("/tmp") / f"host-tmp-{uuid.uuid4().hex}"
    host_tmp.mkdir()
    secrets.append(host_tmp)
    venv = Path(sys.prefix)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home")}
    wrapper = isolation.wrapper("bwrap", expdir, expdir / "workspace", venv, Path(sys.executable), env)
    code, out = trio.run(_run, [sys.executable, "-c", PROBE, *map(str, secrets)], expdir / "workspace", env,
                         wrapper)
    assert code == 0, out
    report = json.loads(out.strip().splitlines()[-1])
    assert report["visible"] == [] and all(p.exists() for p in secrets)
    assert report["cwd"] == str(expdir / "workspace")
    assert report["siblings"] == ["_runner", "workspace"] and report["above"] == ["exp1"]  # not exp2
    host_tmp.rmdir()
    assert report["env"] == 30  # EROFS
    assert not (venv / "planted-by-experiment").exists()
    assert os.getpid() not in report["procs"] and max(report["procs"]) < 50  # its own PID namespace
    assert (expdir / "workspace" / "written.txt").read_text() == "from the sandbox"


@skip_without_bwrap
@may_skip
def test_exit_statuses_come_through_the_sandbox(tmp_path: Path):
    (tmp_path / "workspace").mkdir()
    env = {"PATH": "/usr/bin:/bin"}
    wrapper = isolation.wrapper("bwrap", tmp_path, tmp_path / "workspace", Path(sys.prefix),
                                Path(sys.executable), env)
    for body, expected in (("raise SystemExit(7)", 7), ("import os; os.kill(os.getpid(), 9)", -9),
                           ("pass", 0)):
        code, out = trio.run(_run, [sys.executable, "-c", body], tmp_path / "workspace", env, wrapper)
        assert code == expected, out
    code, out = trio.run(_run, ["/no/such/program"], tmp_path / "workspace", env, wrapper)
    assert code != 0 and "/no/such/program" in out  # bwrap's own message, in the experiment's output


def _with_token(token: str) -> list[psutil.Process]:
    found = []
    for candidate in psutil.process_iter(["cmdline", "status"]):
        if token in " ".join(candidate.info["cmdline"] or ()) and candidate.info["status"] != "zombie":
            found.append(candidate)
    return found


TREE = """
import os, signal, subprocess, sys, time
token = sys.argv[1]
signal.signal(signal.SIGTERM, lambda *a: print("graceful", flush=True) or sys.exit(3))
subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                  "time.sleep(300)", token])
subprocess.Popen([sys.executable, "-c", "import os, time; os.setsid(); time.sleep(300)", token])
if os.fork() == 0:  # a double-fork daemon
    if os.fork() == 0:
        os.setsid(); time.sleep(300)
    os._exit(0)
print("ready", flush=True)
time.sleep(300)
"""


@skip_without_bwrap
@may_skip
def test_stop_is_graceful_then_kills_the_whole_sandboxed_tree(tmp_path: Path):
    (tmp_path / "workspace").mkdir()
    env = {"PATH": "/usr/bin:/bin"}
    wrapper = isolation.wrapper("bwrap", tmp_path, tmp_path / "workspace", Path(sys.prefix),
                                Path(sys.executable), env)
    token = f"tree-{uuid.uuid4().hex}"

    async def main() -> tuple[int, str]:
        proc = await process.start([sys.executable, "-c", TREE, token], tmp_path / "workspace", env,
                                   wrapper=wrapper)
        data = b""
        with trio.fail_after(30):
            while b"ready" not in data:
                data += await proc.stdout.receive_some(65536)
            while len(_with_token(token)) < 4:  # main, two children, the daemon
                await trio.sleep(0.05)
        await proc.stop(grace=1.0)
        while chunk := await proc.stdout.receive_some(65536):
            data += chunk
        return await proc.wait(), data.decode()

    code, out = trio.run(main)
    assert "graceful" in out and code == 3, out  # SIGTERM reached the experiment, not bwrap first
    deadline = time.monotonic() + 10
    while _with_token(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _with_token(token) == []


# -- the real runner ------------------------------------------------------------------------------------


def _script(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.py"
    path.write_text(textwrap.dedent(body))
    return path


@skip_without_bwrap
@may_skip
def test_runner_runs_experiments_isolated(sandbox: Sandbox, tmp_path: Path):
    home = tmp_path / "runner-home"
    home.mkdir()
    (home / "secret.txt").write_text("runner's secret")
    other = sandbox.work / "another-experiment"
    other.mkdir(parents=True)
    (other / "secret.txt").write_text("another experiment's data")
    planted = [home / "secret.txt", other / "secret.txt", sandbox.queue_root, sandbox.store]
    script = _script(tmp_path / "exp", """\
        import json, os, sys
        planted = json.loads(sys.argv[1])
        print("visible", json.dumps([p for p in planted if os.path.exists(p)]))
        try:
            open(os.path.join(sys.prefix, "x"), "w")
            print("env writable")
        except OSError as exc:
            print("env errno", exc.errno)
        os.makedirs("../modeldir", exist_ok=True)
        open("../modeldir/weights.txt", "w").write("42")
        os.makedirs(os.path.expanduser("~/.cache"), exist_ok=True)  # HOME is writable, backed by the expdir
        print("done")
        """)
    submit(Submission(script=script, queue="local_iso", experiment="exp_iso",
                      args=[json.dumps([str(p) for p in planted])]), sandbox.queue_root, sandbox.store)
    result = sandbox.run_once(STUDIO_RUNNER_ISOLATE="bwrap", HOME=str(home))
    output = sandbox.output_text("exp_iso")
    assert result.returncode == 0, result.stdout + result.stderr + output
    assert "visible []" in output and "env errno 30" in output and "done" in output, output
    assert read_member(sandbox.artifact("exp_iso", "modeldir"), "weights.txt") == "42"
    assert all(p.exists() for p in planted)
    docs = [json.loads(p.read_text()) for p in metadata_documents(sandbox.store)]
    assert [d["studioml"]["outcome"]["status"] for d in docs] == ["success"]


@skip_without_bwrap
@may_skip
def test_runner_timeout_kills_the_isolated_tree(sandbox: Sandbox, tmp_path: Path):
    token = f"timeout-{uuid.uuid4().hex}"
    script = _script(tmp_path / "slow", f"""\
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "{token}"])
        subprocess.Popen([sys.executable, "-c", "import os, time; os.setsid(); time.sleep(300)", "{token}"])
        print("started", flush=True)
        time.sleep(300)
        """)
    submit(Submission(script=script, queue="local_iso", experiment="exp_slow", max_duration="3s"),
           sandbox.queue_root, sandbox.store)
    started = time.monotonic()
    result = sandbox.run_once(STUDIO_RUNNER_ISOLATE="bwrap")
    assert time.monotonic() - started < 90
    output = sandbox.output_text("exp_slow")
    assert "started" in output and "timeout: stopped after" in output, output
    assert result.returncode == 1
    assert _with_token(token) == []


def test_runner_refuses_to_start_without_working_bwrap(sandbox: Sandbox, tmp_path: Path):
    fake = tmp_path / "bin" / "bwrap"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'bwrap: Creating new namespace failed: Operation not permitted' >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    path = os.pathsep.join([str(fake.parent), os.environ.get("PATH", "/usr/bin:/bin")])
    result = sandbox.run_once(timeout=120, STUDIO_RUNNER_ISOLATE="bwrap", PATH=path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--isolate bwrap" in result.stderr and "Operation not permitted" in result.stderr


@skip_without_bwrap
@may_skip
def test_runner_death_ends_the_sandbox(tmp_path: Path):
    """The runner's end (its control pipe closes, however it died) takes the whole sandbox with it."""
    (tmp_path / "workspace").mkdir()
    env = {"PATH": "/usr/bin:/bin"}
    wrapper = isolation.wrapper("bwrap", tmp_path, tmp_path / "workspace", Path(sys.prefix),
                                Path(sys.executable), env)
    token = f"orphan-{uuid.uuid4().hex}"

    async def main() -> None:
        proc = await process.start([sys.executable, "-c", TREE, token], tmp_path / "workspace", env,
                                   wrapper=wrapper)
        with trio.fail_after(30):
            while len(_with_token(token)) < 4:
                await trio.sleep(0.05)
        proc._close_fds()  # what the kernel does when the runner dies
        with trio.fail_after(15):
            while _with_token(token):
                await trio.sleep(0.05)
            await proc._proc.wait()  # the reaper, after ending the tree

    trio.run(main)
