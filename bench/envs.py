"""Cold environment builds: pip versus the runner's EnvCache, on one requirement list.

Builds the list three ways, each into fresh temporary directories (the user's pip, uv and runner caches are
never used), the runner's first (b, c, then a):

(a) ``python -m venv`` + ``pip install --no-cache-dir`` (what a plain client-side install costs);
(b) the runner's ``EnvCache`` with an empty uv cache (a fresh machine);
(c) the runner's ``EnvCache`` again, on (b)'s now warm uv cache but an empty environment cache (a new
    environment on a machine that has installed these packages before).

Prints the seconds of each and the ratio (b)/(a) (issue 7 asks for at most 0.3). Since environments are built
without bytecode, it also prints what that moves to the experiment: the first import of a few modules (it
compiles them) against the second (it loads the ``.pyc``), and the cost of re-measuring the environment's
size, which the runner now does on each release. Figures only, no assertions; needs network access to PyPI.

Default list: the 75 pins of a plain ``pip install studioml`` (0.0.49), the ``pythonenv`` of the fixture
tests/fixtures/studioml/hello_plain.json.

    python bench/envs.py [--requirements FILE] [--python 3.11] [--imports studio,boto3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from studio_runner.envs import EnvCache, PythonEnv, _measure, find_interpreter, normalise_requirements  # noqa: E402
from studio_runner.errors import Disposition, EnvBuildFailed  # noqa: E402

FIXTURE = REPO / "tests" / "fixtures" / "studioml" / "hello_plain.json"


def default_requirements() -> tuple[list[str], str]:
    """(pins, pythonver) the StudioML client sent for a plain hello-world experiment."""
    experiment = json.loads(FIXTURE.read_text())["experiment"]
    return list(experiment["pythonenv"]), str(experiment["pythonver"])


def clean_env() -> dict[str, str]:
    """The bench's environment without settings that would change what is measured: no pip configuration
    files (local wheel directories or extra indexes would favour pip), PyPI only, bytecode written as in a
    run. ``PIP_CERT`` and the like stay: reaching PyPI through a TLS-intercepting proxy needs them."""
    drop = {"PYTHONDONTWRITEBYTECODE", "PIP_CACHE_DIR", "PIP_NO_CACHE_DIR", "PIP_FIND_LINKS", "PIP_INDEX_URL"}
    drop |= {"PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX", "UV_CACHE_DIR", "UV_COMPILE_BYTECODE", "UV_INDEX_URL"}
    drop |= {"UV_EXTRA_INDEX_URL", "UV_FIND_LINKS", "UV_INDEX", "UV_DEFAULT_INDEX", "UV_NO_INDEX"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PIP_CONFIG_FILE"] = os.devnull  # pip then reads no configuration file at all
    return env


class PipFailed(Exception):
    """pip's install exited non-zero."""


def pip_build(python: Path, requirements: list[str], work: Path) -> tuple[float, int]:
    """(seconds, network retries pip reported) for ``python -m venv`` + ``pip install --no-cache-dir -r``.

    Retries are counted because each one adds pip's back-off to the figure: a run with retries overstates
    pip's time and flatters the ratio."""
    work.mkdir()
    reqfile = work / "requirements.txt"
    reqfile.write_text("".join(f"{line}\n" for line in requirements))
    venv = work / "venv"
    started = time.monotonic()
    subprocess.run([str(python), "-m", "venv", str(venv)], check=True, env=clean_env())
    cmd = [
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "--no-cache-dir",
        "--no-input",
        "-r",
        str(reqfile),
    ]
    if os.environ.get("PIP_CERT"):  # a TLS-intercepting proxy's CA bundle: pass it on explicitly
        cmd += ["--cert", os.environ["PIP_CERT"]]
    done = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
        raise PipFailed(f"pip install failed with exit status {done.returncode}")
    return seconds, done.stderr.count("Retrying (")


def runner_build(
    root: Path, uv_cache: Path, pythonver: str, requirements: list[str]
) -> tuple[float, PythonEnv]:
    """(wall seconds, env) for one cold ``EnvCache.acquire`` with its uv cache at ``uv_cache``."""
    cache = EnvCache(root, 0, uv_cache_dir=uv_cache)
    lines: list[str] = []

    async def main() -> PythonEnv:
        async with cache.acquire(pythonver, requirements, [], lines.append) as env:
            return env

    started = time.monotonic()
    try:
        env = trio.run(main)
    except Exception:
        print("\n".join(lines[-30:]), file=sys.stderr)
        raise
    return time.monotonic() - started, env


def import_seconds(env: PythonEnv, modules: list[str]) -> float:
    """Seconds for the env's python to import ``modules``, as an experiment would (bytecode written)."""
    started = time.monotonic()
    subprocess.run([str(env.python), "-c", f"import {', '.join(modules)}"], check=True, env=clean_env())
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requirements", type=Path, help="a requirements file instead of the studioml pins")
    parser.add_argument("--python", help="pythonver to build for (default: the fixture's, 3.11)")
    parser.add_argument("--imports", help="comma-separated modules to time on first and second import")
    args = parser.parse_args()

    pins, pythonver = default_requirements()
    imports = "studio,boto3"
    if args.requirements:
        pins, imports = args.requirements.read_text().splitlines(), ""
    pythonver = args.python or pythonver
    imports = args.imports if args.imports is not None else imports
    cleaned = clean_env()
    os.environ.clear()
    os.environ.update(cleaned)  # EnvCache passes UV_* settings through to uv
    requirements = normalise_requirements(pins, [])
    interpreter = find_interpreter(pythonver, [], False, False)
    print(f"{len(requirements)} requirements, python {interpreter.version} ({interpreter.path})")

    work = Path(tempfile.mkdtemp(prefix="studio-runner-bench-envs-"))
    try:
        cold_s, cold, uv_cache = attempts(
            "(b)",
            lambda n: (
                *runner_build(work / f"envs-cold-{n}", work / f"uv-cache-{n}", pythonver, requirements),
                work / f"uv-cache-{n}",
            ),
        )
        print(
            f"(b) runner EnvCache, empty uv cache (cold):   {cold_s:6.1f} s (build {cold.build_seconds:.1f})"
        )
        warm_s, warm = attempts(
            "(c)", lambda n: runner_build(work / f"envs-warm-{n}", uv_cache, pythonver, requirements)
        )
        print(
            f"(c) runner EnvCache, warm uv cache, new env:  {warm_s:6.1f} s (build {warm.build_seconds:.1f})"
        )
        pip_s, retries = attempts(
            "(a)", lambda n: pip_build(interpreter.path, requirements, work / f"pip-{n}")
        )
        print(f"(a) pip install --no-cache-dir, fresh venv:    {pip_s:6.1f} s ({retries} network retries)")
        print(f"ratio (b)/(a): {cold_s / pip_s:.2f}   (c)/(a): {warm_s / pip_s:.2f}")
        if imports:
            modules = [m.strip() for m in imports.split(",") if m.strip()]
            first, second = import_seconds(cold, modules), import_seconds(cold, modules)
            print(f"import {', '.join(modules)} in (b): first {first:.2f} s (compiles), then {second:.2f} s")
        started = time.monotonic()
        size = _measure(cold.path)
        print(f"re-measuring (b)'s size on release: {time.monotonic() - started:.3f} s ({size} bytes)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


T = TypeVar("T")


def attempts(label: str, measure: Callable[[int], T], tries: int = 3) -> T:
    """``measure(n)`` until it gets through: a TLS or network failure (seen here through an intercepting
    proxy) says nothing about the installer, so it is retried from scratch in fresh directories."""
    for n in range(tries):
        try:
            return measure(n)
        except (EnvBuildFailed, PipFailed) as exc:
            transient = isinstance(exc, PipFailed) or exc.disposition is Disposition.RETRY
            if not transient or n == tries - 1:
                raise
            print(
                f"{label} attempt {n + 1} failed on the network, measuring again: {str(exc).splitlines()[0]}"
            )
            time.sleep(20.0 * (n + 1))
    raise AssertionError("unreachable")


if __name__ == "__main__":
    main()
