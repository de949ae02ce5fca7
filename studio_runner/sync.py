"""Saving an attempt's work: checkpoints while it runs, the final uploads, the metadata document.

Rules (spec README, "Stored work is never reduced"; lifecycle.md §7 and §8):

* A mutable artifact is uploaded only when it was fully restored at the start (or did not exist) and the
  experiment's process actually ran: a failed, interrupted, over-budget or corrupt restore never replaces
  the stored object with less than it had.
* ``output`` is this attempt's own log: uploaded when the experiment ran, or when the attempt is final (its
  message is acknowledged or set aside), so the experimenter can read why; a fault before the run (the
  message goes back) leaves the previous attempt's log in place.
* Unchanged directories are not uploaded again (fingerprints). Artifacts are uploaded several at once
  (:data:`UPLOAD_CONCURRENCY`), in three stages whose order readers rely on: every artifact but ``retval``;
  then ``retval``, which the client's completion service polls as the sign that results are there; then
  ``_metadata``, after the final scrape. A failure stops the later stages and is raised as itself (the
  first in label order when several fail); the uploads running beside it finish, and their fingerprints
  count.
* An experiment that has finished holds its results on local disk: the final upload is retried with back-off
  for a long window (``--upload-retry-window``) before the message is handed back, and the experiment is
  not run again meanwhile. A full disk is met by freeing what the upload does not need (the experiment's
  temporary directory and its immutable inputs) and trying once more, one artifact at a time (so packed
  copies of several artifacts never sit on the disk together). A failure no retry can mend (a locator
  refused as outside the storage roots) ends the final upload at once.
* Confinement: :meth:`ArtifactSync.check_locators` refuses, before anything is downloaded, a request whose
  locators (the ``_metadata`` folder included) name places this runner must not touch; the refused ones are
  never uploaded to, while the others (``output``, so the experimenter can read why) still are. Files of the
  ``_metadata`` folder that are symbolic links are not uploaded: an experiment could point one anywhere.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import trio

from studio_runner import artifacts, metadata
from studio_runner.errors import DiskFull, Disposition, RunnerError, StorageError, is_disk_full
from studio_runner.outputlog import OutputLog
from studio_runner.policies import Backoff
from studio_runner.request import Artifact, Request
from studio_runner.storage import Stores
from studio_runner.storage.base import LocatorRefused
from studio_runner.units import format_duration

log = logging.getLogger(__name__)

UPLOAD_TRY_TIMEOUT = 600.0
"""One try of the final upload may take this long before it counts as failed."""

UPLOAD_CONCURRENCY = 4
"""Artifacts of one attempt uploaded at once: most are a few KB, so their round trips dominate."""

OUTPUT_LABEL = "output"
METADATA_LABEL = "_metadata"
RETVAL_LABEL = "retval"
"""The completion service's result: a reader that sees it may read the other artifacts at once."""


class ArtifactSync:
    """Uploads one attempt's mutable artifacts and metadata document, skipping what must not or need not."""

    def __init__(self, stores: Stores, request: Request, expdir: Path, output: OutputLog,
                 scraper: metadata.MetadataScraper, scrape_name: str,
                 on_checkpoint: Callable[[bool], None] | None = None) -> None:
        self.stores = stores
        self.request = request
        self.expdir = expdir
        self.output = output
        self.scraper = scraper
        self.scrape_name = scrape_name
        self.on_checkpoint = on_checkpoint
        self.ran = False
        """Set when the experiment's process started: only then are restored artifacts uploaded."""
        self.restored: set[str] = set()
        """Mutable labels fully restored (or absent in storage) at the start of this attempt."""
        self.fingerprints: dict[str, str | None] = {}
        self.metadata_url: str | None = None
        self.upload_concurrency = UPLOAD_CONCURRENCY
        self.refused: dict[str, LocatorRefused] = {}
        """Labels whose locator this runner must not touch (:meth:`check_locators`): never uploaded to."""
        self._lock = trio.Lock()

    async def check_locators(self) -> None:
        """Raise LocatorRefused (the first by label) when one of the request's locators, or the folder its
        ``_metadata`` documents go to, names a place this runner must not touch; remember every refused
        label, so that the final upload leaves them out. Call it before anything is downloaded."""
        chosen = dict(self.request.experiment.artifacts)
        meta = chosen.get(METADATA_LABEL)
        if meta is not None and meta.mutable and meta.locator:
            documents = metadata_object_url(meta, "x.json")
            chosen[f"{METADATA_LABEL} documents"] = replace(meta, qualified=documents, url=None, key=None)
        found = await trio.to_thread.run_sync(artifacts.check_locators, chosen, self.stores)
        for label, exc in found.items():
            self.refused[label.split(" ", 1)[0]] = exc
        if found:
            raise found[min(found)]

    def mark_restored(self, label: str) -> None:
        """``label`` was restored whole (or did not exist): it may be uploaded once the experiment ran."""
        self.restored.add(label)
        self.fingerprints[label] = artifacts.dir_fingerprint(self.expdir / label)

    def url_of(self, label: str) -> str | None:
        artifact = self.request.experiment.artifacts.get(label)
        return artifact.locator if artifact else None

    def uploadable(self, include_output: bool) -> list[Artifact]:
        """The mutable artifacts this attempt may write back now, by the rules in the module docstring."""
        chosen = []
        for label, artifact in sorted(self.request.experiment.artifacts.items()):
            if not artifact.mutable or label in (METADATA_LABEL, *self.refused) or not artifact.locator:
                continue
            if label == OUTPUT_LABEL:
                if include_output:
                    chosen.append(artifact)
            elif self.ran and label in self.restored:
                chosen.append(artifact)
        return chosen

    # -- checkpoints --------------------------------------------------------------------------------------
    async def periodically(self, interval: float) -> None:
        """Checkpoint every ``interval`` seconds while the experiment runs; a failure waits for the next."""
        while True:
            await trio.sleep(interval)
            try:
                await self.upload_all(include_output=True)
            except (RunnerError, OSError) as exc:
                log.warning("checkpoint of %s failed (the next one retries): %s",
                            self.request.experiment.key, exc)
            else:
                if self.on_checkpoint is not None:
                    self.on_checkpoint(False)

    async def upload_all(self, include_output: bool) -> None:
        """Upload what changed, in the stages the module docstring names; raises the first failure."""
        async with self._lock:
            self.output.flush()
            chosen = self.uploadable(include_output)
            await self._upload_together([a for a in chosen if a.label != RETVAL_LABEL])
            await self._upload_together([a for a in chosen if a.label == RETVAL_LABEL])
            await self._upload_metadata()

    async def _upload_together(self, chosen: list[Artifact]) -> None:
        """Upload ``chosen``, ``upload_concurrency`` at once; a failure does not cancel the others (what they
        upload is saved), and the first one in label order is raised as itself once all have ended."""
        fingerprints, expdir, stores = self.fingerprints, self.expdir, self.stores

        def upload(artifact: Artifact) -> Callable[[], Awaitable[None]]:
            async def job() -> None:
                fingerprints[artifact.label] = await artifacts.upload_artifact(
                    artifact, expdir, stores, fingerprints.get(artifact.label))
            return job

        await artifacts.transfer_each({a.label: upload(a) for a in chosen}, self.upload_concurrency,
                                      cancel_on_failure=False)

    # -- the final upload ----------------------------------------------------------------------------------
    async def save_results(self, *, include_output: bool, window: float, backoff: Backoff,
                           give_up: Callable[[], bool], wake: trio.Event) -> None:
        """The final upload, retried with ``backoff`` for up to ``window`` seconds; raises RunnerError when it
        gives up (``give_up()`` true after a failure, e.g. the runner is stopping at once)."""
        started = trio.current_time()
        tries = 0
        freed = False
        while True:
            tries += 1
            try:
                with trio.fail_after(UPLOAD_TRY_TIMEOUT):
                    await self.upload_all(include_output)
                if self.on_checkpoint is not None:
                    self.on_checkpoint(True)
                if tries > 1:
                    log.info("results of %s saved on try %d", self.request.experiment.key, tries)
                return
            except (RunnerError, OSError, trio.TooSlowError) as exc:
                error = _as_runner_error(exc)
            if error.disposition is not Disposition.RETRY and not isinstance(error, DiskFull):
                raise error  # the request's own fault (a refused locator): no try can mend it
            if isinstance(error, DiskFull):
                if freed:
                    raise error
                freed = True
                self.upload_concurrency = 1  # one packed artifact on the disk at a time from now on
                log.warning("%s: freeing the experiment's temporary files and inputs to save its results",
                            error)
                await trio.to_thread.run_sync(self._free_space)
                continue
            delay = backoff.delay(tries)
            spent = trio.current_time() - started
            if give_up() or spent + delay > window:
                self._forget_failing_endpoints()
                raise StorageError(f"results not saved after {tries} tries in {format_duration(spent)}: "
                                   f"{error}") from None
            log.warning("saving the results of %s failed (try %d; retrying in %.0fs, for up to %s): %s",
                        self.request.experiment.key, tries, delay, format_duration(window), error)
            with trio.move_on_after(delay):
                await wake.wait()

    def _free_space(self) -> None:
        shutil.rmtree(self.expdir / "_runner" / "tmp", ignore_errors=True)
        shutil.rmtree(self.expdir / ".downloads", ignore_errors=True)
        for label, artifact in self.request.experiment.artifacts.items():
            if not artifact.mutable and label not in (OUTPUT_LABEL, METADATA_LABEL):
                shutil.rmtree(self.expdir / label, ignore_errors=True)

    def _forget_failing_endpoints(self) -> None:
        for artifact in self.request.experiment.artifacts.values():
            if artifact.mutable and artifact.locator:
                self.stores.health.forget(artifact.locator)

    # -- metadata -----------------------------------------------------------------------------------------
    async def _upload_metadata(self) -> None:
        artifact = self.request.experiment.artifacts.get(METADATA_LABEL)
        folder = self.expdir / METADATA_LABEL
        folder.mkdir(exist_ok=True)
        text = None if self.scraper.empty else self.scraper.to_json()
        await trio.to_thread.run_sync(metadata.write_document_text, text, folder / self.scrape_name)
        if artifact is None or not artifact.mutable or not artifact.locator or METADATA_LABEL in self.refused:
            return
        for path in sorted(folder.rglob("*")):
            # dot-files are writes in progress; a link (made by the experiment) could lead anywhere
            if path.is_file() and not path.is_symlink() and not path.name.startswith("."):
                url = metadata_object_url(artifact, path.relative_to(folder).as_posix())
                await self.stores.for_url(url).put(path, url, artifact.access_credentials)
                if path.name == self.scrape_name:
                    self.metadata_url = url


def _as_runner_error(exc: BaseException) -> RunnerError:
    if isinstance(exc, RunnerError):
        return exc
    if is_disk_full(exc):
        return DiskFull(f"no space left to pack the results: {exc}")
    if isinstance(exc, trio.TooSlowError):
        return StorageError(f"the upload took longer than {UPLOAD_TRY_TIMEOUT:.0f}s")
    return StorageError(f"{type(exc).__name__}: {exc}")


def metadata_object_url(artifact: Artifact, name: str) -> str:
    """``metadata/<name>`` at the root of the bucket the ``_metadata`` locator names (metadata.md §4)."""
    locator = artifact.locator or ""
    key = artifact.key or ""
    if key and locator.endswith(key):
        return locator[: len(locator) - len(key)] + "metadata/" + name
    match = re.match(r"^(s3://[^/]+/[^/]+/|gs://[^/]+/)", locator)
    if match:
        return match.group(1) + "metadata/" + name
    return locator.rsplit("/", 1)[0] + "/metadata/" + name

