"""The batch task ``tuwen.answer``: celery-batches hands it a list of jobs; it answers them together.

Contract: every job handed in gets exactly one terminal result in the job store, whatever happens
(celery-batches only logs an exception that escapes and then acknowledges the messages). A job that
already ended — a redelivery after a crash — is neither recomputed nor overwritten.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from celery import Celery, signals
from celery_batches import Batches

from tuwen.pipeline import app as queue
from tuwen.pipeline import stats
from tuwen.pipeline.errors import TuwenError, Unavailable
from tuwen.pipeline.jobs import JobStore
from tuwen.pipeline.schema import ErrorInfo, JobRequest, JobResult, JobStatus
from tuwen.pipeline.settings import Settings
from tuwen.storage.errors import ObjectNotFound, StorageError
from tuwen.workers.cache import AnswerCache
from tuwen.workers.events import JobEvents
from tuwen.workers.metrics import WorkerMetrics
from tuwen.workers.runtime import Item, Runtime

log = logging.getLogger(__name__)


@dataclass
class _Run:
    """One job inside a batch, with what the batch learnt about it."""

    job: JobRequest
    attempts: int
    image: bytes | None = None


class StorageDown(Exception):
    """Storage stayed unreachable for ``storage_wait_s``: the batch's jobs go back to the queue."""


class BatchAnswerer:
    """Everything one worker process needs to answer batches: runtime, job store, image store."""

    def __init__(self, settings: Settings, runtime: Runtime, jobs: JobStore, images: Any,
                 metrics: WorkerMetrics | None = None) -> None:
        self.settings = settings
        self.runtime = runtime
        self.jobs = jobs
        self.images = images
        self.metrics = metrics or WorkerMetrics()
        self.cache = AnswerCache(jobs.redis, settings.answer_cache_ttl_s) if settings.answer_cache else None
        self.events: JobEvents | None = None
        self.celery: Celery | None = None
        self._fetch_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="tuwen-fetch")

    # -- entry point ---------------------------------------------------------------------------------
    def run(self, requests: Sequence[Any], worker: str) -> None:
        """Answer one batch of celery-batches ``SimpleRequest``s."""
        jobs = self._parse(requests)
        if not jobs:
            return
        t0 = time.perf_counter()
        batch_event = self.events.started(jobs) if self.events else ""
        try:
            results = self._answer(jobs, worker)
        except StorageDown:
            self._give_back(jobs)
            return
        except Exception as exc:  # noqa: BLE001 - the contract: every job ends, whatever happened
            log.exception("batch of %d failed", len(jobs))
            code = exc.code if isinstance(exc, TuwenError) else "internal_error"
            results = [self._failed(j, code, f"the worker failed on this batch: {exc}", worker=worker) for j in jobs]
        written = self._write(results)
        fresh = [r for r, w in zip(results, written) if w]
        self._account(fresh)
        if self.events:
            self.events.finished(batch_event, fresh, time.perf_counter() - t0)

    def _parse(self, requests: Sequence[Any]) -> list[JobRequest]:
        jobs = []
        for r in requests:
            try:
                jobs.append(JobRequest.model_validate((r.kwargs or {})["job"]))
            except Exception as exc:  # noqa: BLE001 - a malformed message must not sink the batch
                log.error("dropping malformed job message %s: %s", getattr(r, "id", "?"), exc)
        return jobs

    # -- the batch -------------------------------------------------------------------------------------
    def _answer(self, jobs: list[JobRequest], worker: str) -> list[JobResult]:
        started = time.time()
        claims = self.jobs.claim([j.id for j in jobs], worker)
        results: list[JobResult] = []
        runs: list[_Run] = []
        for job in jobs:
            state, attempts = claims[job.id]
            if state != "running":
                log.info("job %s is %s; not running it again", job.id, state)
            elif attempts > self.settings.max_attempts:
                results.append(self._failed(job, "too_many_attempts",
                                            f"the job was started {attempts - 1} times without finishing",
                                            attempts=attempts, worker=worker))
            else:
                runs.append(_Run(job, attempts))
                self.metrics.queue_wait.observe(max(0.0, started - job.created_at))
        model_id = self.runtime.model_id
        hits = self.cache.lookup([r.job for r in runs], model_id) if self.cache else {}
        for run in runs:
            if run.job.id in hits:
                results.append(self._succeeded(run, worker, started, {"cached": True, **hits[run.job.id]}))
        runs = [r for r in runs if r.job.id not in hits]
        fetch_ms = self._fetch(runs)
        for run in runs:
            if isinstance(run.image, TuwenError):
                err = run.image
                results.append(self._failed(run.job, err.code, err.message, attempts=run.attempts, worker=worker))
        todo = [r for r in runs if isinstance(r.image, bytes)]
        if not todo:
            return results
        t_model = time.perf_counter()
        answers = self.runtime.answer_batch([Item(r.image, r.job.question, r.job.params.max_new_tokens)  # type: ignore[arg-type]
                                             for r in todo])
        self.metrics.model_seconds.observe(time.perf_counter() - t_model)
        self.metrics.batch_size.observe(len(todo))
        fresh: list[tuple[JobRequest, dict[str, Any]]] = []
        for run, ans in zip(todo, answers):
            if ans.ok:
                entry = {"answer": ans.answer, "prompt_tokens": ans.prompt_tokens,
                         "generated_tokens": ans.generated_tokens}
                fresh.append((run.job, entry))
                results.append(self._succeeded(run, worker, started, {
                    **entry, "batch_size": ans.batch_size, "timings": {"fetch_ms": round(fetch_ms, 1), **ans.timings}}))
            else:
                assert ans.error is not None
                results.append(self._failed(run.job, ans.error["code"], ans.error["message"], attempts=run.attempts,
                                            worker=worker, model_id=model_id, started_at=started))
        if self.cache:
            self.cache.store(fresh, model_id)
        return results

    def _succeeded(self, run: _Run, worker: str, started: float, fields: dict[str, Any]) -> JobResult:
        finished = time.time()
        job = run.job
        timings = {"queue_ms": round((started - job.created_at) * 1000, 1), **fields.pop("timings", {}),
                   "total_ms": round((finished - job.created_at) * 1000, 1)}
        return JobResult(id=job.id, status=JobStatus.succeeded, owner=job.owner, image_key=job.image_key,
                         created_at=job.created_at, started_at=started, finished_at=finished, attempts=run.attempts,
                         worker=worker, model_id=self.runtime.model_id, timings=timings,
                         cancel_requested=self._cancel_requested(job.id), **fields)

    def _failed(self, job: JobRequest, code: str, message: str, **extra: Any) -> JobResult:
        finished = time.time()
        return JobResult(id=job.id, status=JobStatus.failed, error=ErrorInfo(code=code, message=message),
                         owner=job.owner, image_key=job.image_key, created_at=job.created_at, finished_at=finished,
                         timings={"total_ms": round((finished - job.created_at) * 1000, 1)}, **extra)

    def _cancel_requested(self, job_id: str) -> bool:
        try:
            return self.jobs.cancel_requested(job_id)
        except Unavailable:
            return False

    # -- storage ------------------------------------------------------------------------------------------
    def _fetch(self, runs: list[_Run]) -> float:
        """Fetch the images concurrently; transient storage errors are retried with backoff for up to
        ``storage_wait_s``, then ``StorageDown`` hands the batch back to the queue."""
        t0 = time.perf_counter()
        pending = list(runs)
        delay, deadline = 0.5, time.monotonic() + self.settings.storage_wait_s
        while pending:
            outcomes = list(self._fetch_pool.map(self._get_one, pending))
            retry = []
            for run, outcome in zip(pending, outcomes):
                if isinstance(outcome, bytes):
                    run.image = outcome
                    self.metrics.images_fetched.inc()
                    self.metrics.image_bytes.inc(len(outcome))
                elif isinstance(outcome, ObjectNotFound):
                    run.image = TuwenError("the job's image is no longer in storage", code="image_not_found")  # type: ignore[assignment]
                elif outcome.retryable:
                    retry.append(run)
                else:
                    run.image = TuwenError(f"image storage refused the request: {outcome}", code=outcome.code)  # type: ignore[assignment]
            pending = retry
            if pending:
                if time.monotonic() + delay > deadline:
                    raise StorageDown(f"storage unreachable for {self.settings.storage_wait_s:.0f}s")
                log.warning("storage unavailable for %d images; retrying in %.1fs", len(pending), delay)
                time.sleep(delay)
                delay = min(delay * 2, 8.0)
        return (time.perf_counter() - t0) * 1000

    def _get_one(self, run: _Run) -> bytes | StorageError:
        try:
            return bytes(self.images.get(run.job.image_key))
        except StorageError as exc:
            return exc

    def _give_back(self, jobs: list[JobRequest]) -> None:
        """Put the batch's jobs back on their queues (as new messages) and mark them queued again."""
        log.warning("storage still unreachable; giving %d jobs back to the queue", len(jobs))
        self.jobs.requeue([j.id for j in jobs])
        assert self.celery is not None
        for job in jobs:
            queue.enqueue(self.celery, self.settings, job, countdown=5)

    # -- results -----------------------------------------------------------------------------------------
    def _write(self, results: list[JobResult]) -> list[bool]:
        """Write results, riding out a short Redis outage (the messages are acknowledged after this)."""
        delay, deadline = 0.5, time.monotonic() + max(60.0, self.settings.visibility_timeout_s / 4)
        while True:
            try:
                return self.jobs.finish(results)
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
                log.warning("Redis unavailable while writing %d results; retrying in %.1fs", len(results), delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _account(self, results: list[JobResult]) -> None:
        outcomes = [(r.status.value, r.error.code if r.error else None) for r in results]
        for (status, code), r in zip(outcomes, results):
            self.metrics.jobs.labels(status, code or "").inc()
            if r.cached:
                self.metrics.cache_hits.inc()
            elif status == "succeeded":
                self.metrics.cache_misses.inc()
                self.metrics.generated_tokens.inc(r.generated_tokens or 0)
        try:
            stats.record(self.jobs.redis, outcomes)
            self.metrics.observe_device()
        except Exception:  # noqa: BLE001 - statistics never fail a batch
            log.debug("could not record statistics", exc_info=True)


class FillingBatches(Batches):
    """celery-batches, with batches that fill under load and stay prompt when idle.

    Stock celery-batches flushes whatever is buffered on every timer tick, so a backlog drained one
    message at a time became batches of 2–5 out of 8 (measured). Here a tick flushes only when the
    buffer is full, or when the oldest buffered job has waited ``max_wait_s`` and the model is free;
    while a batch runs, the next one keeps filling. A flush never hands over more than
    ``flush_every`` jobs at once (the batch-size limit is a memory limit).
    """

    abstract = True
    #: Longest a job waits in the buffer for others to join it (``TUWEN_BATCH_WAIT_MS``).
    max_wait_s = 0.05

    def __init__(self) -> None:
        super().__init__()
        self._oldest: float | None = None
        self._busy = 0
        self._busy_lock = threading.Lock()

    def note_arrival(self) -> None:
        if self._oldest is None:
            self._oldest = time.monotonic()

    def _do_flush(self) -> None:
        size = self._buffer.qsize()
        waited = time.monotonic() - self._oldest if self._oldest is not None else 0.0
        if 0 < size < self.flush_every and (self._busy or waited < self.max_wait_s):
            return
        self._oldest = None
        super()._do_flush()

    def flush(self, requests: Any) -> Any:
        requests = list(requests)
        result = None
        for start in range(0, len(requests), self.flush_every):
            result = super().flush(requests[start:start + self.flush_every])
        return result

    def running(self, delta: int) -> None:
        with self._busy_lock:
            self._busy += delta


def make_worker_app(settings: Settings, answerer: BatchAnswerer, hostname: str | None = None) -> Celery:
    """The worker's Celery app with the batch task registered under ``tuwen.answer``."""
    app = queue.make_celery(settings, worker=True)
    answerer.celery = app
    if hostname:
        answerer.events = JobEvents(app, hostname, settings.flower_show_text)

    wait_s = max(settings.batch_wait_ms, 4) / 1000

    @app.task(name=queue.TASK_NAME, base=FillingBatches, bind=True, acks_late=True, max_wait_s=wait_s,
              flush_every=settings.max_batch_size, flush_interval=wait_s / 4)
    def answer(self: FillingBatches, requests: Sequence[Any]) -> None:
        worker = requests[0].hostname if requests else "?"
        self.running(+1)
        try:
            answerer.run(requests, worker=worker or "?")
        finally:
            self.running(-1)

    def received(request: Any = None, **_: Any) -> None:
        if request is None or request.name != queue.TASK_NAME:
            return
        answer.note_arrival()
        if answerer.events is None:
            return
        try:
            answerer.events.received(JobRequest.model_validate(request.kwargs["job"]))
        except Exception:  # noqa: BLE001 - a malformed message is dealt with in the batch
            pass

    signals.task_received.connect(received, weak=False)
    return app
