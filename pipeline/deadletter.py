"""Messages a worker could not run, moved aside instead of sinking it (``tuwen status`` shows them).

A queue message that is not a tuwen job (not JSON, not a kombu envelope, a body that is not base64, not a
``tuwen.answer`` call with a valid job) is written here by the worker, newest first, with why it was
refused; the worker then goes on with the next message. Inspect them with ``tuwen status`` or
``redis-cli LRANGE tuwen:deadletter 0 -1``; ``DEL tuwen:deadletter`` empties the list.
"""

from __future__ import annotations

import json
import time
from typing import Any

from tuwen.pipeline import keys

KEY = keys.DEAD_LETTER
#: The list keeps the newest this many entries.
KEEP = 10_000
#: A message longer than this is kept truncated (the reason says what was wrong with it).
MAX_CHARS = 64 * 1024


def put(redis: Any, *, queue: str, reason: str, message: str, worker: str, job_id: str | None = None) -> None:
    """Move one refused message aside: ``reason`` is a short code (``not_json``, ``bad_job`` …)."""
    entry = {"queue": queue, "reason": reason, "worker": worker, "at": time.time(), "job_id": job_id,
             "message": message[:MAX_CHARS], "truncated": len(message) > MAX_CHARS}
    pipe = redis.pipeline(transaction=True)
    pipe.lpush(KEY, json.dumps(entry, ensure_ascii=False))
    pipe.ltrim(KEY, 0, KEEP - 1)
    pipe.execute()


def size(redis: Any) -> int:
    return int(redis.llen(KEY))


def recent(redis: Any, n: int = 5) -> list[dict[str, Any]]:
    """The newest ``n`` entries, newest first."""
    return [json.loads(raw) for raw in redis.lrange(KEY, 0, n - 1)]
