"""OpenAI's Responses API (``/v1/responses``), driven by the official ``openai`` SDK as it is: a real uvicorn
gateway, the session's real ``tuwen worker`` with the demo model, real Redis and a real S3 server. Answers
naming the pictures' facts, OpenAI's stream of events, stored responses continued with
``previous_response_id``, read and deleted per owner, parameters ignored or refused, a Batch API batch of
responses, the async client, and the documented snippet run as written."""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tuwen.pipeline.client import Client
from tuwen.pipeline.jobs import JobStore, connect
from tuwen.pipeline.schema import JobRequest, Role
from tuwen.pipeline.settings import Settings
from tests.gateway.conftest import Gateway, gateway_settings, run_doc_snippet, start_gateway
from tests.gateway.test_batches import jsonl, png, read_lines, upload, wait_for
from tests.gateway.test_openai import data_url, knows, sdk
from tests.gateway.test_openai_errors import stored
from tuwen.workers.demo.samples import Sample, load_samples
from tuwen.workers.demo.scenes import KINDS, draw_worksheet_example
from tuwen.workers.bench.process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

Keys = Callable[..., str]
ROOT = Path(__file__).resolve().parents[2]
#: OpenAI's order of a streamed answer's events (the deltas repeat).
STREAM_ORDER = ["response.created", "response.in_progress", "response.output_item.added",
                "response.content_part.added", "response.output_text.delta", "response.output_text.done",
                "response.content_part.done", "response.output_item.done", "response.completed"]
EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


def asks(sample: Sample, question: str | None = None) -> list[dict[str, Any]]:
    """A user message: the sample's picture as a data: URL, then its question (or ``question``)."""
    return [{"role": "user", "content": [{"type": "input_image", "image_url": data_url(sample.path.read_bytes())},
                                         {"type": "input_text", "text": question or sample.question}]}]


def job_request(settings: Settings, job_id: str) -> JobRequest:
    """The job as the worker got it (its prompt's turns)."""
    client = connect(settings.redis_url)
    try:
        request = JobStore(client, settings.result_ttl_s).request(job_id)
    finally:
        client.close()
    assert request is not None
    return request


def collapsed(types: list[str]) -> list[str]:
    return [t for i, t in enumerate(types) if i == 0 or t != types[i - 1]]


@pytest.fixture(scope="module")
def responses_gateway(pipeline_settings: Settings, worker: WorkerProcess) -> Iterator[Gateway]:
    gw = start_gateway(pipeline_settings, gateway_settings(gateway_max_chat_bytes=8 * 1024 * 1024))
    yield gw
    gw.stop()


# -- answers ----------------------------------------------------------------------------------------------
def test_a_response_names_the_pictures_fact_and_validates_as_the_sdks(responses_gateway: Gateway,
                                                                       new_key: Keys) -> None:
    samples = load_samples()[:4]
    with sdk(responses_gateway, new_key()) as client:
        # When a backend asks about each picture with client.responses.create (raw: the headers and body too)
        raws = [client.responses.with_raw_response.create(model="tuwen", input=asks(s), max_output_tokens=32)
                for s in samples]
        # And asks a question with input as a plain string, no picture
        plain = client.responses.create(model="tuwen", input="你好，你是谁？", max_output_tokens=16)
    # Then resp.output_text names each picture's fact
    answers = [raw.parse() for raw in raws]
    assert sum(knows(a.output_text, s) for a, s in zip(answers, samples)) >= len(samples) - 1, \
        [(a.output_text, s.facts) for a, s in zip(answers, samples)]
    # And each body validates as the SDK's Response, field for field, with OpenAI's fixed values
    for raw, answer in zip(raws, answers):
        body = raw.http_response.json()
        Response.model_validate(body, strict=False)
        job_id = raw.headers["x-tuwen-job-id"]
        assert answer.id == f"resp_{job_id}" and answer.object == "response" and answer.status == "completed"
        assert [o.type for o in answer.output] == ["message"] and answer.output[0].role == "assistant"
        assert answer.usage is not None and answer.usage.input_tokens > 0 and answer.usage.output_tokens > 0
        assert answer.usage.total_tokens == answer.usage.input_tokens + answer.usage.output_tokens
        assert body["tools"] == [] and body["tool_choice"] == "none" and body["parallel_tool_calls"] is False
        assert body["text"] == {"format": {"type": "text"}} and body["store"] is True
        assert body["error"] is None and body["incomplete_details"] is None and body["max_output_tokens"] == 32
    assert plain.status in ("completed", "incomplete") and plain.output_text == plain.output[0].content[0].text


def test_a_stream_is_openais_events_in_order_and_adds_up_to_the_answer(responses_gateway: Gateway,
                                                                        new_key: Keys) -> None:
    sample = load_samples()[4]
    with sdk(responses_gateway, new_key()) as client:
        whole = client.responses.create(model="tuwen", input=asks(sample), max_output_tokens=48)
        # When the same question is streamed
        events = list(client.responses.create(model="tuwen", input=asks(sample), max_output_tokens=48, stream=True))
    # Then the events come in OpenAI's order, numbered from 0
    assert collapsed([e.type for e in events]) == STREAM_ORDER, [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    # And the deltas join to the final text: the non-streamed answer, which names the fact
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    done = next(e for e in events if e.type == "response.output_text.done")
    final = events[-1].response
    assert "".join(deltas) == done.text == final.output_text == whole.output_text and knows(final.output_text, sample)
    assert len(deltas) >= 2, deltas
    assert final.status == "completed" and final.usage == whole.usage and final.id == events[0].response.id
    assert events[0].response.status == "in_progress" and events[0].response.output == []


def test_stream_events_on_the_wire_carry_event_and_data(responses_gateway: Gateway, new_key: Keys) -> None:
    body = {"model": "tuwen", "input": asks(load_samples()[2]), "max_output_tokens": 16, "stream": True}
    with responses_gateway.client(new_key()) as api, api.stream("POST", "/v1/responses", json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-tuwen-job-id"]
        blocks = [b for b in response.read().decode().split("\n\n") if b and not b.startswith(":")]
    # Every event is `event: <type>` then `data: <json>` of the same type, and validates as the SDK's event
    for block in blocks:
        kind, data = block.split("\n")
        assert kind.startswith("event: ") and data.startswith("data: "), block
        payload = json.loads(data[len("data: "):])
        assert payload["type"] == kind[len("event: "):]
        EVENTS.validate_python(payload)


def test_max_output_tokens_ends_it_incomplete_streamed_or_not(responses_gateway: Gateway, new_key: Keys) -> None:
    sample = load_samples()[8]
    with sdk(responses_gateway, new_key()) as client:
        # When the answer may have one token
        tiny = client.responses.create(model="tuwen", input=asks(sample), max_output_tokens=1)
        streamed = list(client.responses.create(model="tuwen", input=asks(sample), max_output_tokens=1, stream=True))
    # Then it is incomplete for that reason, streamed or not
    assert tiny.status == "incomplete" and tiny.incomplete_details is not None
    assert tiny.incomplete_details.reason == "max_output_tokens" and tiny.usage is not None
    assert tiny.usage.output_tokens == 1 and tiny.max_output_tokens == 1
    assert streamed[-1].type == "response.incomplete" and streamed[-1].response.incomplete_details is not None
    assert streamed[-1].response.incomplete_details.reason == "max_output_tokens"


def test_instructions_and_developer_messages_are_the_system_prompt_first(responses_gateway: Gateway,
                                                                          new_key: Keys) -> None:
    sample = load_samples()[3]
    developer = {"role": "developer", "content": [{"type": "input_text", "text": "回答要简短。"}]}
    with sdk(responses_gateway, new_key()) as client:
        raw = client.responses.with_raw_response.create(model="tuwen", instructions="你是小学老师。",
                                                        input=[developer, *asks(sample)], max_output_tokens=32)
    answer = raw.parse()
    # Then the job's first turn is the one system prompt: the instructions, then the developer message
    job = job_request(responses_gateway.settings, raw.headers["x-tuwen-job-id"])
    assert [m.role for m in job.messages] == [Role.system, Role.user]
    assert job.messages[0].text == "你是小学老师。\n\n回答要简短。" and answer.instructions == "你是小学老师。"
    assert knows(answer.output_text, sample), answer.output_text


# -- stored responses -------------------------------------------------------------------------------------------
def test_previous_response_id_continues_the_conversation_and_its_picture(responses_gateway: Gateway,
                                                                          new_key: Keys) -> None:
    samples = load_samples()[4:8]
    answered = []
    with sdk(responses_gateway, new_key()) as client, sdk(responses_gateway, new_key()) as stranger:
        for sample in samples:
            # Given a first response about a picture
            first = client.responses.create(model="tuwen", input=asks(sample, "你好，请看这张图。"),
                                            max_output_tokens=32)
            # When the follow-up asks the picture's question without sending the picture again
            raw = client.responses.with_raw_response.create(model="tuwen", previous_response_id=first.id,
                                                            input=sample.question, max_output_tokens=32)
            follow_up = raw.parse()
            answered.append((sample, follow_up.output_text))
            # Then the job's prompt holds the first turn (its picture, by key), its answer, then the question
            job = job_request(responses_gateway.settings, raw.headers["x-tuwen-job-id"])
            assert [m.role for m in job.messages] == [Role.user, Role.assistant, Role.user]
            assert len(job.messages[0].image_keys) == 1 and job.messages[1].text == first.output_text
            assert follow_up.previous_response_id == first.id
        # And another owner cannot continue it (404, worded as for an id that never existed)
        with pytest.raises(openai.NotFoundError) as theirs:
            stranger.responses.create(model="tuwen", previous_response_id=first.id, input="图里有什么？")
        with pytest.raises(openai.NotFoundError) as never:
            stranger.responses.create(model="tuwen", previous_response_id="resp_" + "0" * 32, input="图里有什么？")
    assert sum(knows(a, s) for s, a in answered) >= len(answered) - 1, answered
    assert theirs.value.code == never.value.code == "not_found" and theirs.value.param == "previous_response_id"
    assert str(theirs.value.message).replace(first.id, "X") == str(never.value.message).replace("resp_" + "0" * 32, "X")


def test_get_and_delete_by_id_per_owner_and_store_false(responses_gateway: Gateway, new_key: Keys) -> None:
    sample = load_samples()[1]
    with sdk(responses_gateway, new_key()) as client, sdk(responses_gateway, new_key()) as stranger:
        made = client.responses.create(model="tuwen", input=asks(sample), max_output_tokens=32,
                                       metadata={"class": "三年级"})
        # GET answers the stored response as its job stands
        got = client.responses.retrieve(made.id)
        assert got.status == "completed" and got.output_text == made.output_text and got.metadata == {"class": "三年级"}
        # Another owner gets the 404 an unknown id gets, both ways
        for call in (stranger.responses.retrieve, stranger.responses.delete):
            with pytest.raises(openai.NotFoundError) as theirs:
                call(made.id)
            assert theirs.value.code == "not_found" and made.id in str(theirs.value.body)
        with responses_gateway.client(stranger.api_key) as api:
            foreign = api.get(f"/v1/responses/{made.id}")
            missing = api.get(f"/v1/responses/{made.id[:-4]}ffff")
        assert foreign.status_code == missing.status_code == 404
        assert foreign.json()["error"]["message"].replace(made.id, "X") == \
            missing.json()["error"]["message"].replace(made.id[:-4] + "ffff", "X")
        # The owner deletes it: then it is gone
        with responses_gateway.client(client.api_key) as api:
            deleted = api.delete(f"/v1/responses/{made.id}")
        assert deleted.status_code == 200 and deleted.json() == {"id": made.id, "object": "response.deleted",
                                                                 "deleted": True}
        for call in (client.responses.retrieve, client.responses.delete):
            with pytest.raises(openai.NotFoundError):
                call(made.id)
        # store: false keeps nothing but the job: no GET, no previous_response_id
        unstored = client.responses.create(model="tuwen", input=asks(sample), max_output_tokens=32, store=False)
        assert unstored.status == "completed" and unstored.store is False
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(unstored.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.create(model="tuwen", previous_response_id=unstored.id, input="再说一遍。")


# -- parameters -------------------------------------------------------------------------------------------------
def test_unknown_parameters_are_ignored_and_named_and_unsupported_ones_refused(responses_gateway: Gateway,
                                                                               new_key: Keys) -> None:
    sample = load_samples()[0]
    with sdk(responses_gateway, new_key()) as client:
        # An unknown parameter: answered, and named in tuwen-ignored-params
        raw = client.responses.with_raw_response.create(model="tuwen", input=asks(sample), max_output_tokens=16,
                                                        extra_body={"frobnicate": True, "prompt_cache_key": "k"})
        assert raw.status_code == 200 and raw.parse().status in ("completed", "incomplete")
        assert set(raw.headers["tuwen-ignored-params"].split(", ")) == {"frobnicate", "prompt_cache_key"}
        refused = {}
        for name, params in (("tools", {"tools": [{"type": "function", "name": "f", "parameters": {}}]}),
                             ("reasoning", {"reasoning": {"effort": "high"}}),
                             ("background", {"background": True})):
            with pytest.raises(openai.BadRequestError) as err:
                client.responses.create(model="tuwen", input="图里有什么？", **params)
            refused[name] = (err.value.code, err.value.param)
    assert refused == {name: ("unsupported_parameter", name) for name in refused}, refused


# -- the Batch API -------------------------------------------------------------------------------------------------
def test_a_batch_of_responses_answers_each_line_with_a_response_body(responses_gateway: Gateway,
                                                                      new_key: Keys) -> None:
    rng = random.Random(2207)
    examples = {f"r-{i}": draw_worksheet_example(rng, KINDS[i]) for i in range(2)}
    lines = [{"custom_id": cid, "method": "POST", "url": "/v1/responses",
              "body": {"model": "tuwen", "max_output_tokens": 48, "input": [{"role": "user", "content": [
                  {"type": "input_image", "image_url": data_url(png(ex))},
                  {"type": "input_text", "text": ex.question}]}]}} for cid, ex in examples.items()]
    with sdk(responses_gateway, new_key()) as client:
        # When a batch of two Responses lines runs
        batch = client.batches.create(input_file_id=upload(client, jsonl(lines)), endpoint="/v1/responses",
                                      completion_window="24h")
        batch = wait_for(client, batch.id, lambda b: b.status in ("completed", "failed", "expired", "cancelled"))
        out = read_lines(client, batch.output_file_id)
    # Then both are answered, each output line's body a Response that names its picture's facts
    assert batch.status == "completed" and batch.endpoint == "/v1/responses", batch
    assert batch.request_counts is not None and batch.request_counts.completed == 2
    assert sorted(line["custom_id"] for line in out) == sorted(examples)
    for line in out:
        body = Response.model_validate(line["response"]["body"])
        assert body.status == "completed" and body.id == f"resp_{line['response']['request_id']}"
        facts = examples[line["custom_id"]].facts
        assert all(fact in body.output_text for fact in facts), (body.output_text, facts)


# -- async ---------------------------------------------------------------------------------------------------------
def test_the_async_client_creates_and_streams(responses_gateway: Gateway, new_key: Keys) -> None:
    sample = load_samples()[5]
    token = new_key()

    async def main() -> tuple[str, list[str], str]:
        async with AsyncOpenAI(base_url=responses_gateway.url + "/v1", api_key=token, max_retries=0,
                               timeout=120) as client:
            whole = await client.responses.create(model="tuwen", input=asks(sample), max_output_tokens=32)
            stream = await client.responses.create(model="tuwen", input=asks(sample), max_output_tokens=32,
                                                   stream=True)
            types, text = [], ""
            async for event in stream:
                types.append(event.type)
                if event.type == "response.output_text.delta":
                    text += event.delta
            return whole.output_text, types, text

    whole, types, streamed = asyncio.run(main())
    assert knows(whole, sample) and streamed == whole and collapsed(types) == STREAM_ORDER, (whole, types)


# -- the documented snippet ---------------------------------------------------------------------------------------
def test_the_documented_snippet_runs_as_written(responses_gateway: Gateway, new_key: Keys,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # Given docs/openai.md's Responses API snippet, and the worksheet it reads (the demo's counting picture)
    doc = (ROOT / "docs" / "openai.md").read_text(encoding="utf-8")
    section = doc[doc.index("## Responses API"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S)
    assert snippet is not None
    sample = load_samples()[4]
    assert sample.question in snippet.group(1)
    # When it runs as written
    printed = run_doc_snippet(snippet.group(1), responses_gateway.url, new_key(), sample.path, monkeypatch)
    # Then what it prints names the picture's fact, first and in the follow-up
    lines = printed.splitlines()
    assert knows(lines[0], sample) and knows(lines[1], sample), lines
    assert lines[-1].startswith("(") and "tokens" in lines[-1], lines


def test_text_format_constrains_the_answer_or_is_refused_before_anything_is_stored(
        responses_gateway: Gateway, new_key: Keys) -> None:
    """The Responses API's ``text.format`` is the chat API's ``response_format``, its schema beside its type."""
    sample = load_samples()[0]
    schema = {"type": "object", "properties": {"count": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "correct": {"type": "boolean"}},
              "required": ["count", "correct"], "additionalProperties": False}
    with sdk(responses_gateway, new_key()) as client:
        answer = client.responses.create(model="tuwen", input=asks(sample), max_output_tokens=32, text={
            "format": {"type": "json_schema", "name": "count", "schema": schema, "strict": True}})
        assert answer.status == "completed", answer
        value = json.loads(answer.output_text)
        assert set(value) == {"count", "correct"} and 0 <= value["count"] <= 9 and isinstance(value["correct"], bool)
        before = stored(Client(responses_gateway.settings))
        bad = {"type": "json_schema", "name": "count", "schema": {"type": "object", "properties": {
            "a": {"type": "string", "pattern": "(?<=x)a"}}}}
        with pytest.raises(openai.BadRequestError) as err:
            client.responses.create(model="tuwen", input=asks(sample), text={"format": bad})
    assert (err.value.code, err.value.param) == ("invalid_schema", "text.format")
    assert "Lookbehind" in str(err.value) and stored(Client(responses_gateway.settings)) == before
