"""AsyncClient inside a FastAPI app: 100 waits at once on one event loop, against a real worker."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from tuwen.pipeline.aclient import AsyncClient
from tuwen.pipeline.settings import Settings
from tuwen.workers.bench.process import WorkerProcess
from tuwen.workers.demo import bundled_demo_model

pytestmark = pytest.mark.integration
SAMPLES = bundled_demo_model().parent / "samples"


def samples() -> list[tuple[bytes, str, str]]:
    entries = json.loads((SAMPLES / "samples.json").read_text("utf-8"))
    return [((SAMPLES / e["file"]).read_bytes(), e["question"], e["facts"][0]) for e in entries]


def backend(client: AsyncClient, loops: set[tuple[int, int]]) -> FastAPI:
    """What a web backend writes: submit, then await the answer in the request handler."""
    app = FastAPI()

    @app.post("/ask/{n}")
    async def ask(n: int) -> dict[str, str | None]:
        loops.add((id(asyncio.get_running_loop()), threading.get_ident()))
        image, question, _ = samples()[n % 10]
        job = await client.submit(image, question, owner="web")
        result = await client.wait(job.id, timeout=240, owner="web")
        return {"status": result.status.value, "answer": result.answer}

    return app


def test_a_hundred_concurrent_waits_on_one_loop(worker: WorkerProcess, pipeline_settings: Settings) -> None:
    async def main() -> tuple[list[dict[str, str | None]], set[tuple[int, int]]]:
        client = AsyncClient(pipeline_settings)
        loops: set[tuple[int, int]] = set()
        transport = httpx.ASGITransport(app=backend(client, loops))
        async with httpx.AsyncClient(transport=transport, base_url="http://backend", timeout=300) as http:
            replies = await asyncio.gather(*(http.post(f"/ask/{n}") for n in range(100)))
        await client.aclose()
        return [r.json() for r in replies], loops

    answers, loops = asyncio.run(main())
    assert len(loops) == 1, "one event loop on one thread served every request"
    facts = [s[2] for s in samples()]
    assert [a["status"] for a in answers] == ["succeeded"] * 100
    right = sum(facts[n % 10] in (a["answer"] or "") for n, a in enumerate(answers))
    assert right == 100, f"{right}/100 answers name their picture's fact"


def test_wait_times_out_and_get_of_an_unknown_job(pipeline_settings: Settings) -> None:
    async def main() -> tuple[str, str]:
        client = AsyncClient(pipeline_settings)
        unknown = await client.get("no-such-job-123")
        waited = await client.wait("no-such-job-123", timeout=0.5)
        await client.aclose()
        return unknown.status.value, waited.status.value

    assert asyncio.run(main()) == ("unknown", "unknown")
