"""Pick the object store from plain parameters (storage knows nothing of the project's settings)."""

from pathlib import Path

from tuwen.storage.local import LocalObjectStore
from tuwen.storage.objects import ObjectStore
from tuwen.storage.s3 import S3ObjectStore


def open_object_store(
    *,
    endpoint: str | None,
    access_key: str,
    secret_key: str,
    bucket: str,
    secure: bool,
    region: str | None,
    directory: Path,
) -> ObjectStore:
    """An S3 store when ``endpoint`` is set (non-empty), else a local store under ``directory``.

    Nothing is contacted or created here; call ``ensure_ready()`` on the result.
    """
    if endpoint:
        return S3ObjectStore(endpoint, access_key, secret_key, bucket, secure=secure, region=region or None)
    return LocalObjectStore(directory)
