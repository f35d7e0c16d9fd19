"""RabbitMQ (quorum queues) as the broker: the pipeline and the kill drill hold there too.

Job state stays in Redis. This machine kind runs RabbitMQ on 127.0.0.1:5672 (guest/guest); where none
runs, these tests skip locally and fail in CI.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tuwen.pipeline.app import make_celery
from tuwen.pipeline.client import Client
from tuwen.pipeline.localredis import LocalRedis
from tuwen.pipeline.schema import JobStatus
from tuwen.pipeline.settings import Settings
from tests.conftest import make_settings, need
from tests.faults import report
from tests.reliability.test_drills import DoneCounter, kill_during_run, outcome, start_worker, submit_many
from tests.s3servers import S3Endpoint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


def rabbit_running() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.fixture
def rabbit_settings(s3: S3Endpoint) -> Iterator[Settings]:
    need(rabbit_running(), "RabbitMQ is not running on 127.0.0.1:5672")
    tag = uuid.uuid4().hex[:8]
    with LocalRedis() as redis_server:
        settings = make_settings(redis_server.url, s3, broker_url=AMQP_URL, interactive_queue=f"tuwen-i-{tag}",
                                 bulk_queue=f"tuwen-b-{tag}", answer_cache=False)
        yield settings
        app = make_celery(settings)
        with app.connection_for_write() as conn:
            for queue in (settings.interactive_queue, settings.bulk_queue):
                try:
                    conn.default_channel.queue_delete(queue)
                except Exception:  # noqa: BLE001 - best-effort cleanup
                    pass


def test_pipeline_on_rabbitmq_quorum_queues(rabbit_settings: Settings, tmp_path: Path) -> None:
    client = Client(rabbit_settings)
    worker = start_worker(rabbit_settings, "rabbit@tests", tmp_path)
    samples = submit_many(client, 24)
    results = client.wait_many(samples, timeout=120)
    worker.stop()
    assert all(r.status == JobStatus.succeeded for r in results.values())
    assert max(r.batch_size or 0 for r in results.values()) > 1
    app = make_celery(rabbit_settings)
    with app.connection_for_write() as conn:
        declared = conn.default_channel.queue_declare(rabbit_settings.interactive_queue, passive=True)
    assert declared.message_count == 0


def test_kill_9_on_rabbitmq(rabbit_settings: Settings, tmp_path: Path) -> None:
    counter = DoneCounter(rabbit_settings.redis_url)
    counter.start()
    client = Client(rabbit_settings)
    worker = start_worker(rabbit_settings, "rabbit-kill@tests", tmp_path)
    ids = submit_many(client, 60)
    worker = kill_during_run(rabbit_settings, client, ids, worker, 2, tmp_path)
    t0 = time.monotonic()
    numbers = outcome(client, ids, counter, timeout=180, since=t0)
    worker.stop()
    counter.stop()
    report("kill -9 the worker 2× on RabbitMQ (quorum queues)", **numbers)
    assert numbers["succeeded"] == 60 and numbers["lost"] == 0 and numbers["duplicated"] == 0
