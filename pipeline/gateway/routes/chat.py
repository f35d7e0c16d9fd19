"""``POST /v1/chat/completions``: OpenAI's chat API over tuwen's queue (walk-through: docs/openai.md).

The request becomes one job: its conversation (pictures stored like uploads, for the caller's owner),
``GenerationParams`` and ``stream``. Keys, owners, rate limits and ``Idempotency-Key`` work as on
``/v1/jobs``. Without ``stream`` the answer is a ``chat.completion`` once the job ends; with it, Server-Sent
Events relay the worker's text as it is generated. Either way the wait is bounded
(``TUWEN_GATEWAY_CHAT_TIMEOUT_S``) and a timeout names the job, whose answer ``GET /v1/jobs/{id}`` gives
later. A client that goes away costs nothing: the job finishes and keeps its result.
"""

# No `from __future__ import annotations`: FastAPI reads these signatures at import time.
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from tuwen.pipeline.apikeys import ApiKey
from tuwen.pipeline.conversation import Turn, prepare_conversation
from tuwen.pipeline.gateway import sse
from tuwen.pipeline.gateway.deps import IdempotencyKey, State, Submitter
from tuwen.pipeline.gateway.openai_errors import NO_RETRY, OpenAIError, OpenAIRoute, as_openai, openai_error
from tuwen.pipeline.gateway.openai_objects import ChatCompletion, chunk, completion, error_responses, finish_reason
from tuwen.pipeline.gateway.openai_request import ChatCompletionRequest, ChatRequest, PictureRef, parse_chat
from tuwen.pipeline.gateway.pictures import picture
from tuwen.pipeline.gateway.routes.models import served_model
from tuwen.pipeline.gateway.state import GatewayState
from tuwen.pipeline.schema import JobResult, JobStatus, Priority

log = logging.getLogger("tuwen.gateway")
router = APIRouter(prefix="/v1/chat", tags=["chat"], route_class=OpenAIRoute)

#: A stream with nothing to say for this long sends a ``: keep-alive`` comment.
KEEP_ALIVE_S = 15.0
#: What ``json.dumps`` leaves as it is but ``str.splitlines`` (and log readers) take as a line's end.
_LINE_ENDS = {ord(c): f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"}
#: Failure codes that are tuwen's fault, not the request's (a 5xx; every other failure is a 400).
SERVER_FAULTS = frozenset({"internal_error", "model_error", "out_of_memory", "too_many_attempts"})


# -- submitting -----------------------------------------------------------------------------------------
def queue_job(state: GatewayState, key: ApiKey, chat: ChatRequest) -> str:
    """Get the pictures, store them for the key's owner and queue the job; returns its id."""
    state.census.check_pictures(state.settings.interactive_queue,
                                sum(isinstance(p, PictureRef) for t in chat.turns for p in t.parts))
    limit = state.settings.max_image_bytes
    turns = [Turn(t.role.value, [picture(p.url, p.param, max_bytes=limit, remote=state.pictures)
                                 if isinstance(p, PictureRef) else p for p in t.parts]) for t in chat.turns]
    job = prepare_conversation(state.client, turns, chat.params, owner=key.owner, priority=Priority.interactive,
                               stream=chat.stream)
    state.client.enqueue(job)
    state.metrics.submitted.labels(Priority.interactive.value).inc()
    return job.id


def accept(state: GatewayState, key: ApiKey, chat: ChatRequest, idempotency_key: str | None) -> tuple[str, bool]:
    """The job of this request, queued once per ``Idempotency-Key``: ``(job id, replayed)``."""
    if idempotency_key is None:
        return queue_job(state, key, chat), False
    first = state.idempotency.begin(key.owner, idempotency_key, chat.fingerprint)
    if first is not None:
        return first, True
    try:
        job_id = queue_job(state, key, chat)
    except BaseException:
        state.idempotency.release(key.owner, idempotency_key)
        raise
    state.idempotency.complete(key.owner, idempotency_key, chat.fingerprint, job_id)
    return job_id, False


def one_line(value: Any) -> str:
    """``value`` as JSON for the log, on one line whatever it holds: CR, LF and every other character that
    ends a line are escaped (a ``user`` of ``"a\\r\\nFORGED …"`` cannot start a log line of its own)."""
    return json.dumps(value, ensure_ascii=False).translate(_LINE_ENDS)


# -- the outcome --------------------------------------------------------------------------------------------
async def outcome(state: GatewayState, job_id: str, owner: str, timeout: float) -> JobResult:
    """The job once it ended, or as it is when ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    result = await state.aclient.get(job_id, owner)
    while not (result.status.terminal or result.status == JobStatus.unknown):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        await state.waiters.wait(job_id, min(left, 1.0))
        result = await state.aclient.get(job_id, owner)
    return result


def failure(job_id: str, result: JobResult | None, timeout: float) -> OpenAIError:
    """Why a queued job gave no answer, as an error that names the job (and tells the SDK not to retry:
    a retry would queue the same question again)."""
    if result is None or not result.status.terminal and result.status != JobStatus.unknown:
        return openai_error(504, "timeout", f"no answer within {timeout:g}s; the job goes on: read its answer with "
                            f"GET /v1/jobs/{job_id}", headers=NO_RETRY, job_id=job_id)
    if result.status == JobStatus.unknown:
        return openai_error(404, "not_found", f"job {job_id} is gone (deleted or expired)", headers=NO_RETRY,
                            job_id=job_id)
    error = result.error
    code, message = (error.code, error.message) if error else (result.status.value, f"the job {result.status.value}")
    status = 409 if result.status == JobStatus.cancelled else (
        503 if error and error.retryable else 500 if code in SERVER_FAULTS else 400)
    return openai_error(status, code, message, headers=NO_RETRY, job_id=job_id)


# -- streaming ------------------------------------------------------------------------------------------------
async def relay(state: GatewayState, job_id: str, owner: str, model: str, created: int,
                include_usage: bool) -> AsyncIterator[str]:
    """The job's answer as OpenAI's chunks: the role, the text as it comes, the finish reason (and usage
    when asked), then ``[DONE]``; a job that fails or times out ends with an ``error`` event."""
    timeout = state.gw.gateway_chat_timeout_s

    def piece(delta: dict[str, Any] | None = None, finish: str | None = None) -> str:
        return sse.event(chunk(job_id, model, created, delta, finish=finish, with_usage=include_usage))

    yield piece({"role": "assistant", "content": ""})
    result: JobResult | None = None
    try:
        async with aclosing(sse.with_heartbeats(state.aclient.stream(job_id, timeout, owner), KEEP_ALIVE_S)) as deltas:
            async for delta in deltas:
                if delta is None:
                    yield sse.KEEP_ALIVE
                    continue
                if delta.text:
                    yield piece({"content": delta.text})
                if delta.finish_reason is not None or delta.result is not None or not delta.text:
                    result = delta.result
                    break
    except Exception as exc:  # noqa: BLE001 - e.g. Redis went away mid-stream: say so, in the stream
        yield sse.event(as_openai(exc).body())
        yield sse.DONE
        return
    if result is not None and result.status == JobStatus.succeeded:
        yield piece(finish=finish_reason(result))
        if include_usage:
            yield sse.event(chunk(job_id, model, created, usage_of=result))
    else:
        yield sse.event(failure(job_id, result, timeout).body())
    yield sse.DONE


# -- the route ------------------------------------------------------------------------------------------------
def chat_body() -> dict[str, Any]:
    """The JSON body for the OpenAPI document (the route reads it itself, after the API key is checked)."""
    schema = ChatCompletionRequest.model_json_schema(ref_template="#/$defs/{model}")
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


def inline(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with its ``$defs`` written in place (the document has nowhere else to put them)."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return dict(resolve(schema))


@router.post("/completions", response_model=ChatCompletion, openapi_extra=chat_body(),
             summary="对话 · OpenAI-compatible chat completion (pictures as image_url parts)",
             responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                              "description": "a chat.completion, or with `stream: true` Server-Sent Events"},
                        **error_responses(400, 401, 404, 409, 413, 429, 500, 503, 504)})
async def create_chat_completion(key: Submitter, state: State, request: Request,
                                 idempotency_key: IdempotencyKey = None) -> Any:
    """One conversation turn: text and pictures (`data:` URLs, `tuwen://images/<sha256>`, allow-listed
    http(s)) in, the assistant's answer out, whole or streamed. Errors are OpenAI's `{"error": {"message",
    "type", "param", "code"}}`; the tuwen job id comes in the `X-Tuwen-Job-Id` header."""
    chat = parse_chat(await request.body())
    model = await run_in_threadpool(served_model, state, chat.model)
    created = int(time.time())
    job_id, replayed = await run_in_threadpool(accept, state, key, chat, idempotency_key)
    log.info("chat job %s of %s: user=%s metadata=%s%s", job_id, key.owner, one_line(chat.user),
             one_line(chat.metadata), " (replayed)" if replayed else "")
    headers = {"X-Tuwen-Job-Id": job_id, **({"Idempotent-Replayed": "true"} if replayed else {})}
    if chat.stream:
        return StreamingResponse(relay(state, job_id, key.owner, model, created, chat.include_usage),
                                 media_type=sse.MEDIA_TYPE, headers={**sse.HEADERS, **headers})
    timeout = state.gw.gateway_chat_timeout_s
    result = await outcome(state, job_id, key.owner, timeout)
    if result.status != JobStatus.succeeded:
        raise failure(job_id, result, timeout)
    answer = completion(result, result.model_id or model, created)
    return JSONResponse(answer.model_dump(mode="json"), headers=headers)
