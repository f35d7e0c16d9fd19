"""The producer's client for asyncio backends (FastAPI, aiohttp): submit / get / wait / cancel / stream.

    from tuwen.pipeline.aclient import AsyncClient
    client = AsyncClient.from_env()
    job = await client.submit(picture_bytes, "图中有几个圆形？")
    result = await client.wait(job.id, timeout=60)
    async for delta in client.stream(job.id):       # a job submitted with stream=True
        print(delta.text, end="")

Job state is read with ``redis.asyncio`` on the event loop, so thousands of waits and streams share one
loop and one connection pool. Storing a picture and publishing a job go through the synchronous
``Client`` on a worker thread (``asyncio.to_thread``): the S3 and Celery clients have no asyncio API,
and each call is one short round trip.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import redis
import redis.asyncio as aioredis

from tuwen.pipeline.client import Client, ImageInput
from tuwen.pipeline.jobs import JobStore, outage
from tuwen.pipeline import sentinel
from tuwen.pipeline.keys import DONE, JOB
from tuwen.pipeline.schema import JobResult, JobStatus
from tuwen.pipeline.settings import Settings
from tuwen.pipeline.streams import Assembler, Delta
from tuwen.pipeline.watch import until_ended


class AsyncClient:
    """Mirrors ``Client``; one per process, shared by every request handler."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sync = Client(settings)
        options: dict[str, Any] = dict(decode_responses=True, socket_connect_timeout=2, socket_timeout=30,
                                       health_check_interval=15, max_connections=256)
        target = sentinel.parse(settings.redis_url)
        self.redis: aioredis.Redis = (sentinel.async_primary(target, **options) if target
                                      else aioredis.Redis.from_url(settings.redis_url, **options))

    @classmethod
    def from_env(cls, **overrides: Any) -> AsyncClient:
        return cls(Settings(**overrides))

    async def submit(self, image: ImageInput, question: str, **options: Any) -> JobResult:
        """``Client.submit`` on a worker thread (validation errors raise the same ``InvalidInput``)."""
        return await asyncio.to_thread(self.sync.submit, image, question, **options)

    async def cancel(self, job_id: str, owner: str | None = None) -> JobResult:
        return await asyncio.to_thread(self.sync.cancel, job_id, owner)

    async def get(self, job_id: str, owner: str | None = None) -> JobResult:
        """The job's state now (``unknown`` if there is no such job). Never blocks."""
        try:
            fields: dict[str, str] = await self.redis.hgetall(JOB + job_id)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise outage("Redis is not reachable", exc) from exc
        return JobStore._from_fields(job_id, fields, owner)

    async def wait(self, job_id: str, timeout: float = 60.0, owner: str | None = None) -> JobResult:
        """Wait until the job ends or ``timeout`` passes; returns its state either way. Listens for the
        job's completion message and re-reads the state every second (a message lost across a Redis
        restart costs at most a second)."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)

        async def wake(seconds: float) -> None:
            try:
                await pubsub.get_message(timeout=seconds)
            except (redis.ConnectionError, redis.TimeoutError):
                await asyncio.sleep(min(0.5, seconds))

        try:
            await pubsub.subscribe(DONE + job_id)
            return await until_ended(lambda: self.get(job_id, owner), wake, timeout)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise outage("Redis is not reachable", exc) from exc
        finally:
            try:
                await pubsub.aclose()
            except redis.RedisError:
                pass

    async def stream(self, job_id: str, timeout: float = 120.0, owner: str | None = None,
                     poll_s: float = 1.0) -> AsyncIterator[Delta]:
        """The answer as it is generated (see ``tuwen.pipeline.streams``), then a last ``Delta`` with the
        finish reason and the result; a last ``Delta`` without a result means ``timeout`` passed."""
        seen = Assembler(job_id)
        deadline = time.monotonic() + timeout
        while True:
            wait_ms = int(max(0.0, min(poll_s, deadline - time.monotonic())) * 1000)
            try:
                reply: Any = await self.redis.xread({seen.key: seen.last_id}, count=256, block=wait_ms) if wait_ms else []
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise outage("Redis is not reachable", exc) from exc
            for delta in seen.take(reply):
                yield delta
            result = await self.get(job_id, owner)
            if seen.over(result):
                if seen.reason is not None and not result.status.terminal:
                    result = await self.wait(job_id, max(0.0, min(5.0, deadline - time.monotonic())), owner)
                for delta in seen.closing(result):
                    yield delta
                return
            if time.monotonic() >= deadline:
                yield Delta()
                return

    async def aclose(self) -> None:
        await self.redis.aclose()
        await asyncio.to_thread(self.sync.close)
