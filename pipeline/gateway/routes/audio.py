"""``POST /v1/audio/transcriptions``: OpenAI's transcription API over tuwen's speech stage (issue 28).

The multipart body (``file``, ``model``, optional ``language``, ``prompt``, ``response_format``,
``temperature``) becomes one job of the speech stage alone (``JobRequest.transcribe_only``): its audio
decoded and checked as any spoken question (the bad-audio codes), stored for the key's owner, and
transcribed on ``TUWEN_SPEECH_QUEUE``. The answer comes once the job ends, within
``TUWEN_GATEWAY_CHAT_TIMEOUT_S``: ``json`` ``{"text"}``, ``text`` (the transcript as ``text/plain``) or
``verbose_json`` (with ``duration``, ``language`` and one segment). The job id comes in ``X-Tuwen-Job-Id``.
"""

# No `from __future__ import annotations`: FastAPI reads these signatures at import time.
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from tuwen.pipeline.errors import InvalidInput
from tuwen.pipeline.gateway.chat_jobs import failure, outcome
from tuwen.pipeline.gateway.deps import State, Submitter
from tuwen.pipeline.gateway.openai_errors import OpenAIRoute
from tuwen.pipeline.gateway.served import hears
from tuwen.pipeline.gateway.state import GatewayState
from tuwen.pipeline.openai_objects import error_responses
from tuwen.pipeline.schema import JobResult, JobStatus

router = APIRouter(prefix="/v1/audio", tags=["chat"], route_class=OpenAIRoute)

AUDIO_PATH = "/v1/audio/transcriptions"
#: The form fields OpenAI's SDK may send; ``timestamp_granularities[]`` and ``include[]`` are its array fields.
FIELDS = frozenset({"file", "model", "language", "prompt", "response_format", "temperature", "stream",
                    "timestamp_granularities[]", "include[]", "chunking_strategy"})
FORMATS = ("json", "text", "verbose_json")


async def read_form(request: Request) -> tuple[bytes, dict[str, str]]:
    """The audio file and the text fields; unknown or repeated fields and a file sent as text are refused."""
    form = await request.form(max_files=2, max_fields=16)
    try:
        names = [name for name, _ in form.multi_items()]
        unknown = sorted(set(names) - FIELDS)
        if unknown:
            raise InvalidInput(f"unknown field(s): {', '.join(unknown)}", code="invalid_params", param=unknown[0])
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise InvalidInput("send the audio as the multipart file part `file`", code="empty_audio", param="file")
        data = await file.read()
        fields = {k: v for k, v in form.items() if k != "file" and isinstance(v, str)}
    finally:
        await form.close()
    return data, fields


def queue_transcription(state: GatewayState, owner: str, data: bytes) -> str:
    request = state.client.transcription(data, owner=owner)
    state.client.enqueue(request)
    return request.id


@router.post("/transcriptions", summary="语音转文字 · OpenAI-compatible transcription (the speech stage)",
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "the transcript: json, text or verbose_json"},
                        **error_responses(400, 401, 413, 429, 500, 503, 504)})
async def create_transcription(key: Submitter, state: State, request: Request) -> Any:
    """A spoken question (WAV, FLAC, Ogg, MP3) in, its transcript out; `model` is accepted whatever it names
    (the live speech worker's model transcribes), `stream` and timestamps are not supported."""
    data, fields = await read_form(request)
    response_format = fields.get("response_format") or "json"
    if response_format not in FORMATS:
        raise InvalidInput(f"response_format {response_format!r} is not supported; use {', '.join(FORMATS)}",
                           code="unsupported_parameter", param="response_format")
    if fields.get("stream", "false").lower() == "true":
        raise InvalidInput("streamed transcriptions are not supported", code="unsupported_parameter", param="stream")
    await run_in_threadpool(state.client.check_audio, data)  # bad audio is refused as such, worker or not
    await run_in_threadpool(hears, state)
    job_id = await run_in_threadpool(queue_transcription, state, key.owner, data)
    timeout = state.gw.gateway_chat_timeout_s
    result = await outcome(state, job_id, key.owner, timeout)
    if result.status != JobStatus.succeeded:
        raise failure(job_id, result, timeout)
    headers = {"X-Tuwen-Job-Id": job_id}
    text = result.transcript or ""
    if response_format == "text":
        return PlainTextResponse(text, headers=headers)
    body: dict[str, Any] = {"text": text}
    if response_format == "verbose_json":
        body = verbose(result, fields.get("language") or "zh")
    return JSONResponse(body, headers=headers)


def verbose(result: JobResult, language: str) -> dict[str, Any]:
    """OpenAI's ``verbose_json``: the transcript as one segment over the whole clip, and the stage's timings."""
    seconds = (result.timings.get("audio_ms") or 0.0) / 1000
    text = result.transcript or ""
    return {"task": "transcribe", "language": language, "duration": seconds, "text": text,
            "segments": [{"id": 0, "seek": 0, "start": 0.0, "end": seconds, "text": text, "tokens": [],
                          "temperature": 0.0, "avg_logprob": 0.0, "compression_ratio": 1.0, "no_speech_prob": 0.0}],
            "usage": {"type": "duration", "seconds": round(seconds, 3)},
            "x_tuwen": {"job_id": result.id, "model_id": result.model_id, "timings": result.timings}}
