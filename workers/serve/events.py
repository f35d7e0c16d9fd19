"""Per-job task events, so Flower shows each job's real state instead of PENDING forever.

celery-batches sends no per-request events (measured: every job stayed PENDING in Flower). The worker
sends them itself: ``task-received`` when a message arrives, ``task-started`` when its batch starts,
``task-succeeded`` / ``task-failed`` with the runtime when its result is written. Each hand-over from
the queue to the decode loop also appears as a task of its own (``tuwen.group``) listing its job ids.

Events go out in batches, as Celery's own worker sends its task events: buffered, then published as one
``task.multi`` message (a list, which Flower's event receiver takes like single events) when
``BUFFER`` events are waiting or ``FLUSH_S`` after the first. One event per message cost a Redis round
trip and kombu's publishing path each, about three per job, all under the GIL the decode loop needs
(measured: 11% of the worker's GIL time in a backlog).

What Flower shows as arguments and results is ids, keys and parameters. Question and answer text may be
students' data: they are shown only when ``TUWEN_FLOWER_SHOW_TEXT`` is true.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from celery import Celery

from tuwen.pipeline.schema import JobRequest, JobResult, JobStatus

#: Most events in one message, and longest an event waits for others (seconds).
BUFFER = 64
FLUSH_S = 0.1


def job_kwargs_repr(job: JobRequest, show_text: bool) -> str:
    shown: dict[str, Any] = {"job_id": job.id, "image_keys": job.image_keys, "turns": len(job.messages),
                             "params": job.params.model_dump(mode="json"), "priority": job.priority.value,
                             "owner": job.owner}
    if job.bulk_id:
        shown["bulk_id"] = job.bulk_id
    if show_text:
        shown["question"] = job.question
    return repr(shown)


def result_repr(result: JobResult, show_text: bool) -> str:
    shown: dict[str, Any] = {"status": result.status.value, "batch_size": result.batch_size,
                             "generated_tokens": result.generated_tokens, "cached": result.cached}
    if show_text and result.answer is not None:
        shown["answer"] = result.answer
    return repr(shown)


class JobEvents:
    """Sends task events from the batch thread over its own connection (thread-safe, lazily opened)."""

    def __init__(self, app: Celery, hostname: str, show_text: bool) -> None:
        self.app, self.hostname, self.show_text = app, hostname, show_text
        self._dispatcher: Any = None
        self._lock = threading.Lock()
        self._waiting = threading.Event()  #: events are buffered
        self._flusher: threading.Thread | None = None

    def _send(self, kind: str, **fields: Any) -> None:
        with self._lock:
            try:
                if self._dispatcher is None:
                    self._dispatcher = self.app.events.Dispatcher(
                        self.app.connection_for_write(), hostname=self.hostname, enabled=True,
                        buffer_group={"task"}, buffer_limit=BUFFER)
                self._dispatcher.send(kind, **fields)
            except Exception:  # noqa: BLE001 - monitoring must never fail a batch
                self._dispatcher = None
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_loop, name="tuwen-events", daemon=True)
                self._flusher.start()
        self._waiting.set()

    def flush(self) -> None:
        """Publish what is buffered now (also at worker shutdown)."""
        self._waiting.clear()
        with self._lock:
            try:
                if self._dispatcher is not None:
                    self._dispatcher.flush()
            except Exception:  # noqa: BLE001 - monitoring must never fail a batch (Redis away: events lost)
                self._dispatcher = None

    def _flush_loop(self) -> None:
        while True:
            self._waiting.wait()
            time.sleep(FLUSH_S)
            self.flush()

    def received_message(self, request: Any) -> None:
        """``received`` for a Celery request as ``task_received`` hands it over; a malformed message is dealt
        with in its batch, not here."""
        try:
            self.received(JobRequest.model_validate(request.kwargs["job"]))
        except Exception:  # noqa: BLE001 - see above
            pass

    def received(self, job: JobRequest) -> None:
        self._send("task-received", uuid=job.id, name="tuwen.answer", args="()",
                   kwargs=job_kwargs_repr(job, self.show_text), retries=0, eta=None, expires=None,
                   root_id=job.id, parent_id=None)

    def started(self, jobs: list[JobRequest]) -> str:
        group_id = uuid.uuid4().hex
        self._send("task-received", uuid=group_id, name="tuwen.group", args="()",
                   kwargs=repr({"jobs": [j.id for j in jobs]}), retries=0, eta=None, expires=None,
                   root_id=group_id, parent_id=None)
        self._send("task-started", uuid=group_id)
        for job in jobs:
            self._send("task-started", uuid=job.id)
        return group_id

    def ended(self, results: list[JobResult]) -> None:
        """Each job as its result is written (rows leave the decode loop one by one)."""
        for r in results:
            runtime = ((r.finished_at or time.time()) - (r.started_at or r.created_at or time.time()))
            if r.status == JobStatus.succeeded:
                self._send("task-succeeded", uuid=r.id, result=result_repr(r, self.show_text), runtime=runtime)
            else:
                code = r.error.code if r.error else r.status.value
                message = r.error.message if r.error else ""
                self._send("task-failed", uuid=r.id, exception=f"{code}: {message}", traceback="")

    def finished(self, group_id: str, results: list[JobResult], runtime_s: float) -> None:
        ok = sum(r.status == JobStatus.succeeded for r in results)
        self._send("task-succeeded", uuid=group_id, runtime=runtime_s,
                   result=repr({"jobs": len(results), "succeeded": ok, "at": time.time()}))
