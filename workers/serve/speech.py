"""The speech stage: a worker that transcribes spoken questions on ``TUWEN_SPEECH_QUEUE``, then hands each job on
to its picture queue under the same id (or, for a transcription alone, ends it with the transcript).

The path of an audio job: the producer stores the audio beside the pictures and publishes ``tuwen.transcribe``
to the speech queue (``pipeline.app.route``). Here a batch of messages (celery-batches: up to
``TUWEN_SPEECH_BATCH_SIZE``, or what came within ``TUWEN_BATCH_WAIT_MS``) is claimed for the speech stage,
its audio fetched, decoded again (the worker trusts nothing) and resampled to the model's rate, and
transcribed in one batch. Each job then gets exactly one outcome: a failed result naming the stage, the
transcript as its answer (``transcribe_only``), or its audio parts replaced by the transcript and the
``tuwen.answer`` message published to the picture queue *before* the record says so (``JobStore.hand_on``):
a worker killed in between leaves the speech message unacknowledged, so it comes back and is handed on again
(the job store lets the first result win). The message is acknowledged after.

Liveness, the reaper, Flower events, metrics and the poison screen are the picture workers' own
(``serve.main.attend``, ``serve.events``, ``serve.metrics``, ``serve.poison``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from celery import Celery, signals
from celery_batches import Batches

from tuwen.pipeline import app as queue
from tuwen.pipeline.audio import decode_audio, resample
from tuwen.pipeline.client import Client
from tuwen.pipeline.errors import ErrorCode, TuwenError
from tuwen.pipeline.jobs import JobStore, connect
from tuwen.pipeline.schema import (AudioPart, ErrorInfo, JobRequest, JobResult, JobStatus, Message, Stage, StageName,
                                   TextPart)
from tuwen.pipeline.settings import Settings
from tuwen.pipeline.stores import open_images
from tuwen.storage.errors import ObjectNotFound, StorageError
from tuwen.workers.engine.speech import SpeechRuntime, Transcript
from tuwen.workers.serve import transport
from tuwen.workers.serve.events import JobEvents
from tuwen.workers.serve.liveness import Pulse
from tuwen.workers.serve.main import attend, consume
from tuwen.workers.serve.metrics import WorkerMetrics
from tuwen.workers.serve.poison import Screen
from tuwen.workers.serve.tasks import parse

log = logging.getLogger(__name__)


@dataclass
class Heard:
    """One job of a speech batch and what the worker learnt about it."""

    job: JobRequest
    attempts: int
    clips: list[np.ndarray[Any, np.dtype[np.float32]]] = field(default_factory=list)
    seconds: float = 0.0
    error: TuwenError | None = None
    transcripts: list[Transcript] = field(default_factory=list)


class Transcriber:
    """Everything one speech worker needs to run its stage. Built whole, once, at worker start."""

    def __init__(self, settings: Settings, runtime: SpeechRuntime, jobs: JobStore, images: Any,
                 metrics: WorkerMetrics, events: JobEvents, producer: Client) -> None:
        self.settings, self.runtime, self.jobs, self.images = settings, runtime, jobs, images
        self.metrics, self.events, self.producer = metrics, events, producer
        self._model = threading.Lock()  #: one batch on the model at a time (the pool prepares the next)

    def run(self, jobs: Sequence[JobRequest], worker: str) -> None:
        """Run the stage for one batch; returns when every job is handed on or has its terminal result."""
        if not jobs:
            return
        t0 = time.perf_counter()
        group = self.events.started(list(jobs))
        ended: list[JobResult] = []
        try:
            self._run(list(jobs), worker, ended)
        except Exception as exc:  # noqa: BLE001 - the contract: every job gets an outcome, whatever happened
            log.exception("a speech batch of %d jobs failed", len(jobs))
            done = {r.id for r in ended}
            code = exc.code if isinstance(exc, TuwenError) else ErrorCode.internal_error.value
            self._end([self._failed(j, code, f"the speech worker failed on these jobs: {exc}", worker=worker)
                       for j in jobs if j.id not in done], ended)
        self.events.finished(group, ended, time.perf_counter() - t0)

    def _run(self, jobs: list[JobRequest], worker: str, ended: list[JobResult]) -> None:
        started = time.time()
        claims = self.jobs.claim([j.id for j in jobs], worker, stage=StageName.speech.value)
        heard: list[Heard] = []
        for job in jobs:
            state, attempts = claims[job.id]
            if state != "running":
                log.info("job %s is %s; not transcribing it again", job.id, state)
            elif attempts > self.settings.max_attempts:
                self._end([self._failed(job, ErrorCode.too_many_attempts.value, f"the job was started "
                                        f"{attempts - 1} times without finishing", worker=worker)], ended)
            else:
                heard.append(Heard(job, attempts))
                self.metrics.queue_wait.observe(max(0.0, started - job.created_at))
        t_fetch = time.perf_counter()
        for h in heard:
            self._listen(h)
        fetch_ms = (time.perf_counter() - t_fetch) * 1000
        self._end([self._failed(h.job, h.error.code, h.error.message, worker=worker, attempts=h.attempts)
                   for h in heard if h.error is not None], ended)
        heard = [h for h in heard if h.error is None]
        if not heard:
            return
        t_model = time.perf_counter()
        with self._model:
            transcripts = iter(self.runtime.transcribe([clip for h in heard for clip in h.clips]))
        model_ms = (time.perf_counter() - t_model) * 1000
        clips = sum(len(h.clips) for h in heard)
        self.metrics.batch_size.observe(clips)
        self.metrics.model_seconds.observe(model_ms / 1000)
        for h in heard:
            h.transcripts = [next(transcripts) for _ in h.clips]
        self._finish_stage(heard, worker, started, {"speech_fetch_ms": round(fetch_ms, 1),
                                                    "speech_model_ms": round(model_ms, 1)}, clips, ended)

    def _listen(self, h: Heard) -> None:
        """Fetch and decode a job's audio (bounded as at submission), resampled to the model's rate."""
        s = self.settings
        try:
            for key in h.job.audio_keys:
                sound = decode_audio(bytes(self.images.get(key)), max_bytes=s.max_audio_bytes,
                                     max_seconds=s.max_audio_seconds)
                h.clips.append(resample(sound.samples, sound.rate, self.runtime.rate))
                h.seconds += sound.seconds
        except ObjectNotFound as exc:
            h.error = TuwenError(f"the job's audio is no longer in storage ({exc})", code="audio_not_found")
        except StorageError as exc:
            h.error = TuwenError(f"audio storage failed: {exc}", code=exc.code, retryable=exc.retryable)
        except TuwenError as exc:
            h.error = exc

    def _finish_stage(self, heard: list[Heard], worker: str, started: float, timings: dict[str, float], clips: int,
                      ended: list[JobResult]) -> None:
        on: list[JobRequest] = []
        done: list[JobResult] = []
        finished = time.time()
        for h in heard:
            text = " ".join(t.text for t in h.transcripts).strip()
            stage = Stage(name=StageName.speech, model_id=self.runtime.model_id, attempts=h.attempts,
                          started_at=started, finished_at=finished, timings={
                              "speech_queue_ms": round((started - h.job.created_at) * 1000, 1), **timings,
                              "audio_ms": round(h.seconds * 1000, 1), "speech_batch": float(clips),
                              "speech_ms": round((finished - started) * 1000, 1)})
            if not text:
                done.append(self._failed(h.job, ErrorCode.no_speech.value, "the speech model heard no words",
                                         worker=worker, attempts=h.attempts, stages=[stage]))
            elif h.job.transcribe_only:
                done.append(JobResult(
                    id=h.job.id, status=JobStatus.succeeded, answer=text, transcript=text, owner=h.job.owner,
                    image_key=h.job.image_key, created_at=h.job.created_at, started_at=started, finished_at=finished,
                    attempts=h.attempts, worker=worker, model_id=self.runtime.model_id, batch_size=clips,
                    generated_tokens=sum(t.tokens for t in h.transcripts), stage=StageName.speech, stages=[stage],
                    finish_reason="length" if any(t.finish_reason == "length" for t in h.transcripts) else "stop",
                    timings={**stage.timings, "total_ms": round((finished - h.job.created_at) * 1000, 1)}))
            else:
                on.append(handed_on(h.job, iter(t.text for t in h.transcripts), text, stage))
        self._end(done, ended)
        if on:
            self.producer.publish_many(on)  # first the messages, then the record (see the module docstring)
            self.jobs.hand_on(on)
            self.metrics.jobs.labels("handed_on", "").inc(len(on))
            for job in on:
                log.info("transcribed job %s", job.id)

    def _failed(self, job: JobRequest, code: str, message: str, **extra: Any) -> JobResult:
        finished = time.time()
        error = ErrorInfo.of(code, message).model_copy(update={"stage": StageName.speech})
        return JobResult(id=job.id, status=JobStatus.failed, error=error, owner=job.owner, image_key=job.image_key,
                         created_at=job.created_at, finished_at=finished, stage=StageName.speech,
                         timings={"total_ms": round((finished - job.created_at) * 1000, 1)}, **extra)

    def _end(self, results: list[JobResult], ended: list[JobResult]) -> None:
        if not results:
            return
        fresh = [r for r, first in zip(results, self.jobs.finish(results)) if first]
        ended += results
        for r in fresh:
            self.metrics.jobs.labels(r.status.value, r.error.code if r.error else "").inc()
        self.events.ended(fresh)


def handed_on(job: JobRequest, texts: Any, transcript: str, stage: Stage) -> JobRequest:
    """The job as the picture stage gets it: each audio part replaced by its transcript, the stage recorded."""
    messages = tuple(Message(role=m.role, content=tuple(
        TextPart(text=next(texts)) if isinstance(p, AudioPart) else p for p in m.content)) for m in job.messages)
    return job.model_copy(update={"messages": messages, "transcript": transcript, "stages": (*job.stages, stage)})


def make_speech_app(settings: Settings, runtime: SpeechRuntime, jobs: JobStore, images: Any, metrics: WorkerMetrics,
                    hostname: str, screen: Screen | None = None) -> tuple[Celery, Transcriber]:
    """The speech worker's Celery app, built first, and the transcriber built whole on it; the batch task
    ``tuwen.transcribe`` is celery-batches' own (a batch per ``TUWEN_SPEECH_BATCH_SIZE`` messages or per
    ``TUWEN_BATCH_WAIT_MS``)."""
    app = queue.make_celery(settings, worker=True)
    app.conf.worker_prefetch_multiplier = settings.speech_batch_size
    if queue.reads_wake_lists(settings.broker):
        app.conf.broker_transport = transport.transport_for(settings.broker)
        app.conf.broker_transport_options = {
            **app.conf.broker_transport_options, "tuwen_screen": transport.screen_option(screen) if screen else None,
            "tuwen_interactive_queues": (), "tuwen_interactive_room": 0}
    events = JobEvents(app, hostname, settings.flower_show_text)
    transcriber = Transcriber(settings, runtime, jobs, images, metrics, events, Client(settings))

    @app.task(name=queue.SPEECH_TASK, base=Batches, bind=True, acks_late=True, flush_every=settings.speech_batch_size,
              flush_interval=max(settings.batch_wait_ms, 4) / 1000)
    def transcribe(self: Batches, requests: Sequence[Any]) -> None:
        worker = requests[0].hostname if requests else "?"
        transcriber.run(parse(requests), worker=worker or "?")

    def received(request: Any = None, **_: Any) -> None:
        if request is not None and request.name == queue.SPEECH_TASK:
            events.received_message(request)

    signals.task_received.connect(received, weak=False)
    signals.worker_shutdown.connect(lambda **_: events.flush(), weak=False)
    return app, transcriber


def run_speech_worker(settings: Settings, *, hostname: str | None = None, loglevel: str = "INFO") -> None:
    """One speech worker process: load the speech model once, then transcribe batches from the speech queue."""
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    hostname = hostname or f"tuwen-speech-{os.getpid()}@{socket.gethostname()}"
    runtime = SpeechRuntime(settings)
    runtime.load()
    redis_client = connect(settings.redis_url)
    queues = [settings.speech_queue]
    broker = connect(settings.broker) if queue.reads_wake_lists(settings.broker) else None
    metrics = WorkerMetrics()
    metrics.model_load.set(runtime.load_seconds or 0)
    if broker is not None:
        metrics.watch_queues(broker, queues)
    if settings.metrics_port:
        metrics.serve(settings.metrics_port, settings.metrics_address)
    jobs = JobStore(redis_client, settings.result_ttl_s, settings.replicas_ack, settings.redis_replicas_ack_timeout_ms)
    pulse = Pulse()
    app, _ = make_speech_app(settings, runtime, jobs, open_images(settings), metrics, hostname,
                             Screen(jobs, metrics, hostname, pulse.consumed))
    attend(app, settings, hostname, queues, {
        "model_id": runtime.model_id, "device": runtime.device, "pid": os.getpid(), "role": "speech",
        "max_batch_size": settings.speech_batch_size, "load_seconds": runtime.load_seconds,
    }, pulse, metrics, redis_client, broker, lambda: None)
    consume(app, 2, queues, hostname, loglevel)
