"""S3 and S3-compatible (MinIO, Ceph, moto) object store, addressed by ``s3://host[:port]/bucket/key`` URLs.

The StudioML client drops the endpoint's scheme from qualified URLs, so the scheme is decided here
(message.md §3.1): plain HTTP, except AWS hosts (TLS, region taken from the host name), endpoints listed in
``tls_endpoints``, and every endpoint once a CA bundle or client certificate is configured.

boto3 is blocking, so every call runs in a worker thread. Large transfers go through boto3's own transfer
manager (multipart, parallel parts, ``IfMatch`` on ranged GETs so a download never mixes two versions of an
object); retries of 5xx/throttling/connection errors are botocore's "standard" mode. Cancelling a transfer
cancels the transfer manager's future and waits for the parts in flight, so no thread keeps writing after we
return.

A full local disk while downloading is ``DiskFull`` (retried), never a storage error.

Objects under the multipart threshold are put with one ``PutObject`` (its response carries the ETag) and
fetched with one ``GetObject``, not through a transfer manager (a thread pool per transfer) and, for puts, a
HEAD after it: most artifacts of most experiments are a few kilobytes, and that set-up and the extra round
trip were most of their transfer time. The small path keeps the manager's guarantees: ``IfMatch`` on the
GET, its retries of streaming errors, and no thread writing after a cancel returns.

Secrets: error messages name the URL and at most the first eight characters of the access key id, never the
secret; clients are cached under the frozen ``Credentials`` object, whose ``repr`` hides the secret.

Start-up cost: every client comes from one boto3 session per process, whose loader keeps the S3 model,
endpoint rules and partitions once parsed (a client from a fresh session re-reads them: about 70 ms each), and
:meth:`S3Store.warm_up` loads them at runner start-up so the first experiment does not pay for it.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import boto3
import trio
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.subscribers import BaseSubscriber
from s3transfer.utils import S3_RETRYABLE_DOWNLOAD_ERRORS

from studio_runner.errors import DiskFull, ObjectNotFound, StorageError, is_disk_full
from studio_runner.storage import redact_url
from studio_runner.storage.base import Credentials, ObjectInfo

log = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1024 * 1024

# s3.amazonaws.com, s3-us-west-2.amazonaws.com, s3.us-west-2.amazonaws.com
_AWS_HOST = re.compile(r"^s3(?:[-.](?P<region>[a-z0-9-]+))?\.amazonaws\.com$")
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_DENIED = {
    "403",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AllAccessDisabled",
}
_MAX_CLIENTS = 64
BUCKET_SEEN_TTL = 60.0
"""How long a bucket we saw exist is taken to still exist: a missing key in it then needs no second request
to tell "no such key" from "no such bucket"."""
_WARM_UP_ENDPOINT = "http://warm-up.invalid"
"""A client for this endpoint is built at start-up only to load boto3's model; it never sends a request."""

_session_lock = threading.Lock()
_session: boto3.session.Session | None = None


def _session_client(**kwargs: Any) -> Any:
    """An S3 client from this process's one boto3 session (created on first use).

    Sharing the session shares its loader, which parses the S3 model and endpoint rules once. Sessions are
    not thread-safe, so clients are made under a lock; the clients themselves are.
    """
    global _session
    with _session_lock:
        if _session is None:
            _session = boto3.session.Session()
        return _session.client("s3", **kwargs)


@dataclass(frozen=True)
class S3Location:
    """A parsed ``s3://`` URL: where to connect and which object."""

    endpoint: str
    """``host[:port]`` exactly as in the URL (lower-cased host)."""
    bucket: str
    key: str

    @property
    def url(self) -> str:
        return f"s3://{self.endpoint}/{self.bucket}/{self.key}"


def parse_s3_url(url: str) -> tuple[str, str, str]:
    """Split ``s3://host[:port]/bucket/key...`` into (endpoint, bucket, key); the key may be empty.

    Any user-info in the URL is dropped: credentials travel in ``Credentials``, never in URLs.
    """
    parts = urlsplit(url)
    if parts.scheme != "s3":
        raise StorageError(f"not an s3:// URL: {redact_url(url)}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise StorageError(f"bad port in {redact_url(url)}") from exc
    if not host:
        raise StorageError(f"no endpoint host in {redact_url(url)}")
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    endpoint = f"{host}:{port}" if port is not None else host
    bucket, _, key = parts.path.lstrip("/").partition("/")
    if not bucket:
        raise StorageError(f"no bucket in {redact_url(url)}")
    return endpoint, bucket, key


def qualified_with_key(qualified: str, key: str | None) -> str:
    """The URL of ``key`` in the bucket of ``qualified``: the artifact's ``key`` field wins over the path."""
    if not key:
        return qualified
    endpoint, bucket, _ = parse_s3_url(qualified)
    return f"s3://{endpoint}/{bucket}/{key.lstrip('/')}"


def aws_region(endpoint: str) -> str | None:
    """For an AWS S3 host, the region it names ("" for the global ``s3.amazonaws.com``); None otherwise."""
    host = endpoint.rsplit(":", 1)[0] if not endpoint.startswith("[") else endpoint
    match = _AWS_HOST.match(host)
    if match is None:
        return None
    region = match.group("region") or ""
    return "us-east-1" if region == "external-1" else region


def _key_hint(credentials: Credentials | None) -> str:
    return f"access key {credentials.access_key[:8]}..." if credentials else "anonymous access"


class _KnownObject(BaseSubscriber):
    """Hands the size and ETag from our HEAD to the transfer manager, which would otherwise HEAD again."""

    def __init__(self, size: int, etag: str | None) -> None:
        self._size, self._etag = size, etag

    def on_queued(self, future: Any, **kwargs: Any) -> None:
        future.meta.provide_transfer_size(self._size)
        if self._etag is not None:
            future.meta.provide_object_etag(self._etag)


class S3Store:
    """Get/put/stat/list for ``s3://`` URLs. One instance serves every endpoint; safe to share."""

    def __init__(
        self,
        ca_bundle: str | None = None,
        client_cert: tuple[str, str] | None = None,
        tls_endpoints: set[str] | frozenset[str] = frozenset(),
        default_region: str = "us-west-1",
        multipart_threshold: int = 8 * MiB,
        multipart_chunksize: int = 8 * MiB,
        max_concurrency: int = 10,
        max_attempts: int = 5,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        list_page_size: int = 1000,
    ) -> None:
        self.ca_bundle = ca_bundle
        self.client_cert = client_cert
        self.tls_endpoints = {e.lower() for e in tls_endpoints}
        self.default_region = default_region
        self.transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
        )
        self._max_attempts = max_attempts
        self._page_size = list_page_size
        self._timeouts = (connect_timeout, read_timeout)
        self._clients: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._clients_lock = threading.Lock()
        self._buckets_seen: dict[tuple[str, str], float] = {}

    # -- connection choice -------------------------------------------------------------------------------

    def endpoint_url(self, endpoint: str) -> str | None:
        """The ``endpoint_url`` boto3 gets for ``endpoint``; None lets boto3 pick the AWS regional one."""
        if aws_region(endpoint) is not None:
            return None
        tls = (
            self.ca_bundle is not None
            or self.client_cert is not None
            or endpoint.lower() in self.tls_endpoints
        )
        return f"{'https' if tls else 'http'}://{endpoint}"

    def region_for(self, endpoint: str, credentials: Credentials | None) -> str:
        """The host's region for AWS hosts, else the credentials' region, else the configured default."""
        return aws_region(endpoint) or (credentials.region if credentials else None) or self.default_region

    def _client(self, endpoint: str, credentials: Credentials | None) -> Any:
        """A cached boto3 client for (endpoint, credentials); built in the calling worker thread."""
        endpoint_url = self.endpoint_url(endpoint)
        region = self.region_for(endpoint, credentials)
        key = (endpoint.lower(), endpoint_url, region, credentials)
        with self._clients_lock:
            client = self._clients.get(key)
            if client is not None:
                self._clients.move_to_end(key)
                return client
            client = self._make_client(endpoint_url, region, credentials)
            self._clients[key] = client
            while len(self._clients) > _MAX_CLIENTS:
                self._clients.popitem(last=False)
            return client

    def _make_client(self, endpoint_url: str | None, region: str, credentials: Credentials | None) -> Any:
        aws = endpoint_url is None
        config = Config(
            region_name=region,
            signature_version=UNSIGNED if credentials is None else "s3v4",
            # Path style for MinIO and friends; AWS picks virtual-host style itself where it can.
            s3={"addressing_style": "auto" if aws else "path"},
            retries={"mode": "standard", "max_attempts": self._max_attempts},
            connect_timeout=self._timeouts[0],
            read_timeout=self._timeouts[1],
            max_pool_connections=max(10, self.transfer_config.max_request_concurrency + 2),
            client_cert=self.client_cert,
            # Newer botocore adds CRC checksums to every request by default; several S3-compatible
            # servers (older MinIO, Ceph) reject them. Only send them where an operation requires it.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        return _session_client(
            endpoint_url=endpoint_url,
            verify=self.ca_bundle if (self.ca_bundle and not aws) else None,
            aws_access_key_id=credentials.access_key if credentials else None,
            aws_secret_access_key=credentials.secret_key if credentials else None,
            aws_session_token=credentials.session_token if credentials else None,
            config=config,
        )

    # -- error mapping -----------------------------------------------------------------------------------

    def _translate(self, exc: Exception, url: str, credentials: Credentials | None) -> StorageError:
        """Our error for a boto error; messages name the URL and never a secret."""
        url = redact_url(url)
        if isinstance(exc, StorageError):
            return exc
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _NOT_FOUND:
                return ObjectNotFound(f"object not found: {url}")
            if code == "NoSuchBucket":
                endpoint, bucket, _ = parse_s3_url(url)
                self._buckets_seen.pop((endpoint, bucket), None)
                return StorageError(f"bucket {bucket} does not exist ({url})")
            if code in _DENIED or status == 403:
                return StorageError(
                    f"access denied ({code or status}) to {url} with {_key_hint(credentials)}"
                )
            if code in {"PreconditionFailed", "412"}:
                return StorageError(f"object changed during the transfer: {url}")
            return StorageError(
                f"S3 error {code or status} for {url}: {error.get('Message', '')}".rstrip(": ")
            )
        if isinstance(exc, BotoCoreError):
            return StorageError(f"cannot reach S3 for {url}: {exc}")
        return StorageError(f"S3 transfer of {url} failed: {type(exc).__name__}: {exc}")

    async def _call(self, url: str, credentials: Credentials | None, fn: Callable[[], T]) -> T:
        """Run a short, read-only boto call in a thread. Abandoning on cancel is safe: nothing is written."""
        try:
            return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, url, credentials) from exc

    async def _bucket_missing(
        self, client: Any, url: str, loc: S3Location, credentials: Credentials | None
    ) -> bool:
        """A HEAD on a key answers 404 for a missing bucket too; ask the bucket to tell the two apart, unless
        it was seen within BUCKET_SEEN_TTL (an experiment's missing mutable artifacts share one bucket)."""
        seen = self._buckets_seen.get((loc.endpoint, loc.bucket))
        if seen is not None and trio.current_time() - seen < BUCKET_SEEN_TTL:
            return False
        try:
            await self._call(url, credentials, lambda: client.head_bucket(Bucket=loc.bucket))
        except ObjectNotFound:
            self._buckets_seen.pop((loc.endpoint, loc.bucket), None)
            return True
        except StorageError:
            return False  # e.g. no ListBucket right: assume the bucket exists
        self._bucket_exists(loc)
        return False

    def _bucket_exists(self, loc: S3Location) -> None:
        """Remember that ``loc``'s bucket answered (see BUCKET_SEEN_TTL); called from the trio thread."""
        self._buckets_seen[(loc.endpoint, loc.bucket)] = trio.current_time()
        if len(self._buckets_seen) > _MAX_CLIENTS:
            self._buckets_seen.pop(next(iter(self._buckets_seen)))

    async def _transfer(self, url: str, credentials: Credentials | None, start: Callable[[Any], Any]) -> None:
        """Run one transfer-manager transfer; on cancel or failure, cancel it and wait for its threads."""
        loc = self._location(url)
        client = await self._call(url, credentials, lambda: self._client(loc.endpoint, credentials))
        manager = create_transfer_manager(client, self.transfer_config)
        future = start(manager)
        try:
            # Safe to abandon: the thread only waits on the future; the transfer itself is cancelled below.
            await trio.to_thread.run_sync(future.result, abandon_on_cancel=True)
        except BaseException as exc:
            # future.cancel() then a plain shutdown(): s3transfer 0.19's shutdown(cancel=True) passes its
            # arguments in the wrong order and raises TypeError while transfers are in flight.
            future.cancel()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(manager.shutdown)
            if isinstance(exc, Exception) and not isinstance(exc, OSError):
                raise self._translate(exc, url, credentials) from exc
            raise
        await trio.to_thread.run_sync(manager.shutdown)

    @staticmethod
    def _location(url: str) -> S3Location:
        return S3Location(*parse_s3_url(url))

    # -- ObjectStore ---------------------------------------------------------------------------------------

    def handles(self, url: str) -> bool:
        """Whether ``url`` is an ``s3://`` URL."""
        return url.startswith("s3://")

    def warm_up(self) -> None:
        """Load boto3's S3 model, endpoint rules and partitions now (no request is sent), so the first
        experiment's client takes milliseconds: called by the runner at start-up, in a background thread."""
        self._make_client(_WARM_UP_ENDPOINT, self.default_region, None)

    async def stat(self, url: str, credentials: Credentials | None = None) -> ObjectInfo | None:
        """Size, ETag and mtime of ``url``; None when the key does not exist (a missing bucket raises)."""
        loc = self._location(url)
        client = await self._call(url, credentials, lambda: self._client(loc.endpoint, credentials))
        try:
            head = await self._call(
                url, credentials, lambda: client.head_object(Bucket=loc.bucket, Key=loc.key)
            )
        except ObjectNotFound:
            if await self._bucket_missing(client, url, loc, credentials):
                raise StorageError(f"bucket {loc.bucket} does not exist ({redact_url(url)})") from None
            return None
        self._bucket_exists(loc)
        return self._info(loc.url, head)

    async def get(self, url: str, dest: Path, credentials: Credentials | None = None) -> ObjectInfo:
        """Download ``url`` to ``dest`` via a temp file in dest's directory and ``os.replace``."""
        info = await self.stat(url, credentials)
        if info is None:
            raise ObjectNotFound(f"object not found: {redact_url(url)}")
        loc = self._location(url)
        dest = Path(dest)
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.part")
        etag = f'"{info.etag}"' if info.etag else None
        try:
            if info.size < self.transfer_config.multipart_threshold:
                await self._get_object(url, loc, tmp, etag, credentials)
            else:
                await self._transfer(
                    url,
                    credentials,
                    lambda m: m.download(
                        loc.bucket, loc.key, str(tmp), subscribers=[_KnownObject(info.size, etag)]
                    ),
                )
            os.replace(tmp, dest)
        except OSError as exc:  # writing the local file: a full disk is ours to report, not the store's
            if is_disk_full(exc):
                raise DiskFull(f"no space left while downloading {redact_url(url)} to {dest}: {exc}") from exc
            raise StorageError(f"cannot save {redact_url(url)} to {dest}: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)
        log.debug("downloaded %s (%d bytes) to %s", loc.url, info.size, dest)
        return info

    async def _get_object(
        self, url: str, loc: S3Location, tmp: Path, etag: str | None, credentials: Credentials | None
    ) -> None:
        """One GetObject of a small object into ``tmp`` (``IfMatch``: the version we stat'ed, or an error).

        Streaming errors are retried like the transfer manager retries them; a cancel is seen between chunks,
        so no thread writes ``tmp`` after we return."""
        client = await self._call(url, credentials, lambda: self._client(loc.endpoint, credentials))
        conditions = {"IfMatch": etag} if etag else {}

        def get_object() -> None:
            for attempt in range(1, self.transfer_config.num_download_attempts + 1):
                try:
                    body = client.get_object(Bucket=loc.bucket, Key=loc.key, **conditions)["Body"]
                    with body, open(tmp, "wb") as out:
                        for chunk in body.iter_chunks(MiB):
                            trio.from_thread.check_cancelled()
                            out.write(chunk)
                    return
                except S3_RETRYABLE_DOWNLOAD_ERRORS:
                    if attempt == self.transfer_config.num_download_attempts:
                        raise

        try:
            await trio.to_thread.run_sync(get_object)
        except (ConnectionError, TimeoutError) as exc:  # the network, after the retries: the store's fault
            raise self._translate(exc, url, credentials) from exc
        except OSError:  # writing the local file: get() tells a full disk from other local errors
            raise
        except Exception as exc:
            raise self._translate(exc, url, credentials) from exc

    async def put(self, src: Path, url: str, credentials: Credentials | None = None) -> ObjectInfo:
        """Upload ``src`` to ``url``: one PutObject below the multipart threshold, else multipart.

        Atomic for readers: S3 makes a PUT, and a multipart upload at CompleteMultipartUpload, visible whole
        or not at all; a cancelled or failed multipart upload is aborted by the transfer manager.
        """
        loc = self._location(url)
        size = os.stat(src).st_size
        if size < self.transfer_config.multipart_threshold:
            etag = await self._put_object(src, url, loc, credentials)
            log.debug("uploaded %s (%d bytes) to %s", src, size, loc.url)
            return ObjectInfo(url=loc.url, size=size, etag=etag)
        await self._transfer(url, credentials, lambda m: m.upload(str(src), loc.bucket, loc.key))
        self._bucket_exists(loc)
        log.debug("uploaded %s (%d bytes) to %s", src, size, loc.url)
        try:  # the upload response's ETag is not exposed by the transfer manager; ask for it
            info = await self.stat(url, credentials)
        except StorageError:  # e.g. a write-only key: the upload itself succeeded
            info = None
        return info or ObjectInfo(url=loc.url, size=size)

    async def _put_object(
        self, src: Path, url: str, loc: S3Location, credentials: Credentials | None
    ) -> str | None:
        """One PutObject of the small file ``src``; its ETag. Never abandoned on cancel: a PUT still in flight
        after we returned could land after a newer upload of the same key and replace it with older data."""
        client = await self._call(url, credentials, lambda: self._client(loc.endpoint, credentials))

        def put_object() -> str | None:
            with open(src, "rb") as body:  # botocore rewinds it for a retry
                response = client.put_object(Bucket=loc.bucket, Key=loc.key, Body=body)
            return str(response.get("ETag", "")).strip('"') or None

        try:
            etag = await trio.to_thread.run_sync(put_object)
        except OSError:  # reading the local file: not the store's fault (as for multipart uploads)
            raise
        except Exception as exc:
            raise self._translate(exc, url, credentials) from exc
        self._bucket_exists(loc)
        return etag

    async def list(self, prefix_url: str, credentials: Credentials | None = None) -> list[ObjectInfo]:
        """Every object whose URL starts with ``prefix_url`` (paginated ListObjectsV2)."""
        loc = self._location(prefix_url)
        client = await self._call(prefix_url, credentials, lambda: self._client(loc.endpoint, credentials))

        def list_all() -> list[ObjectInfo]:
            found: list[ObjectInfo] = []
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=loc.bucket, Prefix=loc.key, PaginationConfig={"PageSize": self._page_size}
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    found.append(
                        ObjectInfo(
                            url=f"s3://{loc.endpoint}/{loc.bucket}/{obj['Key']}",
                            size=int(obj["Size"]),
                            etag=str(obj.get("ETag", "")).strip('"') or None,
                            mtime=obj["LastModified"].timestamp() if "LastModified" in obj else None,
                        )
                    )
            return found

        return await self._call(prefix_url, credentials, list_all)

    @staticmethod
    def _info(url: str, head: dict[str, Any]) -> ObjectInfo:
        modified = head.get("LastModified")
        return ObjectInfo(
            url=url,
            size=int(head["ContentLength"]),
            etag=str(head.get("ETag", "")).strip('"') or None,
            mtime=modified.timestamp() if modified is not None else None,
        )
