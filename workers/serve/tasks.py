"""The consumer side of a worker: the Celery app and the batch task ``tuwen.answer`` that hands jobs
from the queue to the decode loop.

celery-batches buffers the messages a worker prefetched; ``Handover`` decides when and how many of them
go to the decode loop (``scheduler``): while rows decode, as many as there are free rows (they join at
the next step); when idle, a group that fills within ``TUWEN_BATCH_WAIT_MS``; when the loop is full,
one group prepared ahead (pictures fetched and preprocessed while the model decodes). Interactive jobs
go first. Each hand-over runs on one of ``TUWEN_WORKER_GROUPS`` pool threads and returns (so its
messages are acknowledged) only when all its results are written.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from celery import Celery, signals
from celery_batches import Batches

from tuwen.pipeline import app as queue
from tuwen.pipeline.client import Client
from tuwen.pipeline.jobs import JobStore
from tuwen.pipeline.schema import JobRequest
from tuwen.pipeline.settings import Settings
from tuwen.workers.serve import transport
from tuwen.workers.serve.answerer import Answerer
from tuwen.workers.serve.events import JobEvents
from tuwen.workers.serve.metrics import WorkerMetrics
from tuwen.workers.serve.poison import Screen
from tuwen.workers.engine.model import Runtime
from tuwen.workers.engine.core import Scheduler

log = logging.getLogger(__name__)

#: Most jobs in one hand-over, and so in one join of the decode loop: a join's prefill holds up every
#: running row, and an interactive job waiting for a row, so a wide batch fills in several joins.
HANDOVER_ROWS = 8
#: Bulk hand-overs while interactive jobs are about (one arrived within ``MIXED_S``): half the join an
#: interactive job may find in progress (first token p50 0.55 -> 0.38 static batches during a
#: backlog), for a slower drain than with 8 (0.75 against 0.88 of row c): measured in full bench runs.
MIXED_HANDOVER_ROWS = 4
MIXED_S = 30.0
#: Most bulk hand-overs on their way to the decode loop or waiting in it. Each prepares on its own pool
#: thread, under the GIL the decode loop needs: at a backlog's start seven groups preparing at once made
#: the first join take 151 ms instead of 57, and an interactive job wait for it (measured).
AHEAD_GROUPS = 2


class Handover(Batches):
    """celery-batches, flushing by the decode loop's room instead of by a timer alone.

    Stock celery-batches hands over whatever is buffered on every tick; with a static batch that made
    a backlog run as batches of 2–5 out of 8 (measured). Here the decode loop decides: see the module
    docstring. A hand-over never holds more than ``flush_every`` jobs.
    """

    abstract = True
    #: Longest a job waits in the buffer for others when the model is idle (``TUWEN_BATCH_WAIT_MS``).
    max_wait_s = 0.05
    interactive_queue = "interactive"
    scheduler: Scheduler | None = None

    def __init__(self) -> None:
        super().__init__()
        self._oldest: float | None = None
        self._flushing = threading.RLock()
        self._kick = threading.Event()
        self._flusher: threading.Thread | None = None
        self._interactive_at = -MIXED_S  #: when the last interactive message arrived (monotonic)
        #: A hand-over's job ids -> its ``Scheduler.expect`` calls, for the pool thread that answers it.
        self._coming: dict[tuple[str, ...], list[Callable[[], None]]] = {}
        self._coming_lock = threading.Lock()  #: the flusher adds, pool threads take

    def note_arrival(self, request: Any) -> None:
        """A message is in the buffer. An interactive one is looked at now, not at the next tick."""
        if self._oldest is None:
            self._oldest = time.monotonic()
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_loop, name="tuwen-handover", daemon=True)
            self._flusher.start()
        if self._lane(request) == 0:
            self._interactive_at = time.monotonic()
            self.kick()

    def kick(self) -> None:
        """Look at the buffer now (the decode loop has room)."""
        self._kick.set()

    def _flush_loop(self) -> None:
        """celery-batches flushes on a timer of the consumer's event loop, and a consumer that reconnects
        to the broker keeps the old, dead timer (seen: a worker holding 14 jobs in its buffer for good
        after a Redis restart). This thread looks at the buffer every ``flush_interval`` and whenever
        the decode loop frees rows."""
        while True:
            self._kick.wait(self.flush_interval)
            self._kick.clear()
            if self._buffer.qsize():
                try:
                    self._do_flush()
                except Exception:  # noqa: BLE001 - the next look tries again
                    log.exception("handing jobs over failed")

    def how_many(self, buffered: int) -> int:
        """How many buffered jobs to hand over now (0: keep them buffered)."""
        scheduler = self.scheduler
        assert scheduler is not None
        waited = time.monotonic() - self._oldest if self._oldest is not None else 0.0
        running, ahead, group = scheduler.engine.size, scheduler.ahead, self.group_rows()
        room = max(0, AHEAD_GROUPS * group - ahead)
        if not running and not ahead:
            return min(room, buffered if buffered >= group or waited >= self.max_wait_s else 0)
        free, join = scheduler.free_rows, self.join_rows(group, scheduler.max_rows)
        if not ahead and free < join and buffered >= group:
            return group  # one group prepared ahead of a full batch; it joins as rows leave
        n = min(buffered, free, room)
        if n > group:
            n -= n % group  # whole hand-overs: 12 would go as 8 and a join of 4
        # A smaller group goes once it waited the batch window, or at once if it is all there is and the
        # loop has nothing else to join next (a backlog's last jobs waited 50 ms for nobody).
        return n if n >= join or (n and (waited >= self.max_wait_s or (not ahead and buffered < join))) else 0

    def group_rows(self) -> int:
        """Rows in a bulk hand-over now: fewer while interactive jobs are about (``MIXED_HANDOVER_ROWS``)."""
        if time.monotonic() - self._interactive_at < MIXED_S:
            return min(self.flush_every, MIXED_HANDOVER_ROWS)
        return self.flush_every

    @staticmethod
    def join_rows(group: int, max_rows: int) -> int:
        """Fewest rows a hand-over brings to a running batch, unless its oldest job waited the batch window.
        Every join prefills and copies the whole cache once, whatever its size: handing over each row as
        it freed up made joins of three rows on average, and a 64-row backlog spent 78% of its decode
        thread in joins (measured). TGI waits for waiting requests in proportion to the batch likewise
        (``waiting_served_ratio``)."""
        return max(1, min(group, max_rows // 4))

    def _do_flush(self) -> None:
        with self._flushing:
            self._flush_some()

    def _flush_some(self) -> None:
        buffered = self._buffer.qsize()
        if not buffered:
            super()._do_flush()  # the ETA-pending requests, and stopping the timer when all is empty
            return
        held = sorted(_drain(self._buffer), key=self._lane)
        interactive = sum(1 for req in held if self._lane(req) == 0)
        # While the model is busy, interactive jobs go over at once: they wait in the decode loop's
        # interactive lane, ahead of every bulk row, instead of behind bulk jobs in this buffer.
        assert self.scheduler is not None
        busy = self.scheduler.engine.size or self.scheduler.waiting
        n = max(self.how_many(len(held)), min(interactive, self.flush_every) if busy else 0)
        if not n:
            for req in held:
                self._buffer.put(req)
            return  # the oldest keeps its arrival time: the wait window runs from there
        keep = held[n:]
        for req in held[:n]:
            self._buffer.put(req)
        self._oldest = time.monotonic() if keep else None
        super()._do_flush()
        for req in keep:
            self._buffer.put(req)

    def _lane(self, request: Any) -> int:
        info = getattr(request, "delivery_info", None) or {}
        return 0 if info.get("routing_key") == self.interactive_queue else 1

    def flush(self, requests: Any) -> Any:
        """Interactive jobs and bulk jobs go over in separate hand-overs: a group joins the decode loop's
        interactive lane only if all its jobs are interactive (one bulk job in it used to send an
        interactive job to the back of the bulk lane)."""
        result = None
        for lane, size in ((0, self.flush_every), (1, self.group_rows())):
            same = [r for r in requests if self._lane(r) == lane]
            for start in range(0, len(same), size):
                chunk = same[start:start + size]
                if self.scheduler is not None:
                    arrived = self.scheduler.expect(len(chunk))
                    with self._coming_lock:
                        self._coming.setdefault(_ids(chunk), []).append(arrived)
                try:
                    result = super().flush(chunk)
                except BaseException:
                    self.arrival(chunk)()  # it never reached a pool thread: its rows are not on their way
                    raise
        return result

    def arrival(self, requests: Sequence[Any]) -> Callable[[], None]:
        """The call that tells the decode loop this hand-over's rows are no longer on their way."""
        with self._coming_lock:
            waiting = self._coming.get(_ids(requests))
            if not waiting:
                return _nothing
            arrived = waiting.pop(0)
            if not waiting:
                del self._coming[_ids(requests)]
            return arrived


def _nothing() -> None:
    pass


def _ids(requests: Sequence[Any]) -> tuple[str, ...]:
    return tuple(r.id for r in requests)


def _drain(buffer: Any) -> list[Any]:
    out = []
    while True:
        try:
            out.append(buffer.get_nowait())
        except Exception:  # noqa: BLE001 - queue.Empty
            return out


def parse(requests: Sequence[Any]) -> list[JobRequest]:
    """The jobs of a hand-over. The transport's screen already refused malformed messages; one that
    still fails validation here is logged and left (it cannot be answered, and has no record to fail)."""
    jobs = []
    for r in requests:
        try:
            jobs.append(JobRequest.model_validate((r.kwargs or {})["job"]))
        except Exception as exc:  # noqa: BLE001 - a malformed message must not sink the others
            log.error("dropping malformed job message %s: %s", getattr(r, "id", "?"), exc)
    return jobs


def make_worker_app(settings: Settings, runtime: Runtime, scheduler: Scheduler, jobs: JobStore, images: Any,
                    metrics: WorkerMetrics, hostname: str, screen: Screen | None = None) -> tuple[Celery, Answerer]:
    """The worker's Celery app, built first, and the answerer built whole on it; the batch task is
    registered under ``tuwen.answer``. On a Redis broker it reads through tuwen's transport, which hands
    messages it cannot run to ``screen`` (``tuwen.workers.serve.poison``) and never blocks on a pub/sub read."""
    app = queue.make_celery(settings, worker=True)
    if transport.applies_to(settings.broker):
        app.conf.broker_transport = f"{transport.__name__}:Transport"
        app.conf.broker_transport_options = {
            **app.conf.broker_transport_options, "tuwen_screen": transport.screen_option(screen) if screen else None,
            "tuwen_interactive_queues": (settings.interactive_queue,), "tuwen_interactive_room": HANDOVER_ROWS}
    events = JobEvents(app, hostname, settings.flower_show_text)
    producer = Client(settings)  # the one way to publish a job (here: giving jobs back to the queue)
    answerer = Answerer(settings, runtime, scheduler, jobs, images, metrics, events,
                        publish=lambda job, countdown: producer.publish(job, countdown=countdown))
    wait_s = max(settings.batch_wait_ms, 4) / 1000

    @app.task(name=queue.TASK_NAME, base=Handover, bind=True, acks_late=True, max_wait_s=wait_s,
              flush_every=min(settings.max_batch_size, HANDOVER_ROWS), flush_interval=min(wait_s / 4, 0.01),
              scheduler=scheduler,
              interactive_queue=settings.interactive_queue)
    def answer(self: Handover, requests: Sequence[Any]) -> None:
        worker = requests[0].hostname if requests else "?"
        answerer.run(parse(requests), worker=worker or "?", arrived=self.arrival(requests))

    def received(request: Any = None, **_: Any) -> None:
        if request is None or request.name != queue.TASK_NAME:
            return
        answer.note_arrival(request)
        try:
            events.received(JobRequest.model_validate(request.kwargs["job"]))
        except Exception:  # noqa: BLE001 - a malformed message is dealt with in the batch
            pass

    signals.task_received.connect(received, weak=False)
    signals.worker_shutdown.connect(lambda **_: events.flush(), weak=False)
    scheduler.on_step.append(lambda running, waiting: answer.kick() if running < scheduler.max_rows else None)
    return app, answerer
