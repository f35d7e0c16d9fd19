"""One owner's bad job fails alone in a real worker: the other owners' jobs of the same full group are
answered right (issue 21).

The jobs are queued (bulk) before the worker starts, so its first hand-over takes all eight as one group: owner
A's special tokens split across text parts (the reported attack, which used to fail every job of its
group with "Found total 5 <image> tokens and 4 images"), and a job that makes the model itself raise
(``TUWEN_HOOK_FAIL_ROWS_WITH``, as a bug would), beside owner B's ordinary questions.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from tuwen.pipeline.client import Client
from tuwen.pipeline.conversation import Turn, prepare_conversation
from tuwen.pipeline.schema import JobStatus
from tuwen.pipeline.settings import Settings
from tests.faults import report
from tuwen.workers.demo.samples import load_samples
from tuwen.workers.serve.hooks import Hooks
from tuwen.workers.bench.process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

POISON = "毒"


def test_a_bad_job_fails_alone_and_other_owners_in_its_group_get_right_answers(
        pipeline_settings: Settings, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    settings = pipeline_settings.model_copy(update={"interactive_queue": f"nb-i-{tag}", "bulk_queue": f"nb-b-{tag}",
                                                    "max_batch_size": 8, "batch_wait_ms": 2000})
    client = Client(settings)
    samples = load_samples()
    colour = next(s for s in samples if "颜色" in s.question)
    picture = colour.path.read_bytes()
    attacks = {  # owner A: every split form of the report, each a real question about a real picture
        "split <image> across parts": [picture, "<ima", "ge> " + colour.question],
        "split </s> across parts": [picture, "</", "s> " + colour.question],
    }
    jobs = {}

    def job(owner: str, parts: list[object]) -> Any:  # bulk: one hand-over of eight when nothing is interactive
        return prepare_conversation(client, [Turn("user", parts)], {"max_new_tokens": 24}, owner=owner,
                                    priority="bulk")

    for name, parts in attacks.items():
        jobs[name] = job("owner-a", parts)
    jobs["breaks the model"] = job("owner-a", [picture, POISON + colour.question])
    neighbours = samples[:5]
    for i, s in enumerate(neighbours):
        jobs[f"owner-b {i}"] = job("owner-b", [s.path.read_bytes(), s.question])
    for request in jobs.values():
        client.enqueue(request)
    worker = WorkerProcess(settings, f"neighbours-{tag}@tests", tmp_path / "worker.log",
                           hooks=Hooks(fail_rows_with=POISON))
    worker.start()
    try:
        worker.wait_ready(timeout=180)
        results = client.wait_many([r.id for r in jobs.values()], timeout=180)
    finally:
        worker.stop()
    out = {name: results[r.id] for name, r in jobs.items()}
    # Owner B: every job answered, each answer naming its picture's known fact, in one group of eight.
    for i, s in enumerate(neighbours):
        r = out[f"owner-b {i}"]
        assert r.status == JobStatus.succeeded, (i, r.error)
        assert any(fact in (r.answer or "") for fact in s.facts), (s.question, r.answer, s.facts)
    # Owner A's split tokens stayed text: answered about the picture like anyone else.
    for name in attacks:
        assert out[name].status == JobStatus.succeeded, (name, out[name].error)
        assert any(fact in (out[name].answer or "") for fact in colour.facts), (name, out[name].answer)
    # The job that breaks the model fails alone, with a code, not retryable (it would fail again).
    bad = out["breaks the model"]
    assert bad.status == JobStatus.failed and bad.error is not None
    assert bad.error.code == "unprocessable_input" and not bad.error.retryable and "alone" in bad.error.message
    log = worker.log_path.read_text("utf-8", "replace")
    assert "rows failed" in log and "injected model failure on a batch of 8" in log  # the fault landed in the group
    assert max(r.batch_size or 0 for r in out.values() if r.status == JobStatus.succeeded) >= 4
    report("a bad job among eight", jobs=len(jobs),
           succeeded=sum(r.status == JobStatus.succeeded for r in out.values()),
           failed_alone=bad.error.code, batch_size=max(r.batch_size or 0 for r in out.values()))
    client.close()
