"""Per-minute job counters in Redis, for ``tuwen status`` (jobs per minute, failures by code)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

from tuwen.pipeline import keys

KEY = keys.STATS
KEEP_S = 3 * 3600


def record(redis: Any, outcomes: Iterable[tuple[str, str | None]], now: float | None = None) -> None:
    """Count finished jobs, ``(status, error code or None)`` each, in the current minute's hash."""
    key = KEY + str(int((now or time.time()) // 60))
    pipe = redis.pipeline(transaction=False)
    for status, code in outcomes:
        pipe.hincrby(key, f"status:{status}", 1)
        if code:
            pipe.hincrby(key, f"code:{code}", 1)
    pipe.expire(key, KEEP_S)
    pipe.execute()


def summary(redis: Any, minutes: int = 10, now: float | None = None) -> dict[str, Any]:
    """``{"minutes": [{minute, succeeded, failed, cancelled}], "codes": {code: n}}``, oldest first."""
    current = int((now or time.time()) // 60)
    span = list(range(current - minutes + 1, current + 1))
    pipe = redis.pipeline(transaction=False)
    for minute in span:
        pipe.hgetall(KEY + str(minute))
    rows = pipe.execute()
    codes: Counter[str] = Counter()
    per_minute = []
    for minute, row in zip(span, rows):
        entry = {"minute": minute * 60, "succeeded": 0, "failed": 0, "cancelled": 0}
        for field, value in row.items():
            kind, _, name = field.partition(":")
            if kind == "status":
                entry[name] = int(value)
            elif kind == "code":
                codes[name] += int(value)
        per_minute.append(entry)
    return {"minutes": per_minute, "codes": dict(codes)}
