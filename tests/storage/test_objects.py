"""The ObjectStore contract, run against every backend (local directory, moto, real MinIO if configured)."""

from __future__ import annotations

import json
import stat
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tuwen.storage.errors import (
    InvalidKey,
    ObjectNotFound,
    StorageAuthError,
    StorageConfigError,
    StorageError,
    StorageUnavailable,
)
from tuwen.storage.factory import open_object_store
from tuwen.storage.local import LocalObjectStore
from tuwen.storage.objects import ObjectStore
from tuwen.storage.s3 import S3ObjectStore
from tests.storage.conftest import Backend

pytestmark = pytest.mark.timeout(60)

BAD_KEYS = ["", "../escape", "a/../../escape", "/etc/passwd", "a//b", "a/", "./a", "a\\b", "a\x00b", "x" * 1025]


def test_ensure_ready_creates_the_missing_bucket_once(backend: Backend) -> None:
    # Given a store whose bucket (directory) does not exist
    with pytest.raises(StorageConfigError):
        backend.store.ping()
    # When it is made ready, used, and made ready again
    backend.store.ensure_ready()
    backend.store.put("k", b"kept")
    backend.store.ensure_ready()
    # Then the bucket exists and nothing was lost
    backend.store.ping()
    assert backend.store.get("k") == b"kept"


def test_s3_bucket_is_private(s3_only: Backend) -> None:
    # Given a ready bucket holding an object
    assert s3_only.endpoint is not None
    s3_only.store.ensure_ready()
    s3_only.store.put("images/secret", b"private bytes", content_type="image/png")
    # When anyone fetches it without signing the request
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(s3_only.endpoint.object_url(s3_only.bucket, "images/secret"), timeout=10).close()
    # Then the server refuses (moto lists a bucket anonymously, so only the object is checked)
    assert refused.value.code == 403
    refused.value.close()


def test_local_root_is_created_private(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "a" / "objects")
    with pytest.raises(StorageConfigError):
        store.ping()

    store.ensure_ready()

    assert stat.S_IMODE((tmp_path / "a" / "objects").stat().st_mode) & 0o077 == 0


def test_put_get_exists_delete_round_trip(store: ObjectStore) -> None:
    answer = json.dumps({"问题": "图中有几只猫？", "回答": "两只猫。"}, ensure_ascii=False).encode("utf-8")
    key = "results/中文/答案.json"
    assert not store.exists(key)

    store.put(key, answer, content_type="application/json; charset=utf-8", metadata={"job": "j-1"})

    assert store.exists(key)
    assert json.loads(store.get(key).decode("utf-8")) == {"问题": "图中有几只猫？", "回答": "两只猫。"}
    store.put(key, b"replaced")
    assert store.get(key) == b"replaced"
    store.delete(key)
    assert not store.exists(key)
    store.delete(key)  # deleting a missing key is fine


def test_empty_object_round_trips(store: ObjectStore) -> None:
    store.put("empty", b"")
    assert store.exists("empty")
    assert store.get("empty") == b""


def test_list_returns_sorted_keys_under_a_prefix(store: ObjectStore) -> None:
    for key in ("b/1", "a/2", "a/sub/3", "a/1", "ab"):
        store.put(key, key.encode())

    assert list(store.list("a/")) == ["a/1", "a/2", "a/sub/3"]
    assert list(store.list("a")) == ["a/1", "a/2", "a/sub/3", "ab"]
    assert list(store.list()) == ["a/1", "a/2", "a/sub/3", "ab", "b/1"]
    assert list(store.list("nothing/")) == []


def test_missing_key_raises_object_not_found(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound) as missing:
        store.get("images/" + "0" * 64)
    assert missing.value.code == "image_not_found"
    assert missing.value.retryable is False


def test_presigned_get_serves_the_bytes(store: ObjectStore) -> None:
    data = bytes(range(256)) * 4
    store.put("images/presigned", data, content_type="image/png")

    url = store.presigned_get("images/presigned", expires_s=60)

    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == data
        if not url.startswith("file:"):
            assert response.headers["Content-Type"] == "image/png"


@pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
def test_keys_that_could_escape_are_refused(backend: Backend, key: str, tmp_path: Path) -> None:
    store = backend.store
    store.ensure_ready()
    for call in (lambda: store.put(key, b"x"), lambda: store.get(key), lambda: store.exists(key),
                 lambda: store.delete(key), lambda: store.presigned_get(key, 60)):
        with pytest.raises(InvalidKey) as refused:
            call()
        assert isinstance(refused.value, ValueError)
        assert refused.value.code == "invalid_key"
    assert list(store.list()) == []
    assert not (tmp_path / "escape").exists()


def test_local_refuses_a_symlink_out_of_the_root(tmp_path: Path) -> None:
    # Given a local store whose root holds a symlink to a directory outside it
    outside = tmp_path / "outside"
    outside.mkdir()
    store = LocalObjectStore(tmp_path / "root")
    store.ensure_ready()
    (tmp_path / "root" / "link").symlink_to(outside)
    # When a key goes through the link, Then it is refused and nothing is written outside
    with pytest.raises(StorageConfigError):
        store.put("link/x", b"x")
    assert list(outside.iterdir()) == []


def test_local_writes_leave_no_partial_files(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "root")
    store.ensure_ready()
    for i in range(5):
        store.put(f"images/{i}", b"x" * 1000)
        store.put(f"images/{i}", b"y" * 10)

    files = sorted(p.relative_to(tmp_path / "root").as_posix() for p in (tmp_path / "root").rglob("*") if p.is_file())

    assert files == [f"images/{i}" for i in range(5)] == list(store.list())
    assert store.get("images/3") == b"y" * 10


def test_one_store_is_shared_by_threads(store: ObjectStore) -> None:
    blobs = {f"images/t{i:02d}": bytes([i]) * (1000 + i) for i in range(24)}

    def round_trip(key: str) -> bool:
        store.put(key, blobs[key])
        return store.get(key) == blobs[key] and store.exists(key)

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(pool.map(round_trip, blobs))
    assert list(store.list("images/")) == sorted(blobs)


def open_at(endpoint: str | None, directory: Path, bucket: str = "tuwen") -> ObjectStore:
    return open_object_store(endpoint=endpoint, access_key="a", secret_key="b", bucket=bucket, secure=False,
                             region=None, directory=directory)


def test_factory_picks_s3_when_an_endpoint_is_set(tmp_path: Path) -> None:
    assert isinstance(open_at("127.0.0.1:9", tmp_path), S3ObjectStore)
    for unset in (None, ""):
        local = open_at(unset, tmp_path)
        assert isinstance(local, LocalObjectStore) and local.root == tmp_path
    with pytest.raises(StorageConfigError, match="without a scheme"):
        open_at("http://127.0.0.1:9000", tmp_path)
    with pytest.raises(StorageConfigError, match="bucket"):
        open_at("127.0.0.1:9000", tmp_path, bucket="Not_A_Bucket")


def test_error_codes_are_stable() -> None:
    table = {cls: (cls.code, cls.retryable) for cls in
             (StorageError, ObjectNotFound, StorageUnavailable, StorageAuthError, StorageConfigError, InvalidKey)}
    assert table == {
        StorageError: ("storage_error", False),
        ObjectNotFound: ("image_not_found", False),
        StorageUnavailable: ("storage_unavailable", True),
        StorageAuthError: ("storage_auth_failed", False),
        StorageConfigError: ("storage_misconfigured", False),
        InvalidKey: ("invalid_key", False),
    }
    assert all(issubclass(cls, StorageError) for cls in table)


def test_presign_refuses_expiry_out_of_range(store: ObjectStore) -> None:
    store.put("k", b"x")
    for bad in (0, -5):
        with pytest.raises(ValueError):
            store.presigned_get("k", bad)
    assert store.presigned_get("k", 7 * 24 * 3600)
