"""Poison queue messages: each is refused alone, counted, moved to the dead-letter list; the worker goes on.

Before, ``'not json at all'``, ``'[1,2,3]'`` or a body that is not base64 made the worker exit
("Unrecoverable error: JSONDecodeError"), and ``'{"foo":1}'`` made it reconnect forever.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tuwen.pipeline import deadletter
from tuwen.pipeline import app as queue
from tuwen.pipeline.client import Client
from tuwen.pipeline.jobs import connect
from tuwen.pipeline.localredis import LocalRedis
from tests.ports import free_port
from tuwen.pipeline.schema import JobStatus
from tuwen.pipeline.settings import Settings
from tests.conftest import make_settings
from tests.faults import metric_values, report
from tests.s3servers import S3Endpoint
from tuwen.workers.demo.samples import load_samples
from tuwen.workers.bench.process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def poison_run(s3: S3Endpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with LocalRedis(port=free_port()) as server:
        settings = make_settings(server.url, s3, metrics_port=free_port(), answer_cache=False)
        worker = WorkerProcess(settings, "poison@tests", tmp_path_factory.mktemp("poison") / "worker.log").start()
        try:
            worker.wait_ready(180)
            client = Client(settings)
            yield {"settings": settings, "client": client, "worker": worker, "redis": connect(server.url)}
            client.close()
        finally:
            worker.stop()


def genuine_envelope(client: Client, settings: Settings, job_fields: dict[str, Any] | None = None) -> tuple[str, str]:
    """A real ``tuwen.answer`` message as the producer writes it (published to a queue no worker reads),
    and its job id; ``job_fields`` are merged into the job inside its body."""
    sample = load_samples()[0]
    request = client.prepare(sample.path.read_bytes(), sample.question)
    client.jobs.create(request)
    side = settings.model_copy(update={"interactive_queue": "poison-capture"})
    queue.enqueue(client.celery, side, request)
    raw = client.jobs.redis.rpop("poison-capture")
    if job_fields:
        envelope = json.loads(raw)
        args, kwargs, embed = json.loads(base64.b64decode(envelope["body"]))
        kwargs["job"].update(job_fields)
        envelope["body"] = base64.b64encode(json.dumps([args, kwargs, embed]).encode()).decode()
        raw = json.dumps(envelope)
    return raw, request.id


def mutate(raw: str, change: Any) -> str:
    envelope = json.loads(raw)
    change(envelope)
    return json.dumps(envelope)


def test_poison_messages_are_refused_alone_and_kept(poison_run: dict[str, Any]) -> None:
    settings, client, worker, r = poison_run["settings"], poison_run["client"], poison_run["worker"], poison_run["redis"]
    good, _ = genuine_envelope(client, settings)
    bad_job, bad_job_id = genuine_envelope(client, settings, {"colour": "red"})  # a field this worker lacks
    poison: list[tuple[str | bytes, str]] = [
        ("not json at all", "not_json"),
        (b"\xff\xfe\x00 binary", "not_json"),
        ("[1,2,3]", "not_an_envelope"),
        ('{"foo":1}', "not_an_envelope"),
        (mutate(good, lambda e: e.update(body="!!!not base64!!!")), "bad_body_encoding"),
        (mutate(good, lambda e: e["headers"].update(task="some.other.task")), "not_a_tuwen_job"),
        (mutate(good, lambda e: e.update({"content-type": "application/x-python-serialize"})), "not_a_tuwen_job"),
        (bad_job, "bad_job"),
    ]
    # Given a live worker, when poison messages are pushed onto its queue
    for message, _ in poison:
        r.lpush(settings.interactive_queue, message)
    # Then it keeps answering: a job submitted after them is answered
    sample = load_samples()[1]
    after = client.submit(sample.path.read_bytes(), sample.question)
    result = client.wait(after.id, timeout=120)
    assert result.status == JobStatus.succeeded, (result, worker.log_tail())
    assert worker.alive, worker.log_tail()
    # And each poison message is in the dead-letter list, whole, with why
    entries = list(reversed(deadletter.recent(r, 100)))
    assert [e["reason"] for e in entries] == [reason for _, reason in poison]
    for (message, _), entry in zip(poison, entries):
        text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
        assert entry["message"] == text and entry["queue"] == settings.interactive_queue
        assert entry["worker"] == "poison@tests"
    # And none of them is left in the broker's unacknowledged set (it would come back as poison again)
    deadline = time.monotonic() + 10
    while r.hlen("unacked") or r.zcard("unacked_index"):
        assert time.monotonic() < deadline, r.hkeys("unacked")
        time.sleep(0.1)
    # And the job whose message could not be read fails with a code instead of waiting forever
    failed = client.wait(bad_job_id, timeout=10)
    assert failed.status == JobStatus.failed and failed.error is not None
    assert failed.error.code == "invalid_message"
    # And the refusals are counted in the worker's metrics
    values = metric_values(urllib.request.urlopen(f"http://127.0.0.1:{settings.metrics_port}/metrics",
                                                  timeout=10).read().decode())
    counts = {reason: sum(1 for _, r_ in poison if r_ == reason) for _, reason in poison}
    for reason, n in counts.items():
        assert values[f'tuwen_poison_messages_total{{reason="{reason}"}}'] == n
    # And `tuwen status` shows them
    env = {"PATH": "/usr/bin:/bin", **settings.to_env()}
    out = subprocess.run([sys.executable, "-m", "tuwen.pipeline.cli", "status", "--json"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    dead = json.loads(out.stdout)["dead_letters"]
    assert dead["count"] == len(poison) and dead["recent"][0]["reason"] == "bad_job"
    screen = subprocess.run([sys.executable, "-m", "tuwen.pipeline.cli", "status"], env={**env, "COLUMNS": "160"},
                            capture_output=True, text=True, timeout=60)
    assert f"refused messages ({len(poison)} in {deadletter.KEY})" in screen.stdout
    assert "not_an_envelope" in screen.stdout
    report("poison queue messages pushed at a live worker (moved to the dead-letter list)", jobs=2, lost=0,
           duplicated=0, codes=sorted({reason for _, reason in poison}))


def test_a_refused_message_does_not_wait_for_the_worker_to_restart(poison_run: dict[str, Any]) -> None:
    """The worker never exits or reconnects over poison: its process and announcement stay the same."""
    worker, r, settings = poison_run["worker"], poison_run["redis"], poison_run["settings"]
    pid = worker.proc.pid  # type: ignore[union-attr]
    before = deadletter.size(r)
    for _ in range(20):
        r.lpush(settings.bulk_queue, '{"foo":1}')
    deadline = time.monotonic() + 30
    while deadletter.size(r) < before + 20:
        assert time.monotonic() < deadline, worker.log_tail()
        time.sleep(0.1)
    assert worker.alive and worker.proc.pid == pid  # type: ignore[union-attr]
    assert "Unrecoverable error" not in worker.log_tail(400)
    assert worker.log_tail(400).count("Connected to") == 1
