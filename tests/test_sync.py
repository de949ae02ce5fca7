"""Saving an attempt's work (studio_runner.sync): which artifacts may be written back, the final upload's
retry window, and the output log's failure handling. Real files, the real local store."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import trio

from studio_runner import metadata
from studio_runner.errors import DiskFull, StorageError
from studio_runner.outputlog import OutputLog
from studio_runner.policies import Backoff
from studio_runner.redact import Redactor
from studio_runner.request import parse_request
from studio_runner.storage import StorageHealth, Stores
from studio_runner.sync import ArtifactSync


def make_request(store: Path) -> object:
    artifacts = {label: {"mutable": label != "workspace", "unpack": True, "key": f"k/{label}.tar",
                         "qualified": f"file://{store}/k/{label}.tar"}
                 for label in ("workspace", "modeldir", "output", "tb", "_metadata")}
    return parse_request(json.dumps({"experiment": {"key": "k", "filename": "x.py", "artifacts": artifacts},
                                     "config": {}}))


@pytest.fixture
def setup(tmp_path: Path):  # type: ignore[no-untyped-def]
    store = tmp_path / "store"
    expdir = tmp_path / "exp"
    for label in ("workspace", "modeldir", "tb", "output"):
        (expdir / label).mkdir(parents=True)
    request = make_request(store)
    scraper = metadata.MetadataScraper()
    output = OutputLog(expdir / "output" / "output", Redactor(), scraper, "k")
    stores = Stores(health=StorageHealth())
    sync = ArtifactSync(stores, request, expdir, output, scraper, "scrape-host-x.json")  # type: ignore[arg-type]
    return store, expdir, sync, output


def test_only_fully_restored_artifacts_of_a_run_are_written_back(setup) -> None:  # type: ignore[no-untyped-def]
    store, expdir, sync, output = setup
    assert [a.label for a in sync.uploadable(include_output=False)] == []
    sync.mark_restored("tb")  # modeldir's restore failed or was interrupted: never marked
    (expdir / "modeldir" / "w.txt").write_text("new weights")  # the experiment writes both
    (expdir / "tb" / "events").write_text("tb")
    assert [a.label for a in sync.uploadable(include_output=True)] == ["output"]  # did not run yet
    sync.ran = True
    assert [a.label for a in sync.uploadable(include_output=True)] == ["output", "tb"]
    output.write("a line")
    trio.run(lambda: sync.upload_all(include_output=True))
    assert (store / "k" / "tb.tar").exists() and (store / "k" / "output.tar").exists()
    assert not (store / "k" / "modeldir.tar").exists()
    with tarfile.open(store / "k" / "output.tar") as tar:
        assert b"a line" in tar.extractfile("output").read()  # type: ignore[union-attr]
    assert (store / "metadata" / "scrape-host-x.json").exists()
    assert sync.metadata_url == f"file://{store}/metadata/scrape-host-x.json"


def test_the_final_upload_is_retried_within_its_window(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, expdir, sync, output = setup
    sync.ran = True
    store.mkdir()
    (store / "k").write_text("a file where a directory must be: every put fails")
    seen: list[str] = []

    async def scenario() -> None:
        async def repair() -> None:
            await trio.sleep(1.0)
            seen.append(str(sync.stores.health.outage))
            (store / "k").unlink()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(repair)
            await sync.save_results(include_output=True, window=60, backoff=Backoff(0.1, 0.3),
                                    give_up=lambda: False, wake=trio.Event())

    trio.run(scenario)
    assert (store / "k" / "output.tar").exists()
    assert seen and "local storage" in seen[0]
    assert sync.stores.health.outage is None  # the successful upload cleared it


def test_the_final_upload_gives_up_after_its_window(setup) -> None:  # type: ignore[no-untyped-def]
    store, expdir, sync, output = setup
    store.mkdir()
    (store / "k").write_text("in the way")

    async def scenario() -> float:
        started = trio.current_time()
        with pytest.raises(StorageError, match="results not saved after"):
            await sync.save_results(include_output=True, window=1.5, backoff=Backoff(0.1, 0.4),
                                    give_up=lambda: False, wake=trio.Event())
        return trio.current_time() - started

    spent = trio.run(scenario)
    assert 0.8 <= spent <= 1.5
    assert sync.stores.health.outage is None  # nobody retries any more: intake is not held for it


def test_an_output_log_that_cannot_be_written_breaks_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "output" / "output"
    log = OutputLog(path, Redactor(["s3cr3t-value"]), metadata.MetadataScraper(), "k")
    log.feed(b"first line with s3cr3t-value\n")
    log.flush()
    assert path.read_text() == "first line with ****\n"
    log._file.close()  # type: ignore[union-attr]  # any write now fails like a broken disk would
    log.feed(b"second line\n")
    log.flush()
    assert log.broken.is_set() and log.failure is not None and not isinstance(log.failure, DiskFull)
    log.note("more after the failure")
    log.close()


def test_output_logs_do_not_leave_a_logger_per_experiment(tmp_path: Path) -> None:
    """logging keeps every named logger forever: a runner that runs for months must not make one per key."""
    import logging

    before = len(logging.Logger.manager.loggerDict)
    for n in range(50):
        log = OutputLog(tmp_path / f"e{n}" / "output", Redactor(), metadata.MetadataScraper(), f"key-{n}")
        log.write("a line")
        log.close()
    assert len(logging.Logger.manager.loggerDict) <= before + 1
