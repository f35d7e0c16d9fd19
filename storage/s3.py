"""Objects in one bucket of an S3-protocol server (MinIO in production) through the ``minio`` client."""

import io
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from minio.helpers import MAX_PART_SIZE, MIN_PART_SIZE, check_bucket_name

from tuwen.storage.errors import (
    ObjectNotFound,
    StorageAuthError,
    StorageConfigError,
    StorageError,
    StorageUnavailable,
)
from tuwen.storage.objects import check_key

#: S3 error codes by what they mean for the caller. Any other code with a 5xx status is unavailable.
_NOT_FOUND_CODES = frozenset({"NoSuchKey"})
_AUTH_CODES = frozenset({
    "AccessDenied", "AccountProblem", "AllAccessDisabled", "ExpiredToken", "InvalidAccessKeyId",
    "InvalidSecurity", "InvalidToken", "RequestTimeTooSkewed", "SignatureDoesNotMatch",
})
_CONFIG_CODES = frozenset({
    "AuthorizationHeaderMalformed", "BucketAlreadyExists", "IllegalLocationConstraintException",
    "InvalidBucketName", "InvalidRegion", "NoSuchBucket", "PermanentRedirect",
})
_UNAVAILABLE_CODES = frozenset({
    "InternalError", "OperationAborted", "RequestTimeout", "ServiceUnavailable", "SlowDown",
    "XMinioServerNotInitialized",
})

#: The longest a presigned URL may live (S3's limit).
MAX_PRESIGN_S = 7 * 24 * 3600


class S3ObjectStore:
    """Objects in ``bucket`` on an S3-protocol server at ``endpoint`` (``host:port``, no scheme).

    One ``Minio`` client with one connection pool is shared by all threads. Timeouts are short and
    retries few, so an outage surfaces within seconds as ``StorageUnavailable`` instead of hanging: a
    refused connection after ``retries`` quick retries, a silent server after about
    ``2 * read_timeout_s``. ``Retry-After`` headers are not honoured (a 503 could ask for an hour).
    """

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        secure: bool = False,
        region: str | None = None,
        *,
        connect_timeout_s: float = 3.0,
        read_timeout_s: float = 30.0,
        retries: int = 2,
        max_connections: int = 16,
    ) -> None:
        if not endpoint or "://" in endpoint:
            raise StorageConfigError(f"S3 endpoint must be host:port without a scheme, got {endpoint!r}")
        try:
            check_bucket_name(bucket, strict=True)
        except ValueError as exc:
            raise StorageConfigError(f"invalid bucket name {bucket!r}: {exc}") from exc
        self.endpoint = endpoint
        self.bucket = bucket
        self.secure = secure
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
            maxsize=max_connections,
            cert_reqs="CERT_REQUIRED",
            retries=urllib3.Retry(
                total=retries,
                connect=retries,
                read=min(retries, 1),  # one retry covers a stale keep-alive connection
                status=retries,
                backoff_factor=0.2,
                status_forcelist=(500, 502, 503, 504),
                raise_on_status=False,  # hand the last 5xx to minio, which reports its S3 error code
                respect_retry_after_header=False,
            ),
        )
        try:
            self._client = Minio(
                endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region,
                http_client=http,
            )
        except ValueError as exc:
            raise StorageConfigError(f"invalid S3 endpoint {endpoint!r} or region {region!r}: {exc}") from exc

    def __repr__(self) -> str:
        scheme = "https" if self.secure else "http"
        return f"S3ObjectStore({scheme}://{self.endpoint}/{self.bucket})"

    def ensure_ready(self) -> None:
        """Create the bucket if it is missing. No bucket policy is ever set, so it stays private."""
        with self._errors("create bucket"):
            if self._client.bucket_exists(self.bucket):
                return
            try:
                self._client.make_bucket(self.bucket)
            except S3Error as exc:  # another process created it between our two calls
                already = exc.code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists")
                if not (already and self._client.bucket_exists(self.bucket)):
                    raise

    def ping(self) -> None:
        with self._errors("ping"):
            exists = self._client.bucket_exists(self.bucket)
        if not exists:
            raise StorageConfigError(f"bucket {self.bucket!r} does not exist on {self.endpoint}; call ensure_ready()")

    def put(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
    ) -> None:
        """Upload in one request up to 5 GiB (no multipart leftovers after a failure)."""
        part_size = min(max(len(data), MIN_PART_SIZE), MAX_PART_SIZE)
        with self._errors("put", key):
            self._client.put_object(
                self.bucket, check_key(key), io.BytesIO(data), len(data), content_type=content_type,
                metadata=dict(metadata) if metadata else None, part_size=part_size,
            )

    def get(self, key: str) -> bytes:
        with self._errors("get", key):
            response = self._client.get_object(self.bucket, check_key(key))
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

    def exists(self, key: str) -> bool:
        with self._errors("stat", key):
            try:
                self._client.stat_object(self.bucket, check_key(key))
            except S3Error as exc:
                if exc.code in _NOT_FOUND_CODES:
                    return False
                raise
        return True

    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            try:
                self._client.remove_object(self.bucket, check_key(key))
            except S3Error as exc:
                if exc.code not in _NOT_FOUND_CODES:
                    raise

    def presigned_get(self, key: str, expires_s: int) -> str:
        if not 1 <= expires_s <= MAX_PRESIGN_S:
            raise ValueError(f"expires_s must be between 1 and {MAX_PRESIGN_S}, got {expires_s}")
        with self._errors("presign", key):
            return self._client.presigned_get_object(self.bucket, check_key(key), expires=timedelta(seconds=expires_s))

    def list(self, prefix: str = "") -> Iterator[str]:
        with self._errors("list", prefix):
            for obj in self._client.list_objects(self.bucket, prefix=prefix or None, recursive=True):
                if obj.object_name is not None and not obj.is_dir:
                    yield obj.object_name

    def expire(self, prefix: str, days: int) -> None:
        """An S3 lifecycle rule on the bucket: the server deletes old objects itself."""
        from minio.commonconfig import ENABLED, Filter
        from minio.lifecycleconfig import Expiration, LifecycleConfig, Rule

        rule = Rule(ENABLED, rule_filter=Filter(prefix=prefix), rule_id=f"tuwen-expire-{prefix.strip('/') or 'all'}",
                    expiration=Expiration(days=days))
        with self._errors("set lifecycle"):
            current = self._client.get_bucket_lifecycle(self.bucket)
            rules = [r for r in (current.rules if current else []) if r.rule_id != rule.rule_id]
            self._client.set_bucket_lifecycle(self.bucket, LifecycleConfig([*rules, rule]))

    @contextmanager
    def _errors(self, action: str, key: str | None = None) -> Iterator[None]:
        """Turn minio, urllib3 and socket errors raised inside the block into ``StorageError``s."""
        where = f"{action} {self.bucket}/{key}" if key is not None else f"{action} {self.bucket}"
        try:
            yield
        except S3Error as exc:
            raise _from_s3_error(exc, f"{where} on {self.endpoint}") from exc
        except (ServerError, InvalidResponseError) as exc:
            raise StorageUnavailable(f"{where}: {self.endpoint} answered badly: {exc}") from exc
        except urllib3.exceptions.MaxRetryError as exc:
            if isinstance(exc.reason, urllib3.exceptions.SSLError):
                raise StorageConfigError(f"{where}: TLS to {self.endpoint} failed: {exc.reason}") from exc
            raise StorageUnavailable(f"{where}: {self.endpoint} unreachable: {exc.reason}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise StorageUnavailable(f"{where}: {self.endpoint} unreachable: {exc}") from exc
        except MinioException as exc:
            raise StorageError(f"{where} on {self.endpoint} failed: {exc}") from exc


def _from_s3_error(exc: S3Error, where: str) -> StorageError:
    message = f"{where}: {exc.code}: {exc.message}"
    if exc.code in _NOT_FOUND_CODES:
        return ObjectNotFound(message)
    if exc.code in _AUTH_CODES:
        return StorageAuthError(message)
    if exc.code in _CONFIG_CODES:
        return StorageConfigError(message)
    if exc.code in _UNAVAILABLE_CODES or exc.response.status >= 500:
        return StorageUnavailable(message)
    return StorageError(message)
