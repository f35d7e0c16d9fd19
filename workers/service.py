"""Start one worker process: load the model once, then consume batches until told to stop."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from celery import signals

from tuwen.pipeline.jobs import JobStore, connect
from tuwen.pipeline.registry import Heartbeat
from tuwen.pipeline.settings import Settings
from tuwen.pipeline.stores import open_images
from tuwen.workers.runtime import NullRuntime, Runtime
from tuwen.workers.metrics import WorkerMetrics
from tuwen.workers.tasks import BatchAnswerer, make_worker_app

log = logging.getLogger(__name__)


def run_worker(settings: Settings, *, queues: list[str] | None = None, hostname: str | None = None,
               loglevel: str = "INFO") -> None:
    """One process per device: threads pool with one slot, so the model is used by one batch at a time
    while the consumer keeps prefetching the next batch."""
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    hostname = hostname or f"tuwen-{os.getpid()}@{socket.gethostname()}"
    runtime = NullRuntime(settings) if settings.null_model else Runtime(settings)
    runtime.load()
    log.info("model %s loaded in %.2fs", runtime.model_id, runtime.load_seconds or 0)
    redis_client = connect(settings.redis_url)
    queues = queues or [settings.interactive_queue, settings.bulk_queue]
    metrics = WorkerMetrics()
    metrics.model_load.set(runtime.load_seconds or 0)
    if settings.broker == settings.redis_url:
        metrics.watch_queues(redis_client, queues)
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
        log.info("metrics on :%d/metrics", settings.metrics_port)
    answerer = BatchAnswerer(settings, runtime, JobStore(redis_client, settings.result_ttl_s), open_images(settings),
                             metrics)
    app = make_worker_app(settings, answerer, hostname)
    heartbeat = Heartbeat(redis_client, hostname, {
        "model_id": runtime.model_id, "device": runtime.device, "queues": queues, "pid": os.getpid(),
        "max_batch_size": settings.max_batch_size, "load_seconds": runtime.load_seconds,
    })

    def ready(**_: Any) -> None:
        heartbeat.start()

    def stopping(**_: Any) -> None:
        heartbeat.stop()

    signals.worker_ready.connect(ready, weak=False)
    signals.worker_shutting_down.connect(stopping, weak=False)
    app.worker_main([
        "worker", "--pool=threads", "--concurrency=1", f"--queues={','.join(queues)}",
        f"--loglevel={loglevel}", "--without-mingle", "--without-gossip", "--task-events",
        f"--hostname={hostname}",
    ])
