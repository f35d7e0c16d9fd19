"""Waiting for a job to end: the one loop that every async waiter runs (``AsyncClient.wait``, the gateway's
long-poll and its chat and Responses routes).

``read`` gives the job's state now; ``wake`` waits at most the given seconds for a sign that the job may
have ended (a message on its done channel, ``keys.DONE`` + id). The state is re-read after every wake, at
least every second, so a message lost across a Redis restart costs a second, never an answer. The loop
ends when the job has ended, is unknown, or ``timeout`` passed; it returns the state either way.
(The synchronous face, for many jobs at once, is ``JobStore.wait_many``.)
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from tuwen.pipeline.schema import JobResult, JobStatus

#: Longest sleep between two reads of the state.
RECHECK_S = 1.0


def ended(result: JobResult) -> bool:
    return result.status.terminal or result.status == JobStatus.unknown


async def until_ended(read: Callable[[], Awaitable[JobResult]], wake: Callable[[float], Awaitable[Any]],
                      timeout: float) -> JobResult:
    """The job once it ended, or as it is when ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    result = await read()
    while not ended(result):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        await wake(min(left, RECHECK_S))
        result = await read()
    return result
