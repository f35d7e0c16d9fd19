"""The OpenAI-compatible chat API, driven by the official ``openai`` SDK: a real uvicorn gateway, a real
``tuwen worker`` with the demo model, real Redis and a real S3 server. Answers, follow-ups, streaming,
models, idempotency, timeouts that name the job, and a client that goes away mid-stream."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from tuwen.pipeline import registry
from tuwen.pipeline.jobs import connect
from tuwen.pipeline.settings import Settings
from tests.gateway.conftest import Gateway, gateway_settings, start_gateway
from tuwen.workers.demo.samples import Sample, load_samples
from tuwen.workers.bench.process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

Keys = Callable[..., str]
MIB = 1024 * 1024


def data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def ask(sample: Sample, question: str | None = None) -> dict[str, Any]:
    """A user turn: the sample's picture as a data: URL, then its question (or ``question``)."""
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(sample.path.read_bytes())}},
                                        {"type": "text", "text": question or sample.question}]}


def sdk(gateway: Gateway, token: str, timeout: float = 120) -> OpenAI:
    """The official client, as a backend would build it (no retries: each test sees the first answer)."""
    return OpenAI(base_url=gateway.url + "/v1", api_key=token, max_retries=0, timeout=timeout)


def knows(answer: str, sample: Sample) -> bool:
    return all(fact in answer for fact in sample.facts)


@pytest.fixture(scope="module")
def chat_gateway(pipeline_settings: Settings, worker: WorkerProcess) -> Iterator[Gateway]:
    """The session worker's queues; remote pictures allowed from 127.0.0.1 (the tests' picture server)."""
    gw = start_gateway(pipeline_settings, gateway_settings(
        gateway_image_url_hosts=["127.0.0.1"], gateway_image_url_allow_private=True, gateway_max_chat_bytes=40 * MIB))
    yield gw
    gw.stop()


def served_model(settings: Settings) -> str:
    client = connect(settings.redis_url)
    try:
        return str(registry.wait_for_worker(client, 60, "session@tests")["model_id"])
    finally:
        client.close()


# -- answers ----------------------------------------------------------------------------------------------
def test_sync_sdk_names_the_pictures_fact(chat_gateway: Gateway, new_key: Keys) -> None:
    samples = load_samples()[:4]
    model = served_model(chat_gateway.settings)
    with sdk(chat_gateway, new_key()) as client:
        # When a backend asks about each picture with the SDK (raw response: the headers too)
        raws = [client.chat.completions.with_raw_response.create(model="tuwen", messages=[ask(s)], max_tokens=32)
                for s in samples]
        completions = [raw.parse() for raw in raws]
    # Then each is a chat.completion that names the picture's fact
    answers = [c.choices[0].message.content or "" for c in completions]
    assert sum(knows(a, s) for a, s in zip(answers, samples)) >= len(samples) - 1, list(zip(answers, samples))
    for raw, c in zip(raws, completions):
        job_id = raw.headers["x-tuwen-job-id"]
        assert c.id == f"chatcmpl-{job_id}" and c.object == "chat.completion" and c.model == model
        assert c.choices[0].message.role == "assistant" and c.choices[0].finish_reason in ("stop", "length")
        assert c.usage is not None and c.usage.prompt_tokens > 0 and c.usage.completion_tokens > 0
        assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    # And the same job, read the tuwen way, holds the same answer
    with chat_gateway.client(client.api_key) as api:
        job = api.get(f"/v1/jobs/{raws[0].headers['x-tuwen-job-id']}").json()
    assert job["status"] == "succeeded" and job["answer"] == answers[0]


def test_async_sdk_answers_concurrently(chat_gateway: Gateway, new_key: Keys) -> None:
    samples = load_samples()[4:8]
    token = new_key()

    async def main() -> list[str]:
        async with AsyncOpenAI(base_url=chat_gateway.url + "/v1", api_key=token, max_retries=0, timeout=120) as client:
            done = await asyncio.gather(*(client.chat.completions.create(
                model="tuwen", messages=[ask(s)], max_tokens=32) for s in samples))
        return [c.choices[0].message.content or "" for c in done]

    answers = asyncio.run(main())
    assert sum(knows(a, s) for a, s in zip(answers, samples)) >= len(samples) - 1, list(zip(answers, samples))


def test_a_follow_up_turn_is_about_the_first_turns_picture(chat_gateway: Gateway, new_key: Keys) -> None:
    samples = load_samples()
    with sdk(chat_gateway, new_key()) as client:
        answered = []
        for sample in samples[:4]:
            # Given a first turn about a picture, and its answer
            first = client.chat.completions.create(model="tuwen", messages=[ask(sample, "你好，请看这张图。")],
                                                   max_tokens=32)
            history = [ask(sample, "你好，请看这张图。"),
                       {"role": "assistant", "content": first.choices[0].message.content or ""}]
            # When the follow-up asks the picture's question, without sending the picture again
            follow_up = client.chat.completions.create(
                model="tuwen", messages=[*history, {"role": "user", "content": sample.question}], max_tokens=32)
            answered.append((sample, follow_up.choices[0].message.content or ""))
    # Then the answers name the facts of the pictures from the first turns
    assert sum(knows(a, s) for s, a in answered) >= len(answered) - 1, answered


# -- streaming --------------------------------------------------------------------------------------------
def test_stream_yields_the_non_streamed_answer_in_chunks(chat_gateway: Gateway, new_key: Keys) -> None:
    sample = load_samples()[9]
    with sdk(chat_gateway, new_key()) as client:
        # Given the answer asked for whole
        whole = client.chat.completions.create(model="tuwen", messages=[ask(sample)], max_tokens=48)
        # When the same question is streamed, with usage
        chunks = list(client.chat.completions.create(model="tuwen", messages=[ask(sample)], max_tokens=48,
                                                     stream=True, stream_options={"include_usage": True}))
    # Then the role comes first, the text in pieces that add up to the whole answer, then the finish reason
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason]
    # And a last chunk carries the usage (no choices), the same as the whole answer's
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    # The worker streams as it generates: more than one piece of text
    assert len(pieces) >= 2, pieces


def test_stream_events_on_the_wire(chat_gateway: Gateway, new_key: Keys) -> None:
    sample = load_samples()[2]
    body = {"model": "tuwen", "messages": [ask(sample)], "max_tokens": 16, "stream": True}
    with chat_gateway.client(new_key()) as api, api.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache" and response.headers["x-tuwen-job-id"]
        events = [e for e in response.read().decode().split("\n\n") if e]
    # Every event is one `data:` line; the last is [DONE]; the one before it ends the answer
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: "):])
    assert last["choices"][0]["finish_reason"] in ("stop", "length") and last["choices"][0]["delta"] == {}
    assert "图" in "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1])


class Errors(logging.Handler):
    """Collects the ERROR records of the server's loggers (uvicorn's do not reach the root logger)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_client_that_leaves_mid_stream_costs_nothing(chat_gateway: Gateway, new_key: Keys) -> None:
    sample = load_samples()[9]
    token = new_key()
    errors = Errors()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "tuwen.gateway")]
    for logger in loggers:
        logger.addHandler(errors)
    try:
        with sdk(chat_gateway, token) as client:
            # Given a stream whose answer has begun
            stream = client.chat.completions.create(model="tuwen", messages=[ask(sample)], max_tokens=48, stream=True)
            job_id = stream.response.headers["x-tuwen-job-id"]
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    break
            # When the client goes away mid-answer
            stream.close()
            # Then the job still finishes and keeps its whole answer
            with chat_gateway.client(token) as api:
                job = api.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
            assert job["status"] == "succeeded" and knows(job["answer"], sample), job
            # And the gateway logged no error and answers the next request as before
            again = client.chat.completions.create(model="tuwen", messages=[ask(sample)], max_tokens=48)
    finally:
        for logger in loggers:
            logger.removeHandler(errors)
    assert again.choices[0].message.content == job["answer"]
    assert not errors.records, [r.getMessage() for r in errors.records]


def stream_readers(client: Any) -> int:
    """Redis clients blocked reading a job's stream now (the gateway's XREAD; workers never XREAD)."""
    return sum(1 for c in client.client_list() if c.get("cmd") == "xread" and "b" in c.get("flags", ""))


def test_the_gateway_stops_reading_when_its_client_leaves(pipeline_settings: Settings, new_key: Keys,
                                                          tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    settings = pipeline_settings.model_copy(update={"interactive_queue": f"chat-paused-{tag}",
                                                    "bulk_queue": f"chat-paused-bulk-{tag}"})
    paused = WorkerProcess(settings, f"paused-{tag}@tests", tmp_path / "worker.log").start()
    redis = connect(settings.redis_url)
    gateway = None
    try:
        paused.wait_ready(timeout=180)
        gateway = start_gateway(settings, gateway_settings())
        token = new_key()
        # Given a worker that holds the model but is paused (its heartbeat outlives the pause by TTL_S)
        paused.signal(signal.SIGSTOP)
        with sdk(gateway, token) as client:
            # And a stream whose job waits in the queue, the gateway reading the job's stream for it
            stream = client.chat.completions.create(model="tuwen", messages=[ask(load_samples()[0])],
                                                    max_tokens=16, stream=True)
            job_id = stream.response.headers["x-tuwen-job-id"]
            assert next(iter(stream)).choices[0].delta.role == "assistant"
            assert until(lambda: stream_readers(redis) >= 1, 5)
            # When the client goes away
            stream.close()
            # Then the gateway stops reading for it at once (no reader seen for 2 s in a row)
            assert until(lambda: quiet(lambda: stream_readers(redis) == 0, 2.0), 10)
        # And once the worker goes on, the job is answered and its result kept
        paused.signal(signal.SIGCONT)
        with gateway.client(token) as api:
            job = api.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
        assert job["status"] == "succeeded" and job["answer"], job
    finally:
        paused.signal(signal.SIGCONT)
        if gateway is not None:
            gateway.stop()
        paused.stop()
        redis.close()


def until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def quiet(condition: Callable[[], bool], for_s: float) -> bool:
    """``condition`` held at every look for ``for_s`` seconds."""
    deadline = time.monotonic() + for_s
    while time.monotonic() < deadline:
        if not condition():
            return False
        time.sleep(0.05)
    return True


# -- models, idempotency, timeouts ---------------------------------------------------------------------------
def test_models_lists_what_live_workers_hold(chat_gateway: Gateway, new_key: Keys) -> None:
    model = served_model(chat_gateway.settings)
    with sdk(chat_gateway, new_key()) as client:
        listed = [m.id for m in client.models.list()]
        one = client.models.retrieve(model)
        # A model id of the list works in a request, as the alias does
        named = client.chat.completions.create(model=model, messages=[ask(load_samples()[0])], max_tokens=8)
        with pytest.raises(openai.NotFoundError) as missing:
            client.models.retrieve("gpt-4o")
    assert listed == [model, "tuwen"] and one.id == model and one.owned_by == "tuwen"
    assert named.model == model and missing.value.code == "model_not_served"


def test_models_lists_tuwen_even_while_no_worker_is_live(parked_gateway: Gateway, new_key: Keys) -> None:
    # Given a gateway whose interactive queue no worker consumes
    with sdk(parked_gateway, new_key()) as client:
        # When the models are listed, then tuwen is there (docs/openai.md: "tuwen always"), and it can be read
        listed = [m.id for m in client.models.list()]
        one = client.models.retrieve("tuwen")
        # And a request naming it is told that no worker is live now, to come back later
        with pytest.raises(openai.APIStatusError) as none_live:
            client.chat.completions.create(model="tuwen", messages=[ask(load_samples()[0])], max_tokens=8)
    assert listed == ["tuwen"] and one.id == "tuwen" and one.created > 0
    assert none_live.value.status_code == 503 and none_live.value.code == "model_not_served"


def test_idempotency_key_gives_the_first_job(chat_gateway: Gateway, new_key: Keys) -> None:
    messages = [ask(load_samples()[1])]
    key = {"Idempotency-Key": f"chat-{uuid.uuid4().hex}"}
    with sdk(chat_gateway, new_key()) as client:
        first = client.chat.completions.with_raw_response.create(model="tuwen", messages=messages, max_tokens=16,
                                                                 extra_headers=key)
        again = client.chat.completions.with_raw_response.create(model="tuwen", messages=messages, max_tokens=16,
                                                                 extra_headers=key)
        with pytest.raises(openai.BadRequestError) as reused:
            client.chat.completions.create(model="tuwen", messages=messages, max_tokens=17, extra_headers=key)
    assert first.headers["x-tuwen-job-id"] == again.headers["x-tuwen-job-id"]
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert again.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert reused.value.code == "idempotency_key_reused"


def test_a_timeout_names_the_job_to_read_later(pipeline_settings: Settings, worker: WorkerProcess,
                                               new_key: Keys) -> None:
    impatient = start_gateway(pipeline_settings, gateway_settings(gateway_chat_timeout_s=0.05))
    sample = load_samples()[4]
    token = new_key()
    try:
        with sdk(impatient, token) as client:
            # When the answer takes longer than the gateway waits
            with pytest.raises(openai.InternalServerError) as whole:
                client.chat.completions.create(model="tuwen", messages=[ask(sample)], max_tokens=32)
            with pytest.raises(openai.APIError) as streamed:
                list(client.chat.completions.create(model="tuwen", messages=[ask(sample)], max_tokens=32,
                                                    stream=True))
        # Then the error says timeout and names the job (body and header), without SDK retries
        err = whole.value
        assert err.status_code == 504 and err.code == "timeout"
        assert isinstance(err.body, dict) and err.body["job_id"] == err.response.headers["x-tuwen-job-id"]
        assert err.response.headers["x-should-retry"] == "false"
        assert streamed.value.code == "timeout" and isinstance(streamed.value.body, dict)
        # And the jobs go on: their answers are there to read
        with impatient.client(token) as api:
            for job_id in (err.body["job_id"], streamed.value.body["job_id"]):
                job = api.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
                assert job["status"] == "succeeded" and knows(job["answer"], sample), job
    finally:
        impatient.stop()
