"""One error map (issue 23, part 4), in a real job's result: a worker whose decode loop ends
(``TUWEN_HOOK_END_LOOP_WITH``, as a fault nobody caught would) fails the job with ``model_error``, and what
the result says (the code, whether a retry may help) answers with the status that docs/errors.md, the
exception and the catalogue give, on the chat endpoint and as a Batch API error line alike.
(Every code without a worker: tests/test_catalogues.py.)"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tuwen.pipeline.bulk.model import Bulk, BulkState, RequestCounts
from tuwen.pipeline.bulk.openai_outputs import openai_line
from tuwen.pipeline.client import Client
from tuwen.pipeline.errors import ErrorCode, ModelError, TuwenError, http_status
from tuwen.pipeline.gateway.chat_jobs import failure
from tuwen.pipeline.schema import JobStatus
from tuwen.pipeline.settings import Settings
from tests.test_catalogues import doc_rows
from tuwen.workers.bench.process import WorkerProcess
from tuwen.workers.demo.samples import load_samples
from tuwen.workers.serve.hooks import Hooks

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

POISON = "断"


def test_a_real_model_error_says_what_the_catalogue_says(pipeline_settings: Settings, tmp_path: Path) -> None:
    # Given a worker on queues of its own whose decode loop ends on a prompt that holds POISON
    tag = uuid.uuid4().hex[:8]
    settings = pipeline_settings.model_copy(update={"interactive_queue": f"em-i-{tag}", "bulk_queue": f"em-b-{tag}"})
    client = Client(settings)
    sample = load_samples()[0]
    worker = WorkerProcess(settings, f"error-map-{tag}@tests", tmp_path / "worker.log",
                           hooks=Hooks(end_loop_with=POISON))
    worker.start()
    try:
        worker.wait_ready(timeout=180)
        # When a job asks a question that holds it
        job = client.submit(sample.path.read_bytes(), POISON + sample.question, owner="error-map")
        result = client.wait(job.id, timeout=120, owner="error-map")
        log = worker.log_path.read_text("utf-8", "replace")
    finally:
        worker.stop()
        client.close()
    # Then the job failed with model_error, because the loop ended (not by some other way)
    assert result.status == JobStatus.failed and result.error is not None, result
    assert result.error.code == "model_error" and "decode loop stopped" in result.error.message, result.error
    assert "injected end of the decode loop" in log
    # And its retryable flag and status are the same in the result, docs/errors.md, the exception and the catalogue
    code = ErrorCode(result.error.code)
    said = (http_status(result.error.code), result.error.retryable)
    assert said == (code.status, code.retryable) == doc_rows()[code.value]
    for error in (ModelError("probe"), TuwenError("probe", code=code.value)):
        assert (error.status, error.retryable) == said, error
    # And the chat endpoint and a Batch API error line answer this very result with that status
    openai = http_status(code.value, openai=True)
    assert failure(job.id, result, 1.0).status == openai == code.status == 503
    bulk = Bulk(id="batch_probe", state=BulkState.in_progress, input="probe", owner="error-map",
                request_counts=RequestCounts(total=1), created_at=0.0, expires_at=1.0)
    line, ok = openai_line(bulk, {"n": 1, "c": "probe", "j": job.id}, result)
    assert not ok and line["response"]["status_code"] == openai, line
    assert line["response"]["body"]["error"]["code"] == code.value and line["response"]["request_id"] == job.id
