"""A bulk's progress against the moves of its submitter: a line recorded while a refresh counts does not
end the bulk, and a cancelled bulk is ``cancelling`` until its running lines have finished."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tuwen.pipeline.bulk.manifest import Record, open_source
from tuwen.pipeline.bulk.model import BulkState
from tuwen.pipeline.bulk.records import entry_for
from tuwen.pipeline.bulk.store import BulkStore
from tuwen.pipeline.schema import JobResult, JobStatus, Priority
from tests.bulk.conftest import draw_pictures, write_jsonl

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_a_line_recorded_while_a_refresh_counts_does_not_end_the_bulk(
        idle_store: BulkStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a one-line bulk whose line is not recorded yet
    [(picture, question)] = draw_pictures(tmp_path, 1, seed=3)
    bulk = idle_store.create("bulk_" + uuid.uuid4().hex[:24], name="race", owner="default")
    idle_store.records.validated(bulk.id, 1, [])
    counted = idle_store.progress._count

    def count_then_the_submitter_records_its_line(bulk_id: str) -> bool:
        pending = counted(bulk_id)  # no line yet: nothing pending
        job = idle_store.client.prepare(picture, question, priority=Priority.bulk, bulk_id=bulk_id)
        idle_store.client.enqueue(job)
        idle_store.records.append(bulk_id, entry_for(Record(1, "only", question=question), job_id=job.id))
        return pending

    # When a refresh counts the lines just before the submitter records its (queued) line
    monkeypatch.setattr(idle_store.progress, "_count", count_then_the_submitter_records_its_line)
    raced = idle_store.refresh(bulk.id)
    monkeypatch.undo()
    # Then the bulk goes on (it used to complete at once, its queued line counted as failed)
    assert raced.state == BulkState.in_progress and raced.output_key is None
    assert idle_store.refresh(bulk.id).request_counts.model_dump() == {"total": 1, "completed": 0, "failed": 0}
    idle_store.cancel(bulk.id)


def test_a_cancelled_bulk_is_cancelling_until_its_running_line_finishes(
        idle_store: BulkStore, tmp_path: Path) -> None:
    # Given a three-line bulk whose first line a worker is running
    pics = draw_pictures(tmp_path, 3, seed=4)
    manifest = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": f"c{i}", "image": p.name, "question": q}
                                                    for i, (p, q) in enumerate(pics)])
    bulk = idle_store.submit(open_source(manifest))
    first = next(idle_store.results(bulk.id))["job_id"]
    assert idle_store.client.jobs.claim([first], "worker@test")[first][0] == "running"
    # When it is cancelled
    cancelling = idle_store.cancel(bulk.id)
    # Then it is cancelling, its queued lines cancelled, while the running one finishes
    assert cancelling.state == BulkState.cancelling and cancelling.cancelling_at and cancelling.output_key is None
    assert idle_store.refresh(bulk.id).state == BulkState.cancelling
    idle_store.client.jobs.finish([JobResult(id=first, status=JobStatus.succeeded, answer="图中是圆形。")])
    # And once it has, cancelled, the finished line kept in its results
    cancelled = idle_store.refresh(bulk.id)
    assert cancelled.state == BulkState.cancelled and cancelled.cancelled_at and cancelled.output_key
    assert cancelled.request_counts.model_dump() == {"total": 3, "completed": 1, "failed": 2}
    assert [r["status"] for r in idle_store.results(bulk.id)] == ["succeeded", "cancelled", "cancelled"]
