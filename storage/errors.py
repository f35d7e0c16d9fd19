"""Storage's exception tree: a stable ``code`` to match on and a ``retryable`` flag.

Callers never see a backend's own exceptions (minio, urllib3, OSError); each backend maps them here.
"""


class StorageError(Exception):
    """Any storage failure not covered by a subclass."""

    code: str = "storage_error"
    retryable: bool = False


class ObjectNotFound(StorageError):
    """The key does not exist (the code says image, the usual case; results use it too)."""

    code = "image_not_found"


class StorageUnavailable(StorageError):
    """The store did not answer properly: connection refused, timeout, 5xx. The same call may work later."""

    code = "storage_unavailable"
    retryable = True


class StorageAuthError(StorageError):
    """The store refused our credentials: unknown access key, wrong secret (signature), access denied."""

    code = "storage_auth_failed"


class StorageConfigError(StorageError):
    """The store is set up wrong for this call: bad endpoint or bucket name, bucket missing, root unusable."""

    code = "storage_misconfigured"


class InvalidKey(StorageError, ValueError):
    """A key that is not allowed on every backend (empty, absolute, ``..``, control characters, too long)."""

    code = "invalid_key"
