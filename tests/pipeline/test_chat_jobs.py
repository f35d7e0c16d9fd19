"""Conversation, streaming and sampling jobs through a real worker (Redis, S3, the demo model)."""

from __future__ import annotations

import asyncio
import json

import pytest

from tuwen.pipeline.aclient import AsyncClient
from tuwen.pipeline.client import Client
from tuwen.pipeline.conversation import Turn, prepare_conversation
from tuwen.pipeline.schema import JobStatus
from tuwen.workers.bench.process import WorkerProcess
from tuwen.workers.demo import bundled_demo_model

pytestmark = pytest.mark.integration
SAMPLES = bundled_demo_model().parent / "samples"


def sample(name: str) -> tuple[bytes, str, str]:
    entry = next(e for e in json.loads((SAMPLES / "samples.json").read_text("utf-8")) if e["file"] == name)
    return (SAMPLES / name).read_bytes(), entry["question"], entry["facts"][0]


def test_a_follow_up_through_the_queue(worker: WorkerProcess, client: Client) -> None:
    picture, question, fact = sample("colour-photo.png")
    job = prepare_conversation(client, [Turn("user", [picture, "看一看，这是什么形状？"]), Turn("assistant", ["一个图形。"]),
                                        Turn("user", [question])], {}, owner="chat")
    client.enqueue(job)
    result = client.wait(job.id, timeout=120, owner="chat")
    assert result.status == JobStatus.succeeded and fact in (result.answer or ""), result
    assert result.finish_reason == "stop" and (result.prompt_tokens or 0) > 60


def test_a_streamed_answer_arrives_in_pieces_that_make_the_answer(worker: WorkerProcess, client: Client) -> None:
    picture, question, fact = sample("describe-worksheet.png")
    job = client.submit(picture, question, owner="chat", stream=True)
    deltas = list(client.stream(job.id, timeout=120, owner="chat"))
    pieces = [d.text for d in deltas if d.text]
    final = deltas[-1]
    assert final.result is not None and final.result.status == JobStatus.succeeded
    assert len(pieces) >= 2, pieces
    assert "".join(pieces) == final.result.answer and fact in "".join(pieces)
    assert final.finish_reason == "stop"

    async def streamed_async() -> list[str]:
        aclient = AsyncClient(client.settings)
        again = await aclient.submit(picture, question, owner="chat", stream=True)
        out = [d.text async for d in aclient.stream(again.id, timeout=120, owner="chat") if d.text]
        await aclient.aclose()
        return out

    assert "".join(asyncio.run(streamed_async())) == final.result.answer


def test_a_seeded_sample_is_the_same_alone_and_in_a_batch_of_eight(worker: WorkerProcess, client: Client) -> None:
    picture, question, _ = sample("describe-photo.png")
    hot = {"temperature": 1.3, "top_p": 0.95, "seed": 20261130, "max_new_tokens": 24}
    alone = client.submit(picture, question, params=hot, owner="chat")
    first = client.wait(alone.id, timeout=120, owner="chat")
    others = [sample(n) for n in ("shape-photo.png", "count-photo.png", "colour-worksheet.png", "arithmetic-photo.png")]
    ids = [client.submit(p, q, params={"temperature": 0.9, "seed": k}, owner="chat").id
           for k, (p, q, _) in enumerate((others * 2)[:7])]
    again = client.submit(picture, question, params=hot, owner="chat")
    ids.insert(3, again.id)
    results = client.wait_many(ids, timeout=180)
    second = results[again.id]
    assert first.status == second.status == JobStatus.succeeded
    assert second.answer == first.answer
    assert max(r.batch_size or 0 for r in results.values()) >= 2, "it must have shared the batch with others"
