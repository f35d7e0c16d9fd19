"""``tuwen bench``: one run, one table, every row measured side by side on the same inputs.

Rows: (a) processor + ``generate`` per request; (b) ``transformers.pipeline`` with batch_size=16;
(c) tuwen's runtime in-process, batched; (d) tuwen end to end through Redis, a worker and storage;
(e) transport alone with a null model; (f) one job on an idle system, latency minus model time;
(g) two worker processes against one.

torch runs at one thread everywhere (this 2-core machine is noisy; ratios measured in one run are what
counts, not absolute numbers).
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from tuwen.pipeline.client import Client
from tuwen.pipeline.localredis import LocalRedis
from tuwen.pipeline.settings import Settings
from tuwen.workers.demo.scenes import KINDS, draw_training_example
from tuwen.workers.process import WorkerProcess
from tuwen.workers.runtime import Item, Runtime

BATCH = 16


@dataclass
class Row:
    key: str
    what: str
    value: float
    unit: str
    note: str = ""


def inputs(n: int, seed: int = 4242) -> list[tuple[bytes, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ex = draw_training_example(rng, KINDS[i % len(KINDS)])
        buf = BytesIO()
        ex.image.save(buf, format="PNG")
        out.append((buf.getvalue(), ex.question))
    return out


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def seed_way(rt: Runtime, data: list[tuple[bytes, str]], max_new_tokens: int, forced: bool = False) -> float:
    """(a) what the seed did: one request at a time, processor + generate."""
    import torch
    from PIL import Image

    processor, model = rt.processor, rt.model

    def run() -> None:
        for image, question in data:
            prompt = processor.apply_chat_template(rt.messages(question), add_generation_prompt=True)
            enc = processor(images=[Image.open(BytesIO(image)).convert("RGB")], text=[prompt], return_tensors="pt")
            with torch.inference_mode():
                model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                               min_new_tokens=max_new_tokens if forced else 0)

    return len(data) / timed(run)


def hf_pipeline(rt: Runtime, data: list[tuple[bytes, str]], max_new_tokens: int, forced: bool = False) -> float:
    """(b) what a user would pick instead: ``pipeline("image-text-to-text", batch_size=16)``."""
    from PIL import Image
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=rt.model, processor=rt.processor, batch_size=BATCH)
    batch = [{"role": "user", "content": [{"type": "image", "image": Image.open(BytesIO(img)).convert("RGB")},
                                          {"type": "text", "text": q}]} for img, q in data]
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "min_new_tokens": max_new_tokens if forced else 0}
    return len(data) / timed(lambda: pipe(text=[[m] for m in batch], generate_kwargs=kwargs))


def runtime_batched(rt: Runtime, data: list[tuple[bytes, str]], max_new_tokens: int) -> float:
    """(c) tuwen's runtime in-process, batches of 16."""
    items = [Item(img, q, max_new_tokens) for img, q in data]
    return len(data) / timed(lambda: [rt.answer_batch(items[i:i + BATCH]) for i in range(0, len(items), BATCH)])


def through_queue(settings: Settings, data: list[tuple[bytes, str]], workers: int, tmp: Path,
                  max_new_tokens: int | None = None) -> tuple[float, list[Any]]:
    """Submit everything concurrently through the client, wait for all; returns (jobs/s, results)."""
    procs = [WorkerProcess(settings, f"bench{i}@localhost", tmp / f"bench{i}.log").start() for i in range(workers)]
    client = Client(settings)
    try:
        for p in procs:
            p.wait_ready(180)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            jobs = list(pool.map(lambda d: client.submit(d[0], d[1], max_new_tokens=max_new_tokens), data))
        results = client.wait_many([j.id for j in jobs], timeout=600)
        elapsed = time.perf_counter() - t0
        return len(data) / elapsed, list(results.values())
    finally:
        client.close()
        for p in procs:
            p.stop()


def transport(settings: Settings, data: list[tuple[bytes, str]], tmp: Path) -> tuple[float, float]:
    """(e) with a null model: the producer's submit rate (8 threads, no worker running), then the
    worker's drain rate over that backlog (jobs/s each)."""
    client = Client(settings)
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            jobs = list(pool.map(lambda d: client.submit(d[0], d[1]), data))
        submit_rate = len(data) / (time.perf_counter() - t0)
        proc = WorkerProcess(settings, "null@localhost", tmp / "null.log").start()
        try:
            proc.wait_ready(180)
            t0 = time.perf_counter()
            client.wait_many([j.id for j in jobs], timeout=600)
            drain_rate = len(data) / (time.perf_counter() - t0)
        finally:
            proc.stop()
        return submit_rate, drain_rate
    finally:
        client.close()


def idle_latency(settings: Settings, data: list[tuple[bytes, str]], tmp: Path, rounds: int = 10) -> float:
    """(f) one job at a time on an idle system: median of (submit → result) minus the job's model time."""
    proc = WorkerProcess(settings, "idle@localhost", tmp / "idle.log").start()
    client = Client(settings)
    try:
        proc.wait_ready(180)
        overheads = []
        for image, question in data[:rounds]:
            t0 = time.perf_counter()
            job = client.submit(image, question)
            res = client.wait(job.id, timeout=60)
            total = (time.perf_counter() - t0) * 1000
            overheads.append(total - res.timings.get("preprocess_ms", 0) - res.timings.get("generate_ms", 0))
        return statistics.median(overheads)
    finally:
        client.close()
        proc.stop()


def run(n: int = 64, max_new_tokens: int = 24, transport_jobs: int = 1000, model_path: Path | None = None,
        log: Callable[[str], None] = print) -> tuple[list[Row], str]:
    import torch

    torch.set_num_threads(1)
    data = inputs(n)
    rows: list[Row] = []
    rt = Runtime(Settings(model_path=model_path, torch_threads=1, max_new_tokens=max_new_tokens))
    rt.load()
    runtime_batched(rt, data[:BATCH], max_new_tokens)  # warm-up
    a = seed_way(rt, data, max_new_tokens)
    rows.append(Row("a", "processor + model.generate per request", a, "answers/s"))
    log(f"a {a:.1f}")
    b = hf_pipeline(rt, data, max_new_tokens)
    rows.append(Row("b", 'transformers.pipeline("image-text-to-text", batch_size=16)', b, "answers/s",
                    f"{b / a:.2f}× a"))
    log(f"b {b:.1f}")
    c = runtime_batched(rt, data, max_new_tokens)
    rows.append(Row("c", "tuwen runtime in-process, batched (16)", c, "answers/s",
                    f"{c / a:.2f}× a, {c / b:.2f}× b"))
    log(f"c {c:.1f}")
    # The same three with every answer forced to max_new_tokens: the decode-bound regime of real models,
    # whose answers are long. (The demo model's answers are 6–14 tokens, so above the 64 image tokens'
    # prefill dominates, which batching cannot shrink.)
    rt.min_new_tokens = max_new_tokens
    a2 = seed_way(rt, data, max_new_tokens, forced=True)
    b2 = hf_pipeline(rt, data, max_new_tokens, forced=True)
    c2 = runtime_batched(rt, data, max_new_tokens)
    rt.min_new_tokens = 0
    rows += [Row("a'", f"a, every answer {max_new_tokens} tokens", a2, "answers/s"),
             Row("b'", f"b, every answer {max_new_tokens} tokens", b2, "answers/s", f"{b2 / a2:.2f}× a'"),
             Row("c'", f"c, every answer {max_new_tokens} tokens", c2, "answers/s",
                 f"{c2 / a2:.2f}× a', {c2 / b2:.2f}× b'")]
    log(f"a' {a2:.1f} b' {b2:.1f} c' {c2:.1f}")
    with LocalRedis() as redis_server, tempfile.TemporaryDirectory(prefix="tuwen-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        base = dict(redis_url=redis_server.url, storage_dir=tmp / "storage", model_path=model_path,
                    max_batch_size=BATCH, batch_wait_ms=50, max_new_tokens=max_new_tokens, answer_cache=False)
        d, _ = through_queue(Settings(**base), data, 1, tmp)  # type: ignore[arg-type]
        rows.append(Row("d", "tuwen end to end: client → Redis → worker → storage → result", d, "answers/s",
                        f"{d / c:.2f}× c"))
        log(f"d {d:.1f}")
        many = (inputs(min(transport_jobs, 64)) * (transport_jobs // 64 + 1))[:transport_jobs]
        null = Settings(**{**base, "null_model": True, "max_batch_size": 64})  # type: ignore[arg-type]
        e_end, _ = through_queue(null, many, 1, tmp)
        e_submit, e_drain = transport(null, many, tmp)
        rows.append(Row("e", "transport alone, null model (batches ≤ 64): worker draining a backlog", e_drain,
                        "jobs/s", f"submit {e_submit:.0f} jobs/s (8 client threads); both at once {e_end:.0f} jobs/s"))
        log(f"e {e_drain:.1f} (submit {e_submit:.1f}, concurrent {e_end:.1f})")
        f = idle_latency(Settings(**base), data, tmp)  # type: ignore[arg-type]
        rows.append(Row("f", "one job on an idle system: latency minus model time", f, "ms",
                        f"wait window {base['batch_wait_ms']} ms"))
        log(f"f {f:.1f}")
        big = data * 4
        one, _ = through_queue(Settings(**base), big, 1, tmp)  # type: ignore[arg-type]
        two, results = through_queue(Settings(**base), big, 2, tmp)  # type: ignore[arg-type]
        twice = sum(r.attempts > 1 for r in results)
        workers_used = len({r.worker for r in results})
        rows.append(Row("g", "two worker processes vs one (1 thread each)", two / one, "× one",
                        f"{one:.1f} → {two:.1f} answers/s; {workers_used} workers; {twice} jobs run twice"))
        log(f"g {two / one:.2f}")
    header = (f"tuwen bench — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, "
              f"{os.cpu_count()} CPUs, torch 1 thread, {n} inputs, max_new_tokens={max_new_tokens}. "
              "This machine is shared and noisy: compare ratios from one run, not absolute numbers.")
    return rows, header


def table(rows: list[Row], header: str) -> str:
    lines = [header, "", "| row | what | result | ratio |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.key} | {r.what} | {r.value:.1f} {r.unit} | {r.note} |")
    return "\n".join(lines)
