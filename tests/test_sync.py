"""Saving an attempt's work (studio_runner.sync): which artifacts may be written back, the final upload's
retry window, and the output log's failure handling. Real files, the real local store."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import trio

from studio_runner import metadata, storage
from studio_runner.errors import DiskFull, ObjectNotFound, StorageError
from studio_runner.outputlog import OutputLog
from studio_runner.policies import Backoff
from studio_runner.redact import Redactor
from studio_runner.request import parse_request
from studio_runner.storage import ObjectInfo, StorageHealth, Stores, register_scheme
from studio_runner.sync import UPLOAD_CONCURRENCY, ArtifactSync


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


# --- uploads several at once, in stages --------------------------------------------------------------------


class ProbeStore:
    """Records every put (start and end on trio's clock); each takes ``delay`` and may be told to fail."""

    def __init__(self, delay: float = 0.05) -> None:
        self.delay = delay
        self.spans: dict[str, tuple[float, float]] = {}
        self.in_flight = self.most_in_flight = 0
        self.fail: dict[str, Exception] = {}
        """Name of the object (``tb.tar``) -> what its next put raises (once)."""

    def handles(self, url: str) -> bool:
        return url.startswith("probe://")

    async def put(self, src: Path, url: str, credentials: object = None) -> ObjectInfo:
        name = url.rsplit("/", 1)[1]
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        started = trio.current_time()
        try:
            await trio.sleep(self.delay)
            if name in self.fail:
                raise self.fail.pop(name)
        finally:
            self.in_flight -= 1
        self.spans[name] = (started, trio.current_time())
        return ObjectInfo(url, src.stat().st_size)

    async def get(self, url: str, dest: Path, credentials: object = None) -> ObjectInfo:
        raise ObjectNotFound(url)

    async def stat(self, url: str, credentials: object = None) -> ObjectInfo | None:
        return None

    async def list(self, prefix_url: str, credentials: object = None) -> list[ObjectInfo]:
        return []


LABELS = ("modeldir", "retval", "output", "tb", "_metrics", "_metadata")


@pytest.fixture
def probe(tmp_path: Path):  # type: ignore[no-untyped-def]
    store = ProbeStore()
    register_scheme(("probe",), "probe", lambda options: store)
    try:
        artifacts = {label: {"mutable": True, "unpack": True, "key": f"k/{label}.tar",
                             "qualified": f"probe://host/bucket/k/{label}.tar"} for label in LABELS}
        request = parse_request(json.dumps({"experiment": {"key": "k", "filename": "x.py",
                                                           "artifacts": artifacts}, "config": {}}))
        expdir = tmp_path / "exp"
        for label in LABELS:
            (expdir / label).mkdir(parents=True)
        scraper = metadata.MetadataScraper()
        output = OutputLog(expdir / "output" / "output", Redactor(), scraper, "k")
        sync = ArtifactSync(Stores(), request, expdir, output, scraper, "scrape-host-x.json")
        for label in LABELS:
            if label not in ("output", "_metadata"):
                sync.mark_restored(label)
                (expdir / label / "result").write_text(f"what the experiment wrote to {label}")
        output.feed(b'{"accuracy": 0.9}\n')  # a metadata line: the scrape document has content
        sync.ran = True
        yield store, sync, expdir
    finally:
        storage._SCHEMES.pop("probe", None)


def test_artifacts_upload_together_then_retval_then_metadata(probe) -> None:  # type: ignore[no-untyped-def]
    store, sync, _ = probe
    trio.run(lambda: sync.upload_all(include_output=True))
    first_stage = ["_metrics.tar", "modeldir.tar", "output.tar", "tb.tar"]
    assert sorted(store.spans) == sorted([*first_stage, "retval.tar", "scrape-host-x.json"])
    assert 2 <= store.most_in_flight <= UPLOAD_CONCURRENCY
    last_of_first = max(store.spans[name][1] for name in first_stage)
    assert store.spans["retval.tar"][0] >= last_of_first  # the completion service's signal follows the rest
    assert store.spans["scrape-host-x.json"][0] >= store.spans["retval.tar"][1]  # metadata last of all


def test_a_failed_artifact_is_raised_and_the_others_still_count(probe) -> None:  # type: ignore[no-untyped-def]
    store, sync, _ = probe
    store.fail["tb.tar"] = StorageError("tb: the store said no")
    store.fail["modeldir.tar"] = StorageError("modeldir: the store said no")
    with pytest.raises(StorageError, match="modeldir: the store said no"):  # the first in label order
        trio.run(lambda: sync.upload_all(include_output=True))
    assert sorted(store.spans) == ["_metrics.tar", "output.tar"]  # no retval, no metadata after a failure
    store.spans.clear()
    trio.run(lambda: sync.upload_all(include_output=True))  # the retry uploads only what is not saved
    assert sorted(store.spans) == ["modeldir.tar", "retval.tar", "scrape-host-x.json", "tb.tar"]


def test_a_full_disk_retries_one_artifact_at_a_time(probe) -> None:  # type: ignore[no-untyped-def]
    store, sync, _ = probe
    store.fail["tb.tar"] = DiskFull("no space left to pack tb")
    trio.run(lambda: sync.save_results(include_output=True, window=60, backoff=Backoff(0.1, 0.3),
                                       give_up=lambda: False, wake=trio.Event()))
    assert store.most_in_flight > 1 and sync.upload_concurrency == 1
    store.most_in_flight = 0
    store.spans.clear()
    (sync.expdir / "tb" / "more").write_text("changed")
    (sync.expdir / "modeldir" / "more").write_text("changed")
    trio.run(lambda: sync.upload_all(include_output=True))
    assert store.most_in_flight == 1 and {"tb.tar", "modeldir.tar"} <= set(store.spans)
