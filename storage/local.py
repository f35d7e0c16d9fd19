"""Objects as files under one directory: for development, tests and single-machine use."""

import os
import time
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tuwen.storage.errors import ObjectNotFound, StorageConfigError, StorageError
from tuwen.storage.objects import check_key

#: Suffix of the temporary files a write goes through; never listed as objects.
_PARTIAL_SUFFIX = ".partial"


class LocalObjectStore:
    """Objects as files under ``root``; a key's ``/`` separates directories.

    Writes go to a temporary file in the target directory and are renamed into place, so a reader sees
    the old object or the new one, never half of one. Content type and metadata are not kept.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()

    def __repr__(self) -> str:
        return f"LocalObjectStore({str(self.root)!r})"

    def ensure_ready(self) -> None:
        """Create the root directory (owner-only, mode 0700) if it is missing."""
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageConfigError(f"cannot create storage directory {self.root}: {exc}") from exc
        self.ping()

    def ping(self) -> None:
        if not self.root.is_dir():
            raise StorageConfigError(f"storage directory {self.root} does not exist; call ensure_ready()")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageConfigError(f"storage directory {self.root} is not writable")

    def put(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
    ) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_PARTIAL_SUFFIX)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise StorageError(f"cannot write {key!r} under {self.root}: {exc}") from exc

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFound(f"no object {key!r} in {self.root}") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {key!r} under {self.root}: {exc}") from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except (IsADirectoryError, NotADirectoryError, PermissionError) as exc:
            if path.is_dir():  # a "directory" of other keys is not an object: nothing to delete
                return
            raise StorageError(f"cannot delete {key!r} under {self.root}: {exc}") from exc
        except OSError as exc:
            raise StorageError(f"cannot delete {key!r} under {self.root}: {exc}") from exc

    def presigned_get(self, key: str, expires_s: int) -> str:
        """A ``file://`` URI of the object. It does not expire: ``expires_s`` only has to be positive."""
        if expires_s < 1:
            raise ValueError(f"expires_s must be at least 1, got {expires_s}")
        return self._path(key).as_uri()

    def list(self, prefix: str = "") -> Iterator[str]:
        keys = []
        for directory, _, files in os.walk(self.root):
            rel = Path(directory).relative_to(self.root).as_posix()
            base = "" if rel == "." else rel + "/"
            for name in files:
                if not (name.startswith(".") and name.endswith(_PARTIAL_SUFFIX)):
                    keys.append(base + name)
        return iter(sorted(k for k in keys if k.startswith(prefix)))

    def expire(self, prefix: str, days: int) -> None:
        """A directory has no lifecycle rules: delete what is older now (called at every start-up)."""
        cutoff = time.time() - days * 86400
        for key in list(self.list(prefix)):
            try:
                if self._path(key).stat().st_mtime < cutoff:
                    self.delete(key)
            except OSError:
                continue

    def _path(self, key: str) -> Path:
        """The file for ``key``; refuses keys that would resolve outside the root (also via symlinks)."""
        path = self.root.joinpath(*check_key(key).split("/"))
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise StorageConfigError(f"object key {key!r} resolves outside {self.root}")
        return path
