"""Build the storage layer's stores from settings (storage itself knows nothing of settings)."""

from __future__ import annotations

import logging

from tuwen.storage.factory import open_object_store
from tuwen.storage.images import ImageStore, ResultStore
from tuwen.storage.objects import ObjectStore

from tuwen.pipeline.settings import Settings

log = logging.getLogger("tuwen.storage")


def storage_place(settings: Settings) -> str:
    """Where this process keeps pictures, in words: the directory, or the bucket and its endpoint."""
    if settings.minio_endpoint:
        scheme = "https" if settings.minio_secure else "http"
        return f"bucket {settings.minio_bucket} at {scheme}://{settings.minio_endpoint}"
    return f"directory {settings.storage_dir} (TUWEN_STORAGE_DIR)"


def open_objects(settings: Settings) -> ObjectStore:
    store = open_object_store(
        endpoint=settings.minio_endpoint,
        access_key=settings.minio_access_key,
        secret_key=settings.minio_secret_key.get_secret_value(),
        bucket=settings.minio_bucket,
        secure=settings.minio_secure,
        region=settings.minio_region,
        directory=settings.storage_dir,
    )
    store.ensure_ready()
    log.info("pictures are stored in the %s", storage_place(settings))
    store.expire("images/", settings.image_ttl_days)
    return store


def open_images(settings: Settings) -> ImageStore:
    return ImageStore(open_objects(settings))


def open_results(settings: Settings) -> ResultStore:
    return ResultStore(open_objects(settings))
