"""Row i of ``tuwen bench``: an interactive chat completion over HTTP, idle and during a bulk backlog.

Two set-ups side by side, each a real gateway process and one worker process (the demo model, batches of
``max_batch_size``) on a database of its own: one with the worker's default policy (bulk rows give way to
interactive ones, ``TUWEN_BULK_ROWS_BESIDE_INTERACTIVE``), one where they never do (the cap at
``max_batch_size``). Per repeat and set-up: ``idle`` chat completions one after another on an idle
system, then a bulk backlog queued in full while the worker is paused, and the same chat completions
during its drain (a sample counts only if bulk jobs were still unfinished when it ended). The ratio is
each quantile during the backlog over the same quantile idle, from the same repeat.
"""

from __future__ import annotations

import base64
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from tuwen.pipeline.client import Client
from tuwen.pipeline.gateway.apikeys import KeyStore
from tuwen.pipeline.jobs import connect
from tuwen.pipeline.localredis import LocalRedis, free_port
from tuwen.pipeline.registry import live_workers
from tuwen.pipeline.schema import JobStatus
from tuwen.pipeline.settings import Settings
from tuwen.workers.bench.process import WorkerProcess

SETUPS = {"give": "bulk rows give way (default: 8 beside interactive ones)", "keep": "bulk rows never give way"}


class HttpSetups:
    def __init__(self, tmp: Path, model_path: Path | None, max_batch_size: int, max_new_tokens: int) -> None:
        self.tmp, self.model_path = tmp, model_path
        self.max_batch_size, self.max_new_tokens = max_batch_size, max_new_tokens
        self.redis = LocalRedis()
        self.settings: dict[str, Settings] = {}
        self.workers: dict[str, WorkerProcess] = {}
        self.gateways: dict[str, subprocess.Popen[bytes]] = {}
        self.http: dict[str, httpx.Client] = {}

    def __enter__(self) -> HttpSetups:
        self.redis.start()
        try:
            for db, name in enumerate(SETUPS, start=1):
                beside = {} if name == "give" else {"bulk_rows_beside_interactive": self.max_batch_size}
                s = Settings(redis_url=self.redis.url.rsplit("/", 1)[0] + f"/{db}", storage_dir=self.tmp / name,
                             model_path=self.model_path, max_batch_size=self.max_batch_size, batch_wait_ms=50,
                             max_new_tokens=self.max_new_tokens, answer_cache=False, stall_timeout_s=3600, **beside)
                self.settings[name] = s
                self.workers[name] = WorkerProcess(s, f"http-{name}@localhost", self.tmp / f"http-{name}.log").start()
                self.http[name] = self._gateway(name, s)
            for name, worker in self.workers.items():
                worker.wait_ready(300)
                self._ready(self.http[name])
                worker.signal(signal.SIGSTOP)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for http in self.http.values():
            http.close()
        for gateway in self.gateways.values():
            gateway.terminate()
            gateway.wait(30)
        for worker in self.workers.values():
            worker.signal(signal.SIGCONT)
            worker.stop()
        self.redis.__exit__()

    def _gateway(self, name: str, s: Settings) -> httpx.Client:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TUWEN_")}
        env.update({**s.to_env(), "TUWEN_RATE_LIMIT_PER_MINUTE": "0", "OMP_NUM_THREADS": "1"})
        log = (self.tmp / f"gateway-{name}.log").open("ab")
        self.gateways[name] = subprocess.Popen(
            [sys.executable, "-m", "tuwen.workers.cli", "gateway", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "warning"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        store = connect(s.redis_url)
        try:
            _, token = KeyStore(store).create("bench")
        finally:
            store.close()
        return httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"},
                            timeout=120, trust_env=False)

    @staticmethod
    def _ready(http: httpx.Client) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if http.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError("the gateway did not start")

    def chat(self, name: str, picture: bytes, question: str) -> float:
        """One chat completion, not streamed: seconds from request to whole answer."""
        url = "data:image/png;base64," + base64.b64encode(picture).decode()
        body = {"model": "tuwen", "max_tokens": self.max_new_tokens, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]}
        t0 = time.perf_counter()
        resp = self.http[name].post("/v1/chat/completions", json=body)
        if resp.status_code != 200:
            raise RuntimeError(f"chat completion failed: {resp.status_code} {resp.text[:300]}")
        return time.perf_counter() - t0

    def _resume(self, name: str) -> None:
        """Wake a paused worker and wait until it is on the live list: a pause longer than the registry's TTL
        took it off until its next heartbeat, and the gateway serves no model without a live worker. (Not
        for a fresh beat after every pause: a small backlog drained while the test waited for one.)"""
        worker = self.workers[name]
        worker.signal(signal.SIGCONT)
        store = connect(self.settings[name].redis_url)
        try:
            deadline = time.monotonic() + 60
            while not any(w["name"] == worker.hostname for w in live_workers(store)):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{worker.hostname} did not beat within 60 s of waking")
                time.sleep(0.05)
        finally:
            store.close()

    def warm_up(self, data: list[tuple[bytes, str]]) -> None:
        for name, worker in self.workers.items():
            self._resume(name)
            try:
                for picture, question in data[:8]:
                    self.chat(name, picture, question)
            finally:
                worker.signal(signal.SIGSTOP)

    def latencies(self, name: str, data: list[tuple[bytes, str]], samples: int,
                  backlog: int) -> tuple[list[float], list[float], int, int, float]:
        """(idle seconds, seconds during the backlog, jobs succeeded, jobs in all, backlog drain jobs/s)."""
        worker, client = self.workers[name], Client(self.settings[name])
        try:
            self._resume(name)
            idle = [self.chat(name, *data[i % len(data)]) for i in range(samples)]
            worker.signal(signal.SIGSTOP)
            with ThreadPoolExecutor(8) as pool:
                bulk = list(pool.map(lambda i: client.submit(*data[i % len(data)], max_new_tokens=self.max_new_tokens,
                                                             priority="bulk").id, range(backlog)))
            t0 = time.perf_counter()
            self._resume(name)
            deadline = time.monotonic() + 120
            while not any(r.status != JobStatus.queued for r in client.jobs.get_many(bulk[:8]).values()):
                if time.monotonic() > deadline:
                    raise TimeoutError("the worker took no bulk job in 120 s")
                time.sleep(0.01)
            busy = []
            for i in range(samples):
                seconds = self.chat(name, *data[i % len(data)])
                if any(not r.status.terminal for r in client.jobs.get_many(bulk).values()):
                    busy.append(seconds)
            results = client.wait_many(bulk, timeout=1800)
            drained = backlog / (time.perf_counter() - t0)
            worker.signal(signal.SIGSTOP)
            ok = sum(r.status == JobStatus.succeeded for r in results.values())
            return idle, busy, ok + len(idle) + samples, backlog + 2 * samples, drained
        finally:
            client.close()

    def measure(self, table: Any, data: list[tuple[bytes, str]], opts: Any) -> None:
        """One repeat of row i (both set-ups) into ``table`` (``bench.Table``)."""
        for name, what in SETUPS.items():
            idle, busy, ok, total, drained = self.latencies(name, data, opts.http_samples, opts.http_backlog)
            if not busy:
                raise RuntimeError("the bulk backlog ran out before any interactive sample; raise http_backlog")
            key = "i" if name == "give" else "n"
            for q in (50, 95):
                table(f"{key}{q}", f"interactive chat over HTTP during a {opts.http_backlog}-job bulk backlog, "
                      f"p{q} (× idle p{q}): {what}", "×").add(quantile(busy, q) / quantile(idle, q), ok, total)
            table(f"{key}b", f"the backlog's drain during that traffic: {what}", "jobs/s").add(drained, ok, total)
            table[f"{key}50"].note = (f"last repeat: idle p50 {quantile(idle, 50) * 1000:.0f} ms, p95 "
                                      f"{quantile(idle, 95) * 1000:.0f} ms; during the backlog p50 "
                                      f"{quantile(busy, 50) * 1000:.0f} ms, p95 {quantile(busy, 95) * 1000:.0f} ms; "
                                      f"{len(busy)}/{opts.http_samples} samples during it")


def quantile(values: list[float], q: int) -> float:
    ranked = sorted(values)
    return statistics.median(ranked) if q == 50 else ranked[math.ceil(q / 100 * len(ranked)) - 1]
