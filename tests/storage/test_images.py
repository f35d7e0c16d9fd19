"""ImageStore (content-addressed) and ResultStore (named JSON), on every backend."""

from __future__ import annotations

import hashlib
import urllib.request
from collections.abc import Iterator

import pytest

from tuwen.storage.errors import InvalidKey, ObjectNotFound
from tuwen.storage.images import ImageStore, ResultStore
from tuwen.storage.objects import ObjectStore

pytestmark = pytest.mark.timeout(60)

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(200))


class CountingStore:
    """A real store that counts uploads, to tell "stored once" from "uploaded twice, same result"."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.puts: list[str] = []

    def ensure_ready(self) -> None:
        self.inner.ensure_ready()

    def ping(self) -> None:
        self.inner.ping()

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream",
            metadata: dict[str, str] | None = None) -> None:
        self.puts.append(key)
        self.inner.put(key, data, content_type, metadata)

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def presigned_get(self, key: str, expires_s: int) -> str:
        return self.inner.presigned_get(key, expires_s)

    def list(self, prefix: str = "") -> Iterator[str]:
        return self.inner.list(prefix)


def test_same_image_twice_is_stored_once(store: ObjectStore) -> None:
    # Given an image store
    counting = CountingStore(store)
    images = ImageStore(counting)
    # When the same picture is submitted twice, and another picture once
    first = images.put(PNG, "image/png")
    second = images.put(bytes(PNG), "image/png")
    other = images.put(PNG + b"!", "image/png")
    # Then both submissions share one content-addressed key, uploaded once
    assert first == second == "images/" + hashlib.sha256(PNG).hexdigest()
    assert other != first
    assert counting.puts == [first, other]
    assert list(store.list("images/")) == sorted([first, other])
    assert images.get(first) == PNG


def test_image_get_exists_delete_and_presigned_url(store: ObjectStore) -> None:
    images = ImageStore(store)
    key = images.put(PNG, "image/png")
    assert images.exists(key)

    with urllib.request.urlopen(images.presigned_url(key, 60), timeout=10) as response:
        assert response.read() == PNG

    images.delete(key)
    assert not images.exists(key)
    with pytest.raises(ObjectNotFound) as gone:
        images.get(key)
    assert gone.value.code == "image_not_found"


def test_image_keys_outside_the_prefix_are_refused(store: ObjectStore) -> None:
    # Given a result stored next to the images
    store.put("results/secret.json", b"{}")
    images = ImageStore(store)
    # When an image key points elsewhere, Then it is refused before any read
    for key in ("results/secret.json", "images/../results/secret.json", "imagesX", ""):
        with pytest.raises(InvalidKey):
            images.get(key)
    assert store.exists("results/secret.json")


def test_results_keep_chinese_readable(store: ObjectStore) -> None:
    results = ResultStore(store)
    answer = {"job_id": "j-1", "answer": "图片里有一只红色的猫。", "tokens": [1, 2, 3]}

    key = results.put_json("2026/j-1.json", answer)

    assert key == "results/2026/j-1.json"
    assert results.get_json("2026/j-1.json") == answer
    raw = store.get(key)
    assert "图片里有一只红色的猫。".encode() in raw and b"\\u" not in raw


def test_result_bytes_and_delete(store: ObjectStore) -> None:
    results = ResultStore(store)
    key = results.put_bytes("bulk/out.jsonl", "第一行\n第二行\n".encode(), "application/x-ndjson")
    assert store.get(key) == results.get_bytes("bulk/out.jsonl") == "第一行\n第二行\n".encode()

    results.delete("bulk/out.jsonl")

    with pytest.raises(ObjectNotFound):
        results.get_json("bulk/out.jsonl")
    with pytest.raises(InvalidKey):
        results.put_json("../images/forged", {})
