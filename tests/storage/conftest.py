"""Storage fixtures: every backend behind one parametrised fixture, a fresh bucket per test.

``backend`` runs a test against the local directory, moto and (when ``TUWEN_TEST_MINIO_*`` is set) a
real MinIO. Skipping the MinIO case when it is not configured is the only skip in these tests.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from minio import Minio
from minio.error import S3Error

from tuwen.storage.local import LocalObjectStore
from tuwen.storage.objects import ObjectStore
from tuwen.storage.s3 import S3ObjectStore
from tests.s3servers import S3Endpoint, moto_server, real_minio_from_env, s3rver_server

MINIO_NOT_SET = ("no real MinIO configured: set TUWEN_TEST_MINIO_ENDPOINT (host:port), TUWEN_TEST_MINIO_ACCESS_KEY, "
                 "TUWEN_TEST_MINIO_SECRET_KEY and optionally TUWEN_TEST_MINIO_SECURE=1")

integration = pytest.mark.integration
#: A real MinIO joins only when an endpoint is configured: the parameter is not generated otherwise,
#: so a run without one has nothing skipped (CI must never skip).
WITH_MINIO = real_minio_from_env() is not None
ALL_BACKENDS = [
    pytest.param("local"),
    pytest.param("moto", marks=integration),
    *([pytest.param("minio", marks=integration)] if WITH_MINIO else []),
]
S3_BACKENDS = ALL_BACKENDS[1:]


@dataclass(frozen=True)
class Backend:
    """A store whose bucket (or directory) does not exist yet, and where it points."""

    name: str
    store: ObjectStore
    endpoint: S3Endpoint | None = None  #: S3 backends only
    bucket: str = ""  #: S3 backends only
    root: Path | None = None  #: local backend only


@pytest.fixture(scope="session")
def minio() -> S3Endpoint:
    endpoint = real_minio_from_env()
    if endpoint is None:
        pytest.skip(MINIO_NOT_SET)
    return endpoint


@pytest.fixture(scope="session")
def s3rver() -> Iterator[S3Endpoint]:
    with s3rver_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def moto_signed() -> Iterator[S3Endpoint]:
    """A second moto that verifies signatures (its presigned URLs do not work)."""
    with moto_server(check_signatures=True) as endpoint:
        yield endpoint


def new_bucket_name() -> str:
    return f"tuwen-test-{uuid.uuid4().hex[:16]}"


@contextmanager
def s3_backend(name: str, endpoint: S3Endpoint) -> Iterator[Backend]:
    """A store on a bucket that does not exist yet; the bucket and its objects are removed afterwards."""
    bucket = new_bucket_name()
    store = S3ObjectStore(endpoint.endpoint, endpoint.access_key, endpoint.secret_key, bucket, secure=endpoint.secure)
    try:
        yield Backend(name, store, endpoint=endpoint, bucket=bucket)
    finally:
        remove_bucket(endpoint, bucket)


def remove_bucket(endpoint: S3Endpoint, bucket: str) -> None:
    client = Minio(endpoint.endpoint, endpoint.access_key, endpoint.secret_key, secure=endpoint.secure)
    try:
        for obj in client.list_objects(bucket, recursive=True):
            client.remove_object(bucket, obj.object_name or "")
        client.remove_bucket(bucket)
    except S3Error as exc:
        if exc.code != "NoSuchBucket":
            raise


def _backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    name: str = request.param
    if name == "local":
        root = tmp_path / "objects"
        yield Backend(name, LocalObjectStore(root), root=root)
        return
    endpoint: S3Endpoint = request.getfixturevalue({"moto": "s3", "minio": "minio"}[name])
    with s3_backend(name, endpoint) as backend:
        yield backend


@pytest.fixture(params=ALL_BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from _backend(request, tmp_path)


@pytest.fixture(params=S3_BACKENDS)
def s3_only(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    yield from _backend(request, tmp_path)


@pytest.fixture
def store(backend: Backend) -> ObjectStore:
    """A ready store (bucket or directory created) on each backend."""
    backend.store.ensure_ready()
    return backend.store
