"""The real executor on its own (no supervisor): one attempt, top to bottom, and what it reports to the
attempt registry. Real files, the local store, a real cached virtualenv and a real process."""

from __future__ import annotations

import json
from pathlib import Path

import trio
from support.studioml_client import cache_root

from studio_runner.attempt import Action, Phase, Status
from studio_runner.envs import EnvCache
from studio_runner.events import Registry, Transferred, current_attempt
from studio_runner.executor import Executor, ExecutorSettings
from studio_runner.request import parse_request
from studio_runner.storage import Stores
from studio_runner.submit import Submission, build_request, pack_workspace


def test_one_attempt_reports_its_phases_and_bytes(tmp_path: Path) -> None:
    script = tmp_path / "ws" / "train.py"
    script.parent.mkdir()
    script.write_text("import os\nos.makedirs('../modeldir', exist_ok=True)\n"
                      "open('../modeldir/w.txt', 'w').write('weights')\nprint('trained')\n")
    store = tmp_path / "store"
    request = parse_request(json.dumps(build_request(
        Submission(script=script, queue="local_x", experiment="exp_direct"), store,
        pack_workspace(script.parent, store))))
    registry = Registry("test-host")
    events: list[object] = []
    registry.bus.subscribe(events.append)

    async def main() -> object:
        env_cache = EnvCache(cache_root() / "envs", 20 << 30)
        await env_cache.start()

        def count(direction: str, nbytes: int, url: str) -> None:
            record = current_attempt()
            if record is not None:
                registry.transferred(record, direction, nbytes, url)

        executor = Executor(ExecutorSettings(root=tmp_path / "root", hostname="test-host",
                                             stores=Stores(on_transfer=count), env_cache=env_cache),
                            registry)
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
