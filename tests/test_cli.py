"""The command line as a new user meets it: submit's argument rules, refused queue names and missing scripts,
grouped --help, subcommand usage on unknown flags, broker errors in words, and the TUI's wiring.

Everything runs the real CLI in a subprocess (``runner.py``), with its own STUDIOML_HOME."""

from __future__ import annotations

import json
import os
import re
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path

import pika
import pytest

from studio_runner import cli, config
from studio_runner.queues.rmq_mgmt import derive_mgmt_url, describe_amqp_error

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MATCH = r"^(rmq|sqs|local)_.*$"


def _env(home: Path, **extra: str) -> dict[str, str]:
    ours = ("QUEUE_MATCH", "QUEUE_MISMATCH", "PROM_ADDRESS")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STUDIO_RUNNER_") and k not in ours}
    env.update(STUDIOML_HOME=str(home), PYTHONPATH=str(ROOT), **extra)
    return env


def _cli(*args: str, cwd: Path, home: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "runner.py"), *args], cwd=cwd, env=_env(home, **extra),
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "x.py").write_text("import sys\nprint(sys.argv)\n")
    return tmp_path


def _queued(home: Path) -> dict[str, list[list[str]]]:
    """Queue name -> the script args of each request in it."""
    found: dict[str, list[list[str]]] = {}
    root = home / "queue"
    for queue in sorted(root.iterdir()) if root.exists() else []:
        for message in sorted(queue.iterdir()):
            found.setdefault(queue.name, []).append(json.loads(message.read_text())["experiment"]["args"])
    return found


# ------------------------------------------------------------------------ submit: whose argument is it?

def test_submit_options_go_before_the_script_and_the_rest_is_the_scripts(project):
    home = project / "home"
    done = _cli("submit", "--queue", "local_x", "--cpus=2", "p/x.py", "--lr", "0.1", "-h", "--", "--cpus",
                cwd=project, home=home)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr
    assert _queued(home) == {"local_x": [["--lr", "0.1", "-h", "--", "--cpus"]]}


def test_a_submit_option_after_the_script_is_the_scripts_and_says_so(project):
    home = project / "home"
    done = _cli("submit", "p/x.py", "--queue", "local_x", "--lr", "0.1", cwd=project, home=home)
    assert done.returncode == 0, done.stderr
    assert _queued(home) == {"local_default": [["--queue", "local_x", "--lr", "0.1"]]}
    assert ("warning: --queue after the script is passed to the script; put submit options before it"
            in done.stderr)
    assert "--lr" not in done.stderr  # not one of submit's options: no warning about it


def test_double_dash_marks_the_script_and_silences_the_warning(project):
    home = project / "home"
    done = _cli("submit", "--queue", "local_y", "--", "p/x.py", "--queue=z", cwd=project, home=home)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr
    assert _queued(home) == {"local_y": [["--queue=z"]]}


def test_submit_help_states_the_rule(project):
    done = _cli("submit", "--help", cwd=project, home=project / "home")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert text.startswith("usage: studio-runner submit [SUBMIT OPTION ...] SCRIPT [SCRIPT ARG ...]")
    assert "submit's own options go BEFORE the script: everything after the script (or after `--`)" in text


def test_abbreviated_submit_options_are_refused_not_taken_as_the_script(project):
    """`--que local_x p/x.py` must not make `local_x` the script."""
    home = project / "home"
    done = _cli("submit", "--que", "local_x", "p/x.py", cwd=project, home=home)
    assert done.returncode == 2
    assert done.stderr.startswith("usage: studio-runner submit")
    assert "unrecognized arguments: --que" in done.stderr
    assert _queued(home) == {}


@pytest.mark.parametrize(("target", "message"), [("missing.py", "missing.py does not exist"),
                                                 ("p", "p is a directory, not a script")])
def test_submit_of_a_missing_script_fails_with_exit_2(project, target, message):
    home = project / "home"
    done = _cli("submit", "--queue", "local_x", target, "--lr", "1", cwd=project, home=home)
    assert done.returncode == 2, done.stdout
    assert f"studio-runner: submit: {message}" in done.stderr
    assert "Traceback" not in done.stderr
    assert _queued(home) == {}


# ------------------------------------------------------------------------ submit: queues no runner serves

def test_a_queue_the_default_match_never_serves_is_refused(project):
    home = project / "home"
    done = _cli("submit", "--queue", "myq", "p/x.py", cwd=project, home=home)
    assert done.returncode == 2
    assert "queue 'myq' would never be served" in done.stderr
    assert f"matches '{DEFAULT_MATCH}' (default of --queue-match)" in done.stderr
    assert "'local_myq'" in done.stderr and "--any-queue-name" in done.stderr
    assert _queued(home) == {}

    done = _cli("submit", "--queue", "myq", "--any-queue-name", "p/x.py", cwd=project, home=home)
    assert done.returncode == 0, done.stderr
    assert _queued(home) == {"myq": [[]]}


def test_the_queue_check_uses_the_runners_match_from_flag_or_environment(project):
    home = project / "home"
    refused = _cli("submit", "--queue", "local_a", "p/x.py", cwd=project, home=home, QUEUE_MATCH="^team_")
    assert refused.returncode == 2
    assert "matches '^team_' (environment variable QUEUE_MATCH). Pass --any-queue-name" in refused.stderr
    taken = _cli("submit", "--queue", "team_a", "p/x.py", cwd=project, home=home, QUEUE_MATCH="^team_")
    assert taken.returncode == 0, taken.stderr
    flag = _cli("submit", "--queue-match", "^team_", "--queue", "local_b", "p/x.py", cwd=project, home=home)
    assert flag.returncode == 2 and "(--queue-match)" in flag.stderr
    mismatch = _cli("submit", "--queue", "local_c", "p/x.py", cwd=project, home=home,
                    STUDIO_RUNNER_QUEUE_MISMATCH="_c$")
    assert mismatch.returncode == 2 and "matches --queue-mismatch '_c$'" in mismatch.stderr
    assert _queued(home) == {"team_a": [[]]}


# ------------------------------------------------------------------------ help and usage

def test_run_help_groups_the_options_by_section(tmp_path):
    done = _cli("run", "--help", cwd=tmp_path, home=tmp_path)
    assert done.returncode == 0
    assert done.stdout.startswith("usage: studio-runner run [--once] [--tui] [--config FILE] [OPTION ...]")
    headings = [line[:-1] for line in done.stdout.splitlines() if re.fullmatch(r"[a-z][a-z ,]+:", line)]
    assert headings == ["options", "configuration", *(title.lower() for title in config.SECTIONS)]
    assert len(config.SECTIONS) >= 6
    # each flag is listed under its own section's heading
    position = {heading: done.stdout.index(f"\n{heading}:\n") for heading in headings}
    for option in config.OPTIONS:
        at = done.stdout.index(f"\n  --{option.name} ")
        section_at = position[option.section.lower()]
        assert section_at < at, option.name
        assert all(not section_at < other < at for other in position.values()), option.name


def test_every_option_belongs_to_a_known_section():
    assert all(option.section in config.SECTIONS for option in config.OPTIONS)
    used = [option.section for option in config.OPTIONS]
    assert list(dict.fromkeys(used)) == list(config.SECTIONS)  # each section's options are together
    assert {"log-format", "log-libraries", "prom-address", "state-file"} <= {
        option.name for option in config.OPTIONS if option.section == "Logging and status"}


def test_config_example_is_grouped_by_section():
    text = config.example_toml()
    headings = re.findall(r"^# ==== (.+?) =+$", text, flags=re.M)
    assert headings == list(config.SECTIONS)
    for option in config.OPTIONS:
        following = text[text.index(f"# ==== {option.section} "):]
        nxt = following.find("\n# ==== ", 1)
        assert f"# {option.name} = " in (following if nxt < 0 else following[:nxt]), option.name


@pytest.mark.parametrize(("argv", "usage"), [
    (["run", "--bogus"], "usage: studio-runner run "),
    (["demo", "--once"], "usage: studio-runner demo "),
    (["submit", "--bogus", "x.py"], "usage: studio-runner submit "),
    (["tui", "--bogus"], "usage: studio-runner tui "),
])
def test_an_unknown_flag_prints_the_subcommands_usage(tmp_path, argv, usage):
    done = _cli(*argv, cwd=tmp_path, home=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith(usage), done.stderr
    assert f"unrecognized arguments: {argv[1]}" in done.stderr


# ------------------------------------------------------------------------ an unreachable broker says why

def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_reason_of_a_refused_connection_is_spelled_out():
    port = _closed_port()
    params = pika.URLParameters(f"amqp://guest:hunter22@127.0.0.1:{port}/?connection_attempts=1")
    with pytest.raises(pika.exceptions.AMQPConnectionError) as caught:
        pika.BlockingConnection(params)
    assert str(caught.value) == ""  # what used to be logged
    assert describe_amqp_error(caught.value, "127.0.0.1", port).startswith(
        f"connection refused by 127.0.0.1:{port}")


def test_an_unknown_host_is_named():
    params = pika.URLParameters("amqp://u:p@no-such-host.invalid:5672/?connection_attempts=1")
    with pytest.raises((pika.exceptions.AMQPConnectionError, OSError)) as caught:  # pika raises gaierror bare
        pika.BlockingConnection(params)
    assert describe_amqp_error(caught.value, "no-such-host.invalid", 5672).startswith(
        "cannot resolve host 'no-such-host.invalid'")


def test_a_high_amqp_port_does_not_derive_an_impossible_management_port():
    """Go's port + 10000 rule made port 59901 a management port of 69901, and the runner crashed."""
    assert derive_mgmt_url("amqp://u:p@rabbit:59901/") == "http://rabbit:15672"
    assert derive_mgmt_url("amqp://u:p@rabbit:55535/") == "http://rabbit:65535"


def test_the_runner_logs_why_it_cannot_reach_the_broker_without_the_password(tmp_path):
    port = _closed_port()
    argv = [sys.executable, str(ROOT / "runner.py"), "run", "--amqp-url",
            f"amqp://guest:s3cretpw@127.0.0.1:{port}/", "--prom-address", "", "--working-dir", str(tmp_path)]
    proc = subprocess.Popen(argv, env=_env(tmp_path / "home", XDG_CACHE_HOME=str(tmp_path / "cache")),
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stderr, selectors.EVENT_READ)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not any("cannot connect to RabbitMQ" in x for x in lines):
                if selector.select(timeout=1):
                    line = proc.stderr.readline()
                    if not line:
                        break
                    lines.append(line)
    finally:
        proc.terminate()
        rest = proc.communicate(timeout=60)[1]
    text = "".join(lines) + rest
    [line] = [x for x in lines if "cannot connect to RabbitMQ" in x][:1] or [text]
    assert f"at amqp://guest:****@127.0.0.1:{port}/ (connection refused by 127.0.0.1:{port};" in line
    assert "s3cretpw" not in text


# ------------------------------------------------------------------------ the TUI's wiring

_STUB_APP = """
import json, os
def main(url):
    open(os.environ["TUI_STUB_OUT"], "w").write(json.dumps({"url": url}))
    return 7
"""
_STUB_TOGETHER = """
import json, os
def run_with_runner(argv):
    open(os.environ["TUI_STUB_OUT"], "w").write(json.dumps({"argv": argv}))
    return 5
"""
_LAUNCH = ("import sys; sys.path.insert(0, sys.argv.pop(1)); from studio_runner.cli import main; "
           "raise SystemExit(main(sys.argv[1:]))")


@pytest.fixture
def stub_tui(tmp_path: Path) -> Path:
    """A stand-in for tui.app and tui.together that records what the CLI hands them: the contract between
    the CLI and the terminal UI, without taking over a terminal."""
    stub = tmp_path / "stub"
    (stub / "tui").mkdir(parents=True)
    (stub / "tui" / "__init__.py").write_text("")
    (stub / "tui" / "app.py").write_text(_STUB_APP)
    (stub / "tui" / "together.py").write_text(_STUB_TOGETHER)
    return stub


def _with_stub(stub: Path, *args: str, **extra: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = stub / "out.json"
    out.unlink(missing_ok=True)
    done = subprocess.run([sys.executable, "-c", _LAUNCH, str(stub), *args], cwd=ROOT,
                          env=_env(stub / "home", TUI_STUB_OUT=str(out), **extra),
                          capture_output=True, text=True, timeout=120)
    return done, (json.loads(out.read_text()) if out.exists() else {})


@pytest.mark.parametrize(("args", "environ", "url"), [
    ((), {}, "http://127.0.0.1:9090"),
    (("--prom-address", "0.0.0.0:9123"), {}, "http://127.0.0.1:9123"),
    ((), {"STUDIO_RUNNER_PROM_ADDRESS": "10.1.2.3:9200"}, "http://10.1.2.3:9200"),
    ((), {"PROM_ADDRESS": ":9300"}, "http://127.0.0.1:9300"),
    (("--url", "http://gpu-box:9400"), {"STUDIO_RUNNER_PROM_ADDRESS": ":1"}, "http://gpu-box:9400"),
])
def test_tui_gets_the_status_url(stub_tui, args, environ, url):
    done, seen = _with_stub(stub_tui, "tui", *args, **environ)
    assert done.returncode == 7, done.stderr
    assert seen == {"url": url}


def test_run_tui_hands_the_run_arguments_without_tui(stub_tui, tmp_path):
    done, seen = _with_stub(stub_tui, "run", "--once", "--tui", "--queue-root", str(tmp_path))
    assert done.returncode == 5, done.stderr
    assert seen == {"argv": ["--once", "--queue-root", str(tmp_path)]}


def test_run_tui_checks_the_options_before_the_ui_starts(stub_tui):
    done, seen = _with_stub(stub_tui, "run", "--tui", "--max-attempts", "x")
    assert done.returncode == 2 and "--max-attempts" in done.stderr and seen == {}
    for address in ("", ":0"):
        done, seen = _with_stub(stub_tui, "run", "--tui", "--prom-address", address)
        assert done.returncode == 2 and "give --prom-address a fixed HOST:PORT" in done.stderr and seen == {}
    done, seen = _with_stub(stub_tui, "run", "--tui", STUDIO_RUNNER_PROM_ADDRESS="")
    assert done.returncode == 5 and seen == {"argv": []}  # the UI starts the runner on a port of its own


@pytest.mark.parametrize("argv", [("tui",), ("run", "--tui")])
def test_without_textual_the_tui_says_how_to_install_it(stub_tui, argv):
    (stub_tui / "textual").mkdir()
    (stub_tui / "textual" / "__init__.py").write_text("raise ImportError('No module named textual')\n")
    done, seen = _with_stub(stub_tui, *argv)
    assert done.returncode == 2 and seen == {}
    assert "the terminal UI needs Textual" in done.stderr
    assert "pip install 'studio-runner[tui]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_status_url_brackets_ipv6_hosts():
    assert cli.status_url("[::1]:9500", environ={}) == "http://[::1]:9500"
    assert cli.status_url("", environ={}) == cli.DEFAULT_STATUS_URL  # the runner serves none: try the default
