"""The consumer side of a worker: the Celery app and the batch task ``tuwen.answer`` that hands jobs
from the queue to the decode loop.

celery-batches buffers the messages a worker prefetched; ``Handover`` passes them on to the decode loop
(``scheduler``) when and as many as the batching policy says (``engine.policy.plan``, which the loop
also follows): while rows decode, as many as there are free rows (they join at the next step); when idle,
a group that fills within ``TUWEN_BATCH_WAIT_MS``; when the loop is full, one group prepared ahead
(pictures fetched and preprocessed while the model decodes). Interactive jobs go first. Each hand-over
runs on one of ``TUWEN_WORKER_GROUPS`` pool threads and returns (so its messages are acknowledged) only
when all its results are written.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import replace
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
from tuwen.workers.engine.policy import HANDOVER_ROWS, Limits, Plan, affinity_order, plan

log = logging.getLogger(__name__)

class Handover(Batches):
    """celery-batches through its public interface only: with ``flush_every = 1`` it calls ``flush`` with
    each message as it arrives, and ``flush`` keeps them in tuwen's own buffer (celery-batches' own buffer
    and its flush timer stay private to it; its timer still releases messages whose ETA has come, a
    countdown retry's). The policy (``engine.policy.plan``) says when and how many go on: the parent's
    ``flush`` then runs them as one call of the task on a pool thread and acknowledges them after.

    Stock celery-batches hands over whatever is buffered on every tick; with a static batch that made
    a backlog run as batches of 2–5 out of 8 (measured). Here the decode loop's room decides.
    """

    abstract = True
    flush_every = 1  #: every message straight to ``flush``: the buffering is tuwen's
    flush_interval = 0.1  #: celery-batches' timer, which only messages with an ETA still wait for
    #: How often the hand-over thread looks at the buffer without being woken (``kick``).
    look_s = 0.01
    interactive_queue = "interactive"
    scheduler: Scheduler | None = None
    #: Pictures handed over lately that affinity prefers (about what the worker's caches hold).
    warm_pictures = 1024

    def __init__(self) -> None:
        super().__init__()
        self._held: list[Any] = []  #: messages received and not handed over yet
        self._oldest: float | None = None  #: when the oldest of them arrived (monotonic)
        self._held_lock = threading.Lock()
        self._flushing = threading.RLock()
        self._kick = threading.Event()
        self._looker: threading.Thread | None = None
        self._interactive_at = -float("inf")  #: when the last interactive message arrived (monotonic)
        self._group = self.limits.handover_rows  #: jobs per bulk hand-over, as the policy said last
        #: A hand-over's job ids -> its ``Scheduler.expect`` calls, for the pool thread that answers it.
        self._coming: dict[tuple[str, ...], list[Callable[[], None]]] = {}
        self._coming_lock = threading.Lock()  #: the hand-over adds, pool threads take
        #: (owner, image key) of pictures handed over lately, least recent first (``_warm_up``).
        self._warm: OrderedDict[tuple[str, str], None] = OrderedDict()
        #: id(message) -> its pictures, for the messages held (read once, when they arrive).
        self._held_pictures: dict[int, frozenset[tuple[str, str]]] = {}

    @property
    def limits(self) -> Limits:
        return self.scheduler.limits if self.scheduler is not None else Limits(HANDOVER_ROWS)

    def note_arrival(self, request: Any) -> None:
        """A message arrived (``task_received``). An interactive one is looked at now, not at the next look."""
        if self._looker is None:
            self._looker = threading.Thread(target=self._look_loop, name="tuwen-handover", daemon=True)
            self._looker.start()
        if self._lane(request) == 0:
            self._interactive_at = time.monotonic()
            self.kick()

    def kick(self) -> None:
        """Look at the buffer now (the decode loop has room)."""
        self._kick.set()

    def flush(self, requests: Any) -> None:
        """celery-batches' call with the messages ready to run: buffer them, and pass on what the policy says."""
        with self._held_lock:
            if not self._held:
                self._oldest = time.monotonic()
            self._held.extend(requests)
            for request in requests:  # read once, not at every look
                self._held_pictures[id(request)] = _pictures(request)
        self.pass_on()

    def _look_loop(self) -> None:
        """Looks at the buffer every ``look_s`` and whenever the decode loop frees rows: a timer of the
        consumer's event loop is no good for this, since a consumer that reconnects to the broker keeps
        the old, dead one (seen: a worker holding 14 jobs in its buffer for good after a Redis restart)."""
        while True:
            self._kick.wait(self.look_s)
            self._kick.clear()
            try:
                self.pass_on()
            except Exception:  # noqa: BLE001 - the next look tries again
                log.exception("handing jobs over failed")

    def plan(self, buffered: int, interactive: int) -> Plan:
        """The policy's word on the buffer: how many jobs go over now, in groups of how many."""
        scheduler = self.scheduler
        assert scheduler is not None
        now = time.monotonic()
        waited = now - self._oldest if self._oldest is not None else 0.0
        view = replace(scheduler.view(), buffered=buffered, buffered_interactive=interactive, waited_s=waited,
                       interactive_recent=now - self._interactive_at < scheduler.limits.mixed_s)
        return plan(scheduler.limits, view)

    def pass_on(self) -> None:
        """Hand over what the policy says, interactive jobs first, and within a lane by picture affinity
        (``policy.affinity_order``); the rest stays buffered, the oldest keeping its arrival time (the batch
        window runs from there)."""
        with self._flushing:
            with self._held_lock:
                held = sorted(self._held, key=self._lane)
            if not held:
                return
            todo = self.plan(len(held), sum(1 for req in held if self._lane(req) == 0))
            if not todo.hand_over:
                return
            held = self._by_affinity(held)
            going = {id(r) for r in held[:todo.hand_over]}
            with self._held_lock:
                self._held = [r for r in self._held if id(r) not in going]
                self._oldest = time.monotonic() if self._held else None
                pictures = [self._held_pictures.pop(i, frozenset()) for i in going]
            self._warm_up(pictures)
            self._group = todo.group
            self._hand_over(held[:todo.hand_over])

    def _by_affinity(self, held: list[Any]) -> list[Any]:
        """Each lane's jobs in ``policy.affinity_order`` (the lanes stay in their order)."""
        out: list[Any] = []
        for lane in (0, 1):
            same = [r for r in held if self._lane(r) == lane]
            pictures = [self._held_pictures.get(id(r)) or _pictures(r) for r in same]
            out += [same[i] for i in affinity_order(pictures, self._warm)]
        return out

    def _warm_up(self, pictures: list[frozenset[tuple[str, str]]]) -> None:
        """Remember the pictures handed over last (a bounded number: the worker's caches are bounded too)."""
        for each in pictures:
            for picture in each:
                self._warm.pop(picture, None)
                self._warm[picture] = None
        while len(self._warm) > self.warm_pictures:
            self._warm.popitem(last=False)

    def _lane(self, request: Any) -> int:
        info = getattr(request, "delivery_info", None) or {}
        return 0 if info.get("routing_key") == self.interactive_queue else 1

    def _hand_over(self, requests: list[Any]) -> None:
        """Interactive jobs and bulk jobs go over in separate hand-overs: a group joins the decode loop's
        interactive lane only if all its jobs are interactive (one bulk job in it used to send an
        interactive job to the back of the bulk lane)."""
        for lane, size in ((0, self.limits.handover_rows), (1, self._group)):
            same = [r for r in requests if self._lane(r) == lane]
            for start in range(0, len(same), size):
                chunk = same[start:start + size]
                if self.scheduler is not None:
                    arrived = self.scheduler.expect(len(chunk), interactive=lane == 0)
                    with self._coming_lock:
                        self._coming.setdefault(_ids(chunk), []).append(arrived)
                try:
                    super().flush(chunk)
                except BaseException:
                    self.arrival(chunk)()  # it never reached a pool thread: its rows are not on their way
                    raise

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


def _pictures(request: Any) -> frozenset[tuple[str, str]]:
    """A buffered job's pictures as (owner, image key), read from its message as it is (a malformed one has
    none: ``parse`` deals with it). Per owner, as the worker's caches are."""
    try:
        job = (request.kwargs or {})["job"]
        owner = str(job.get("owner", "default"))
        return frozenset((owner, str(part["key"])) for m in job["messages"] for part in m["content"]
                         if isinstance(part, dict) and part.get("type") == "image" and "key" in part)
    except (KeyError, TypeError, AttributeError):
        return frozenset()


def _ids(requests: Sequence[Any]) -> tuple[str, ...]:
    return tuple(r.id for r in requests)


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
    if queue.reads_wake_lists(settings.broker):
        app.conf.broker_transport = transport.transport_for(settings.broker)
        app.conf.broker_transport_options = {
            **app.conf.broker_transport_options, "tuwen_screen": transport.screen_option(screen) if screen else None,
            "tuwen_interactive_queues": (settings.interactive_queue,), "tuwen_interactive_room": HANDOVER_ROWS}
    events = JobEvents(app, hostname, settings.flower_show_text)
    producer = Client(settings)  # the one way to publish a job (here: giving jobs back to the queue)
    answerer = Answerer(settings, runtime, scheduler, jobs, images, metrics, events,
                        publish=lambda job, countdown: producer.publish(job, countdown=countdown))
    limits = scheduler.limits
    @app.task(name=queue.TASK_NAME, base=Handover, bind=True, acks_late=True, scheduler=scheduler,
              look_s=min(limits.batch_wait_s / 4, 0.01), interactive_queue=settings.interactive_queue)
    def answer(self: Handover, requests: Sequence[Any]) -> None:
        worker = requests[0].hostname if requests else "?"
        answerer.run(parse(requests), worker=worker or "?", arrived=self.arrival(requests))

    def received(request: Any = None, **_: Any) -> None:
        if request is None or request.name != queue.TASK_NAME:
            return
        answer.note_arrival(request)
        events.received_message(request)

    signals.task_received.connect(received, weak=False)
    signals.worker_shutdown.connect(lambda **_: events.flush(), weak=False)
    scheduler.on_step.append(lambda running, waiting: answer.kick() if running < scheduler.max_rows else None)
    return app, answerer
