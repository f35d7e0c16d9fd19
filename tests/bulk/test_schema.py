"""``tuwen bulk submit --schema schema.json`` (issue 24, part 5): every line's answer is a JSON object valid
against the schema (checked again with ``jsonschema``), a line's own params override it, and a schema that
cannot be enforced refuses the whole file before any line is stored or queued."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from tests.bulk.conftest import draw_pictures, write_jsonl
from tests.cli import tuwen_here
from tuwen.pipeline.bulk.store import BulkStore
from tuwen.pipeline.settings import Settings
from tuwen.workers.bench.process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

GRADE = {"type": "object", "properties": {"count": {"type": "integer", "minimum": 0, "maximum": 9},
                                          "correct": {"type": "boolean"}},
         "required": ["count", "correct"], "additionalProperties": False}


def test_every_answer_validates_and_a_line_may_override(worker: WorkerProcess, pipeline_settings: Settings,
                                                        store: BulkStore, tmp_path: Path) -> None:
    pictures = draw_pictures(tmp_path, 3, seed=2424)
    manifest = write_jsonl(tmp_path / "grade.jsonl", [
        {"custom_id": "a", "image": pictures[0][0].name, "question": pictures[0][1]},
        {"custom_id": "b", "image": pictures[1][0].name, "question": pictures[1][1], "params": {"max_new_tokens": 40}},
        {"custom_id": "c", "image": pictures[2][0].name, "question": pictures[2][1],
         "params": {"response_format": {"type": "text"}, "max_new_tokens": 24}}])
    schema = tmp_path / "grade.json"
    schema.write_text(json.dumps(GRADE), encoding="utf-8")
    out = tuwen_here("bulk", "submit", str(manifest), "--schema", str(schema), env=pipeline_settings.to_env())
    assert out.returncode == 0, out.stderr
    (bulk,) = [b for b in store.recent(50) if b.input == str(manifest)]
    lines = {line["custom_id"]: line for line in store.results(bulk.id)}
    for cid in ("a", "b"):
        jsonschema.validate(json.loads(lines[cid]["answer"]), GRADE)
    assert not lines["c"]["answer"].startswith("{"), "its own response_format (text) overrides the file's"


def test_a_schema_that_cannot_be_enforced_refuses_the_file(pipeline_settings: Settings, store: BulkStore,
                                                           tmp_path: Path) -> None:
    pictures = draw_pictures(tmp_path, 1, seed=2425)
    manifest = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": "a", "image": pictures[0][0].name,
                                                    "question": pictures[0][1]}])
    schema = tmp_path / "bad.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)"}}}))
    out = tuwen_here("bulk", "submit", str(manifest), "--schema", str(schema), env=pipeline_settings.to_env())
    assert out.returncode == 2 and "invalid_schema" in out.stderr and "Lookbehind" in out.stderr, out.stderr
    assert not [b for b in store.recent(50) if b.input == str(manifest)], "no bulk was made"
