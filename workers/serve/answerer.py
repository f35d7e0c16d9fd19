"""Answering the jobs of one hand-over from the queue, through the worker's decode loop.

Contract: every job handed in gets exactly one terminal result in the job store, whatever happens
(celery-batches only logs an exception that escapes, then acknowledges the messages), and the call
returns only when every result is written (messages are acknowledged after it). A job that already
ended — a redelivery after a crash — is neither recomputed nor overwritten.

The steps, on the consumer thread that received the jobs: claim them, answer repeats from the cache,
fetch their pictures (riding out a storage outage up to ``storage_wait_s``, then giving the jobs back
to the queue), decode and encode them (``Runtime.prepare``), and hand the group to the ``Scheduler``.
While it decodes, this thread writes each job's result the moment its row finishes; jobs that asked to
stream get their text published as it is generated (``pipeline.streams``).
"""

from __future__ import annotations

import logging
import queue as threads_queue
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tuwen.pipeline import stats, tool_format
from tuwen.pipeline.errors import ErrorCode, ModelError, TuwenError, Unavailable
from tuwen.pipeline.jobs import JobStore
from tuwen.pipeline.schema import (ErrorInfo, ImagePart, JobRequest, JobResult, JobStatus, Priority, Stage, StageName,
                                   TextPart)
from tuwen.pipeline.settings import Settings
from tuwen.pipeline.streams import StreamWriter
from tuwen.storage.errors import ObjectNotFound, StorageError
from tuwen.workers.serve.cache import AnswerCache
from tuwen.workers.serve.events import JobEvents
from tuwen.workers.serve.metrics import WorkerMetrics
from tuwen.workers.engine.model import Answer, Item, Runtime
from tuwen.workers.engine.batch import Sampling
from tuwen.workers.engine.core import Scheduler

log = logging.getLogger(__name__)


@dataclass
class Run:
    """One job inside a hand-over, with what the worker learnt about it."""

    job: JobRequest
    attempts: int
    pictures: list[bytes] = field(default_factory=list)
    error: TuwenError | None = None


class StorageDown(Exception):
    """Storage stayed unreachable for ``storage_wait_s``: the jobs go back to the queue."""


class Answerer:
    """Everything one worker process needs to answer jobs. Built whole, once, at worker start."""

    def __init__(self, settings: Settings, runtime: Runtime, scheduler: Scheduler, jobs: JobStore, images: Any,
                 metrics: WorkerMetrics, events: JobEvents, publish: Callable[[JobRequest, float], None]) -> None:
        self.settings = settings
        self.runtime = runtime
        self.scheduler = scheduler
        self.jobs = jobs
        self.images = images
        self.metrics = metrics
        self.events = events
        self.publish = publish  #: put a job back on its queue (after ``countdown`` seconds)
        self.cache = AnswerCache(jobs.redis, settings.answer_cache_ttl_s) if settings.answer_cache else None
        self.streams = StreamWriter(jobs.redis)
        self._fetch_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="tuwen-fetch")
        scheduler.on_step.append(lambda running, waiting: self.streams.flush())
        scheduler.on_step.append(lambda running, waiting: metrics.running_rows.set(running))
        scheduler.on_step.append(lambda running, waiting: metrics.parked_rows.set(scheduler.parked))

    # -- entry point ---------------------------------------------------------------------------------
    def run(self, jobs: Sequence[JobRequest], worker: str, arrived: Callable[[], None] = lambda: None) -> None:
        """Answer one hand-over; returns when every job has its terminal result written. ``arrived`` is
        called once its group is in the decode loop, or once it is clear that it never will be."""
        if not jobs:
            arrived()
            return
        t0 = time.perf_counter()
        group_event = self.events.started(list(jobs))
        written: list[JobResult] = []
        try:
            self._answer(list(jobs), worker, written, arrived)
        except StorageDown:
            self._give_back([j for j in jobs if j.id not in {r.id for r in written}])
        except Exception as exc:  # noqa: BLE001 - the contract: every job ends, whatever happened
            log.exception("a group of %d jobs failed", len(jobs))
            done = {r.id for r in written}
            code = exc.code if isinstance(exc, TuwenError) else ErrorCode.internal_error.value
            retryable = exc.retryable if isinstance(exc, TuwenError) else True  # a fault of ours, not the jobs'
            self._write([self._failed(j, code, f"the worker failed on these jobs: {exc}", retryable, worker=worker)
                         for j in jobs if j.id not in done], written)
        finally:
            arrived()
        self.events.finished(group_event, written, time.perf_counter() - t0)

    def _answer(self, jobs: list[JobRequest], worker: str, written: list[JobResult],
                arrived: Callable[[], None]) -> None:
        started = time.time()
        runs, early = self._claim(jobs, worker)
        hits = self.cache.lookup([r.job for r in runs], self.runtime.model_id) if self.cache else {}
        early += [self._succeeded(r, worker, started, {"cached": True, **hits[r.job.id]}) for r in runs
                  if r.job.id in hits]
        runs = [r for r in runs if r.job.id not in hits]
        fetch_ms = self._fetch(runs)
        early += [self._failed(r.job, r.error.code, r.error.message, r.error.retryable, attempts=r.attempts,
                               worker=worker) for r in runs if r.error is not None]
        self._write(early, written)
        runs = [r for r in runs if r.error is None]
        if runs:
            self._decode(runs, worker, started, fetch_ms, written, arrived)

    def _claim(self, jobs: list[JobRequest], worker: str) -> tuple[list[Run], list[JobResult]]:
        claims = self._riding_out(lambda: self.jobs.claim([j.id for j in jobs], worker), f"claiming {len(jobs)} jobs")
        runs: list[Run] = []
        failed: list[JobResult] = []
        cancelled = 0
        now = time.time()
        for job in jobs:
            state, attempts = claims[job.id]
            if state != "running":
                log.info("job %s is %s; not running it again", job.id, state)
                cancelled += state == "cancelled"
            elif attempts > self.settings.max_attempts:
                failed.append(self._failed(job, ErrorCode.too_many_attempts.value,
                                           f"the job was started {attempts - 1} times without finishing",
                                           attempts=attempts, worker=worker))
            else:
                runs.append(Run(job, attempts))
                self.metrics.queue_wait.observe(max(0.0, now - job.created_at))
        self._count_cancelled(cancelled)
        return runs, failed

    # -- the model -------------------------------------------------------------------------------------
    def _decode(self, runs: list[Run], worker: str, started: float, fetch_ms: float,
                written: list[JobResult], arrived: Callable[[], None]) -> None:
        finished: threads_queue.Queue[tuple[int, Answer]] = threads_queue.Queue()
        group = self.runtime.prepare([self._item(r) for r in runs])
        ticket = self.scheduler.submit(group, interactive=all(r.job.priority == Priority.interactive for r in runs),
                                       on_answer=lambda i, a: finished.put((i, a)))
        arrived()
        self.metrics.batch_size.observe(len(runs))
        fresh: list[tuple[JobRequest, dict[str, Any]]] = []
        left = len(runs)
        while left:
            ready = self._ready(finished)  # rows that finished on the same step are written together
            left -= len(ready)
            results = []
            for index, answer in ready:
                run = runs[index]
                if answer.ok:  # one line per answer the model produced: the drills count executions from it
                    log.info("answered job %s", run.job.id)
                if run.job.stream:
                    self.streams.end(run.job.id, answer.finish_reason or "error")
                results.append(self._result(run, answer, worker, started, fetch_ms))
                if answer.ok and self._cacheable(run.job):
                    fresh.append((run.job, results[-1].model_dump(mode="json", exclude_none=True, include={
                        "answer", "prompt_tokens", "generated_tokens", "finish_reason", "choices"})))
            self.streams.flush()
            self._write(results, written)
        ticket.wait()
        if self.cache and fresh:
            self.cache.store(fresh, self.runtime.model_id)

    def _ready(self, finished: threads_queue.Queue[tuple[int, Answer]]) -> list[tuple[int, Answer]]:
        """The next finished job and any others already finished."""
        ready = [self._next(finished)]
        while True:
            try:
                ready.append(finished.get_nowait())
            except threads_queue.Empty:
                return ready

    def _next(self, finished: threads_queue.Queue[tuple[int, Answer]]) -> tuple[int, Answer]:
        """The next finished job; raises if the decode loop has died (its jobs then fail, not hang)."""
        while True:
            try:
                return finished.get(timeout=1.0)
            except threads_queue.Empty:
                if not self.scheduler.alive:
                    raise ModelError("the decode loop stopped", code=ErrorCode.model_error.value) from None

    def _item(self, run: Run) -> Item:
        """The runtime's item for a job: its conversation with the pictures fetched, and its knobs."""
        pictures = iter(run.pictures)
        messages: list[dict[str, Any]] = []
        images: list[bytes] = []
        for m in run.job.messages:
            content: list[dict[str, Any]] = []
            for part in m.content:
                if isinstance(part, ImagePart):
                    content.append({"type": "image"})
                    images.append(next(pictures))
                elif isinstance(part, TextPart):
                    content.append({"type": "text", "text": part.text})
            messages.append({"role": m.role.value, "content": content})
        p = run.job.params
        on_text = None
        if run.job.stream:
            job_id = run.job.id
            on_text = lambda piece, choice=0, logprobs=None: self.streams.text(  # noqa: E731 - on the decode thread
                job_id, piece, choice, logprobs)
        return Item(messages=tuple(messages), images=tuple(images), max_new_tokens=p.max_new_tokens,
                    sampling=Sampling.of(p), stop=tuple(p.stop), truncation=p.truncation.value, on_text=on_text,
                    continue_final=run.job.continues, owner=run.job.owner,
                    response_format=p.tool_call.response_format() if p.tool_call else p.response_format)

    @staticmethod
    def _cacheable(job: JobRequest) -> bool:
        """Greedy and seeded answers repeat; an unseeded sample is meant to differ each time."""
        return job.params.temperature == 0 or job.params.seed is not None

    def _result(self, run: Run, answer: Answer, worker: str, started: float, fetch_ms: float) -> JobResult:
        if not answer.ok:
            assert answer.error is not None
            return self._failed(run.job, answer.error["code"], answer.error["message"], attempts=run.attempts,
                                worker=worker, model_id=self.runtime.model_id, started_at=started,
                                retryable=answer.error.get("retryable"))
        self.metrics.observe_answer(answer)
        call = run.job.params.tool_call
        return self._succeeded(run, worker, started, {
            "answer": answer.answer, "prompt_tokens": answer.prompt_tokens, "generated_tokens": answer.generated_tokens,
            "finish_reason": tool_format.finish_reason(call, answer.answer, answer.finish_reason),
            "batch_size": answer.batch_size, "choices": tool_format.choices(call, answer.choices),
            "timings": {"fetch_ms": round(fetch_ms, 1), **answer.timings}})

    def _succeeded(self, run: Run, worker: str, started: float, fields: dict[str, Any]) -> JobResult:
        finished = time.time()
        job = run.job
        timings = {"queue_ms": round((started - job.created_at) * 1000, 1), **fields.pop("timings", {}),
                   "total_ms": round((finished - job.created_at) * 1000, 1)}
        result = JobResult(id=job.id, status=JobStatus.succeeded, owner=job.owner, image_key=job.image_key,
                           created_at=job.created_at, started_at=started, finished_at=finished, attempts=run.attempts,
                           worker=worker, model_id=self.runtime.model_id, timings=timings,
                           cancel_requested=self._cancel_requested(job.id), **fields)
        return with_stages(job, result)

    def _failed(self, job: JobRequest, code: str, message: str, retryable: bool | None = None,
                **extra: Any) -> JobResult:
        """A failed result; ``retryable`` as the error said, else the catalogue's for its code."""
        finished = time.time()
        error = ErrorInfo.of(code, message)
        if retryable is not None:
            error = error.model_copy(update={"retryable": retryable})
        if job.stages:
            error = error.model_copy(update={"stage": StageName.picture})
        return with_stages(job, JobResult(
            id=job.id, status=JobStatus.failed, error=error, owner=job.owner, image_key=job.image_key,
            created_at=job.created_at, finished_at=finished,
            timings={"total_ms": round((finished - job.created_at) * 1000, 1)}, **extra))

    def _cancel_requested(self, job_id: str) -> bool:
        try:
            return self.jobs.cancel_requested(job_id)
        except Unavailable:
            return False

    # -- storage ------------------------------------------------------------------------------------------
    def _fetch(self, runs: list[Run]) -> float:
        """Fetch every job's pictures concurrently; transient storage errors are retried with backoff for
        up to ``storage_wait_s``, then ``StorageDown`` hands the jobs back to the queue."""
        t0 = time.perf_counter()
        pending = [(run, i, key) for run in runs for i, key in enumerate(run.job.image_keys)]
        for run in runs:
            run.pictures = [b""] * len(run.job.image_keys)
        delay, deadline = 0.5, time.monotonic() + self.settings.storage_wait_s
        while pending:
            outcomes = list(self._fetch_pool.map(lambda p: self._get_one(p[2]), pending))
            retry = []
            for (run, i, key), outcome in zip(pending, outcomes):
                if isinstance(outcome, bytes):
                    run.pictures[i] = outcome
                    self.metrics.images_fetched.inc()
                    self.metrics.image_bytes.inc(len(outcome))
                elif isinstance(outcome, ObjectNotFound):
                    # Where it looked (a directory, or a bucket and endpoint): a producer and a worker that
                    # disagree on TUWEN_STORAGE_DIR or the bucket show here.
                    run.error = TuwenError(f"a picture of the job is no longer in storage ({outcome})",
                                           code=ErrorCode.image_not_found.value)
                elif outcome.retryable:
                    retry.append((run, i, key))
                else:
                    run.error = TuwenError(f"image storage refused the request: {outcome}", code=outcome.code)
            pending = retry
            if pending:
                if time.monotonic() + delay > deadline:
                    raise StorageDown(f"storage unreachable for {self.settings.storage_wait_s:.0f}s")
                log.warning("storage unavailable for %d pictures; retrying in %.1fs", len(pending), delay)
                time.sleep(delay)
                delay = min(delay * 2, 8.0)
        return (time.perf_counter() - t0) * 1000

    def _get_one(self, key: str) -> bytes | StorageError:
        try:
            return bytes(self.images.get(key))
        except StorageError as exc:
            return exc

    def _give_back(self, jobs: list[JobRequest]) -> None:
        """Put the jobs back on their queues (as new messages) and mark them queued again."""
        log.warning("storage still unreachable; giving %d jobs back to the queue", len(jobs))
        self.jobs.requeue([j.id for j in jobs])
        for job in jobs:
            self.publish(job, 5.0)

    # -- results -----------------------------------------------------------------------------------------
    def _write(self, results: list[JobResult], written: list[JobResult]) -> None:
        """Write results, riding out a short Redis outage (the messages are acknowledged after this)."""
        if not results:
            return
        first = self._riding_out(lambda: self.jobs.finish(results), f"writing {len(results)} results")
        written += results
        fresh = [r for r, w in zip(results, first) if w]
        self._account(fresh)
        self.events.ended(fresh)

    def _riding_out(self, step: Callable[[], Any], what: str) -> Any:
        """``step()``, tried again through a Redis outage (a restart, a Sentinel failover) for up to a quarter
        of the visibility timeout (at least a minute): the jobs' messages are unacknowledged meanwhile."""
        delay, deadline = 0.5, time.monotonic() + max(60.0, self.settings.visibility_timeout_s / 4)
        while True:
            try:
                return step()
            except Unavailable:
                if time.monotonic() > deadline:
                    raise
                log.warning("Redis unavailable while %s; retrying in %.1fs", what, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _count_cancelled(self, n: int) -> None:
        """Jobs cancelled while queued are counted when a worker takes them off the queue (the
        producer's cancel only marks the record), so that ``tuwen status`` and the metrics see them."""
        if not n:
            return
        self.metrics.jobs.labels("cancelled", "").inc(n)
        try:
            stats.record(self.jobs.redis, [("cancelled", None)] * n)
        except Exception:  # noqa: BLE001 - statistics never fail a batch
            log.debug("could not record statistics", exc_info=True)

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


def with_stages(job: JobRequest, result: JobResult) -> JobResult:
    """A job that came through the speech stage: its result also shows the transcript, both stages (this one's
    timings from its start on the picture queue) and the speech stage's timings beside its own."""
    if not job.stages:
        return result
    speech = job.stages[-1]
    begun = speech.finished_at or job.created_at
    own = {k: v for k, v in result.timings.items() if k != "total_ms"}
    if result.started_at is not None:
        own["queue_ms"] = round((result.started_at - begun) * 1000, 1)
    picture = Stage(name=StageName.picture, model_id=result.model_id, attempts=result.attempts,
                    started_at=result.started_at, finished_at=result.finished_at,
                    timings={**own, "picture_ms": round(((result.finished_at or begun) - begun) * 1000, 1)})
    return result.model_copy(update={
        "transcript": job.transcript, "stage": StageName.picture, "stages": [*job.stages, picture],
        "timings": {**speech.timings, **result.timings}})
