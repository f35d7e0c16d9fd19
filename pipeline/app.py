"""The Celery app factory and routing, shared by producers (send only) and workers.

Choices, each measured (see shared/FACTS.md):

* JSON only, pickle refused (``accept_content=["json"]``).
* ``task_acks_late`` + ``task_reject_on_worker_lost``: a job is acknowledged only after its batch
  wrote results, so a killed worker's jobs come back (put back by a live worker's reaper within about
  40 s, else by Redis after the visibility timeout; jobs are idempotent through the job store).
* Prefetch bounded to two batches: enough to fill the next batch while one runs, little enough that
  the backlog stays in Redis (unbounded prefetch pulled everything into one worker and made
  redelivery and fairness unworkable).
* Queues ``interactive`` and ``bulk``, read in priority order (interactive first, always).
* No Celery result backend: results live in tuwen's own job keys (``tuwen.pipeline.jobs``).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs, urlsplit

from celery import Celery
from kombu import Queue

from tuwen.pipeline import sentinel
from tuwen.pipeline.schema import JobRequest, Priority
from tuwen.pipeline.settings import Settings

TASK_NAME = "tuwen.answer"
#: The speech stage's task: a job whose question is audio is transcribed first (``workers.serve.speech``).
SPEECH_TASK = "tuwen.transcribe"
#: Redis commands a publish batch buffers before it sends them (one per job, plus queue expiries if any).
PUBLISH_BATCH = 1024


def transport_options(settings: Settings) -> dict[str, Any]:
    """Redis broker options: every connection has connect and read timeouts, TCP keepalive and a health
    check before reuse, so a dead or half-open connection is noticed instead of waited on. A Sentinel
    deployment adds its service name and how to reach the sentinels."""
    options = {
        "visibility_timeout": settings.visibility_timeout_s,
        # How often kombu looks for messages older than the visibility timeout (default ~100 s). A dead
        # worker's jobs come back much sooner through tuwen's reaper (tuwen.workers.serve.reaper).
        "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 4)),
        "unacked_restore_throttle": 1,
        "queue_order_strategy": "priority",
        "socket_connect_timeout": 2,
        "socket_timeout": 30,
        "socket_keepalive": True,
        "health_check_interval": 25,
        "retry_on_timeout": True,
    }
    target = sentinel.parse(settings.broker)
    return {**options, **target.transport_options(options)} if target else options


def reads_wake_lists(broker: str) -> bool:
    """Whether workers on ``broker`` use tuwen's Redis transport (its poison screen, reaper and wake lists):
    every Redis broker, ``redis://``, ``rediss://`` (TLS) or ``redis+sentinel://``."""
    return broker.startswith(("redis://", "rediss://", sentinel.SCHEME + "://"))


#: A ``rediss://`` URL's TLS parameters, as redis-py reads them from the URL, and their ``ssl`` values.
_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
_TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


def broker_tls(broker: str) -> dict[str, Any] | None:
    """kombu's ``ssl`` options for a ``rediss://`` broker, from the URL's own parameters as redis-py reads
    them (``?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem``, ``ssl_certfile``, ``ssl_keyfile``), so that the
    broker, the job store and the reaper connect alike. The server's certificate is verified unless
    ``ssl_cert_reqs=none`` says otherwise (kombu alone would default to not verifying it). None for a plain
    broker."""
    if not broker.startswith("rediss://"):
        return None
    query = {k: v[-1] for k, v in parse_qs(urlsplit(broker).query).items()}
    reqs = query.get("ssl_cert_reqs", "required").lower()
    if reqs not in _CERT_REQS:
        raise ValueError(f"ssl_cert_reqs={reqs} in the broker URL: use required, optional or none")
    return {"ssl_cert_reqs": _CERT_REQS[reqs], **{k: query[k] for k in _TLS_FILES if k in query}}


def broker_url(settings: Settings) -> str:
    """The broker URL as kombu reads it (``redis+sentinel://`` becomes its ``sentinel://`` list)."""
    target = sentinel.parse(settings.broker)
    return target.kombu_url() if target else settings.broker


def make_celery(settings: Settings, *, worker: bool = False) -> Celery:
    """A configured app. ``worker=True`` also sets the consumer-side knobs (prefetch, events)."""
    app = Celery("tuwen", broker=broker_url(settings), set_as_current=False)
    conf: dict[str, Any] = {
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_default_queue": settings.interactive_queue,
        "task_queues": [Queue(settings.interactive_queue), Queue(settings.bulk_queue), Queue(settings.speech_queue)],
        "task_routes": {TASK_NAME: {"queue": settings.interactive_queue},
                        SPEECH_TASK: {"queue": settings.speech_queue}},
        "broker_transport_options": transport_options(settings),
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_pool_limit": 10,
        # No task-sent event: the worker sends task-received per job, which is what Flower needs; the
        # extra publish cost producers a fifth of their submit time (profiled).
        "task_send_sent_event": False,
        "enable_utc": True,
    }
    if (tls := broker_tls(settings.broker)) is not None:
        conf["broker_use_ssl"] = tls  # also for tuwen's transport, which kombu's rediss:// default misses
    if settings.broker.startswith(("amqp://", "pyamqp://")):
        conf["task_queues"] = [
            Queue(settings.interactive_queue, queue_arguments={"x-queue-type": "quorum"}),
            Queue(settings.bulk_queue, queue_arguments={"x-queue-type": "quorum"}),
            Queue(settings.speech_queue, queue_arguments={"x-queue-type": "quorum"}),
        ]
        conf["broker_transport_options"] = {"confirm_publish": True}
    if worker:
        conf.update(
            # Prefetch is per pool thread: about two full batches in all.
            worker_prefetch_multiplier=max(1, -(-2 * settings.max_batch_size // settings.pool_threads)),
            worker_send_task_events=True,
            worker_hijack_root_logger=False,
            worker_cancel_long_running_tasks_on_connection_loss=False,
        )
    app.conf.update(conf)
    return app


def queue_for(settings: Settings, priority: Priority | str) -> str:
    return settings.bulk_queue if priority == Priority.bulk else settings.interactive_queue


def route(settings: Settings, request: JobRequest) -> str:
    """The queue a job's next message goes to: the speech queue while its question is audio, then its
    priority's picture queue."""
    return settings.speech_queue if request.audio_keys else queue_for(settings, request.priority)


def enqueue(app: Celery, settings: Settings, request: JobRequest, countdown: float | None = None) -> None:
    """Publish one job. The message carries ids, keys and params; Flower shows only those."""
    app.send_task(**_message(settings, request), countdown=countdown, retry=True,
                  retry_policy={"max_retries": 5, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2})


def publish_batch(app: Celery, settings: Settings, requests: Iterable[JobRequest]) -> None:
    """Publish jobs together: on Redis one pipeline, a single round trip (kombu's ``Producer.batch``); a
    broker that cannot batch (RabbitMQ) gets them one by one on one connection. The batch's connection does
    not retry a timed-out command (kombu batches only then: a replayed pipeline could publish twice), so a
    batch that fails raises, and may have delivered some of its messages (kombu: "delivery is uncertain").
    The queues are declared once, before the batch, not once a message (a third of the time, profiled)."""
    jobs = list(requests)
    once = {} if settings.broker.startswith(("amqp://", "pyamqp://")) else {"retry_on_timeout": False}
    with app.connection_for_write(transport_options=once) as connection:
        producer = connection.Producer()
        for name in sorted({route(settings, job) for job in jobs}):
            producer.maybe_declare(app.amqp.queues[name], retry=True)
        with producer.batch(max_size=PUBLISH_BATCH):
            for job in jobs:  # buffered, nothing to retry until the batch is sent
                app.send_task(**_message(settings, job), producer=producer, retry=False, declare=[])


def _message(settings: Settings, request: JobRequest) -> dict[str, Any]:
    """``send_task``'s arguments for the job: what the worker reads, and what Flower shows of it."""
    payload = request.model_dump(mode="json")
    shown = {k: v for k, v in payload.items() if k != "messages"}
    shown["image_keys"] = request.image_keys
    if request.audio_keys:
        shown["audio_keys"] = request.audio_keys
    shown.pop("transcript", None)
    shown["turns"] = len(request.messages)
    if settings.flower_show_text:
        shown["question"] = request.question
    return {"name": SPEECH_TASK if request.audio_keys else TASK_NAME, "kwargs": {"job": payload},
            "task_id": request.id, "queue": route(settings, request), "argsrepr": "()",
            "kwargsrepr": repr({"job": shown})}
