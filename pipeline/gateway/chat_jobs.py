"""One chat-style request as one job, shared by the OpenAI-compatible routes (``routes.chat``,
``routes.responses``): queue it (pictures stored for the key's owner, once per ``Idempotency-Key``),
wait for its outcome (bounded), or read its text as the worker generates it. Each route only shapes
what it answers: a ``chat.completion`` and its chunks, or a ``response`` and its events.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from tuwen.pipeline.gateway.apikeys import ApiKey, job_made
from tuwen.pipeline.conversation import StoredImage, Turn, prepare_conversation
from tuwen.pipeline.gateway import sse
from tuwen.pipeline.gateway.openai_errors import NO_RETRY, OpenAIError, as_openai, openai_error
from tuwen.pipeline.gateway.openai_request import ChatRequest, Part, PictureRef
from tuwen.pipeline.gateway.parts import PagePicture, Spoken
from tuwen.pipeline.gateway.pdf_pages import pictures_in, with_pages
from tuwen.pipeline.gateway.pictures import picture
from tuwen.pipeline.gateway.served import hears
from tuwen.pipeline.gateway.state import GatewayState
from tuwen.pipeline.gateway.tool_calls import refuse_auto
from tuwen.pipeline.schema import ErrorInfo, JobResult, JobStatus, Priority
from tuwen.pipeline.streams import Delta
from tuwen.pipeline.watch import until_ended

log = logging.getLogger("tuwen.gateway")

#: A stream with nothing to say for this long sends a ``: keep-alive`` comment.
KEEP_ALIVE_S = 15.0
#: What ``json.dumps`` leaves as it is but ``str.splitlines`` (and log readers) take as a line's end.
_LINE_ENDS = {ord(c): f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"}


# -- submitting -----------------------------------------------------------------------------------------
def fetched_turns(state: GatewayState, chat: ChatRequest, queue: str, owner: str) -> list[Turn]:
    """The conversation with its pictures fetched and its PDFs read into pages (``pdf_pages``; not yet
    stored), once the model served on ``queue`` is known to take that many (``too_many_images`` before
    anything is fetched), and to serve its tool choice."""
    if chat.auto_tools:
        refuse_auto(state.census.renders_tools(queue))
    turns = with_pages(state, owner, chat.turns, queue)
    state.census.check_pictures(queue, pictures_in(turns))
    limit = state.settings.max_image_bytes
    return [Turn(t.role.value, [part(state, p, limit) for p in t.parts]) for t in turns]


def part(state: GatewayState, p: Part, limit: int) -> str | bytes | StoredImage | Spoken:
    """A part as ``prepare_conversation`` takes it: text, a picture's bytes, a stored picture's key, or a
    spoken question (its audio, checked when the job is prepared)."""
    if isinstance(p, PictureRef):
        return picture(p.url, p.param, max_bytes=limit, remote=state.pictures)
    if isinstance(p, PagePicture):
        return p.png
    if isinstance(p, Spoken):
        return p
    assert isinstance(p, str), p  # with_pages left no FileRef
    return p


def queue_job(state: GatewayState, key: ApiKey, chat: ChatRequest, job_id: str | None = None) -> str:
    """Get the pictures, store them for the key's owner and queue the job (under ``job_id`` if given);
    returns its id."""
    spoken = [p for t in chat.turns for p in t.parts if isinstance(p, Spoken)]
    for each in spoken:  # bad audio is refused as such (400), whether a speech worker is live or not
        state.client.check_audio(each.data)
    if spoken:
        hears(state)
    turns = fetched_turns(state, chat, state.settings.interactive_queue, key.owner)
    job = prepare_conversation(state.client, turns, chat.params, owner=key.owner, priority=Priority.interactive,
                               stream=chat.stream, job_id=job_id)
    state.client.enqueue(job)
    state.metrics.submitted.labels(Priority.interactive.value).inc()
    return job.id


def accept(state: GatewayState, key: ApiKey, chat: ChatRequest, idempotency_key: str | None) -> tuple[str, bool]:
    """The job of this request, queued once per ``Idempotency-Key``: ``(job id, replayed)``."""
    return state.idempotency.once(key.owner, idempotency_key, chat.fingerprint,
                                  lambda job_id: queue_job(state, key, chat, job_id),
                                  lambda job_id: job_made(state.client, job_id))


def accepted(state: GatewayState, key: ApiKey, what: str, job_id: str, replayed: bool, user: str | None,
             metadata: dict[str, str] | None, ignored: tuple[str, ...]) -> dict[str, str]:
    """Log an accepted chat or Responses request on one line (its ``user`` and ``metadata`` escaped: no value
    can start a line of its own), and return its answer's headers: the job id, a replay, ignored parameters."""
    log.info("%s job %s of %s: user=%s metadata=%s%s", what, job_id, key.owner, one_line(user), one_line(metadata),
             " (replayed)" if replayed else "")
    return {"X-Tuwen-Job-Id": job_id, **({"Idempotent-Replayed": "true"} if replayed else {}),
            **state.ignored(key, ignored)}


#: A chat answer whose conversation carried no picture says so in this header: tuwen's models are trained on
#: questions about pictures (the demo model on nothing else), so a text-only question is answered from its words
#: alone, often as if about a picture that is not there (docs/openai.md, "Pictures").
WARNING_HEADER = "Tuwen-Warning"
NO_PICTURE = "no_picture: the conversation has no picture; the model answers questions about pictures"


def warnings_of(chat: ChatRequest) -> dict[str, str]:
    """The ``Tuwen-Warning`` header of a chat request, if it has one."""
    return {} if chat.pictures else {WARNING_HEADER: NO_PICTURE}


def one_line(value: Any) -> str:
    """``value`` as JSON for the log, on one line whatever it holds: CR, LF and every other character that
    ends a line are escaped (a ``user`` of ``"a\\r\\nFORGED …"`` cannot start a log line of its own)."""
    return json.dumps(value, ensure_ascii=False).translate(_LINE_ENDS)


# -- the outcome --------------------------------------------------------------------------------------------
async def outcome(state: GatewayState, job_id: str, owner: str, timeout: float) -> JobResult:
    """The job once it ended, or as it is when ``timeout`` passed."""
    return await until_ended(lambda: state.aclient.get(job_id, owner), lambda s: state.waiters.wait(job_id, s),
                             timeout)


def failure(job_id: str, result: JobResult | None, timeout: float) -> OpenAIError:
    """Why a queued job gave no answer, as an error that names the job (and tells the SDK not to retry:
    a retry would queue the same question again)."""
    if result is None or not result.status.terminal and result.status != JobStatus.unknown:
        return openai_error("timeout", f"no answer within {timeout:g}s; the job goes on: read its answer with "
                            f"GET /v1/jobs/{job_id}", headers=NO_RETRY, job_id=job_id)
    if result.status == JobStatus.unknown:
        return openai_error("not_found", f"job {job_id} is gone (deleted or expired)", headers=NO_RETRY,
                            job_id=job_id)
    error = result.error or ErrorInfo.of("cancelled" if result.status == JobStatus.cancelled else "internal_error",
                                         f"the job {result.status.value}")
    return openai_error(error.code, error.message, headers=NO_RETRY, job_id=job_id)


# -- streaming ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ended:
    """How a streamed job ended: ``result`` as it was last seen (None: a timeout, or Redis went away) and,
    unless it succeeded, ``error``, the error to tell the client."""

    result: JobResult | None
    error: OpenAIError | None = None


async def job_text(state: GatewayState, job_id: str, owner: str) -> AsyncGenerator[str | None | Ended, None]:
    """The job's answer as the worker generates it: pieces of text, ``None`` when ``KEEP_ALIVE_S`` passed
    without one (send a keep-alive), and last an ``Ended``. Bounded by ``TUWEN_GATEWAY_CHAT_TIMEOUT_S``."""
    async with aclosing(job_deltas(state, job_id, owner)) as deltas:
        async for delta in deltas:
            yield delta.text if isinstance(delta, Delta) else delta


async def job_deltas(state: GatewayState, job_id: str, owner: str) -> AsyncGenerator[Delta | None | Ended, None]:
    """``job_text`` with each piece whole: its choice's index and its tokens' log probabilities."""
    timeout = state.gw.gateway_chat_timeout_s
    result: JobResult | None = None
    try:
        async with aclosing(sse.with_heartbeats(state.aclient.stream(job_id, timeout, owner), KEEP_ALIVE_S)) as deltas:
            async for delta in deltas:
                if delta is None:
                    yield None
                    continue
                if delta.piece:
                    yield delta
                if delta.finish_reason is not None or delta.result is not None or not delta.piece:
                    result = delta.result
                    break
    except Exception as exc:  # noqa: BLE001 - e.g. Redis went away mid-stream: say so, in the stream
        yield Ended(None, as_openai(exc))
        return
    succeeded = result is not None and result.status == JobStatus.succeeded
    yield Ended(result, None if succeeded else failure(job_id, result, timeout))
