"""The object-store interface every backend implements, and the key rules they all share.

A key is a ``/``-separated path such as ``images/3f5a...``. The same keys are valid on every backend,
so data written to a local directory in development has the same names in MinIO in production.
"""

from collections.abc import Iterator
from typing import Protocol

from tuwen.storage.errors import InvalidKey

#: S3's limit on a key's UTF-8 length.
MAX_KEY_BYTES = 1024


def check_key(key: str) -> str:
    """Return ``key`` unchanged if every backend can store it safely, else raise ``InvalidKey``.

    Refused: empty keys, a leading ``/``, empty, ``.`` or ``..`` segments (they could escape a local
    root), backslashes, control characters, and keys over 1024 UTF-8 bytes.
    """
    if not key:
        raise InvalidKey("an object key must not be empty")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise InvalidKey(f"object key is longer than {MAX_KEY_BYTES} bytes: {key[:64]!r}...")
    if "\\" in key or any(ord(ch) < 32 or ord(ch) == 127 for ch in key):
        raise InvalidKey(f"object key contains a backslash or control character: {key!r}")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise InvalidKey(f"object key must be a relative path without empty, '.' or '..' parts: {key!r}")
    return key


class ObjectStore(Protocol):
    """Bytes under string keys in one private bucket (or directory). Implementations are thread-safe.

    Every method raises only ``StorageError`` subclasses: ``ObjectNotFound``, ``StorageUnavailable``
    (retryable), ``StorageAuthError``, ``StorageConfigError``, ``InvalidKey``.
    """

    def ensure_ready(self) -> None:
        """Create the bucket or directory if it is missing. It stays private. Safe to call again."""

    def ping(self) -> None:
        """Cheap health check: the store answers, accepts our credentials and the bucket exists."""

    def put(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
    ) -> None:
        """Store ``data`` under ``key``, replacing what was there. Readers never see a partial object."""

    def get(self, key: str) -> bytes:
        """The bytes stored under ``key``; ``ObjectNotFound`` if there are none."""

    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""

    def delete(self, key: str) -> None:
        """Remove ``key``; removing a missing key is not an error."""

    def presigned_get(self, key: str, expires_s: int) -> str:
        """A URL that lets its holder GET ``key`` without credentials for ``expires_s`` seconds."""

    def list(self, prefix: str = "") -> Iterator[str]:
        """The keys that start with ``prefix``, in lexicographic order."""

    def expire(self, prefix: str, days: int) -> None:
        """Objects under ``prefix`` are deleted ``days`` after they were written (privacy retention)."""
