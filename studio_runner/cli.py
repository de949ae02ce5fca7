"""Command line: run, submit, demo, config-example, version. Nothing but argument handling lives here."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

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
  studio-runner submit train.py --lr 0.1               queue train.py like `studio run` in local mode
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="studio-runner", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"studio-runner {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="serve queues and run experiments (the daemon)",
                              description="Serve queues and run experiments until stopped (SIGINT/SIGTERM: "
                              "stop taking work; a second signal stops running experiments, which are "
                              "handed back to their queue).")
    run.add_argument("--once", action="store_true",
                     help="exit when every served queue is empty (or holds only work that does not fit); "
                     "exit status 1 when an experiment that ran did not succeed")
    config.add_option_flags(run)

    submit = commands.add_parser("submit", help="queue a script like `studio run` does in local mode",
                                 description="Pack the script's directory as the workspace artifact into "
                                 "local storage and put a StudioML request on a local queue.")
    submit.add_argument("script", type=Path, help="the experiment's entry point")
    submit.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    submit.add_argument("--queue", default="local_default", help="local queue name (default: local_default)")
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
                               description="Submits four example experiments (metadata, an extra package, "
                               "a failure, a timeout) to a fresh local queue, runs them and prints a table.")
    demo.add_argument("--demo-dir", type=Path, help="keep queue, storage and scratch here (default: temp)")
    config.add_option_flags(demo)

    commands.add_parser("config-example", help="print a config.example.toml documenting every option")
    commands.add_parser("version", help="print the version")
    return parser


def _studioml_home() -> Path:
    return Path(os.environ.get("STUDIOML_HOME") or Path.home() / ".studioml")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "demo":
            from studio_runner.demo import run_demo

            flags = {k: v for k, v in vars(args).items() if k not in ("command", "demo_dir")}
            return run_demo(flags, args.demo_dir)
        if args.command == "submit":
            return _submit(args)
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


def _run(args: argparse.Namespace) -> int:
    import trio

    from studio_runner import runtime
    from studio_runner.attempt import Status

    settings = config.resolve(args)
    runtime.configure_logging(settings.log_level, runner_secrets(os.environ))

    async def serve() -> int:
        async with runtime.open_runner(settings) as supervisor:
            outcomes = await supervisor.run(once=args.once, handle_signals=True)
        ran = [o for o in outcomes if o.status is not Status.DEFERRED]  # released untried: not a result
        return 0 if all(o.status is Status.SUCCESS for o in ran) or not args.once else 1

    return trio.run(serve)


def _submit(args: argparse.Namespace) -> int:
    from studio_runner.submit import Submission, submit

    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--env expects K=V, got {item!r}")
        env[name] = value
    queue_root = args.queue_root or _studioml_home() / "queue"
    storage_root = args.storage_root or _studioml_home() / "storage" / "studioml"
    request = submit(Submission(
        script=args.script, args=args.args, queue=args.queue, experiment=args.experiment,
        project=args.project, python_packages=args.python_pkg, env=env, max_duration=args.max_duration,
        lifetime=args.lifetime, cpus=args.cpus, ram=args.ram, hdd=args.hdd, gpus=args.gpus,
        gpu_mem=args.gpu_mem, gpu_count=args.gpu_count,
    ), queue_root, storage_root)
    print(f"submitted {request['experiment']['key']} to {queue_root / args.queue}")
    return 0
