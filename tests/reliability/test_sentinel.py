"""Redis behind Sentinel: tuwen's URL for it, and a failover drill with real processes.

The drill runs a primary, a replica and three sentinels; a producer submits without pause and a worker
answers; the primary is SIGKILLed while the worker runs a job it claimed. The sentinels promote the
replica, and every client (the producer's, the worker's job store, its Celery consumer and reaper, an
``AsyncClient``) must follow without a restart. Every id handed out must then be answered, right,
seen answered in the worker's own log, and nothing unknown: writes a client heard of were on the
replica before it heard (``TUWEN_REDIS_REPLICAS_ACK``, on by default with Sentinel).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import redis
from openai import OpenAI
from pydantic import ValidationError

from tuwen.pipeline import sentinel
from tuwen.pipeline.aclient import AsyncClient
from tuwen.pipeline.gateway.apikeys import KeyStore
from tuwen.pipeline.bulk.submission import CHUNK
from tuwen.pipeline.client import Client
from tuwen.pipeline.jobs import PREFIX as JOB_PREFIX
from tuwen.pipeline.schema import JobStatus
from tuwen.pipeline.settings import Settings
from tests.conftest import make_settings
from tests.monitoring.test_monitoring import AUTH, http_get, start_flower
from tests.ports import free_port
from tests.drills import GatewayProcess, Lives, Producer, check, outcome, wait_until
from tests.gateway.test_batches import ask
from tests.faults import SentinelRedis, report
from tests.s3servers import S3Endpoint
from tuwen.workers.bench.bulk import stored_manifest, submit_rate
from tuwen.workers.demo.samples import Sample, load_samples
from tuwen.workers.demo.scenes import has_facts

#: The production default: a dead worker's jobs come back through the reaper, not the visibility timeout.
DEFAULT_VISIBILITY_TIMEOUT_S = Settings.model_fields["visibility_timeout_s"].default
#: Distinct jobs the failover drill hands out in all (TUWEN_DRILL_JOBS; the issue's 200 by default).
DRILL_JOBS = int(os.environ.get("TUWEN_DRILL_JOBS", "200"))


@pytest.mark.parametrize("url, sentinels, service, db, password, sentinel_password", [
    ("redis+sentinel://h1:26379,h2:26380,h3/mymaster/2", (("h1", 26379), ("h2", 26380), ("h3", 26379)),
     "mymaster", 2, None, None),
    ("redis+sentinel://:s3cret@h1/tuwen?sentinel_password=other", (("h1", 26379),), "tuwen", 0, "s3cret", "other"),
])
def test_a_sentinel_url_names_the_sentinels_the_service_and_the_database(
        url: str, sentinels: tuple[tuple[str, int], ...], service: str, db: int, password: str | None,
        sentinel_password: str | None) -> None:
    target = sentinel.parse(url)
    assert target == sentinel.SentinelUrl(sentinels, service, db, None, password, sentinel_password)
    # kombu's Sentinel transport gets every sentinel, the database, and the service as master_name
    assert target.kombu_url().split(";")[0].startswith("sentinel://")
    assert len(target.kombu_url().split(";")) == len(sentinels)
    assert target.transport_options({})["master_name"] == service
    # and with Sentinel, writes wait for one replica unless told otherwise
    assert Settings(redis_url=url).replicas_ack == 1 and Settings(redis_url=url, redis_replicas_ack=0).replicas_ack == 0
    assert Settings(redis_url="redis://127.0.0.1:6379/0").replicas_ack == 0


@pytest.mark.parametrize("url, says", [
    ("redis+sentinel://h1:26379/", "<service name>/<db number>"),
    ("redis+sentinel:///tuwen/0", "<service name>/<db number>"),
    ("redis+sentinel://h1:port/tuwen", "is not host or host:port"),
    ("redis+sentinel://h1/tuwen/zero", "<service name>/<db number>"),
    ("redis+sentinel://h1/tuwen?sentinel_passwd=x", "unknown parameters sentinel_passwd"),
])
def test_a_malformed_sentinel_url_is_refused_at_start_saying_how_it_should_look(url: str, says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        Settings(redis_url=url)


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_primary_sigkilled_mid_run_fails_over_and_nothing_is_lost(s3: S3Endpoint, tmp_path: Path,
                                                                   lives: list[Lives]) -> None:
    t_start = time.monotonic()
    with SentinelRedis() as deployment:
        # Given tuwen on a Sentinel deployment with its production defaults (one replica acknowledges writes)
        # (TUWEN_DRILL_REPLICAS_ACK=0 runs the drill with it off, to see what the acknowledgement buys; the
        # drill then reports what was lost instead of failing on it)
        ack = os.environ.get("TUWEN_DRILL_REPLICAS_ACK")
        settings = make_settings(deployment.url, s3, visibility_timeout_s=DEFAULT_VISIBILITY_TIMEOUT_S,
                                 answer_cache=False, **({"redis_replicas_ack": int(ack)} if ack else {}))
        assert settings.replicas_ack == (int(ack) if ack else 1)
        client, second = Client(settings), Client(settings)
        worker = Lives(settings, "sentinel@drill", tmp_path)
        lives.append(worker)
        pid = worker.start().proc.pid  # type: ignore[union-attr]
        gateway = GatewayProcess(settings, tmp_path / "gateway.log").start()
        token = KeyStore(client.jobs.redis).create("sentinel-drill", "drill", 0)[1]
        # ... two producers submitting without pause, the worker answering, and a chat answer streaming
        producers = [Producer.mid_run(client, worker), Producer(second)]
        producers[1].start()
        stream = Streamer(gateway.url, token, load_samples()[1])
        wait_until(lambda: stream.chunks > 0, 120, "a streamed answer under way")
        # When the primary is killed with SIGKILL while the worker runs a job it claimed
        old = deployment.kill_primary()
        crashed, crashed_at = time.monotonic(), time.time()
        streaming = stream.chunks > 0 and not stream.finished.is_set()
        handed = lambda: sum(len(p.ids()) for p in producers)  # noqa: E731
        before = handed()
        last_s = sum(crashed - t <= 1.0 for p in producers for t in list(p.handed_out_at))
        # ... the sentinels promote the replica
        failover_s = wait_until(lambda: deployment.primary_port() != old, 60, "the sentinels promoted the replica")
        assert deployment.primary_port() in set(deployment.ports) - {old}
        # ... and the producers go on until DRILL_JOBS distinct jobs were handed out, 10 of them after the kill
        wait_until(lambda: handed() >= max(before + 10, DRILL_JOBS), 300, f"{DRILL_JOBS} jobs handed out")
        for producer in producers:
            producer.stop()
        stream.finished.wait(180)
        # Then every id ever handed out is answered, right, and seen answered: nothing is unknown, nothing twice
        jobs = {**producers[0].jobs, **producers[1].jobs}
        numbers, results = outcome(client, jobs, worker.logs, timeout=300, since=crashed)
        # ... an AsyncClient (the gateway's) reads them from the new primary
        last = producers[0].ids()[-1]
        assert asyncio.run(_read(settings, last)) == JobStatus.succeeded
        # ... and the worker kept running, and said once per client that it followed the new primary
        alive = worker.current.alive and worker.current.proc.pid == pid  # type: ignore[union-attr]
        log = worker.current.log_path.read_text(errors="replace")
        followed = log.count(f"the primary of {deployment.SERVICE} moved")
        promoted_at = crashed_at + failover_s  # as the drill saw it (it polls the sentinels)
        first_answer_s = min(r.finished_at for r in results.values()
                             if r.finished_at and r.finished_at > promoted_at) - crashed_at
        report(f"Redis primary SIGKILLed mid-run; Sentinel promotes a replica (replica ack {settings.replicas_ack})",
               **numbers, failover_s=round(failover_s, 1), kill_to_first_answer_after_promotion_s=round(first_answer_s, 1),
               producers=len(producers), handed_out_before_kill=before, handed_out_last_second=last_s,
               refused_submits=sum(p.refused for p in producers), stream_in_flight_at_kill=streaming,
               stream_attempts=stream.attempts, stream_errors=stream.errors, stream_right=stream.right,
               worker_kept_running=alive, follow_logs=followed,
               unfinished={i: (r.status.value, r.attempts) for i, r in results.items() if not r.status.terminal},
               duration_s=round(time.monotonic() - t_start, 1))
        gateway.stop()
        worker.stop()
        client.close()
        second.close()
    if settings.replicas_ack:
        check(numbers, jobs, results)
    assert numbers["jobs"] >= DRILL_JOBS and len(set(jobs)) == numbers["jobs"], numbers
    assert streaming, "the streamed answer had ended before the kill: the drill did not probe it"
    assert stream.right, (stream.answer, stream.errors)  # streamed right, or its retry (after a coded error) was
    assert alive, worker.current.log_tail()
    assert followed >= 1, log[-4000:]
    assert last_s > 0, "no id was handed out in the last second before the kill: the drill did not probe it"


class Streamer(threading.Thread):
    """A chat answer streamed through the gateway with the openai SDK, as a web backend would: a stream that
    breaks (a coded error event, or the connection) is asked again a second later, as a client would, up to 8
    times."""

    def __init__(self, url: str, token: str, sample: Sample) -> None:
        super().__init__(daemon=True)
        self.sdk = OpenAI(base_url=url + "/v1", api_key=token, max_retries=0, timeout=120)
        self.sample, self.chunks, self.attempts = sample, 0, 0
        self.errors: list[str] = []
        self.answer, self.finished = "", threading.Event()
        self.start()

    @property
    def right(self) -> bool:
        return has_facts(self.answer, self.sample.facts)

    def run(self) -> None:
        message = ask(self.sample.path.read_bytes(), self.sample.question)
        try:
            while self.attempts < 8 and not self.right:
                self.attempts += 1
                parts: list[str] = []
                try:
                    for chunk in self.sdk.chat.completions.create(model="tuwen", messages=[message], stream=True,
                                                                  max_tokens=48):
                        if chunk.choices and chunk.choices[0].delta.content:
                            parts.append(chunk.choices[0].delta.content)
                            self.chunks += 1
                    self.answer = "".join(parts)
                except (openai.APIError, httpx.HTTPError) as exc:
                    self.errors.append(getattr(exc, "code", None) or type(exc).__name__)
                    time.sleep(1.0)
        finally:
            self.finished.set()


@pytest.mark.integration
@pytest.mark.timeout(420)
def test_a_frozen_primary_comes_back_as_a_replica_and_nothing_written_to_it_is_taken_as_done(
        s3: S3Endpoint, tmp_path: Path, lives: list[Lives]) -> None:
    t_start = time.monotonic()
    with SentinelRedis() as deployment:
        # Given tuwen on Sentinel with its production defaults, a producer submitting and a worker answering
        settings = make_settings(deployment.url, s3, visibility_timeout_s=DEFAULT_VISIBILITY_TIMEOUT_S,
                                 answer_cache=False)
        client = Client(settings)
        worker = Lives(settings, "frozen@drill", tmp_path)
        lives.append(worker)
        worker.start()
        producer = Producer.mid_run(client, worker)
        # When the primary is frozen (SIGSTOP: connections open, nothing answered) while the worker runs a job
        old = deployment.freeze_primary()
        frozen, frozen_at = time.monotonic(), time.time()
        before = len(producer.ids())
        # ... for longer than the sentinels take to promote a replica, then thawed with what it was sent pending
        failover_s = wait_until(lambda: deployment.primary_port() != old, 60, "the sentinels promoted a replica")
        time.sleep(2.0)
        deployment.thaw(old)
        thawed = time.monotonic()
        rejoined_s = wait_until(lambda: deployment.role(old) == "slave", 60, "the old primary rejoined as a replica")
        # ... and the producer goes on until 10 more jobs were handed out
        wait_until(lambda: len(producer.ids()) >= before + 10, 120, "10 jobs handed out after the thaw")
        producer.stop()
        # Then every id handed out (those the frozen server answered after its thaw included) is answered, right
        numbers, results = outcome(client, producer.jobs, worker.logs, timeout=240, since=frozen)
        report("Redis primary frozen (SIGSTOP) past the failover, then thawed: it rejoins as a replica",
               **numbers, failover_s=round(failover_s, 1), frozen_s=round(thawed - frozen, 1),
               thaw_to_replica_s=round(rejoined_s, 1), handed_out_before_freeze=before,
               refused_submits=producer.refused, unreplicated_refused=sentinel.counts.unreplicated_writes,
               unfinished={i: (r.status.value, r.attempts) for i, r in results.items() if not r.status.terminal},
               duration_s=round(time.monotonic() - t_start, 1))
        answered_after = [r for r in results.values() if r.finished_at and r.finished_at > frozen_at]
        worker.stop()
        client.close()
    check(numbers, producer.jobs, results)
    assert answered_after, "no job was answered after the freeze: the drill did not probe the failover"


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_flower_watches_a_sentinel_deployment_through_a_failover(s3: S3Endpoint, tmp_path: Path,
                                                                 lives: list[Lives]) -> None:
    with SentinelRedis() as deployment:
        # Given a worker and `tuwen flower` on a Sentinel deployment (one TUWEN_REDIS_URL for both)
        settings = make_settings(deployment.url, s3, answer_cache=False)
        client = Client(settings)
        worker = Lives(settings, "flower@sentinel", tmp_path)
        lives.append(worker)
        worker.start()
        port = free_port()
        flower = start_flower(settings, port, tmp_path / "flower.log")
        base = f"http://127.0.0.1:{port}"
        try:
            sample = load_samples()[0]

            def seen(job_id: str) -> bool:
                return job_id in http_get(base + "/api/tasks?limit=1000", AUTH).decode()

            def a_task_seen() -> bool:
                """A job runs; whether Flower shows its task within 15 s. Celery's events are best effort (one
                sent while the worker or Flower is still reconnecting is gone), so a later job may be needed;
                Flower's own reconnects back off 2, 4, 8, 16 s."""
                job = client.submit(sample.path.read_bytes(), sample.question)
                assert client.wait(job.id, timeout=120).status == JobStatus.succeeded
                deadline = time.monotonic() + 15
                while not seen(job.id) and time.monotonic() < deadline:
                    time.sleep(0.5)
                return seen(job.id)

            for round_ in ("before", "after"):
                # When jobs run (before the primary is killed, and again after the sentinels promoted a replica)
                # Then Flower shows one's task, the worker, and the broker's queues read through the sentinels
                wait_until(a_task_seen, 120, f"Flower saw a task {round_} the failover", every=0)
                wait_until(lambda: "flower@sentinel" in json.loads(http_get(base + "/api/workers?refresh=1", AUTH,
                                                                             timeout=30)), 60, f"worker {round_}")
                queues = json.loads(http_get(base + "/api/queues/length", AUTH, timeout=30))["active_queues"]
                assert {q["name"] for q in queues} >= {settings.interactive_queue}, queues
                if round_ == "before":
                    old = deployment.kill_primary()
                    wait_until(lambda: deployment.primary_port() != old, 60, "the sentinels promoted a replica")
        finally:
            flower.terminate()
            flower.wait(20)
            worker.stop()
            client.close()


async def _read(settings: Settings, job_id: str) -> JobStatus:
    aclient = AsyncClient(settings)
    try:
        return (await aclient.get(job_id)).status
    finally:
        await aclient.aclose()


def test_a_sentinel_deployment_is_followed_by_a_plain_client() -> None:
    """The job store's client, away from any worker: writes after a failover go to the new primary."""
    with SentinelRedis() as deployment:
        client = Client(Settings(redis_url=deployment.url))
        client.jobs.redis.set("tuwen:drill:before", "1")
        assert client.jobs.redis.execute_command("WAIT", 2, 5000) == 2  # on both replicas before the kill
        old = deployment.kill_primary()
        wait_until(lambda: deployment.primary_port() != old, 60, "the sentinels promoted the replica")
        changes = sentinel.counts.primary_changes
        deadline = time.monotonic() + 30
        while True:
            try:
                client.jobs.redis.set("tuwen:drill:after", "1")
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        new = redis.Redis(port=deployment.primary_port(), decode_responses=True)
        assert new.get("tuwen:drill:before") == "1" and new.get("tuwen:drill:after") == "1"
        assert sentinel.counts.primary_changes == changes + 1
        new.close()
        client.close()


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_bulk_goes_through_sentinel_batched_and_a_replica_holds_its_jobs(s3: S3Endpoint, tmp_path: Path) -> None:
    with SentinelRedis() as deployment:
        # Given tuwen on a Sentinel deployment (one replica acknowledges writes), its replicas in sync, and two
        # batches' worth of lines
        primary = redis.Redis(port=deployment.primary_port(), decode_responses=True)
        wait_until(lambda: primary.info("replication").get("slave0", {}).get("state") == "online", 30,
                   "a replica in sync (a fresh one waits for the primary's first snapshot)")
        settings = make_settings(deployment.url, s3, answer_cache=False)
        client = Client(settings)
        lines = CHUNK + 30
        manifest = stored_manifest(tmp_path / "in.jsonl", [client.store_image(load_samples()[0].path)], lines, "s")
        unreplicated = sentinel.counts.unreplicated_writes
        # When it is submitted (batched: one publish pipeline and one WAIT a batch)
        _, bulk = submit_rate(client, manifest, lines)
        # Then every line is queued, each job was marked queued with the WAIT of its batch, and every WAIT was
        # acknowledged in time
        assert bulk.queued == lines
        ids = list(primary.scan_iter(JOB_PREFIX + bulk.id + "_*", count=1000))
        assert len(ids) == lines and all(primary.hget(i, "queued_at") for i in ids)
        assert sentinel.counts.unreplicated_writes == unreplicated
        # And a replica holds every job record and every message
        held = []
        for port in set(deployment.ports) - {deployment.primary_port()}:
            replica = redis.Redis(port=port, decode_responses=True)
            jobs = sum(1 for _ in replica.scan_iter(JOB_PREFIX + bulk.id + "_*", count=1000))
            held.append((jobs, replica.llen(settings.bulk_queue)))
            replica.close()
        assert (lines, lines) in held, held
        primary.close()
        client.close()
