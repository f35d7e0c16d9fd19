"""Fairness: a big bulk must not starve interactive users (one worker reads both queues)."""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

import pytest

from tuwen.pipeline.bulk.manifest import open_source
from tuwen.pipeline.bulk.model import BulkState
from tuwen.pipeline.bulk.store import BulkStore
from tuwen.pipeline.client import Client
from tuwen.pipeline.localredis import LocalRedis
from tuwen.pipeline.schema import JobStatus
from tests.bulk.conftest import draw_pictures, write_jsonl
from tests.conftest import TIMING, make_settings
from tests.s3servers import S3Endpoint
from tuwen.workers.bench.process import WorkerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900), pytest.mark.xdist_group(TIMING)]

BULK_JOBS = 300


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def test_interactive_jobs_finish_within_about_two_batch_times_during_a_300_job_bulk(
        redis_server: LocalRedis, s3: S3Endpoint, tmp_path: Path) -> None:
    settings = make_settings(redis_server.url, s3, interactive_queue="fair-interactive", bulk_queue="fair-bulk")
    worker = WorkerProcess(settings, "fair@tests", tmp_path / "worker.log").start()
    client = Client(settings)
    try:
        worker.wait_ready(timeout=180)
        store = BulkStore(client)
        # Given a 300-job bulk of distinct pictures (so the answer cache cannot shortcut them)
        pictures_asked = draw_pictures(tmp_path / "bulk", BULK_JOBS, seed=31_337)
        manifest = write_jsonl(tmp_path / "bulk.jsonl", [
            {"custom_id": p.stem, "image": f"bulk/{p.name}", "question": q} for p, q in pictures_asked])
        interactive = draw_pictures(tmp_path / "interactive", 60, seed=47_11)
        bulk = store.submit(open_source(manifest))
        # When interactive jobs arrive, from three users one after another each, while the bulk runs
        latencies: list[float] = []
        backlog: list[int] = []
        pictures = iter(interactive)
        lock = threading.Lock()
        failures: list[object] = []

        def user() -> None:
            while True:
                with lock:
                    current = store.refresh(bulk.id)
                    nxt = next(pictures, None)
                if current.state.terminal or nxt is None:
                    return
                counts = current.request_counts
                t0 = time.monotonic()
                job = client.submit(nxt[0].read_bytes(), nxt[1])
                result = client.wait(job.id, timeout=120)
                with lock:
                    if result.status != JobStatus.succeeded:
                        failures.append(result)
                    latencies.append(time.monotonic() - t0)
                    backlog.append(counts.total - counts.completed - counts.failed)

        users = [threading.Thread(target=user) for _ in range(3)]
        for t in users:
            t.start()
        for t in users:
            t.join(300)
        assert not failures
        done = store.wait(bulk.id, timeout=600)
        # Then the whole bulk completed …
        assert done.state == BulkState.completed
        assert done.request_counts.model_dump() == {"total": BULK_JOBS, "completed": BULK_JOBS, "failed": 0}
        jobs = client.jobs.get_many([line["job_id"] for line in store.results(bulk.id)])
        # A batch time: how long the worker takes for one full batch's worth of jobs (max_batch_size) at the
        # rate it drained the backlog. (On a busy machine it often runs smaller batches more often.)
        first = min(r.started_at or 0.0 for r in jobs.values())
        last = max(r.finished_at or 0.0 for r in jobs.values())
        rate = BULK_JOBS / (last - first)
        batch_time = settings.max_batch_size / rate
        sizes = {r.started_at: r.batch_size or 0 for r in jobs.values()}
        p50, p95 = percentile(latencies, 0.5), percentile(latencies, 0.95)
        print(f"\nfairness: {BULK_JOBS} bulk jobs in {last - first:.1f}s ({rate:.1f} jobs/s, {len(sizes)} model "
              f"batches of {statistics.mean(sizes.values()):.1f} on average; one batch time = "
              f"{settings.max_batch_size} jobs = {batch_time:.2f}s). {len(latencies)} interactive jobs meanwhile: "
              f"latency p50 {p50:.2f}s, p95 {p95:.2f}s, max {max(latencies):.2f}s = {p50 / batch_time:.1f} / "
              f"{p95 / batch_time:.1f} batch times; queued behind the bulk backlog (median "
              f"{statistics.median(backlog):.0f} jobs) they would have waited ~{statistics.median(backlog) / rate:.0f}s")
        # … and the interactive jobs did not queue behind it: they finished within about two batch times
        # (the worker's bounded prefetch holds about two batches of bulk jobs ahead of them), not behind the
        # whole backlog
        assert len(latencies) >= 10 and statistics.median(backlog) >= 50
        assert p50 <= 2.5 * batch_time
        assert p95 <= 4 * batch_time
    finally:
        client.close()
        worker.stop()
