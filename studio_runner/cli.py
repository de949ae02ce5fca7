"""Command line: run, submit, demo, tui, config-example, version. Nothing but argument handling lives here."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from studio_runner import __version__, config
from studio_runner.errors import ConfigError
from studio_runner.redact import runner_secrets

DESCRIPTION = """\
studio-runner takes StudioML experiments from queues (a local directory by default, or RabbitMQ), runs each
in a cached Python environment with its artifacts in place, and uploads its results.

Every runner option is also an environment variable (--cache-dir -> STUDIO_RUNNER_CACHE_DIR; the Go runner's
own names such as CACHE_DIR or AMQP_URL are read too) and a key of the TOML file given with --config.
Precedence: flag > environment > file > default.
"""

EPILOG = """\
examples:
  studio-runner demo                                   run the bundled example experiments
  studio-runner run                                    serve ~/.studioml/queue (StudioML local mode)
  studio-runner run --once --queue-root /srv/queues    run what is queued, then exit
  studio-runner run --amqp-url amqp://u:p@broker:5672/ serve RabbitMQ queues
  studio-runner run --tui                              serve, and watch it in the same terminal
  studio-runner tui --url http://gpu-box:9090          watch a runner started elsewhere
  studio-runner submit --queue local_x train.py --lr 0.1
                                                       queue train.py like `studio run` in local mode
"""

SUBMIT_DESCRIPTION = """\
Pack the script's directory as the workspace artifact into local storage and put a StudioML request on a
local queue.

Like `studio run`, submit's own options go BEFORE the script: everything after the script (or after `--`)
is passed to the script unchanged, even when it looks like one of submit's options.
  studio-runner submit --queue local_gpu --cpus 2 train.py --lr 0.1 --epochs 3
"""

TUI_INSTALL_HINT = "pip install 'studio-runner[tui]'"
DEFAULT_STATUS_URL = "http://127.0.0.1:9090"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose subcommands report unknown arguments themselves, so the message comes with
    the subcommand's usage (`usage: studio-runner run ...`), not the top-level one."""

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras and self._strict:
            self.error("unrecognized arguments: " + " ".join(extras))
        return parsed, extras

    _strict = False


class _SubParser(_Parser):
    _strict = True


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = _Parser(prog="studio-runner", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"studio-runner {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_SubParser)

    run = commands.add_parser("run", help="serve queues and run experiments (the daemon)",
                              usage="%(prog)s [--once] [--tui] [--config FILE] [OPTION ...]",
                              description="Serve queues and run experiments until stopped (SIGINT/SIGTERM: "
                              "stop taking work; a second signal stops running experiments, which are "
                              "handed back to their queue).")
    run.add_argument("--once", action="store_true",
                     help="exit when every served queue is empty (or holds only work that does not fit); "
                     "exit status 1 when an experiment that ran did not succeed")
    run.add_argument("--tui", action="store_true",
                     help="show the terminal UI of this runner in this terminal while it runs (needs "
                     f"Textual: {TUI_INSTALL_HINT}; the runner's log goes to the UI)")
    config.add_option_flags(run)

    submit = commands.add_parser(
        "submit", help="queue a script like `studio run` does in local mode", allow_abbrev=False,
        usage="%(prog)s [SUBMIT OPTION ...] SCRIPT [SCRIPT ARG ...]", description=SUBMIT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    submit.add_argument("script", type=Path, help="the experiment's entry point; submit options go before it")
    submit.add_argument("args", nargs="*", default=[], metavar="SCRIPT ARG",
                        help="arguments for the script: everything after SCRIPT, passed unchanged")
    submit.add_argument("--queue", default="local_default", help="local queue name (default: local_default)")
    submit.add_argument("--queue-match", metavar="REGEX",
                        help="the --queue-match of the runners that should take it: a queue name that does "
                        "not match is refused (default: STUDIO_RUNNER_QUEUE_MATCH, QUEUE_MATCH, or the "
                        "runner's default ^(rmq|sqs|local)_.*$)")
    submit.add_argument("--any-queue-name", action="store_true",
                        help="queue even when no runner with the default --queue-match would serve the queue")
    submit.add_argument("--experiment", help="experiment key (default: <unix time>_<uuid4>)")
    submit.add_argument("--project", help="project name")
    submit.add_argument("--python-pkg", action="append", default=[], metavar="REQ",
                        help="add a requirement to the experiment's environment (repeatable)")
    submit.add_argument("--env", action="append", default=[], metavar="K=V",
                        help="environment variable for the experiment (repeatable)")
    submit.add_argument("--max-duration", help="stop the experiment after this long (e.g. 20m)")
    submit.add_argument("--lifetime", help="discard the request if not started within this long")
    submit.add_argument("--cpus", type=int, default=1, help="cores to reserve (default: 1)")
    submit.add_argument("--ram", default="1g", help="RAM to reserve (default: 1g)")
    submit.add_argument("--hdd", default="2g", help="scratch disk to reserve (default: 2g)")
    submit.add_argument("--gpus", type=int, default=0, help="GPU slots per card (default: 0, no GPU)")
    submit.add_argument("--gpu-mem", help="least memory of each card (e.g. 16GiB)")
    submit.add_argument("--gpu-count", type=int, help="number of cards (default: one when --gpus is set)")
    submit.add_argument("--queue-root", type=Path, help="local queue root (default: $STUDIOML_HOME/queue)")
    submit.add_argument("--storage-root", type=Path,
                        help="local object store (default: $STUDIOML_HOME/storage/studioml)")

    demo = commands.add_parser("demo", help="submit and run the bundled example experiments",
                               usage="%(prog)s [--demo-dir DIR] [--config FILE] [OPTION ...]",
                               description="Submits four example experiments (metadata, an extra package, "
                               "a failure, a timeout) to a fresh local queue, runs them and prints a table.")
    demo.add_argument("--demo-dir", type=Path, help="keep queue, storage and scratch here (default: temp)")
    config.add_option_flags(demo)

    tui = commands.add_parser("tui", help="watch a running runner in the terminal (needs Textual)",
                              description="A live view of a runner's experiments, GPUs, queues and caches, "
                              "read from its status endpoint (the runner's --prom-address). Needs Textual: "
                              f"{TUI_INSTALL_HINT}.")
    tui.add_argument("--url", help=f"the runner's status endpoint (default: {DEFAULT_STATUS_URL}, or "
                     "http://<--prom-address> when that or STUDIO_RUNNER_PROM_ADDRESS/PROM_ADDRESS is set)")
    tui.add_argument("--prom-address", metavar="HOST:PORT",
                     help="the --prom-address the runner was started with (used when --url is not given)")

    commands.add_parser("config-example", help="print a config.example.toml documenting every option")
    commands.add_parser("version", help="print the version")
    return parser, {"run": run, "submit": submit, "demo": demo, "tui": tui}


def _studioml_home() -> Path:
    return Path(os.environ.get("STUDIOML_HOME") or Path.home() / ".studioml")


def _split_submit(submit: argparse.ArgumentParser,
                  tokens: list[str]) -> tuple[list[str], list[str], bool]:
    """``submit``'s tokens as (its options and the script, the script's arguments, whether ``--`` said so).

    Everything after the first token that is neither an option nor an option's value, or after ``--``,
    belongs to the script, as with `studio run`. argparse alone cannot say this across Python versions
    (REMAINDER and ``--`` changed in 3.12 and 3.13), so the split is done here, from the parser's own
    table of which options take a value."""
    takes_value = {flag for action in submit._actions if action.nargs != 0 for flag in action.option_strings}
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token == "--":
            script = tokens[index + 1:index + 2]
            return tokens[:index] + ["--", *script], tokens[index + 2:], True
        if token.startswith("-") and token != "-":
            index += 2 if token in takes_value else 1  # --opt=value is one token
            continue
        return tokens[:index + 1], tokens[index + 1:], False
    return tokens, [], False


def _warn_misplaced(submit: argparse.ArgumentParser, script_args: Sequence[str]) -> None:
    """The classic mistake, `submit x.py --queue q`, silently queues to the default queue: say so."""
    own = {flag for action in submit._actions for flag in action.option_strings if flag.startswith("--")}
    own.discard("--help")
    for arg in script_args:
        if arg == "--":  # the script's own separator: what follows is plainly meant for it
            break
        flag = arg.split("=", 1)[0]
        if flag in own:
            print(f"studio-runner: warning: {flag} after the script is passed to the script; put submit "
                  "options before it (studio-runner submit [SUBMIT OPTION ...] SCRIPT [SCRIPT ARG ...])",
                  file=sys.stderr)


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, argparse.ArgumentParser,
                                         dict[str, argparse.ArgumentParser]]:
    parser, subs = _parser()
    tokens = list(argv)
    command_at = next((i for i, token in enumerate(tokens) if not token.startswith("-")), None)
    if command_at is None or tokens[command_at] != "submit":
        return parser.parse_args(tokens), parser, subs
    own, script_args, explicit = _split_submit(subs["submit"], tokens[command_at + 1:])
    args = parser.parse_args(tokens[:command_at + 1] + own)
    args.args = script_args
    if not explicit:  # `submit -- x.py --queue q` says that --queue is meant for the script
        _warn_misplaced(subs["submit"], script_args)
    return args, parser, subs


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, parser, subs = _parse(argv)
    try:
        if args.command == "run":
            return _run(args, argv)
        if args.command == "demo":
            from studio_runner.demo import run_demo

            flags = {k: v for k, v in vars(args).items() if k not in ("command", "demo_dir")}
            return run_demo(flags, args.demo_dir)
        if args.command == "submit":
            return _submit(args, subs["submit"])
        if args.command == "tui":
            return _tui(args)
        if args.command == "config-example":
            print(config.example_toml())
            return 0
        if args.command == "version":
            print(f"studio-runner {__version__}")
            return 0
    except ConfigError as exc:
        print(f"studio-runner: {exc}", file=sys.stderr)
        return 2
    parser.print_help()
    return 2


def _need_textual() -> None:
    """Textual is an extra (the one-file build bundles it): say how to get it instead of a traceback."""
    try:
        import textual  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"the terminal UI needs Textual, which is not installed ({exc}); install it with: "
                          f"{TUI_INSTALL_HINT}") from None


def status_url(prom_address: str | None = None, environ: dict[str, str] | None = None) -> str:
    """The status endpoint's URL for ``--prom-address`` (flag, else environment, else the default)."""
    address, _where = config.resolve_one("prom-address", prom_address, environ)
    host, _, port = str(address).rpartition(":")
    if not address or port == "0":
        return DEFAULT_STATUS_URL
    if host in ("0.0.0.0", "::", ""):  # bound to every interface: this machine reaches it on loopback
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _tui(args: argparse.Namespace) -> int:
    url = args.url or status_url(args.prom_address)
    if not re.match(r"^https?://", url):
        raise ConfigError(f"--url must start with http:// or https://, got {url!r}")
    _need_textual()
    from tui.app import main as tui_main

    return tui_main(url)


def _run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import trio

    from studio_runner import runtime
    from studio_runner.attempt import Status

    settings = config.resolve(args)  # bad options fail here, before a terminal UI takes the screen
    if args.tui:
        _need_textual()
        # without the flag, the UI starts the runner on a free loopback port of its own
        port = settings.prom_address.rpartition(":")[2]
        if settings.sources["prom-address"] == "flag" and port in ("", "0"):
            raise ConfigError("--tui reads the runner's status endpoint: give --prom-address a fixed "
                              "HOST:PORT or leave it out")
        from tui.together import run_with_runner

        run_at = argv.index("run")
        return run_with_runner([a for a in argv[run_at + 1:] if a != "--tui"])

    runtime.configure_logging(settings.log_level, runner_secrets(os.environ), log_format=settings.log_format,
                              libraries=settings.log_libraries)

    async def serve() -> int:
        outcomes = await runtime.serve(settings, once=args.once, handle_signals=True,
                                       reload=lambda: config.resolve(args))  # SIGHUP: file and environment
        ran = [o for o in outcomes if o.status is not Status.DEFERRED]  # released untried: not a result
        return 0 if all(o.status is Status.SUCCESS for o in ran) or not args.once else 1

    return trio.run(serve)


def _check_queue_name(args: argparse.Namespace) -> None:
    """A queue no runner serves is a request that waits forever: refuse it, naming the pattern."""
    if args.any_queue_name:
        return
    match, where = config.resolve_one("queue-match", args.queue_match)
    if not re.search(match, args.queue):
        suggestion = f"local_{args.queue}"
        hint = f"Use a name such as {suggestion!r}, or pass" if re.search(match, suggestion) else "Pass"
        raise ConfigError(
            f"queue {args.queue!r} would never be served: runners take only queues whose name matches "
            f"{match!r} ({where}). {hint} --any-queue-name if your runners are started with another "
            "--queue-match.")
    mismatch, where = config.resolve_one("queue-mismatch")
    if mismatch and re.search(mismatch, args.queue):
        raise ConfigError(f"queue {args.queue!r} would never be served: it matches --queue-mismatch "
                          f"{mismatch!r} ({where}); pass --any-queue-name to queue it anyway")


def _submit(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from studio_runner.submit import Submission, submit

    if not args.script.is_file():
        what = "is a directory, not a script" if args.script.is_dir() else "does not exist"
        raise ConfigError(f"submit: {args.script} {what} (usage: {parser.format_usage().strip()[7:]})")
    _check_queue_name(args)
    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--env expects K=V, got {item!r}")
        env[name] = value
    queue_root = args.queue_root or _studioml_home() / "queue"
    storage_root = args.storage_root or _studioml_home() / "storage" / "studioml"
    request: dict[str, Any] = submit(Submission(
        script=args.script, args=args.args, queue=args.queue, experiment=args.experiment,
        project=args.project, python_packages=args.python_pkg, env=env, max_duration=args.max_duration,
        lifetime=args.lifetime, cpus=args.cpus, ram=args.ram, hdd=args.hdd, gpus=args.gpus,
        gpu_mem=args.gpu_mem, gpu_count=args.gpu_count,
    ), queue_root, storage_root, show_progress=True)
    print(f"submitted {request['experiment']['key']} to {queue_root / args.queue}")
    default_roots = _studioml_home() / "storage"
    if args.storage_root and not Path(args.storage_root).resolve().is_relative_to(default_roots.resolve()):
        print(f"note: runners read local artifacts only under --local-storage-roots (default "
              f"{default_roots}); run them with --local-storage-roots {args.storage_root}", file=sys.stderr)
    return 0
