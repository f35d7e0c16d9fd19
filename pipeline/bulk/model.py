"""What a bulk is: its states, its counts and its ids. No I/O.

A bulk's id hashes its input and options, so the same submission run again finds the same bulk; a
line's job id hashes (bulk id, custom_id), so a line is never queued as two jobs. A batch created over
HTTP (``POST /v1/batches``) is a bulk too, with a random ``batch_…`` id and its OpenAI facts (``OpenAIBatch``).
"""

from __future__ import annotations

import hashlib
import uuid
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict

from tuwen.pipeline.schema import WebhookView

ID_PREFIX = "bulk_"
#: The prefix of ids made before bulks were called bulks; resubmitting such an input still resumes it.
LEGACY_ID_PREFIX = "batch_"
#: The prefix of a batch created over HTTP (OpenAI's shape), then 32 random hex digits.
BATCH_ID_PREFIX = "batch_"


class BulkState(str, Enum):
    validating = "validating"
    in_progress = "in_progress"
    finalizing = "finalizing"
    completed = "completed"
    failed = "failed"  #: the input was refused (duplicate or missing custom_ids …)
    cancelling = "cancelling"  #: cancelled: queued lines are being cancelled, running ones finish
    cancelled = "cancelled"
    expired = "expired"  #: not finished within its completion window; the rest was cancelled

    @property
    def terminal(self) -> bool:
        return self in (BulkState.completed, BulkState.failed, BulkState.cancelled, BulkState.expired)


#: The states a bulk can still be stopped in (cancelled or expired).
LIVE = (BulkState.validating, BulkState.in_progress, BulkState.finalizing)
#: The states of a bulk stopped before its end.
STOPPED = (BulkState.cancelling, BulkState.cancelled, BulkState.expired)


class RequestCounts(BaseModel):
    model_config = ConfigDict(frozen=True)
    total: int = 0
    completed: int = 0
    failed: int = 0


class InputError(BaseModel):
    """One reason an input file is refused whole: the line (None: the file as a whole), a code, a message."""

    model_config = ConfigDict(frozen=True)
    line: int | None
    code: str
    message: str

    @property
    def text(self) -> str:
        return f"line {self.line}: {self.message}" if self.line is not None else self.message


ENDPOINT = "/v1/chat/completions"
RESPONSES_ENDPOINT = "/v1/responses"
#: The endpoints a batch's lines may go to: each line's body is a request of that endpoint.
ENDPOINTS = (ENDPOINT, RESPONSES_ENDPOINT)


class OpenAIBatch(BaseModel):
    """What a batch created over HTTP adds to its bulk: OpenAI's facts about it."""

    model_config = ConfigDict(frozen=True)
    input_file_id: str
    #: One of ``ENDPOINTS``.
    endpoint: str
    completion_window: str
    #: Where the ``batch.completed`` / ``failed`` / ``expired`` / ``cancelled`` webhook goes (tuwen's extension).
    callback_url: str | None = None
    #: Set when the batch ends: the files of the lines that succeeded, and of the ones that did not.
    output_file_id: str | None = None
    error_file_id: str | None = None


class Bulk(BaseModel):
    """A bulk as ``bulk status`` shows it. Counts are as of the last refresh."""

    model_config = ConfigDict(frozen=True)
    id: str
    state: BulkState
    input: str
    owner: str
    request_counts: RequestCounts
    #: Input lines handled so far: enqueued as jobs, or failed before (bad picture, empty question …).
    submitted: int = 0
    queued: int = 0
    rejected: int = 0
    created_at: float
    expires_at: float
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    completed_at: float | None = None
    cancelling_at: float | None = None
    failed_at: float | None = None
    cancelled_at: float | None = None
    expired_at: float | None = None
    #: Why the input was refused (one line each).
    errors: list[str] = []
    #: The same reasons with their line numbers and codes.
    input_errors: list[InputError] = []
    output_key: str | None = None
    errors_key: str | None = None
    metadata: dict[str, str] = {}
    #: Set for a batch created over HTTP; None for one of ``tuwen bulk submit``.
    openai: OpenAIBatch | None = None
    #: The delivery of the batch's webhook (``openai.callback_url``), once it ended.
    webhook: WebhookView | None = None

    @property
    def unread(self) -> bool:
        """Stopped (cancelled, expired) before every input line was submitted: the rest is still to be
        recorded as stopped, so that the output has a line for each input line."""
        return self.state in STOPPED and self.submitted < self.request_counts.total

    @property
    def finished_at(self) -> float | None:
        return self.completed_at or self.failed_at or self.cancelled_at or self.expired_at

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def batch_id() -> str:
    """A new id for a batch created over HTTP: each ``POST /v1/batches`` is a new batch, as at OpenAI."""
    return BATCH_ID_PREFIX + uuid.uuid4().hex


def bulk_id_for(digest: str, owner: str, salt: str = "", prefix: str = ID_PREFIX) -> str:
    return prefix + hashlib.sha256(f"{digest}\0{owner}\0{salt}".encode()).hexdigest()[:24]


def job_id_for(bulk_id: str, custom_id: str) -> str:
    return f"{bulk_id}_" + hashlib.sha256(f"{bulk_id}\0{custom_id}".encode()).hexdigest()[:20]
