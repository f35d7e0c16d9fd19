"""Answers programs can read, through the real gateway, worker, Redis and S3 (issue 24): the SDK's ``parse``
gets a parsed object, checked again with ``jsonschema``; a schema that cannot be enforced is a 400
``invalid_schema`` at the gateway and in the client, and nothing is stored; ``logit_bias`` moves the answer."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import jsonschema
import pytest
from pydantic import BaseModel, ConfigDict, Field

from tests.gateway.conftest import Gateway, run_doc_snippet
from tests.gateway.test_openai import Keys, ask, chat_gateway, sdk  # noqa: F401 - chat_gateway is a fixture
from tests.gateway.test_openai_errors import stored
from tuwen.pipeline.client import Client
from tuwen.pipeline.errors import InvalidParams
from tuwen.workers.demo.samples import load_samples

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


class Worksheet(BaseModel):
    """Every field closes in a few tokens, so even the demo model (not trained on JSON yet) ends its object."""

    model_config = ConfigDict(extra="forbid")
    shape: Literal["圆形", "三角形", "正方形", "长方形"]
    count: int = Field(ge=0, le=9)
    correct: bool


def test_the_sdks_parse_returns_the_parsed_object(chat_gateway: Gateway, new_key: Keys) -> None:
    samples = load_samples()[:3]
    with sdk(chat_gateway, new_key()) as client:
        completions = [client.chat.completions.parse(model="tuwen", messages=[ask(s)], response_format=Worksheet,
                                                     max_tokens=48) for s in samples]
    for c in completions:
        message = c.choices[0].message
        assert c.choices[0].finish_reason == "stop" and isinstance(message.parsed, Worksheet), c
        # Checked again, independently of the grammar library and of the SDK
        jsonschema.validate(json.loads(message.content or ""), Worksheet.model_json_schema())


def test_json_object_is_an_object_or_says_length(chat_gateway: Gateway, new_key: Keys) -> None:
    sample = load_samples()[0]
    with chat_gateway.client(new_key()) as api:
        body = {"model": "tuwen", "messages": [ask(sample)], "max_tokens": 24,
                "response_format": {"type": "json_object"}}
        choice = api.post("/v1/chat/completions", json=body).json()["choices"][0]
        schema = {"type": "json_schema", "json_schema": {"name": "worksheet", "schema": Worksheet.model_json_schema()}}
        short = api.post("/v1/chat/completions", json={**body, "max_tokens": 3, "response_format": schema}).json()
        short = short["choices"][0]
    content = choice["message"]["content"]
    assert content.startswith("{")
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(content), dict)
    else:
        assert choice["finish_reason"] == "length"
    assert short["finish_reason"] == "length", "a truncated object is never passed off as whole"
    with pytest.raises(json.JSONDecodeError):
        json.loads(short["message"]["content"])


BAD: dict[str, tuple[Any, str, str]] = {
    "not a JSON Schema": ({"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "strin"}}},
                          "invalid_schema", "not a valid JSON Schema"),
    "a feature the library lacks": ({"type": "json_schema", "json_schema": {"name": "w", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)a"}}}}},
        "invalid_schema", "Lookbehind is not supported"),
    "an unknown type": ({"type": "yaml"}, "invalid_params", "type is one of"),
    "a name OpenAI refuses": ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}},
                              "invalid_params", "name of 1-64"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_response_format_is_refused_before_anything_is_stored(chat_gateway: Gateway, new_key: Keys,
                                                                    case: str) -> None:
    response_format, code, words = BAD[case]
    client = Client(chat_gateway.settings)
    before = stored(client)
    sample = load_samples()[1]
    with chat_gateway.client(new_key()) as api:
        resp = api.post("/v1/chat/completions", json={"model": "tuwen", "messages": [ask(sample)],
                                                      "response_format": response_format})
    error = resp.json()["error"]
    assert resp.status_code == 400 and error["code"] == code and error["param"] == "response_format", error
    assert words in error["message"]
    # The same through the client (what /v1/jobs and bulk lines go through)
    with pytest.raises(InvalidParams) as refused:
        client.submit(sample.path.read_bytes(), sample.question, params={"response_format": response_format})
    assert refused.value.code == code and words in refused.value.message
    assert stored(client) == before


def run_structured_snippet(name: str, gateway: Gateway, token: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run docs/structured.md's snippet ``name`` as written, on the first demo sample; returns what it printed."""
    doc = (Path(__file__).parents[2] / "docs" / "structured.md").read_text(encoding="utf-8")
    block = re.search(rf"<!-- snippet: {name} -->\n```python\n(.*?)```", doc, re.S)
    assert block is not None, name
    return run_doc_snippet(block.group(1), gateway.url, token, load_samples()[0].path, monkeypatch)


def test_the_documented_worksheet_grading_runs_as_written(chat_gateway: Gateway, new_key: Keys,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    printed = run_structured_snippet("worksheet grading", chat_gateway, new_key(), monkeypatch)
    reason, parsed = printed.strip().split(" ", 1)
    assert reason == "stop", printed
    Worksheet.model_validate_json(parsed)


def test_logit_bias_through_the_sdk(chat_gateway: Gateway, new_key: Keys) -> None:
    import openai

    sample = load_samples()[2]
    with sdk(chat_gateway, new_key()) as client:
        plain = client.chat.completions.create(model="tuwen", messages=[ask(sample)], max_tokens=8)
        text = plain.choices[0].message.content or ""
        banned = client.chat.completions.create(model="tuwen", messages=[ask(sample)], max_tokens=8,
                                                logit_bias={str(t): -100 for t in tokens_of(text)})
        assert (banned.choices[0].message.content or "") != text, "banning the answer's tokens changes it"
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tuwen", messages=[ask(sample)], max_tokens=8,
                                           logit_bias={"9999999": 5})
    assert err.value.code == "invalid_params" and "vocabulary" in str(err.value)


def tokens_of(text: str) -> list[int]:
    """The demo tokenizer's ids for ``text`` (the bundled demo model's processor)."""
    from transformers import AutoProcessor

    from tuwen.workers.demo import bundled_demo_model

    return list(set(AutoProcessor.from_pretrained(bundled_demo_model()).tokenizer.encode(text,
                                                                                      add_special_tokens=False)))
