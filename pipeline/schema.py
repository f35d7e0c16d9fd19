"""The contract shared by producers and workers: job request and job result (frozen, JSON only)."""

from __future__ import annotations

import time
import uuid
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    #: No record: never submitted, expired, or deleted. (Celery's PENDING cannot tell these apart.)
    unknown = "unknown"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class Priority(str, Enum):
    interactive = "interactive"
    bulk = "bulk"


class GenerationParams(BaseModel):
    """Per-job generation knobs. Unknown keys are refused, not ignored."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Cap on generated tokens; the worker's own ``TUWEN_MAX_NEW_TOKENS`` is the upper bound.
    max_new_tokens: int | None = Field(None, ge=1, le=4096)


class ErrorInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    code: str
    message: str
    retryable: bool = False


def new_job_id() -> str:
    return uuid.uuid4().hex


class JobRequest(BaseModel):
    """What a worker needs to answer one job. Carries an image *key*, never image bytes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(default_factory=new_job_id, min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    image_key: str = Field(min_length=1, max_length=512)
    question: str = Field(min_length=1)
    params: GenerationParams = GenerationParams()
    priority: Priority = Priority.interactive
    owner: str = Field("default", min_length=1, max_length=128)
    created_at: float = Field(default_factory=time.time)
    #: Set for jobs that belong to a bulk batch.
    batch_id: str | None = None


class JobResult(BaseModel):
    """A job's state as the submitter sees it; terminal ones carry an answer or an error."""

    model_config = ConfigDict(frozen=True)

    id: str
    status: JobStatus
    answer: str | None = None
    error: ErrorInfo | None = None
    model_id: str | None = None
    batch_size: int | None = None
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    attempts: int = 0
    worker: str | None = None
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    #: Milliseconds spent per stage (queue wait, image fetch, model, total …).
    timings: dict[str, float] = Field(default_factory=dict)
    owner: str | None = None
    image_key: str | None = None
    #: Answered from the answer cache, without a model call.
    cached: bool = False
    #: Someone asked to cancel the job while it was running; it finished anyway.
    cancel_requested: bool = False

    @classmethod
    def unknown(cls, job_id: str) -> JobResult:
        return cls(id=job_id, status=JobStatus.unknown)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)
