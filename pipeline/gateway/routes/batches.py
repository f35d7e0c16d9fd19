"""``/v1/batches``: OpenAI's Batch API over tuwen's bulks (walk-through: docs/openai.md).

``POST`` makes a batch of an uploaded file (``input_file_id``; ``endpoint`` ``/v1/chat/completions`` and
``completion_window`` ``24h``, the only ones; ``metadata``; tuwen's ``callback_url``) and answers at once,
``validating``: the gateway's ``BatchKeeper`` validates, submits and finishes it in the background. ``GET``
lists the caller's batches newest first (``after``, ``limit``), bulks of ``tuwen bulk submit`` included;
``GET /{id}`` reads one, ``POST /{id}/cancel`` cancels it (``cancelling``, then ``cancelled`` with the
partial output). Another owner's batch is a 404, worded as a missing one.

The router's lifespan builds the keeper (``app.state.batches``) and runs it while the app runs.
"""

# No `from __future__ import annotations`: FastAPI reads these signatures at import time.
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from tuwen.pipeline.gateway.apikeys import ApiKey
from tuwen.pipeline.bulk.model import BATCH_ID_PREFIX, Bulk
from tuwen.pipeline.errors import NotFound
from tuwen.pipeline.gateway.batch_keeper import BatchKeeper, Keeper, idempotency_fingerprint, no_such_batch
from tuwen.pipeline.gateway.batch_objects import (
    BATCH_ID_PATTERN, EXAMPLE_BATCH_ID, BatchCreate, BatchList, BatchObject, error_responses, listing)
from tuwen.pipeline.gateway.deps import IdempotencyKey, Reader, State, Submitter, charge
from tuwen.pipeline.gateway.openai_errors import OpenAIRoute, openai_error, param_of
from tuwen.pipeline.gateway.openai_request import json_object, printable_name
from tuwen.pipeline.gateway.openapi import json_body
from tuwen.pipeline.gateway.state import GatewayState


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The Batch API's keeper runs while the app runs (inside the app's own lifespan)."""
    keeper = BatchKeeper(app.state.gateway)
    app.state.batches = keeper
    keeper.start()
    try:
        yield
    finally:
        await run_in_threadpool(keeper.stop)


router = APIRouter(prefix="/v1/batches", tags=["batches"], route_class=OpenAIRoute, lifespan=lifespan)
_BATCH_ID = re.compile(BATCH_ID_PATTERN)
BatchId = Annotated[str, Path(max_length=80, examples=[EXAMPLE_BATCH_ID])]


class BatchQuery(BaseModel):
    """The query of ``GET /v1/batches``; another parameter is refused, not ignored."""

    model_config = ConfigDict(extra="forbid")
    #: A batch id: the page after it.
    after: str | None = Field(None, pattern=BATCH_ID_PATTERN, max_length=80)
    limit: int = Field(20, ge=1, le=100)


def parse_create(body: bytes) -> BatchCreate:
    """The body of ``POST /v1/batches``, or a 400 whose ``param`` names the field at fault."""
    data = json_object(body)
    for name in data:
        if name not in BatchCreate.model_fields:
            raise openai_error("invalid_params", f"Unrecognized request argument supplied: {printable_name(name)}",
                               param=printable_name(name))
    try:
        return BatchCreate.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = param_of(tuple(first["loc"]))
        raise openai_error("invalid_params", f"{param}: {first['msg']}" if param else str(first["msg"]),
                           param=param) from None


def owned_batch(state: GatewayState, keeper: BatchKeeper, key: ApiKey, batch_id: str) -> Bulk:
    """The caller's batch, refreshed; or the one 404 (a miss counts against the rate limit)."""
    try:
        if not _BATCH_ID.fullmatch(batch_id):
            raise no_such_batch(batch_id)
        return keeper.get(batch_id, key.owner)
    except NotFound:
        charge(state, key)
        raise


def accept(state: GatewayState, keeper: BatchKeeper, key: ApiKey, body: BatchCreate, fingerprint: str,
           idempotency_key: str | None, response: Response) -> Bulk:
    """The batch of this request, made once per ``Idempotency-Key``."""
    bulk_id, replayed = state.idempotency.once(
        key.owner, idempotency_key, fingerprint, lambda reserved: keeper.create(key.owner, body, reserved).id,
        lambda reserved: keeper.store.records.find(reserved) is not None, prefix=BATCH_ID_PREFIX)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return keeper.get(bulk_id, key.owner)


@router.post("", response_model=BatchObject, openapi_extra=json_body(BatchCreate),
             summary="创建批处理 · create a batch of an uploaded file (answered at once, validating)",
             responses=error_responses(400, 401, 404, 409, 429, 503))
async def create_batch(key: Submitter, state: State, keeper: Keeper, request: Request, response: Response,
                       idempotency_key: IdempotencyKey = None) -> BatchObject:
    """`input_file_id` (purpose batch), `endpoint` `/v1/chat/completions`, `completion_window` `24h`,
    optional `metadata`, and tuwen's `callback_url` (the SDK's `extra_body`). Validation and the lines'
    submission follow in the background; poll `GET /v1/batches/{id}` or wait for the webhook."""
    raw = await request.body()
    body = parse_create(raw)
    bulk = await run_in_threadpool(accept, state, keeper, key, body, idempotency_fingerprint(raw), idempotency_key,
                                   response)
    return BatchObject.of(bulk)


@router.get("", response_model=BatchList,
            summary="批处理列表 · the caller's batches, newest first", responses=error_responses(400, 401, 503))
async def list_batches(key: Reader, keeper: Keeper, query: Annotated[BatchQuery, Query()]) -> BatchList:
    """The caller's batches and bulks (``tuwen bulk submit``'s too), as stored (``GET /{id}`` refreshes one)."""
    bulks, more = await run_in_threadpool(keeper.page, key.owner, query.limit, query.after)
    return BatchList(**listing([BatchObject.of(b) for b in bulks], more))


@router.get("/{batch_id}", response_model=BatchObject,
            summary="一个批处理 · one batch, its counts as of now", responses=error_responses(400, 401, 404, 429, 503))
async def get_batch(key: Reader, state: State, keeper: Keeper, batch_id: BatchId) -> BatchObject:
    return BatchObject.of(await run_in_threadpool(owned_batch, state, keeper, key, batch_id))


@router.post("/{batch_id}/cancel", response_model=BatchObject,
             summary="取消批处理 · cancel a batch (cancelling, then cancelled; finished lines are kept)",
             responses=error_responses(400, 401, 404, 409, 429, 503))
def cancel_batch(key: Submitter, state: State, keeper: Keeper, batch_id: BatchId) -> BatchObject:
    """Queued lines are cancelled, running ones finish: `cancelling` until they have, then `cancelled`, its
    output file holding the lines that finished. Again: the same answer. An ended batch: 409 `batch_ended`."""
    owned_batch(state, keeper, key, batch_id)
    return BatchObject.of(keeper.cancel(batch_id, key.owner))  # an ended batch: BatchEnded, 409 batch_ended
