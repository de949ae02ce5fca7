"""The runner's logging set-up: no forged log lines, no terminal escapes, no secrets (issue item 11)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator

import pytest

from studio_runner.events import Registry, bind_attempt
from studio_runner.logs import FORMAT, configure_logging, printable, set_footer
from studio_runner.redact import runner_secrets

FORGED = "1631664000_a\n2026-01-01 00:00:00 ERROR forged"
TOKEN = "ghp_16C7e42F292c6912E7710c838347Ae178B4a"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state: put it back after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    names = ("botocore", "boto3", "s3transfer", "urllib3", "httpx", "httpcore", "watchfiles", "asyncio",
             "pika")
    others = {name: logging.getLogger(name).level for name in names}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, other in others.items():
        logging.getLogger(name).setLevel(other)


def _lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    err = capsys.readouterr().err
    assert err.endswith("\n")
    return err[:-1].split("\n")


def test_a_key_with_a_newline_makes_one_log_line(capsys: pytest.CaptureFixture[str]) -> None:
    record = logging.LogRecord("studio_runner", logging.INFO, __file__, 1, "experiment %s", (FORGED,), None)
    assert len(logging.Formatter(FORMAT).format(record).splitlines()) == 2  # the plain format is forged

    configure_logging("INFO")
    logging.getLogger("studio_runner.executor").info("experiment %s", FORGED)
    (line,) = _lines(capsys)
    assert line.endswith(" INFO    studio_runner.executor: experiment " + FORGED.replace("\n", "\\n"))


@pytest.mark.parametrize("separator", ["\r", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029"])
def test_no_line_separator_of_any_kind_survives(capsys: pytest.CaptureFixture[str], separator: str) -> None:
    configure_logging("INFO")
    logging.getLogger("studio_runner").warning("queue %s gone", f"q{separator}ERROR forged")
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1  # str.splitlines breaks at every Unicode line boundary


def test_ansi_escapes_are_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO")
    logging.getLogger("studio_runner").info("key %s", "\x1b[2J\x1b[31mred\x1b[0m\x07")
    (line,) = _lines(capsys)
    assert "\x1b" not in line and "\x07" not in line
    assert line.endswith("key \\x1b[2J\\x1b[31mred\\x1b[0m\\x07")


def test_a_logger_named_after_a_key_stays_on_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("DEBUG")
    logging.getLogger(f"studio_runner.experiment.{FORGED[:40]}").debug("%s", "epoch 1")
    (line,) = _lines(capsys)
    assert " studio_runner.experiment.1631664000_a\\n2026-01-01 00:00:00 ERROR f: epoch 1" in line


def test_a_traceback_stays_multi_line_and_masked(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", [TOKEN])
    log = logging.getLogger("studio_runner")
    try:
        try:
            raise KeyError("inner")
        except KeyError as exc:
            raise ValueError(f"bad request {FORGED} with {TOKEN} at amqp://u:pw@host") from exc
    except ValueError:
        log.exception("experiment %s failed", "k1")
    lines = _lines(capsys)
    assert lines[0].endswith("ERROR   studio_runner: experiment k1 failed")
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == (
        "ValueError: bad request 1631664000_a\\n2026-01-01 00:00:00 ERROR forged with **** at amqp://u:****@host"
    )
    assert "KeyError: 'inner'" in lines and len(lines) > 6
    assert not any(line.startswith("2026-01-01") for line in lines)


def test_stack_info_stays_multi_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO")
    logging.getLogger("studio_runner").info("here", stack_info=True)
    lines = _lines(capsys)
    assert lines[1] == "Stack (most recent call last):" and len(lines) > 3


def test_runner_secrets_are_masked_in_log_messages(capsys: pytest.CaptureFixture[str]) -> None:
    environ = {"GITHUB_TOKEN": TOKEN, "AMQP_URL": "amqp://runner:s3cr3tpw@rabbit/%2f", "HOME": "/root"}
    configure_logging("INFO", runner_secrets(environ))
    log = logging.getLogger("studio_runner")
    log.info("environment: %s", environ)
    log.info("password alone: %s; home %s", "s3cr3tpw", "/root")
    log.info("export AWS_SECRET_ACCESS_KEY=abc123")
    err = capsys.readouterr().err
    assert TOKEN not in err and "s3cr3tpw" not in err and "abc123" not in err
    assert "'GITHUB_TOKEN': '****'" in err and "amqp://runner:****@rabbit/%2f" in err
    assert "password alone: ****; home /root" in err and "AWS_SECRET_ACCESS_KEY=****" in err


def test_other_handlers_see_the_record_unchanged(caplog: pytest.LogCaptureFixture) -> None:
    configure_logging("INFO", [TOKEN])
    with caplog.at_level(logging.INFO):
        logging.getLogger("studio_runner").info("token %s", TOKEN)
    assert caplog.records[0].getMessage() == f"token {TOKEN}"


def test_configure_logging_twice_is_idempotent(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", ["first-secret"])
    configure_logging("WARNING", ["second-secret"])
    log = logging.getLogger("studio_runner")
    log.info("not shown")
    log.warning("%s %s", "first-secret", "second-secret")
    (line,) = _lines(capsys)
    assert line.endswith("WARNING studio_runner: first-secret ****")
    assert logging.getLogger().level == logging.WARNING


def test_library_levels() -> None:
    configure_logging("INFO")
    assert logging.getLogger("botocore").level == logging.WARNING
    assert logging.getLogger("urllib3").level == logging.WARNING
    assert logging.getLogger("pika").level == logging.CRITICAL
    configure_logging("debug")  # the runner's debug, not the libraries' internals
    assert logging.getLogger("botocore").level == logging.WARNING
    assert logging.getLogger("pika").level == logging.CRITICAL
    configure_logging("debug", libraries=True)  # asked for: every library at the runner's level
    assert logging.getLogger("botocore").level == logging.DEBUG
    assert logging.getLogger("pika").level == logging.DEBUG
    configure_logging("ERROR")
    assert logging.getLogger("httpx").level == logging.ERROR
    with pytest.raises(ValueError):
        configure_logging("loud")


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        ("plain text, ünïcode 日本 🎉", None, "plain text, ünïcode 日本 🎉"),
        ("a\nb\rc\td", None, "a\\nb\\rc\\td"),
        ("\x00\x1b[0m\x7f", None, "\\x00\\x1b[0m\\x7f"),
        ("c1 \x85 \x9b", None, "c1 \\x85 \\x9b"),
        ("\u2028\u2029", None, "\\u2028\\u2029"),
        ("bad \udc80 byte", None, "bad \\udc80 byte"),
        ("back\\slash", None, "back\\slash"),
        ("", None, ""),
        ("abcdefgh", 8, "abcdefgh"),
        ("abcdefghi", 8, "abcde..."),
        ("ab\ncdefgh", 8, "ab\\nc..."),
        ("abcd\nefgh", 8, "abcd..."),  # never half an escape
        ("abc\x1bdefgh", 8, "abc..."),
        ("abcdef", 2, "ab"),
        ("abcdef", 0, ""),
    ],
)
def test_printable(text: str, limit: int | None, expected: str) -> None:
    assert printable(text, limit) == expected
    if limit is not None:
        assert len(printable(text, limit)) <= limit


def test_printable_rejects_a_negative_limit() -> None:
    with pytest.raises(ValueError):
        printable("x", -1)


# --- --log-format json, --log-libraries, the terminal footer ---------------------------------------------


def test_json_lines_parse_and_carry_no_secret(capsys: pytest.CaptureFixture[str]) -> None:
    environ = {"GITHUB_TOKEN": TOKEN, "AMQP_URL": "amqp://runner:s3cr3tpw@rabbit/%2f"}
    configure_logging("INFO", runner_secrets(environ), log_format="json")
    log = logging.getLogger("studio_runner.supervisor")
    log.info("broker %s, token %s, key %s", environ["AMQP_URL"], TOKEN, FORGED + "\u2028\x1b[2J")
    try:
        raise ValueError(f"bad {TOKEN}")
    except ValueError:
        log.exception("failed with AWS_SECRET_ACCESS_KEY=abc123")
    err = capsys.readouterr().err
    assert TOKEN not in err and "s3cr3tpw" not in err and "abc123" not in err
    lines = err.splitlines()  # every Unicode line boundary: a record is still one line
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert set(first) == {"ts", "level", "logger", "message"}
    assert first["level"] == "INFO" and first["logger"] == "studio_runner.supervisor"
    assert first["ts"].endswith("Z") and first["ts"][:2] == "20"
    assert first["message"] == (f"broker amqp://runner:****@rabbit/%2f, token ****, "
                                f"key {FORGED}\u2028\x1b[2J")
    assert second["level"] == "ERROR" and second["message"] == "failed with AWS_SECRET_ACCESS_KEY=****"
    assert "ValueError: bad ****" in second["exc"] and "Traceback" in second["exc"]


def test_json_lines_name_the_attempt(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", log_format="json")
    registry = Registry("host")
    record = registry.claim("local_q", "local", "m1", 2)
    registry.identify(record, "exp_1", "p")
    token = bind_attempt(record)
    try:
        logging.getLogger("studio_runner.executor").info("running")
    finally:
        bind_attempt(None)
        del token
    logging.getLogger("studio_runner").info("idle", extra={"queue": "local_other"})
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert first["experiment"] == "exp_1" and first["attempt_id"] == record.attempt_id
    assert first["queue"] == "local_q" and first["attempt"] == 2
    assert second["queue"] == "local_other" and "experiment" not in second


def test_switching_formats_keeps_one_handler(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", log_format="json")
    configure_logging("INFO")
    logging.getLogger("studio_runner").info("plain")
    (line,) = _lines(capsys)
    assert line.endswith("INFO    studio_runner: plain")
    with pytest.raises(ValueError):
        configure_logging("INFO", log_format="xml")


@pytest.mark.parametrize("libraries", [False, True])
def test_debug_shows_the_runner_not_the_libraries(capsys: pytest.CaptureFixture[str],
                                                  libraries: bool) -> None:
    configure_logging("debug", libraries=libraries)
    logging.getLogger("studio_runner.queues.rabbitmq").debug("runner debug")
    for name in ("pika.adapters.blocking_connection", "botocore.endpoint", "urllib3.connectionpool",
                 "httpx", "httpcore.http11", "s3transfer.tasks", "watchfiles.main", "asyncio"):
        logging.getLogger(name).debug("%s internals", name)
    logging.getLogger("botocore.credentials").warning("library warning")
    err = capsys.readouterr().err
    assert "runner debug" in err and "library warning" in err
    assert ("internals" in err) is libraries
    if libraries:
        assert "pika.adapters.blocking_connection internals" in err and "botocore.endpoint internals" in err


class _Terminal:
    """A stderr that says it is a terminal and keeps what was written."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


def test_the_footer_stays_under_log_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    configure_logging("INFO")
    try:
        set_footer("demo [##..] 1/4")
        logging.getLogger("studio_runner").info("a log line")
    finally:
        set_footer("")
    text = terminal.text
    assert text.startswith("\r\x1b[Kdemo [##..] 1/4\r\x1b[K")  # drawn, then cleared for the record
    assert "INFO    studio_runner: a log line\ndemo [##..] 1/4" in text  # and drawn again below it
    assert text.endswith("\r\x1b[K")  # removed at the end


def test_no_footer_when_stderr_is_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO")
    set_footer("bar")
    logging.getLogger("studio_runner").info("line")
    set_footer("")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bar" not in err and "\x1b" not in err
