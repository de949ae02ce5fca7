"""The real executor on its own (no supervisor): one attempt, top to bottom, and what it reports to the
attempt registry. Real files, the local store, a real cached virtualenv and a real process."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import trio
from support.runner import read_member
from support.studioml_client import cache_root

from studio_runner import metadata
from studio_runner.attempt import Action, Phase, Status
from studio_runner.envs import EnvCache
from studio_runner.events import Registry, Transferred, current_attempt
from studio_runner.executor import Executor, ExecutorSettings
from studio_runner.request import Request, parse_request
from studio_runner.resources import Demand, Reservation
from studio_runner.storage import Stores
from studio_runner.submit import Submission, build_request, pack_workspace


def submitted(tmp_path: Path, key: str, code: str) -> tuple[Request, Path, str]:
    """The request ``submit`` makes for a script of ``code`` (local store under ``tmp_path``): the request,
    the store, and the workspace's key in it."""
    script = tmp_path / "ws" / "train.py"
    script.parent.mkdir()
    script.write_text(code)
    store = tmp_path / "store"
    workspace = pack_workspace(script.parent, store)
    request = parse_request(json.dumps(build_request(
        Submission(script=script, queue="local_x", experiment=key), store, workspace)))
    return request, store, workspace


async def executor_on(tmp_path: Path, registry: Registry | None = None, stores: Stores | None = None
                      ) -> Executor:
    """An executor with its root under ``tmp_path`` and the suite's shared environment cache."""
    env_cache = EnvCache(cache_root() / "envs", 20 << 30)
    await env_cache.start()
    return Executor(ExecutorSettings(root=tmp_path / "root", hostname="test-host",
                                     stores=stores if stores is not None else Stores(), env_cache=env_cache),
                    registry)


def test_one_attempt_reports_its_phases_and_bytes(tmp_path: Path) -> None:
    request, store, _ = submitted(tmp_path, "exp_direct",
                                  "import os\nos.makedirs('../modeldir', exist_ok=True)\n"
                                  "open('../modeldir/w.txt', 'w').write('weights')\nprint('trained')\n")
    registry = Registry("test-host")
    events: list[object] = []
    registry.bus.subscribe(events.append)

    async def main() -> object:
        def count(direction: str, nbytes: int, url: str) -> None:
            record = current_attempt()
            if record is not None:
                registry.transferred(record, direction, nbytes, url)

        executor = await executor_on(tmp_path, registry, Stores(on_transfer=count))
        return await executor.run(request, queue="local_x")

    outcome = trio.run(main)
    assert outcome.status is Status.SUCCESS and outcome.action is Action.ACK  # type: ignore[attr-defined]
    assert len(registry) == 0  # a record the executor opened itself is closed again
    [record] = registry.finished()
    assert record.key == "exp_direct" and record.status is Status.SUCCESS
    phases = [phase for phase, _ in record.phases]
    assert phases[:5] == [Phase.CLAIMED, Phase.DOWNLOADING, Phase.BUILDING_ENV, Phase.RUNNING,
                          Phase.UPLOADING]
    assert record.bytes_downloaded > 0 and record.bytes_uploaded > 0
    assert any(isinstance(e, Transferred) and e.direction == "up" and e.url.endswith("modeldir.tar")
               for e in events)
    assert (store / "experiments" / "exp_direct" / "modeldir.tar").exists()
    assert list((tmp_path / "root" / "experiments").iterdir()) == []  # the experiment directory is gone


def test_the_runtime_wires_one_registry_and_one_storage_health(tmp_path: Path) -> None:
    """Subscribers attach to ``supervisor.registry.bus``: the executor must report to that very registry."""
    from studio_runner import config, runtime

    settings = config.resolve({"queue_root": str(tmp_path / "q"), "working_dir": str(tmp_path / "w"),
                               "env_cache_dir": str(cache_root() / "envs")}, environ={})

    async def main() -> None:
        async with runtime.open_runner(settings) as supervisor:
            executor = supervisor.executor
            assert isinstance(executor, Executor)
            assert executor.registry is supervisor.registry
            assert executor.s.stores.health is supervisor.health

    (tmp_path / "w").mkdir()
    trio.run(main)


def test_live_figures_of_the_process_tree(tmp_path: Path) -> None:
    """While it runs, the record shows the tree's CPU and RSS (a child burning a core, its parent holding
    ~60 MB) and collects every pid it ran, which GPU release needs; the reservation's cores and cards
    reach the experiment's environment."""
    request, store, _ = submitted(
        tmp_path, "exp_busy",
        "import os, subprocess, sys, time\n"
        "ballast = bytearray(60 << 20)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time\\nend = time.time() + 5\\n"
        "while time.time() < end: pass'])\n"
        "print('child', child.pid, 'threads', os.environ['OMP_NUM_THREADS'], "
        "'cards', os.environ['CUDA_VISIBLE_DEVICES'], flush=True)\n"
        "child.wait()\n")
    registry = Registry("test-host")
    samples: list[tuple[float, int]] = []

    async def main() -> object:
        executor = await executor_on(tmp_path, registry)
        record = registry.claim("local_x", "local", "m1", 1)
        cards = {"CUDA_VISIBLE_DEVICES": "GPU-x", "NVIDIA_VISIBLE_DEVICES": "GPU-x"}
        reservation = Reservation("owner", Demand(3, 0, 0), gpu_env=cards)

        async def watch() -> None:
            while True:
                await trio.sleep(0.5)
                samples.append((record.cpu_percent, record.rss))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            outcome = await executor.run(request, queue="local_x", record=record, reservation=reservation)
            nursery.cancel_scope.cancel()
        return outcome, record

    outcome, record = trio.run(main)  # type: ignore[misc]
    assert outcome.status is Status.SUCCESS
    output = read_member(store / "experiments" / "exp_busy" / "output.tar", "output")
    assert "threads 3 cards GPU-x" in output
    assert max(cpu for cpu, _ in samples) > 50  # the child spins a core
    assert max(rss for _, rss in samples) > 60 << 20
    assert len(record.pids) >= 2  # the experiment and its child


# An attempt's state is freed by reference counting when it ends, not left to the cycle collector, whose
# full collections can be dozens of attempts apart (a chatty experiment's scraped metadata is megabytes).
SCRIPTS = {
    "success": "for n in range(2000):\n    print('line', n)\n",
    "failure": "print('about to fail')\nraise SystemExit(3)\n",
}


@pytest.mark.parametrize("kind", [*SCRIPTS, "fault"])
def test_an_attempt_is_freed_without_the_cycle_collector(tmp_path: Path, kind: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    request, store, workspace = submitted(tmp_path, f"exp_{kind}", SCRIPTS.get(kind, "print('never runs')\n"))
    if kind == "fault":  # the workspace is gone: a runner-side fault before the process starts
        (store / workspace).unlink()
    scrapers: list[weakref.ref[metadata.MetadataScraper]] = []

    class Tracked(metadata.MetadataScraper):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            scrapers.append(weakref.ref(self))

    monkeypatch.setattr(metadata, "MetadataScraper", Tracked)

    async def main() -> Status:
        executor = await executor_on(tmp_path)
        gc.collect()
        gc.disable()
        try:
            outcome = await executor.run(request, queue="local_x")
            assert scrapers and all(ref() is None for ref in scrapers), "the attempt is in a reference cycle"
        finally:
            gc.enable()
        return outcome.status

    status = trio.run(main)
    assert status is {"success": Status.SUCCESS, "failure": Status.FAILED, "fault": Status.FAULT}[kind]
