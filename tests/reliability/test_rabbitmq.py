"""RabbitMQ (quorum queues) as the broker: the pipeline and the kill drill hold there too.

Job state stays in Redis. The broker is a private rabbitmq-server that the ``rabbitmq_server`` fixture
starts on free ports (never a RabbitMQ this machine happens to run on 5672); ``make test`` installs the
package. Where it is missing, these tests skip locally and fail in CI.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tuwen.pipeline.app import make_celery
from tuwen.pipeline.bulk.submission import CHUNK
from tuwen.pipeline.client import Client
from tuwen.pipeline.localredis import LocalRedis
from tests.ports import free_port
from tuwen.pipeline.settings import Settings
from tests.conftest import make_settings
from tests.drills import Lives, assert_kills_landed, check, kill_log, kill_repeatedly, outcome, submit_samples, wrong_answers
from tests.faults import ResultWrites, report
from tests.rabbit import LocalRabbit
from tests.s3servers import S3Endpoint
from tuwen.workers.bench.bulk import stored_manifest, submit_rate
from tuwen.workers.demo.samples import load_samples

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture
def rabbit_settings(rabbitmq_server: LocalRabbit, s3: S3Endpoint) -> Iterator[Settings]:
    tag = uuid.uuid4().hex[:8]
    with LocalRedis(port=free_port()) as redis_server:
        yield make_settings(redis_server.url, s3, broker_url=rabbitmq_server.url, interactive_queue=f"tuwen-i-{tag}",
                            bulk_queue=f"tuwen-b-{tag}", answer_cache=False)


def test_the_broker_is_a_private_rabbitmq(rabbitmq_server: LocalRabbit, rabbit_settings: Settings) -> None:
    """Never the system's: its own port, node and data directory (the fixture does not depend on 5672)."""
    assert rabbitmq_server.port != 5672 and rabbit_settings.broker == rabbitmq_server.url
    assert rabbitmq_server.node.startswith("tuwen-test-") and (rabbitmq_server.directory / "mnesia").is_dir()


def test_pipeline_on_rabbitmq_quorum_queues(rabbit_settings: Settings, tmp_path: Path, lives: list[Lives]) -> None:
    client = Client(rabbit_settings)
    worker = Lives(rabbit_settings, "rabbit@tests", tmp_path)
    lives.append(worker)
    worker.start()
    jobs = submit_samples(client, 24)
    results = client.wait_many(list(jobs), timeout=120)
    assert all(r.status == "succeeded" for r in results.values()), results
    assert not wrong_answers(jobs, results), wrong_answers(jobs, results)
    assert max(r.batch_size or 0 for r in results.values()) > 1
    app = make_celery(rabbit_settings)
    with app.connection_for_write() as conn:
        declared = conn.default_channel.queue_declare(rabbit_settings.interactive_queue, passive=True)
        arguments = conn.default_channel.queue_declare(rabbit_settings.interactive_queue, durable=True,
                                                       auto_delete=False, arguments={"x-queue-type": "quorum"})
    assert declared.message_count == 0 and arguments.queue == rabbit_settings.interactive_queue  # it is a quorum queue


def test_kill_9_on_rabbitmq(rabbit_settings: Settings, tmp_path: Path, lives: list[Lives]) -> None:
    t_start = time.monotonic()
    writes = ResultWrites(rabbit_settings.redis_url).started()
    client = Client(rabbit_settings)
    worker = Lives(rabbit_settings, "rabbit-kill@tests", tmp_path)
    lives.append(worker)
    worker.start()
    # Given 40 jobs over pictures with known answers
    jobs = submit_samples(client, 40)
    # When the worker is killed twice, each time while a job claimed by its fresh process is running
    kills = kill_repeatedly(worker, client, list(jobs), 2)
    t0 = time.monotonic()
    # Then every job ends, answered right, seen answered, no result written twice; the killed jobs ran again
    numbers, results = outcome(client, jobs, worker.logs, timeout=180, since=t0, writes=writes)
    writes.stop()
    report("kill -9 the worker 2× on RabbitMQ (quorum queues)", **numbers, kills=kill_log(kills),
           duration_s=round(time.monotonic() - t_start, 1))
    check(numbers, jobs, results)
    assert numbers["publishes"] == 40 and numbers["duplicated"] == 0, numbers
    assert_kills_landed(kills, results, 2)
    assert numbers["recomputed"] >= 2, numbers


def test_a_bulk_is_published_batch_by_batch_onto_a_quorum_queue(rabbit_settings: Settings, tmp_path: Path) -> None:
    # Given more than a batch of lines (RabbitMQ cannot batch: its messages go one by one, confirmed)
    client = Client(rabbit_settings)
    lines = CHUNK + 44
    manifest = stored_manifest(tmp_path / "in.jsonl", [client.store_image(load_samples()[0].path)], lines, "r")
    # When it is submitted with no worker running
    _, bulk = submit_rate(client, manifest, lines)
    # Then every line is queued once, on the bulk queue, declared as a quorum queue
    assert bulk.queued == lines
    app = make_celery(rabbit_settings)
    with app.connection_for_write() as conn:
        queued = conn.default_channel.queue_declare(rabbit_settings.bulk_queue, durable=True, auto_delete=False,
                                                    arguments={"x-queue-type": "quorum"})
    assert queued.message_count == lines
    client.close()
