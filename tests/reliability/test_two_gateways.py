"""Two gateways, one SIGKILLed mid-load: clients that retry with their ``Idempotency-Key`` on the other one
lose nothing, and no job is created twice (the key reserves its job id before anything is queued,
``gateway.apikeys.Idempotency``). Real ``tuwen gateway serve`` processes, a real worker, real Redis and S3;
every answer checked against its picture's facts, jobs counted in Redis and in the worker's own log."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tuwen.pipeline.gateway.apikeys import Idempotency, KeyStore
from tuwen.pipeline.jobs import PREFIX as JOB_PREFIX, connect
from tuwen.pipeline.localredis import LocalRedis
from tuwen.workers.bench.process import WorkerProcess
from tuwen.workers.demo.samples import Sample, load_samples
from tuwen.workers.demo.scenes import has_facts
from tests.conftest import make_settings
from tests.drills import GatewayProcess, executions, wait_until
from tests.faults import report
from tests.gateway.test_batches import ask
from tests.ports import free_port
from tests.s3servers import S3Endpoint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

REQUESTS = 40
OWNER = "two-gateways"
CLIENTS = 8


class Load:
    """Chat requests over both gateways, each with its own Idempotency-Key, each retried on the other gateway
    when its connection breaks (as a client behind a load balancer would be). Counts what is in flight where."""

    def __init__(self, gateways: list[GatewayProcess], token: str) -> None:
        self.gateways, self.token = gateways, token
        self.in_flight: Counter[int] = Counter()
        self.where: dict[str, int] = {}  # idempotency key -> the gateway its attempt in flight went to
        self.answered = 0
        self.retried: list[str] = []
        self.lock = threading.Lock()

    def ask(self, n: int, sample: Sample) -> tuple[str, list[str], str]:
        """One request to its end: (idempotency key, the job ids its attempts were told, the answer)."""
        key = uuid.uuid4().hex
        body = {"model": "tuwen", "max_tokens": 24, "messages": [ask(sample.path.read_bytes(), sample.question)]}
        headers = {"Authorization": f"Bearer {self.token}", "Idempotency-Key": key}
        told: list[str] = []
        for attempt in range(8):
            which = (n + attempt) % 2
            with self.lock:
                self.in_flight[which] += 1
                self.where[key] = which
            try:
                resp = httpx.post(self.gateways[which].url + "/v1/chat/completions", json=body, headers=headers,
                                  timeout=120, trust_env=False)
            except httpx.TransportError:
                with self.lock:
                    self.retried.append(key)
                continue
            finally:
                with self.lock:
                    self.in_flight[which] -= 1
                    self.where.pop(key, None)
            if resp.status_code in (409, 503):  # in progress elsewhere, or no gateway ready: later
                time.sleep(0.5)
                continue
            assert resp.status_code == 200, resp.text
            told.append(resp.headers["X-Tuwen-Job-Id"])
            with self.lock:
                self.answered += 1
            return key, told, resp.json()["choices"][0]["message"]["content"]
        raise AssertionError(f"request {n} got no answer in 8 attempts")

    def mid_submission(self, store: Any, gateway: int) -> list[str]:
        """Keys of requests on ``gateway`` caught between reserving their job and saying it is queued (their
        Idempotency record not yet done): where a killed gateway used to leave its retries a 409 for 2
        minutes, and a second job after them."""
        with self.lock:
            keys = [k for k, g in self.where.items() if g == gateway]
        records = [store.get(Idempotency.key(OWNER, k)) for k in keys]
        return [k for k, raw in zip(keys, records) if raw is not None and not _done(json.loads(raw))]


def test_a_gateway_killed_mid_load_loses_nothing_and_creates_no_job_twice(s3: S3Endpoint, tmp_path: Path) -> None:
    t_start = time.monotonic()
    with LocalRedis(appendonly=True, port=free_port()) as server:
        settings = make_settings(server.url, s3, answer_cache=False)
        store = connect(settings.redis_url)
        worker = WorkerProcess(settings, "gateways@drill", tmp_path / "worker.log").start()
        gateways = [GatewayProcess(settings, tmp_path / f"gateway-{i}.log") for i in (0, 1)]
        try:
            worker.wait_ready(timeout=180)
            for gateway in gateways:
                gateway.start()
            token = KeyStore(store).create(OWNER, "drill", 0)[1]
            # Given two gateways answering chat requests from 8 clients, each request with its own key
            samples = load_samples()
            load = Load(gateways, token)
            with ThreadPoolExecutor(CLIENTS) as pool:
                futures = [pool.submit(load.ask, n, samples[n % len(samples)]) for n in range(REQUESTS)]
                # When gateway 0 is killed (SIGKILL) while it holds requests, one of them mid-submission
                wait_until(lambda: load.answered >= 5 and load.in_flight[0] >= 2, 120,
                           "5 answered and 2 requests in flight on gateway 0")
                # (the kill follows the sighting at once: a second look costs the round trips the window lasts)
                candidates: list[str] = []
                holding = [0]

                def sighted() -> bool:
                    holding[0] = load.in_flight[0]
                    candidates[:] = load.mid_submission(store, 0)
                    return bool(candidates)

                wait_until(sighted, 60, "a request mid-submission on gateway 0", every=0.001)
                gateways[0].kill()
                held = holding[0]
                killed = time.monotonic()
                caught = [k for k in candidates if not _done(json.loads(store.get(Idempotency.key(OWNER, k))))]
                outcomes = [f.result(timeout=300) for f in futures]
            recover_s = time.monotonic() - killed
            # Then every request got an answer, right for its picture
            wrong = [(samples[n % len(samples)].question, answer) for n, (_, _, answer) in enumerate(outcomes)
                     if not has_facts(answer, samples[n % len(samples)].facts)]
            # ... each key stands for one job, whichever gateway its attempts reached
            per_key = {key: set(told) for key, told, _ in outcomes}
            jobs = {job for told in per_key.values() for job in told}
            recorded = sum(1 for _ in store.scan_iter(JOB_PREFIX + "*", count=1000))
            runs = executions([worker.log_path])
            numbers = {"requests": REQUESTS, "answered": len(outcomes), "wrong": len(wrong),
                       "held_by_killed_gateway": held, "killed_mid_submission": len(caught),
                       "retried_on_the_other": len(set(load.retried)),
                       "jobs": len(jobs), "job_records": recorded, "answered_twice": sum(runs[j] > 1 for j in jobs),
                       "recover_s": round(recover_s, 1), "duration_s": round(time.monotonic() - t_start, 1)}
            report("two gateways, one killed (SIGKILL) mid-load; clients retry with their Idempotency-Key",
                   **numbers)
        finally:
            for gateway in gateways:
                gateway.kill()
            worker.stop()
            store.close()
    assert not wrong, wrong
    assert all(len(jobs) == 1 for jobs in per_key.values()), per_key
    assert numbers["jobs"] == REQUESTS and numbers["job_records"] == REQUESTS, numbers
    assert numbers["answered_twice"] == 0 and all(runs[j] == 1 for j in jobs), numbers
    # and the kill landed: requests in flight on the killed gateway were retried on the other
    assert numbers["held_by_killed_gateway"] >= 2 and numbers["retried_on_the_other"] >= 1, numbers
    assert caught and all(len(per_key[k]) == 1 for k in caught), (caught, numbers)


def _done(record: dict[str, Any]) -> bool:
    """An Idempotency record that says its job is queued (gateways before reserved ids wrote a job id only then)."""
    return "job_id" in record and record.get("done", True)
