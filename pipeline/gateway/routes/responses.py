"""``/v1/responses``: OpenAI's Responses API over tuwen's queue (walk-through: docs/openai.md).

``POST`` is one job, as a chat completion is (``chat_jobs``: pictures stored for the caller's owner, keys,
rate limits, ``Idempotency-Key``, a bounded wait whose timeout names the job): ``instructions`` and
``input`` in, a ``response`` out, whole or as OpenAI's stream of events. A response is stored unless
``store: false`` (``responses_store``): ``GET`` reads it as its job stands now, ``DELETE`` removes it, and
``previous_response_id`` continues its conversation without sending its pictures again. Everything is per
owner: another owner's response is a 404 worded as for one that never existed.
"""

# No `from __future__ import annotations`: FastAPI reads these signatures at import time.
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from tuwen.pipeline.gateway.apikeys import ApiKey
from tuwen.pipeline.gateway import sse
from tuwen.pipeline.gateway.chat_jobs import Ended, accept, accepted, failure, job_text, outcome
from tuwen.pipeline.gateway.deps import IdempotencyKey, Reader, State, Submitter, charge
from tuwen.pipeline.gateway.openai_errors import OpenAIRoute
from tuwen.pipeline.gateway.responses_request import ResponsesCreate, ResponsesRequest, parse_responses
from tuwen.pipeline.gateway.responses_store import StoredResponse, items_of, not_found
from tuwen.pipeline.gateway.openapi import json_body
from tuwen.pipeline.gateway.pdf_pages import with_pages
from tuwen.pipeline.gateway.served import served_model
from tuwen.pipeline.gateway.state import GatewayState
from tuwen.pipeline.openai_objects import error_responses
from tuwen.pipeline.responses_objects import (
    EXAMPLE_RESPONSE_ID, Events, ResponseDeleted, ResponseFacts, ResponseObject, response_object)
from tuwen.pipeline.schema import JobStatus

router = APIRouter(prefix="/v1/responses", tags=["chat"], route_class=OpenAIRoute)
ResponseId = Annotated[str, Path(max_length=80, examples=[EXAMPLE_RESPONSE_ID])]


def read_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The documented errors of a stored response's routes: a 404 is a response that is not there."""
    errors = error_responses(*statuses)
    errors[404] = {**errors[404], "description": "no such stored response (or not the caller's)"}
    return errors


# -- submitting -----------------------------------------------------------------------------------------
def facts_of(ask: ResponsesRequest, model: str) -> ResponseFacts:
    return ResponseFacts(created_at=int(time.time()), model=model, instructions=ask.instructions,
                         previous_response_id=ask.previous_response_id, store=ask.store,
                         temperature=ask.params.temperature, top_p=ask.params.top_p,
                         max_output_tokens=ask.max_output_tokens, metadata=ask.metadata or {},
                         truncation=ask.truncation, user=ask.user)


def begin(state: GatewayState, key: ApiKey, ask: ResponsesRequest, facts: ResponseFacts,
          idempotency_key: str | None) -> tuple[str, bool]:
    """Queue the job (after the conversation it continues, if any) and store the response unless told not
    to: ``(job id, replayed)``."""
    history = state.responses.history(ask.previous_response_id, key.owner) if ask.previous_response_id else ()
    ask = replace(ask, turns=with_pages(state, key.owner, ask.turns, state.settings.interactive_queue))
    job_id, replayed = accept(state, key, ask.as_chat(history), idempotency_key)
    job = state.client.jobs.request(job_id) if ask.store else None
    if job is not None:  # its pictures by the keys they were stored under
        state.responses.save(key.owner, StoredResponse(job_id=job_id, facts=facts,
                                                       conversation=items_of(history + ask.turns, job)))
    return job_id, replayed


# -- streaming ------------------------------------------------------------------------------------------------
async def relay(state: GatewayState, job_id: str, owner: str, facts: ResponseFacts) -> AsyncIterator[str]:
    """The job's answer as OpenAI's events: ``response.created``, ``response.in_progress``, the message and
    its text part opened, a ``response.output_text.delta`` per piece, the text, part and message closed, then
    ``response.completed`` (or ``incomplete``: out of tokens); a failed job ends with ``response.failed``,
    a timeout (the job goes on) or an outage with an ``error`` event."""
    events = Events()
    started = response_object(job_id, facts, None)
    yield events.response("response.created", started)
    yield events.response("response.in_progress", started)
    opened = False
    async with aclosing(job_text(state, job_id, owner)) as pieces:
        async for piece in pieces:
            if piece is None:
                yield sse.KEEP_ALIVE
            elif isinstance(piece, str):
                if not opened:
                    for event in events.opened(job_id):
                        yield event
                    opened = True
                yield events.delta(job_id, piece)
            else:
                for event in await ending(state, events, job_id, facts, piece, opened):
                    yield event


async def ending(state: GatewayState, events: Events, job_id: str, facts: ResponseFacts, end: Ended,
                 opened: bool) -> list[str]:
    result = end.result
    if result is None or not result.status.terminal:  # a timeout (the job goes on), gone, or an outage
        error = end.error or failure(job_id, result, state.gw.gateway_chat_timeout_s)
        return [events("error", code=error.code, message=error.message, param=error.param)]
    if facts.store:
        await run_in_threadpool(state.responses.finish, job_id, result)
    done = response_object(job_id, facts, result)
    if result.status != JobStatus.succeeded:
        return [events.response("response.failed", done)]
    return ([] if opened else events.opened(job_id)) + events.closed(job_id, done)


# -- the routes -----------------------------------------------------------------------------------------------
@router.post("", response_model=ResponseObject, openapi_extra=json_body(ResponsesCreate),
             summary="回答 · OpenAI-compatible response (Responses API; pictures as input_image parts)",
             responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                              "description": "a response, or with `stream: true` OpenAI's Server-Sent Events"},
                        **error_responses(400, 401, 404, 409, 413, 429, 500, 503, 504)})
async def create_response(key: Submitter, state: State, request: Request,
                          idempotency_key: IdempotencyKey = None) -> Any:
    """`instructions` and `input` (text and pictures: `data:` URLs, `tuwen://images/<sha256>`, http(s) at
    public addresses) in, a `response` out, whole or streamed; stored unless `store: false`, continued with
    `previous_response_id`. Errors are OpenAI's; the tuwen job id comes in the `X-Tuwen-Job-Id` header, the
    parameters tuwen ignored in `tuwen-ignored-params`."""
    ask = parse_responses(await request.body())
    facts = facts_of(ask, await run_in_threadpool(served_model, state, ask.model))
    job_id, replayed = await run_in_threadpool(begin, state, key, ask, facts, idempotency_key)
    headers = accepted(state, key, "responses", job_id, replayed, ask.user, ask.metadata, ask.ignored)
    if ask.stream:
        return StreamingResponse(relay(state, job_id, key.owner, facts), media_type=sse.MEDIA_TYPE,
                                 headers={**sse.HEADERS, **headers})
    timeout = state.gw.gateway_chat_timeout_s
    result = await outcome(state, job_id, key.owner, timeout)
    if ask.store:
        await run_in_threadpool(state.responses.finish, job_id, result)
    if result.status != JobStatus.succeeded:
        raise failure(job_id, result, timeout)
    return JSONResponse(response_object(job_id, facts, result).model_dump(mode="json"), headers=headers)


def owned(state: GatewayState, key: ApiKey, response_id: str) -> StoredResponse:
    """The caller's stored response, its job as it is now; or the one 404 (a miss counts against the rate
    limit, as for batches)."""
    stored = state.responses.get(response_id, key.owner)
    if stored is None:
        charge(state, key)
        raise not_found(response_id)
    return stored


@router.get("/{response_id}", response_model=ResponseObject,
            summary="一个回答 · a stored response, its status as of now", responses=read_errors(400, 401, 404, 429, 503))
async def get_response(key: Reader, state: State, response_id: ResponseId) -> ResponseObject:
    stored = await run_in_threadpool(owned, state, key, response_id)
    return response_object(stored.job_id, stored.facts, stored.result)


@router.delete("/{response_id}", response_model=ResponseDeleted,
               summary="删除回答 · delete a stored response (its job stays: DELETE /v1/jobs/{id})",
               responses=read_errors(400, 401, 404, 429, 503))
def delete_response(key: Submitter, state: State, response_id: ResponseId) -> ResponseDeleted:
    if not state.responses.delete(response_id, key.owner):
        raise not_found(response_id)
    return ResponseDeleted(id=response_id)
