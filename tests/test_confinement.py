"""Confinement (issue 9, item 4) with the real runner: a request may name only places under the storage roots
the runner is configured with, and none of its strings may become a path outside the experiment directory.

Every hostile request below is set aside at its first attempt with a reason that names the locator and the
allowed roots; its experiment never starts, nothing outside the roots is read (no copy of the canaries
anywhere) or written; a good request queued with them runs."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path
from typing import Any

import pytest
from support.runner import REPO, Sandbox, read_member

from studio_runner.submit import Submission, submit

pytestmark = pytest.mark.slow

QUEUE = "local_confined"
CANARY = b"CANARY-private-key-7f3a9c"
TAR_CANARY = b"CANARY-from-an-outside-archive-51be"
PASSWD_LINE = b"root:x:0:0:"

SCRIPT = textwrap.dedent("""\
    import os, sys
    key = os.environ["WHO"]
    open(os.path.join(os.environ["RAN_DIR"], key), "w").write("ran")
    print("experiment", key, "ran")
    for label in ("data", "workspace"):
        print(label, sorted(os.listdir(os.path.join("..", label))))
    """)


def queued(box: Sandbox, script: Path, key: str, ran: Path,
           store: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Submit ``key`` and return its message file and request, to be edited into a hostile one."""
    qdir = box.queue_root / QUEUE
    before = set(os.listdir(qdir)) if qdir.exists() else set()
    request = submit(Submission(script=script, queue=QUEUE, experiment=key,
                                env={"WHO": key, "RAN_DIR": str(ran)}), box.queue_root, store or box.store)
    (name,) = set(os.listdir(qdir)) - before - {"lock.lock"}
    return qdir / name, request


def rewrite(path: Path, request: dict[str, Any]) -> None:
    path.write_text(json.dumps(request))


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def files_under(root: Path) -> list[Path]:
    return [Path(d) / f for d, _dirs, names in os.walk(root) for f in names if not (Path(d) / f).is_symlink()]


def test_hostile_locators_are_set_aside_unread_and_a_good_request_runs(sandbox: Sandbox, tmp_path: Path):
    roots = sandbox.base / "storage"  # the store is roots/studioml, as in StudioML's local mode
    ran = tmp_path / "ran"
    ran.mkdir()
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_bytes(CANARY)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "stolen.tar").write_bytes(tar_bytes({"loot.txt": TAR_CANARY}))
    sandbox.store.mkdir(parents=True)
    (sandbox.store / "link").symlink_to(outside)  # inside a root, pointing out of it
    script_dir = tmp_path / "project"
    script_dir.mkdir()
    (script_dir / "show.py").write_text(SCRIPT)
    script = script_dir / "show.py"

    def data(locator: str, *, mutable: bool = False, unpack: bool = False) -> dict[str, Any]:
        return {"mutable": mutable, "unpack": unpack, "qualified": locator, "key": locator.rsplit("/", 1)[-1]}

    hostile: dict[str, tuple[str, Any]] = {
        # key: (label, artifact) put into the request
        "bad_passwd_path": ("data", data("/etc/passwd")),
        "bad_passwd_client_form": ("data", data("file:/" + "/etc/passwd")),
        "bad_ssh_key": ("data", data(f"file://{home}/.ssh/id_rsa")),
        "bad_symlink_out": ("data", data(f"file://{sandbox.store}/link/stolen.tar", unpack=True)),
        "bad_dotdot": ("data", data(f"file://{sandbox.store}/../../outside/stolen.tar", unpack=True)),
        "bad_workspace": ("workspace", data(f"{outside}/stolen.tar", unpack=True)),
        "bad_output": ("output", data(f"file://{outside}/written/output.tar", mutable=True)),
        "bad_mutable": ("modeldir", data(f"file://{outside}/written/modeldir.tar", mutable=True)),
        "bad_metadata": ("_metadata", data(f"file://{outside}/written/meta/_metadata.tar", mutable=True)),
        "bad_tilde": ("data", data("~/.ssh/id_rsa")),
    }
    for key, (label, artifact) in hostile.items():
        path, request = queued(sandbox, script, key, ran)
        request["experiment"]["artifacts"][label] = artifact
        rewrite(path, request)
    # An experiment key that would climb out of the store when it becomes part of the output's locator.
    path, request = queued(sandbox, script, "bad_key", ran)
    request["experiment"]["key"] = "../../../escaped_by_key"
    for artifact in request["experiment"]["artifacts"].values():
        if artifact.get("mutable"):
            artifact["qualified"] = artifact["qualified"].replace("/bad_key/", "/../../../escaped_by_key/")
    rewrite(path, request)
    # A label that names a path: refused when parsed.
    path, request = queued(sandbox, script, "bad_label", ran)
    request["experiment"]["artifacts"]["../../../label_escape"] = data(f"file://{sandbox.store}/x.tar")
    rewrite(path, request)
    # A good request whose file name (from its key) tries to climb out of the experiment directory.
    (sandbox.store / "inputs").mkdir()
    (sandbox.store / "inputs" / "evil").write_bytes(b"fine")
    path, request = queued(sandbox, script, "good", ran)
    request["experiment"]["artifacts"]["data"] = {
        "mutable": False, "unpack": False, "qualified": f"file://{sandbox.store}/inputs/evil",
        "key": "../../../../../evil"}
    rewrite(path, request)

    result = sandbox.run_once(STUDIO_RUNNER_LOCAL_STORAGE_ROOTS=str(roots), STUDIO_RUNNER_DEBUG="true")
    log = result.stdout + result.stderr

    # The good request ran, its input named after the key's last segment, inside its own directory.
    assert sorted(os.listdir(ran)) == ["good"], log[-6000:]
    output = sandbox.output_text("good")
    assert "experiment good ran" in output and "data ['evil']" in output
    assert [p for p in tmp_path.rglob("evil") if sandbox.work not in p.parents] == [sandbox.store / "inputs" /
                                                                                  "evil"]

    # Every hostile one is set aside at its first attempt, with a reason that names what was refused.
    aside = sandbox.set_aside(QUEUE)
    reasons = {p.name.removesuffix(".reason.txt"): p.read_text() for p in aside if p.name.endswith(".txt")}
    assert len(reasons) == len(hostile) + 2 and sandbox.pending(QUEUE) == []
    by_key = {}
    for name, text in reasons.items():
        body = (sandbox.queue_root / ".set-aside" / QUEUE / name).read_text()
        by_key[json.loads(body)["experiment"]["key"]] = text
    for key, (label, artifact) in hostile.items():
        text = by_key[key]
        assert "attempts: 1" in text, text
        assert f"artifact {label!r}" in text, text
        if key == "bad_tilde":
            assert "neither a URL nor an absolute path" in text
        else:
            assert "outside the storage roots" in text and str(roots) in text, text
            assert artifact["qualified"][:40] in text, text  # the locator, as the request wrote it
    assert "outside the storage roots" in by_key["../../../escaped_by_key"]
    assert "label_escape" in by_key["bad_label"] and "artifact label" in by_key["bad_label"]

    # Nothing outside the roots was read: no copy of any canary anywhere the runner writes; nothing written.
    for path in files_under(tmp_path):
        if path in (home / ".ssh" / "id_rsa", outside / "stolen.tar"):
            continue
        content = path.read_bytes()
        assert CANARY not in content and TAR_CANARY not in content, path
        assert PASSWD_LINE not in content, path
    assert sorted(os.listdir(outside)) == ["stolen.tar"]
    assert not (tmp_path / "escaped_by_key").exists() and not list(tmp_path.rglob("label_escape*"))
    assert "outside the storage roots" in log  # the runner says why, too


def test_the_default_roots_and_the_artifact_cache_are_served_and_an_empty_list_serves_none(
        sandbox: Sandbox, tmp_path: Path):
    """With the defaults a client in local mode works ($STUDIOML_HOME/storage) and the artifact cache is a
    root; an explicitly empty --local-storage-roots serves no local locator at all."""
    home = tmp_path / "studioml_home"
    store = home / "storage" / "studioml"
    ran = tmp_path / "ran"
    ran.mkdir()
    (tmp_path / "project").mkdir()
    script = tmp_path / "project" / "show.py"
    script.write_text(SCRIPT)
    cache = tmp_path / "cache"
    (cache / "seeded").mkdir(parents=True)
    (cache / "seeded" / "blob").write_bytes(b"from the cache dir")
    queued(sandbox, script, "default_roots", ran, store)
    path, request = queued(sandbox, script, "cache_root", ran, store)
    request["experiment"]["artifacts"]["data"] = {
        "mutable": False, "unpack": False, "qualified": f"file://{cache}/seeded/blob", "key": "blob"}
    rewrite(path, request)
    env = {"STUDIOML_HOME": str(home), "STUDIO_RUNNER_CACHE_DIR": str(cache)}

    result = sandbox.run_once(**env, STUDIO_RUNNER_LOCAL_STORAGE_ROOTS="")
    aside = sandbox.set_aside(QUEUE)
    assert len([p for p in aside if p.name.endswith(".reason.txt")]) == 2, result.stderr[-3000:]
    assert os.listdir(ran) == []
    for reason in (p.read_text() for p in aside if p.name.endswith(".reason.txt")):
        assert f"outside the storage roots this runner serves ({cache};" in reason, reason

    qdir = sandbox.queue_root / QUEUE
    for path in aside:  # queue them again and run with the default roots
        if path.name.endswith(".txt"):
            path.unlink()
        else:
            path.rename(qdir / path.name)
    runner_env = sandbox.runner_env(**env)
    del runner_env["STUDIO_RUNNER_LOCAL_STORAGE_ROOTS"]
    result = subprocess.run([sys.executable, str(REPO / "runner.py"), "run", "--once"], env=runner_env,
                            capture_output=True, text=True, timeout=300)
    assert sorted(os.listdir(ran)) == ["cache_root", "default_roots"], result.stderr[-4000:]
    assert sandbox.set_aside(QUEUE) == []
    assert "data ['blob']" in read_member(store / "experiments" / "cache_root" / "output.tar", "output")
