"""A forced tool call's schema, answer and stream, without services: the derived schema accepts exactly one
call of the chosen functions (checked with ``jsonschema``, independently of the grammar library), a pydantic
model's ``$defs`` keep working inside it, and streamed deltas add up to the whole call."""

from __future__ import annotations

import json

import jsonschema
import pytest
from pydantic import BaseModel, ValidationError

from tuwen.pipeline.gateway.openai_errors import OpenAIError
from tuwen.pipeline.gateway.tool_calls import CallStream, refuse_auto
from tuwen.pipeline.schema import GenerationParams
from tuwen.pipeline.tool_format import ToolCallFormat, call_id, finish_reason, split


class Colour(BaseModel):
    name: str


class Paint(BaseModel):
    colour: Colour
    coats: int


COUNT = {"name": "count", "parameters": {"type": "object", "properties": {"n": {"type": "integer"}},
                                         "required": ["n"], "additionalProperties": False}}
PAINT = {"name": "paint", "parameters": Paint.model_json_schema()}


def test_the_derived_schema_takes_one_call_of_a_chosen_function() -> None:
    either = ToolCallFormat(functions=(COUNT, PAINT)).call_schema()
    jsonschema.validate({"name": "count", "parameters": {"n": 3}}, either)
    jsonschema.validate({"name": "paint", "parameters": {"colour": {"name": "红"}, "coats": 2}}, either)
    for wrong in ({"name": "count", "parameters": {"n": "3"}},
                  {"name": "paint", "parameters": {"colour": 1, "coats": 2}},
                  {"name": "other", "parameters": {}}, {"name": "count"},
                  {"name": "count", "parameters": {"n": 1}, "x": 1}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, either)
    named = ToolCallFormat(functions=(COUNT, PAINT), name="paint").call_schema()
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "count", "parameters": {"n": 3}}, named)


def test_bad_functions_are_refused_with_what_is_wrong() -> None:
    cases = {
        "not a JSON Schema": ({**COUNT, "parameters": {"type": "strin"}}, "invalid_schema"),
        "a feature the library lacks": ({**COUNT, "parameters": {"type": "object", "properties": {
            "a": {"type": "string", "pattern": "(?<=x)a"}}}}, "invalid_schema"),
        "a $ref outside $defs": ({**COUNT, "parameters": {"type": "object", "properties": {"a": {"$ref": "#"}}}},
                                 "invalid_schema"),
        "a name OpenAI refuses": ({**COUNT, "name": "a b"}, "value_error"),
    }
    for case, (function, kind) in cases.items():
        with pytest.raises(ValidationError) as refused:
            ToolCallFormat(functions=(function,))
        assert refused.value.errors()[0]["type"] == kind, case
    with pytest.raises(ValidationError, match="not one of the tools"):
        ToolCallFormat(functions=(COUNT,), name="paint")
    with pytest.raises(ValidationError, match="cannot both"):
        GenerationParams(tool_call=ToolCallFormat(functions=(COUNT,)), response_format={"type": "json_object"})


def test_only_a_whole_call_ends_with_tool_calls() -> None:
    tool_call = ToolCallFormat(functions=(COUNT,))
    whole = '{"name": "count", "parameters": {"n": 3}}'
    assert split(whole) == ("count", '{"n": 3}') and split('{"name":"count","parameters":{"n":3}}') == ("count",
                                                                                                        '{"n":3}')
    assert finish_reason(tool_call, whole, "stop") == "tool_calls"
    assert finish_reason(tool_call, whole[:-3], "stop") == "stop"  # e.g. cut by a stop string
    assert finish_reason(tool_call, whole[:-3], "length") == "length"
    assert finish_reason(None, whole, "stop") == "stop"


@pytest.mark.parametrize("size", [1, 2, 5, 100])
def test_streamed_deltas_add_up_to_the_call(size: int) -> None:
    answer = '{"name": "paint", "parameters": {"colour": {"name": "红色"}, "coats": 2}}'
    stream = CallStream("job-1")
    deltas = [d for i in range(0, len(answer), size) for d in stream.feed(answer[i:i + size])]
    deltas += stream.end("tool_calls")
    first = deltas[0]["tool_calls"][0]
    assert first == {"index": 0, "id": call_id("job-1"), "type": "function",
                     "function": {"name": "paint", "arguments": ""}}
    pieces = [d["tool_calls"][0] for d in deltas[1:]]
    assert all(set(p) == {"index", "function"} and set(p["function"]) == {"arguments"} for p in pieces)
    assert json.loads("".join(p["function"]["arguments"] for p in pieces)) == {"colour": {"name": "红色"}, "coats": 2}


def test_a_call_cut_short_streams_what_was_written() -> None:
    cut = CallStream("job-2")
    assert cut.feed('{"name": "pa') == [] and cut.end("length") == [{"content": '{"name": "pa'}]
    inside = CallStream("job-3")
    deltas = inside.feed('{"name": "paint", "parameters": {"coats": ') + inside.end("length")
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas) == '{"coats": '


def test_auto_is_refused_saying_why_for_the_served_model() -> None:
    for renders, words in ((False, "the served model's does not"), (True, "does not parse its native")):
        with pytest.raises(OpenAIError) as refused:
            refuse_auto(renders)
        assert (refused.value.status, refused.value.code, refused.value.param) == (400, "unsupported_parameter",
                                                                                   "tool_choice")
        assert words in refused.value.message and '"required"' in refused.value.message
