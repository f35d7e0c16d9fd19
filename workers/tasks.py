"""The batch task ``tuwen.answer``: celery-batches hands it a list of jobs; it answers them together.

Contract: every job handed in gets exactly one terminal result in the job store, whatever happens
(celery-batches only logs an exception that escapes and then acknowledges the messages). A job that
already ended — a redelivery after a crash — is neither recomputed nor overwritten.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import Celery
from celery_batches import Batches

from pipeline.app import TASK_NAME, make_celery
from pipeline.errors import TuwenError, Unavailable
from pipeline.jobs import JobStore
from pipeline.schema import ErrorInfo, JobRequest, JobResult, JobStatus
from pipeline.settings import Settings
from storage.errors import ObjectNotFound, StorageError
from workers.runtime import Item, Runtime

log = logging.getLogger(__name__)


def _failed(job: JobRequest, code: str, message: str, **extra: Any) -> JobResult:
    return JobResult(id=job.id, status=JobStatus.failed, error=ErrorInfo(code=code, message=message),
                     owner=job.owner, image_key=job.image_key, created_at=job.created_at,
                     finished_at=time.time(), **extra)


class BatchAnswerer:
    """Everything one worker process needs to answer batches: runtime, job store, image store."""

    def __init__(self, settings: Settings, runtime: Runtime, jobs: JobStore, images: Any) -> None:
        self.settings = settings
        self.runtime = runtime
        self.jobs = jobs
        self.images = images
        self._fetch_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="tuwen-fetch")
        #: How long a batch keeps retrying an unreachable storage before giving its jobs back.
        self.storage_wait_s = 60.0

    def run(self, requests: Sequence[Any], worker: str) -> None:
        """Answer one batch of celery-batches ``SimpleRequest``s."""
        jobs = self._parse(requests)
        if not jobs:
            return
        try:
            self._answer(jobs, worker)
        except Exception as exc:  # noqa: BLE001 - the contract: every job ends, whatever happened
            log.exception("batch of %d failed", len(jobs))
            code = exc.code if isinstance(exc, TuwenError) else "internal_error"
            self._write([_failed(j, code, f"the worker failed on this batch: {exc}", worker=worker) for j in jobs])

    def _parse(self, requests: Sequence[Any]) -> list[JobRequest]:
        jobs = []
        for r in requests:
            try:
                jobs.append(JobRequest.model_validate((r.kwargs or {})["job"]))
            except Exception as exc:  # noqa: BLE001 - a malformed message must not sink the batch
                log.error("dropping malformed job message %s: %s", getattr(r, "id", "?"), exc)
        return jobs

    def _answer(self, jobs: list[JobRequest], worker: str) -> None:
        started = time.time()
        claims = self.jobs.claim([j.id for j in jobs], worker)
        runnable: list[tuple[JobRequest, int]] = []
        results: list[JobResult] = []
        for job in jobs:
            state, attempts = claims[job.id]
            if state != "running":
                log.info("job %s is %s; not running it again", job.id, state)
            elif attempts > self.settings.max_attempts:
                results.append(_failed(job, "too_many_attempts",
                                       f"the job was attempted {attempts - 1} times without finishing",
                                       attempts=attempts, worker=worker))
            else:
                runnable.append((job, attempts))
        images, fetch_ms, fetch_failures = self._fetch([j for j, _ in runnable])
        results += [_failed(j, e.code, e.message, attempts=a, worker=worker)
                    for (j, a) in runnable if (e := fetch_failures.get(j.id))]
        todo = [(j, a) for j, a in runnable if j.id in images]
        answers = self.runtime.answer_batch(
            [Item(images[j.id], j.question, j.params.max_new_tokens) for j, _ in todo]) if todo else []
        finished = time.time()
        for (job, attempts), ans in zip(todo, answers):
            timings = {
                "queue_ms": round((started - job.created_at) * 1000, 1),
                "fetch_ms": round(fetch_ms, 1),
                **ans.timings,
                "total_ms": round((finished - job.created_at) * 1000, 1),
            }
            common = dict(id=job.id, owner=job.owner, image_key=job.image_key, created_at=job.created_at,
                          started_at=started, finished_at=finished, attempts=attempts, worker=worker,
                          model_id=self.runtime.model_id, timings=timings)
            if ans.ok:
                results.append(JobResult(status=JobStatus.succeeded, answer=ans.answer, batch_size=ans.batch_size,
                                         prompt_tokens=ans.prompt_tokens, generated_tokens=ans.generated_tokens,
                                         **common))
            else:
                assert ans.error is not None
                results.append(JobResult(status=JobStatus.failed, error=ErrorInfo(**ans.error), **common))
        self._write(results)

    def _fetch(self, jobs: list[JobRequest]) -> tuple[dict[str, bytes], float, dict[str, TuwenError]]:
        """Fetch the batch's images concurrently; transient storage errors are retried with backoff."""
        t0 = time.perf_counter()
        images: dict[str, bytes] = {}
        failures: dict[str, TuwenError] = {}
        pending = list(jobs)
        delay, deadline = 0.5, time.monotonic() + self.storage_wait_s
        while pending:
            outcomes = list(self._fetch_pool.map(self._get_one, pending))
            retry = []
            for job, outcome in zip(pending, outcomes):
                if isinstance(outcome, bytes):
                    images[job.id] = outcome
                elif isinstance(outcome, ObjectNotFound):
                    failures[job.id] = TuwenError("the job's image is no longer in storage", code="image_not_found")
                elif outcome.retryable and time.monotonic() < deadline:
                    retry.append(job)
                else:
                    failures[job.id] = Unavailable(f"image storage failed: {outcome}", code=outcome.code)
            pending = retry
            if pending:
                log.warning("storage unavailable for %d images; retrying in %.1fs", len(pending), delay)
                time.sleep(delay)
                delay = min(delay * 2, 8.0)
        return images, (time.perf_counter() - t0) * 1000, failures

    def _get_one(self, job: JobRequest) -> bytes | StorageError:
        try:
            return bytes(self.images.get(job.image_key))
        except StorageError as exc:
            return exc

    def _write(self, results: list[JobResult]) -> None:
        """Write results, riding out a short Redis outage (the messages are acknowledged after this)."""
        delay, deadline = 0.5, time.monotonic() + max(60.0, self.settings.visibility_timeout_s / 4)
        while True:
            try:
                self.jobs.finish(results)
                return
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
                log.warning("Redis unavailable while writing %d results; retrying in %.1fs", len(results), delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)


def make_worker_app(settings: Settings, answerer: BatchAnswerer) -> Celery:
    """The worker's Celery app with the batch task registered under ``tuwen.answer``."""
    app = make_celery(settings, worker=True)

    @app.task(name=TASK_NAME, base=Batches, bind=True, acks_late=True,
              flush_every=settings.max_batch_size, flush_interval=max(settings.batch_wait_ms, 5) / 1000)
    def answer(self: Batches, requests: Sequence[Any]) -> None:
        worker = requests[0].hostname if requests else "?"
        answerer.run(requests, worker=worker or "?")

    return app
