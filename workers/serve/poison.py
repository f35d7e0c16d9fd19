"""What a worker does with a queue message it cannot run: refuse it alone, move it aside, go on.

The worker's transport (``tuwen.workers.serve.transport``) unwraps each message the way kombu and Celery will
and asks ``Screen.check`` about it before Celery sees it. Reasons, in the order the layers unwrap:

* ``not_json``, ``not_an_envelope``, ``bad_body_encoding`` — not a kombu message (transport);
* ``not_a_tuwen_job`` — not a Celery call of ``tuwen.answer`` with a JSON body ``[args, kwargs, embed]``;
* ``bad_job`` — ``kwargs["job"]`` is not a valid ``JobRequest`` (e.g. a newer producer's field).

A refused message is logged, counted (``tuwen_poison_messages_total{reason}``) and written to the
dead-letter list (``tuwen.pipeline.deadletter``, shown by ``tuwen status``). When it names a job that has a
record, that job fails with ``invalid_message`` so that its submitter is not left waiting.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from tuwen.pipeline import deadletter, stats
from tuwen.pipeline.app import SPEECH_TASK, TASK_NAME
from tuwen.pipeline.jobs import JobStore
from tuwen.pipeline.schema import ErrorInfo, JobRequest, JobResult, JobStatus
from tuwen.workers.serve.metrics import WorkerMetrics
from tuwen.workers.serve.transport import Refused

log = logging.getLogger(__name__)

INVALID_MESSAGE = "invalid_message"


def check_call(message: Any) -> None:
    """Raise ``Refused`` unless the kombu ``message`` is a ``tuwen.answer`` or ``tuwen.transcribe`` call with a valid job."""
    headers = message.headers
    job_id = headers.get("id") if isinstance(headers, dict) else None
    job_id = job_id if isinstance(job_id, str) else None
    if not isinstance(headers, dict) or headers.get("task") not in (TASK_NAME, SPEECH_TASK):
        raise Refused("not_a_tuwen_job", job_id)
    if message.content_type != "application/json":  # never decode anything else (pickle!)
        raise Refused("not_a_tuwen_job", job_id, f"content type {message.content_type!r}")
    try:
        body = json.loads(message.body)
    except (TypeError, ValueError) as exc:
        raise Refused("not_a_tuwen_job", job_id) from exc
    if not (isinstance(body, list) and len(body) == 3 and body[0] in ([], None) and isinstance(body[1], dict)
            and "job" in body[1]):
        raise Refused("not_a_tuwen_job", job_id)
    try:
        JobRequest.model_validate(body[1]["job"])
    except ValidationError as exc:
        raise Refused("bad_job", job_id) from exc


class Screen:
    """One per worker: decides about each message (``check``) and takes the refused ones (``refuse``)."""

    def __init__(self, jobs: JobStore, metrics: WorkerMetrics, worker: str,
                 on_consumed: Callable[[], None] | None = None) -> None:
        self.jobs, self.metrics, self.worker = jobs, metrics, worker
        self._on_consumed = on_consumed

    def consumed(self) -> None:
        """A message came off a queue (the liveness watchdog counts it as consuming)."""
        if self._on_consumed is not None:
            self._on_consumed()

    def check(self, message: Any) -> None:
        check_call(message)

    def refuse(self, queue: str, text: str, refused: Refused) -> None:
        """Log, count and move aside one refused message; fail its job if it has one. Never raises."""
        reason, job_id = refused.reason, refused.job_id
        log.error("refused a message on queue %s (%s); moved to %s: %.300s", queue, refused, deadletter.KEY, text)
        self.metrics.poison.labels(reason).inc()
        try:
            deadletter.put(self.jobs.redis, queue=queue, reason=reason, message=text, worker=self.worker,
                           job_id=job_id)
        except Exception:  # noqa: BLE001 - the message must at least reach the log whole
            log.exception("could not write the dead-letter entry; the refused message was: %s", text)
        if job_id:
            self._fail_job(job_id, reason)

    def _fail_job(self, job_id: str, reason: str) -> None:
        try:
            current = self.jobs.get(job_id)
            if current.status.terminal or current.status == JobStatus.unknown:
                return
            now = time.time()
            result = JobResult(
                id=job_id, status=JobStatus.failed, owner=current.owner, image_key=current.image_key,
                created_at=current.created_at, finished_at=now, attempts=current.attempts, worker=self.worker,
                error=ErrorInfo(code=INVALID_MESSAGE, message=f"the job's queue message could not be read "
                                                              f"({reason}); it was moved to {deadletter.KEY}"))
            if self.jobs.finish([result]) == [True]:
                self.metrics.jobs.labels("failed", INVALID_MESSAGE).inc()
                stats.record(self.jobs.redis, [("failed", INVALID_MESSAGE)])
        except Exception:  # noqa: BLE001 - the dead-letter entry is already written
            log.exception("could not fail job %s after refusing its message", job_id)
