"""A bulk line whose params ask for ``n`` and ``logprobs`` (issue 24, part 4): its result line carries every
choice, each with one log probability entry per answer token; a line with ``n`` over the limit fails alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bulk.conftest import draw_pictures, write_jsonl
from tests.cli import tuwen_here
from tuwen.pipeline.bulk.store import BulkStore
from tuwen.pipeline.schema import MAX_CHOICES
from tuwen.pipeline.settings import Settings
from tuwen.workers.bench.process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def test_a_line_with_n_and_logprobs_has_every_choice(worker: WorkerProcess, pipeline_settings: Settings,
                                                     store: BulkStore, tmp_path: Path) -> None:
    pictures = draw_pictures(tmp_path, 2, seed=2426)
    manifest = write_jsonl(tmp_path / "choices.jsonl", [
        {"custom_id": "a", "image": pictures[0][0].name, "question": pictures[0][1],
         "params": {"n": 2, "max_new_tokens": 24, "logprobs": True, "top_logprobs": 1}},
        {"custom_id": "b", "image": pictures[1][0].name, "question": pictures[1][1], "params": {"n": MAX_CHOICES + 1}}])
    out = tuwen_here("bulk", "submit", str(manifest), env=pipeline_settings.to_env())
    (bulk,) = [b for b in store.recent(50) if b.input == str(manifest)]
    lines = {line["custom_id"]: line for line in store.results(bulk.id)}
    a = lines["a"]
    assert a["status"] == "succeeded", (a, out.stderr)
    assert [c["index"] for c in a["choices"]] == [0, 1] and a["answer"] == a["choices"][0]["answer"]
    assert a["choices"][0]["answer"] == a["choices"][1]["answer"], "greedy choices are the same answer"
    for c in a["choices"]:
        assert len(c["logprobs"]) == c["generated_tokens"] and all(len(e["top_logprobs"]) == 1 for e in c["logprobs"])
    assert lines["b"]["status"] == "failed" and lines["b"]["error"]["code"] == "invalid_params"
    assert "choices" not in lines["b"]
