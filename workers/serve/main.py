"""Start one worker process: load the model once, then consume batches until told to stop."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from celery import signals

from tuwen.pipeline import app as queue
from tuwen.pipeline.jobs import JobStore, connect
from tuwen.pipeline.settings import Settings
from tuwen.pipeline.stores import open_images
from tuwen.workers.serve.liveness import Keeper, Pulse, Repeating, install_fault_stall, pulse_step
from tuwen.workers.serve.metrics import WorkerMetrics
from tuwen.workers.serve.poison import Screen
from tuwen.workers.serve.reaper import INTERVAL_S, Reaper
from tuwen.workers.engine.model import NullRuntime, Runtime
from tuwen.workers.serve.hooks import Hooks, injected_loop_end, injected_oom, injected_row_failure
from tuwen.workers.engine.core import Scheduler
from tuwen.workers.engine.policy import HANDOVER_ROWS, Limits
from tuwen.workers.serve.tasks import make_worker_app

log = logging.getLogger(__name__)


def limits_of(settings: Settings) -> Limits:
    """The batching policy's limits from the worker's settings."""
    return Limits(settings.max_batch_size, max_tokens=settings.max_batch_tokens,
                  beside_interactive=settings.bulk_rows_beside_interactive,
                  handover_rows=min(settings.max_batch_size, HANDOVER_ROWS),
                  batch_wait_s=max(settings.batch_wait_ms, 4) / 1000)


def run_worker(settings: Settings, *, queues: list[str] | None = None, hostname: str | None = None,
               loglevel: str = "INFO", hooks: Hooks | None = None) -> None:
    """One process per device. One decode loop owns the model (``Scheduler``); ``TUWEN_WORKER_GROUPS``
    pool threads prepare hand-overs from the queue and wait for their results, so pictures are fetched
    and preprocessed while the model decodes."""
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    hooks = hooks or Hooks()
    hostname = hostname or f"tuwen-{os.getpid()}@{socket.gethostname()}"
    runtime = NullRuntime(settings) if hooks.null_model else Runtime(settings)
    runtime.load()
    if hooks.oom_min_batch:
        runtime.before_generate = injected_oom(hooks.oom_min_batch)
    scheduler = Scheduler(runtime, settings.max_batch_size, limits=limits_of(settings))
    if hooks.fail_rows_with:
        scheduler.before_rows = injected_row_failure(hooks.fail_rows_with)
    if hooks.end_loop_with:
        scheduler.before_rows = injected_loop_end(hooks.end_loop_with)
    scheduler.start()
    log.info("model %s loaded in %.2fs", runtime.model_id, runtime.load_seconds or 0)
    redis_client = connect(settings.redis_url)
    queues = queues or [settings.interactive_queue, settings.bulk_queue]
    broker = connect(settings.broker) if queue.reads_wake_lists(settings.broker) else None
    metrics = WorkerMetrics()
    metrics.model_load.set(runtime.load_seconds or 0)
    metrics.watch_grammars(runtime)
    metrics.watch_reuse(runtime)
    if broker is not None:
        metrics.watch_queues(broker, queues)
    if settings.metrics_port:
        metrics.serve(settings.metrics_port, settings.metrics_address)
        log.info("metrics on %s:%d/metrics", settings.metrics_address, settings.metrics_port)
    jobs = JobStore(redis_client, settings.result_ttl_s, settings.replicas_ack, settings.redis_replicas_ack_timeout_ms)
    pulse = Pulse()
    app, _ = make_worker_app(settings, runtime, scheduler, jobs, open_images(settings), metrics, hostname,
                             screen=Screen(jobs, metrics, hostname, pulse.consumed))
    if hooks.stall_after_jobs:
        install_fault_stall(hooks.stall_after_jobs)
    attend(app, settings, hostname, queues, {
        "model_id": runtime.model_id, "device": runtime.device, "pid": os.getpid(),
        "max_batch_size": settings.max_batch_size, "load_seconds": runtime.load_seconds,
        "max_images": runtime.max_images, "renders_tools": runtime.renders_tools,
        "picture_side": runtime.picture_side,
    }, pulse, metrics, redis_client, broker, scheduler.stop)
    consume(app, settings.pool_threads, queues, hostname, loglevel)


def attend(app: Any, settings: Settings, hostname: str, queues: list[str], info: dict[str, Any], pulse: Pulse,
           metrics: WorkerMetrics, redis_client: Any, broker: Any, stop: Callable[[], None]) -> None:
    """What keeps any worker (picture or speech) honest, wired to its app: the pulse of its consuming loop,
    its heartbeat and stall watchdog (``Keeper``), the reaper of dead workers' messages, the shutdown
    deadline; ``stop`` ends its model's loop at shutdown."""
    app.steps["consumer"].add(pulse_step(pulse))

    def queue_depth() -> int | None:
        if broker is None:
            return None
        try:
            return sum(int(broker.llen(q)) for q in queues)
        except Exception:  # noqa: BLE001 - unknown while Redis is away
            return None

    keeper = Keeper(redis_client, hostname, {**info, "queues": queues}, pulse, settings.stall_timeout_s, queue_depth)
    sweeper = None
    if broker is not None:
        reaper = Reaper(broker, redis_client,
                        {settings.interactive_queue, settings.bulk_queue, settings.speech_queue, *queues},
                        own_tags=lambda: pulse.held)
        sweeper = Repeating("tuwen-reaper", INTERVAL_S, lambda: metrics.recovered.inc(len(reaper.sweep())))

    def ready(**_: Any) -> None:
        keeper.start()
        if sweeper is not None:
            sweeper.start()

    def shutting_down(**_: Any) -> None:
        keeper.shutdown_started(settings.shutdown_timeout_s)

    def shut_down(**_: Any) -> None:
        if sweeper is not None:
            sweeper.stop()
        stop()
        keeper.stop()

    signals.worker_ready.connect(ready, weak=False)
    signals.worker_shutting_down.connect(shutting_down, weak=False)
    signals.worker_shutdown.connect(shut_down, weak=False)


def consume(app: Any, threads: int, queues: list[str], hostname: str, loglevel: str) -> None:
    """Run the worker's consuming loop until it is told to stop."""
    app.worker_main([
        "worker", "--pool=threads", f"--concurrency={threads}", f"--queues={','.join(queues)}",
        f"--loglevel={loglevel}", "--without-mingle", "--without-gossip", "--task-events",
        f"--hostname={hostname}",
    ])
