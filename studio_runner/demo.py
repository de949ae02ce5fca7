"""``studio-runner demo``: submit the bundled example experiments, run them, show what happened.

Everything lives in one directory (a fresh temporary one unless ``--demo-dir`` is given): the local queue,
the local object store and the runner's scratch space. The environment cache is the real one, so a second
demo starts its experiments without installing anything.

While they run, a bar under the log counts finished experiments on a terminal; elsewhere one plain line per
finished experiment says the same.
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import trio

from studio_runner import config, runtime
from studio_runner.attempt import Action, Outcome
from studio_runner.console import TerminalBar
from studio_runner.events import Event, Settled
from studio_runner.redact import runner_secrets
from studio_runner.storage.local import url_to_path
from studio_runner.submit import Submission, submit

EXAMPLES = Path(__file__).parent / "examples"


@dataclass(frozen=True)
class Example:
    name: str
    script: str
    expected: str
    python_packages: tuple[str, ...] = ()
    max_duration: str | None = None


DEMO_EXAMPLES = (
    Example("metadata", "metadata/train.py", "success"),
    Example("pythonenv", "pythonenv/uses_package.py", "success", python_packages=("six==1.17.0",)),
    Example("fails", "fails/fails.py", "failed"),
    Example("timeout", "timeout/sleeps.py", "timeout", max_duration="3s"),
)


def run_demo(flags: dict, demo_dir: Path | None = None) -> int:
    base = Path(demo_dir or tempfile.mkdtemp(prefix="studio-runner-demo-")).resolve()
    queue_root, store_root = base / "queue", base / "storage" / "studioml"
    work = base / "work"
    work.mkdir(parents=True, exist_ok=True)
    flags = dict(flags)
    flags.update(queue_root=str(queue_root), working_dir=str(work),
                 local_storage_roots=str(base / "storage"))
    if flags.get("grace_period") is None:  # the timeout example need not wait the default 10 s
        flags["grace_period"] = "2s"
    settings = config.resolve(flags)
    runtime.configure_logging(settings.log_level, runner_secrets(os.environ), log_format=settings.log_format,
                              libraries=settings.log_libraries)

    print(f"demo directory: {base}")
    submitted: dict[str, Example] = {}
    for example in DEMO_EXAMPLES:
        request = submit(Submission(
            script=EXAMPLES / example.script, queue="local_demo", experiment=f"demo_{example.name}",
            python_packages=list(example.python_packages), max_duration=example.max_duration,
        ), queue_root, store_root)
        submitted[request["experiment"]["key"]] = example
        print(f"submitted {request['experiment']['key']} to local_demo")

    bar = TerminalBar("experiments", len(submitted))
    done: set[str] = set()

    def on_event(event: Event) -> None:
        if not isinstance(event, Settled) or event.action in (Action.HAND_BACK, Action.RELEASE):
            return  # it runs again
        key = event.record.key
        if key not in submitted or key in done:
            return
        done.add(key)
        status = event.record.status.value if event.record.status else "settled"
        if bar.plain:
            print(f"{len(done)}/{len(submitted)} experiments done: {key} {status}", flush=True)
        else:
            bar.update(len(done), f"{key} {status}", force=True)

    async def main() -> list[Outcome]:
        async with runtime.open_runner(settings) as supervisor:
            supervisor.registry.bus.subscribe(on_event)
            bar.update(0, force=True)
            return await supervisor.run(once=True, handle_signals=True)

    try:
        outcomes = trio.run(main)
    finally:
        bar.close()
    return report(outcomes, submitted)


def _output_text(url: str | None) -> str:
    if not url:
        return ""
    try:
        with tarfile.open(url_to_path(url)) as tar:
            member = tar.extractfile("output")
            return member.read().decode("utf-8", "replace") if member else ""
    except (OSError, KeyError, tarfile.TarError):
        return ""


def report(outcomes: list[Outcome], submitted: dict[str, Example]) -> int:
    rows = [("experiment", "expected", "status", "exit", "seconds", "env cache")]
    all_expected = True
    by_key = {o.key: o for o in outcomes}
    for key, example in submitted.items():
        outcome = by_key.get(key)
        status = outcome.status.value if outcome else "not run"
        all_expected &= status == example.expected
        rows.append((key, example.expected, status,
                     "" if outcome is None or outcome.exit_code is None else str(outcome.exit_code),
                     f"{outcome.seconds:.1f}" if outcome else "",
                     "" if outcome is None or outcome.env_cache_hit is None
                     else ("hit" if outcome.env_cache_hit else "built")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    print()
    for key in submitted:
        outcome = by_key.get(key)
        if outcome is None:
            continue
        print(f"{key}:")
        print(f"  output   {url_to_path(outcome.output_url) if outcome.output_url else '-'}")
        print(f"  metadata {url_to_path(outcome.metadata_url) if outcome.metadata_url else '-'}")
        if outcome.reason:
            print(f"  reason   {outcome.reason}")
        if outcome.metadata_url:
            document = json.loads(url_to_path(outcome.metadata_url).read_text())
            if "experiment" in document:
                print(f"  scraped  {json.dumps(document['experiment'])}")
        tail = [line for line in _output_text(outcome.output_url).splitlines()
                if line.strip() and not line.startswith(("{", "["))][-2:]
        for line in tail:
            print(f"  | {line}")
    print()
    print("all experiments ended as expected" if all_expected else "SOME EXPERIMENTS DID NOT END AS EXPECTED")
    return 0 if all_expected else 1
