"""Python environment cache: real environments built by real uv from PyPI.

Builds are shared through a session-scoped cache root, so each environment is built once per test session.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from studio_runner.envs import (
    LAST_USED_FILE,
    SIZE_FILE,
    EnvCache,
    PythonEnv,
    default_interpreter,
    env_key,
    find_interpreter,
    normalise_requirements,
)
from studio_runner.errors import Disposition, EnvBuildFailed, InterpreterNotFound

SIX = ["six==1.16.0"]
PYENV_VERSIONS = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
slow = pytest.mark.slow  # builds real environments


def needs_pyenv_310(test):  # type: ignore[no-untyped-def]
    """Skips (an expected skip) on machines without a pyenv 3.10.x."""
    test = pytest.mark.skipif(not any(PYENV_VERSIONS.glob("3.10.*")), reason="needs a pyenv 3.10.x")(test)
    return pytest.mark.expected_skip("needs a pyenv 3.10.x")(test)


@dataclass
class Built:
    env: PythonEnv
    log: list[str]


@pytest.fixture(scope="session")
def roots(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(cache root, uv cache): siblings on one filesystem, so uv installs by hardlink."""
    base = tmp_path_factory.mktemp("envcache")
    return base / "envs", base / "uv-cache"


def make_cache(roots: tuple[Path, Path], root: Path | None = None, uv_bin: str | None = None) -> EnvCache:
    """An unbounded cache on the session root (or ``root``) sharing the session's uv cache."""
    return EnvCache(root or roots[0], 0, uv_bin=uv_bin, uv_cache_dir=roots[1])


def acquire_once(
    cache: EnvCache, pythonver: str, pythonenv: Sequence[str], extra: Sequence[str] = ()
) -> Built:
    log: list[str] = []

    async def main() -> PythonEnv:
        async with cache.acquire(pythonver, list(pythonenv), list(extra), log.append) as env:
            return env

    return Built(trio.run(main), log)


def run_python(env: PythonEnv, code: str) -> str:
    done = subprocess.run([str(env.python), "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.fixture(scope="session")
def six_env(roots: tuple[Path, Path]) -> Built:
    return acquire_once(make_cache(roots), "3.11", SIX)


@pytest.fixture(scope="session")
def git_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny package in a local git repository, for a pip-freeze style ``-e git+...`` line."""
    repo = tmp_path_factory.mktemp("tinypkg")
    (repo / "tinypkg").mkdir()
    (repo / "tinypkg" / "__init__.py").write_text("VALUE = 42\n")
    (repo / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["flit_core>=3.2,<4"]\nbuild-backend = "flit_core.buildapi"\n'
        '[project]\nname = "tinypkg"\nversion = "0.1.0"\ndescription = "test"\n'
    )
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "-C", str(repo)]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "init"]):
        subprocess.run(git + args, check=True)
    return repo


# --- requirements and keys ---------------------------------------------------------------------------------


def test_normalise_drops_noise_normalises_pins_and_sorts() -> None:
    freeze = [
        "",
        "# a comment",
        "Six==1.16.0",
        "pkg-resources==0.0.0",
        "pkg_resources==0.0.0",
        "Zope.Interface==5.0  # trailing comment",
        "-e git+https://user:tok@example.com/x/y.git@abc#egg=y",
        "tinypkg @ file:///home/client/tinypkg",
        "six==1.16.0",
    ]
    assert normalise_requirements(freeze, ["Requests[Security,SOCKS]==2.0"]) == [
        "-e git+https://user:tok@example.com/x/y.git@abc#egg=y",
        "requests[security,socks]==2.0",
        "six==1.16.0",
        "tinypkg @ file:///home/client/tinypkg",
        "zope-interface==5.0",
    ]


def test_extra_pin_replaces_the_same_package_pinned_in_pythonenv() -> None:
    assert normalise_requirements(["six==1.15.0", "attrs==23.1.0"], ["Six==1.16.0", "rich"]) == [
        "attrs==23.1.0",
        "rich",
        "six==1.16.0",
    ]


def test_key_is_stable_under_order_case_and_separators_and_follows_the_interpreter() -> None:
    a = ["Foo_Bar==1.0", "six==1.16.0", "zope.interface==5.0"]
    b = ["zope-interface==5.0", "six==1.16.0", "foo-bar==1.0", "foo.bar==1.0", "pkg-resources==0.0.0"]
    assert env_key("3.11.7", normalise_requirements(a, [])) == env_key(
        "3.11.7", normalise_requirements(b, [])
    )
    assert env_key("3.11.7", a) == env_key("3.11.7", normalise_requirements(a, []))
    assert env_key("3.11.7", a) != env_key("3.11.8", a)
    assert env_key("3.11.7", a) != env_key("3.11.7", a + ["attrs==23.1.0"])
    assert len(env_key("3.11.7", a)) == 16


# --- interpreters ------------------------------------------------------------------------------------------


@needs_pyenv_310
def test_prefix_picks_an_installed_pyenv_version_uv_alone_may_not_see() -> None:
    found = find_interpreter("3.10", [], False, True)
    assert found.matched and found.version.startswith("3.10.") and found.note == ""
    assert found.path.is_relative_to(PYENV_VERSIONS)
    version = subprocess.run(
        [str(found.path), "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert version.split()[1] == found.version


def test_prefix_matches_whole_components_and_bare_major_means_the_default() -> None:
    default = default_interpreter()
    assert find_interpreter("3", [], False, True) == default
    assert find_interpreter("", [], False, True) == default
    missing = find_interpreter("3.1", [], False, False)  # must not take 3.10+
    assert not missing.matched and missing.version == default.version


def test_no_match_falls_back_with_a_note_unless_strict() -> None:
    fallback = find_interpreter("2.5", [], False, False)
    assert not fallback.matched
    assert fallback.path == default_interpreter().path
    assert fallback.note == f"requested python 2.5, none found; using {default_interpreter().version}"
    with pytest.raises(InterpreterNotFound, match="requested python 2.5, none found"):
        find_interpreter("2.5", [], False, True)


@pytest.mark.expected_skip("needs pyenv's 3.9.18")
def test_configured_search_paths_are_searched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = PYENV_VERSIONS / "3.9.18"
    if not prefix.is_dir():
        pytest.skip("needs pyenv's 3.9.18")
    monkeypatch.setenv("PYENV_ROOT", str(tmp_path))  # hide pyenv: only the configured path can supply 3.9
    assert not find_interpreter("3.9", [], False, False).matched
    found = find_interpreter("3.9", [prefix], False, True)
    assert found.matched and found.version == "3.9.18" and found.path.is_relative_to(prefix)


# --- building and reuse ------------------------------------------------------------------------------------


@slow
def test_built_env_runs_the_pinned_package(six_env: Built, roots: tuple[Path, Path]) -> None:
    env = six_env.env
    assert not env.cache_hit and env.build_seconds > 0
    assert env.path == roots[0] / env.key and env.interpreter.version.startswith("3.11.")
    assert run_python(env, "import six, sys; print(six.__version__, sys.prefix)") == f"1.16.0 {env.path}"
    assert any("six==1.16.0" in line for line in six_env.log)  # uv's output reached the experiment's log
    assert int((env.path / SIZE_FILE).read_text()) > 1_000_000
    six_py = (
        env.path / "lib" / f"python{env.interpreter.version.rsplit('.', 1)[0]}" / "site-packages" / "six.py"
    )
    assert six_py.stat().st_nlink > 1  # hardlinked from uv's cache, not copied
    pip = subprocess.run(
        [str(env.path / "bin" / "pip"), "--version"], capture_output=True, text=True, check=True
    )
    assert str(env.path) in pip.stdout  # console scripts survive the rename out of the build directory


@slow
def test_second_acquire_is_a_hit_that_never_runs_uv(six_env: Built, roots: tuple[Path, Path]) -> None:
    before = (six_env.env.path.stat().st_ino, (six_env.env.path / "pyvenv.cfg").stat().st_ino)
    no_uv = make_cache(roots, uv_bin="/nonexistent/uv")  # a miss would have to build without uv
    find_interpreter("3.11", [], False, False)  # discovery is cached per process, as in the runner
    started = time.monotonic()
    again = acquire_once(no_uv, "3.11", ["SIX==1.16.0", "pkg-resources==0.0.0"])
    elapsed = time.monotonic() - started
    assert again.env.cache_hit and again.env.key == six_env.env.key and again.env.build_seconds == 0
    assert again.log == [] and no_uv.builds == 0 and no_uv.hits == 1
    assert (again.env.path.stat().st_ino, (again.env.path / "pyvenv.cfg").stat().st_ino) == before
    assert elapsed < 1.0, elapsed


@slow
def test_build_compiles_no_bytecode_and_the_first_import_writes_it(
    roots: tuple[Path, Path], tmp_path: Path
) -> None:
    """Eager compilation was most of a cold build: the experiment's Python compiles what it imports, into
    the cached environment, and the recorded size follows on release (eviction counts it)."""
    cache = make_cache(roots, root=tmp_path / "envs")

    async def main() -> tuple[PythonEnv, int, list[Path]]:
        async with cache.acquire("3.11", ["idna==3.7", *SIX], [], lambda line: None) as env:
            site = next(env.path.glob("lib/python3.*/site-packages"))
            assert (site / "idna" / "core.py").is_file() and not list(site.rglob("*.pyc"))
            built_size = int((env.path / SIZE_FILE).read_text())
            code = "import idna, six; print(idna.encode('bücher.de').decode(), six.__version__)"
            as_experiment = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
            for _ in range(2):  # the first run writes the bytecode, the second loads it
                cmd = [str(env.python), "-c", code]
                done = subprocess.run(cmd, env=as_experiment, capture_output=True, text=True, check=True)
                assert done.stdout.strip() == "xn--bcher-kva.de 1.16.0"
                written = list((site / "idna" / "__pycache__").glob("core.*.pyc"))
                assert written and (site / "__pycache__").is_dir()  # six's too
            return env, built_size, written

    env, built_size, written = trio.run(main)
    assert int((env.path / SIZE_FILE).read_text()) >= built_size + sum(p.stat().st_size for p in written)
    assert not list(env.path.glob(f"{SIZE_FILE}.*"))  # the rewrite left no temporary file


@slow
def test_pip_and_setuptools_pins_and_freeze_style_editable_vcs(
    roots: tuple[Path, Path], git_repo: Path
) -> None:
    freeze = ["pip==23.2.1", "setuptools==65.5.0", f"-e git+file://{git_repo}#egg=tinypkg"]
    env = acquire_once(make_cache(roots), "3.11", freeze).env
    assert not env.cache_hit
    assert (
        run_python(env, "import setuptools, tinypkg; print(setuptools.__version__, tinypkg.VALUE)")
        == "65.5.0 42"
    )
    assert run_python(env, "import pip; print(pip.__version__)") == "23.2.1"


@slow
def test_impossible_pin_fails_with_uvs_error_and_leaves_nothing(roots: tuple[Path, Path]) -> None:
    cache = make_cache(roots)
    log: list[str] = []

    async def main() -> None:
        async with cache.acquire("3.11", ["this-package-does-not-exist-xyz==1.0"], [], log.append):
            raise AssertionError("must not be reached")

    with pytest.raises(EnvBuildFailed) as failed:
        trio.run(main)
    assert "this-package-does-not-exist-xyz" in str(failed.value) and "not found" in str(failed.value)
    assert failed.value.disposition is Disposition.FAIL
    assert any("not found in the package registry" in line for line in log)
    key = env_key(default_interpreter().version, ["this-package-does-not-exist-xyz==1.0"])
    assert not (roots[0] / key).exists() and not (roots[0] / f"{key}.lock").exists()
    assert not list(roots[0].glob(".build-*"))
    assert cache.builds == 0


@slow
def test_a_cancelled_build_leaves_nothing_half_built(roots: tuple[Path, Path]) -> None:
    cache = make_cache(roots)
    requirements = ["six==1.15.0"]
    key = env_key(default_interpreter().version, requirements)
    seen: list[str] = []

    async def main() -> None:
        with trio.CancelScope() as scope:

            def log(line: str) -> None:
                seen.append(line)
                if len(seen) == 2:  # the first line from uv: the build is under way
                    scope.cancel()

            async with cache.acquire("3.11", requirements, [], log):
                raise AssertionError("must not be reached")
        assert scope.cancelled_caught

    trio.run(main)
    assert seen[0].startswith("studio-runner: building") and len(seen) >= 2
    assert not (roots[0] / key).exists() and not list(roots[0].glob(f".build-{key}-*"))
    assert not (roots[0] / f"{key}.lock").exists() and cache.builds == 0


@slow
def test_network_failure_is_retryable_and_masks_url_credentials(
    roots: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UV_HTTP_RETRIES", "0")
    cache = make_cache(roots)
    with pytest.raises(EnvBuildFailed) as failed:
        acquire_once(cache, "3.11", ["pkg @ https://user:secrettoken@127.0.0.1:9/pkg-1.0.tar.gz"])
    assert "secrettoken" not in str(failed.value) and "127.0.0.1:9" in str(failed.value)
    assert failed.value.disposition is Disposition.RETRY


@slow
def test_concurrent_acquires_of_one_key_build_once(roots: tuple[Path, Path]) -> None:
    cache = make_cache(roots)
    envs: list[PythonEnv] = []

    async def use(both_in: trio.Event, done: list[int]) -> None:
        async with cache.acquire("3.11", [], [], lambda line: None) as env:
            envs.append(env)
            done.append(1)
            if len(done) == 2:
                both_in.set()
            await both_in.wait()  # both hold the env at the same time

    async def main() -> None:
        both_in, done = trio.Event(), list[int]()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(use, both_in, done)
            nursery.start_soon(use, both_in, done)

    trio.run(main)
    assert cache.builds == 1 and cache.hits == 1
    assert sorted(env.cache_hit for env in envs) == [False, True] and envs[0].path == envs[1].path


@slow
@needs_pyenv_310
def test_two_runners_sharing_a_root_build_once(roots: tuple[Path, Path]) -> None:
    """Two caches on one root share only the file locks, like two runner processes on one host."""
    first, second = make_cache(roots), make_cache(roots)
    envs: list[PythonEnv] = []

    async def use(cache: EnvCache) -> None:
        async with cache.acquire("3.10", [], [], lambda line: None) as env:
            envs.append(env)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(use, first)
            nursery.start_soon(use, second)

    trio.run(main)
    assert first.builds + second.builds == 1 and first.hits + second.hits == 1
    assert (
        envs[0].path == envs[1].path
        and run_python(envs[0], "import sys; print(sys.version_info[:2])") == "(3, 10)"
    )


@slow
@needs_pyenv_310
def test_eviction_removes_the_lru_unused_entry_and_spares_one_in_use(
    roots: tuple[Path, Path], tmp_path: Path
) -> None:
    root = tmp_path / "small"
    cache = EnvCache(root, 1, uv_cache_dir=roots[1])  # every entry is over the bound
    seen: dict[str, PythonEnv] = {}

    async def take(name: str, pythonver: str, reqs: list[str]) -> None:
        async with cache.acquire(pythonver, reqs, [], lambda line: None) as env:
            seen[name] = env

    async def main() -> None:
        async with cache.acquire("3.11", SIX, [], lambda line: None) as held:
            await take("lru", "3.11", [])  # built, released: the least recently used unused entry
            assert (root / seen["lru"].key).is_dir()  # X in use, lru just built: nothing evictable yet
            await trio.sleep(0.01)
            await take("newest", "3.10", [])  # this build evicts "lru" but must keep the held one
            assert held.python.exists() and run_python(held, "import six; print(six.__version__)") == "1.16.0"

    trio.run(main)
    assert not (root / seen["lru"].key).exists() and not (root / f"{seen['lru'].key}.lock").exists()
    assert (root / seen["newest"].key / SIZE_FILE).is_file()
    assert cache.evictions == 1 and not list(root.glob(".evict-*"))


def test_start_up_adopts_entries_and_clears_dead_builds(tmp_path: Path, roots: tuple[Path, Path]) -> None:
    root = tmp_path / "envs"
    stale, fresh, dying = (
        root / ".build-0123456789abcdef-x1",
        root / ".build-0123456789abcdef-x2",
        root / ".evict-a",
    )
    adopted = root / "fedcba9876543210"
    for directory in (stale, fresh, dying, adopted):
        directory.mkdir(parents=True)
    (adopted / "payload").write_bytes(b"x" * 1234)
    (adopted / "hardlink").hardlink_to(adopted / "payload")  # counted once
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))

    trio.run(make_cache(roots, root=root).start)
    assert not stale.exists() and not dying.exists() and fresh.exists()
    assert not (root / "0123456789abcdef.lock").exists()
    assert (adopted / SIZE_FILE).read_text() == "1234"


@slow
def test_without_uv_the_small_fallback_builds_a_relocated_working_env(tmp_path: Path) -> None:
    cache = EnvCache(tmp_path / "envs", 0, uv_bin="/nonexistent/uv")
    built = acquire_once(cache, "3.11", SIX)
    env = built.env
    assert not env.cache_hit and any("uv not available" in line for line in built.log)
    assert run_python(env, "import six; print(six.__version__)") == "1.16.0"
    pip = subprocess.run(
        [str(env.path / "bin" / "pip"), "--version"], capture_output=True, text=True, check=True
    )
    assert str(env.path) in pip.stdout
    assert (env.path / LAST_USED_FILE).exists() and not list((tmp_path / "envs").glob(".build-*"))
    shutil.rmtree(tmp_path / "envs")


# --- interpreters uv cannot use (item 14) ------------------------------------------------------------------

_PROBE = "import platform; print(platform.python_version())"


def fake_python(prefix: Path, version: str, real: Path | None = None) -> Path:
    """A real executable in ``prefix/bin`` that answers our version probe with ``version``. Anything else
    is handed to ``real`` (a working interpreter) or fails, like an interpreter uv cannot use."""
    exe = prefix / "bin" / "python3"
    exe.parent.mkdir(parents=True, exist_ok=True)
    rest = f'exec "{real}" "$@"' if real else 'echo "not a python uv can use" >&2; exit 1'
    probe = f'if [ "$1" = "-c" ] && [ "$2" = "{_PROBE}" ]; then echo {version}; exit 0; fi'
    exe.write_text(f"#!/bin/sh\n{probe}\n{rest}\n")
    exe.chmod(0o755)
    return exe


def test_a_match_uv_cannot_use_is_passed_over_with_a_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pythonver "2.7" once picked pyenv's 2.7 and failed the attempt in ``uv venv``."""
    monkeypatch.setenv("PYENV_ROOT", str(tmp_path / "no-pyenv"))  # only the fake can answer for 2.7
    fake = fake_python(tmp_path / "py27", "2.7.18")
    default = default_interpreter()

    found = find_interpreter("2.7", [tmp_path / "py27"], False, False)

    assert not found.matched and found.path == default.path and found.version == default.version
    assert found.note.startswith(f"requested python 2.7, found 2.7.18 at {fake}, which uv cannot use (")
    assert found.note.endswith(f"; using {default.version}")
    with pytest.raises(InterpreterNotFound, match="which uv cannot use .* strict python selection is on"):
        find_interpreter("2.7", [tmp_path / "py27"], False, True)


@pytest.mark.skipif(not any(PYENV_VERSIONS.glob("2.7.*")), reason="needs a pyenv 2.7.x")
@pytest.mark.expected_skip("needs a pyenv 2.7.x")
def test_pyenv_27_falls_back_to_the_default_and_builds(roots: tuple[Path, Path]) -> None:
    built = acquire_once(make_cache(roots), "2.7", [])
    interpreter = built.env.interpreter
    assert not interpreter.matched and interpreter.path == default_interpreter().path
    assert "found 2.7." in interpreter.note and "which uv cannot use" in interpreter.note
    assert run_python(built.env, "import sys; print(sys.version_info[0])") == "3"


@slow
def test_a_matched_interpreter_that_fails_the_build_is_replaced_by_the_default(
    tmp_path: Path, roots: tuple[Path, Path]
) -> None:
    """An interpreter that was fine when found and broke before the build (uninstalled, damaged): the
    environment is built with the default interpreter, and the output and the note say so."""
    default = default_interpreter()
    prefix = tmp_path / "py399"
    exe = fake_python(prefix, "3.99.0", real=default.path)  # a working interpreter claiming 3.99
    found = find_interpreter("3.99", [prefix], False, False)  # what EnvCache will find (remembered)
    assert found.matched and found.path == exe and found.version == "3.99.0"
    fake_python(prefix, "3.99.0")  # now it breaks: only our probe still answers
    os.utime(exe, (time.time() + 5, time.time() + 5))  # uv re-inspects a changed interpreter

    cache = EnvCache(roots[0], 0, uv_cache_dir=roots[1], search_paths=[prefix])
    built = acquire_once(cache, "3.99", [])

    interpreter = built.env.interpreter
    assert not interpreter.matched and interpreter.path == default.path
    assert interpreter.note.startswith(f"requested python 3.99, the environment could not be created with "
                                       f"3.99.0 at {exe} (")
    assert interpreter.note.endswith(f"; using {default.version}")
    assert any(f"building with the default python {default.version} instead" in line for line in built.log)
    assert run_python(built.env, "import platform; print(platform.python_version())") == default.version
    failed_key = env_key("3.99.0", [])
    assert not (roots[0] / failed_key).exists() and not (roots[0] / f"{failed_key}.lock").exists()
    assert not list(roots[0].glob(f".build-{failed_key}-*"))

    strict = EnvCache(roots[0], 0, uv_cache_dir=roots[1], search_paths=[prefix], strict_python=True)
    with pytest.raises(InterpreterNotFound, match="could not be created with 3.99.0.*strict python"):
        acquire_once(strict, "3.99", [])
