"""Where spoken questions come in over HTTP (issue 28, part 4), driven by the official ``openai`` SDK and httpx:
``POST /v1/audio/transcriptions``, ``input_audio`` parts in chat completions and responses, and ``POST /v1/jobs``
with an ``audio`` file part. A real gateway, a real speech worker and a real picture worker. With the untrained
speech model the transcripts are noise: these check the shapes, the one job id through both stages, the codes
and that nothing is stored for bad audio; the facts of the answers wait for the trained checkpoint."""

from __future__ import annotations

import base64
from collections.abc import Callable

import numpy as np
import openai
import pytest

from tuwen.pipeline.client import Client
from tuwen.pipeline.schema import JobStatus, StageName
from tuwen.pipeline.settings import Settings
from tests.gateway.conftest import Gateway
from tests.gateway.test_openai import data_url, sdk
from tests.reliability.test_bad_audio import REFUSED
from tests.reliability.test_bad_input import state
from tests.workers.test_speech import seconds, spoken
from tuwen.workers.bench.process import WorkerProcess
from tuwen.workers.demo.samples import load_samples
from tuwen.workers.demo.speech.synth import wav_bytes

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_transcriptions_in_each_response_format(gateway: Gateway, speech_worker: WorkerProcess,
                                                new_key: Callable[..., str]) -> None:
    """Given a speech worker, when the SDK transcribes a WAV as json, text and verbose_json, then each answer has
    the same transcript in its format, and verbose_json says how long the clip is."""
    client = sdk(gateway, new_key())
    audio = spoken(seed=11)
    as_json = client.audio.transcriptions.create(model="whisper-1", file=("q.wav", audio, "audio/wav"))
    as_text = client.audio.transcriptions.create(model="whisper-1", file=("q.wav", audio, "audio/wav"),
                                                 response_format="text")
    verbose = client.audio.transcriptions.create(model="whisper-1", file=("q.wav", audio, "audio/wav"),
                                                 response_format="verbose_json")
    assert as_json.text and as_json.text == as_text.strip() == verbose.text
    assert verbose.duration == pytest.approx(seconds(audio), abs=0.01) and verbose.language == "zh"


def test_bad_audio_gets_its_code_over_http_and_nothing_is_stored(gateway: Gateway, speech_worker: WorkerProcess,
                                                                  new_key: Callable[..., str], client: Client) -> None:
    """The bad-audio corpus through the SDK: a 400 with each case's code (413 past the body limit), nothing
    stored or queued."""
    sdk_client = sdk(gateway, new_key())
    before = state(client, gateway.settings.speech_queue)
    for name, (build, code) in REFUSED.items():
        with pytest.raises(openai.APIStatusError) as info:
            sdk_client.audio.transcriptions.create(model="whisper-1", file=("q.wav", build(), "audio/wav"))
        body = info.value.body if isinstance(info.value.body, dict) else {}
        if code == "audio_too_large":  # the body is refused as it streams in, past TUWEN_MAX_AUDIO_BYTES + 1 MiB
            code = "request_too_large"
        assert body.get("code") == code, (name, info.value.status_code, body)
        assert info.value.status_code == (413 if code == "request_too_large" else 400), name
    assert state(client, gateway.settings.speech_queue) == before


def test_chat_with_a_picture_and_an_input_audio_part_is_one_job_through_both_stages(
        gateway: Gateway, speech_worker: WorkerProcess, worker: WorkerProcess, new_key: Callable[..., str],
        client: Client) -> None:
    """Given both workers, when the SDK sends a picture and a spoken question (wav, then flac), then a chat
    completion comes back, and its job shows the transcript and both stages."""
    sample = load_samples()[1]
    chat = sdk(gateway, new_key("spoken-chat"))
    audio = base64.b64encode(spoken(seed=2)).decode()
    reply = chat.chat.completions.with_raw_response.create(model="tuwen", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(sample.path.read_bytes())}},
        {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}]}])
    completion = reply.parse()
    assert completion.choices[0].message.content is not None
    job = client.get(reply.headers["X-Tuwen-Job-Id"])
    assert job.status == JobStatus.succeeded and job.transcript
    assert [s.name for s in job.stages or []] == [StageName.speech, StageName.picture]
    with pytest.raises(openai.BadRequestError) as info:
        chat.chat.completions.create(model="tuwen", messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": audio, "format": "aiff"}}]}])
    assert info.value.body["code"] == "unsupported_audio_format"  # type: ignore[index]


def test_jobs_take_an_audio_part_and_say_when_no_speech_worker_is_live(
        gateway: Gateway, new_key: Callable[..., str], pipeline_settings: Settings) -> None:
    """Given no speech worker on a queue, when a picture and an audio file are posted to /v1/jobs, then the job is
    queued in the speech stage, and a long-poll says that no live worker consumes the speech queue; the OpenAI
    routes refuse a spoken question with a 503 that says so."""
    from tests.gateway.conftest import gateway_settings, start_gateway

    parked = start_gateway(pipeline_settings.model_copy(update={"speech_queue": "gw-no-speech"}), gateway_settings())
    try:
        with parked.client(new_key()) as http:
            sample = load_samples()[0]
            answer = http.post("/v1/jobs", files={"image": ("p.png", sample.path.read_bytes(), "image/png"),
                                                  "audio": ("q.wav", spoken(seed=4), "audio/wav")})
            assert answer.status_code == 202, answer.text
            job = http.get(f"/v1/jobs/{answer.json()['id']}", params={"wait": 1}).json()
            assert job["status"] == "queued" and job["stage"] == "speech"
            assert "no live worker is consuming gw-no-speech" in job["warning"]
        # And a transcription or a spoken chat question is refused at once, saying what to start (the SDK's 503)
        spoken_sdk = sdk(parked, new_key())
        with pytest.raises(openai.InternalServerError) as info:
            spoken_sdk.audio.transcriptions.create(model="whisper-1", file=("q.wav", spoken(), "audio/wav"))
        assert info.value.status_code == 503 and "gw-no-speech" in info.value.message
        assert info.value.response.headers["Retry-After"] == "1"
    finally:
        parked.stop()


def test_responses_take_input_audio_and_a_follow_up_continues_from_the_transcript(
        gateway: Gateway, speech_worker: WorkerProcess, worker: WorkerProcess, new_key: Callable[..., str],
        client: Client) -> None:
    """Given both workers, when the SDK's responses.create gets a picture and a spoken question, then the response
    is answered through both stages; a follow-up with previous_response_id goes on from the stored conversation,
    the spoken part now its transcript."""
    sample = load_samples()[2]
    sdk_client = sdk(gateway, new_key("spoken-responses"))
    raw = sdk_client.responses.with_raw_response.create(model="tuwen", input=[{"role": "user", "content": [
        {"type": "input_image", "image_url": data_url(sample.path.read_bytes())},
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(spoken(seed=7)).decode(),
                                                "format": "wav"}}]}])  # type: ignore[list-item]
    first = raw.parse()
    job = client.get(raw.headers["X-Tuwen-Job-Id"])
    assert first.status == "completed" and job.transcript
    assert [s.name for s in job.stages or []] == [StageName.speech, StageName.picture]
    follow = sdk_client.responses.with_raw_response.create(model="tuwen", previous_response_id=first.id,
                                                           input=sample.question)
    assert follow.parse().status == "completed"
    again = client.jobs.request(follow.headers["X-Tuwen-Job-Id"])
    assert again is not None and job.transcript in [m.text for m in again.messages]


def test_batch_api_lines_with_input_audio(gateway: Gateway, speech_worker: WorkerProcess, worker: WorkerProcess,
                                          new_key: Callable[..., str]) -> None:
    """Given a Batch API file of three chat lines, each a picture and a spoken question, and one line whose audio is
    silence, when the batch runs, then the three are answered (through both stages) and the silent one fails with
    no_speech in the error file."""
    from tests.gateway.test_batches import jsonl, line, read_lines, upload, wait_for

    samples = load_samples()
    audio_part = lambda data: {"type": "input_audio", "input_audio": {  # noqa: E731
        "data": base64.b64encode(data).decode(), "format": "wav"}}
    lines = [line(f"spoken-{i}", [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(samples[i].path.read_bytes())}},
        audio_part(spoken(seed=20 + i, text=samples[i].question))]}]) for i in range(3)]
    silent = wav_bytes(np.zeros(16_000, np.float32))
    lines.append(line("silent", [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(samples[0].path.read_bytes())}}, audio_part(silent)]}]))
    client = sdk(gateway, new_key("spoken-batch"))
    batch = client.batches.create(input_file_id=upload(client, jsonl(lines)), endpoint="/v1/chat/completions",
                                  completion_window="24h")
    done = wait_for(client, batch.id, lambda b: b.status in ("completed", "failed", "expired", "cancelled"), 180)
    assert done.status == "completed", done
    outputs = {x["custom_id"]: x for x in read_lines(client, done.output_file_id)}
    errors = {x["custom_id"]: x for x in read_lines(client, done.error_file_id)}
    assert set(outputs) == {"spoken-0", "spoken-1", "spoken-2"} and set(errors) == {"silent"}
    assert all(x["response"]["status_code"] == 200 for x in outputs.values())
    assert errors["silent"]["response"]["body"]["error"]["code"] == "no_speech"
