"""What tuwen keeps in its object store: content-addressed images and named results."""

import hashlib
import json
from typing import Any

from tuwen.storage.errors import InvalidKey
from tuwen.storage.objects import ObjectStore, check_key


class ImageStore:
    """Images under ``<prefix><sha256 of the bytes>``: the same picture submitted twice is stored once."""

    def __init__(self, objects: ObjectStore, prefix: str = "images/") -> None:
        self.objects = objects
        self.prefix = prefix

    def key_for(self, data: bytes) -> str:
        """The key ``data`` is (or would be) stored under."""
        return self.prefix + hashlib.sha256(data).hexdigest()

    def put(self, data: bytes, content_type: str) -> str:
        """Store the image unless an identical one is already stored; return its key."""
        key = self.key_for(data)
        if not self.objects.exists(key):
            self.objects.put(key, data, content_type=content_type)
        return key

    def get(self, key: str) -> bytes:
        """The image's bytes; ``ObjectNotFound`` (code ``image_not_found``) if it is gone."""
        return self.objects.get(self._own(key))

    def exists(self, key: str) -> bool:
        return self.objects.exists(self._own(key))

    def delete(self, key: str) -> None:
        self.objects.delete(self._own(key))

    def presigned_url(self, key: str, expires_s: int) -> str:
        """A URL to GET the image without credentials for ``expires_s`` seconds (see the backend)."""
        return self.objects.presigned_get(self._own(key), expires_s)

    def _own(self, key: str) -> str:
        """Refuse keys outside this store's prefix: a job's image key must not read other objects."""
        if not check_key(key).startswith(self.prefix):
            raise InvalidKey(f"image key must start with {self.prefix!r}: {key!r}")
        return key


class ResultStore:
    """Named results under ``<prefix><name>``; JSON is UTF-8 with Chinese kept readable."""

    def __init__(self, objects: ObjectStore, prefix: str = "results/") -> None:
        self.objects = objects
        self.prefix = prefix

    def key_for(self, name: str) -> str:
        return check_key(self.prefix + name)

    def put_json(self, name: str, obj: Any) -> str:
        """Store ``obj`` as JSON under ``name``; return the object key."""
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        return self.put_bytes(name, data, "application/json; charset=utf-8")

    def get_json(self, name: str) -> Any:
        return json.loads(self.get_bytes(name).decode("utf-8"))

    def put_bytes(self, name: str, data: bytes, content_type: str) -> str:
        key = self.key_for(name)
        self.objects.put(key, data, content_type=content_type)
        return key

    def get_bytes(self, name: str) -> bytes:
        return self.objects.get(self.key_for(name))

    def delete(self, name: str) -> None:
        self.objects.delete(self.key_for(name))
