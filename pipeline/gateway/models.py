"""The shapes the gateway documents: what ``/openapi.json`` shows and the routes take and return.

The job itself is ``schema.JobView`` (the one public job model, also the webhook body). ``SubmitForm``
is the one definition of the upload's text fields; every limit in it comes from ``schema``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from tuwen.pipeline.schema import MAX_NEW_TOKENS, MAX_URL_CHARS, JobStatus, Priority

EXAMPLE_QUESTION = "图中有几个圆形？"
EXAMPLE_JOB_ID = "5f0c6a1e9b2d4c7a8e3f1b2c3d4e5f60"


class ErrorDetail(BaseModel):
    """OpenAI's error fields, on every route: match on ``code`` (docs/errors.md), show ``message``."""

    message: str = Field(examples=["the question is empty"])
    type: str = Field(examples=["invalid_request_error"], description="OpenAI's error type, from the status")
    param: str | None = Field(None, examples=["question"], description="the request field at fault, if known")
    code: str = Field(examples=["empty_question"])


class ErrorBody(BaseModel):
    error: ErrorDetail


class SubmitForm(BaseModel):
    """The text fields of ``POST /v1/jobs``; the picture is the one ``image`` file part, a spoken question the
    ``audio`` file part (then ``question`` may be left out)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    question: str | None = Field(None, description="问题, in Chinese or English (required unless `audio` is sent)",
                                 examples=[EXAMPLE_QUESTION])
    priority: Annotated[Priority, WithJsonSchema({"type": "string", "enum": [p.value for p in Priority],
                                                  "default": Priority.interactive.value})] = Priority.interactive
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    callback_url: str | None = Field(None, max_length=MAX_URL_CHARS, examples=["https://hooks.example.com/tuwen"],
                                     description="POSTed the result when the job ends")


FORM_FIELDS = frozenset({"image", "audio", *SubmitForm.model_fields})


def submit_body() -> dict[str, Any]:
    """The multipart body of ``POST /v1/jobs`` for the OpenAPI document (the route parses it itself,
    after the API key is checked, so FastAPI does not describe it)."""
    fields = SubmitForm.model_json_schema()
    image = {"type": "string", "contentMediaType": "application/octet-stream", "title": "Image",
             "description": "picture (PNG, JPEG, GIF, WebP, BMP, TIFF); type is sniffed from the bytes"}
    schema = {"type": "object", "required": ["image", *fields.get("required", [])],
              "properties": {"image": image, "audio": {**image, "title": "Audio", "description": "spoken question "
                                                       "(WAV, FLAC, Ogg, MP3), transcribed first"},
                             **fields["properties"]}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


class JobAccepted(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"id": EXAMPLE_JOB_ID, "status": "queued"}]})
    id: str
    status: JobStatus


class Health(BaseModel):
    status: str = Field(examples=["ok"])
    redis: str = Field(examples=["ok"])
    storage: str = Field(examples=["ok"])
    #: Live workers per queue, from their heartbeats (empty when Redis is unreachable).
    workers: dict[str, int] = Field(default_factory=dict, examples=[{"interactive": 2, "bulk": 1}])


class Ready(BaseModel):
    status: str = Field(examples=["ready"])
    #: Why the gateway is not ready, e.g. "no live worker is consuming interactive".
    reason: str | None = None
    workers: dict[str, int] = Field(default_factory=dict, examples=[{"interactive": 2, "bulk": 1}])


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The documented error answers of a route (each is ``ErrorBody``)."""
    text = {400: "malformed request", 401: "missing or wrong API key", 404: "no such job (or not yours)",
            409: "conflict", 413: "upload too large", 422: "invalid input (see error.code)",
            429: "rate limit; see Retry-After", 503: "a service is unavailable; see Retry-After"}
    return {c: {"model": ErrorBody, "description": text[c]} for c in codes}
