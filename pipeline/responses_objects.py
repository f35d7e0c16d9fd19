"""What the Responses API answers: the ``response`` object and, for streams, OpenAI's events
(``response.created`` … ``response.completed``). Built from a job's ``JobResult`` and what the request
said (``ResponseFacts``); the shapes are OpenAI's, so the official SDK reads them as its own
(``resp.output_text`` is the answer). Below bulk and the gateway, as ``openai_objects``: a batch of
``/v1/responses`` holds the same ``response`` in its output file."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tuwen.pipeline.errors import http_status
from tuwen.pipeline.schema import ErrorInfo, JobResult, JobStatus

EXAMPLE_RESPONSE_ID = "resp_5f0c6a1e9b2d4c7a8e3f1b2c3d4e5f60"
#: ``response.status`` per job status (a succeeded job is ``incomplete`` when its token budget ran out).
STATUSES = {JobStatus.queued: "queued", JobStatus.running: "in_progress", JobStatus.succeeded: "completed",
            JobStatus.failed: "failed", JobStatus.cancelled: "cancelled", JobStatus.unknown: "failed"}
#: tuwen's codes as OpenAI's ``response.error.code`` names them (the rest: ``server_error`` when tuwen is at
#: fault, a 5xx, else ``invalid_prompt``); tuwen's own code is ``error.tuwen_code``.
ERROR_CODES = {"corrupt_image": "image_parse_error", "invalid_image": "invalid_image",
               "unsupported_image_format": "unsupported_image_media_type", "empty_image": "empty_image_file",
               "image_too_large": "image_file_too_large", "image_not_found": "image_file_not_found",
               "invalid_image_url": "invalid_image_url", "image_url_not_allowed": "invalid_image_url",
               "image_url_failed": "failed_to_download_image", "image_url_timeout": "failed_to_download_image",
               "image_url_too_many_redirects": "failed_to_download_image", "rate_limited": "rate_limit_exceeded"}
#: OpenAI's codes (not tuwen's: those are ``tuwen_code``) for a failure that is tuwen's fault, and the request's.
SERVER_ERROR, INVALID_PROMPT = "server_error", "invalid_prompt"


def response_id(job_id: str) -> str:
    return f"resp_{job_id}"


def job_of(response_id: str) -> str:
    """The job id of a ``resp_…`` id ("" when it is not one)."""
    return response_id[len("resp_"):] if response_id.startswith("resp_") else ""


class ResponseFacts(BaseModel):
    """What a response repeats of its request (OpenAI's echo fields), kept with a stored response."""

    model_config = ConfigDict(frozen=True)
    created_at: int
    model: str
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    truncation: Literal["auto", "disabled"] = "disabled"
    user: str | None = None


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str = Field(examples=["图中有3个圆形。"])
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str = Field(examples=["msg_5f0c6a1e9b2d4c7a8e3f1b2c3d4e5f60"])
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class ResponseError(BaseModel):
    code: str = Field(examples=["invalid_prompt"], description="OpenAI's name for the failure")
    message: str
    #: tuwen's code (docs/errors.md), e.g. ``context_too_long``.
    tuwen_code: str = Field(examples=["context_too_long"])


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"] = "max_output_tokens"


class TextFormatText(BaseModel):
    type: Literal["text"] = "text"


class TextSettings(BaseModel):
    format: TextFormatText = Field(default_factory=TextFormatText)


class ResponseObject(BaseModel):
    """OpenAI's ``response`` object (``openai.types.responses.Response``)."""

    id: str = Field(examples=[EXAMPLE_RESPONSE_ID], description="resp_ and the tuwen job id (X-Tuwen-Job-Id)")
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "failed", "in_progress", "cancelled", "queued", "incomplete"]
    completed_at: int | None = None
    model: str
    output: list[OutputMessage]
    usage: ResponseUsage | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    parallel_tool_calls: bool = False
    tool_choice: Literal["none"] = "none"
    tools: list[Any] = Field(default_factory=list)
    metadata: dict[str, str] = Field(default_factory=dict)
    text: TextSettings = Field(default_factory=TextSettings)
    truncation: Literal["auto", "disabled"] = "disabled"
    background: bool = False
    user: str | None = None


class ResponseDeleted(BaseModel):
    id: str = Field(examples=[EXAMPLE_RESPONSE_ID])
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True


def status_of(result: JobResult | None) -> str:
    if result is None:
        return "in_progress"
    if result.status == JobStatus.succeeded and result.finish_reason == "length":
        return "incomplete"
    return STATUSES[result.status]


def error_of(info: ErrorInfo | None, status: JobStatus) -> ResponseError:
    """A failed job's error; a job whose record is gone (deleted with ``DELETE /v1/jobs``) failed too."""
    if status == JobStatus.unknown or info is None:
        return ResponseError(code=SERVER_ERROR, message="the job is gone (deleted or expired)",
                             tuwen_code="not_found")
    openai = ERROR_CODES.get(info.code) or (SERVER_ERROR if http_status(info.code) >= 500 else INVALID_PROMPT)
    return ResponseError(code=openai, message=info.message, tuwen_code=info.code)


def message(job_id: str, text: str, status: Literal["completed", "incomplete"]) -> OutputMessage:
    return OutputMessage(id=f"msg_{job_id}", status=status, content=[OutputText(text=text)])


def response_object(job_id: str, facts: ResponseFacts, result: JobResult | None) -> ResponseObject:
    """The response of job ``job_id`` as it stands: ``result`` None (or queued, running) is in progress,
    a succeeded job has its answer as the one output message."""
    status = status_of(result)
    output, usage, error = [], None, None
    if result is not None and result.status == JobStatus.succeeded:
        output = [message(job_id, result.answer or "", "incomplete" if status == "incomplete" else "completed")]
        prompt, generated = result.prompt_tokens or 0, result.generated_tokens or 0
        usage = ResponseUsage(input_tokens=prompt, output_tokens=generated, total_tokens=prompt + generated)
    elif result is not None and status == "failed":
        error = error_of(result.error, result.status)
    ended = result.finished_at if result is not None and status == "completed" else None
    return ResponseObject(
        id=response_id(job_id), created_at=facts.created_at, status=status, completed_at=int(ended) if ended else None,
        model=(result.model_id if result is not None else None) or facts.model, output=output, usage=usage,
        error=error, incomplete_details=IncompleteDetails() if status == "incomplete" else None,
        instructions=facts.instructions, previous_response_id=facts.previous_response_id, store=facts.store,
        temperature=facts.temperature, top_p=facts.top_p, max_output_tokens=facts.max_output_tokens,
        metadata=facts.metadata, truncation=facts.truncation, user=facts.user)


# -- streams --------------------------------------------------------------------------------------------------
class Events:
    """A stream's events in order, each ``event: <type>`` and ``data: {…, "sequence_number"}``."""

    def __init__(self) -> None:
        self.number = 0

    def __call__(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self.number, **fields}
        self.number += 1
        return f"event: {kind}\ndata: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n\n"

    def response(self, kind: str, response: ResponseObject) -> str:
        return self(kind, response=response.model_dump(mode="json"))

    def opened(self, job_id: str) -> list[str]:
        """The output message and its text part begin."""
        item = OutputMessage(id=f"msg_{job_id}", status="in_progress", content=[]).model_dump(mode="json")
        return [self("response.output_item.added", output_index=0, item=item),
                self("response.content_part.added", item_id=item["id"], output_index=0, content_index=0,
                     part=OutputText(text="").model_dump(mode="json"))]

    def delta(self, job_id: str, text: str) -> str:
        return self("response.output_text.delta", item_id=f"msg_{job_id}", output_index=0, content_index=0,
                    delta=text, logprobs=[])

    def closed(self, job_id: str, done: ResponseObject) -> list[str]:
        """The text, its part and the message end; then the response, ``completed`` or ``incomplete``."""
        item = done.output[0] if done.output else message(job_id, "", "completed")
        text = item.content[0].text if item.content else ""
        where = {"item_id": item.id, "output_index": 0}
        return [self("response.output_text.done", **where, content_index=0, text=text, logprobs=[]),
                self("response.content_part.done", **where, content_index=0,
                     part=OutputText(text=text).model_dump(mode="json")),
                self("response.output_item.done", output_index=0, item=item.model_dump(mode="json")),
                self.response(f"response.{done.status}", done)]
