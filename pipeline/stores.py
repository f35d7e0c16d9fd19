"""Build the storage layer's stores from settings (storage itself knows nothing of settings)."""

from __future__ import annotations

from tuwen.storage.factory import open_object_store
from tuwen.storage.images import ImageStore, ResultStore
from tuwen.storage.objects import ObjectStore

from tuwen.pipeline.settings import Settings


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
    store.expire("images/", settings.image_ttl_days)
    return store


def open_images(settings: Settings) -> ImageStore:
    return ImageStore(open_objects(settings))


def open_results(settings: Settings) -> ResultStore:
    return ResultStore(open_objects(settings))
