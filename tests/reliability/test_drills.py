"""Failure drills with real processes: nothing lost, nothing written twice, nobody waits forever.

Each drill prints a ``DRILL {...}`` line and appends it to build/drills.jsonl (the README's table).
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import redis
from PIL import Image

from tuwen.pipeline.client import Client
from tuwen.pipeline.errors import Unavailable
from tuwen.pipeline.jobs import DONE_CHANNEL, JobStore
from tuwen.pipeline.localredis import LocalRedis
from tuwen.pipeline.schema import JobRequest, JobStatus
from tuwen.pipeline.settings import Settings
from tests.conftest import make_settings
from tests.faults import TcpProxy, report
from tests.s3servers import S3Endpoint
from tuwen.workers.demo.samples import load_samples
from tuwen.workers.process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


class DoneCounter(threading.Thread):
    """Counts completion publishes per job: the job store publishes only when it writes a result."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.counts: Counter[str] = Counter()
        self.client = redis.Redis.from_url(url, decode_responses=True)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe(DONE_CHANNEL + "*")
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.pubsub.get_message(timeout=0.5)
            except redis.ConnectionError:
                time.sleep(0.5)
                try:
                    self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                    self.pubsub.psubscribe(DONE_CHANNEL + "*")
                except redis.ConnectionError:
                    pass
                continue
            if msg and msg["type"] == "pmessage":
                self.counts[msg["channel"][len(DONE_CHANNEL):]] += 1

    def stop(self) -> None:
        self._stop.set()


@pytest.fixture
def drill_redis() -> Iterator[LocalRedis]:
    with LocalRedis(appendonly=True) as server:
        yield server


def submit_many(client: Client, n: int) -> list[str]:
    samples = load_samples()
    return [client.submit(samples[i % len(samples)].path.read_bytes(), samples[i % len(samples)].question).id
            for i in range(n)]


def start_worker(settings: Settings, name: str, tmp: Path) -> WorkerProcess:
    w = WorkerProcess(settings, name, tmp / f"{name.replace('@', '_')}.log").start()
    w.wait_ready(180)
    return w


def when_running(client: Client, ids: list[str], timeout: float = 60) -> None:
    """Block until some job is in a batch (status running): a kill then lands mid-batch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r.status == JobStatus.running for r in client.jobs.get_many(ids).values()):
            return
        time.sleep(0.005)
    raise AssertionError("no job was ever seen running")


def kill_during_run(settings: Settings, client: Client, ids: list[str], worker: WorkerProcess, times: int,
                    tmp: Path) -> WorkerProcess:
    """kill -9 the worker ``times`` times, each while a job is running, restarting it each time."""
    for _ in range(times):
        when_running(client, ids)
        worker.kill()
        worker = start_worker(settings, worker.hostname, tmp)
    return worker


def outcome(client: Client, ids: list[str], counter: DoneCounter, timeout: float, since: float) -> dict[str, Any]:
    """Wait for the jobs; count what was lost, written twice, run twice; time to recover from ``since``."""
    results = client.wait_many(ids, timeout=timeout)
    recover_s = round(time.monotonic() - since, 1)
    time.sleep(1.0)  # let the last publishes arrive
    return {
        "recover_s": recover_s,
        "jobs": len(ids),
        "succeeded": sum(r.status == JobStatus.succeeded for r in results.values()),
        "lost": sum(not r.status.terminal for r in results.values()),
        "duplicated": sum(counter.counts[i] > 1 for i in ids),
        "written_once": sum(counter.counts[i] == 1 for i in ids),
        "recomputed": sum(r.attempts > 1 for r in results.values()),
    }


def test_kill_9_worker_three_times_during_a_100_job_run(drill_redis: LocalRedis, s3: S3Endpoint, tmp_path: Path) -> None:
    settings = make_settings(drill_redis.url, s3, visibility_timeout_s=10, max_attempts=5, answer_cache=False)
    counter = DoneCounter(drill_redis.url)
    counter.start()
    client = Client(settings)
    worker = start_worker(settings, "kill@drill", tmp_path)
    ids = submit_many(client, 100)
    worker = kill_during_run(settings, client, ids, worker, 3, tmp_path)
    t0 = time.monotonic()
    numbers = outcome(client, ids, counter, timeout=240, since=t0)
    worker.stop()
    counter.stop()
    report("kill -9 the worker 3× during a run, restart it", **numbers)
    assert numbers["succeeded"] == 100 and numbers["lost"] == 0
    assert numbers["duplicated"] == 0 and numbers["written_once"] == 100


def test_redis_restart_mid_run(drill_redis: LocalRedis, s3: S3Endpoint, tmp_path: Path) -> None:
    settings = make_settings(drill_redis.url, s3, visibility_timeout_s=10, answer_cache=False)
    counter = DoneCounter(drill_redis.url)
    counter.start()
    client = Client(settings)
    worker = start_worker(settings, "redis@drill", tmp_path)
    ids = submit_many(client, 60)
    time.sleep(0.5)
    drill_redis.restart()  # same port, same AOF directory
    t0 = time.monotonic()
    ids += submit_many(client, 10)  # producers reconnect by themselves
    numbers = outcome(client, ids, counter, timeout=240, since=t0)
    assert worker.alive, worker.log_tail()
    worker.stop()
    counter.stop()
    report("Redis restarted mid-run (AOF)", **numbers)
    assert numbers["succeeded"] == 70 and numbers["lost"] == 0 and numbers["duplicated"] == 0


def test_s3_outage_of_20_seconds(drill_redis: LocalRedis, s3: S3Endpoint, tmp_path: Path) -> None:
    host, port = s3.endpoint.split(":")
    proxy = TcpProxy(host, int(port)).up()
    settings = make_settings(drill_redis.url, s3, minio_endpoint=proxy.endpoint, storage_wait_s=60,
                             answer_cache=False)
    counter = DoneCounter(drill_redis.url)
    counter.start()
    client = Client(settings)
    worker = start_worker(settings, "s3@drill", tmp_path)
    samples = load_samples()
    # Given 30 jobs whose images are stored, when storage goes away before the worker fetches them
    prepared = [client.prepare(samples[i % 10].path.read_bytes(), samples[i % 10].question) for i in range(30)]
    proxy.down()
    for request in prepared:
        client.enqueue(request)
    # Then a submit during the outage gets a clear, retryable error
    with pytest.raises(Unavailable) as refused:
        client.submit(samples[0].path.read_bytes(), samples[0].question)
    assert refused.value.retryable
    time.sleep(20)
    assert all(r.status != JobStatus.succeeded for r in client.jobs.get_many([p.id for p in prepared]).values())
    proxy.up()
    t0 = time.monotonic()
    numbers = outcome(client, [p.id for p in prepared], counter, timeout=180, since=t0)
    worker.stop()
    counter.stop()
    proxy.down()
    report("S3 unreachable for 20 s mid-run", submit_during_outage=refused.value.code,
           **numbers)
    assert numbers["succeeded"] == 30 and numbers["duplicated"] == 0


def test_poison_jobs_fail_alone_with_a_code(worker: WorkerProcess, client: Client) -> None:
    samples = load_samples()
    jobs = JobStore(client.jobs.redis, 3600)
    good = [client.prepare(s.path.read_bytes(), s.question) for s in samples[:6]]
    buf = BytesIO()
    Image.new("RGB", (31, 17), (9, 9, 9)).save(buf, format="PNG")
    vanished = client.prepare(buf.getvalue(), "图中是什么形状？")
    client.images.delete(vanished.image_key)
    client.images.objects.put("images/garbage", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    garbage = JobRequest(image_key="images/garbage", question="图中是什么形状？")
    for request in [*good[:3], vanished, garbage, *good[3:]]:
        client.enqueue(request)
    results = client.wait_many([r.id for r in [*good, vanished, garbage]], timeout=120)
    assert all(results[r.id].status == JobStatus.succeeded for r in good)
    assert results[vanished.id].error.code == "image_not_found"  # type: ignore[union-attr]
    assert results[garbage.id].error.code == "corrupt_image"  # type: ignore[union-attr]
    assert results[vanished.id].attempts == 1 and results[garbage.id].attempts == 1
    assert jobs.get(garbage.id).status == JobStatus.failed
    report("poison jobs (image deleted; undecodable object)", jobs=8, lost=0, duplicated=0,
           codes=[results[vanished.id].error.code, results[garbage.id].error.code])  # type: ignore[union-attr]


def test_out_of_memory_splits_batches(drill_redis: LocalRedis, s3: S3Endpoint, tmp_path: Path) -> None:
    settings = make_settings(drill_redis.url, s3, fault_oom_min_batch=3, answer_cache=False)
    client = Client(settings)
    worker = start_worker(settings, "oom@drill", tmp_path)
    ids = submit_many(client, 20)
    results = client.wait_many(ids, timeout=120)
    worker.stop()
    assert all(r.status == JobStatus.succeeded for r in results.values()), [r.error for r in results.values()]
    assert max(r.batch_size or 0 for r in results.values()) <= 2
    assert "retrying halves" in worker.log_tail(400)
    report("out of memory on batches ≥ 3 (injected)", jobs=20, lost=0, duplicated=0,
           max_batch=max(r.batch_size or 0 for r in results.values()))


def test_out_of_memory_on_a_single_item_is_reported(demo_checkpoint: Path) -> None:
    from tuwen.workers.runtime import Item, Runtime

    rt = Runtime(Settings(model_path=demo_checkpoint, fault_oom_min_batch=1, torch_threads=1))
    sample = load_samples()[0]
    answers = rt.answer_batch([Item(sample.path.read_bytes(), sample.question)] * 4)
    assert [a.error["code"] if a.error else None for a in answers] == ["out_of_memory"] * 4


def test_sigterm_mid_batch_loses_nothing(drill_redis: LocalRedis, s3: S3Endpoint, tmp_path: Path) -> None:
    settings = make_settings(drill_redis.url, s3, visibility_timeout_s=10, answer_cache=False)
    counter = DoneCounter(drill_redis.url)
    counter.start()
    client = Client(settings)
    worker = start_worker(settings, "term@drill", tmp_path)
    ids = submit_many(client, 60)
    when_running(client, ids)
    worker.signal(signal.SIGTERM)
    assert worker.proc is not None and worker.proc.wait(120) == 0
    done_at_stop = sum(r.status.terminal for r in client.jobs.get_many(ids).values())
    t0 = time.monotonic()
    worker = start_worker(settings, "term@drill", tmp_path)
    numbers = outcome(client, ids, counter, timeout=180, since=t0)
    worker.stop()
    counter.stop()
    report("SIGTERM to the worker mid-batch, then restart",
           done_before_stop=done_at_stop, **numbers)
    assert numbers["succeeded"] == 60 and numbers["lost"] == 0 and numbers["duplicated"] == 0
