"""``POST /v1/chat/completions``: OpenAI's chat API over tuwen's queue (walk-through: docs/openai.md).

The request becomes one job: its conversation (pictures stored like uploads, for the caller's owner),
``GenerationParams`` and ``stream``. Keys, owners, rate limits and ``Idempotency-Key`` work as on
``/v1/jobs``. Without ``stream`` the answer is a ``chat.completion`` once the job ends; with it, Server-Sent
Events relay the worker's text as it is generated. Either way the wait is bounded
(``TUWEN_GATEWAY_CHAT_TIMEOUT_S``) and a timeout names the job, whose answer ``GET /v1/jobs/{id}`` gives
later. A client that goes away costs nothing: the job finishes and keeps its result.
"""

# No `from __future__ import annotations`: FastAPI reads these signatures at import time.
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from tuwen.pipeline.gateway import sse
from tuwen.pipeline.gateway.chat_jobs import accept, accepted, failure, job_deltas, outcome, warnings_of
from tuwen.pipeline.gateway.deps import IdempotencyKey, State, Submitter
from tuwen.pipeline.gateway.openai_errors import OpenAIRoute
from tuwen.pipeline.gateway.openai_request import ChatCompletionRequest, parse_chat
from tuwen.pipeline.gateway.openapi import json_body
from tuwen.pipeline.gateway.served import served_model
from tuwen.pipeline.gateway.state import GatewayState
from tuwen.pipeline.gateway.tool_calls import CallStream
from tuwen.pipeline.openai_objects import ChatCompletion, chunk, completion, error_responses, finish_reason
from tuwen.pipeline.schema import JobStatus
from tuwen.pipeline.streams import Delta

router = APIRouter(prefix="/v1/chat", tags=["chat"], route_class=OpenAIRoute)


# -- streaming ------------------------------------------------------------------------------------------------
async def relay(state: GatewayState, job_id: str, owner: str, model: str, created: int,
                include_usage: bool, n: int = 1, calls: dict[int, CallStream] | None = None) -> AsyncIterator[str]:
    """The job's answer as OpenAI's chunks: the role, the text as it comes, the finish reason (and usage
    when asked), then ``[DONE]``; each chunk of one of ``n`` choices carries its ``index`` (and with
    ``logprobs`` its tokens'); a forced tool call's text goes out as tool-call deltas (``calls``, one per
    choice); a job that fails or times out ends with an ``error`` event."""

    def piece(delta: dict[str, Any] | None = None, finish: str | None = None, index: int = 0,
              logprobs: list[dict[str, Any]] | None = None) -> str:
        return sse.event(chunk(job_id, model, created, delta, finish=finish, with_usage=include_usage, index=index,
                               logprobs=logprobs))

    for index in range(n):
        yield piece({"role": "assistant", "content": None if calls else ""}, index=index)
    async with aclosing(job_deltas(state, job_id, owner)) as pieces:
        async for text in pieces:
            if text is None:
                yield sse.KEEP_ALIVE
            elif isinstance(text, Delta):
                deltas: list[dict[str, Any]] = calls[text.index].feed(text.text) if calls else [{"content": text.text}]
                if text.logprobs and not deltas:  # a call's held-back text: its tokens' logprobs go out still
                    deltas = [{}]
                for i, delta in enumerate(deltas):
                    yield piece(delta, index=text.index, logprobs=None if i else text.logprobs)
            elif text.error is not None:
                yield sse.event(text.error.body())
            elif text.result is not None:
                for index in range(len(text.result.choices or ()) or 1):
                    for delta in calls[index].end(finish_reason(text.result, index)) if calls else []:
                        yield piece(delta, index=index)
                    yield piece(finish=finish_reason(text.result, index), index=index)
                if include_usage:
                    yield sse.event(chunk(job_id, model, created, usage_of=text.result))
    yield sse.DONE


# -- the route ------------------------------------------------------------------------------------------------
@router.post("/completions", response_model=ChatCompletion, openapi_extra=json_body(ChatCompletionRequest),
             summary="对话 · OpenAI-compatible chat completion (pictures as image_url parts)",
             responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                              "description": "a chat.completion, or with `stream: true` Server-Sent Events"},
                        **error_responses(400, 401, 404, 409, 413, 429, 500, 503, 504)})
async def create_chat_completion(key: Submitter, state: State, request: Request,
                                 idempotency_key: IdempotencyKey = None) -> Any:
    """One conversation turn: text and pictures (`data:` URLs, `tuwen://images/<sha256>`, http(s) at
    public addresses) in, the assistant's answer out, whole or streamed. Errors are OpenAI's `{"error": {"message",
    "type", "param", "code"}}`; the tuwen job id comes in the `X-Tuwen-Job-Id` header."""
    chat = parse_chat(await request.body())
    model = await run_in_threadpool(served_model, state, chat.model)
    created = int(time.time())
    job_id, replayed = await run_in_threadpool(accept, state, key, chat, idempotency_key)
    headers = {**accepted(state, key, "chat", job_id, replayed, chat.user, chat.metadata, chat.ignored),
               **warnings_of(chat)}
    if chat.stream:
        calls = {i: CallStream(job_id, i) for i in range(chat.params.n)} if chat.params.tool_call else None
        return StreamingResponse(relay(state, job_id, key.owner, model, created, chat.include_usage, chat.params.n,
                                       calls),
                                 media_type=sse.MEDIA_TYPE, headers={**sse.HEADERS, **headers})
    timeout = state.gw.gateway_chat_timeout_s
    result = await outcome(state, job_id, key.owner, timeout)
    if result.status != JobStatus.succeeded:
        raise failure(job_id, result, timeout)
    answer = completion(result, result.model_id or model, created)
    return JSONResponse(answer.model_dump(mode="json"), headers=headers)
