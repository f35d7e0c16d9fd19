"""What the Batch API routes take and answer, in OpenAI's shapes (the official SDK reads them as its own):
the ``file`` and ``batch`` objects, their lists, and the body of ``POST /v1/batches``. Built from tuwen's
``StoredFile`` and ``Bulk``: a bulk submitted with ``tuwen bulk submit`` is shown as a batch too (no
input or output file ids: its files are ``tuwen bulk results``')."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tuwen.pipeline.bulk.files import FILE_ID_PATTERN, StoredFile
from tuwen.pipeline.bulk.model import ENDPOINT, ENDPOINTS, Bulk
from tuwen.pipeline.gateway.openai_request import MAX_METADATA, MAX_METADATA_KEY, MAX_METADATA_VALUE
from tuwen.pipeline.openai_objects import OpenAIErrorBody
from tuwen.pipeline.schema import MAX_URL_CHARS, WebhookView

COMPLETION_WINDOW = "24h"
WINDOW_S = 24 * 3600.0
#: What a batch id or a bulk id looks like (``batch_…`` over HTTP, ``bulk_…`` from ``tuwen bulk submit``).
BATCH_ID_PATTERN = r"^(batch|bulk)_[A-Za-z0-9]{1,64}$"
EXAMPLE_FILE_ID = "file-3f2a9c1b5d6e7f8091a2b3c4"
EXAMPLE_BATCH_ID = "batch_5f0c6a1e9b2d4c7a8e3f1b2c3d4e5f60"


def _ts(t: float | None) -> int | None:
    return int(t) if t else None


# -- files --------------------------------------------------------------------------------------------------
class FileObject(BaseModel):
    id: str = Field(examples=[EXAMPLE_FILE_ID])
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    expires_at: int | None = None
    filename: str = Field(examples=["worksheets.jsonl"])
    #: ``batch`` (uploaded) or ``batch_output`` (a batch's output or error file).
    purpose: str = Field(examples=["batch"])
    status: Literal["processed"] = "processed"
    status_details: None = None

    @classmethod
    def of(cls, f: StoredFile) -> FileObject:
        return cls(id=f.id, bytes=f.bytes, created_at=int(f.created_at), expires_at=int(f.expires_at),
                   filename=f.filename, purpose=f.purpose)


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str = Field(examples=[EXAMPLE_FILE_ID])
    object: Literal["file"] = "file"
    deleted: bool = True


# -- batches ------------------------------------------------------------------------------------------------
class BatchError(BaseModel):
    code: str = Field(examples=["duplicate_custom_id"])
    message: str = Field(examples=["custom_id 'q-7' repeats line 3"])
    param: str | None = None
    #: The input file's line (from 1); null for the file as a whole.
    line: int | None = Field(None, examples=[9])


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class BatchRequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchObject(BaseModel):
    id: str = Field(examples=[EXAMPLE_BATCH_ID])
    object: Literal["batch"] = "batch"
    endpoint: str = Field(examples=[ENDPOINT])
    errors: BatchErrors | None = None
    #: null for a bulk of ``tuwen bulk submit`` (its input is a local file).
    input_file_id: str | None = Field(None, examples=[EXAMPLE_FILE_ID])
    completion_window: str = Field(examples=[COMPLETION_WINDOW])
    status: Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                    "cancelled"]
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts
    metadata: dict[str, str] | None = None
    #: tuwen's extension: the delivery of the batch's webhook, if it was created with a ``callback_url``.
    webhook: WebhookView | None = None

    @classmethod
    def of(cls, bulk: Bulk) -> BatchObject:
        api = bulk.openai
        window = api.completion_window if api else f"{round((bulk.expires_at - bulk.created_at) / 3600)}h"
        failed = [BatchError(code=e.code, message=e.message, line=e.line) for e in bulk.input_errors] or [
            BatchError(code="invalid_manifest", message=text) for text in bulk.errors]
        c = bulk.request_counts
        return cls(id=bulk.id, endpoint=api.endpoint if api else ENDPOINT,
                   errors=BatchErrors(data=failed) if failed else None,
                   input_file_id=api.input_file_id if api else None, completion_window=window,
                   status=bulk.state.value, output_file_id=api.output_file_id if api else None,
                   error_file_id=api.error_file_id if api else None, created_at=int(bulk.created_at),
                   in_progress_at=_ts(bulk.in_progress_at), expires_at=_ts(bulk.expires_at),
                   finalizing_at=_ts(bulk.finalizing_at), completed_at=_ts(bulk.completed_at),
                   failed_at=_ts(bulk.failed_at), expired_at=_ts(bulk.expired_at),
                   cancelling_at=_ts(bulk.cancelling_at), cancelled_at=_ts(bulk.cancelled_at),
                   request_counts=BatchRequestCounts(total=c.total, completed=c.completed, failed=c.failed),
                   metadata=bulk.metadata or None, webhook=bulk.webhook)


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class BatchCreate(BaseModel):
    """The body of ``POST /v1/batches``."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    input_file_id: str = Field(pattern=FILE_ID_PATTERN, max_length=80, examples=[EXAMPLE_FILE_ID],
                               description="a file uploaded with purpose `batch`: one request of the endpoint "
                                           "per line")
    endpoint: str = Field(json_schema_extra={"enum": list(ENDPOINTS)},
                          description="the endpoint of every line: chat completions or responses")
    completion_window: str = Field(json_schema_extra={"enum": [COMPLETION_WINDOW]})
    metadata: dict[Annotated[str, Field(max_length=MAX_METADATA_KEY)],
                   Annotated[str, Field(max_length=MAX_METADATA_VALUE)]] | None = Field(
        None, max_length=MAX_METADATA, examples=[{"class": "三年级二班"}],
                                            description=f"up to {MAX_METADATA} pairs: keys up to "
                                                        f"{MAX_METADATA_KEY} characters, values up to "
                                                        f"{MAX_METADATA_VALUE}")
    #: tuwen's extension: POSTed a signed ``batch.completed`` / ``failed`` / ``expired`` / ``cancelled`` event.
    callback_url: str | None = Field(None, max_length=MAX_URL_CHARS, examples=["https://hooks.example.com/tuwen"],
                                     description="tuwen's extension (SDK: extra_body): POSTed a signed "
                                                 "batch.completed / failed / expired / cancelled event")


def listing(items: list[Any], has_more: bool) -> dict[str, Any]:
    """OpenAI's list envelope: the items, the first and last ids (the next page's ``after``), has_more."""
    return {"data": items, "first_id": items[0].id if items else None, "last_id": items[-1].id if items else None,
            "has_more": has_more}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The documented error answers of a Batch API route (each is OpenAI's ``{"error": {…}}``)."""
    text = {400: "invalid request; error.param names the field", 401: "missing or wrong API key",
            404: "no such file or batch (or not the caller's)",
            409: "the batch has ended, the file is still read by a batch, or an Idempotency-Key is in use",
            413: "the file is larger than TUWEN_MAX_BATCH_FILE_BYTES", 429: "rate limit; see Retry-After",
            503: "Redis or storage is unavailable; see Retry-After"}
    return {s: {"model": OpenAIErrorBody, "description": text[s]} for s in statuses}
