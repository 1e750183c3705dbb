"""Any S3-compatible object store, through boto3 (tested against a real SeaweedFS server).

Every object written here carries its sha256 and size as user metadata (``x-amz-meta-sha256``,
``x-amz-meta-size``): S3's own checksums guard each request in transit, the metadata guards
the object end to end, whatever copied or rewrote it since.

Retries: botocore's own retry loop is switched off and tenacity retries whole operations on
errors that can pass (connection drops, 5xx, throttling, a body cut mid-read). One retry
layer, so the number of attempts is what ``max_attempts`` says, not a product of two loops.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, cast

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    FlexibleChecksumError,
    HTTPClientError,
    IncompleteReadError,
    ResponseStreamingError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential, wait_random

from lorafleet.adapters_store.objectstore import _integrity
from lorafleet.adapters_store.objectstore._keys import validate_key, validate_prefix
from lorafleet.adapters_store.objectstore._metrics import counts_failures
from lorafleet.adapters_store.objectstore.base import ObjectInfo
from lorafleet.platform.domain.errors import (
    Conflict,
    IntegrityFailure,
    InvalidRequest,
    LorafleetError,
    NotFound,
    Unavailable,
)
from lorafleet.platform.domain.ids import new_ulid

T = TypeVar("T")

MIN_PART_BYTES = 5 * 1024 * 1024
"""S3 refuses multipart parts smaller than this (except the last)."""
_META_SHA256 = "sha256"
_META_SIZE = "size"
_TRANSPORT_ERRORS = (BotoConnectionError, HTTPClientError, ResponseStreamingError, IncompleteReadError)
_RETRYABLE_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                              "InternalError", "ServiceUnavailable"})
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_DENIED_CODES = frozenset({"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "403"})
_BAD_DIGEST_CODES = frozenset({"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"})


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, _TRANSPORT_ERRORS):
        return True
    if isinstance(exc, ClientError):
        return _status(exc) >= 500 or _code(exc) in _RETRYABLE_CODES
    return False


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


class S3ObjectStore:
    def __init__(
        self,
        *,
        bucket: str,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key: str | None = None,
        secret_key: str | None = None,
        multipart_threshold_bytes: int = 8 * 1024 * 1024,
        max_concurrency: int = 8,
        max_attempts: int = 4,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
        list_page_size: int = 1000,
    ) -> None:
        if max_concurrency < 1 or max_attempts < 1:
            raise InvalidRequest("max_concurrency and max_attempts must be at least 1",
                                 code="invalid_settings")
        self.bucket = bucket
        self.max_concurrency = max_concurrency
        self._list_page_size = list_page_size
        self._part_bytes = max(multipart_threshold_bytes, MIN_PART_BYTES)
        self._threshold = multipart_threshold_bytes
        # Empty credentials mean "boto3's default chain" (environment, instance role, ...).
        session = boto3.session.Session(
            aws_access_key_id=access_key or None, aws_secret_access_key=secret_key or None,
            region_name=region,
        )
        config = Config(
            signature_version="s3v4",
            # Self-hosted S3 servers (SeaweedFS, MinIO) answer on one host name: path style.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            retries={"total_max_attempts": 1},
            max_pool_connections=max(10, 2 * max_concurrency),
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
        )
        self._client = session.client("s3", endpoint_url=endpoint_url, config=config)
        # boto3's transfer manager does not pass IfNoneMatch through to PutObject or
        # CompleteMultipartUpload, so conditional writes go through a second client that adds
        # it to exactly those two calls; then a large if_absent upload is as atomic as a small one.
        self._conditional = session.client("s3", endpoint_url=endpoint_url, config=config)
        for operation in ("PutObject", "CompleteMultipartUpload"):
            self._conditional.meta.events.register(
                f"provide-client-params.s3.{operation}", self._add_if_none_match
            )
        self._transfer_config = TransferConfig(
            multipart_threshold=max(multipart_threshold_bytes, 1),
            multipart_chunksize=self._part_bytes,
            max_concurrency=max_concurrency,
            use_threads=True,
        )
        self._retrying = Retrying(
            retry=retry_if_exception(_is_retryable),
            stop=stop_after_attempt(max_attempts),
            wait=wait_exponential(multiplier=0.05, max=2.0) + wait_random(0, 0.05),
            reraise=True,
        )

    @staticmethod
    def _add_if_none_match(params: dict[str, Any], **_: Any) -> None:
        params["IfNoneMatch"] = "*"

    # -- writes --------------------------------------------------------------------------

    @counts_failures("put")
    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> ObjectInfo:
        validate_key(key)
        sha256 = hashlib.sha256(data).hexdigest()
        return self._put(key, io.BytesIO(data), size=len(data), sha256=sha256, if_absent=if_absent)

    @counts_failures("put")
    def put_file(self, key: str, path: Path, *, if_absent: bool = False) -> ObjectInfo:
        validate_key(key)
        sha256, size = _integrity.sha256_of_file(Path(path))
        with Path(path).open("rb") as fh:
            return self._put(key, fh, size=size, sha256=sha256, if_absent=if_absent)

    @counts_failures("put")
    def put_stream(self, key: str, stream: BinaryIO, *, if_absent: bool = False) -> ObjectInfo:
        validate_key(key)
        # The sha256 goes into the object's metadata, which S3 takes when the upload starts,
        # so a stream of unknown content is spooled first (to disk past the part size).
        with tempfile.SpooledTemporaryFile(max_size=self._part_bytes) as spooled:
            spool = cast(BinaryIO, spooled)
            digest = hashlib.sha256()
            size = 0
            while chunk := stream.read(_integrity.CHUNK_BYTES):
                digest.update(chunk)
                spool.write(chunk)
                size += len(chunk)
            return self._put(key, spool, size=size, sha256=digest.hexdigest(), if_absent=if_absent)

    def _put(self, key: str, fh: BinaryIO, *, size: int, sha256: str, if_absent: bool) -> ObjectInfo:
        client = self._conditional if if_absent else self._client
        metadata = {_META_SHA256: sha256, _META_SIZE: str(size)}

        def attempt() -> None:
            fh.seek(0)
            if size <= self._threshold:
                # One request: the server checks the whole body against our own sha256.
                client.put_object(Bucket=self.bucket, Key=key, Body=fh, ContentLength=size,
                                  Metadata=metadata, ChecksumSHA256=_b64(sha256))
            else:
                # Multipart: every part carries its own SHA-256 checksum, checked by the server.
                client.upload_fileobj(fh, self.bucket, key, Config=self._transfer_config,
                                      ExtraArgs={"Metadata": metadata, "ChecksumAlgorithm": "SHA256"})

        self._call(attempt, key=key)
        return ObjectInfo(key=key, size=size, sha256=sha256)

    @counts_failures("delete")
    def delete(self, key: str) -> None:
        validate_key(key)
        self._call(lambda: self._client.delete_object(Bucket=self.bucket, Key=key), key=key)

    # -- reads ---------------------------------------------------------------------------

    @counts_failures("get")
    def get_bytes(self, key: str, *, verify: bool = True) -> bytes:
        validate_key(key)

        def attempt() -> tuple[dict[str, Any], bytes]:
            # No ChecksumMode: our end-to-end sha256 below covers what S3's would, once.
            response = self._client.get_object(Bucket=self.bucket, Key=key)
            with closing(response["Body"]) as body:
                return response, body.read()

        response, data = self._call(attempt, key=key)
        if verify:
            size, sha256 = self._recorded(response)
            _integrity.check(key, recorded_size=size, recorded_sha256=sha256,
                             actual_size=len(data), actual_sha256=hashlib.sha256(data).hexdigest())
        return data

    @counts_failures("get")
    def get_range(self, key: str, start: int, length: int) -> bytes:
        validate_key(key)
        if start < 0 or length < 0:
            raise InvalidRequest("a range needs start >= 0 and length >= 0", code="invalid_range")
        if length == 0:
            self.head(key)  # a missing key is NotFound whatever the range
            return b""

        def attempt() -> bytes:
            response = self._client.get_object(Bucket=self.bucket, Key=key,
                                               Range=f"bytes={start}-{start + length - 1}")
            with closing(response["Body"]) as body:
                return bytes(body.read())

        return self._call(attempt, key=key)

    @counts_failures("get")
    def download(self, key: str, path: Path, *, verify: bool = True) -> ObjectInfo:
        validate_key(key)
        response = self._call(lambda: self._client.head_object(Bucket=self.bucket, Key=key), key=key)
        size = int(response["ContentLength"])
        recorded_size, recorded_sha256 = self._recorded(response)
        if verify:  # a short object fails before any byte moves
            _integrity.check(key, recorded_size=recorded_size, recorded_sha256=None,
                             actual_size=size, actual_sha256=None)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{new_ulid()}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.ftruncate(fd, size)
                ranges = [(offset, min(self._part_bytes, size - offset))
                          for offset in range(0, size, self._part_bytes)]
                # If-Match pins every range to the version we sized: an overwrite mid-way
                # fails the download instead of stitching two versions together.
                fetch = self._range_fetcher(key=key, etag=str(response["ETag"]), fd=fd)
                with ThreadPoolExecutor(max_workers=self.max_concurrency,
                                        thread_name_prefix="s3-download") as pool:
                    for _ in pool.map(fetch, *zip(*ranges, strict=True)):
                        pass
                os.fsync(fd)
            finally:
                os.close(fd)
            if verify:
                actual_sha256, actual_size = _integrity.sha256_of_file(tmp)
                _integrity.check(key, recorded_size=recorded_size, recorded_sha256=recorded_sha256,
                                 actual_size=actual_size, actual_sha256=actual_sha256)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return ObjectInfo(key=key, size=size, sha256=recorded_sha256)

    def _range_fetcher(self, *, key: str, etag: str, fd: int) -> Callable[[int, int], None]:
        def fetch(offset: int, length: int) -> None:
            def attempt() -> None:
                response = self._client.get_object(
                    Bucket=self.bucket, Key=key, IfMatch=etag, Range=f"bytes={offset}-{offset + length - 1}"
                )
                position = offset
                with closing(response["Body"]) as body:
                    for chunk in body.iter_chunks(_integrity.CHUNK_BYTES):
                        view = memoryview(chunk)
                        while view:
                            written = os.pwrite(fd, view, position)
                            view = view[written:]
                            position += written
                if position - offset != length:
                    raise IntegrityFailure(f"range of {key!r} at {offset} returned {position - offset} "
                                           f"of {length} bytes", code="truncated_object")

            self._call(attempt, key=key, precondition=lambda: Unavailable(
                f"object {key!r} changed while it was downloaded", code="object_changed"))

        return fetch

    @counts_failures("head")
    def head(self, key: str) -> ObjectInfo:
        validate_key(key)
        response = self._call(lambda: self._client.head_object(Bucket=self.bucket, Key=key), key=key)
        return ObjectInfo(key=key, size=int(response["ContentLength"]), sha256=self._recorded(response)[1])

    @counts_failures("head")
    def exists(self, key: str) -> bool:
        try:
            self.head(key)
        except NotFound:
            return False
        return True

    @counts_failures("list")
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        token: str | None = None
        with ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="s3-list") as pool:
            while True:
                kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix,
                                          "MaxKeys": self._list_page_size}
                if token:
                    kwargs["ContinuationToken"] = token
                page: dict[str, Any] = self._call(partial(self._client.list_objects_v2, **kwargs), key=prefix)
                keys = [item["Key"] for item in page.get("Contents", [])]
                # A listing carries no user metadata; the sha256 needs one HEAD per object.
                for info in pool.map(self._head_or_none, keys):
                    if info is not None:
                        yield info
                if not page.get("IsTruncated"):
                    return
                token = page["NextContinuationToken"]

    def _head_or_none(self, key: str) -> ObjectInfo | None:
        try:
            response = self._call(lambda: self._client.head_object(Bucket=self.bucket, Key=key), key=key)
        except NotFound:  # deleted between the listing and the HEAD
            return None
        return ObjectInfo(key=key, size=int(response["ContentLength"]), sha256=self._recorded(response)[1])

    @counts_failures("ping")
    def ping(self) -> None:
        # One attempt: a health check reports the state now, it does not wait it out.
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            raise Unavailable(f"S3 bucket {self.bucket!r} is not usable: {_code(exc)} ({_status(exc)})",
                              code="object_store_unavailable") from exc
        except _TRANSPORT_ERRORS as exc:
            raise Unavailable(f"S3 endpoint unreachable: {exc}", code="object_store_unavailable") from exc

    # -- internals -----------------------------------------------------------------------

    @staticmethod
    def _recorded(response: dict[str, Any]) -> tuple[int | None, str | None]:
        """(size, sha256) recorded at write time; None for objects lorafleet did not write."""
        metadata = response.get("Metadata") or {}
        size = metadata.get(_META_SIZE)
        return (int(size) if size is not None and size.isdigit() else None), metadata.get(_META_SHA256)

    def _call(self, fn: Callable[[], T], *, key: str,
              precondition: Callable[[], LorafleetError] | None = None) -> T:
        """Run ``fn`` under the retry policy and translate what escapes into the domain errors."""
        try:
            return self._retrying(fn)
        except ClientError as exc:
            if _status(exc) == 412 and precondition is not None:
                raise precondition() from exc
            raise self._translate(exc, key) from exc
        except FlexibleChecksumError as exc:
            raise IntegrityFailure(f"object {key!r} failed its S3 checksum",
                                   code="checksum_mismatch") from exc
        except _TRANSPORT_ERRORS as exc:
            raise Unavailable(f"S3 unreachable for {key!r}: {exc}", code="object_store_unavailable") from exc

    def _translate(self, exc: ClientError, key: str) -> LorafleetError:
        status, code = _status(exc), _code(exc)
        if code == "NoSuchBucket":
            return Unavailable(f"S3 bucket {self.bucket!r} does not exist", code="object_store_unavailable")
        if code in _NOT_FOUND_CODES or status == 404:
            return NotFound(f"object {key!r} does not exist", code="object_not_found", param="key")
        if status == 412 or code == "PreconditionFailed":
            # Only if_absent writes send a precondition here. A retried write whose first try
            # landed also answers 412; reporting Conflict then is the safe reading.
            return Conflict(f"object {key!r} already exists", code="object_exists", param="key")
        if status == 416 or code == "InvalidRange":
            return InvalidRequest(f"range outside object {key!r}", code="invalid_range")
        if code in _BAD_DIGEST_CODES:
            return IntegrityFailure(f"S3 refused the bytes of {key!r} as corrupted in transit",
                                    code="checksum_mismatch")
        if code in _DENIED_CODES or status == 403:
            return LorafleetError(f"S3 refused lorafleet's credentials: {code}",
                                  code="object_store_access_denied")
        if _is_retryable(exc):
            return Unavailable(f"S3 failed for {key!r}: {code} ({status})", code="object_store_unavailable")
        return LorafleetError(f"S3 error for {key!r}: {code} ({status})", code="object_store_error")
