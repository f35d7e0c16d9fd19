"""``/v1/jobs``: submit a picture and a question, read a job (long-poll), cancel it."""

# No `from __future__ import annotations`: FastAPI reads these signatures at import time.
import hashlib
import json
import time
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from tuwen.pipeline.gateway.apikeys import ApiKey, job_made
from tuwen.pipeline.app import route
from tuwen.pipeline.errors import Forbidden, NotFound
from tuwen.pipeline.gateway.deps import IdempotencyKey, JobId, Reader, State, Submitter, charge
from tuwen.pipeline.gateway.errors import ApiError, no_such_job
from tuwen.pipeline.gateway.intake import read_submission
from tuwen.pipeline.gateway.models import JobAccepted, SubmitForm, error_responses, submit_body
from tuwen.pipeline.gateway.state import GatewayState
from tuwen.pipeline.schema import JobResult, JobStatus, JobView
from tuwen.pipeline.gateway.webhooks import check_callback_url
from tuwen.pipeline.watch import until_ended

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


# -- reading ------------------------------------------------------------------------------------------------
def lookup(state: GatewayState, job_id: str, owner: str) -> JobResult:
    """The owner's job, or the one 404 (for a job that does not exist and for another owner's)."""
    try:
        result = state.client.get(job_id, owner)
    except (NotFound, Forbidden):
        raise no_such_job(job_id) from None
    if result.status == JobStatus.unknown:
        raise no_such_job(job_id)
    return result


def view(state: GatewayState, job_id: str, result: JobResult, *, cancel_requested: bool = False,
         warning: str | None = None) -> JobView:
    if result.status == JobStatus.unknown:
        raise no_such_job(job_id)
    flagged = {"cancel_requested": True} if cancel_requested else {}
    return JobView.of(result, webhook=state.hooks.state(job_id), warning=warning, **flagged)


async def poll(state: GatewayState, key: ApiKey, job_id: str, wait: float) -> JobResult:
    """The job now, or once it ends within ``wait`` seconds (capped by ``gateway_max_wait_s``)."""

    async def read() -> JobResult:
        try:
            return await run_in_threadpool(lookup, state, job_id, key.owner)
        except ApiError:
            await run_in_threadpool(charge, state, key)  # a miss counts: guessing ids stays rate-limited
            raise

    return await until_ended(read, lambda s: state.waiters.wait(job_id, s), min(wait, state.gw.gateway_max_wait_s))


def nobody_to_answer(state: GatewayState, job_id: str) -> str | None:
    """Why a job that is still waiting may get no answer: no live worker consumes its queue."""
    job = state.client.jobs.request(job_id)
    return None if job is None else state.census.missing(route(state.settings, job))


# -- submitting ---------------------------------------------------------------------------------------------
def enqueue(state: GatewayState, key: ApiKey, data: bytes, form: SubmitForm, job_id: str | None = None,
            audio: bytes | None = None) -> str:
    """Store the picture (and the spoken question), register the webhook and queue the job (under ``job_id`` if
    given); returns its id."""
    question = (form.question or None) if audio is not None else (form.question or "")
    request = state.client.prepare(data, question, audio=audio, max_new_tokens=form.max_new_tokens,
                                   priority=form.priority, owner=key.owner, job_id=job_id)
    if form.callback_url is not None:
        state.hooks.register(request.id, form.callback_url)
    try:
        state.client.enqueue(request)
    except BaseException:
        state.hooks.forget(request.id)
        raise
    return request.id


def accept(state: GatewayState, key: ApiKey, data: bytes, form: SubmitForm, idempotency_key: str | None,
           response: Response, audio: bytes | None = None) -> JobAccepted:
    """Queue the job once per ``Idempotency-Key``: a retry gets the first job (``Idempotent-Replayed``)."""
    if form.callback_url is not None:
        check_callback_url(form.callback_url, state.gw)
    fingerprint = hashlib.sha256(data + json.dumps(
        [form.question, form.priority.value, form.max_new_tokens, form.callback_url]).encode()
        + (hashlib.sha256(audio).digest() if audio is not None else b"")).hexdigest()
    job_id, replayed = state.idempotency.once(key.owner, idempotency_key, fingerprint,
                                              lambda reserved: enqueue(state, key, data, form, reserved, audio),
                                              lambda reserved: job_made(state.client, reserved))
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
        response.headers["Location"] = f"/v1/jobs/{job_id}"
        return JobAccepted(id=job_id, status=state.client.get(job_id, key.owner).status)
    state.metrics.submitted.labels(form.priority.value).inc()
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    return JobAccepted(id=job_id, status=JobStatus.queued)


# -- routes -------------------------------------------------------------------------------------------------
@router.post("", status_code=202, response_model=JobAccepted, openapi_extra=submit_body(),
             summary="提交图片和问题 · submit a picture and a question",
             responses=error_responses(400, 401, 409, 413, 422, 429, 503))
async def submit(key: Submitter, state: State, request: Request, response: Response,
                 idempotency_key: IdempotencyKey = None) -> JobAccepted:
    """Stores the picture, queues the job and answers at once with its id (202). The API key is
    checked before the body is read; fields: `image` (file), `question`, optional `priority`,
    `max_new_tokens`, `callback_url`."""
    data, audio, form = await read_submission(request)
    return await run_in_threadpool(accept, state, key, data, form, idempotency_key, response, audio)


@router.get("/{job_id}", response_model=JobView, response_model_exclude_none=True,
            summary="查询任务 · a job's status and answer", responses=error_responses(401, 404, 422, 429, 503))
async def get_job(key: Reader, state: State, job_id: JobId,
                  wait: Annotated[float, Query(ge=0, description="long-poll: wait up to N seconds for the job "
                                                                 "to end (capped by the server)")] = 0) -> JobView:
    """The job's state now, or when it ends within ``wait`` seconds. Reading one's own job is not
    counted against the rate limit (polls, long-polls); a read that finds no job is."""
    result = await poll(state, key, job_id, wait)
    flagged = result.status == JobStatus.running and await run_in_threadpool(
        state.client.jobs.cancel_requested, job_id)
    warning = None
    if wait > 0 and not result.status.terminal:
        warning = await run_in_threadpool(nobody_to_answer, state, job_id)
    return await run_in_threadpool(lambda: view(state, job_id, result, cancel_requested=flagged, warning=warning))


@router.delete("/{job_id}", response_model=JobView, response_model_exclude_none=True,
               summary="取消任务 · cancel a queued job", responses={
                   202: {"model": JobView, "description": "running: it finishes, marked cancel_requested"},
                   **error_responses(401, 404, 409, 422, 429, 503)})
def cancel_job(key: Submitter, state: State, job_id: JobId, response: Response) -> JobView:
    """A queued job is cancelled and never runs (200); cancelling it again answers the same (200), so
    a retried DELETE is safe; a running one finishes (202, `cancel_requested`); one that succeeded
    or failed: 409 `already_finished`."""
    current = lookup(state, job_id, key.owner)
    result = current if current.status == JobStatus.cancelled else state.client.cancel(job_id, key.owner)
    if result.status in (JobStatus.succeeded, JobStatus.failed):
        raise ApiError("already_finished", f"the job already {result.status.value}")
    if result.status == JobStatus.running:
        response.status_code = 202
        return view(state, job_id, result, cancel_requested=True)
    return view(state, job_id, result)
