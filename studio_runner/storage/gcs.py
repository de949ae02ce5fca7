"""Google Cloud Storage, addressed by ``gs://bucket/key`` URLs, through google-cloud-storage.

Which account: requests cannot name one. StudioML 0.0.49 sends ``credentials`` only as ``{"aws": ...}`` (its
``Credentials`` class refuses anything else) and cannot even write ``gs://`` artifacts (its storage factory
knows S3, HTTP and local); the legacy ``GCloudArtifactStore`` read a service-account file by its path on the
*client's* machine, which means nothing here. So the ``credentials`` argument (an AWS key pair) is never sent
to Google, and the runner's own identity is used, in this order: the emulator named by ``emulator_host`` or
``STORAGE_EMULATOR_HOST`` (anonymous, as the library itself does), a service-account JSON file given to the
store, else Application Default Credentials (``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's login, the GCE
metadata server). No credentials at all is a runner-side fault (StorageError: another runner may have some).

The ETag equivalent is the object's **generation**: GCS gives every write of an object a new one (a
metadata-only change does not), so (URL, generation, size) names one content exactly, which is what the
artifact cache keys on. The md5 is absent for composite objects and the crc32c is only 32 bits, so neither is
used for identity; the crc32c does verify every download.

google-cloud-storage is blocking, so every call runs in a worker thread. Downloads are ranged GETs of
``chunk_size`` each into a temp file beside ``dest`` (renamed into place when whole), each pinned to the
generation that was stat'ed (``ifGenerationMatch``: a replaced object is an error, never a mix of two
versions), checked against the object's crc32c, with a cancel seen between chunks so no thread writes after we
return. Uploads of files up to ``chunk_size`` are one multipart request; bigger ones are resumable uploads of
``chunk_size`` chunks, cancelled on the server (``terminate``) when we are cancelled or fail. Both are atomic
for readers: GCS makes an object visible only when its upload is complete. Transient errors (429, 5xx,
connection resets) are retried by the library's ``DEFAULT_RETRY`` within ``retry_deadline`` seconds.

Errors: a missing object is ObjectNotFound (``stat`` returns None) unless its bucket is missing (StorageError,
as for S3); everything else the store says or cannot say (403, 412, 5xx, no route, no credentials) is a
StorageError, retried by the supervisor; a full local disk is DiskFull; a local read error stays an OSError.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import google_crc32c
import requests
import trio
from google.api_core import exceptions as api_exceptions
from google.api_core.retry import Retry
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY

from studio_runner.errors import DiskFull, ObjectNotFound, StorageError, is_disk_full
from studio_runner.storage import redact_url
from studio_runner.storage.base import Credentials, ObjectInfo

log = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1024 * 1024
_RESUMABLE_UNIT = 256 * 1024
"""Resumable upload chunks must be a multiple of this (the GCS API's rule)."""
BUCKET_SEEN_TTL = 60.0
"""How long a bucket we saw is taken to still exist (see S3Store: one request fewer per missing key)."""
_MAX_BUCKETS_SEEN = 64

# What the store (or the way to it) did wrong, as opposed to our local disk. requests' errors are OSErrors
# (IOError subclasses): they must be caught before any "a local file failed" branch.
_REMOTE_ERRORS: tuple[type[BaseException], ...] = (
    api_exceptions.GoogleAPIError,
    auth_exceptions.GoogleAuthError,
    requests.exceptions.RequestException,
    ConnectionError,
    TimeoutError,
)
try:  # checksum mismatches and unexpected statuses of the media (upload/download) layer
    from google.cloud.storage.exceptions import DataCorruption, InvalidResponse

    _REMOTE_ERRORS += (DataCorruption, InvalidResponse)
except ImportError:  # google-cloud-storage < 3: the separate google-resumable-media package
    from google.resumable_media.common import DataCorruption, InvalidResponse

    _REMOTE_ERRORS += (DataCorruption, InvalidResponse)


@dataclass(frozen=True)
class GcsLocation:
    """A parsed ``gs://`` URL."""

    bucket: str
    key: str

    @property
    def url(self) -> str:
        return f"gs://{self.bucket}/{self.key}"


def parse_gs_url(url: str) -> GcsLocation:
    """Split ``gs://bucket/key...`` (the key may be empty, for list prefixes).

    Parsed by hand, not with urlsplit: object names may hold ``?`` and ``#``, and the client writes them raw
    (``'gs://' + bucket + '/' + key``).
    """
    if url[:5].lower() != "gs://":
        raise StorageError(f"not a gs:// URL: {redact_url(url)}")
    bucket, _, key = url[5:].partition("/")
    if not bucket or "@" in bucket or ":" in bucket:
        raise StorageError(f"no usable bucket in {redact_url(url)}")
    return GcsLocation(bucket, key)


def _crc32c_b64(checksum: Any) -> str:
    """The crc32c as GCS writes it: base64 of the big-endian 32-bit value."""
    return base64.b64encode(checksum.digest()).decode("ascii")


class GcsStore:
    """Get/put/stat/list for ``gs://`` URLs with the runner's Google identity. One instance, shared."""

    def __init__(
        self,
        emulator_host: str | None = None,
        credentials_file: str | Path | None = None,
        project: str | None = None,
        chunk_size: int = 8 * MiB,
        retry_deadline: float = 120.0,
        timeout: tuple[float, float] = (10.0, 60.0),
        list_page_size: int = 1000,
    ) -> None:
        """``emulator_host`` (else ``STORAGE_EMULATOR_HOST``, read when the client is made): talk to that
        endpoint anonymously. ``credentials_file``: a service-account JSON key for the runner. ``project``:
        billed for requester-pays buckets; otherwise object calls need none."""
        if chunk_size <= 0 or chunk_size % _RESUMABLE_UNIT:
            raise ValueError(f"chunk_size must be a positive multiple of {_RESUMABLE_UNIT}")
        self.emulator_host = emulator_host
        self.credentials_file = str(credentials_file) if credentials_file else None
        self.project = project
        self.chunk_size = chunk_size
        self.timeout = timeout
        self.retry: Retry = DEFAULT_RETRY.with_deadline(retry_deadline) if retry_deadline else DEFAULT_RETRY
        self._page_size = list_page_size
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._buckets_seen: dict[str, float] = {}

    # -- the client ----------------------------------------------------------------------------------------

    def _emulator(self) -> str | None:
        host = self.emulator_host or os.environ.get("STORAGE_EMULATOR_HOST") or None
        if host and "://" not in host:
            host = f"http://{host}"  # gcloud's tools accept a bare host:port; the library wants a scheme
        return host

    def client(self) -> Any:
        """The one google-cloud-storage client (made on first use, in the calling worker thread)."""
        with self._client_lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self) -> Any:
        emulator = self._emulator()
        if emulator:
            return storage.Client(project=self.project or "studio-runner", credentials=AnonymousCredentials(),
                                  client_options={"api_endpoint": emulator})
        if self.credentials_file:
            from google.oauth2 import service_account

            creds = service_account.Credentials.from_service_account_file(
                self.credentials_file, scopes=["https://www.googleapis.com/auth/devstorage.read_write"])
            return storage.Client(project=self.project or creds.project_id, credentials=creds)
        return storage.Client(project=self.project)  # Application Default Credentials; project may be None

    def warm_up(self) -> None:
        """Make the client now (for ADC that may ask the metadata server): at runner start-up, in a thread."""
        self.client()

    # -- errors ----------------------------------------------------------------------------------------------

    def _translate(self, exc: BaseException, url: str) -> StorageError:
        """Our error for a Google one; names the URL, never a token or key."""
        shown = redact_url(url)
        if isinstance(exc, StorageError):
            return exc
        if isinstance(exc, api_exceptions.RetryError) and exc.cause is not None:
            inner = self._translate(exc.cause, url)
            return type(inner)(f"{inner} (gave up retrying)")
        if isinstance(exc, api_exceptions.NotFound):
            return ObjectNotFound(f"object not found: {shown}")
        if isinstance(exc, (api_exceptions.Forbidden, api_exceptions.Unauthorized)):
            return StorageError(f"access denied ({exc.code}) to {shown} with {self._identity()}")
        if isinstance(exc, api_exceptions.PreconditionFailed):
            return StorageError(f"object changed during the transfer: {shown}")
        if isinstance(exc, auth_exceptions.DefaultCredentialsError):
            return StorageError(f"no Google credentials for {shown}: set GOOGLE_APPLICATION_CREDENTIALS (or "
                                "STORAGE_EMULATOR_HOST for an emulator)")
        if isinstance(exc, auth_exceptions.GoogleAuthError):
            return StorageError(f"cannot authenticate to Google Cloud Storage for {shown}: "
                                f"{type(exc).__name__}")
        if isinstance(exc, api_exceptions.GoogleAPICallError):
            return StorageError(f"GCS error {exc.code} for {shown}: {exc.message}"[:500])
        if isinstance(exc, (requests.exceptions.RequestException, ConnectionError, TimeoutError)):
            return StorageError(f"cannot reach Google Cloud Storage for {shown}: {type(exc).__name__}")
        return StorageError(f"GCS transfer of {shown} failed: {type(exc).__name__}: {exc}"[:500])

    def _identity(self) -> str:
        if self._emulator():
            return "anonymous access to the emulator"
        return "the service-account file" if self.credentials_file else "the default credentials"

    async def _call(self, url: str, fn: Callable[[], T]) -> T:
        """A short read-only call in a thread. Abandoning it on cancel is safe: it writes nothing."""
        try:
            return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)
        except _REMOTE_ERRORS as exc:
            raise self._translate(exc, url) from exc

    # -- buckets -------------------------------------------------------------------------------------------

    async def _bucket_missing(self, loc: GcsLocation, url: str) -> bool:
        """A missing key and a missing bucket both answer 404: ask the bucket, unless seen recently."""
        seen = self._buckets_seen.get(loc.bucket)
        if seen is not None and trio.current_time() - seen < BUCKET_SEEN_TTL:
            return False
        try:
            exists = await self._call(url, lambda: self.client().bucket(loc.bucket).exists(
                timeout=self.timeout, retry=self.retry))
        except StorageError:
            return False  # e.g. no storage.buckets.get right: assume the bucket is there
        if exists:
            self._bucket_exists(loc)
        else:
            self._buckets_seen.pop(loc.bucket, None)
        return not exists

    def _bucket_exists(self, loc: GcsLocation) -> None:
        self._buckets_seen[loc.bucket] = trio.current_time()
        if len(self._buckets_seen) > _MAX_BUCKETS_SEEN:
            self._buckets_seen.pop(next(iter(self._buckets_seen)))

    # -- ObjectStore ---------------------------------------------------------------------------------------

    def handles(self, url: str) -> bool:
        """Whether ``url`` is a ``gs://`` URL."""
        return url[:5].lower() == "gs://"

    async def stat(self, url: str, credentials: Credentials | None = None) -> ObjectInfo | None:
        """Size, generation (as ``etag``) and update time of ``url``; None when the object does not exist
        (a missing bucket raises). ``credentials`` are ignored: see the module docstring."""
        loc = parse_gs_url(url)
        blob = await self._blob(loc, url)
        return None if blob is None else _info(loc.url, blob)

    async def _blob(self, loc: GcsLocation, url: str) -> Any:
        """The object's current metadata (a ``Blob`` with its generation), None when it does not exist;
        StorageError when its bucket does not."""
        blob = await self._call(url, lambda: self.client().bucket(loc.bucket).get_blob(
            loc.key, timeout=self.timeout, retry=self.retry))
        if blob is None:
            if await self._bucket_missing(loc, url):
                raise StorageError(f"bucket {loc.bucket} does not exist ({redact_url(url)})")
            return None
        self._bucket_exists(loc)
        return blob

    async def get(self, url: str, dest: Path, credentials: Credentials | None = None) -> ObjectInfo:
        """Download the generation of ``url`` that stat finds to ``dest`` (whole, crc32c-checked, or not at
        all)."""
        loc = parse_gs_url(url)
        blob = await self._blob(loc, url)
        if blob is None:
            raise ObjectNotFound(f"object not found: {redact_url(url)}")
        info = _info(loc.url, blob)
        dest = Path(dest)
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.part")
        try:
            await trio.to_thread.run_sync(self._download, blob, info, tmp)
            os.replace(tmp, dest)
        except _REMOTE_ERRORS as exc:
            raise self._translate(exc, url) from exc
        except OSError as exc:  # writing the local file: a full disk is ours to report, not the store's
            if is_disk_full(exc):
                raise DiskFull(f"no space left while downloading {redact_url(url)} to {dest}: {exc}") from exc
            raise StorageError(f"cannot save {redact_url(url)} to {dest}: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        log.debug("downloaded %s (generation %s, %d bytes) to %s", loc.url, info.etag, info.size, dest)
        return info

    def _download(self, blob: Any, info: ObjectInfo, tmp: Path) -> None:
        """Ranged GETs of one generation into ``tmp`` (worker thread); cancellable between chunks."""
        checksum = google_crc32c.Checksum()
        with open(tmp, "wb") as out:
            offset = 0
            while offset < info.size:
                trio.from_thread.check_cancelled()
                end = min(offset + self.chunk_size, info.size) - 1
                chunk = blob.download_as_bytes(
                    start=offset, end=end, raw_download=True, checksum=None,
                    if_generation_match=blob.generation, timeout=self.timeout, retry=self.retry)
                if not chunk:
                    break
                out.write(chunk)
                checksum.update(chunk)
                offset += len(chunk)
        if offset != info.size:
            raise StorageError(f"download of {redact_url(info.url)} ended at {offset} of {info.size} bytes")
        if blob.crc32c and _crc32c_b64(checksum) != blob.crc32c:
            raise StorageError(f"download of {redact_url(info.url)} does not match its crc32c")

    async def put(self, src: Path, url: str, credentials: Credentials | None = None) -> ObjectInfo:
        """Upload ``src`` to ``url``: one request up to ``chunk_size``, else a resumable upload.

        Never abandoned on cancel (a request still in flight after we returned could land after a newer
        upload of the same key); a cancel is seen between chunks and ends the resumable session."""
        loc = parse_gs_url(url)
        if not loc.key:
            raise StorageError(f"no object name in {redact_url(url)}")
        size = os.stat(src).st_size
        client = await self._call(url, self.client)
        blob = client.bucket(loc.bucket).blob(loc.key)
        upload = self._upload_small if size <= self.chunk_size else self._upload_chunked
        try:
            await trio.to_thread.run_sync(upload, blob, Path(src))
        except api_exceptions.NotFound as exc:  # an upload answers 404 only for the bucket
            self._buckets_seen.pop(loc.bucket, None)
            raise StorageError(f"bucket {loc.bucket} does not exist ({redact_url(url)})") from exc
        except _REMOTE_ERRORS as exc:
            raise self._translate(exc, url) from exc
        self._bucket_exists(loc)
        log.debug("uploaded %s (%d bytes) to %s, generation %s", src, size, loc.url, blob.generation)
        return _info(loc.url, blob) if blob.generation else ObjectInfo(url=loc.url, size=size)

    def _upload_small(self, blob: Any, src: Path) -> None:
        """One multipart upload (the response fills in the blob's generation); crc32c checked by GCS."""
        blob.upload_from_filename(str(src), content_type="application/octet-stream", checksum="crc32c",
                                  timeout=self.timeout, retry=self.retry)

    def _upload_chunked(self, blob: Any, src: Path) -> None:
        """A resumable upload, ``chunk_size`` at a time; terminated on the server on a cancel or failure."""
        writer = blob.open("wb", chunk_size=self.chunk_size, ignore_flush=True, retry=self.retry,
                           content_type="application/octet-stream", checksum="crc32c", timeout=self.timeout)
        try:
            with open(src, "rb") as source:
                while chunk := source.read(self.chunk_size):
                    trio.from_thread.check_cancelled()
                    writer.write(chunk)
            writer.close()  # sends the last chunk and finalises: the object appears now
        except BaseException:
            try:
                writer.terminate()
            except Exception as exc:  # the session expires on its own within a week
                log.debug("could not cancel the resumable upload of %s: %s", blob.name, type(exc).__name__)
            raise
        blob.reload(timeout=self.timeout, retry=self.retry)  # the writer does not hand back the generation

    async def list(self, prefix_url: str, credentials: Credentials | None = None) -> list[ObjectInfo]:
        """Every object whose URL starts with ``prefix_url`` (paginated)."""
        loc = parse_gs_url(prefix_url)

        def list_all() -> list[ObjectInfo]:
            blobs = self.client().list_blobs(loc.bucket, prefix=loc.key or None, page_size=self._page_size,
                                             timeout=self.timeout, retry=self.retry)
            return [_info(f"gs://{loc.bucket}/{blob.name}", blob) for blob in blobs]

        try:
            return await self._call(prefix_url, list_all)
        except ObjectNotFound:  # listing answers 404 only for the bucket
            raise StorageError(f"bucket {loc.bucket} does not exist ({redact_url(prefix_url)})") from None


def _info(url: str, blob: Any) -> ObjectInfo:
    updated = blob.updated
    return ObjectInfo(
        url=url,
        size=int(blob.size or 0),
        etag=str(blob.generation) if blob.generation else None,
        mtime=updated.timestamp() if updated is not None else None,
    )
