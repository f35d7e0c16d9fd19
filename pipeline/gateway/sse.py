"""Server-Sent Events as OpenAI streams them: ``data: <json>`` events, ``data: [DONE]`` at the end, and
``: keep-alive`` comments while nothing else is sent (so proxies do not close a quiet stream while a
job waits in the queue; SSE readers, the official SDK's included, skip comments)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, TypeVar

T = TypeVar("T")

MEDIA_TYPE = "text/event-stream"
#: No caching, and no buffering in nginx (``X-Accel-Buffering``): each event goes out as it is made.
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = "data: [DONE]\n\n"
KEEP_ALIVE = ": keep-alive\n\n"


def event(payload: dict[str, Any]) -> str:
    """One ``data:`` event (compact JSON on one line; Chinese stays readable)."""
    return "data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n\n"


async def with_heartbeats(source: AsyncIterator[T], every_s: float) -> AsyncGenerator[T | None, None]:
    """``source``'s items, and ``None`` whenever ``every_s`` pass without one. If the reader stops (a
    client that went away cancels the response), the pending read of ``source`` is cancelled too, and a
    ``source`` left between items is closed."""
    pending: asyncio.Future[T] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(source))
            done, _ = await asyncio.wait({pending}, timeout=every_s)
            if not done:
                yield None
                continue
            finished, pending = pending, None
            try:
                item = finished.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if pending is not None:
            pending.cancel()  # it closes ``source`` as the cancellation reaches it
        elif (close := getattr(source, "aclose", None)) is not None:
            await close()
