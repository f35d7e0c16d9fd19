"""Tool calls through the real gateway, worker, Redis and S3 (issue 24, part 3): ``tools`` with ``tool_choice``
"required" or a named function give one call whose arguments validate against the function's parameters
(checked again here with ``jsonschema``), whole and streamed, through the ``openai`` SDK, LangChain and Batch API
lines; tool results come back into the conversation; ``"auto"`` on the demo model and tools whose schemas
cannot be enforced are 400s, and nothing is stored.

The session worker's answer cap is 48 tokens and the demo tokenizer spells JSON a character a token, so the
tools here are small: ``{"name": "count", "parameters": {"n": 3}}`` is 41 tokens.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.gateway.conftest import Gateway
from tests.gateway.test_batches import jsonl, line, read_lines, upload, wait_for
from tests.gateway.test_clients import langchain_message
from tests.gateway.test_openai import Keys, ask, chat_gateway, sdk  # noqa: F401 - chat_gateway is a fixture
from tests.gateway.test_openai_errors import stored
from tests.gateway.test_structured import run_structured_snippet
from tuwen.pipeline import registry
from tuwen.pipeline.client import Client
from tuwen.pipeline.errors import InvalidParams
from tuwen.pipeline.jobs import connect
from tuwen.workers.demo.samples import load_samples

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

COUNT = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"],
         "additionalProperties": False}
SHAPE = {"type": "object", "properties": {"s": {"enum": ["圆形", "三角形", "正方形", "长方形"]}}, "required": ["s"],
         "additionalProperties": False}
PARAMETERS = {"count": COUNT, "shape": SHAPE}
TOOLS = [{"type": "function", "function": {"name": name, "description": f"记下图中图形的{what}", "parameters": schema}}
         for (name, schema), what in zip(PARAMETERS.items(), ("个数", "形状"))]
SHAPE_CHOICE = {"type": "function", "function": {"name": "shape"}}


class Count(BaseModel):
    """记下图中图形的个数"""

    n: int = Field(ge=0, le=9)


class Shape(BaseModel):
    """记下图中图形的形状"""

    s: Literal["圆形", "三角形", "正方形", "长方形"]


def the_call(message: Any, parameters: dict[str, dict[str, Any]] = PARAMETERS) -> tuple[str, dict[str, Any]]:
    """The message's one tool call, its arguments validated against its function's parameters."""
    assert message.content is None and message.tool_calls is not None and len(message.tool_calls) == 1, message
    call = message.tool_calls[0]
    assert re.fullmatch(r"call_[0-9a-f]{24}", call.id) and call.type == "function", call
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, parameters[call.function.name])
    return call.function.name, arguments


def test_required_and_named_calls_through_the_sdk(chat_gateway: Gateway, new_key: Keys) -> None:
    sample = load_samples()[0]
    with sdk(chat_gateway, new_key()) as client:
        # Given a plain answer to the same question (the answer cache must not give it to the tool calls)
        plain = client.chat.completions.create(model="tuwen", messages=[ask(sample)], max_tokens=48)
        required = client.chat.completions.create(model="tuwen", messages=[ask(sample)], tools=TOOLS,
                                                  tool_choice="required", max_tokens=48)
        named = client.chat.completions.create(model="tuwen", messages=[ask(sample)], tools=TOOLS,
                                               tool_choice=SHAPE_CHOICE, max_tokens=48, parallel_tool_calls=False)
        parsed = client.chat.completions.parse(model="tuwen", messages=[ask(sample)], max_tokens=48,
                                               tools=[openai.pydantic_function_tool(Count)], tool_choice="required")
        none = client.chat.completions.create(model="tuwen", messages=[ask(sample)], tools=TOOLS, tool_choice="none",
                                              max_tokens=48)
        short = client.chat.completions.create(model="tuwen", messages=[ask(sample)], tools=TOOLS,
                                               tool_choice="required", max_tokens=12)
        two = client.chat.completions.create(model="tuwen", messages=[ask(sample)], tools=TOOLS, n=2, seed=7,
                                             temperature=1.0, tool_choice=SHAPE_CHOICE, max_tokens=48)
    assert plain.choices[0].finish_reason == "stop" and plain.choices[0].message.tool_calls is None
    assert required.choices[0].finish_reason == "tool_calls", required.choices[0].message
    assert the_call(required.choices[0].message)[0] in PARAMETERS
    assert named.choices[0].finish_reason == "tool_calls" and the_call(named.choices[0].message)[0] == "shape"
    call = parsed.choices[0].message.tool_calls[0]  # the SDK parses a strict tool's arguments into the model
    assert parsed.choices[0].finish_reason == "tool_calls" and isinstance(call.function.parsed_arguments, Count)
    # tool_choice "none": the tools go unused, the answer is the plain one
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert not none.choices[0].message.tool_calls
    # Out of tokens inside the call: length, the partial text, never a call as if whole
    assert short.choices[0].finish_reason == "length" and short.choices[0].message.tool_calls is None
    assert (short.choices[0].message.content or "").startswith('{"name": "')
    # n > 1: each choice is a call of its own
    assert [c.finish_reason for c in two.choices] == ["tool_calls"] * 2
    assert [the_call(c.message)[0] for c in two.choices] == ["shape"] * 2
    assert two.choices[0].message.tool_calls[0].id != two.choices[1].message.tool_calls[0].id


def test_a_streamed_call_is_the_whole_call_in_openais_deltas(chat_gateway: Gateway, new_key: Keys) -> None:
    sample = load_samples()[1]
    with sdk(chat_gateway, new_key()) as client:
        whole = client.chat.completions.create(model="tuwen", messages=[ask(sample)], tools=TOOLS,
                                               tool_choice=SHAPE_CHOICE, max_tokens=48)
        chunks = list(client.chat.completions.create(model="tuwen", messages=[ask(sample)], tools=TOOLS,
                                                     tool_choice=SHAPE_CHOICE, max_tokens=48, stream=True))
        # The SDK's streaming helper accumulates the deltas into the call (and parses a strict tool's arguments)
        with client.chat.completions.stream(model="tuwen", messages=[ask(sample)], max_tokens=48,
                                            tools=[openai.pydantic_function_tool(Shape)],
                                            tool_choice="required") as stream:
            done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
            final = stream.get_final_completion()
    name, arguments = the_call(whole.choices[0].message)
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    first, rest = deltas[0].tool_calls[0], [d.tool_calls[0] for d in deltas[1:]]
    assert first.index == 0 and first.id and first.type == "function" and first.function.name == name
    assert rest and all(t.id is None and t.function.name is None for t in rest)
    assert json.loads("".join(t.function.arguments or "" for t in [first, *rest])) == arguments  # greedy: the same
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    call = final.choices[0].message.tool_calls[0]
    assert final.choices[0].finish_reason == "tool_calls" and isinstance(call.function.parsed_arguments, Shape)
    assert len(done) == 1 and json.loads(done[0].arguments) == json.loads(call.function.arguments)


def test_langchain_function_calling_bind_tools_and_json_schema(chat_gateway: Gateway, new_key: Keys) -> None:
    from langchain_openai import ChatOpenAI

    sample = load_samples()[2]
    llm = ChatOpenAI(model="tuwen", base_url=chat_gateway.url + "/v1", api_key=new_key(), max_retries=0,
                     timeout=120, max_tokens=48)
    question = [langchain_message(sample)]
    counted = llm.with_structured_output(Count, method="function_calling").invoke(question)
    schemed = llm.with_structured_output(Shape, method="json_schema").invoke(question)
    anyone = llm.bind_tools([Count, Shape], tool_choice="any").invoke(question)
    named = llm.bind_tools([Count, Shape], tool_choice="Shape").invoke(question)
    # Streamed: LangChain adds the chunks' tool-call deltas up into the call
    chunks = list(llm.bind_tools([Count, Shape], tool_choice="Count").stream(question))
    streamed = chunks[0]
    for chunk in chunks[1:]:
        streamed += chunk
    assert len(chunks) > 3 and [c["name"] for c in streamed.tool_calls] == ["Count"]
    assert Count.model_validate(streamed.tool_calls[0]["args"])
    assert isinstance(counted, Count) and isinstance(schemed, Shape)
    models = {"Count": Count, "Shape": Shape}
    for message in (anyone, named):
        assert len(message.tool_calls) == 1 and message.response_metadata["finish_reason"] == "tool_calls"
        call = message.tool_calls[0]
        jsonschema.validate(call["args"], models[call["name"]].model_json_schema())
    assert named.tool_calls[0]["name"] == "Shape"


def test_a_tool_result_comes_back_into_the_conversation(chat_gateway: Gateway, new_key: Keys) -> None:
    sample = load_samples()[3]
    with sdk(chat_gateway, new_key()) as client:
        first = client.chat.completions.create(model="tuwen", messages=[ask(sample)], tools=TOOLS,
                                               tool_choice="required", max_tokens=48)
        call = first.choices[0].message.tool_calls[0]
        conversation = [ask(sample), first.choices[0].message.model_dump(exclude_none=True),
                        {"role": "tool", "tool_call_id": call.id, "content": "图中有3个图形。"}]
        answered = client.chat.completions.create(model="tuwen", messages=conversation, max_tokens=16)
        again = client.chat.completions.create(model="tuwen", messages=conversation, tools=TOOLS,
                                               tool_choice={"type": "function", "function": {"name": "count"}},
                                               max_tokens=48)
        with pytest.raises(openai.BadRequestError) as stray:
            client.chat.completions.create(model="tuwen", max_tokens=16, messages=[
                ask(sample), {"role": "tool", "tool_call_id": "call_nobody", "content": "3"}])
    # The call and its result are part of the prompt (as text: docs/structured.md), and the model answers
    rendered = len("<tool_call>\n" + json.dumps({"name": call.function.name, "arguments": json.loads(
        call.function.arguments)}, ensure_ascii=False) + "\n</tool_call><tool_response>\n图中有3个图形。\n</tool_response>")
    assert answered.usage.prompt_tokens >= first.usage.prompt_tokens + rendered
    assert answered.choices[0].finish_reason in ("stop", "length") and answered.choices[0].message.content
    assert again.choices[0].finish_reason == "tool_calls" and the_call(again.choices[0].message)[0] == "count"
    assert stray.value.code == "invalid_messages" and stray.value.param == "messages[1].tool_call_id"


BAD: dict[str, tuple[dict[str, Any], int, str, str, str]] = {
    "auto (the default with tools)": ({"tools": TOOLS}, 400, "unsupported_parameter", "tool_choice",
                                      "chat template renders tools"),
    "auto, said": ({"tools": TOOLS, "tool_choice": "auto"}, 400, "unsupported_parameter", "tool_choice",
                   "chat template renders tools"),
    "not a JSON Schema": ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}],
                           "tool_choice": "required"}, 400, "invalid_schema", "tools[0].function.parameters",
                          "not a valid JSON Schema"),
    "a feature the library lacks": ({"tools": [TOOLS[0], {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)a"}}}}}], "tool_choice": "required"},
        400, "invalid_schema", "tools[1].function.parameters", "Lookbehind is not supported"),
    "a choice of no tool": ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "paint"}}},
                            400, "invalid_params", "tool_choice", "not one of the tools"),
    "a choice without tools": ({"tool_choice": "required"}, 400, "invalid_params", "tool_choice", "no tools"),
    "the older functions": ({"functions": [{"name": "f", "parameters": {}}]}, 400, "unsupported_parameter",
                            "functions", "tools and tool_choice"),
}


def test_workers_announce_that_the_demo_template_renders_no_tools(chat_gateway: Gateway) -> None:
    """How the gateway knows to refuse "auto" (docs/structured.md): each worker's announcement says."""
    redis = connect(chat_gateway.settings.redis_url)
    try:
        workers = registry.live_workers(redis)
    finally:
        redis.close()
    pictures = [w for w in workers if w.get("role", "picture") == "picture"]  # (a speech worker renders no chat)
    assert pictures and all(w["renders_tools"] is False for w in pictures), workers


@pytest.mark.parametrize("case", list(BAD))
def test_bad_tools_are_refused_before_anything_is_stored(chat_gateway: Gateway, new_key: Keys, case: str) -> None:
    body, status, code, param, words = BAD[case]
    client = Client(chat_gateway.settings)
    before = stored(client)
    with chat_gateway.client(new_key()) as api:
        resp = api.post("/v1/chat/completions", json={"model": "tuwen", "messages": [ask(load_samples()[4])],
                                                      "max_tokens": 48, **body})
    error = resp.json()["error"]
    assert (resp.status_code, error["code"], error["param"]) == (status, code, param), error
    assert words in error["message"], error
    if code == "invalid_schema":  # the same through the client (/v1/jobs, bulk lines): tool_call in params
        functions = [t["function"] for t in body["tools"]]
        with pytest.raises(InvalidParams) as refused:
            client.submit(load_samples()[4].path.read_bytes(), "?", params={"tool_call": {"functions": functions}})
        assert refused.value.code == code and words in refused.value.message
    assert stored(client) == before


def test_batch_api_lines_with_tools(chat_gateway: Gateway, new_key: Keys) -> None:
    samples = load_samples()[:3]
    lines = [line("required", [ask(samples[0])], tools=TOOLS, tool_choice="required"),
             line("named", [ask(samples[1])], tools=TOOLS, tool_choice=SHAPE_CHOICE),
             line("auto", [ask(samples[2])], tools=TOOLS)]
    with sdk(chat_gateway, new_key()) as client:
        batch = client.batches.create(input_file_id=upload(client, jsonl(lines)), endpoint="/v1/chat/completions",
                                      completion_window="24h")
        batch = wait_for(client, batch.id, lambda b: b.status in ("completed", "failed", "expired", "cancelled"))
        outputs = {x["custom_id"]: x for x in read_lines(client, batch.output_file_id)}
        errors = {x["custom_id"]: x for x in read_lines(client, batch.error_file_id)}
    assert batch.status == "completed" and set(outputs) == {"required", "named"} and set(errors) == {"auto"}
    for cid, x in outputs.items():
        choice = x["response"]["body"]["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, x
        call = choice["message"]["tool_calls"][0]
        jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMETERS[call["function"]["name"]])
        assert cid == "required" or call["function"]["name"] == "shape"
    assert errors["auto"]["response"]["body"]["error"]["code"] == "unsupported_parameter"


def test_the_documented_tool_call_runs_as_written(chat_gateway: Gateway, new_key: Keys,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    printed = run_structured_snippet("tool call", chat_gateway, new_key(), monkeypatch)
    reason, name, arguments = printed.strip().split(" ", 2)
    assert (reason, name) == ("tool_calls", "count"), printed
    jsonschema.validate(json.loads(arguments), COUNT)
