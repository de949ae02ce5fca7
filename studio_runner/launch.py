"""What the experiment is started with: its command line and its environment (spec README, "Experiment
environment"; lifecycle.md §3 and §6).

The environment is built from an explicit base, never from the runner's whole environment: a runner started
with cloud keys or tokens in its own environment must not hand them to every experiment. Anything else from
the runner's environment reaches experiments only when the operator names it (``--pass-env NAME``).
``%NAME%`` in ``config.env`` still reads the runner's environment (the client's documented way to inject a
host-side value), and whatever it pulls in is masked in the output like any secret.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterable, Mapping
from pathlib import Path

from studio_runner.gpus import hidden_environment
from studio_runner.redact import is_secret_name
from studio_runner.request import Request
from studio_runner.resources import thread_settings

BASE_VARIABLES = (
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ", "TERM",
    "LD_LIBRARY_PATH", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
)
"""Taken from the runner's environment when set (proxy passwords are masked in the output like any URL
password). Everything else needs ``--pass-env``."""

_PERCENT = re.compile(r"%([A-Za-z_][A-Za-z0-9_]*)%")
_DOLLAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def command_line(python: Path, filename: str, args: list[str]) -> list[str]:
    """``python -u <filename> <args>``; each arg was shell-quoted by the client, so it is split again here
    (``filename`` ``-m`` runs a module: its name is the first arg)."""
    argv = [str(python), "-u", filename]
    for arg in args:
        try:
            argv.extend(shlex.split(arg))
        except ValueError:  # not valid shell quoting: pass it through untouched
            argv.append(arg)
    return argv


def expand_value(value: str, runner_env: Mapping[str, str], composed: Mapping[str, str]) -> str:
    """``%NAME%`` from the runner's environment when set and non-empty (else kept verbatim), then
    ``$NAME``/``${NAME}`` from the environment composed so far. No command substitution, ever."""
    value = _PERCENT.sub(lambda m: runner_env.get(m.group(1)) or m.group(0), value)
    return _DOLLAR.sub(lambda m: composed.get(m.group(1) or m.group(2), m.group(0)), value)


def experiment_environment(runner_env: Mapping[str, str], request: Request, venv: Path, expdir: Path,
                           root: Path, tmpdir: Path, pass_env: Iterable[str] = (),
                           gpu_env: Mapping[str, str] | None = None, cores: int = 1) -> dict[str, str]:
    """The experiment's whole environment: base ▸ ``--pass-env`` ▸ ``config.env`` ▸ the runner's own
    variables (STUDIOML_*, TMPDIR, GPU settings), with the venv's ``bin`` first on PATH whatever
    ``config.env`` says.

    ``gpu_env`` names the cards the experiment was given (``CUDA_VISIBLE_DEVICES``...); without it every card
    is hidden, so a GPU the ledger did not hand out is never used. Thread counts (``OMP_NUM_THREADS``...)
    follow the ``cores`` reserved unless ``config.env`` sets them: the experimenter may know better."""
    env = {name: runner_env[name] for name in (*BASE_VARIABLES, *pass_env) if name in runner_env}
    env["VIRTUAL_ENV"] = str(venv)
    venv_bin = str(venv / "bin")
    env["PATH"] = _venv_first(venv_bin, env.get("PATH") or os.defpath)
    for name, value in request.config.env.items():
        env[name] = expand_value(value, runner_env, env)
    env.update({
        "STUDIOML_EXPERIMENT": expdir.name,
        "STUDIOML_HOME": str(root),
        "TMPDIR": str(tmpdir),
        "PYTHONUNBUFFERED": "1",
        **(gpu_env if gpu_env else hidden_environment()),  # "" hides every card (Go wrote -1)
    })
    env.pop("STUDIOML_ARTIFACT_MAPPING", None)
    env.pop("PYTHONHOME", None)
    env["PATH"] = _venv_first(venv_bin, env["PATH"])
    for name, value in thread_settings(cores).items():
        if name not in request.config.env:
            env[name] = value
    return env


def expanded_secrets(request: Request, env: Mapping[str, str]) -> list[str]:
    """Secret-named ``config.env`` values that expansion changed (``%TOKEN%`` pulled from the runner's
    environment): the request does not know them, so the output masker must be told."""
    return [env[name] for name, value in request.config.env.items()
            if is_secret_name(name) and env.get(name) and env[name] != value]


def _venv_first(venv_bin: str, path: str) -> str:
    parts = [p for p in path.split(os.pathsep) if p and p != venv_bin]
    return os.pathsep.join([venv_bin, *parts])
