"""A worker is live only while its consuming loop runs; a stalled one exits; SIGTERM always ends it.

Real worker processes (the null model where the model does not matter), a real redis-server restarted
under them, and an S3 server behind a proxy that can go away.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tuwen.pipeline import registry
from tuwen.pipeline.client import Client
from tuwen.pipeline.jobs import connect
from tuwen.pipeline.localredis import LocalRedis
from tests.ports import free_port
from tuwen.pipeline.schema import JobStatus
from tuwen.pipeline.settings import Settings
from tests.conftest import TIMING, make_settings
from tests.faults import TcpProxy, report
from tests.s3servers import S3Endpoint
from tuwen.workers.demo.samples import load_samples
from tuwen.workers.serve.liveness import EXIT_SHUTDOWN_TIMEOUT, EXIT_STALLED
from tuwen.workers.serve.hooks import Hooks
from tuwen.workers.bench.process import WorkerProcess

NULL = Hooks(null_model=True)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240), pytest.mark.xdist_group(TIMING)]


@pytest.fixture
def redis_aof() -> Iterator[LocalRedis]:
    with LocalRedis(appendonly=True, port=free_port()) as server:
        yield server


@pytest.fixture
def started() -> Iterator[list[WorkerProcess]]:
    """Workers a test starts; killed at the end even if the test failed half-way."""
    procs: list[WorkerProcess] = []
    yield procs
    for proc in procs:
        proc.kill()


def submit(client: Client, n: int) -> list[str]:
    samples = load_samples()
    return [client.submit(samples[i % len(samples)].path.read_bytes(), samples[i % len(samples)].question).id
            for i in range(n)]


def live_names(settings: Settings) -> list[str]:
    client = connect(settings.redis_url)
    try:
        return [w["name"] for w in registry.live_workers(client)]
    finally:
        client.close()


def wait_until(condition, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
    """Poll ``condition`` until true; returns the seconds it took."""
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < timeout, f"not within {timeout:.0f}s: {what}"
        time.sleep(0.2)
    return time.monotonic() - t0


def test_a_worker_paused_across_a_redis_restart_consumes_again(redis_aof: LocalRedis, s3: S3Endpoint,
                                                               tmp_path: Path, started: list[WorkerProcess]) -> None:
    # Given a worker that answers
    settings = make_settings(redis_aof.url, s3)
    client = Client(settings)
    worker = WorkerProcess(settings, "paused@tests", tmp_path / "w.log", hooks=NULL).start()
    started.append(worker)
    worker.wait_ready(120)
    assert client.wait(submit(client, 1)[0], 30).status == JobStatus.succeeded
    # When it is stopped (SIGSTOP), Redis restarts, and it continues (SIGCONT)
    worker.signal(signal.SIGSTOP)
    redis_aof.restart()
    worker.signal(signal.SIGCONT)
    # Then new jobs are answered (they used to stay queued for good, the worker still shown live)
    t0 = time.monotonic()
    ids = submit(client, 5)
    results = client.wait_many(ids, timeout=45)
    assert all(r.status == JobStatus.succeeded for r in results.values()), worker.log_tail()
    report("worker paused (SIGSTOP) across a Redis restart, then continued", jobs=5, lost=0, duplicated=0,
           recover_s=round(time.monotonic() - t0, 1))
    assert "paused@tests" in live_names(settings)
    # And SIGTERM ends it promptly (it used to hang at "Warm shutdown")
    t0 = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.proc is not None and worker.proc.wait(30) == 0
    assert time.monotonic() - t0 < 20
    client.close()


def test_a_stalled_worker_drops_out_and_exits_for_its_supervisor(redis_aof: LocalRedis, s3: S3Endpoint,
                                                                 tmp_path: Path, started: list[WorkerProcess]) -> None:
    # Given a worker whose consuming loop blocks for good at its first message (a wedged Redis read), and a
    # stall timeout (no production default: that is 60 s) just long enough for it to drop out first: its last
    # announcement lapses within FRESH_S + TTL_S = 30 s of its loop's last beat, at most 25 s after the relay
    # first sees jobs waiting, and the watchdog counts its 30 s from that same relay tick
    settings = make_settings(redis_aof.url, s3, stall_timeout_s=30)
    assert settings.stall_timeout_s >= registry.TTL_S + 2 * registry.PERIOD_S, "it would exit before it drops out"
    client = Client(settings)
    worker = WorkerProcess(settings, "stalled@tests", tmp_path / "w.log",
                           hooks=Hooks(null_model=True, stall_after_jobs=1)).start()
    started.append(worker)
    worker.wait_ready(120)
    # When jobs arrive
    ids = submit(client, 3)
    t0 = time.monotonic()
    # Then it is no longer shown live, although its process still runs
    dropped = wait_until(lambda: "stalled@tests" not in live_names(settings), registry.TTL_S + 15,
                         "the stalled worker drops out of the live list")
    assert worker.alive, worker.log_tail()
    # And it exits non-zero once its queue has waited stall_timeout_s, so its supervisor restarts it
    assert worker.proc is not None and worker.proc.wait(settings.stall_timeout_s + 20) == EXIT_STALLED
    exited = time.monotonic() - t0
    assert "stalled: " in worker.log_tail(100)
    # And a restarted worker answers every job, the one the stalled worker held too
    restarted = WorkerProcess(settings, "stalled@tests", tmp_path / "w2.log").start()
    started.append(restarted)
    restarted.wait_ready(120)
    results = client.wait_many(ids, timeout=90)
    assert all(r.status == JobStatus.succeeded for r in results.values()), restarted.log_tail()
    restarted.stop()
    client.close()
    report("consuming loop wedged: the worker drops out of status, exits 75, is restarted", jobs=3, lost=0,
           duplicated=0, dropped_out_s=round(dropped, 1), exited_s=round(exited, 1),
           stall_timeout_s=settings.stall_timeout_s, recover_s=round(time.monotonic() - t0, 1))


def test_sigterm_ends_a_worker_whose_redis_is_gone(redis_aof: LocalRedis, s3: S3Endpoint, tmp_path: Path,
                                                   started: list[WorkerProcess]) -> None:
    # Given a worker in the middle of a batch it cannot finish: storage is away (it retries) ... (its shutdown
    # timeout short: the production default, 90 s, is a supervisor's grace period, not what this checks)
    host, port = s3.endpoint.split(":")
    proxy = TcpProxy(host, int(port)).up()
    settings = make_settings(redis_aof.url, s3, minio_endpoint=proxy.endpoint, storage_wait_s=120,
                             shutdown_timeout_s=3)
    client = Client(settings)
    worker = WorkerProcess(settings, "term@tests", tmp_path / "w.log", hooks=NULL).start()
    started.append(worker)
    worker.wait_ready(120)
    sample = load_samples()[0]
    request = client.prepare(sample.path.read_bytes(), sample.question)
    proxy.down()
    client.enqueue(request)
    wait_until(lambda: client.jobs.get(request.id).status == JobStatus.running, 30, "the job runs")
    # ... and Redis goes away too
    redis_aof.stop()
    # When it gets SIGTERM, then it ends within the shutdown timeout (non-zero: it gave up its batch)
    t0 = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert worker.proc is not None and worker.proc.wait(settings.shutdown_timeout_s + 15) == EXIT_SHUTDOWN_TIMEOUT
    assert time.monotonic() - t0 < settings.shutdown_timeout_s + 10
    assert "warm shutdown still running" in worker.log_tail(50)
    proxy.down()
    client.close()
