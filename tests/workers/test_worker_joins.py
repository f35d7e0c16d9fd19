"""A job that arrives while a worker process is decoding joins the running batch: proven from outside the
process, by the task events it publishes (what Flower shows) and the results it writes.

tests/workers/test_scheduler.py proves joins in this process, on the decode loop itself; this one goes
through the queue, a real ``tuwen worker`` and its events. The model is the tiny random LLaVA
(``tiny_checkpoint``), whose greedy answers never end early: a job decodes for as many steps as it asks.
"""

from __future__ import annotations

import ast
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tuwen.pipeline.app import make_celery
from tuwen.pipeline.client import Client
from tuwen.pipeline.localredis import LocalRedis
from tuwen.pipeline.schema import JobStatus
from tuwen.pipeline.settings import Settings
from tests.conftest import TIMING, make_settings
from tests.s3servers import S3Endpoint
from tests.workers.test_families import picture, png
from tuwen.workers.bench.process import WorkerProcess
from tuwen.workers.engine.model import Item, Runtime

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300), pytest.mark.xdist_group(TIMING)]

#: Steps the long job decodes: seconds even on an idle machine, so the short one has time to join.
LONG_TOKENS = 200
SHORT_TOKENS = 4


class EventLog:
    """Every event the workers on ``settings``' broker publish, as Flower receives them, in arrival order."""

    def __init__(self, settings: Settings) -> None:
        self.app = make_celery(settings)
        self.events: list[dict[str, Any]] = []
        self._ready = threading.Event()
        self._receiver: Any = None
        self._thread = threading.Thread(target=self._run, name="event-log", daemon=True)

    def _run(self) -> None:
        with self.app.connection_for_read() as conn:
            receiver = self.app.events.Receiver(conn, handlers={"*": self.events.append})
            receiver.on_consume_ready = lambda *_, **__: self._ready.set()
            self._receiver = receiver
            receiver.capture(limit=None, timeout=None, wakeup=False)

    def start(self) -> EventLog:
        self._thread.start()
        assert self._ready.wait(30), "the event receiver did not start"
        return self

    def stop(self) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(10)

    def of(self, uuid_: str, kind: str, timeout: float = 10.0) -> dict[str, Any]:
        """The one ``kind`` event of task ``uuid_``, waiting for it: events are published in batches, after the
        results are written (``tuwen.workers.serve.events``)."""
        deadline = time.monotonic() + timeout
        while not (found := [e for e in list(self.events) if e.get("uuid") == uuid_ and e.get("type") == kind]):
            assert time.monotonic() < deadline, (uuid_, kind, "no such event")
            time.sleep(0.05)
        assert len(found) == 1, (uuid_, kind, found)
        return found[0]

    def group_of(self, job_id: str) -> dict[str, Any]:
        """The ``tuwen.group`` hand-over whose job list holds ``job_id`` (its task-received event)."""
        groups = [e for e in list(self.events) if e.get("type") == "task-received" and e.get("name") == "tuwen.group"
                  and job_id in ast.literal_eval(e["kwargs"])["jobs"]]
        assert len(groups) == 1, (job_id, groups)
        return groups[0]


@pytest.fixture
def joining_worker(redis_server: LocalRedis, s3: S3Endpoint, tiny_checkpoint: Callable[[str], Path],
                   tmp_path: Path) -> Iterator[tuple[Settings, EventLog]]:
    tag = uuid.uuid4().hex[:8]
    settings = make_settings(redis_server.url, s3, model_path=tiny_checkpoint("llava"), max_new_tokens=256,
                             interactive_queue=f"join-i-{tag}", bulk_queue=f"join-b-{tag}", answer_cache=False)
    log = EventLog(settings).start()
    worker = WorkerProcess(settings, f"joins-{tag}@tests", tmp_path / "worker.log").start()
    try:
        worker.wait_ready(timeout=120)
        yield settings, log
    finally:
        worker.stop()
        log.stop()


def test_a_job_joins_the_batch_a_worker_process_is_decoding(joining_worker: tuple[Settings, EventLog]) -> None:
    settings, log = joining_worker
    client = Client(settings)
    long_picture, short_picture = png(picture(96, 72, seed=1)), png(picture(64, 48, seed=2))
    try:
        # Given a long job that the worker is decoding (its first piece of text has come back)
        long = client.submit(long_picture, "描述这张图片。", max_new_tokens=LONG_TOKENS, stream=True)
        pieces = client.stream(long.id, timeout=120)
        first = next(pieces)
        assert first.text, first
        # When a short job arrives
        short = client.submit(short_picture, "图中是什么颜色？", max_new_tokens=SHORT_TOKENS)
        rest = list(pieces)
        results = client.wait_many([long.id, short.id], timeout=120)
    finally:
        client.close()
    long_result, short_result = results[long.id], results[short.id]
    assert long_result.status == short_result.status == JobStatus.succeeded, (long_result, short_result)
    assert rest and rest[-1].result is not None and rest[-1].result.id == long.id
    # Then the worker's events show the short job handed over in a group of its own, after the long job's
    # decode started and before it ended; the short one ended first
    long_started, long_ended = log.of(long.id, "task-started"), log.of(long.id, "task-succeeded")
    short_started, short_ended = log.of(short.id, "task-started"), log.of(short.id, "task-succeeded")
    long_group, short_group = log.group_of(long.id), log.group_of(short.id)
    assert long_group["uuid"] != short_group["uuid"] and ast.literal_eval(short_group["kwargs"])["jobs"] == [short.id]
    assert long_started["timestamp"] < short_group["timestamp"] <= short_started["timestamp"]
    assert short_ended["timestamp"] < long_ended["timestamp"]
    # And it decoded in one batch with the long one: two rows, as its event and its result both say
    assert ast.literal_eval(short_ended["result"])["batch_size"] == 2
    assert short_result.batch_size == long_result.batch_size == 2
    assert (short_result.generated_tokens, long_result.generated_tokens) == (SHORT_TOKENS, LONG_TOKENS)
    # And joining changed neither answer: each is the one the same model gives it alone
    rt = Runtime(Settings(model_path=settings.model_path, torch_threads=1, max_new_tokens=256))
    alone = rt.answer_batch([Item(long_picture, "描述这张图片。", LONG_TOKENS),
                             Item(short_picture, "图中是什么颜色？", SHORT_TOKENS)])
    assert [long_result.answer, short_result.answer] == [a.answer for a in alone]
