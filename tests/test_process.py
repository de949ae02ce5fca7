"""The experiment's process tree, with real processes: it survives idle trio threads, never outlives the
runner or its own end (double-fork daemons included), is stopped whole, and reports its real status."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import trio

from studio_runner import process

pytestmark = [pytest.mark.skipif(not process.REAPER_AVAILABLE, reason="the reaper needs Linux"),
              pytest.mark.expected_skip("the reaper needs Linux")]

ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def script(tmp_path: Path, body: str, name: str = "experiment.py") -> list[str]:
    """An experiment's command line running ``body`` unbuffered, so output order is the write order."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return [sys.executable, "-u", str(path)]


def gone(pid: int) -> bool:
    """Dead: no such process, or a zombie (exited, only its parent's bookkeeping is left)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def wait_gone(pid: int, timeout: float) -> bool:
    with trio.move_on_after(timeout):
        while not gone(pid):
            await trio.sleep(0.02)
        return True
    return False


async def read_pid(path: Path, timeout: float = 20.0) -> int:
    """The pid a process wrote (atomically, via rename) into ``path``."""
    with trio.fail_after(timeout):
        while not path.exists():
            await trio.sleep(0.02)
    return int(path.read_text())


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some(65536):
        data += chunk
    return bytes(data)


async def read_until(stream: trio.abc.ReceiveStream, end: bytes) -> bytes:
    data = b""
    while not data.endswith(end):
        chunk = await stream.receive_some(65536)
        assert chunk, f"EOF before {end!r}: {data!r}"
        data += chunk
    return data


WRITE_PID = """
def write_pid(path):
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(path + ".tmp", path)
"""

DAEMON = (
    WRITE_PID
    + """
def daemonize(pidfile):
    child = os.fork()
    if child == 0:
        os.setsid()
        if os.fork() == 0:
            print("daemon running", flush=True)  # before the pid file: the parent's line must come after it
            write_pid(pidfile)
            time.sleep(120)
        os._exit(0)
    os.waitpid(child, 0)
    while not os.path.exists(pidfile):
        time.sleep(0.01)
"""
)


def test_outlives_trio_idle_worker_threads(tmp_path: Path) -> None:
    """trio's worker threads exit after ~10 s idle; a death signal tied to the forking thread used to
    SIGKILL every experiment that outlived such an idle period (exit -9 at 10 s)."""
    argv = script(tmp_path, """
        import time
        for i in range(4):
            print("tick", i)
            time.sleep(4)
    """)

    async def main() -> tuple[int, bytes]:
        proc = await process.start(argv, tmp_path, ENV)
        output = await read_all(proc.stdout)  # no thread is used meanwhile: the forking thread idles out
        return await proc.wait(), output

    returncode, output = trio.run(main)
    assert output.decode().split() == ["tick", "0", "tick", "1", "tick", "2", "tick", "3"]
    assert returncode == 0


RUNNER = """
import os, sys, trio
from pathlib import Path
from studio_runner import process

async def main():
    procs = []
    for i in range(2):
        argv = [sys.executable, "-u", sys.argv[1], sys.argv[2] + str(i)]
        procs.append(await process.start(argv, Path(sys.argv[3]), {"PATH": os.environ["PATH"]}))
    print("started", flush=True)
    for proc in procs:
        await proc.wait()

trio.run(main)
"""


def test_kill_9_of_the_runner_ends_the_experiment_and_its_daemon(tmp_path: Path) -> None:
    """Whatever kills the runner, the reaper sees EOF on its control pipe and SIGKILLs the whole tree.
    Two experiments run, so neither reaper may hold the other's control pipe open."""
    experiment = script(tmp_path, "import os, sys, time\n" + DAEMON + textwrap.dedent("""
        daemonize(sys.argv[1] + ".daemon")
        write_pid(sys.argv[1])
        time.sleep(120)
    """))[-1]
    runner = subprocess.Popen(
        [sys.executable, "-c", RUNNER, experiment, str(tmp_path / "pid"), str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(Path(process.__file__).parents[1])},
        stdout=subprocess.PIPE,
    )

    async def main() -> None:
        try:
            pids = []
            for i in range(2):
                pids += [await read_pid(tmp_path / f"pid{i}"), await read_pid(tmp_path / f"pid{i}.daemon")]
            assert not any(gone(pid) for pid in pids)
            runner.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            for pid in pids:
                assert await wait_gone(pid, 2.0 - (time.monotonic() - killed)), f"{pid} outlived the runner"
        finally:
            runner.kill()
            runner.wait()

    trio.run(main)


def test_double_fork_daemon_dies_when_the_experiment_exits(tmp_path: Path) -> None:
    """The daemon is re-parented to the reaper (subreaper), which kills it once the main process is done;
    the output's EOF (the daemon held stdout) and wait() come only after it is gone."""
    pidfile = tmp_path / "daemon.pid"
    argv = script(tmp_path, "import os, sys, time\n" + DAEMON + textwrap.dedent(f"""
        daemonize({str(pidfile)!r})
        print("main done")
    """))

    async def main() -> None:
        proc = await process.start(argv, tmp_path, ENV)
        output = await read_all(proc.stdout)
        daemon = int(pidfile.read_text())
        assert await wait_gone(daemon, 1.0)  # a dying process closes its fds just before it is a zombie
        assert output.decode().splitlines() == ["daemon running", "main done"]
        assert await proc.wait() == 0
        assert not proc.stop_requested
        assert not psutil.pid_exists(daemon)  # reaped, not just a zombie

    trio.run(main)


def test_double_fork_daemon_dies_on_stop(tmp_path: Path) -> None:
    pidfile = tmp_path / "daemon.pid"
    argv = script(tmp_path, "import os, sys, time\n" + DAEMON + textwrap.dedent(f"""
        daemonize({str(pidfile)!r})
        time.sleep(120)
    """))

    async def main() -> None:
        proc = await process.start(argv, tmp_path, ENV)
        daemon = await read_pid(pidfile)
        await proc.stop(grace=5)
        assert proc.returncode == -signal.SIGTERM
        assert proc.stop_requested
        assert not psutil.pid_exists(daemon)
        assert gone(proc.pid)

    trio.run(main)


def test_sigterm_reaches_a_child_that_escaped_with_setsid(tmp_path: Path) -> None:
    """terminate() signals every descendant, not only the experiment's process group."""
    child = script(tmp_path, WRITE_PID.join(["import os, signal, sys, time\n", textwrap.dedent("""
        def on_term(signum, frame):
            open(sys.argv[1], "w").write("got SIGTERM")
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        write_pid(sys.argv[1] + ".pid")
        time.sleep(120)
    """)]), name="child.py")
    marker = tmp_path / "escaped"
    argv = script(tmp_path, f"""
        import os, signal, subprocess, sys, time
        child = subprocess.Popen({child + [str(marker)]!r}, start_new_session=True)
        def on_term(signum, frame):
            child.wait()  # let it act on its own SIGTERM, then die of ours
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        signal.signal(signal.SIGTERM, on_term)
        time.sleep(120)
    """)

    async def main() -> None:
        proc = await process.start(argv, tmp_path, ENV)
        escaped = await read_pid(Path(f"{marker}.pid"))
        assert os.getsid(escaped) != os.getsid(proc.pid)
        await proc.stop(grace=10)
        assert marker.read_text() == "got SIGTERM"
        assert proc.returncode == -signal.SIGTERM
        assert proc.stop_requested

    trio.run(main)


def test_stop_kills_what_ignores_sigterm_after_the_grace(tmp_path: Path) -> None:
    """stop() is shielded: a caller cancelled meanwhile still gets the whole tree killed."""
    argv = script(tmp_path, """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready")
        time.sleep(120)
    """)

    async def main() -> None:
        proc = await process.start(argv, tmp_path, ENV)
        assert await read_until(proc.stdout, b"ready\n") == b"ready\n"
        began = time.monotonic()
        with trio.move_on_after(0.2):
            await proc.stop(grace=1.0)
        elapsed = time.monotonic() - began
        assert proc.returncode == -signal.SIGKILL
        assert proc.stop_requested
        assert 1.0 <= elapsed < 4.0
        await proc.stop(grace=1.0)  # twice: harmless
        assert proc.returncode == -signal.SIGKILL

    trio.run(main)


def test_kill(tmp_path: Path) -> None:
    async def main() -> None:
        proc = await process.start(["sleep", "60"], tmp_path, ENV)
        proc.kill()
        assert await proc.wait() == -signal.SIGKILL
        assert proc.stop_requested

    trio.run(main)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("import sys; sys.exit(3)", 3),
        ("pass", 0),
        ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", -signal.SIGKILL),
        ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", -signal.SIGTERM),
    ],
)
def test_status_is_reported_exactly(tmp_path: Path, body: str, expected: int) -> None:
    """The runner sees the main process's status as if there were no reaper, and a signal the runner did
    not send is not a stop it requested."""

    async def main() -> None:
        proc = await process.start([sys.executable, "-c", body], tmp_path, ENV)
        assert await proc.wait() == expected
        assert proc.returncode == expected
        assert not proc.stop_requested
        await proc.stop(grace=1)  # after the end: only makes sure nothing is left
        assert proc.returncode == expected
        assert not proc.stop_requested

    trio.run(main)


def test_output_is_merged_in_order_and_includes_grandchildren(tmp_path: Path) -> None:
    argv = script(tmp_path, """
        import subprocess, sys
        for i in range(3):
            print("out", i)
            print("err", i, file=sys.stderr)
        subprocess.run([sys.executable, "-c", "print('grandchild')"], check=True)
        sys.stdout.write("last line without newline")
    """)

    async def main() -> None:
        proc = await process.start(argv, tmp_path, ENV)
        data = b""
        while chunk := await proc.stdout.receive_some(65536):
            data += chunk
        lines = data.decode().split("\n")
        assert lines == ["out 0", "err 0", "out 1", "err 1", "out 2", "err 2", "grandchild",
                         "last line without newline"]
        assert await proc.wait() == 0

    trio.run(main)


def test_environment_cwd_and_fds_are_exactly_the_experiments(tmp_path: Path) -> None:
    """No variable from the reaper, no fd of its pipes (nor of another experiment's reaper)."""
    env = {**ENV, "ONE": "1", "SPACES": "a b=c", "EMPTY": "", "NON_UTF8": "caf\udce9"}
    workdir = tmp_path / "work dir"
    workdir.mkdir()
    argv = script(tmp_path, """
        import os, sys
        environ = open("/proc/self/environ", "rb").read()  # as exec'd: Python may add LC_CTYPE later
        sys.stdout.buffer.write(environ + b"\\n")
        print(os.getcwd())
        for fd in sorted(os.listdir("/proc/self/fd"), key=int):
            try:
                print(fd, os.readlink("/proc/self/fd/" + fd))
            except OSError:
                print(fd, "listing")  # the directory fd listdir used, closed since
    """)

    async def main() -> None:
        other = await process.start(["sleep", "60"], tmp_path, ENV)  # its reaper's pipes are open now
        proc = await process.start(argv, workdir, env)
        raw_env, cwd, *fds = (await read_all(proc.stdout)).split(b"\n")[:-1]
        assert await proc.wait() == 0
        await other.stop(grace=1)
        assert dict(item.split(b"=", 1) for item in raw_env.split(b"\0") if item) == {
            os.fsencode(k): os.fsencode(v) for k, v in env.items()
        }
        assert cwd.decode() == str(workdir)
        table = dict(line.decode().split(" ", 1) for line in fds)
        assert sorted(table, key=int) == ["0", "1", "2", "3"], table
        assert table["0"] == "/dev/null"
        assert table["1"] == table["2"] and table["1"].startswith("pipe:")
        assert table["3"] == "listing" or table["3"].startswith("/proc/")

    trio.run(main)


def test_start_errors_are_oserrors(tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(FileNotFoundError) as missing:
            await process.start([str(tmp_path / "missing")], tmp_path, ENV)
        assert missing.value.filename == str(tmp_path / "missing")
        with pytest.raises(FileNotFoundError) as no_cwd:
            await process.start(["true"], tmp_path / "nowhere", ENV)
        assert no_cwd.value.filename == str(tmp_path / "nowhere")
        not_executable = tmp_path / "data.txt"
        not_executable.write_text("data")
        with pytest.raises(PermissionError):
            await process.start([str(not_executable)], tmp_path, ENV)

    trio.run(main)


def test_cancelled_start_leaves_nothing_behind(tmp_path: Path) -> None:
    """Cancelled at any point (spawning the reaper, the handshake, the exec), start() cleans up."""

    before = set(psutil.Process().children(recursive=True))  # e.g. a session's S3 server

    async def main() -> None:
        outcomes = set()
        for delay in (0.0, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 1.0):
            proc = None
            with trio.move_on_after(delay):
                proc = await process.start(["sleep", "60"], tmp_path, ENV)
            outcomes.add(proc is None)
            if proc is not None:
                await proc.stop(grace=1)
            assert set(psutil.Process().children(recursive=True)) - before == set(), delay
        assert outcomes == {True, False}  # both cancelled and completed starts were exercised

    trio.run(main)


def test_reaper_killed_from_outside_takes_the_tree_with_it(tmp_path: Path) -> None:
    """If the reaper itself dies (kill -9 by someone), the experiment's death signal and the runner's
    sweep of the experiment's session still leave nothing behind."""
    pidfile = tmp_path / "worker.pid"
    argv = script(tmp_path, "import os, sys, time\n" + WRITE_PID + textwrap.dedent(f"""
        if os.fork() == 0:
            write_pid({str(pidfile)!r})
            time.sleep(120)
        time.sleep(120)
    """))

    async def main() -> None:
        proc = await process.start(argv, tmp_path, ENV)
        worker = await read_pid(pidfile)
        reaper = psutil.Process(proc.pid).parent()
        assert reaper is not None and reaper.pid != os.getpid()
        reaper.kill()
        assert await proc.wait() == -signal.SIGKILL  # the reaper's status: the real one is lost with it
        assert await wait_gone(proc.pid, 2.0)
        assert await wait_gone(worker, 2.0)

    trio.run(main)


def test_stuck_reaper_is_killed_with_the_tree_by_the_safety_net(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(process, "REAPER_EXIT_TIMEOUT", 0.5)
    pidfile = tmp_path / "escaped.pid"
    argv = script(tmp_path, "import os, sys, time\n" + WRITE_PID + textwrap.dedent(f"""
        if os.fork() == 0:
            os.setsid()
            write_pid({str(pidfile)!r})
            time.sleep(120)
        time.sleep(120)
    """))

    async def main() -> None:
        proc = await process.start(argv, tmp_path, ENV)
        escaped = await read_pid(pidfile)
        reaper = psutil.Process(proc.pid).parent()
        assert reaper is not None
        reaper.suspend()  # SIGSTOP: it cannot obey any more
        with trio.fail_after(10):
            await proc.stop(grace=0.5)
        assert proc.stop_requested
        for pid in (proc.pid, escaped):
            assert await wait_gone(pid, 2.0)

    trio.run(main)


def test_plain_fallback_without_reaper(tmp_path: Path) -> None:
    """The non-Linux path (a plain child in its own session) keeps the same API."""
    argv = script(tmp_path, """
        import sys
        print("out")
        print("err", file=sys.stderr)
        sys.exit(3)
    """)

    async def main() -> None:
        proc = await process.start(argv, tmp_path, ENV, reaper=False)
        assert not proc.supervised
        assert (await read_all(proc.stdout)).decode().split() == ["out", "err"]
        assert await proc.wait() == 3
        assert not proc.stop_requested
        slow = await process.start(["sleep", "60"], tmp_path, ENV, reaper=False)
        await slow.stop(grace=1)
        assert slow.returncode == -signal.SIGTERM
        assert slow.stop_requested

    trio.run(main)


def test_start_overhead(tmp_path: Path) -> None:
    """Prints what the reaper adds per experiment over a bare child (no timed assertion: shared CI)."""
    argv = [sys.executable, "-c", "pass"]

    async def bare() -> None:
        proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        await proc.wait()
        assert proc.stdout is not None
        await proc.stdout.aclose()

    async def supervised() -> None:
        proc = await process.start(argv, tmp_path, ENV)
        await proc.wait()
        await proc.stdout.aclose()

    async def main() -> dict[str, float]:
        timings: dict[str, list[float]] = {"bare": [], "reaper": []}
        for _ in range(10):
            for name, run in (("bare", bare), ("reaper", supervised)):
                began = time.perf_counter()
                await run()
                timings[name].append(time.perf_counter() - began)
        return {name: sorted(values)[len(values) // 2] for name, values in timings.items()}

    median = trio.run(main)
    print(f"\nstart+wait of `python -c pass`, median of 10: bare {median['bare'] * 1000:.1f} ms, "
          f"under the reaper {median['reaper'] * 1000:.1f} ms, "
          f"overhead {(median['reaper'] - median['bare']) * 1000:.1f} ms")


FAKE_WRAPPER = """
import os, signal, sys
# Like bwrap --unshare-pid --new-session: an outer process that dies of SIGTERM, a PID 1 that ignores it,
# and the command in its own session; the outer one exits with the command's status, 128+N for signal N.
def status(pid):
    _, raw = os.waitpid(pid, 0)
    return 128 + os.WTERMSIG(raw) if os.WIFSIGNALED(raw) else os.WEXITSTATUS(raw)
init = os.fork()
if init == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    command = os.fork()
    if command == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.setsid()
        os.execvp(sys.argv[1], sys.argv[1:])
    os._exit(status(command))
sys.exit(status(init))
"""


@pytest.mark.parametrize(("body", "expected"), [
    ("raise SystemExit(7)", 7), ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", -9),
    ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", -15)])
def test_wrapped_status_is_translated_back(tmp_path: Path, body: str, expected: int) -> None:
    wrapper = script(tmp_path, FAKE_WRAPPER, "wrapper.py")

    async def main() -> int:
        proc = await process.start([sys.executable, "-c", body], tmp_path, ENV, wrapper=wrapper)
        await read_all(proc.stdout)
        return await proc.wait()

    assert trio.run(main) == expected


def test_wrapped_stop_spares_the_wrapper_so_the_grace_period_holds(tmp_path: Path) -> None:
    """A wrapper (bwrap) passes no signal on and dies of SIGTERM: the reaper must signal the experiment
    only, or the sandbox ends at once and the experiment never gets its grace period."""
    wrapper = script(tmp_path, FAKE_WRAPPER, "wrapper.py")
    argv = script(tmp_path, """
        import signal, sys, time
        def handler(signum, frame):
            time.sleep(0.5)  # a checkpoint being written
            print("saved", flush=True)
            sys.exit(3)
        signal.signal(signal.SIGTERM, handler)
        print("ready", flush=True)
        time.sleep(60)
    """)

    async def main() -> tuple[int, bytes]:
        proc = await process.start(argv, tmp_path, ENV, wrapper=wrapper)
        output = await read_until(proc.stdout, b"ready\n")
        await proc.stop(grace=10.0)
        return await proc.wait(), output + await read_all(proc.stdout)

    returncode, output = trio.run(main)
    assert b"saved" in output and returncode == 3, output
