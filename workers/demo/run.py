"""``tuwen demo``: a whole pipeline on one machine, from nothing, and gone again afterwards.

Starts a private redis-server on a free port (never the one on 6379), local-directory storage and one
worker with the demo model; submits the bundled pictures through the queue; prints each question with
its answer and timing; stops what it started.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from rich.console import Console

from tuwen.pipeline.client import Client
from tuwen.pipeline.localredis import LocalRedis
from tuwen.pipeline.settings import Settings
from tuwen.workers.demo.samples import load_samples
from tuwen.workers.bench.process import WorkerProcess


def run_demo(console: Console, *, model_path: Path | None = None) -> int:
    samples = load_samples()
    with LocalRedis() as redis_server, tempfile.TemporaryDirectory(prefix="tuwen-demo-") as tmp:
        settings = Settings(redis_url=redis_server.url, storage_dir=Path(tmp) / "storage", model_path=model_path,
                            minio_endpoint=None, max_batch_size=8, batch_wait_ms=200, max_new_tokens=48)
        console.print(f"[dim]redis-server on {redis_server.url}; storage in {settings.storage_dir}[/dim]")
        worker = WorkerProcess(settings, "demo@localhost", Path(tmp) / "worker.log", threads=2).start()
        client = Client(settings)
        try:
            t0 = time.monotonic()
            worker.wait_ready(timeout=300)
            console.print(f"[dim]worker ready in {time.monotonic() - t0:.1f}s[/dim]")
            t0 = time.monotonic()
            jobs = [client.submit(s.path.read_bytes(), s.question) for s in samples]
            results = client.wait_many([j.id for j in jobs], timeout=300)
            elapsed = time.monotonic() - t0
        finally:
            client.close()
            worker.stop()
        console.print("[bold]tuwen demo — questions and answers through the queue[/bold]\n")
        right = 0
        for n, (sample, job) in enumerate(zip(samples, jobs), 1):
            res = results[job.id]
            ok = res.answer is not None and all(f in res.answer for f in sample.facts)
            right += ok
            mark = "[green]✓[/green]" if ok else "[red]✗[/red]"
            console.print(f"[dim]{n:>2}. {sample.path.name} · batch of {res.batch_size or '-'} · "
                          f"{res.timings.get('total_ms', 0):.0f} ms[/dim]")
            console.print(f"    问：{sample.question}")
            if res.answer is not None:
                console.print(f"    答：{res.answer} {mark}")
            else:
                console.print(f"    [red]{res.status.value}: {res.error.code if res.error else '?'}[/red]")
        console.print(f"{right}/{len(samples)} answers name the right facts; {len(samples)} jobs in {elapsed:.1f}s.")
        return 0 if all(results[j.id].status.value == "succeeded" for j in jobs) else 1
