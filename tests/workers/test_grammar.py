"""Grammar-constrained rows in the decode loop (issue 24, parts 1 and 2): rows with and without a
response_format share one batch and one forward pass; free rows stay token-identical to the same row
alone; constrained rows are valid by construction (checked independently with ``jsonschema``); a row out
of budget inside its JSON says ``length``; a bad schema or a failing grammar fails its row alone."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from tests.workers.test_scheduler import rt, samples  # noqa: F401 - fixtures: the demo runtime, its samples
from tuwen.workers.engine.model import Item, Runtime

#: Every field closes in a few tokens (enums, a boolean, a small integer), so even an untrained model ends.
WORKSHEET = {"type": "object", "properties": {
    "shape": {"type": "string", "enum": ["圆形", "三角形", "正方形"]},
    "count": {"type": "integer", "minimum": 0, "maximum": 9},
    "correct": {"type": "boolean"}}, "required": ["shape", "count", "correct"], "additionalProperties": False}
SCHEMA = {"type": "json_schema", "json_schema": {"name": "worksheet", "schema": WORKSHEET, "strict": True}}
OBJECT = {"type": "json_object"}


@pytest.fixture(scope="module")
def pictures(samples: list[tuple[bytes, str, str]]) -> list[tuple[bytes, str]]:
    return [(picture, question) for picture, question, _ in samples]


def test_constrained_and_free_rows_share_a_batch(rt: Runtime, pictures: list[tuple[bytes, str]]) -> None:
    free = [Item(img, q, 32) for img, q in pictures[:4]]
    alone = [rt.answer_batch([it])[0].tokens for it in free]
    shaped = [Item(img, q, 48, response_format=fmt) for (img, q), fmt in zip(pictures[4:8], [SCHEMA, OBJECT] * 2)]
    mixed = [x for pair in zip(free, shaped) for x in pair]  # free and constrained rows interleaved
    answers = rt.answer_batch(mixed)
    assert {a.batch_size for a in answers} == {8}, "one batch, one forward pass per step"
    assert [a.tokens for a in answers[0::2]] == alone, "free rows are token-identical to the same row alone"
    for item, answer in zip(shaped, answers[1::2]):
        assert answer.ok
        if item.response_format is SCHEMA:  # its fields close in a few tokens: it must end, and validate
            assert answer.finish_reason == "stop", answer
            jsonschema.validate(json.loads(answer.answer or ""), WORKSHEET)
        elif answer.finish_reason == "stop":  # free keys: the untrained demo model may talk until its budget
            assert isinstance(json.loads(answer.answer or ""), dict)
        else:
            assert answer.finish_reason == "length" and (answer.answer or "").startswith("{")
    assert rt.grammars.compiles == 2 and rt.grammars.hits >= 2, "compiled once per format, then cached"


def test_a_row_out_of_budget_inside_its_json_says_length(rt: Runtime, pictures: list[tuple[bytes, str]]) -> None:
    img, q = pictures[0]
    answer = rt.answer_batch([Item(img, q, 3, response_format=SCHEMA)])[0]
    assert answer.ok and answer.finish_reason == "length" and len(answer.tokens) == 3
    with pytest.raises(json.JSONDecodeError):
        json.loads(answer.answer or "")
    assert (answer.answer or "").startswith("{")


@pytest.mark.parametrize(("schema", "names"), [
    ({"type": "strin"}, "strin"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)a"}}}, "Lookbehind"),
    ({"type": "object", "properties": {"a": {"$ref": "#/defs/nope"}}}, "defs"),
])
def test_a_schema_the_library_cannot_enforce_fails_its_row_alone(rt: Runtime, pictures: list[tuple[bytes, str]],
                                                                  schema: dict[str, Any], names: str) -> None:
    (img, q), (img2, q2) = pictures[:2]
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": schema}}
    answers = rt.answer_batch([Item(img, q, 16, response_format=bad), Item(img2, q2, 16)])
    assert answers[0].error is not None and answers[0].error["code"] == "invalid_schema"
    assert names in answers[0].error["message"]
    assert answers[1].ok and answers[1].tokens == rt.answer_batch([Item(img2, q2, 16)])[0].tokens


def test_a_grammar_that_fails_mid_answer_fails_its_row_alone(rt: Runtime, pictures: list[tuple[bytes, str]]) -> None:
    (img, q), (img2, q2) = pictures[:2]
    group = rt.prepare([Item(img, q, 16, response_format=OBJECT), Item(img2, q2, 16)])
    made = group.rows[0].grammar

    def breaking() -> Any:
        constraint = made()
        calls = [0]

        def accept(token: int) -> None:
            calls[0] += 1
            if calls[0] == 2:
                raise RuntimeError("injected grammar fault")
            type(constraint).accept(constraint, token)
        constraint.accept = accept
        return constraint

    group.rows[0].grammar = breaking
    finished = {f.row.key: f for f in rt.engine().run(group.rows, group.enc)}
    answers = [rt.finish(group, finished[i]) for i in range(2)]
    assert answers[0].error is not None and answers[0].error["code"] == "constraint_failed"
    assert "injected grammar fault" in answers[0].error["message"]
    assert answers[1].ok and answers[1].tokens == rt.answer_batch([Item(img2, q2, 16)])[0].tokens


def test_compiles_and_cache_hits_reach_the_metrics(rt: Runtime, pictures: list[tuple[bytes, str]]) -> None:
    from prometheus_client import generate_latest

    from tuwen.workers.serve.metrics import WorkerMetrics

    metrics = WorkerMetrics()
    metrics.watch_grammars(rt)
    img, q = pictures[0]
    before = rt.grammars.hits if rt.grammars else 0
    rt.answer_batch([Item(img, q, 4, response_format=SCHEMA)] * 2)
    text = generate_latest(metrics.registry).decode()
    assert f"tuwen_grammar_cache_hits_total {float(rt.grammars.hits)}" in text and rt.grammars.hits >= before + 2
    assert "tuwen_grammar_compiles_total" in text and "tuwen_grammar_compile_seconds_total" in text
