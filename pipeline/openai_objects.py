"""What the OpenAI-compatible routes answer: ``chat.completion`` objects, ``chat.completion.chunk`` events
for streams, and the ``list`` of models. Built from tuwen's ``JobResult``; the shapes are OpenAI's, so the
official SDK (and anything written against it) reads them as its own. Below bulk and the gateway: a
batch's output file holds the same ``chat.completion`` (``bulk.openai_outputs``), whoever writes it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from tuwen.pipeline.schema import JobResult, TokenLogprob
from tuwen.pipeline.tool_format import ToolCall, tool_calls

#: An answer ends with ``stop`` (the model ended it, or a stop string), ``length`` (out of tokens) or
#: ``tool_calls`` (a forced tool call, whole: ``tool_format``).
FINISH_REASONS = ("stop", "length", "tool_calls")


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    #: null when the answer is a tool call.
    content: str | None = Field(examples=["图中有3个圆形。"])
    refusal: None = None
    tool_calls: list[ToolCall] | None = None


class ChoiceLogprobs(BaseModel):
    """A choice's ``logprobs``: one entry per answer token (``logprobs: true``)."""

    content: list[TokenLogprob]
    refusal: None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str = Field(examples=["chatcmpl-5f0c6a1e9b2d4c7a8e3f1b2c3d4e5f60"],
                    description="chatcmpl- and the tuwen job id (also in the X-Tuwen-Job-Id header)")
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: None = None


class OpenAIErrorDetail(BaseModel):
    message: str = Field(examples=["tools: tuwen has no tools or function calling"])
    type: str = Field(examples=["invalid_request_error"])
    param: str | None = Field(None, examples=["tools"])
    code: str = Field(examples=["unsupported_parameter"])
    #: The job a request queued before it failed or timed out: read it with ``GET /v1/jobs/{id}``.
    job_id: str | None = None


class OpenAIErrorBody(BaseModel):
    error: OpenAIErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The documented error answers of an OpenAI-compatible route (each is ``OpenAIErrorBody``)."""
    text = {400: "invalid request; error.param names the field", 401: "missing or wrong API key",
            404: "no such model", 409: "the job was cancelled, or an Idempotency-Key is in use",
            413: "request body too large", 429: "rate limit; see Retry-After",
            500: "the job failed in the model; error.job_id names it",
            503: "no live worker serves a model, or a service is down; see Retry-After",
            504: "no answer in time; error.job_id names the job to read later"}
    return {s: {"model": OpenAIErrorBody, "description": text[s]} for s in statuses}


class ModelCard(BaseModel):
    id: str = Field(examples=["tuwen-demo@3f2a9c1b:none"])
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tuwen"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def completion_id(job_id: str) -> str:
    return f"chatcmpl-{job_id}"


def finish_reason(result: JobResult, index: int = 0) -> str:
    """The finish reason of the job's answer, or of its choice ``index``."""
    reason = result.choices[index].finish_reason if result.choices else result.finish_reason
    return reason if reason in FINISH_REASONS else "stop"


def usage(result: JobResult) -> Usage:
    prompt, generated = result.prompt_tokens or 0, result.generated_tokens or 0
    return Usage(prompt_tokens=prompt, completion_tokens=generated, total_tokens=prompt + generated)


def completion(result: JobResult, model: str, created: int) -> ChatCompletion:
    """A succeeded job as a ``chat.completion``: each choice's text, or its tool call (``content`` null)."""
    choices = [Choice(message=message(result, result.answer or "", 0), finish_reason=finish_reason(result))]
    if result.choices:  # n > 1 or logprobs: every choice, each with its own finish reason
        choices = [Choice(index=c.index, message=message(result, c.answer, c.index), finish_reason=finish_reason(
            result, c.index), logprobs=None if c.logprobs is None else ChoiceLogprobs(content=c.logprobs))
            for c in result.choices]
    return ChatCompletion(id=completion_id(result.id), created=created, model=model, usage=usage(result),
                          choices=choices)


def message(result: JobResult, answer: str, index: int) -> AssistantMessage:
    """Choice ``index``'s message: its text, or its call when it ended with ``tool_calls``."""
    calls = tool_calls(result.id, answer, index) if finish_reason(result, index) == "tool_calls" else None
    return AssistantMessage(content=None, tool_calls=calls) if calls else AssistantMessage(content=answer)


def chunk(job_id: str, model: str, created: int, delta: dict[str, Any] | None = None, *,
          finish: str | None = None, with_usage: bool = False, usage_of: JobResult | None = None, index: int = 0,
          logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk`` of choice ``index``: a delta (``{"role"}`` first, then ``{"content"}``, with
    its tokens' ``logprobs`` when asked), the end (``finish``), or, with ``usage_of``, the usage chunk (no
    choices) that ``include_usage`` asks for."""
    body: dict[str, Any] = {"id": completion_id(job_id), "object": "chat.completion.chunk", "created": created,
                            "model": model, "system_fingerprint": None}
    if usage_of is not None:
        return {**body, "choices": [], "usage": usage(usage_of).model_dump()}
    body["choices"] = [{"index": index, "delta": delta or {},
                        "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
                        "finish_reason": finish}]
    if with_usage:
        body["usage"] = None
    return body
