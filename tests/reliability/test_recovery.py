"""kill -9 drill with production defaults: a dead worker's jobs come back within a minute.

The visibility timeout stays at its default (600 s, safe for real models' long batches). Before the
reaper, the killed worker's running and prefetched jobs sat in Redis's ``unacked`` hash for up to ten
minutes while a restarted worker idled.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tuwen.pipeline import registry
from tuwen.pipeline.client import Client
from tuwen.pipeline.localredis import LocalRedis
from tests.ports import free_port
from tuwen.pipeline.schema import JobStatus
from tuwen.pipeline.settings import Settings
from tests.conftest import TIMING, make_settings
from tests.faults import ResultWrites, report
from tests.s3servers import S3Endpoint
from tuwen.workers.demo.samples import load_samples
from tuwen.workers.bench.process import WorkerProcess
from tuwen.workers.engine.model import Item, Runtime

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420), pytest.mark.xdist_group(TIMING)]

JOBS = 30
DEFAULT_VISIBILITY_TIMEOUT_S = Settings.model_fields["visibility_timeout_s"].default


@pytest.fixture
def recovery_redis() -> Iterator[LocalRedis]:
    with LocalRedis(appendonly=True, port=free_port()) as server:
        yield server


@pytest.fixture
def started() -> Iterator[list[WorkerProcess]]:
    """Workers a test starts; killed at the end even if the test failed half-way."""
    procs: list[WorkerProcess] = []
    yield procs
    for proc in procs:
        proc.kill()


@pytest.fixture(scope="module")
def expected(runtime: Runtime) -> list[str]:
    """Each bundled sample's answer from the same model in this process (greedy: deterministic)."""
    answers = runtime.answer_batch([Item(s.path.read_bytes(), s.question) for s in load_samples()])
    assert all(a.ok for a in answers)
    return [a.answer or "" for a in answers]


@pytest.mark.parametrize("replacement", ["restarted", "another"])
def test_kill_9_mid_batch_recovers_within_a_minute_with_default_settings(
        replacement: str, recovery_redis: LocalRedis, s3: S3Endpoint, tmp_path: Path, expected: list[str],
        started: list[WorkerProcess]) -> None:
    settings = make_settings(recovery_redis.url, s3, visibility_timeout_s=DEFAULT_VISIBILITY_TIMEOUT_S,
                             answer_cache=False)
    assert settings.visibility_timeout_s == 600 and settings.max_attempts == 3
    writes = ResultWrites(recovery_redis.url).started()
    client = Client(settings)
    victim = WorkerProcess(settings, "victim@recovery", tmp_path / "victim.log").start()
    started.append(victim)
    victim.wait_ready(180)
    samples = load_samples()
    ids = [client.submit(samples[i % len(samples)].path.read_bytes(), samples[i % len(samples)].question).id
           for i in range(JOBS)]
    # Given a job claimed by the victim process (its pid, from its heartbeat) is running ...
    deadline = time.monotonic() + 60
    while not any(r.status == JobStatus.running and r.worker == "victim@recovery"
                  for r in client.jobs.get_many(ids).values()):
        assert time.monotonic() < deadline, victim.log_tail()
        time.sleep(0.005)
    beat = next(w for w in registry.live_workers(client.jobs.redis) if w["name"] == "victim@recovery")
    assert victim.proc is not None and beat["pid"] == victim.proc.pid
    # ... when it is killed with kill -9
    victim.kill()
    t0 = time.monotonic()
    at_kill = client.jobs.get_many(ids)
    killed = [i for i, r in at_kill.items() if r.status == JobStatus.running]
    held = int(client.jobs.redis.hlen("unacked"))
    assert killed and held >= len(killed)
    # ... and a worker takes over (the victim restarted under its name, or another one)
    name = "victim@recovery" if replacement == "restarted" else "survivor@recovery"
    survivor = WorkerProcess(settings, name, tmp_path / "survivor.log").start()
    started.append(survivor)
    survivor.wait_ready(180)
    # Then every job ends within a minute of the kill, answered once and right
    results = client.wait_many(ids, timeout=90)
    recover_s = round(time.monotonic() - t0, 1)
    time.sleep(1.0)  # the last result publishes
    survivor.stop()
    writes.stop()
    client.close()
    numbers = {
        "recover_s": recover_s, "jobs": JOBS, "held_at_kill": held, "running_at_kill": len(killed),
        "succeeded": sum(r.status == JobStatus.succeeded for r in results.values()),
        "lost": sum(not r.status.terminal for r in results.values()),
        "duplicated": sum(writes.counts[i] > 1 for i in ids),
        "recomputed": sum(r.attempts > 1 for r in results.values()),
    }
    report(f"kill -9 mid-batch, default visibility timeout ({settings.visibility_timeout_s} s), "
           f"{replacement} worker takes over", **numbers)
    lost = {i: (results[i].status, results[i].attempts, results[i].worker) for i in ids if not results[i].status.terminal}
    assert numbers["succeeded"] == JOBS and numbers["lost"] == 0, (lost, survivor.log_tail())
    assert all(writes.counts[i] == 1 for i in ids), {i: writes.counts[i] for i in ids if writes.counts[i] != 1}
    assert [results[i].answer for i in ids] == [expected[n % len(samples)] for n in range(JOBS)]
    assert all(results[i].attempts >= 2 for i in killed), {i: results[i].attempts for i in killed}
    assert recover_s < 60, numbers
    assert "put back" in survivor.log_tail(400)
