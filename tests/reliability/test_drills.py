"""Failure drills with real processes: nothing lost, every answer right, nobody waits forever.

Each drill checks what it claims from outside the system's own bookkeeping where it can: a kill lands on
a job that the fresh process itself claimed and is running (its pid from its heartbeat), every answer is
checked against its picture's known facts, and executions are counted from the workers' own log lines
(``tests.drills``). Each prints a ``DRILL {...}`` line and appends it to build/drills.jsonl (the tables in
docs/reliability.md come from it, through scripts/drill_table.py).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tuwen.pipeline.client import Client
from tuwen.pipeline.errors import Unavailable
from tuwen.pipeline.jobs import JobStore, connect
from tuwen.pipeline.localredis import LocalRedis
from tests.ports import free_port
from tuwen.pipeline.schema import JobRequest, JobStatus
from tuwen.pipeline.settings import Settings
from tests.conftest import make_settings
from tests.drills import (Lives, Producer, assert_kills_landed, check, executions, kill_log, kill_repeatedly,
                          outcome, submit_samples, wait_until)
from tests.faults import ComposeRedis, ResultWrites, TcpProxy, report
from tests.s3servers import S3Endpoint
from tuwen.workers.demo.samples import load_samples
from tuwen.workers.demo.scenes import has_facts
from tuwen.workers.serve.hooks import Hooks, injected_oom
from tuwen.workers.bench.process import WorkerProcess
from tuwen.workers.serve.reaper import Reaper

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

#: The production default: a dead worker's jobs come back through the reaper, not the visibility timeout.
DEFAULT_VISIBILITY_TIMEOUT_S = Settings.model_fields["visibility_timeout_s"].default


@pytest.fixture
def drill_redis() -> Iterator[LocalRedis]:
    with LocalRedis(appendonly=True, port=free_port()) as server:
        yield server


def test_kill_9_worker_three_times_during_a_run(drill_redis: LocalRedis, s3: S3Endpoint, tmp_path: Path,
                                                lives: list[Lives]) -> None:
    t_start = time.monotonic()
    settings = make_settings(drill_redis.url, s3, visibility_timeout_s=DEFAULT_VISIBILITY_TIMEOUT_S,
                             answer_cache=False)
    writes = ResultWrites(drill_redis.url).started()
    client = Client(settings)
    worker = Lives(settings, "kill@drill", tmp_path)
    lives.append(worker)
    worker.start()
    # Given 60 jobs over pictures with known answers
    jobs = submit_samples(client, 60)
    ids = list(jobs)
    # When the worker is killed 3 times, each time while a job claimed by its fresh process is running
    kills = kill_repeatedly(worker, client, ids, 3)
    t0 = time.monotonic()
    # Then every job ends, answered right, each seen answered, no result written twice; the killed jobs ran again
    numbers, results = outcome(client, jobs, worker.logs, timeout=240, since=t0, writes=writes)
    writes.stop()
    report("kill -9 the worker 3× during a run, restart it", **numbers, kills=kill_log(kills),
           duration_s=round(time.monotonic() - t_start, 1))
    check(numbers, jobs, results)
    assert numbers["publishes"] == 60 and numbers["duplicated"] == 0, numbers
    assert_kills_landed(kills, results, 3)
    assert numbers["recomputed"] >= 3, numbers


def test_redis_sigkilled_mid_run_with_the_compose_persistence(s3: S3Endpoint, tmp_path: Path,
                                                              lives: list[Lives]) -> None:
    """What can a client lose when Redis dies? An id handed out that is then never answered and unknown."""
    t_start = time.monotonic()
    with ComposeRedis() as server:
        # Given Redis run as docker-compose.yml runs it (AOF, fsync every second) ...
        assert server.config("appendonly") == "yes" and server.config("appendfsync") == "everysec"
        settings = make_settings(server.url, s3, visibility_timeout_s=DEFAULT_VISIBILITY_TIMEOUT_S,
                                 answer_cache=False)
        client = Client(settings)
        worker = Lives(settings, "redis@drill", tmp_path)
        lives.append(worker)
        pid = worker.start().proc.pid  # type: ignore[union-attr]
        # ... a producer submitting without pause, and the worker answering
        producer = Producer.mid_run(client, worker)
        # When Redis is killed with SIGKILL mid-run and its supervisor starts it again on the same data
        server.crash()
        crashed = time.monotonic()
        before = len(producer.ids())
        last_s = sum(crashed - t <= 1.0 for t in list(producer.handed_out_at))
        server.start()
        t0 = time.monotonic()
        # ... and the producer goes on until 10 more jobs were handed out after the restart
        wait_until(lambda: len(producer.ids()) >= before + 10, 60, "10 jobs handed out after the restart")
        producer.stop()
        # Then every id ever handed out is answered, right, and seen answered: nothing is unknown
        numbers, results = outcome(client, producer.jobs, worker.logs, timeout=240, since=t0)
        alive = worker.current.alive and worker.current.proc.pid == pid  # type: ignore[union-attr]
        report("Redis killed (SIGKILL) mid-run and restarted, AOF fsync every second (as compose)",
               **numbers, handed_out_before_kill=before, handed_out_last_second=last_s,
               refused_submits=producer.refused, worker_kept_running=alive,
               duration_s=round(time.monotonic() - t_start, 1))
        worker.stop()  # while its Redis is still there to finish a warm shutdown
        client.close()
    check(numbers, producer.jobs, results)
    assert alive, worker.current.log_tail()
    assert last_s > 0, "no id was handed out in the last second before the kill: the drill did not probe it"


def test_s3_outage_longer_than_the_storage_wait_gives_jobs_back(drill_redis: LocalRedis, s3: S3Endpoint,
                                                                 tmp_path: Path, lives: list[Lives]) -> None:
    t_start = time.monotonic()
    host, port = s3.endpoint.split(":")
    proxy = TcpProxy(host, int(port)).up()
    settings = make_settings(drill_redis.url, s3, minio_endpoint=proxy.endpoint, storage_wait_s=3,
                             answer_cache=False)
    client = Client(settings)
    worker = Lives(settings, "s3@drill", tmp_path)
    lives.append(worker)
    worker.start()
    samples = load_samples()
    # Given 12 jobs whose pictures are stored, when storage goes away before the worker fetches them
    prepared = [client.prepare(samples[i % 10].path.read_bytes(), samples[i % 10].question) for i in range(12)]
    jobs = {p.id: samples[i % 10] for i, p in enumerate(prepared)}
    proxy.down()
    outage = time.monotonic()
    for request in prepared:
        client.enqueue(request)
    # Then a submit during the outage gets a clear, retryable error
    with pytest.raises(Unavailable) as refused:
        client.submit(samples[0].path.read_bytes(), samples[0].question)
    assert refused.value.retryable
    # And once storage has been away longer than TUWEN_STORAGE_WAIT_S, the worker gives its jobs back:
    # seen running, then queued again (their attempt not counted), and storage comes back only then
    seen_running: set[str] = set()
    given_back: set[str] = set()

    def some_given_back() -> bool:
        for i, r in client.jobs.get_many(list(jobs)).items():
            if r.status == JobStatus.running:
                seen_running.add(i)
            elif r.status == JobStatus.queued and i in seen_running:
                given_back.add(i)
        return bool(given_back)

    wait_until(some_given_back, 60, "a job given back to the queue", every=0.02)
    assert "giving" in worker.current.log_tail(200) and "back to the queue" in worker.current.log_tail(200)
    proxy.up()
    t0 = time.monotonic()
    numbers, results = outcome(client, jobs, worker.logs, timeout=180, since=t0)
    proxy.down()
    report("S3 unreachable longer than TUWEN_STORAGE_WAIT_S (3 s): jobs given back to the queue",
           submit_during_outage=refused.value.code, given_back=len(given_back),
           outage_s=round(t0 - outage, 1), **numbers, duration_s=round(time.monotonic() - t_start, 1))
    check(numbers, jobs, results)
    assert all(r.attempts == 1 for r in results.values()), {i: r.attempts for i, r in results.items()}
    assert numbers["run_twice"] == 0


def held_by_storage(drill_redis: LocalRedis, s3: S3Endpoint, **overrides: Any) -> tuple[Settings, TcpProxy]:
    """Settings whose storage is behind a proxy, and the proxy: with storage away a claimed job stays
    ``running`` (its picture is being fetched) for up to ``storage_wait_s`` — a window that does not race."""
    host, port = s3.endpoint.split(":")
    proxy = TcpProxy(host, int(port)).up()
    return make_settings(drill_redis.url, s3, minio_endpoint=proxy.endpoint, storage_wait_s=120,
                         answer_cache=False, **overrides), proxy


def test_a_job_that_keeps_killing_its_worker_fails_with_too_many_attempts(
        drill_redis: LocalRedis, s3: S3Endpoint, tmp_path: Path, lives: list[Lives]) -> None:
    t_start = time.monotonic()
    settings, proxy = held_by_storage(drill_redis, s3, max_attempts=2)
    client = Client(settings)
    broker = connect(settings.broker)
    sample = load_samples()[0]
    request = client.prepare(sample.path.read_bytes(), sample.question)
    worker = Lives(settings, "attempts@drill", tmp_path)
    lives.append(worker)
    kills: list[dict[str, Any]] = []
    put_back: list[list[str]] = []
    # Given TUWEN_MAX_ATTEMPTS=2 and a job that is running (its picture being fetched) in a fresh worker
    worker.start()  # a worker starts only with storage reachable; it goes away once the worker is up
    proxy.down()
    client.enqueue(request)
    for life in range(3):
        if life:
            proxy.up()
            worker.start()
            proxy.down()
            # the dead worker's message goes back to the queue now (a live worker's reaper would after 30 s)
            put_back.append(Reaper(broker, client.jobs.redis, [settings.interactive_queue], grace_s=0).sweep())
        if life < 2:
            # When its worker is killed while running it, twice
            kills.append(worker.kill_when_running(client, [request.id], timeout=60))
    # Then the third start does not run it: it fails with too_many_attempts, and its message is acknowledged
    result = client.wait(request.id, timeout=60)
    wait_until(lambda: not broker.hlen("unacked") and not broker.llen(settings.interactive_queue), 30,
               "the message acknowledged")
    proxy.down()
    broker.close()
    runs = executions(worker.logs)
    report("a job whose worker is killed every time it runs it (TUWEN_MAX_ATTEMPTS=2)", jobs=1,
           lost=int(not result.status.terminal), code=result.error.code if result.error else None,
           attempts=result.attempts, executions=runs[request.id], kills=kill_log(kills),
           duration_s=round(time.monotonic() - t_start, 1))
    assert [k["victims"] for k in kills] == [[request.id]] * 2, kills
    assert all(p in ([request.id], []) for p in put_back), put_back  # [] if the worker's own reaper was first
    assert result.status == JobStatus.failed and result.error is not None, result
    assert result.error.code == "too_many_attempts" and result.attempts == 3, result
    assert "started 2 times" in result.error.message
    assert runs[request.id] == 0  # the model never answered it: every run was cut short


def test_cancelling_a_running_job_lets_it_finish_and_says_so(drill_redis: LocalRedis, s3: S3Endpoint,
                                                             tmp_path: Path, lives: list[Lives]) -> None:
    t_start = time.monotonic()
    settings, proxy = held_by_storage(drill_redis, s3)
    client = Client(settings)
    worker = Lives(settings, "cancel@drill", tmp_path)
    lives.append(worker)
    worker.start()
    samples = load_samples()
    # Given two jobs running in the worker (held fetching their pictures while storage is away)
    prepared = [client.prepare(s.path.read_bytes(), s.question) for s in samples[:2]]
    proxy.down()
    for request in prepared:
        client.enqueue(request)
    wait_until(lambda: len(worker.own_running(client, [p.id for p in prepared])) == 2, 60, "both jobs running")
    # When one of them is cancelled
    assert client.cancel(prepared[0].id).status == JobStatus.running  # a running job is not stopped ...
    assert client.jobs.cancel_requested(prepared[0].id) and not client.jobs.cancel_requested(prepared[1].id)
    proxy.up()
    # Then both finish with their right answers, and only the cancelled one says a cancel was asked for
    results = client.wait_many([p.id for p in prepared], timeout=120)
    proxy.down()
    assert [r.status for r in results.values()] == [JobStatus.succeeded] * 2, results
    assert all(has_facts(results[p.id].answer or "", s.facts) for p, s in zip(prepared, samples))
    assert [results[p.id].cancel_requested for p in prepared] == [True, False]
    assert client.get(prepared[0].id).cancel_requested  # ... and the stored result keeps the flag
    runs = executions(worker.logs)
    assert [runs[p.id] for p in prepared] == [1, 1]
    report("a running job cancelled (it finishes; its result says cancel_requested)", jobs=2, lost=0, wrong=0,
           run_twice=0, duration_s=round(time.monotonic() - t_start, 1))


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
    assert all(has_facts(results[r.id].answer or "", s.facts) for r, s in zip(good, samples))
    assert results[vanished.id].error.code == "image_not_found"  # type: ignore[union-attr]
    # ... saying where the worker looked (the bucket and its endpoint), the clue when two processes disagree
    where = f"{client.settings.minio_bucket}/{vanished.image_key} on {client.settings.minio_endpoint}"
    assert where in results[vanished.id].error.message, results[vanished.id].error  # type: ignore[union-attr]
    assert results[garbage.id].error.code == "corrupt_image"  # type: ignore[union-attr]
    assert results[vanished.id].attempts == 1 and results[garbage.id].attempts == 1
    assert jobs.get(garbage.id).status == JobStatus.failed
    report("poison jobs (image deleted; undecodable object)", jobs=8, lost=0, wrong=0,
           codes=[results[vanished.id].error.code, results[garbage.id].error.code])  # type: ignore[union-attr]


def test_out_of_memory_splits_batches(drill_redis: LocalRedis, s3: S3Endpoint, tmp_path: Path,
                                      lives: list[Lives]) -> None:
    t_start = time.monotonic()
    settings = make_settings(drill_redis.url, s3, answer_cache=False)
    client = Client(settings)
    worker = Lives(settings, "oom@drill", tmp_path, hooks=Hooks(oom_min_batch=3))
    lives.append(worker)
    worker.start()
    jobs = submit_samples(client, 20)
    numbers, results = outcome(client, jobs, worker.logs, timeout=120, since=time.monotonic())
    max_batch = max(r.batch_size or 0 for r in results.values())
    report("out of memory on batches ≥ 3 (injected)", **numbers, max_batch=max_batch,
           duration_s=round(time.monotonic() - t_start, 1))
    check(numbers, jobs, results)
    assert max_batch <= 2 and numbers["run_twice"] == 0
    assert "retrying halves" in worker.current.log_tail(400)


def test_out_of_memory_on_a_single_item_is_reported(demo_checkpoint: Path) -> None:
    from tuwen.workers.engine.model import Item, Runtime

    rt = Runtime(Settings(model_path=demo_checkpoint, torch_threads=1))
    rt.before_generate = injected_oom(1)
    sample = load_samples()[0]
    answers = rt.answer_batch([Item(sample.path.read_bytes(), sample.question)] * 4)
    assert [a.error["code"] if a.error else None for a in answers] == ["out_of_memory"] * 4


def test_sigterm_mid_batch_loses_nothing(drill_redis: LocalRedis, s3: S3Endpoint, tmp_path: Path,
                                         lives: list[Lives]) -> None:
    t_start = time.monotonic()
    settings = make_settings(drill_redis.url, s3, visibility_timeout_s=DEFAULT_VISIBILITY_TIMEOUT_S,
                             answer_cache=False)
    writes = ResultWrites(drill_redis.url).started()
    client = Client(settings)
    worker = Lives(settings, "term@drill", tmp_path)
    lives.append(worker)
    worker.start()
    jobs = submit_samples(client, 40)
    ids = list(jobs)
    # Given a job claimed by the worker is running, when it gets SIGTERM
    running = worker.wait_own_running(client, ids, 60)
    worker.current.signal(signal.SIGTERM)
    assert worker.current.proc is not None and worker.current.proc.wait(120) == 0
    # Then it finished what it was running before it exited (a warm shutdown), and a restart does the rest
    at_stop = client.jobs.get_many(ids)
    done_at_stop = sum(r.status.terminal for r in at_stop.values())
    assert all(at_stop[i].status == JobStatus.succeeded for i in running), {i: at_stop[i].status for i in running}
    t0 = time.monotonic()
    worker.start()
    numbers, results = outcome(client, jobs, worker.logs, timeout=180, since=t0, writes=writes)
    writes.stop()
    report("SIGTERM to the worker mid-batch, then restart", done_before_stop=done_at_stop, **numbers,
           duration_s=round(time.monotonic() - t_start, 1))
    check(numbers, jobs, results)
    assert numbers["publishes"] == 40 and numbers["duplicated"] == 0 and numbers["run_twice"] == 0, numbers
