"""The producer's client: submit / get / wait / cancel. No torch; a web backend imports only this.

    from tuwen.pipeline.client import Client
    client = Client.from_env()
    job = client.submit("q.jpg", "图中有几个圆形？")     # bytes, a path or a binary file
    result = client.wait(job.id, timeout=60)        # client.get(job.id) does not block
    print(result.status, result.answer)
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import IO, Any, Union

from pydantic import ValidationError

import redis

from tuwen.pipeline import app as queue
from tuwen.pipeline import registry
from tuwen.pipeline.errors import InvalidImage, InvalidInput, InvalidParams, Unavailable
from tuwen.pipeline.inputs import check_question, decode_image, picture_too_large
from tuwen.pipeline.pdf import InvalidPdf, check_pdf, page_numbers, page_side, render_pdf
from tuwen.pipeline.jobs import JobStore, cache_prefix, connect, outage
from tuwen.pipeline.audio import audio_too_large, decode_audio
from tuwen.pipeline.schema import AudioPart, GenerationParams, JobRequest, JobResult, JobStatus, Message, Priority, Role
from tuwen.pipeline.structured import schema_error
from tuwen.pipeline.settings import Settings
from tuwen.pipeline.stores import open_images
from tuwen.pipeline.streams import Delta, read
from tuwen.storage.errors import InvalidKey, StorageError

#: A picture as callers hold it: its bytes, a file path, or a file opened in binary mode.
ImageInput = Union[bytes, bytearray, memoryview, str, os.PathLike[str], IO[bytes]]


@dataclass(frozen=True)
class StoredImage:
    """A picture already in the image store, named by its key (``images/<sha256>``)."""

    key: str


@dataclass(frozen=True)
class OwnedImage(StoredImage):
    """A stored picture already found to be the owner's (``Client.owned_images``, many at once): a job names
    it with no further check."""


@dataclass(frozen=True)
class CheckedImage:
    """A picture that passed validation, not stored yet."""

    data: bytes
    content_type: str


@dataclass(frozen=True)
class CheckedAudio(CheckedImage):
    """A spoken question that passed validation, not stored yet (stored beside the pictures)."""


class Client:
    """Talks to Redis (job state), the broker (jobs) and storage (images). Thread-safe."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @classmethod
    def from_env(cls, **overrides: Any) -> Client:
        return cls(Settings(**overrides))

    @cached_property
    def jobs(self) -> JobStore:
        return JobStore(connect(self.settings.redis_url), self.settings.result_ttl_s, self.settings.replicas_ack,
                        self.settings.redis_replicas_ack_timeout_ms)

    @cached_property
    def images(self) -> Any:
        try:
            return open_images(self.settings)
        except StorageError as exc:
            raise outage("image storage is not reachable", exc, code=exc.code,
                              retryable=exc.retryable) from exc

    @cached_property
    def celery(self) -> Any:
        return queue.make_celery(self.settings)

    def submit(
        self,
        image: ImageInput | StoredImage,
        question: str | None = None,
        *,
        audio: ImageInput | None = None,
        max_new_tokens: int | None = None,
        params: GenerationParams | Mapping[str, Any] | None = None,
        priority: Priority | str = Priority.interactive,
        owner: str = "default",
        bulk_id: str | None = None,
        job_id: str | None = None,
        stream: bool = False,
    ) -> JobResult:
        """Validate, store the image, record and enqueue the job; returns it as ``queued``.

        ``audio`` is a spoken question (WAV, FLAC, Ogg, MP3: bytes, a path or a binary file), asked instead of
        ``question`` or after it: the job is transcribed on the speech queue first, then answered, under one id.
        Bad input raises an ``InvalidInput`` subclass (with a ``code``) before anything is stored
        or queued. An unreachable Redis, broker or storage raises ``Unavailable`` (retryable).
        """
        request = self.prepare(image, question, audio=audio, max_new_tokens=max_new_tokens, params=params,
                               priority=priority, owner=owner, bulk_id=bulk_id, job_id=job_id, stream=stream)
        self.enqueue(request)
        return JobResult(id=request.id, status=JobStatus.queued, owner=owner, created_at=request.created_at,
                         image_key=request.image_key)

    def page_side(self, priority: Priority | str) -> int:
        """The long side a PDF page is rendered at for jobs of ``priority`` (``pdf.page_side``: the setting, else
        what the live workers of its queue announce, else the default; Redis away: the default)."""
        try:
            workers = registry.live_workers(self.jobs.redis)
        except redis.RedisError:
            workers = []
        return page_side(self.settings, registry.picture_side(workers, queue.queue_for(self.settings, priority)))

    def submit_pdf(self, pdf: ImageInput, question: str, *, pages: str | None = None,
                   **options: Any) -> list[JobResult]:
        """``submit`` for each page of ``pdf`` (``pages``: ``"3-5,9"``, all if None), its picture the page rendered
        (``pipeline.pdf``); returns the jobs in page order. Every page is rendered and checked before any is
        stored, so a PDF refused with a code (``corrupt_pdf`` …) stores and queues nothing."""
        try:
            data = read_image(pdf, self.settings.max_pdf_bytes)
        except InvalidImage as exc:
            raise InvalidPdf(exc.message.replace("picture", "PDF"), code="pdf_too_large"
                             if exc.code == "image_too_large" else exc.code) from exc
        side = self.page_side(options.get("priority", Priority.interactive))
        chosen = page_numbers(pages, check_pdf(data, self.settings, side))
        pictures = [self.check_image(page.png).data for page in render_pdf(data, self.settings, chosen, side)]
        requests = [self.prepare(picture, question, **options) for picture in pictures]
        for request in requests:
            self.enqueue(request)
        return [JobResult(id=r.id, status=JobStatus.queued, owner=r.owner, created_at=r.created_at,
                          image_key=r.image_key) for r in requests]

    def prepare(self, image: ImageInput | StoredImage, question: str | None, *, audio: ImageInput | None = None,
                max_new_tokens: int | None = None,
                params: GenerationParams | Mapping[str, Any] | None = None,
                priority: Priority | str = Priority.interactive, owner: str = "default",
                bulk_id: str | None = None, job_id: str | None = None, stream: bool = False) -> JobRequest:
        """Validate the job and store its picture; returns the request, not yet queued.

        ``image`` is the picture (bytes, a path, a binary file) or a ``StoredImage``: the key of a picture
        ``owner`` stored before (else ``image_not_found``). ``params`` are the generation parameters;
        ``max_new_tokens``, if given, overrides theirs. Nothing is stored unless everything else is valid.
        """
        text = None if audio is not None and question is None else check_question(
            question, max_chars=self.settings.max_conversation_chars)
        spoken = self.check_audio(audio) if audio is not None else None
        raw: Any = params.model_dump(exclude_unset=True) if isinstance(params, GenerationParams) else params
        if max_new_tokens is not None:
            raw = {**(raw or {}), "max_new_tokens": max_new_tokens}
        generation = self.check_params(raw)
        try:
            priority = Priority(priority)
        except ValueError as exc:
            raise InvalidParams(f"invalid priority: {exc}", code="invalid_params") from exc
        check_budget(generation, self.settings)
        content: list[dict[str, Any]] = [{"type": "image", "key": self.image_key(image, owner)}]
        content += [{"type": "text", "text": text}] if text is not None else []
        content += [{"type": "audio", "key": self.put_audio(spoken, owner)}] if spoken is not None else []
        fields: dict[str, Any] = {"messages": [{"role": "user", "content": content}], "params": generation,
                                  "priority": priority, "owner": owner, "bulk_id": bulk_id, "stream": stream}
        if job_id:
            fields["id"] = job_id
        return JobRequest(**fields)

    def transcription(self, audio: ImageInput, *, owner: str = "default", job_id: str | None = None) -> JobRequest:
        """A job of the speech stage alone, whose answer is the transcript; validated and its audio stored,
        not yet queued (``POST /v1/audio/transcriptions``)."""
        key = self.put_audio(self.check_audio(audio), owner)
        return JobRequest(messages=[Message(role=Role.user, content=(AudioPart(key=key),))], owner=owner,
                          transcribe_only=True, **({"id": job_id} if job_id else {}))

    def check_audio(self, audio: ImageInput) -> CheckedAudio:
        """Read (bounded) and decode a spoken question without storing it (``InvalidAudio`` with a code)."""
        s = self.settings
        data = read_image(audio, s.max_audio_bytes, too_large=audio_too_large)
        sound = decode_audio(data, max_bytes=s.max_audio_bytes, max_seconds=s.max_audio_seconds)
        return CheckedAudio(data, sound.content_type)

    def put_audio(self, audio: CheckedImage, owner: str = "default") -> str:
        """Store a checked spoken question for ``owner``, beside the pictures (same life, same owners); its key."""
        return self.put_image(audio, owner)

    @staticmethod
    def check_params(raw: Any) -> GenerationParams:
        """Generation parameters, validated: ``invalid_params``, or ``invalid_schema`` for a response_format
        whose schema cannot be enforced."""
        try:
            return GenerationParams.model_validate(raw or {})
        except (ValidationError, ValueError, TypeError) as exc:
            code = "invalid_schema" if isinstance(exc, ValidationError) and schema_error(exc.errors()) else None
            raise InvalidParams(f"invalid generation parameters: {first_error(exc)}",
                                code=code or "invalid_params") from exc

    def image_key(self, image: ImageInput | StoredImage, owner: str = "default") -> str:
        """The key a job names ``image`` by: a ``StoredImage``'s, if ``owner`` may name it (else
        ``image_not_found``, worded alike for a missing key and another owner's); or that of the picture,
        validated and stored for ``owner``."""
        if isinstance(image, OwnedImage):
            return image.key
        if isinstance(image, StoredImage):
            if not self.owns_image(image.key, owner):
                raise InvalidInput(f"no such picture: {image.key}", code="image_not_found")
            return image.key
        return self.store_image(image, owner)

    def store_image(self, image: ImageInput, owner: str = "default") -> str:
        """Validate a picture and store it for ``owner``; returns its key (``images/<sha256>``).

        Keys are content hashes, so the key alone must not grant the picture: only an owner who
        stored these bytes may name the key in a later job (see ``owns_image``).
        """
        return self.put_image(self.check_image(image), owner)

    def check_image(self, image: ImageInput) -> CheckedImage:
        """Read (bounded) and validate a picture without storing it (``InvalidInput`` with a code)."""
        s = self.settings
        data = read_image(image, s.max_image_bytes)
        picture = decode_image(data, max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels,
                               max_aspect_ratio=s.max_aspect_ratio)
        return CheckedImage(data, _content_type(picture.format or ""))

    def put_image(self, picture: CheckedImage, owner: str = "default") -> str:
        """Store a checked picture for ``owner``; returns its key."""
        try:
            key: str = self.images.put(picture.data, picture.content_type)
        except StorageError as exc:
            raise outage("could not store the image", exc, code=exc.code, retryable=exc.retryable) from exc
        # A day past the picture's life: the bucket's lifecycle rule rounds expiry up to a midnight.
        self.jobs.add_image_owner(key, owner, (self.settings.image_ttl_days + 1) * 86400)
        return key

    def owns_image(self, key: str, owner: str) -> bool:
        """Whether ``owner`` may name the stored picture ``key`` in a job: it stored those bytes and
        they are still there. A key that does not exist and another owner's key both give False, so
        every caller refuses the two alike (no existence oracle)."""
        images = self.images
        if not isinstance(key, str) or not key.startswith(images.prefix):
            return False
        return self.jobs.is_image_owner(key, owner) and self._stored(key)

    def owned_images(self, keys: Iterable[object], owner: str) -> set[str]:
        """The keys among ``keys`` that ``owner`` may name (``owns_image``), checked together: one round trip
        to Redis, and one look in storage per distinct key."""
        prefix = self.images.prefix
        candidates = [k for k in dict.fromkeys(keys) if isinstance(k, str) and k.startswith(prefix)]
        owned = [k for k, yes in zip(candidates, self.jobs.image_owners(candidates, owner)) if yes]
        return {k for k in owned if self._stored(k)}

    def _stored(self, key: str) -> bool:
        try:
            return bool(self.images.exists(key))
        except InvalidKey:
            return False
        except StorageError as exc:
            raise outage("image storage failed", exc, code=exc.code, retryable=exc.retryable) from exc

    def enqueue(self, request: JobRequest) -> None:
        """Record the job, then publish it; if publishing fails the record is removed again. A job whose id is
        recorded already (queued again under a reserved id, ``Idempotency``) keeps its record."""
        created = self.jobs.create(request)
        try:
            self._send(request)
        except Unavailable:
            if created:
                self.jobs.delete(request.id)
            raise
        self.jobs.queued(request.id, wake=self._wakes(request))

    def publish(self, request: JobRequest, *, countdown: float | None = None) -> None:
        """Publish a job whose record exists (a resumed bulk line, a job given back to the queue). The job
        store runs a job once whatever the number of its messages, so publishing again is harmless."""
        self._send(request, countdown)
        if (wake := self._wakes(request)) is not None:
            self.jobs.wake(wake)

    def _send(self, request: JobRequest, countdown: float | None = None) -> None:
        try:
            queue.enqueue(self.celery, self.settings, request, countdown=countdown)
        except Exception as exc:  # noqa: BLE001 - kombu raises many connection error types
            raise outage("the job queue is not reachable", exc) from exc

    def publish_many(self, requests: Sequence[JobRequest]) -> None:
        """Publish jobs whose records exist, together (one round trip on a Redis broker): a bulk's batch of
        lines; then mark them queued and wake idle workers, in one more (``JobStore.queued_many``). As with
        ``publish``, a job published twice still runs once."""
        if not requests:
            return
        try:
            queue.publish_batch(self.celery, self.settings, requests)
        except Exception as exc:  # noqa: BLE001 - kombu raises many connection error types
            raise outage("the job queue is not reachable", exc) from exc
        by_queue: dict[str | None, list[str]] = {}
        for request in requests:
            by_queue.setdefault(self._wakes(request), []).append(request.id)
        for wake, ids in by_queue.items():
            self.jobs.queued_many(ids, wake=wake)

    def _wakes(self, request: JobRequest) -> str | None:
        """The queue whose idle workers a new message of ``request`` should wake (tuwen's Redis transport)."""
        return queue.route(self.settings, request) if queue.reads_wake_lists(self.settings.broker) \
            else None

    def get(self, job_id: str, owner: str | None = None) -> JobResult:
        """The job's state now (``unknown`` if there is no such job). Never blocks."""
        return self.jobs.get(job_id, owner)

    def wait(self, job_id: str, timeout: float = 60.0, owner: str | None = None) -> JobResult:
        """Block until the job ends or ``timeout`` passes; returns the state either way."""
        return self.jobs.wait(job_id, timeout, owner)

    def stream(self, job_id: str, timeout: float = 120.0, owner: str | None = None) -> Iterator[Delta]:
        """The answer of a job submitted with ``stream=True`` as it is generated: ``Delta``s of text,
        then one with the finish reason and the result (``tuwen.pipeline.streams``). A job that did not
        stream (or an answer from the cache) arrives as one piece."""
        return read(self.jobs, job_id, timeout, owner)

    def wait_many(self, job_ids: list[str], timeout: float = 60.0) -> dict[str, JobResult]:
        return self.jobs.wait_many(job_ids, timeout)

    def cancel(self, job_id: str, owner: str | None = None) -> JobResult:
        return self.jobs.cancel(job_id, owner)

    def delete(self, job_id: str, owner: str | None = None) -> bool:
        """Delete a job's record and result now, and its images that no other job uses. The owner's
        cached answers about an image go with its last job on that image (everyone's with the image).
        Returns False if there was no such job."""
        if self.jobs.get(job_id, owner).status == JobStatus.unknown:
            return False
        job_owner, images = self.jobs.delete(job_id, owner)
        for image_key, fate in images.items():
            if fate == "gone":
                try:
                    self.images.delete(image_key)
                except StorageError as exc:
                    raise outage("could not delete the image", exc, code=exc.code, retryable=True) from exc
            if fate != "kept":
                prefix = cache_prefix(image_key, None if fate == "gone" else job_owner)
                for key in self.jobs.redis.scan_iter(prefix + "*", count=500):
                    self.jobs.redis.delete(key)
        return True

    def close(self) -> None:
        if "celery" in self.__dict__:
            self.celery.close()
        if "jobs" in self.__dict__:
            self.jobs.redis.close()


def read_image(image: ImageInput, max_bytes: int, *, follow_symlinks: bool = True,
               too_large: Callable[..., InvalidInput] = picture_too_large) -> bytes:
    """The picture's bytes from bytes, a path or a binary file, never reading more than
    ``max_bytes`` + 1 bytes: a file's size is checked before it is read (``image_too_large``, or what
    ``too_large`` says: a spoken question's file is read alike)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return _read_path(os.fspath(image), max_bytes, follow_symlinks, too_large)
    read = getattr(image, "read", None)
    if not callable(read):
        raise InvalidImage(f"the image must be bytes, a path or a binary file, not {type(image).__name__}",
                           code="invalid_image")
    data = _read_at_most(read, max_bytes + 1)
    if len(data) > max_bytes:
        raise too_large(max_bytes)
    return data


def _read_path(path: str | bytes, max_bytes: int, follow_symlinks: bool,
               too_large: Callable[..., InvalidInput]) -> bytes:
    shown = os.fsdecode(path)
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)  # non-blocking: opening a FIFO must not hang; it is refused below
    except FileNotFoundError as exc:
        raise InvalidInput(f"no such file: {shown}", code="file_not_found") from exc
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot read {shown}: {getattr(exc, 'strerror', None) or exc}",
                           code="file_not_readable") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidInput(f"not a regular file: {shown}", code="file_not_readable")
        if st.st_size > max_bytes:
            raise too_large(max_bytes, st.st_size)
        data = _read_at_most(lambda n: os.read(fd, n), max_bytes + 1)
    except OSError as exc:
        raise InvalidInput(f"cannot read {shown}: {exc.strerror or exc}", code="file_not_readable") from exc
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # it grew after the size check
        raise too_large(max_bytes)
    return data


def _read_at_most(read: Callable[[int], Any], limit: int) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < limit:
        chunk = read(limit - got)
        if not chunk:
            break
        if not isinstance(chunk, (bytes, bytearray)):
            raise InvalidImage("the file is open in text mode; open pictures with 'rb'", code="invalid_image")
        chunks.append(bytes(chunk))
        got += len(chunk)
    return b"".join(chunks)


def check_budget(params: GenerationParams, settings: Settings) -> None:
    """Refuse an answer budget above the server's cap (``invalid_params``, naming the cap): a budget is
    never quietly lowered."""
    if params.max_new_tokens is not None and params.max_new_tokens > settings.max_new_tokens:
        raise InvalidParams(f"max_tokens is {params.max_new_tokens}, above this server's cap of "
                            f"{settings.max_new_tokens} tokens an answer (TUWEN_MAX_NEW_TOKENS)", code="invalid_params")


def first_error(exc: Exception) -> str:
    """A validation error's first problem, as ``field: message``."""
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        return f"{where}: {err['msg']}" if where else str(err["msg"])
    return str(exc)


def _content_type(fmt: str) -> str:
    return {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp",
            "BMP": "image/bmp", "TIFF": "image/tiff"}.get(fmt.upper(), "application/octet-stream")
