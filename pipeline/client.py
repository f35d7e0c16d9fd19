"""The producer's client: submit / get / wait / cancel. No torch; a web backend imports only this.

    from tuwen.pipeline.client import Client
    client = Client.from_env()
    job = client.submit(image=open("q.jpg", "rb").read(), question="图中有几个圆形？")
    result = client.wait(job.id, timeout=60)        # client.get(job.id) does not block
    print(result.status, result.answer)
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from pydantic import ValidationError

from tuwen.pipeline import app as queue
from tuwen.pipeline.errors import InvalidParams, Unavailable
from tuwen.pipeline.inputs import check_question, decode_image
from tuwen.pipeline.jobs import JobStore, cache_prefix, connect
from tuwen.pipeline.schema import GenerationParams, JobRequest, JobResult, JobStatus, Priority
from tuwen.pipeline.settings import Settings
from tuwen.pipeline.stores import open_images
from tuwen.storage.errors import StorageError


class Client:
    """Talks to Redis (job state), the broker (jobs) and storage (images). Thread-safe."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @classmethod
    def from_env(cls, **overrides: Any) -> Client:
        return cls(Settings(**overrides))

    @cached_property
    def jobs(self) -> JobStore:
        return JobStore(connect(self.settings.redis_url), self.settings.result_ttl_s)

    @cached_property
    def images(self) -> Any:
        try:
            return open_images(self.settings)
        except StorageError as exc:
            raise Unavailable(f"image storage is not reachable: {exc}", code=exc.code,
                              retryable=exc.retryable) from exc

    @cached_property
    def celery(self) -> Any:
        return queue.make_celery(self.settings)

    def submit(
        self,
        image: bytes,
        question: str,
        *,
        max_new_tokens: int | None = None,
        priority: Priority | str = Priority.interactive,
        owner: str = "default",
        batch_id: str | None = None,
        job_id: str | None = None,
    ) -> JobResult:
        """Validate, store the image, record and enqueue the job; returns it as ``queued``.

        Bad input raises an ``InvalidInput`` subclass (with a ``code``) before anything is stored
        or queued. An unreachable Redis, broker or storage raises ``Unavailable`` (retryable).
        """
        request = self.prepare(image, question, max_new_tokens=max_new_tokens, priority=priority,
                               owner=owner, batch_id=batch_id, job_id=job_id)
        self.enqueue(request)
        return JobResult(id=request.id, status=JobStatus.queued, owner=owner, created_at=request.created_at,
                         image_key=request.image_key)

    def prepare(self, image: bytes, question: str, *, max_new_tokens: int | None = None,
                priority: Priority | str = Priority.interactive, owner: str = "default",
                batch_id: str | None = None, job_id: str | None = None) -> JobRequest:
        """Validate and store the image; returns the request, not yet queued."""
        s = self.settings
        text = check_question(question, max_chars=s.max_question_chars)
        try:
            params = GenerationParams(max_new_tokens=max_new_tokens)
            priority = Priority(priority)
        except (ValidationError, ValueError) as exc:
            raise InvalidParams(f"invalid generation parameters: {exc}", code="invalid_params") from exc
        picture = decode_image(image, max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels,
                               max_aspect_ratio=s.max_aspect_ratio)
        try:
            key = self.images.put(image, _content_type(picture.format or ""))
        except StorageError as exc:
            raise Unavailable(f"could not store the image: {exc}", code=exc.code, retryable=exc.retryable) from exc
        fields: dict[str, Any] = {"image_key": key, "question": text, "params": params, "priority": priority,
                                  "owner": owner, "batch_id": batch_id}
        if job_id:
            fields["id"] = job_id
        return JobRequest(**fields)

    def enqueue(self, request: JobRequest) -> None:
        """Record the job, then publish it; if publishing fails the record is removed again."""
        self.jobs.create(request)
        try:
            queue.enqueue(self.celery, self.settings, request)
        except Exception as exc:  # noqa: BLE001 - kombu raises many connection error types
            self.jobs.delete(request.id)
            raise Unavailable(f"the job queue is not reachable: {exc}") from exc

    def get(self, job_id: str, owner: str | None = None) -> JobResult:
        """The job's state now (``unknown`` if there is no such job). Never blocks."""
        return self.jobs.get(job_id, owner)

    def wait(self, job_id: str, timeout: float = 60.0, owner: str | None = None) -> JobResult:
        """Block until the job ends or ``timeout`` passes; returns the state either way."""
        return self.jobs.wait(job_id, timeout, owner)

    def wait_many(self, job_ids: list[str], timeout: float = 60.0) -> dict[str, JobResult]:
        return self.jobs.wait_many(job_ids, timeout)

    def cancel(self, job_id: str, owner: str | None = None) -> JobResult:
        return self.jobs.cancel(job_id, owner)

    def delete(self, job_id: str, owner: str | None = None) -> bool:
        """Delete a job's record and result now, and its image if no other job uses it. Cached
        answers about that image go too. Returns False if there was no such job."""
        if self.jobs.get(job_id, owner).status == JobStatus.unknown:
            return False
        image_key = self.jobs.delete(job_id, owner)
        if image_key:
            try:
                self.images.delete(image_key)
            except StorageError as exc:
                raise Unavailable(f"could not delete the image: {exc}", code=exc.code, retryable=True) from exc
            for key in self.jobs.redis.scan_iter(cache_prefix(image_key) + "*", count=500):
                self.jobs.redis.delete(key)
        return True

    def close(self) -> None:
        if "celery" in self.__dict__:
            self.celery.close()
        if "jobs" in self.__dict__:
            self.jobs.redis.close()


def _content_type(fmt: str) -> str:
    return {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp",
            "BMP": "image/bmp", "TIFF": "image/tiff"}.get(fmt.upper(), "application/octet-stream")
