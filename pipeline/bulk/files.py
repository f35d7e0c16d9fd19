"""The Batch API's files (``/v1/files``): the input files owners upload and the output files batches write.

A file's bytes are kept in the object store as numbered parts of at most ``PART_BYTES`` under
``files/<id>/``, on every backend alike, so an upload, a download or a validation never holds a file
whole in memory; its record is a Redis hash (``keys.FILE``: name, owner, purpose, size, parts), written
after the last part, so a half-uploaded file is never listed. Files live as long as job results
(``TUWEN_RESULT_TTL_S``); a lifecycle rule on the bucket deletes their parts a day after that.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from collections.abc import Iterable, Iterator
from functools import cached_property
from typing import BinaryIO

import redis
from pydantic import BaseModel, ConfigDict

from tuwen.pipeline import keys
from tuwen.pipeline.errors import InvalidInput, NotFound
from tuwen.pipeline.jobs import outage, redis_errors
from tuwen.pipeline.settings import Settings
from tuwen.pipeline.stores import open_objects
from tuwen.storage.errors import ObjectNotFound, StorageError
from tuwen.storage.images import ResultStore

#: A file's parts in the object store are about this large (an upload is read this much at a time).
PART_BYTES = 1024 * 1024
FILE_ID_PATTERN = r"^file-[A-Za-z0-9]{1,64}$"
#: What an owner uploads (``batch``: a Batch API input file; ``user_data``: a PDF for chat and responses,
#: ``pipeline.gateway.pdf_pages``) and what a batch writes (``batch_output``).
BATCH_PURPOSE = "batch"
USER_DATA_PURPOSE = "user_data"
UPLOAD_PURPOSES = (BATCH_PURPOSE, USER_DATA_PURPOSE)
OUTPUT_PURPOSE = "batch_output"
_OWNED = keys.FILE + "owner:"


class StoredFile(BaseModel):
    model_config = ConfigDict(frozen=True)
    id: str
    owner: str
    filename: str
    purpose: str
    bytes: int
    created_at: float
    expires_at: float
    parts: int


class FileTooLarge(InvalidInput):
    code = "file_too_large"


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def output_file_id(batch_id: str, kind: str) -> str:
    """The id of a batch's ``output`` or ``errors`` file: the same whoever writes it (two processes that
    finalize the same batch write the same file)."""
    return "file-" + hashlib.sha256(f"{batch_id}\0{kind}".encode()).hexdigest()[:24]


def no_such_file(file_id: str) -> NotFound:
    """The one refusal for a file that does not exist and for another owner's."""
    return NotFound(f"no file {file_id}", code="unknown_file")


def read_chunks(stream: BinaryIO, size: int = PART_BYTES) -> Iterator[bytes]:
    while chunk := stream.read(size):
        yield chunk


def split_lines(chunks: Iterable[bytes], max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """``(line number, line)`` for every line of the chunks' concatenation (without its ``\\n``); a line
    longer than ``max_line_bytes`` comes as ``None``, and is never held whole."""
    number, buf, too_long = 0, bytearray(), False
    for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            number += 1
            too_long = too_long or len(buf) + end - start > max_line_bytes
            yield number, None if too_long else bytes(buf + chunk[start:end])
            buf.clear()
            too_long, start = False, end + 1
        if not too_long:
            buf += chunk[start:]
            if len(buf) > max_line_bytes:
                too_long = True
                buf.clear()
    if buf or too_long:
        yield number + 1, None if too_long else bytes(buf)


class FileStore:
    """Files per owner: records in Redis, parts in the object store (opened on first use)."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.ttl_s = settings.result_ttl_s

    @cached_property
    def parts(self) -> ResultStore:
        try:
            objects = open_objects(self.settings)
            objects.expire("files/", math.ceil(self.ttl_s / 86400) + 1)
        except StorageError as exc:
            raise outage("file storage is not reachable", exc, code=exc.code) from exc
        return ResultStore(objects, prefix="files/")

    # -- writing -----------------------------------------------------------------------------------------
    def upload(self, owner: str, filename: str, purpose: str, stream: BinaryIO, max_bytes: int) -> StoredFile:
        """Store what ``stream`` holds as a new file of ``owner``; ``file_too_large`` past ``max_bytes``
        (nothing of it is kept then)."""
        return self.write(new_file_id(), owner, filename, purpose, read_chunks(stream), max_bytes=max_bytes)

    def write(self, file_id: str, owner: str, filename: str, purpose: str, chunks: Iterable[bytes], *,
              max_bytes: int | None = None) -> StoredFile:
        """Store the chunks as the file ``file_id`` (replacing it), part by part; then its record."""
        size, parts = self._store_parts(file_id, chunks, max_bytes)
        now = time.time()
        stored = StoredFile(id=file_id, owner=owner, filename=filename, purpose=purpose, bytes=size,
                            created_at=now, expires_at=now + self.ttl_s, parts=parts)
        with redis_errors():
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(keys.FILE + file_id, mapping=stored.model_dump(mode="json"))
            pipe.expire(keys.FILE + file_id, self.ttl_s)
            pipe.zadd(_OWNED + owner, {file_id: now})
            pipe.expire(_OWNED + owner, self.ttl_s)
            pipe.execute()
        return stored

    def _store_parts(self, file_id: str, chunks: Iterable[bytes], max_bytes: int | None) -> tuple[int, int]:
        """Store the chunks as parts of about ``PART_BYTES`` (a chunk of that size is stored as it is, with
        no copy); returns the size and the number of parts."""
        pending: list[bytes] = []
        held = size = parts = 0
        try:
            for chunk in chunks:
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise FileTooLarge(f"the file is more than {max_bytes} bytes; the limit is {max_bytes} "
                                       "(TUWEN_MAX_BATCH_FILE_BYTES)")
                pending.append(chunk)
                held += len(chunk)
                if held >= PART_BYTES:
                    self._put(file_id, parts, b"".join(pending))
                    pending, held, parts = [], 0, parts + 1
            if pending or parts == 0:
                self._put(file_id, parts, b"".join(pending))
                parts += 1
        except BaseException:
            self._drop_parts(file_id, parts)
            raise
        return size, parts

    def _put(self, file_id: str, n: int, data: bytes) -> None:
        try:
            self.parts.put_bytes(f"{file_id}/{n:06d}", data, "application/octet-stream")
        except StorageError as exc:
            raise outage("could not store the file", exc, code=exc.code) from exc

    def _drop_parts(self, file_id: str, parts: int) -> None:
        for n in range(parts):
            try:
                self.parts.delete(f"{file_id}/{n:06d}")
            except StorageError:
                pass  # the lifecycle rule deletes it later

    # -- reading -----------------------------------------------------------------------------------------
    def find(self, file_id: str) -> StoredFile | None:
        with redis_errors():
            f: dict[str, str] = self.redis.hgetall(keys.FILE + file_id)
        return StoredFile.model_validate(f) if f.get("id") else None

    def get(self, file_id: str, owner: str) -> StoredFile:
        """The owner's file; ``unknown_file`` for a missing file and for another owner's alike."""
        found = self.find(file_id)
        if found is None or found.owner != owner:
            raise no_such_file(file_id)
        return found

    def page(self, owner: str, *, purpose: str | None = None, limit: int = 100, after: str | None = None,
             ascending: bool = False) -> tuple[list[StoredFile], bool]:
        """The owner's files by creation (newest first unless ``ascending``) after the file ``after``,
        ``purpose`` only if given; and whether there are more."""
        index = _OWNED + owner
        with redis_errors():
            start = 0
            if after is not None:
                rank = self.redis.zrank(index, after) if ascending else self.redis.zrevrank(index, after)
                if rank is None:
                    return [], False
                start = rank + 1
        found: list[StoredFile] = []
        while len(found) <= limit:
            with redis_errors():
                read = self.redis.zrange if ascending else self.redis.zrevrange
                ids: list[str] = read(index, start, start + 499)
            if not ids:
                break
            start += len(ids)
            for file_id in ids:
                file = self.find(file_id)
                if file is None:
                    with redis_errors():
                        self.redis.zrem(index, file_id)
                elif purpose is None or file.purpose == purpose:
                    found.append(file)
        return found[:limit], len(found) > limit

    def chunks(self, file: StoredFile) -> Iterator[bytes]:
        """The file's bytes, one part at a time."""
        for n in range(file.parts):
            try:
                yield self.parts.get_bytes(f"{file.id}/{n:06d}")
            except ObjectNotFound as exc:
                raise no_such_file(file.id) from exc
            except StorageError as exc:
                raise outage("could not read the file", exc, code=exc.code) from exc

    def lines(self, file: StoredFile, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
        """The file's lines, numbered from 1, streamed part by part (``split_lines``)."""
        return split_lines(self.chunks(file), max_line_bytes)

    # -- readers and deleting ----------------------------------------------------------------------------
    def hold(self, file_id: str, reader: str) -> None:
        """Note that ``reader`` (a batch) still reads the file."""
        with redis_errors():
            pipe = self.redis.pipeline(transaction=True)
            pipe.sadd(keys.FILE + file_id + ":readers", reader)
            pipe.expire(keys.FILE + file_id + ":readers", self.ttl_s)
            pipe.execute()

    def release(self, file_id: str, reader: str) -> None:
        with redis_errors():
            self.redis.srem(keys.FILE + file_id + ":readers", reader)

    def readers(self, file_id: str) -> list[str]:
        with redis_errors():
            return sorted(self.redis.smembers(keys.FILE + file_id + ":readers"))

    def delete(self, file: StoredFile) -> None:
        """Delete the file: its record first (it is gone for readers at once), then its parts."""
        with redis_errors():
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(keys.FILE + file.id, keys.FILE + file.id + ":readers")
            pipe.zrem(_OWNED + file.owner, file.id)
            pipe.execute()
        self._drop_parts(file.id, file.parts)
