"""The benchmark's real worker processes (rows d–h of ``tuwen bench``).

Every set-up gets its own Redis database, its own storage directory and its own worker processes, all
started once and in parallel. Between measurements a set-up's workers are paused (SIGSTOP), so an idle
worker neither takes jobs nor costs CPU, and a backlog can be queued in full before the clock starts
("producers finished before timing"): submit while paused, resume (SIGCONT), time the drain. Set-ups
never share a database, since a paused worker may hold a message inside a blocked read of its own. The
stall watchdog is set to an hour: a worker paused on purpose would otherwise, on waking to a fresh
backlog, read its own pause as a stalled loop and exit (seen: status 75 after a 142 s pause).

* one: 1 worker × 1 thread, the demo model (rows d, f, h)
* wide / pair: 1 worker × 2 threads against 2 workers × 1 thread, equal thread budgets (row g)
* null: the null model (``Hooks(null_model=True)``), batches ≤ 64 (rows e, e1)
"""

from __future__ import annotations

import math
import random
import signal
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path
from types import TracebackType
from typing import Any

from tuwen.pipeline.client import Client
from tuwen.pipeline.localredis import LocalRedis
from tuwen.pipeline.schema import JobResult, JobStatus
from tuwen.pipeline.settings import Settings
from tuwen.workers.serve.hooks import Hooks
from tuwen.workers.bench.bulk import job_ids, stored_manifest, submit_rate
from tuwen.workers.bench.process import WorkerProcess


def noise_pictures(n: int, seed: int) -> list[bytes]:
    """``n`` distinct small PNGs (random pixels), so content-addressed storage stores each one."""
    from PIL import Image

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        buf = BytesIO()
        Image.frombytes("RGB", (32, 32), rng.randbytes(32 * 32 * 3)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


class Fleet:
    def __init__(self, tmp: Path, model_path: Path | None, max_batch_size: int, max_new_tokens: int) -> None:
        self.tmp = tmp
        self.redis = LocalRedis()
        self.model_path, self.max_batch_size, self.max_new_tokens = model_path, max_batch_size, max_new_tokens
        self.settings: dict[str, Settings] = {}
        self.procs: dict[str, list[WorkerProcess]] = {}

    def __enter__(self) -> Fleet:
        self.redis.start()
        plan = {"one": (1, 1, None, self.max_batch_size), "wide": (1, 2, None, self.max_batch_size),
                "pair": (2, 1, None, self.max_batch_size), "null": (1, 1, Hooks(null_model=True), 64)}
        try:
            for db, (name, (count, threads, hooks, batch)) in enumerate(plan.items(), start=1):
                s = Settings(redis_url=self.redis.url.rsplit("/", 1)[0] + f"/{db}", storage_dir=self.tmp / name,
                             model_path=self.model_path, max_batch_size=batch, batch_wait_ms=50,
                             max_new_tokens=self.max_new_tokens, answer_cache=False, stall_timeout_s=3600)
                self.settings[name] = s
                self.procs[name] = [WorkerProcess(s, f"{name}{i}@localhost", self.tmp / f"{name}{i}.log",
                                                  threads=threads, hooks=hooks).start() for i in range(count)]
            for procs in self.procs.values():
                for p in procs:
                    p.wait_ready(300)
                    p.signal(signal.SIGSTOP)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        every = [p for procs in self.procs.values() for p in procs]
        for p in every:
            p.signal(signal.SIGCONT)
        with ThreadPoolExecutor(max(1, len(every))) as pool:
            list(pool.map(lambda p: p.stop(), every))
        self.redis.__exit__()

    def _resume(self, name: str) -> None:
        for p in self.procs[name]:
            p.signal(signal.SIGCONT)

    def _pause(self, name: str) -> None:
        for p in self.procs[name]:
            p.signal(signal.SIGSTOP)

    def warm_up(self, data: list[tuple[bytes, str]], max_new_tokens: int) -> None:
        """One untimed drain per set-up, as the in-process rows warm their model up: a worker's first
        batches build kernels for shapes it has not seen yet (measured: the first drain of a fresh worker
        ran 0.55–0.75× the later ones)."""
        for name in self.procs:
            self.drain(name, data, max_new_tokens)

    # -- measurements ------------------------------------------------------------------------------------
    def drain(self, name: str, jobs: list[tuple[bytes, str]], max_new_tokens: int | None = None,
              threads: int = 8) -> tuple[float, float, list[JobResult]]:
        """Queue ``jobs`` as bulk while the set-up is paused, then resume it and time until every job
        has ended. Returns (submitted jobs/s, drained jobs/s, results)."""
        client = Client(self.settings[name])
        try:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                ids = list(pool.map(lambda d: client.submit(d[0], d[1], max_new_tokens=max_new_tokens,
                                                            priority="bulk").id, jobs))
            submitted = len(jobs) / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            self._resume(name)
            try:
                results = client.wait_many(ids, timeout=600)
                drained = len(jobs) / (time.perf_counter() - t0)
            finally:
                self._pause(name)
            return submitted, drained, list(results.values())
        finally:
            client.close()

    def stored_bulk(self, keys: list[str], lines: int, rep: int) -> tuple[float, int]:
        """(e1) submit a bulk of ``lines`` lines over stored pictures while the null set-up is paused, then
        drain it. Returns (submitted lines/s, jobs succeeded)."""
        client = Client(self.settings["null"])
        try:
            manifest = stored_manifest(self.tmp / f"stored-{rep}.jsonl", keys, lines, f"r{rep}")
            rate, bulk = submit_rate(client, manifest, lines)
            self._resume("null")
            try:
                results = client.wait_many(job_ids(client, bulk), timeout=600)
            finally:
                self._pause("null")
            return rate, _succeeded(list(results.values()))
        finally:
            client.close()

    def idle_latency(self, data: list[tuple[bytes, str]], rounds: int) -> tuple[float, int]:
        """(f) one job at a time on an idle worker: median of (submit → result) minus the model's time."""
        client = Client(self.settings["one"])
        self._resume("one")
        try:
            overheads, ok = [], 0
            for image, question in data[:rounds]:
                t0 = time.perf_counter()
                res = client.wait(client.submit(image, question).id, timeout=60)
                total = (time.perf_counter() - t0) * 1000
                ok += res.status == JobStatus.succeeded
                overheads.append(total - res.timings.get("preprocess_ms", 0) - res.timings.get("generate_ms", 0))
            return statistics.median(overheads), ok
        finally:
            self._pause("one")
            client.close()

    def first_tokens(self, data: list[tuple[bytes, str]], backlog: int, interactive: int,
                     max_new_tokens: int) -> tuple[list[float], list[JobResult], int, int]:
        """(h) queue ``backlog`` bulk jobs, resume, and once the worker is busy with them send streaming
        interactive jobs one after another. Returns (seconds to each one's first text, the interactive
        results, jobs succeeded, jobs in all). A sample counts only if bulk jobs were still unfinished
        when its first text came."""
        client = Client(self.settings["one"])
        try:
            with ThreadPoolExecutor(8) as pool:
                bulk = list(pool.map(lambda i: client.submit(*data[i % len(data)], max_new_tokens=max_new_tokens,
                                                             priority="bulk").id, range(backlog)))
            self._resume("one")
            try:
                deadline = time.monotonic() + 120
                while not any(r.status != JobStatus.queued for r in client.jobs.get_many(bulk[:4]).values()):
                    if time.monotonic() > deadline:
                        raise TimeoutError("the worker took no bulk job in 120 s")
                    time.sleep(0.01)
                firsts: list[float] = []
                quick: list[JobResult] = []
                for image, question in data[:interactive]:
                    t0 = time.perf_counter()
                    job = client.submit(image, question, max_new_tokens=max_new_tokens, stream=True)
                    first = None
                    for delta in client.stream(job.id, timeout=120):
                        if first is None and delta.text:
                            first = time.perf_counter() - t0
                            left = sum(not r.status.terminal for r in client.jobs.get_many(bulk).values())
                            if left:
                                firsts.append(first)
                        if delta.result is not None:
                            quick.append(delta.result)
                results = [*quick, *client.wait_many(bulk, timeout=600).values()]
            finally:
                self._pause("one")
            return firsts, quick, _succeeded(results), interactive + backlog
        finally:
            client.close()

    def measure(self, table: Any, rep: int, data: list[tuple[bytes, str]], opts: Any, batch_s: float) -> None:
        """One repeat of rows d–h into ``table`` (``bench.Table``)."""
        _, rate, res = self.drain("one", data, opts.max_new_tokens)
        table("d", "tuwen end to end: backlog queued, then drained by 1 worker (client → Redis → worker → result)",
              "answers/s").add(rate, _succeeded(res), len(data))
        pictures = noise_pictures(opts.transport_jobs, seed=1000 + rep)
        submit, rate, res = self.drain("null", [(p, "图中有什么？") for p in pictures])
        row = table("e", "transport alone, null model (batches ≤ 64), distinct pictures: worker drain", "jobs/s")
        row.add(rate, _succeeded(res), len(pictures))
        table("e0", "e's submission: store a new picture + record + publish (8 client threads)", "jobs/s").add(
            submit, _succeeded(res), len(pictures))
        rate, ok = self.stored_bulk([r.image_key for r in res if r.image_key], opts.bulk_lines, rep)
        table("e1", f"bulk submission, {opts.bulk_lines} lines naming pictures already stored (e's): "
              "tuwen bulk submit's rate", "lines/s").add(rate, ok, opts.bulk_lines)
        rounds = min(opts.idle_rounds, len(data))
        latency, ok = self.idle_latency(data, rounds)
        table("f", "one job on an idle system: latency minus model time", "ms").add(latency, ok, rounds)
        for name, what in (("wide", "1 worker × 2 threads"), ("pair", "2 workers × 1 thread")):
            _, rate, res = self.drain(name, data * 4, opts.max_new_tokens)
            key = "g1" if name == "wide" else "g2"
            row = table(key, f"equal thread budget: {what}, backlog drained", "answers/s")
            row.add(rate, _succeeded(res), len(data) * 4)
            if key == "g2":
                row.note = (f"{len({r.worker for r in res})} workers answered; "
                            f"{sum(r.attempts > 1 for r in res)} jobs ran twice")
        firsts, quick, ok, total = self.first_tokens(data, opts.backlog, opts.interactive_jobs,
                                                     opts.max_new_tokens)
        if not firsts:
            raise RuntimeError("the bulk backlog ran out before any interactive job's first token; raise backlog")
        ranked = sorted(firsts)
        p50, p95 = statistics.median(ranked), ranked[math.ceil(0.95 * len(ranked)) - 1]
        what = "interactive first token during a bulk backlog"
        table("h50", f"{what}, p50 (× one static batch of 16)", "×").add(p50 / batch_s, ok, total)
        table("h95", f"{what}, p95 (× one static batch of 16)", "×").add(p95 / batch_s, ok, total)
        table["h50"].note = (f"static batch {batch_s * 1000:.0f} ms (row c); last repeat p50 {p50 * 1000:.0f} ms, "
                             f"p95 {p95 * 1000:.0f} ms; {len(firsts)}/{opts.interactive_jobs} samples during the backlog")
        table["h95"].note = "where the p50 went, last repeat: " + _where(quick)


def _where(results: list[JobResult]) -> str:
    """Medians of an interactive job's stages, from its result's timings (ms)."""
    def med(fn: Any) -> float:
        values = [fn(r.timings) for r in results if r.timings]
        return statistics.median(values) if values else float("nan")

    return (f"queued until a hand-over took it {med(lambda t: t.get('queue_ms', 0)):.0f} ms, fetch + prepare "
            f"{med(lambda t: t.get('fetch_ms', 0) + t.get('preprocess_ms', 0)):.0f} ms, waiting to join "
            f"{med(lambda t: t.get('queue_in_worker_ms', 0) - t.get('generate_ms', 0)):.0f} ms, join → first token "
            f"{med(lambda t: t.get('first_token_ms', 0)):.0f} ms")


def _succeeded(results: list[JobResult]) -> int:
    return sum(r.status == JobStatus.succeeded for r in results)
